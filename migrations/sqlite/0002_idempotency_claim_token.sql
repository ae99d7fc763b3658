-- Each claim of an Idempotency-Key gets a token; only the holder of the current token may
-- store the answer or release the key, so a request whose key was taken over (it ran past
-- the lock time) cannot write into its successor's claim.
ALTER TABLE idempotency_keys ADD COLUMN claim_token TEXT;
