-- Unpublished outbox rows in a narrow table of their own (postgres). Keep in step with
-- migrations/sqlite/0008_outbox_pending.sql.

-- The relay found unpublished rows through a partial index on `published_at IS NULL`, so
-- marking a row published moved it out of that index: an update that could never be HOT,
-- writing a new version of the whole row and an entry in each of the table's indexes (about
-- 800 bytes of WAL per event). Now a row is pending while its id is in `outbox_pending`;
-- publishing deletes that id and sets `published_at`, which no index covers, so the update
-- is HOT when the page has room: half of each page is left free for it.
CREATE TABLE outbox_pending (
    id BIGINT PRIMARY KEY
);
INSERT INTO outbox_pending (id) SELECT id FROM outbox WHERE published_at IS NULL;
DROP INDEX outbox_unpublished;
ALTER TABLE outbox SET (fillfactor = 50);

-- Every outbox row starts pending, however it was written.
CREATE FUNCTION outbox_pending_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_pending (id) VALUES (NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_pending_add AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_pending_add();
