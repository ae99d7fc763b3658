-- Payloads in parts, and resumable uploads (SQLite). Keep in step with
-- migrations/postgres/0017_payload_parts.sql.

-- Every stored file, a part at a time, so that no process ever holds a whole one: an
-- import's parts are keyed by its batch's `payload_id`, an unfinished upload's by its id.
CREATE TABLE payload_parts (
    payload_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    body       BLOB NOT NULL,
    PRIMARY KEY (payload_id, seq)
);

ALTER TABLE batches ADD COLUMN payload_id TEXT;
ALTER TABLE batches ADD COLUMN payload_bytes BIGINT NOT NULL DEFAULT 0;
-- When retention deleted the payload (the batch, its counts and errors stay).
ALTER TABLE batches ADD COLUMN payload_expired_at BIGINT;

INSERT INTO payload_parts (payload_id, seq, body) SELECT batch_id, 0, body FROM payloads;
UPDATE batches SET payload_id = id,
                   payload_bytes = COALESCE((SELECT length(body) FROM payloads WHERE batch_id = batches.id), 0);
DROP TABLE payloads;

-- Ended batches by age, for retention.
CREATE INDEX batches_payload_retention ON batches(updated_at)
    WHERE payload_expired_at IS NULL AND status IN ('completed', 'rejected', 'dead');

-- Files on their way in: a tus upload, or a request body larger than one part while it is
-- read and checked. `received` moves with each committed part, together with the running
-- SHA-256 (`digest`), so that any API
-- process can take the next part. Once the file became an import, `import_id` names it and
-- the parts belong to its batch.
CREATE TABLE uploads (
    id              TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL REFERENCES clients(id),
    kind            TEXT NOT NULL,   -- tus, or body (a request being read)
    length          BIGINT NOT NULL,
    received        BIGINT NOT NULL DEFAULT 0,
    parts           INTEGER NOT NULL DEFAULT 0,
    format          TEXT NOT NULL,
    metadata        TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    digest          BLOB NOT NULL,
    import_id       TEXT,
    outcome         TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL
);
CREATE UNIQUE INDEX uploads_idempotency ON uploads(client_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX uploads_expiry ON uploads(expires_at);
CREATE INDEX uploads_client ON uploads(client_id);
