-- The worker fleet registry without Redis (sqlite; keep in step with
-- migrations/postgres/0005_fleet.sql). A row per live worker process, renewed by its
-- heartbeat; a row past expires_at is a worker that died and is ignored, then pruned.
CREATE TABLE fleet_workers (
    id              TEXT PRIMARY KEY,
    info            TEXT NOT NULL,             -- contracts::http::WorkerInfo as JSON
    expires_at      BIGINT NOT NULL,
    drain_requested INTEGER NOT NULL DEFAULT 0
);
