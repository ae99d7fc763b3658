-- Records never go back in time (postgres). Keep in step with
-- migrations/sqlite/0010_records_order.sql.

-- The order in which imports were accepted: the submit that writes a batch takes the next
-- number. A sequence hands numbers out in the order they are asked for, so an import
-- submitted after another was answered always comes later (two submits in flight at once
-- may come in either order, as either may be said to be first). Batches accepted before
-- this migration are numbered by creation.
CREATE SEQUENCE batches_accepted_seq;
ALTER TABLE batches ADD COLUMN accepted_seq BIGINT;
UPDATE batches SET accepted_seq = o.n
    FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM batches) AS o
    WHERE batches.id = o.id;
SELECT setval('batches_accepted_seq', COALESCE((SELECT MAX(accepted_seq) FROM batches), 0) + 1, false);
ALTER TABLE batches
    ALTER COLUMN accepted_seq SET DEFAULT nextval('batches_accepted_seq'),
    ALTER COLUMN accepted_seq SET NOT NULL;
ALTER SEQUENCE batches_accepted_seq OWNED BY batches.accepted_seq;

-- Records a batch left alone because a newer import had written them already.
ALTER TABLE batches ADD COLUMN records_superseded BIGINT NOT NULL DEFAULT 0;

-- The newest import known to hold a record's values: a batch of an older import never
-- writes over it, whenever it runs. Existing records take their last writer's number.
ALTER TABLE records ADD COLUMN accepted_seq BIGINT NOT NULL DEFAULT 0;
UPDATE records SET accepted_seq = b.accepted_seq FROM batches b WHERE b.id = records.batch_id;
