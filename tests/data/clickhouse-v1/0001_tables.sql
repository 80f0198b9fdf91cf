-- Receipt tables. Applied once, recorded in schema_migrations; every statement is idempotent.

-- One row per activity attempt: every field of the signed StepReceipt (Avro field order), so a
-- verifier can re-encode the signed bytes from the row alone.
-- ORDER BY (namespace, workflow_id, run_id, receipt_id): verify, the builder's re-hydration and
-- per-run lookups read one run's rows; tool/time analytics go through the views of 0002.
-- non_replicated_deduplication_window keeps the hashes of recent insert blocks, so a batch
-- replayed with the same insert_deduplication_token is dropped by the table itself.
CREATE TABLE IF NOT EXISTS step_receipts
(
    receipt_id        UUID,
    namespace         LowCardinality(String),
    workflow_id       String,
    run_id            String,
    workflow_type     LowCardinality(String),
    task_queue        LowCardinality(String),
    activity_id       String,
    activity_type     LowCardinality(String),
    attempt           Int32 CODEC(T64, LZ4),
    is_local          Bool,
    tool_server       LowCardinality(String),
    tool              LowCardinality(String),
    action            LowCardinality(String),
    resource          LowCardinality(String),
    subject           LowCardinality(String),
    capability_id     String,
    capability_chain  Array(String),
    scope             Array(LowCardinality(String)),
    verdict           Enum8('UNKNOWN' = 0, 'ALLOW' = 1, 'DENY' = 2),
    reason            String CODEC(ZSTD(3)),
    argument_digest   String CODEC(NONE),
    argument_key_id   LowCardinality(String),
    scheduled_at      DateTime64(6, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    started_at        DateTime64(6, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    evaluated_at      DateTime64(6, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    latency_us        Int64 CODEC(T64, ZSTD(1)),
    worker_identity   LowCardinality(String),
    prev_hash         String CODEC(NONE),
    key_id            LowCardinality(String),
    signature         String CODEC(NONE),
    wire              String CODEC(ZSTD(3)),
    kafka_partition   Int32 CODEC(T64, LZ4),
    kafka_offset      Int64 CODEC(Delta, ZSTD(1)),
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(evaluated_at)
ORDER BY (namespace, workflow_id, run_id, receipt_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per envelope revision; ReplacingMergeTree(revision) keeps the newest under FINAL.
CREATE TABLE IF NOT EXISTS workflow_receipts
(
    namespace            LowCardinality(String),
    workflow_id          String,
    run_id               String,
    workflow_type        LowCardinality(String),
    parent_workflow_ids  Array(String),
    started_at           DateTime64(6, 'UTC'),
    completed_at         Nullable(DateTime64(6, 'UTC')),
    outcome              LowCardinality(String),
    step_count           UInt32,
    allow_count          UInt32,
    deny_count           UInt32,
    revision             UInt32,
    complete             Bool,
    missing_steps        UInt32,
    expected_steps       Nullable(Int32),
    receipt_ids          Array(String),
    chain_root           String CODEC(NONE),
    key_id               LowCardinality(String),
    signature            String CODEC(NONE),
    extra                Map(String, String),
    written_at           DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(started_at)
ORDER BY (namespace, workflow_id, run_id)
SETTINGS non_replicated_deduplication_window = 10000;
