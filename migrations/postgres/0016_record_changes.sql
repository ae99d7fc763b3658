-- The changes feed (postgres). Keep in step with migrations/sqlite/0016_record_changes.sql.

-- Every change to a client's records, in the order they committed: `seq` counts per client
-- and is taken from `change_counters` inside the writing transaction, whose row lock makes
-- a client's writers commit in the order of their numbers, so a reader that has seen
-- number n has seen every number below it.
CREATE TABLE record_changes (
    client_id  TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    record_key TEXT COLLATE "C" NOT NULL,
    kind       TEXT COLLATE "C" NOT NULL,    -- inserted, updated or deleted
    batch_id   TEXT COLLATE "C",             -- NULL for a deletion through the API
    data       jsonb,                       -- the record after the change; NULL if deleted
    changed_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE TABLE change_counters (
    client_id TEXT COLLATE "C" PRIMARY KEY,
    last      BIGINT NOT NULL
);

-- Changes of a record's values so far: 1 when it was inserted.
ALTER TABLE records ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- The change numbers a batch produced, first and last (other batches' may fall between).
ALTER TABLE batches ADD COLUMN changes_first BIGINT;
ALTER TABLE batches ADD COLUMN changes_last BIGINT;
