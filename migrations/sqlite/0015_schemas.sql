-- Client schemas, typed records and row errors by cell (SQLite). Keep in step with
-- migrations/postgres/0015_schemas.sql.

-- Every version of every client's schema (a Frictionless Table Schema as compact JSON
-- text). Versions are never changed or removed: a batch names the one it was checked
-- with, through every retry.
CREATE TABLE client_schemas (
    client_id  TEXT NOT NULL REFERENCES clients(id),
    version    BIGINT NOT NULL,
    document   TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, version)
);
-- The version new imports are checked with; NULL: none (records as they come).
ALTER TABLE clients ADD COLUMN schema_version BIGINT;
ALTER TABLE batches ADD COLUMN schema_version BIGINT;

-- Records stay JSON text on SQLite (its JSON functions read text).

-- A record can fail on several cells: one row per refused cell, `position` its order in
-- the record's errors, `value` the offending value (truncated). SQLite cannot change a
-- primary key in place, so the table is rebuilt.
CREATE TABLE record_errors_by_cell (
    batch_id TEXT NOT NULL,
    line     BIGINT NOT NULL,
    position BIGINT NOT NULL DEFAULT 0,
    field    TEXT,
    code     TEXT NOT NULL,
    detail   TEXT NOT NULL,
    value    TEXT,
    PRIMARY KEY (batch_id, line, position)
);
INSERT INTO record_errors_by_cell (batch_id, line, field, code, detail)
    SELECT batch_id, line, field, code, detail FROM record_errors;
DROP TABLE record_errors;
ALTER TABLE record_errors_by_cell RENAME TO record_errors;
