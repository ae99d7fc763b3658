-- Client schemas, typed records and row errors by cell (postgres). Keep in step with
-- migrations/sqlite/0015_schemas.sql.

-- Every version of every client's schema (a Frictionless Table Schema as compact JSON
-- text). Versions are never changed or removed: a batch names the one it was checked
-- with, through every retry.
CREATE TABLE client_schemas (
    client_id  TEXT COLLATE "C" NOT NULL REFERENCES clients(id),
    version    BIGINT NOT NULL,
    document   TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, version)
);
-- The version new imports are checked with; NULL: none (records as they come).
ALTER TABLE clients ADD COLUMN schema_version BIGINT;
ALTER TABLE batches ADD COLUMN schema_version BIGINT;

-- Records are typed JSON: jsonb, so that they can be queried and exported as JSON.
ALTER TABLE records ALTER COLUMN data TYPE jsonb USING data::jsonb;

-- A record can fail on several cells: one row per refused cell, `position` its order in
-- the record's errors, `value` the offending value (truncated).
ALTER TABLE record_errors ADD COLUMN position BIGINT NOT NULL DEFAULT 0;
ALTER TABLE record_errors ADD COLUMN value TEXT COLLATE "C";
ALTER TABLE record_errors DROP CONSTRAINT record_errors_pkey;
ALTER TABLE record_errors ADD PRIMARY KEY (batch_id, line, position);
