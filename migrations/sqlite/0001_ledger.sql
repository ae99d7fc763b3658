-- The DataFlow ledger (SQLite). Times are milliseconds since the Unix epoch.
-- Keep this file in step with migrations/postgres/0001_ledger.sql.

CREATE TABLE clients (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    active      INTEGER NOT NULL DEFAULT 1, -- 0 or 1 (portable through sqlx Any)
    policy      TEXT NOT NULL,              -- contracts::Policy as JSON
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY,
    client_id    TEXT NOT NULL REFERENCES clients(id),
    secret_hmac  BLOB NOT NULL,             -- HMAC-SHA256(server secret, key secret)
    label        TEXT,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_keys_client ON api_keys(client_id);

CREATE TABLE batches (
    id                TEXT PRIMARY KEY,
    import_id         TEXT NOT NULL,
    client_id         TEXT NOT NULL REFERENCES clients(id),
    status            TEXT NOT NULL,
    format            TEXT NOT NULL,
    policy            TEXT NOT NULL,        -- the client's policy when the import was accepted
    records_total     BIGINT NOT NULL,
    checkpoint        BIGINT NOT NULL DEFAULT 0,  -- records handled by committed chunks
    records_written   BIGINT NOT NULL DEFAULT 0,
    records_unchanged BIGINT NOT NULL DEFAULT 0,
    records_failed    BIGINT NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT,
    lease_owner       TEXT,
    lease_epoch       BIGINT NOT NULL DEFAULT 0,  -- the fencing token
    lease_expires_at  BIGINT,
    available_at      BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    completed_at      BIGINT,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX batches_claim ON batches(status, available_at);
CREATE INDEX batches_lease ON batches(status, lease_expires_at);
CREATE INDEX batches_client ON batches(client_id, id);
CREATE INDEX batches_client_status ON batches(client_id, status, id);

CREATE TABLE imports (
    id              TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL REFERENCES clients(id),
    batch_id        TEXT NOT NULL REFERENCES batches(id),
    checksum        TEXT NOT NULL,
    idempotency_key TEXT,
    format          TEXT NOT NULL,
    bytes           BIGINT NOT NULL,
    records         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX imports_client ON imports(client_id, id);

CREATE TABLE payloads (
    batch_id TEXT PRIMARY KEY REFERENCES batches(id),
    body     BLOB NOT NULL
);

-- Checksum dedup: one live claim per (client, payload checksum) until it expires.
CREATE TABLE import_checksums (
    client_id  TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    import_id  TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, checksum)
);

-- Idempotency-Key: the first request's fingerprint and, once done, its response.
CREATE TABLE idempotency_keys (
    client_id       TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    response_status INTEGER,                -- NULL while the first request is in progress
    response_body   TEXT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (client_id, idem_key)
);

CREATE TABLE usage_daily (
    client_id TEXT NOT NULL,
    day       BIGINT NOT NULL,              -- days since the epoch, UTC
    records   BIGINT NOT NULL,
    PRIMARY KEY (client_id, day)
);

CREATE TABLE records (
    client_id  TEXT NOT NULL,
    record_key TEXT NOT NULL,
    data       TEXT NOT NULL,               -- the record as a JSON object
    checksum   TEXT NOT NULL,
    batch_id   TEXT NOT NULL,               -- the batch that last changed it
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, record_key)
);

CREATE TABLE record_errors (
    batch_id TEXT NOT NULL,
    line     BIGINT NOT NULL,
    field    TEXT,
    code     TEXT NOT NULL,
    detail   TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
);

CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    batch_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    body         TEXT NOT NULL,             -- contracts::events::Envelope as JSON
    created_at   BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox(id) WHERE published_at IS NULL;
CREATE INDEX outbox_batch ON outbox(batch_id, id);
