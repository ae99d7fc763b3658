-- The W3C trace context (`traceparent`) of what wrote a row, so the work it starts elsewhere
-- joins the same trace (sqlite). Keep in step with migrations/postgres/0020_trace_context.sql.
-- NULL when tracing is off, or for rows written before this migration: nothing to follow.

-- The submit's context: whoever claims the batch (a delivery or SQL polling) continues it.
ALTER TABLE batches ADD COLUMN traceparent TEXT;
-- The context of the transaction that wrote the event: the relay's publish continues it and
-- carries it on to the message's headers.
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
-- The completion's context: the job's run continues it (and a webhook carries it on).
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
