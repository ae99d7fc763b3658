-- The delivery epoch of each job (sqlite). Keep in step with
-- migrations/postgres/0009_job_delivery_epoch.sql.

-- Moved on every take from the ledger and every hand-back to it; a queue message carries the
-- epoch it was taken at, and a settle (done, failed) applies only while it is still the
-- job's: a superseded delivery that answers late changes nothing.
ALTER TABLE jobs ADD COLUMN delivery_epoch INTEGER NOT NULL DEFAULT 0;
