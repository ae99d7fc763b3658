-- The fair share between clients (SQLite). Keep in step with
-- migrations/postgres/0018_fair_share.sql.

-- A batch's place among its own client's batches: 1 high, 0 normal, -1 low. The claim
-- takes a client's greatest first.
ALTER TABLE batches ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;

-- The claim's view of each client's policy (kept in step with `policy` by every write of
-- it), and the client's place in the round: the claim serves the waiting client with the
-- smallest `claim_pass` and moves it on by 1,000,000 / `claim_weight` (stride scheduling).
ALTER TABLE clients ADD COLUMN claim_weight INTEGER NOT NULL DEFAULT 1;
ALTER TABLE clients ADD COLUMN max_concurrent_batches INTEGER; -- NULL: no cap
ALTER TABLE clients ADD COLUMN claim_pass BIGINT NOT NULL DEFAULT 0;
UPDATE clients SET
    claim_weight = COALESCE(json_extract(policy, '$.weight'), 1),
    max_concurrent_batches = json_extract(policy, '$.max_concurrent_batches');

-- The clients in the order the claim looks at them.
CREATE INDEX clients_claim_pass ON clients(claim_pass, id);
-- A client's ready batches in the order its claims take them.
CREATE INDEX batches_client_ready ON batches(client_id, priority DESC, available_at, id)
    WHERE status = 'ready';
-- A client's batches in flight, counted against its cap.
CREATE INDEX batches_client_leases ON batches(client_id, lease_expires_at)
    WHERE status = 'processing';
