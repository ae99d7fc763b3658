-- An unfinished request holds its Idempotency-Key until its own deadline (when the server
-- gives up on it), not for a fixed lock period: a request that died releases the key once
-- it could no longer be running. Rows from before keep the old fixed lock of 120 s.
ALTER TABLE idempotency_keys ADD COLUMN locked_until BIGINT NOT NULL DEFAULT 0;
UPDATE idempotency_keys SET locked_until = created_at + 120000 WHERE response_status IS NULL;
