-- The outbox relay lease (sqlite). Keep in step with migrations/postgres/0004_outbox_relay.sql.

-- With a broker, one relay publishes at a time, so events of one batch leave in the order
-- they committed even when every process runs a relay. The holder renews the lease while
-- it runs; when it lapses (the holder died) another process's relay takes over.
CREATE TABLE outbox_relay (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    owner      TEXT,
    expires_at BIGINT NOT NULL
);
INSERT INTO outbox_relay (id, owner, expires_at) VALUES (1, NULL, 0);
