-- Who holds a job claimed from SQL (embedded mode, no Redis queue): the fleet leader hands
-- back the claims of a worker the registry says is gone as soon as it knows, instead of
-- waiting out the claim's lease (twice the job timeout). NULL for deliveries through Redis,
-- which the queue's own reaper recovers.
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
