-- Unpublished outbox rows in a narrow table of their own (sqlite). Keep in step with
-- migrations/postgres/0008_outbox_pending.sql.

-- A row is pending while its id is in `outbox_pending`; publishing deletes that id and sets
-- `published_at`. (On PostgreSQL this keeps the mark from rewriting the whole row and its
-- indexes; SQLite shares the schema so the relay's SQL is the same on both.)
CREATE TABLE outbox_pending (
    id INTEGER PRIMARY KEY
);
INSERT INTO outbox_pending (id) SELECT id FROM outbox WHERE published_at IS NULL;
DROP INDEX outbox_unpublished;

-- Every outbox row starts pending, however it was written.
CREATE TRIGGER outbox_pending_add AFTER INSERT ON outbox
BEGIN
    INSERT INTO outbox_pending (id) VALUES (NEW.id);
END;
