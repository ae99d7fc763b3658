-- Follow-up jobs and stored batch reports (SQLite). Keep in step with
-- migrations/postgres/0003_jobs.sql.

-- One row per job intent, written in the transaction of the event that asks for it. Queues
-- (Redis) only carry copies; this row says whether the job is done.
CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,             -- email | report | webhook
    batch_id     TEXT NOT NULL,
    client_id    TEXT NOT NULL,
    spec         TEXT NOT NULL,             -- contracts::jobs::JobSpec as JSON
    status       TEXT NOT NULL,             -- pending | queued | running | done | dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    run_at       BIGINT NOT NULL,           -- the next attempt may start then
    lease_until  BIGINT,                    -- queued/running: checked for loss after this
    last_error   TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    done_at      BIGINT
);
-- Partial: a job leaves these indexes once it is done, so finished jobs cost the hot
-- statements nothing.
CREATE INDEX jobs_due ON jobs(kind, run_at) WHERE status = 'pending';
CREATE INDEX jobs_lease ON jobs(lease_until) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_batch ON jobs(batch_id);

-- The report job's result: served by GET /v1/batches/{id}/report once it exists.
CREATE TABLE reports (
    batch_id     TEXT PRIMARY KEY,
    summary      TEXT NOT NULL,             -- contracts::http::BatchReport as JSON
    rejected_csv BLOB,                      -- NULL when too large to keep; streamed instead
    created_at   BIGINT NOT NULL
);
