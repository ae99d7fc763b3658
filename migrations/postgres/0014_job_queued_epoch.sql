-- The delivery a queue message is: set when the relay hands a job to Redis, to the epoch
-- the message carries. A queue that may run one message more than once (apalis-redis's
-- orphan recovery) takes the delivery in the ledger as each run starts, which moves
-- `delivery_epoch` on; the message, and the sweeper that looks for it in Redis, keep
-- naming this one. An older message of the same job (handed over again since) no longer
-- matches it and cannot start.
ALTER TABLE jobs ADD COLUMN queued_epoch BIGINT;
