-- Records never go back in time (sqlite). Keep in step with
-- migrations/postgres/0010_records_order.sql.

-- The order in which imports were accepted: the submit that writes a batch takes the next
-- number, one more than the largest (writers take turns, so no two submits see the same
-- largest; the index makes it one lookup). Batches accepted before this migration are
-- numbered by creation.
ALTER TABLE batches ADD COLUMN accepted_seq BIGINT NOT NULL DEFAULT 0;
UPDATE batches SET accepted_seq = o.n
    FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM batches) AS o
    WHERE batches.id = o.id;
CREATE INDEX batches_accepted ON batches(accepted_seq);

-- Records a batch left alone because a newer import had written them already.
ALTER TABLE batches ADD COLUMN records_superseded BIGINT NOT NULL DEFAULT 0;

-- The newest import known to hold a record's values: a batch of an older import never
-- writes over it, whenever it runs. Existing records take their last writer's number.
ALTER TABLE records ADD COLUMN accepted_seq BIGINT NOT NULL DEFAULT 0;
UPDATE records SET accepted_seq = b.accepted_seq FROM batches b WHERE b.id = records.batch_id;
