-- Reads that stay as fast when the ledger has grown (postgres). Keep in step with
-- migrations/sqlite/0019_growth.sql.

-- A client's stored records, kept beside its feed counter: every insert and deletion of a
-- record is a change, numbered under that row's lock, so the count moves in the same
-- statement. Counting the records read a client's whole key index each time the
-- dashboard's clients page or `dataflow status` showed what it holds.
ALTER TABLE change_counters ADD COLUMN records BIGINT NOT NULL DEFAULT 0;
INSERT INTO change_counters (client_id, last, records)
    SELECT client_id, 0, COUNT(*) FROM records GROUP BY client_id
    ON CONFLICT (client_id) DO UPDATE SET records = excluded.records;

-- The stored files a client still holds, by age: the payload retention walks one client's
-- from its oldest (it walked every client's for each client), and the storage a client
-- holds is summed from the index alone.
DROP INDEX batches_payload_retention;
CREATE INDEX batches_kept_payloads ON batches(client_id, updated_at, payload_bytes)
    WHERE payload_expired_at IS NULL;

-- Dead jobs, which stay until an operator acts: the queue depths every `/metrics` scrape
-- reads, and the dashboard's dead letters, find them without reading every job.
CREATE INDEX jobs_dead ON jobs(id) WHERE status = 'dead';
