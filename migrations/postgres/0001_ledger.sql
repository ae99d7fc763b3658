-- The DataFlow ledger (PostgreSQL). Times are milliseconds since the Unix epoch.
-- Keep this file in step with migrations/sqlite/0001_ledger.sql. Text columns use the "C"
-- collation: ids and keys compare bytewise (as in SQLite), which is also the fastest.

CREATE TABLE clients (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL,
    active      INTEGER NOT NULL DEFAULT 1, -- 0 or 1 (portable through sqlx Any)
    policy      TEXT COLLATE "C" NOT NULL,              -- contracts::Policy as JSON
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    key_id       TEXT COLLATE "C" PRIMARY KEY,
    client_id    TEXT COLLATE "C" NOT NULL REFERENCES clients(id),
    secret_hmac  BYTEA NOT NULL,             -- HMAC-SHA256(server secret, key secret)
    label        TEXT COLLATE "C",
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_keys_client ON api_keys(client_id);

CREATE TABLE batches (
    id                TEXT COLLATE "C" PRIMARY KEY,
    import_id         TEXT COLLATE "C" NOT NULL,
    client_id         TEXT COLLATE "C" NOT NULL REFERENCES clients(id),
    status            TEXT COLLATE "C" NOT NULL,
    format            TEXT COLLATE "C" NOT NULL,
    policy            TEXT COLLATE "C" NOT NULL,        -- the client's policy when the import was accepted
    records_total     BIGINT NOT NULL,
    checkpoint        BIGINT NOT NULL DEFAULT 0,  -- records handled by committed chunks
    records_written   BIGINT NOT NULL DEFAULT 0,
    records_unchanged BIGINT NOT NULL DEFAULT 0,
    records_failed    BIGINT NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT COLLATE "C",
    lease_owner       TEXT COLLATE "C",
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
    id              TEXT COLLATE "C" PRIMARY KEY,
    client_id       TEXT COLLATE "C" NOT NULL REFERENCES clients(id),
    batch_id        TEXT COLLATE "C" NOT NULL REFERENCES batches(id),
    checksum        TEXT COLLATE "C" NOT NULL,
    idempotency_key TEXT COLLATE "C",
    format          TEXT COLLATE "C" NOT NULL,
    bytes           BIGINT NOT NULL,
    records         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX imports_client ON imports(client_id, id);

CREATE TABLE payloads (
    batch_id TEXT COLLATE "C" PRIMARY KEY REFERENCES batches(id),
    body     BYTEA COMPRESSION lz4 NOT NULL
);

-- Checksum dedup: one live claim per (client, payload checksum) until it expires.
CREATE TABLE import_checksums (
    client_id  TEXT COLLATE "C" NOT NULL,
    checksum   TEXT COLLATE "C" NOT NULL,
    import_id  TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, checksum)
);

-- Idempotency-Key: the first request's fingerprint and, once done, its response.
CREATE TABLE idempotency_keys (
    client_id       TEXT COLLATE "C" NOT NULL,
    idem_key        TEXT COLLATE "C" NOT NULL,
    request_hash    TEXT COLLATE "C" NOT NULL,
    response_status INTEGER,                -- NULL while the first request is in progress
    response_body   TEXT COLLATE "C",
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (client_id, idem_key)
);

CREATE TABLE usage_daily (
    client_id TEXT COLLATE "C" NOT NULL,
    day       BIGINT NOT NULL,              -- days since the epoch, UTC
    records   BIGINT NOT NULL,
    PRIMARY KEY (client_id, day)
);

CREATE TABLE records (
    client_id  TEXT COLLATE "C" NOT NULL,
    record_key TEXT COLLATE "C" NOT NULL,
    data       TEXT COLLATE "C" NOT NULL,               -- the record as a JSON object
    checksum   TEXT COLLATE "C" NOT NULL,
    batch_id   TEXT COLLATE "C" NOT NULL,               -- the batch that last changed it
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, record_key)
);

CREATE TABLE record_errors (
    batch_id TEXT COLLATE "C" NOT NULL,
    line     BIGINT NOT NULL,
    field    TEXT COLLATE "C",
    code     TEXT COLLATE "C" NOT NULL,
    detail   TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (batch_id, line)
);

CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     TEXT COLLATE "C" NOT NULL UNIQUE,
    batch_id     TEXT COLLATE "C" NOT NULL,
    event_type   TEXT COLLATE "C" NOT NULL,
    routing_key  TEXT COLLATE "C" NOT NULL,
    body         TEXT COLLATE "C" NOT NULL,             -- contracts::events::Envelope as JSON
    created_at   BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox(id) WHERE published_at IS NULL;
CREATE INDEX outbox_batch ON outbox(batch_id, id);
