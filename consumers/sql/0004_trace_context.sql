-- StepReceipt v3: the OpenTelemetry trace context of each attempt (empty when the worker does not
-- trace). Both are signed fields of the step (Avro order: after chio_signed, before key_id), so
-- they sit there in the row too; parts written before read them as empty strings.
ALTER TABLE step_receipts
    ADD COLUMN IF NOT EXISTS trace_id String CODEC(ZSTD(1)) AFTER chio_signed,
    ADD COLUMN IF NOT EXISTS span_id String CODEC(ZSTD(1)) AFTER trace_id;
