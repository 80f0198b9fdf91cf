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

-- name: tool_failure_rates
-- How each tool's calls ended (outcome records): completed, failed, cancelled, timed out, and the
-- failure rate (failed + timed out over the calls that ran), worst first.
SELECT failure_rate, tool_server, tool, attempts, completed, failed, cancelled, timed_out
FROM tool_failure_rate
ORDER BY failure_rate DESC, attempts DESC
LIMIT 100;

-- name: tool_duration_p50_p95
-- Median and 95th percentile of each tool's run time (the activity body, COMPLETED and FAILED
-- calls), slowest first.
SELECT p95_us, p50_us, tool_server, tool, calls, completed, failed, max_us
FROM tool_duration
ORDER BY p95_us DESC
LIMIT 100;

-- name: tool_denials_vs_failures
-- Per tool: what the policy denied next to what failed after an allow, and the attempts the gate
-- refused before any decision.
SELECT tool_server, tool, allowed, denied, deny_rate, failed, timed_out, gate_failed
FROM tool_denials_vs_failures
ORDER BY denied + failed + timed_out + gate_failed DESC
LIMIT 100;

-- name: failed_calls_recent
-- The latest calls that failed or timed out after an allow: which run, which tool, the error type
-- (never the message) and the decision they followed.
SELECT ended_at, workflow_id, run_id, activity_type, tool_server, tool, attempt, status,
       error_type, duration_us, decision_receipt_id
FROM step_outcomes FINAL
WHERE status IN ('FAILED', 'TIMED_OUT')
ORDER BY ended_at DESC
LIMIT 50;
