-- The operator dashboard (postgres; keep in step with migrations/sqlite/0006_ui.sql).

-- Dashboard sessions when Redis is not configured (with Redis they are keys with a TTL).
-- id is the SHA-256 of the cookie's token, never the token itself.
CREATE TABLE ui_sessions (
    id         TEXT PRIMARY KEY,
    operator   TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    ip         TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX ui_sessions_expiry ON ui_sessions(expires_at);

-- Who did what from the dashboard: logins, logouts and every action, with its outcome.
-- Kept in SQL whatever else is configured: it is an audit trail, not a cache.
CREATE TABLE ui_actions (
    id        BIGSERIAL PRIMARY KEY,
    at        BIGINT NOT NULL,
    operator  TEXT NOT NULL,
    session   TEXT NOT NULL,             -- the session's public label (start of its digest)
    action    TEXT NOT NULL,             -- login, logout, batch.retry, job.discard, ...
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,             -- ok, or why it was refused
    ip        TEXT NOT NULL
);

-- The overview's throughput and latency read the batches finished in a recent window.
CREATE INDEX batches_completed ON batches(completed_at) WHERE completed_at IS NOT NULL;
