-- Named leases and the daily per-client summaries (sqlite). Keep in step with
-- migrations/postgres/0007_leases_summaries.sql.

-- One row per singleton duty: the outbox relay (with a broker) and the worker fleet's
-- leader (sweepers, the daily summaries). The holder renews its lease while it runs; when it
-- lapses (the holder died) another process takes over. Replaces 0004's outbox_relay.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT,
    expires_at BIGINT NOT NULL
);
INSERT INTO leases (name, owner, expires_at)
    SELECT 'outbox-relay', owner, expires_at FROM outbox_relay;
DROP TABLE outbox_relay;

-- A client's day in numbers, written once per UTC day by the leader's daily schedule.
CREATE TABLE daily_summaries (
    client_id  TEXT NOT NULL REFERENCES clients(id),
    day        TEXT NOT NULL,             -- YYYY-MM-DD (UTC)
    summary    TEXT NOT NULL,             -- contracts::http::DailySummary as JSON
    created_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, day)
);
