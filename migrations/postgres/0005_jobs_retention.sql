-- Finished jobs are pruned after jobs.retention_secs (postgres; keep in step with
-- migrations/sqlite/0005_jobs_retention.sql). Partial, like the other job indexes: only
-- finished (done or discarded) rows are in it, oldest first.
CREATE INDEX jobs_done ON jobs(done_at) WHERE status IN ('done', 'discarded');
