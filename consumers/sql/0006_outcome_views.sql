-- Analytics over the outcome records (step_outcomes, 0005): how each tool's calls ended, how long
-- they ran, and denials next to failures. Plain views: step_outcomes is a ReplacingMergeTree
-- keyed by outcome_id, so every view reads it with FINAL (a replayed record counts once), and
-- step_receipts likewise. CREATE OR REPLACE: applying the file again redefines the views.

-- How the calls of each tool ended. `attempts` counts the outcome records whose body ran (every
-- status but GATE_FAILED: a gate failure never reached the tool, see tool_denials_vs_failures).
-- failure_rate = (failed + timed_out) / attempts; a cancellation is the workflow's doing, not
-- the tool's, and is counted apart.
CREATE OR REPLACE VIEW tool_failure_rate AS
SELECT
    tool_server,
    tool,
    count() AS attempts,
    countIf(status = 'COMPLETED') AS completed,
    countIf(status = 'FAILED') AS failed,
    countIf(status = 'CANCELLED') AS cancelled,
    countIf(status = 'TIMED_OUT') AS timed_out,
    round((failed + timed_out) / attempts, 4) AS failure_rate
FROM step_outcomes FINAL
WHERE status != 'GATE_FAILED'
GROUP BY tool_server, tool;

-- How long each tool's calls ran (duration_us: the activity body, not the policy decision),
-- over the calls that ran to an end of their own (COMPLETED or FAILED; cancellations and
-- timeouts end when someone else decides, gate failures never ran).
CREATE OR REPLACE VIEW tool_duration AS
WITH quantiles(0.5, 0.95)(duration_us) AS q
SELECT
    tool_server,
    tool,
    count() AS calls,
    countIf(status = 'COMPLETED') AS completed,
    countIf(status = 'FAILED') AS failed,
    q[1] AS p50_us,
    q[2] AS p95_us,
    max(duration_us) AS max_us
FROM step_outcomes FINAL
WHERE status IN ('COMPLETED', 'FAILED')
GROUP BY tool_server, tool;

-- Per tool: what the policy decided (step_receipts) next to what then went wrong
-- (step_outcomes): allowed and denied decisions, failed and timed-out calls, and attempts the
-- gate refused before any decision (sidecar unreachable, sink refused, worker lost).
CREATE OR REPLACE VIEW tool_denials_vs_failures AS
SELECT
    tool_server,
    tool,
    sum(d_allowed) AS allowed,
    sum(d_denied) AS denied,
    round(if(allowed + denied = 0, 0, denied / (allowed + denied)), 4) AS deny_rate,
    sum(o_failed) AS failed,
    sum(o_timed_out) AS timed_out,
    sum(o_gate_failed) AS gate_failed
FROM
(
    SELECT
        toString(tool_server) AS tool_server,
        toString(tool) AS tool,
        toUInt64(countIf(verdict = 'ALLOW')) AS d_allowed,
        toUInt64(countIf(verdict = 'DENY')) AS d_denied,
        toUInt64(0) AS o_failed,
        toUInt64(0) AS o_timed_out,
        toUInt64(0) AS o_gate_failed
    FROM step_receipts FINAL
    GROUP BY tool_server, tool
    UNION ALL
    SELECT
        toString(tool_server) AS tool_server,
        toString(tool) AS tool,
        toUInt64(0) AS d_allowed,
        toUInt64(0) AS d_denied,
        toUInt64(countIf(status = 'FAILED')) AS o_failed,
        toUInt64(countIf(status = 'TIMED_OUT')) AS o_timed_out,
        toUInt64(countIf(status = 'GATE_FAILED')) AS o_gate_failed
    FROM step_outcomes FINAL
    GROUP BY tool_server, tool
)
GROUP BY tool_server, tool;
