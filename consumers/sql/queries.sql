-- Example queries over the receipt tables. Each query starts with a "-- name:" line followed by
-- comment lines saying what it answers; queries end with ";". The test suite runs every one.
-- Run one with:  chio-receipts query "<the SQL>"

-- name: deny_rate_by_tool_last_day
-- Deny rate per tool server and tool, per hour, over the last 24 hours (materialized counters).
SELECT hour, tool_server, tool, total, denied, deny_rate
FROM deny_rate_hourly
WHERE hour >= now() - INTERVAL 1 DAY
ORDER BY hour DESC, deny_rate DESC
LIMIT 100;

-- name: policy_latency_p50_p95
-- Median and 95th percentile of the policy evaluation latency per activity type.
SELECT activity_type, evaluations, p50_us, p95_us
FROM policy_latency_by_activity_type
ORDER BY p95_us DESC;

-- name: runs_by_outcome_per_day
-- How runs closed, per day (current envelope revision of each run).
SELECT day, outcome, runs
FROM runs_by_outcome_daily
ORDER BY day DESC, runs DESC;

-- name: incomplete_envelopes
-- Runs whose envelope is still missing steps after the grace period.
SELECT namespace, workflow_id, run_id, revision, step_count, missing_steps
FROM incomplete_envelopes
ORDER BY written_at DESC
LIMIT 100;

-- name: denied_steps_recent
-- The latest denials with who, what and why.
SELECT evaluated_at, workflow_id, activity_type, tool_server, tool, subject, reason
FROM step_receipts
WHERE verdict = 'DENY'
ORDER BY evaluated_at DESC
LIMIT 50;

-- name: steps_of_a_run
-- Every step of one run in receipt-id order (replace the workflow id).
SELECT receipt_id, activity_id, attempt, activity_type, verdict, evaluated_at
FROM step_receipts
WHERE workflow_id = 'replace-me'
ORDER BY run_id, toString(receipt_id);

-- name: duplicate_check
-- Must be 0 with and without FINAL: exactly-once ingestion.
SELECT count() - uniqExact(receipt_id) AS duplicates
FROM step_receipts;

-- name: envelopes_with_revisions
-- Runs whose envelope was revised by late steps.
SELECT workflow_id, run_id, max(revision) AS revisions
FROM workflow_receipts
GROUP BY workflow_id, run_id
HAVING revisions > 1
ORDER BY revisions DESC
LIMIT 100;
