-- StepReceipt v4: the verdict PENDING_APPROVAL (a guard asked for a person's approval; the
-- attempt did not run and the run waits for the decision). Appending a value to an Enum8 is a
-- metadata-only change: stored parts keep their values.
ALTER TABLE step_receipts
    MODIFY COLUMN verdict Enum8('UNKNOWN' = 0, 'ALLOW' = 1, 'DENY' = 2, 'PENDING_APPROVAL' = 3);
