-- StepReceipt v2: the Chio kernel receipt of each step. Applied in place to existing tables
-- (ADD COLUMN only changes metadata: parts written before keep their data and read the new
-- columns as empty strings), so a database of v1 rows keeps working and stays verifiable.

-- chio_receipt: the receipt JSON exactly as the sidecar or kernel signed it (it carries the call
-- parameters unless the sidecar redacted them). chio_signed: the exact signed bytes,
-- JCS({"body", "id"}), kept as a binary String like prev_hash and signature, so verify needs
-- no canonicalization. Both are signed fields of the step (Avro order: after prev_hash).
-- Then the receipt's analytics columns (schemas.chio_step_fields), after the Kafka position.
ALTER TABLE step_receipts
    ADD COLUMN IF NOT EXISTS chio_receipt String CODEC(ZSTD(3)) AFTER prev_hash,
    ADD COLUMN IF NOT EXISTS chio_signed String CODEC(ZSTD(3)) AFTER chio_receipt,
    ADD COLUMN IF NOT EXISTS chio_receipt_id String CODEC(NONE) AFTER kafka_offset,
    ADD COLUMN IF NOT EXISTS receipt_kind LowCardinality(String) AFTER chio_receipt_id,
    ADD COLUMN IF NOT EXISTS boundary_class LowCardinality(String) AFTER receipt_kind,
    ADD COLUMN IF NOT EXISTS trust_level LowCardinality(String) AFTER boundary_class,
    ADD COLUMN IF NOT EXISTS tool_origin LowCardinality(String) AFTER trust_level,
    ADD COLUMN IF NOT EXISTS redaction_mode LowCardinality(String) AFTER tool_origin,
    ADD COLUMN IF NOT EXISTS policy_hash LowCardinality(String) AFTER redaction_mode,
    ADD COLUMN IF NOT EXISTS content_hash String CODEC(ZSTD(1)) AFTER policy_hash,
    ADD COLUMN IF NOT EXISTS kernel_key LowCardinality(String) AFTER content_hash,
    ADD COLUMN IF NOT EXISTS decision LowCardinality(String) AFTER kernel_key,
    ADD COLUMN IF NOT EXISTS guard LowCardinality(String) AFTER decision,
    ADD COLUMN IF NOT EXISTS parameter_hash String CODEC(ZSTD(1)) AFTER guard;
