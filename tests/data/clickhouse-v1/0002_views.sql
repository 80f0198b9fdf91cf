-- Analytics views. Materialized where it pays (the hourly deny counters are read often and
-- aggregate every step); the others are plain views over the ordered tables.

-- Allow/deny counters per tool server and tool per hour, filled on insert.
CREATE TABLE IF NOT EXISTS deny_counts_hourly
(
    hour         DateTime('UTC'),
    tool_server  LowCardinality(String),
    tool         LowCardinality(String),
    total        UInt64,
    denied       UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, tool_server, tool)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS deny_counts_hourly_mv TO deny_counts_hourly AS
SELECT
    toStartOfHour(evaluated_at) AS hour,
    tool_server,
    tool,
    count() AS total,
    countIf(verdict = 'DENY') AS denied
FROM step_receipts
GROUP BY hour, tool_server, tool;

-- Deny rate per tool server and tool per hour.
CREATE VIEW IF NOT EXISTS deny_rate_hourly AS
SELECT
    hour,
    tool_server,
    tool,
    sum(c.total) AS total,
    sum(c.denied) AS denied,
    round(denied / total, 4) AS deny_rate
FROM deny_counts_hourly AS c
GROUP BY hour, tool_server, tool;

-- latency_us in a receipt is the policy evaluation latency (not the activity's own run time).
CREATE VIEW IF NOT EXISTS policy_latency_by_activity_type AS
SELECT
    activity_type,
    count() AS evaluations,
    quantile(0.5)(latency_us) AS p50_us,
    quantile(0.95)(latency_us) AS p95_us
FROM step_receipts
GROUP BY activity_type;

-- Current envelope of each run (newest revision), then runs by outcome per day.
CREATE VIEW IF NOT EXISTS runs_by_outcome_daily AS
SELECT
    toDate(started_at) AS day,
    outcome,
    count() AS runs
FROM workflow_receipts FINAL
GROUP BY day, outcome;

CREATE VIEW IF NOT EXISTS incomplete_envelopes AS
SELECT
    namespace,
    workflow_id,
    run_id,
    workflow_type,
    revision,
    step_count,
    missing_steps,
    expected_steps,
    written_at
FROM workflow_receipts FINAL
WHERE NOT complete;
