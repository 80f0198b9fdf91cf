-- Roles for a ClickHouse server deployment. Applied by the consumer only for server DSNs
-- (http/https): the embedded chDB engine has no access control, so this file is skipped there.
-- {db} is replaced by the database name.

-- Can only insert into the receipt tables (any ingester that must not read back).
CREATE ROLE IF NOT EXISTS chio_writer;
GRANT INSERT ON {db}.step_receipts TO chio_writer;
GRANT INSERT ON {db}.workflow_receipts TO chio_writer;
GRANT INSERT ON {db}.step_outcomes TO chio_writer;

-- The receipt builder: inserts, plus the reads it needs to rebuild runs after a restart.
CREATE ROLE IF NOT EXISTS chio_builder;
GRANT chio_writer TO chio_builder;
GRANT SELECT ON {db}.step_receipts TO chio_builder;
GRANT SELECT ON {db}.workflow_receipts TO chio_builder;
GRANT SELECT ON {db}.step_outcomes TO chio_builder;
GRANT SELECT ON {db}.schema_migrations TO chio_builder;

-- Read-only analyst: every table and view of the database, nothing else.
CREATE ROLE IF NOT EXISTS chio_analyst;
GRANT SELECT ON {db}.* TO chio_analyst;
