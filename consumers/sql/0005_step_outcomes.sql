-- StepOutcome: how each attempt's body ended (or why the gate refused it), one row per outcome
-- record. The leading columns are the record's Avro fields in Avro order (a verifier re-encodes
-- the signed bytes from them), then the framed message as consumed (`wire`, zstd), its Kafka
-- position, and the receipt's analytics columns. Timestamps are DateTime64(6, 'UTC') like
-- step_receipts'; `status` is the StepStatus symbol.
-- ReplacingMergeTree keyed by the run and outcome_id: a replayed record is dropped by the
-- builder (it re-hydrates the run's stored outcome ids) and by insert deduplication, and a merge
-- would fold any remaining copy.
CREATE TABLE IF NOT EXISTS step_outcomes
(
    outcome_id          UUID,
    namespace           LowCardinality(String),
    workflow_id         String,
    run_id              String,
    workflow_type       LowCardinality(String),
    task_queue          LowCardinality(String),
    activity_id         String,
    activity_type       LowCardinality(String),
    attempt             Int32 CODEC(T64, LZ4),
    is_local            Bool,
    tool_server         LowCardinality(String),
    tool                LowCardinality(String),
    capability_id       String,
    decision_receipt_id String,
    decision_chio_id    String CODEC(ZSTD(1)),
    status              LowCardinality(String),
    error_type          LowCardinality(String),
    started_at          DateTime64(6, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    ended_at            DateTime64(6, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    duration_us         Int64 CODEC(T64, ZSTD(1)),
    result_digest       String CODEC(NONE),
    result_key_id       LowCardinality(String),
    worker_identity     LowCardinality(String),
    trace_id            String CODEC(ZSTD(1)),
    span_id             String CODEC(ZSTD(1)),
    chio_receipt        String CODEC(ZSTD(3)),
    chio_signed         String CODEC(ZSTD(3)),
    wire                String CODEC(ZSTD(3)),
    kafka_partition     Int32 CODEC(T64, LZ4),
    kafka_offset        Int64 CODEC(Delta, ZSTD(1)),
    -- Analytics: whether the record carries a Chio receipt (an unsigned record is a gate failure
    -- the sidecar could not sign, or a claim nobody vouches for), and that receipt's id, signer
    -- and policy.
    is_signed           Bool,
    chio_receipt_id     String CODEC(NONE),
    kernel_key          LowCardinality(String),
    policy_hash         LowCardinality(String),
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ended_at)
ORDER BY (namespace, workflow_id, run_id, outcome_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- What verify needs to rebuild an envelope's signed bytes: the outcome ids it embeds, in envelope
-- order ((activity_id, attempt, outcome_id)), and its attempt accounts (one per attempt Temporal
-- started, in (activity_id, attempt) order). Rows written before read both as empty arrays.
ALTER TABLE workflow_receipts
    ADD COLUMN IF NOT EXISTS outcome_ids Array(String) AFTER extra,
    ADD COLUMN IF NOT EXISTS attempts Array(Tuple(
        activity_id String,
        activity_type String,
        attempt Int32,
        is_local Bool,
        account LowCardinality(String),
        reason String,
        outcome LowCardinality(String)
    )) AFTER outcome_ids;
