-- A claim of a batch whose holder's lease lapsed (the holder died or stalled) is a
-- takeover, counted here and no longer as an attempt: only failed attempts spend a batch's
-- failure budget. Takeovers have their own cap (`worker.max_takeovers`). `took_over` says
-- which kind the current lease's claim was, so a lease handed back undoes the right count.
ALTER TABLE batches ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN took_over INTEGER NOT NULL DEFAULT 0;
