-- The dashboard's charts (postgres). Keep in step with migrations/sqlite/0021_charts.sql.

-- One row per minute for the whole fleet (client_id '') and one for each client that had
-- batches completed in that minute or waiting, running or dead at its end, written by the
-- fleet's leader once the minute is over and deleted a little over a day later. Queue
-- depth over time cannot be read back from the batches afterwards, so it is sampled; the
-- minute's throughput and latency are kept beside it, so a chart reads a day of rows
-- instead of a day of batches.
CREATE TABLE chart_samples (
    client_id         TEXT COLLATE "C" NOT NULL,
    minute            BIGINT NOT NULL,  -- the minute's start, ms since the epoch
    batches           BIGINT NOT NULL,  -- batches completed in the minute
    records           BIGINT NOT NULL,  -- their records
    latency_p50       BIGINT,           -- accepted -> completed, ms; NULL without completions
    latency_p95       BIGINT,
    latency_p99       BIGINT,
    awaiting_approval BIGINT NOT NULL,  -- batches in each state when the minute was sampled
    ready             BIGINT NOT NULL,
    processing        BIGINT NOT NULL,
    dead              BIGINT NOT NULL,
    PRIMARY KEY (client_id, minute)
);
-- The prune of rows past their day.
CREATE INDEX chart_samples_minute ON chart_samples(minute);
