-- Nothing changes here (sqlite). Keep in step with
-- migrations/postgres/0022_outbox_pending_per_statement.sql.

-- PostgreSQL's outbox trigger now runs once per statement instead of once per row. SQLite
-- has row-level triggers only, and compiles a trigger's body into the inserting statement
-- itself, so 0008's trigger already costs no call of its own per row.
SELECT 1;
