-- An inserting statement adds its outbox rows to `outbox_pending` at once (postgres). Keep
-- in step with migrations/sqlite/0022_outbox_pending_per_statement.sql.

-- The trigger of 0008 ran its PL/pgSQL function once per outbox row, each time inserting
-- one id: a bundle's completion writes an event per batch in one statement, and a group of
-- submits two per import, so the function ran dozens of times per statement, a few
-- percent of PostgreSQL's CPU under a load of small imports. A statement-level trigger
-- reads the statement's new rows from its transition table and inserts them in one go.
-- It stays a trigger, so every outbox row still starts pending, however it was written.
DROP TRIGGER outbox_pending_add ON outbox;
DROP FUNCTION outbox_pending_add();

CREATE FUNCTION outbox_pending_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_pending (id) SELECT id FROM added;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_pending_add AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_pending_add();
