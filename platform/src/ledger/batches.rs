//! Batches: the claim, the fenced lease, chunk commits with checkpoints, completion, retry
//! and dead-lettering, operator transitions, and the tenant-scoped views.
//!
//! The fence: a claim increments `lease_epoch`; every later write by the holder says
//! `WHERE lease_epoch = :mine AND status = 'processing'`. If another worker took the batch
//! over, the epoch moved on, zero rows match, and the whole transaction rolls back.

use dataflow_contracts::events::{
    BatchCompleted, BatchDead, BatchFailed, BatchReady, BatchRejected, ChangeRange, Envelope, Event,
};
use dataflow_contracts::http::{BatchPage, BatchView, RecordErrorPage, RecordErrorView};
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{
    BatchId, BatchStatus, ClientId, ImportFormat, ImportId, Policy, Priority,
};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::clients::{StoredSchema, parse_id, parse_policy};
use super::filters::{Bind, Conditions};
use super::payloads::stored_payload;
use super::{Db, Dialect, Field, Outgoing, Tx, count, json_list, split_page};
use crate::domain::prepare::{Chunk, RowError};
use crate::{Error, Result, traces};

/// A batch a claim may take: ready and due, or held under a lease that expired.
macro_rules! claimable {
    () => {
        "((status = 'ready' AND available_at <= {now}) \
          OR (status = 'processing' AND lease_expires_at < {now}))"
    };
}

/// The client `$client` (a column or a parameter) may have one more batch in flight: it
/// has no cap, or fewer batches under an unexpired lease than its cap. Judged with the
/// statement's snapshot: only a claim holding the client's row ([`pick_client!`]) can
/// trust it to stay true until it commits.
macro_rules! under_cap {
    ($client:literal) => {
        concat!(
            "((SELECT max_concurrent_batches FROM clients cap WHERE cap.id = ",
            $client,
            ") IS NULL OR (SELECT COUNT(*) FROM batches held WHERE held.client_id = ",
            $client,
            " AND held.status = 'processing' AND held.lease_expires_at >= {now}) \
              < (SELECT max_concurrent_batches FROM clients cap WHERE cap.id = ",
            $client,
            "))"
        )
    };
}

/// The fair share's turn: takes the client that `$which` selects, holds its row until the
/// transaction ends (so claims for one client are made one at a time, and its cap holds
/// however many workers claim at once), and moves it on in the round by its stride,
/// 1,000,000 / weight. Clients that wait together stay within one stride of each other,
/// the largest being weight 1's; a client that had nothing waiting while others were
/// served would lag by as much as they went on, so it is moved up to one such stride
/// behind the other waiting clients first: a burst after a quiet spell gets it its next
/// turn, not every turn until it caught up. Returns its id.
macro_rules! pick_client {
    ($which:expr) => {
        concat!(
            "UPDATE clients SET claim_pass = 1000000 / claim_weight + \
                 CASE WHEN claim_pass >= COALESCE(( \
                     SELECT MIN(o.claim_pass) FROM clients o WHERE o.id <> clients.id \
                       AND EXISTS (SELECT 1 FROM batches w \
                                   WHERE w.client_id = o.id AND w.status = 'ready')) - 1000000, 0) \
                 THEN claim_pass ELSE ( \
                     SELECT MIN(o.claim_pass) FROM clients o WHERE o.id <> clients.id \
                       AND EXISTS (SELECT 1 FROM batches w \
                                   WHERE w.client_id = o.id AND w.status = 'ready')) - 1000000 END \
             WHERE id = (",
            $which,
            ") RETURNING id"
        )
    };
}

/// `$client` has no batch in progress under a live lease ([`Claimable::IdleClients`]).
macro_rules! idle {
    ($client:literal) => {
        concat!(
            " AND NOT EXISTS (SELECT 1 FROM batches held WHERE held.client_id = ",
            $client,
            " AND held.status = 'processing' AND held.lease_expires_at >= {now})"
        )
    };
}

/// The next client in the fair share: among those with a batch a claim may take and room
/// under their cap (and that pass `$only`: empty, or [`idle`]), the one with the smallest
/// place in the round. Each test is a scalar subquery on purpose: the clients are read in
/// the order of their place and the first that passes ends the search, where a join would
/// gather every claimable batch first.
macro_rules! fair_next_client {
    ($lock:literal, $only:expr) => {
        concat!(
            "SELECT c.id FROM clients c WHERE COALESCE(",
            first_ready!("c.id"),
            ", ",
            first_lapsed!("c.id"),
            ") IS NOT NULL AND ",
            under_cap!("c.id"),
            $only,
            " ORDER BY c.claim_pass, c.id LIMIT 1 ",
            $lock
        )
    };
}

/// Whose batches a claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimable {
    /// Any client's, in the fair share.
    AnyClient,
    /// Only those of clients with no batch in progress: the claim of a worker's reserved
    /// slot (`worker.reserved_slots`), which a client already being served cannot fill.
    IdleClients,
}

/// A client's own order: its highest priority first, then the oldest.
macro_rules! client_order {
    () => {
        " ORDER BY priority DESC, available_at, id"
    };
}

/// The first of `$client`'s batches that are ready and due, in its own order (read from
/// the index `batches_client_ready` in that order).
macro_rules! first_ready {
    ($client:literal) => {
        concat!(
            "(SELECT id FROM batches WHERE client_id = ",
            $client,
            " AND status = 'ready' AND available_at <= {now}",
            client_order!(),
            " LIMIT 1)"
        )
    };
}

/// The first of `$client`'s batches under a lapsed lease, in its own order.
macro_rules! first_lapsed {
    ($client:literal) => {
        concat!(
            "(SELECT id FROM batches WHERE client_id = ",
            $client,
            " AND status = 'processing' AND lease_expires_at < {now}",
            client_order!(),
            " LIMIT 1)"
        )
    };
}

/// The client's current policy, for the follow-up jobs of the event that an ending
/// attempt's `UPDATE batches … RETURNING` announces: read by that statement, which saves
/// the transaction one of its own.
macro_rules! client_policy {
    () => {
        "(SELECT policy FROM clients WHERE clients.id = batches.client_id) AS client_policy"
    };
}

/// The claim itself for the batch `$where` selects: a new lease epoch (the fencing token),
/// and one more attempt, or, for a batch still `processing` under a lapsed lease, one more
/// takeover (its holder died or stalled: that spends no attempt). Binds `$1` owner and `$2`
/// lease length. (`status` on the right of `SET` is the row's value before the update.)
macro_rules! take_lease {
    ($where:expr) => {
        concat!(
            "UPDATE batches SET status = 'processing', lease_owner = $1, \
                 lease_epoch = lease_epoch + 1, lease_expires_at = {now} + $2, \
                 attempts = attempts + CASE WHEN status = 'processing' THEN 0 ELSE 1 END, \
                 takeovers = takeovers + CASE WHEN status = 'processing' THEN 1 ELSE 0 END, \
                 took_over = CASE WHEN status = 'processing' THEN 1 ELSE 0 END, \
                 started_at = COALESCE(started_at, {now}), updated_at = {now} WHERE ",
            $where,
            " RETURNING id, client_id, import_id, accepted_seq, lease_epoch, attempts, takeovers, \
              took_over, checkpoint, records_total, format, policy, {now} - created_at AS waited_ms, \
              schema_version, (SELECT document FROM client_schemas s \
                WHERE s.client_id = batches.client_id AND s.version = batches.schema_version) \
                AS schema_document, traceparent, payload_id, payload_bytes, payload_expired_at"
        )
    };
}

/// The batches of client `$3` that a claim takes after its first ([`Bundle`]): those a
/// claim may take, in the client's own order, while their records add up to at most `$4`,
/// at most `$5` of them, and no more than its room under its `max_concurrent_batches` (read
/// after the first was taken, in the same transaction). Each arm reads at most `$5` rows
/// from the index, in order, before the running sum is taken.
macro_rules! take_followers {
    () => {
        take_lease!(concat!(
            "id IN (SELECT id FROM ( \
                 SELECT id, ROW_NUMBER() OVER w AS n, SUM(records_total) OVER w AS upto FROM ( \
                     SELECT id, priority, available_at, records_total FROM ( \
                         SELECT id, priority, available_at, records_total FROM batches \
                         WHERE client_id = $3 AND status = 'ready' AND available_at <= {now}",
            client_order!(),
            " LIMIT $5 {skip_locked}) AS due \
                     UNION ALL \
                     SELECT id, priority, available_at, records_total FROM ( \
                         SELECT id, priority, available_at, records_total FROM batches \
                         WHERE client_id = $3 AND status = 'processing' AND lease_expires_at < {now}",
            client_order!(),
            " LIMIT $5 {skip_locked}) AS lapsed) AS next \
                 WINDOW w AS (ORDER BY priority DESC, available_at, id)) AS bundle \
             WHERE upto <= $4 AND n <= $5 AND n <= COALESCE( \
                 (SELECT max_concurrent_batches FROM clients cap WHERE cap.id = $3) \
                 - (SELECT COUNT(*) FROM batches held WHERE held.client_id = $3 \
                      AND held.status = 'processing' AND held.lease_expires_at >= {now}), $5)) \
             AND ",
            claimable!()
        ))
    };
}

/// How much one claim may take: its first batch, whatever its size, and after it, when
/// that one is small, more of the same client's batches (its followers) while all of them
/// together hold at most `records` records and number at most `batches`. Small batches
/// then cost a worker one claim and one commit between them, not one each: a bundle is
/// processed as one chunk ([`Db::complete_bundle`]), so `records` is the worker's chunk
/// size and its memory stays what one chunk takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bundle {
    pub records: u64,
    pub batches: u32,
}

impl Bundle {
    /// The first batch alone.
    pub const ONE: Bundle = Bundle {
        records: 0,
        batches: 1,
    };
}

pub(super) const BATCH_COLUMNS: &str = "id, import_id, status, records_total, checkpoint, records_written, \
     records_unchanged, records_superseded, records_failed, attempts, takeovers, last_error, \
     created_at, started_at, completed_at, schema_version, priority";

/// One batch of a commit that completes it ([`Db::complete_bundle`]).
pub struct Completing<'a> {
    pub lease: &'a Lease,
    /// Its last chunk, when it has one left.
    pub chunk: Option<&'a Chunk>,
    /// The trace its event and jobs continue: its completion span's (each batch of a
    /// bundle has its own, in its own import's trace).
    pub traceparent: Option<String>,
}

impl<'a> Completing<'a> {
    /// A batch completed alone, inside its completion span.
    pub fn in_current_span(lease: &'a Lease, chunk: Option<&'a Chunk>) -> Self {
        Completing {
            lease,
            chunk,
            traceparent: traces::current(),
        }
    }
}

/// A held lease: the right to write to one batch while `epoch` is current.
#[derive(Debug, Clone)]
pub struct Lease {
    pub batch_id: BatchId,
    pub client_id: ClientId,
    pub import_id: ImportId,
    /// The import's place in the order of acceptance: the batch never writes over a
    /// record that a later accepted import wrote.
    pub accepted_seq: i64,
    pub owner: String,
    pub epoch: i64,
    /// Including this one, unless this claim is a takeover.
    pub attempts: u32,
    /// Claims of the batch from a holder whose lease lapsed, including this one if it is.
    pub takeovers: u32,
    /// This claim took the batch from a holder whose lease lapsed.
    pub took_over: bool,
    /// Records already handled by earlier holders.
    pub checkpoint: u64,
    pub records_total: u64,
    pub format: ImportFormat,
    /// The policy in force when the import was accepted.
    pub policy: Policy,
    /// The client's schema when the import was accepted, if it had one.
    pub schema: Option<StoredSchema>,
    /// From the batch's creation to this claim, by the ledger's clock.
    pub waited_ms: u64,
    /// The trace context of the submit: processing the batch continues its trace.
    pub traceparent: Option<String>,
    /// The stored file, read by the claim itself: its payload id and size in bytes; `None`
    /// once its retention ended and it was deleted.
    pub payload: Option<(String, u64)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkResult {
    pub written: u64,
    pub unchanged: u64,
    /// Records left alone because an import accepted after this one holds them.
    pub superseded: u64,
    /// The numbers its changes took in the client's feed, first and last.
    pub changes: Option<(i64, i64)>,
}

/// The outcome of a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailOutcome {
    Retry { at_ms: i64 },
    Dead,
}

impl Db {
    /// Claims the next batch in the fair share: the client whose turn it is among those
    /// with a batch to take and room under their `max_concurrent_batches` (round robin,
    /// weighted by `weight`; only clients with nothing in progress when `claimable` says
    /// so), then that client's batch of highest priority, oldest first (a batch whose
    /// lease expired counts as ready since it was created).
    pub async fn claim_next(
        &self,
        owner: &str,
        lease_ms: i64,
        claimable: Claimable,
        bundle: Bundle,
    ) -> Result<Vec<Lease>> {
        // On PostgreSQL a claim first skips the clients that other claims hold; when that
        // finds none it waits for one instead, or a single busy client would serve one
        // claim at a time and turn the others away empty-handed. A turn can come to
        // nothing (the client's last batch or its last free place was taken meanwhile):
        // then the next client is tried.
        let mut wait = false;
        for _ in 0..3 {
            let pick = match (wait, claimable) {
                (true, Claimable::AnyClient) => pick_client!(fair_next_client!("{for_update}", "")),
                (false, Claimable::AnyClient) => {
                    pick_client!(fair_next_client!("{skip_locked}", ""))
                }
                (true, Claimable::IdleClients) => {
                    pick_client!(fair_next_client!("{for_update}", idle!("c.id")))
                }
                (false, Claimable::IdleClients) => {
                    pick_client!(fair_next_client!("{skip_locked}", idle!("c.id")))
                }
            };
            let mut tx = self.begin_urgent_write().await?;
            let client: Option<String> = sqlx::query_scalar(self.sql(pick))
                .fetch_optional(&mut *tx)
                .await?;
            let Some(client) = client else {
                tx.rollback().await?;
                // SQLite's writers take turns: what it found is what there is.
                if wait || self.dialect == Dialect::Sqlite {
                    return Ok(Vec::new());
                }
                wait = true;
                continue;
            };
            // The client's tests again, now that its row is held: a claim that waited for it
            // sees what the claim before it took.
            macro_rules! take_next {
                ($only:expr) => {
                    take_lease!(concat!(
                        "id = (SELECT id FROM batches WHERE id IN (",
                        first_ready!("$3"),
                        ", ",
                        first_lapsed!("$3"),
                        ")",
                        client_order!(),
                        " LIMIT 1 {skip_locked}) AND ",
                        claimable!(),
                        " AND ",
                        under_cap!("$3"),
                        $only
                    ))
                };
            }
            let take = self.sql(match claimable {
                Claimable::AnyClient => take_next!(""),
                Claimable::IdleClients => take_next!(idle!("$3")),
            });
            let row = sqlx::query_as::<_, LeaseColumns>(take)
                .bind(owner)
                .bind(lease_ms)
                .bind(&client)
                .fetch_optional(&mut *tx)
                .await?;
            let leases = self
                .settle_claim(tx, row, &client, owner, lease_ms, bundle)
                .await?;
            if !leases.is_empty() {
                return Ok(leases);
            }
        }
        Ok(Vec::new())
    }

    /// Ids of batches a claim could take now, in the fair share's order: the batches of
    /// the client whose turn it is (among those `claimable` allows), ready ones first, then
    /// those under a lapsed lease (for workers that lock before they claim).
    pub async fn claimable_batches(
        &self,
        limit: u32,
        claimable: Claimable,
    ) -> Result<Vec<BatchId>> {
        macro_rules! of_next_client {
            ($only:expr) => {
                concat!(
                    "WITH next AS (",
                    fair_next_client!("", $only),
                    ") SELECT id FROM (SELECT id FROM batches \
                         WHERE client_id = (SELECT id FROM next) AND status = 'ready' \
                           AND available_at <= {now}",
                    client_order!(),
                    " LIMIT $1) AS due UNION ALL SELECT id FROM (SELECT id FROM batches \
                         WHERE client_id = (SELECT id FROM next) AND status = 'processing' \
                           AND lease_expires_at < {now}",
                    client_order!(),
                    " LIMIT $1) AS lapsed"
                )
            };
        }
        let sql = self.sql(match claimable {
            Claimable::AnyClient => of_next_client!(""),
            Claimable::IdleClients => of_next_client!(idle!("c.id")),
        });
        let ids: Vec<String> = sqlx::query_scalar(sql)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        ids.into_iter().map(parse_id).collect()
    }

    /// Claims one named batch if it is ready or its lease expired (a wake-up names it), its
    /// client has room under its `max_concurrent_batches` (and nothing in progress, when
    /// `claimable` says so). It takes the client's turn in the fair share.
    pub async fn claim(
        &self,
        batch_id: &BatchId,
        owner: &str,
        lease_ms: i64,
        claimable: Claimable,
        bundle: Bundle,
    ) -> Result<Vec<Lease>> {
        let mut tx = self.begin_urgent_write().await?;
        let client: Option<String> = sqlx::query_scalar(
            self.sql(pick_client!("SELECT client_id FROM batches WHERE id = $1")),
        )
        .bind(batch_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(client) = client else {
            tx.rollback().await?;
            return Ok(Vec::new());
        };
        macro_rules! take_named {
            ($only:expr) => {
                take_lease!(concat!(
                    "id = $3 AND client_id = $4 AND ",
                    claimable!(),
                    " AND ",
                    under_cap!("$4"),
                    $only
                ))
            };
        }
        let sql = self.sql(match claimable {
            Claimable::AnyClient => take_named!(""),
            Claimable::IdleClients => take_named!(idle!("$4")),
        });
        let row = sqlx::query_as::<_, LeaseColumns>(sql)
            .bind(owner)
            .bind(lease_ms)
            .bind(batch_id.as_str())
            .bind(&client)
            .fetch_optional(&mut *tx)
            .await?;
        self.settle_claim(tx, row, &client, owner, lease_ms, bundle)
            .await
    }

    /// Ends a claim's transaction: takes the first batch's followers when `bundle` has
    /// room for them, moving the client on in the round by one stride for each, and
    /// commits; or rolls back when the claim took nothing. The leases, first one first.
    async fn settle_claim(
        &self,
        mut tx: Tx,
        first: Option<LeaseColumns>,
        client: &str,
        owner: &str,
        lease_ms: i64,
        bundle: Bundle,
    ) -> Result<Vec<Lease>> {
        let Some(first) = first else {
            tx.rollback().await?;
            return Ok(Vec::new());
        };
        let mut leases = vec![first.parse(owner)?];
        let room = bundle.records.saturating_sub(leases[0].records_total);
        if bundle.batches > 1 && room > 0 {
            let followers = sqlx::query_as::<_, LeaseColumns>(self.sql(take_followers!()))
                .bind(owner)
                .bind(lease_ms)
                .bind(client)
                .bind(i64::try_from(room).unwrap_or(i64::MAX))
                .bind(i64::from(bundle.batches - 1))
                .fetch_all(&mut *tx)
                .await?;
            if !followers.is_empty() {
                sqlx::query(self.sql(
                    "UPDATE clients SET claim_pass = claim_pass + 1000000 / claim_weight * $2 \
                     WHERE id = $1",
                ))
                .bind(client)
                .bind(followers.len() as i64)
                .execute(&mut *tx)
                .await?;
            }
            for row in followers {
                leases.push(row.parse(owner)?);
            }
        }
        tx.commit().await?;
        Ok(leases)
    }

    /// How long until a batch may next become claimable, by the ledger's clock: the earliest
    /// `ready` batch falling due or `processing` lease running out (zero or less: one is
    /// claimable now, or held by another worker's mutex). `None` when there is neither. A
    /// lease that lapses announces nothing, so a claim loop that otherwise sleeps long
    /// (the safety sweep while the broker carries wake-ups) sleeps at most this long.
    pub async fn next_claim_in_ms(&self) -> Result<Option<i64>> {
        let sql = self.sql(
            "SELECT MIN(due) - {now} FROM ( \
                 SELECT MIN(available_at) AS due FROM batches WHERE status = 'ready' \
                 UNION ALL \
                 SELECT MIN(lease_expires_at) FROM batches WHERE status = 'processing') AS next",
        );
        Ok(sqlx::query_scalar(sql).fetch_one(self.pool()).await?)
    }

    /// Ends the leases of batches held by workers that are gone: `processing` under an
    /// unexpired lease whose owner is not among `live` and that no claim or chunk touched
    /// for `quiet_ms` (a worker that has just started may not be in the registry yet).
    /// They are claimable at once, as a takeover; the fence still decides, so an owner
    /// that was alive after all has its next write refused. Returns the batches freed.
    pub async fn end_leases_of_gone_workers(
        &self,
        live: &[String],
        quiet_ms: i64,
    ) -> Result<Vec<BatchId>> {
        let sql = self.sql(
            "UPDATE batches SET lease_expires_at = {now} - 1 \
             WHERE status = 'processing' AND lease_expires_at >= {now} \
               AND updated_at < {now} - $2 AND lease_owner NOT IN ({id_list}) \
             RETURNING id",
        );
        let ids: Vec<String> = sqlx::query_scalar(sql)
            .bind(json_list(live))
            .bind(quiet_ms)
            .fetch_all(&mut *self.writer().await?)
            .await?;
        ids.into_iter().map(parse_id).collect()
    }

    /// Writes one chunk under the fence, renews the lease and moves the checkpoint.
    #[tracing::instrument(skip_all, fields(batch_id = %lease.batch_id, checkpoint = chunk.checkpoint))]
    pub async fn commit_chunk(
        &self,
        lease: &Lease,
        lease_ms: i64,
        chunk: &Chunk,
    ) -> Result<ChunkResult> {
        let mut tx = self.begin_write_for(&lease.client_id).await?;
        let written = async {
            let result = self
                .write_chunks(&mut tx, &[(lease, chunk)])
                .await?
                .pop()
                .unwrap_or_default();
            self.advance(&mut tx, lease, lease_ms, chunk, result)
                .await?;
            Ok(result)
        }
        .await;
        tx.end(written).await
    }

    /// The last chunk and the completion in one transaction, and one update of the batch
    /// row: one write less per batch on the path every batch takes (a one-chunk batch is
    /// claimed, then committed once), and on PostgreSQL one row version less, each of which
    /// writes every index of `batches` again.
    #[tracing::instrument(skip_all, fields(batch_id = %lease.batch_id, checkpoint = chunk.checkpoint))]
    pub async fn commit_last_chunk(&self, lease: &Lease, chunk: &Chunk) -> Result<BatchCompleted> {
        let mut done = self
            .complete_bundle(&[Completing::in_current_span(lease, Some(chunk))])
            .await?;
        done.pop().ok_or_else(|| fence_rejected(lease))
    }

    /// Completes the batch under the fence and announces it.
    pub async fn complete_batch(&self, lease: &Lease) -> Result<BatchCompleted> {
        let mut done = self
            .complete_bundle(&[Completing::in_current_span(lease, None)])
            .await?;
        done.pop().ok_or_else(|| fence_rejected(lease))
    }

    /// Completes batches in one transaction, each with its last chunk (if it has one
    /// left) under its own fence, with its own counts, event and jobs: a batch alone, or
    /// the batches of a bundle ([`Bundle`]). All or none: when any of them fails (its lease
    /// was lost, say) nothing is written, and the caller commits them one at a time, so
    /// that the failure stays that batch's alone.
    ///
    /// The records of every batch are written first. The client's feed counter comes
    /// after them (see [`Db::append_changes`]) and stays locked to the commit, so what
    /// follows it is a fixed handful of statements whatever the bundle's size: the
    /// changes, the batches, the events and the jobs, each written for all at once.
    pub async fn complete_bundle(&self, bundle: &[Completing<'_>]) -> Result<Vec<BatchCompleted>> {
        // A bundle is one client's batches ([`Bundle`]).
        let mut tx = match bundle.first() {
            Some(first) => self.begin_write_for(&first.lease.client_id).await?,
            None => self.begin_write().await?,
        };
        let done = self.complete_in(&mut tx, bundle).await;
        tx.end(done).await
    }

    async fn complete_in(
        &self,
        tx: &mut Tx,
        bundle: &[Completing<'_>],
    ) -> Result<Vec<BatchCompleted>> {
        let chunks: Vec<(&Lease, &Chunk)> = bundle
            .iter()
            .filter_map(|c| Some((c.lease, c.chunk?)))
            .collect();
        let mut wrote = self.write_chunks(tx, &chunks).await?.into_iter();
        let results: Vec<ChunkResult> = bundle
            .iter()
            .map(|c| match c.chunk {
                Some(_) => wrote.next().unwrap_or_default(),
                None => ChunkResult::default(),
            })
            .collect();
        let rows: Vec<serde_json::Value> = bundle
            .iter()
            .zip(&results)
            .map(|(Completing { lease, chunk, .. }, result)| {
                serde_json::json!({
                    "id": lease.batch_id.as_str(),
                    "epoch": lease.epoch,
                    "checkpoint": chunk.map(|c| c.checkpoint as i64),
                    "written": result.written as i64,
                    "unchanged": result.unchanged as i64,
                    "failed": chunk.map_or(0, |c| c.failed as i64),
                    "superseded": result.superseded as i64,
                    "first": result.changes.map(|r| r.0),
                    "last": result.changes.map(|r| r.1),
                })
            })
            .collect();
        let sql = self.sql(&format!(
            concat!(
                "UPDATE batches SET status = 'completed', completed_at = {{now}}, \
                     updated_at = {{now}}, lease_owner = NULL, lease_expires_at = NULL, \
                     last_error = NULL, checkpoint = COALESCE(m.checkpoint, batches.checkpoint), \
                     records_written = batches.records_written + m.written, \
                     records_unchanged = batches.records_unchanged + m.unchanged, \
                     records_failed = batches.records_failed + m.failed, \
                     records_superseded = batches.records_superseded + m.superseded, \
                     changes_first = COALESCE(batches.changes_first, m.first), \
                     changes_last = COALESCE(m.last, batches.changes_last) \
                 FROM {} m \
                 WHERE batches.id = m.id AND batches.lease_epoch = m.epoch \
                   AND batches.status = 'processing' \
                 RETURNING batches.id AS id, records_total, records_written, records_unchanged, \
                     records_superseded, records_failed, started_at, completed_at, \
                     changes_first, changes_last, ",
                client_policy!()
            ),
            self.json_rows(
                &[
                    ("id", Field::Text),
                    ("epoch", Field::Int),
                    ("checkpoint", Field::Int),
                    ("written", Field::Int),
                    ("unchanged", Field::Int),
                    ("failed", Field::Int),
                    ("superseded", Field::Int),
                    ("first", Field::Int),
                    ("last", Field::Int),
                ],
                &rows
            )
        ));
        let returned = sqlx::query(sql)
            .bind(serde_json::Value::Array(rows).to_string())
            .fetch_all(&mut **tx)
            .await?;
        let mut done = Vec::with_capacity(bundle.len());
        let mut events = Vec::with_capacity(bundle.len());
        // RETURNING promises no order: each batch finds its own row.
        let mut by_id = std::collections::HashMap::with_capacity(returned.len());
        for row in &returned {
            by_id.insert(row.try_get::<String, _>("id")?, row);
        }
        for Completing { lease, .. } in bundle {
            let Some(row) = by_id.get(lease.batch_id.as_str()) else {
                return Err(fence_rejected(lease));
            };
            let (completed, at_ms) = completed_from(row)?;
            let policy: Option<String> = row.try_get("client_policy")?;
            let policy = policy.as_deref().map(parse_policy).transpose()?;
            let env = Envelope::new(
                lease.batch_id.clone(),
                lease.client_id.clone(),
                at_ms,
                Event::BatchCompleted(completed.clone()),
            );
            done.push(completed);
            events.push((env, policy));
        }
        // Each batch's event and jobs continue its own completion's trace.
        let events: Vec<Outgoing<'_>> = events
            .iter()
            .zip(bundle)
            .map(|((event, policy), c)| Outgoing {
                event,
                policy: policy.as_ref(),
                traceparent: c.traceparent.as_deref(),
            })
            .collect();
        self.enqueue_events(tx, &events).await?;
        Ok(done)
    }

    /// Moves the checkpoint past `chunk` and renews the lease, under the fence.
    async fn advance(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        lease_ms: i64,
        chunk: &Chunk,
        result: ChunkResult,
    ) -> Result<()> {
        let fence = self.sql(
            "UPDATE batches SET checkpoint = $3, records_written = records_written + $4, \
                 records_unchanged = records_unchanged + $5, records_failed = records_failed + $6, \
                 records_superseded = records_superseded + $8, \
                 changes_first = COALESCE(changes_first, $9), \
                 changes_last = COALESCE($10, changes_last), \
                 lease_expires_at = {now} + $7, updated_at = {now} \
             WHERE id = $1 AND lease_epoch = $2 AND status = 'processing'",
        );
        let held = sqlx::query(fence)
            .bind(lease.batch_id.as_str())
            .bind(lease.epoch)
            .bind(chunk.checkpoint as i64)
            .bind(result.written as i64)
            .bind(result.unchanged as i64)
            .bind(chunk.failed as i64)
            .bind(lease_ms)
            .bind(result.superseded as i64)
            .bind(result.changes.map(|c| c.0))
            .bind(result.changes.map(|c| c.1))
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if held == 0 {
            return Err(fence_rejected(lease));
        }
        Ok(())
    }

    /// Ends a batch whose file has more refused records than its error threshold allows,
    /// in one transaction under the fence: no record is written, every row error is (the
    /// report lists them), and the batch is `rejected` (`too_many_errors`) with its event.
    /// Readers never see a record of it: it wrote none, on this attempt or any other (the
    /// decision is the same on every attempt, and is taken before the first chunk).
    pub async fn refuse_batch(
        &self,
        lease: &Lease,
        failed: u64,
        errors: &[RowError],
        reason: &str,
    ) -> Result<()> {
        let mut tx = self.begin_write_for(&lease.client_id).await?;
        let refused = async {
            // The fenced update first: it locks the batch's row, so a worker that takes the
            // batch over while the errors are written finds it rejected, rather than this
            // transaction finding its lease gone after all the writing.
            let sql = self.sql(concat!(
                "UPDATE batches SET status = 'rejected', completed_at = {now}, updated_at = {now}, \
                     lease_owner = NULL, lease_expires_at = NULL, last_error = $3, \
                     checkpoint = records_total, records_failed = $4 \
                 WHERE id = $1 AND lease_epoch = $2 AND status = 'processing' \
                 RETURNING updated_at, ",
                client_policy!()
            ));
            let Some(row) = sqlx::query(sql)
                .bind(lease.batch_id.as_str())
                .bind(lease.epoch)
                .bind(reason)
                .bind(failed as i64)
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Err(fence_rejected(lease));
            };
            self.write_errors(&mut tx, lease, errors).await?;
            let event = Event::BatchRejected(BatchRejected {
                reason: reason.to_owned(),
                code: Some(BatchRejected::TOO_MANY_ERRORS.into()),
            });
            self.announce(&mut tx, lease, row.try_get("updated_at")?, event, &row)
                .await
        }
        .await;
        tx.end(refused).await
    }

    /// Ends a failed attempt: back to `ready` after `backoff_ms`, or `dead` once the
    /// attempts are used up.
    pub async fn fail_batch(
        &self,
        lease: &Lease,
        error: &str,
        max_attempts: u32,
        backoff_ms: i64,
    ) -> Result<FailOutcome> {
        let error: String = error.chars().take(2000).collect();
        let mut tx = self.begin_write_for(&lease.client_id).await?;
        let sql = self.sql(concat!(
            "UPDATE batches SET status = CASE WHEN attempts >= $3 THEN 'dead' ELSE 'ready' END, \
                 available_at = {now} + $4, last_error = $5, updated_at = {now}, \
                 lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND status = 'processing' \
             RETURNING status, available_at, updated_at, ",
            client_policy!()
        ));
        let Some(row) = sqlx::query(sql)
            .bind(lease.batch_id.as_str())
            .bind(lease.epoch)
            .bind(i64::from(max_attempts))
            .bind(backoff_ms)
            .bind(&error)
            .fetch_optional(&mut *tx)
            .await?
        else {
            tx.rollback().await?;
            return Err(fence_rejected(lease));
        };
        let status: String = row.try_get("status")?;
        let at_ms: i64 = row.try_get("available_at")?;
        let now: i64 = row.try_get("updated_at")?;
        let (outcome, event) = if status == BatchStatus::Dead.as_str() {
            (
                FailOutcome::Dead,
                Event::BatchDead(BatchDead {
                    attempts: lease.attempts,
                    error,
                }),
            )
        } else {
            let retry_at = rfc3339(at_ms);
            (
                FailOutcome::Retry { at_ms },
                Event::BatchFailed(BatchFailed {
                    attempt: lease.attempts,
                    error,
                    retry_at,
                }),
            )
        };
        self.announce(&mut tx, lease, now, event, &row).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Renews a lease without committing anything: a worker reading a long stretch of its
    /// file before the next chunk (a count of refused records, a resume's skip) keeps it.
    pub async fn renew_lease(&self, lease: &Lease, lease_ms: i64) -> Result<()> {
        let sql = self.sql(
            "UPDATE batches SET lease_expires_at = {now} + $3, updated_at = {now} \
             WHERE id = $1 AND lease_epoch = $2 AND status = 'processing'",
        );
        let renewed = sqlx::query(sql)
            .bind(lease.batch_id.as_str())
            .bind(lease.epoch)
            .bind(lease_ms)
            .execute(&mut *self.writer_for(&lease.client_id).await?)
            .await?;
        if renewed.rows_affected() == 0 {
            return Err(fence_rejected(lease));
        }
        Ok(())
    }

    /// Gives a batch back untouched (shutdown): ready at once, the claim not counted (as an
    /// attempt or as a takeover, whichever it was).
    pub async fn release_batch(&self, lease: &Lease) -> Result<()> {
        let sql = self.sql(
            "UPDATE batches SET status = 'ready', attempts = attempts - 1 + took_over, \
                 takeovers = takeovers - took_over, took_over = 0, available_at = {now}, \
                 updated_at = {now}, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND status = 'processing'",
        );
        let n = sqlx::query(sql)
            .bind(lease.batch_id.as_str())
            .bind(lease.epoch)
            .execute(&mut *self.writer_for(&lease.client_id).await?)
            .await?
            .rows_affected();
        if n == 0 {
            Err(fence_rejected(lease))
        } else {
            Ok(())
        }
    }

    /// Writes the outbox row of a holder's `event`, with the follow-up jobs the client's
    /// policy (`client_policy` of `row`, the statement that ended the attempt) asks for.
    async fn announce(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        at_ms: i64,
        event: Event,
        row: &AnyRow,
    ) -> Result<()> {
        let env = Envelope::new(
            lease.batch_id.clone(),
            lease.client_id.clone(),
            at_ms,
            event,
        );
        let policy: Option<String> = row.try_get("client_policy")?;
        let policy = policy.as_deref().map(parse_policy).transpose()?;
        // Without a client row `enqueue_event` looks again and writes no jobs.
        self.enqueue_event(tx, &env, policy.as_ref()).await
    }

    /// Operator transition `from → to` (approve, reject, retry or discard a dead batch).
    pub async fn transition_batch(&self, id: &BatchId, action: BatchAction) -> Result<BatchView> {
        let (from, to) = match action {
            BatchAction::Approve => (BatchStatus::AwaitingApproval, BatchStatus::Ready),
            BatchAction::Reject { .. } => (BatchStatus::AwaitingApproval, BatchStatus::Rejected),
            BatchAction::Retry => (BatchStatus::Dead, BatchStatus::Ready),
            BatchAction::Discard { .. } => (BatchStatus::Dead, BatchStatus::Rejected),
        };
        let mut tx = self.begin_write().await?;
        let sql = self.sql(
            "UPDATE batches SET status = $3, available_at = {now}, updated_at = {now}, \
                 attempts = CASE WHEN $3 = 'ready' AND status = 'dead' THEN 0 ELSE attempts END, \
                 completed_at = CASE WHEN $3 = 'rejected' THEN {now} ELSE completed_at END \
             WHERE id = $1 AND status = $2 AND (payload_expired_at IS NULL OR $3 <> 'ready') \
             RETURNING client_id, import_id, updated_at",
        );
        let row = sqlx::query(sql)
            .bind(id.as_str())
            .bind(from.as_str())
            .bind(to.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            if to == BatchStatus::Ready && self.batch_payload(id).await?.is_none() {
                return Err(Error::Conflict(
                    "the batch's payload was deleted when its retention ended \
                     (payload_retention_secs), so it cannot run again; submit the file again"
                        .into(),
                ));
            }
            return match self.get_batch(None, id).await? {
                Some(b) => Err(Error::Conflict(format!(
                    "batch is {}, not {}",
                    b.status, from
                ))),
                None => Err(Error::NotFound),
            };
        };
        let client_id: ClientId = parse_id(row.try_get("client_id")?)?;
        let import_id: ImportId = parse_id(row.try_get("import_id")?)?;
        let now: i64 = row.try_get("updated_at")?;
        let event = match action {
            BatchAction::Reject { reason } | BatchAction::Discard { reason } => {
                Event::BatchRejected(BatchRejected {
                    reason,
                    code: Some(BatchRejected::BY_OPERATOR.into()),
                })
            }
            BatchAction::Approve | BatchAction::Retry => {
                Event::BatchReady(BatchReady { import_id })
            }
        };
        self.enqueue_event(
            &mut tx,
            &Envelope::new(id.clone(), client_id, now, event),
            None,
        )
        .await?;
        tx.commit().await?;
        self.get_batch(None, id).await?.ok_or(Error::NotFound)
    }

    /// One batch; `client` scopes the lookup to one tenant.
    pub async fn get_batch(
        &self,
        client: Option<&ClientId>,
        id: &BatchId,
    ) -> Result<Option<BatchView>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND ($2 IS NULL OR client_id = $2)"
        ));
        let row = sqlx::query_as::<_, BatchColumns>(sql)
            .bind(id.as_str())
            .bind(client.map(ClientId::as_str))
            .fetch_optional(self.pool())
            .await?;
        row.map(BatchColumns::parse).transpose()
    }

    /// Batches newest first, of one client (`None`: every client, for operators),
    /// optionally of one status.
    pub async fn list_batches(
        &self,
        client: Option<&ClientId>,
        status: Option<BatchStatus>,
        cursor: Option<&BatchId>,
        limit: u32,
    ) -> Result<BatchPage> {
        let mut given = Conditions::default();
        given
            .and("client_id =", client.map(|c| Bind::Text(c.as_str())))
            .and("status =", status.map(|s| Bind::Text(s.as_str())))
            .and("id <", cursor.map(|c| Bind::Text(c.as_str())));
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches{} ORDER BY id DESC LIMIT ${}",
            given.clause(),
            given.next()
        ));
        let rows = given
            .bind(sqlx::query_as::<_, BatchColumns>(sql))
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let items = rows
            .into_iter()
            .map(BatchColumns::parse)
            .collect::<Result<Vec<_>>>()?;
        let (items, next_cursor) = split_page(items, limit, |b| b.id.to_string());
        Ok(BatchPage { items, next_cursor })
    }

    /// A batch's row errors in file order (a record's errors in the order it had them),
    /// after `after`.
    pub async fn list_record_errors(
        &self,
        batch: &BatchId,
        after: ErrorCursor,
        limit: u32,
    ) -> Result<RecordErrorPage> {
        // A range on the key, as both databases read it from the index: written as
        // `line > $2 OR (line = $2 AND …)` it is a filter, and each page starts again from
        // the batch's first error.
        let rows = sqlx::query_as::<_, RecordErrorColumns>(
            "SELECT line, position, field, code, detail, value FROM record_errors \
             WHERE batch_id = $1 AND line >= $2 AND (line, position) > ($2, $3) \
             ORDER BY line, position LIMIT $4",
        )
        .bind(batch.as_str())
        .bind(i64::try_from(after.line).unwrap_or(i64::MAX))
        .bind(after.position)
        .bind(i64::from(limit) + 1)
        .fetch_all(self.pool())
        .await?;
        let items: Vec<(ErrorCursor, RecordErrorView)> = rows
            .into_iter()
            .map(|r| {
                let at = ErrorCursor {
                    line: count(r.line),
                    position: r.position,
                };
                let view = RecordErrorView {
                    line: at.line,
                    field: r.field,
                    code: r.code,
                    detail: r.detail,
                    value: r.value,
                };
                (at, view)
            })
            .collect();
        let (items, next_cursor) = split_page(items, limit, |(at, _)| at.to_string());
        Ok(RecordErrorPage {
            items: items.into_iter().map(|(_, view)| view).collect(),
            next_cursor,
        })
    }

    /// Row errors per code, for a batch's report.
    pub async fn record_error_counts(&self, batch: &BatchId) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT code, COUNT(*) AS n FROM record_errors WHERE batch_id = $1 GROUP BY code ORDER BY code",
        )
        .bind(batch.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("code")?, count(r.try_get("n")?))))
            .collect()
    }

    /// Batches per status, for operators.
    pub async fn batch_counts(&self) -> Result<Vec<(BatchStatus, u64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status")?;
                Ok((
                    status.parse().map_err(Error::stored)?,
                    count(r.try_get("n")?),
                ))
            })
            .collect()
    }
}

/// Where a page of row errors starts: after this error (`line` alone: after the line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCursor {
    pub line: u64,
    pub position: i64,
}

impl std::fmt::Display for ErrorCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.line, self.position)
    }
}

impl std::str::FromStr for ErrorCursor {
    type Err = String;

    /// `LINE.POSITION`, or `LINE` for every error of the lines after it.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("cursor `{s}` is not one this API gave out");
        let (line, position) = match s.split_once('.') {
            Some((l, p)) => (l, p.parse().map_err(|_| bad())?),
            None => (s, i64::MAX),
        };
        Ok(ErrorCursor {
            line: line.parse().map_err(|_| bad())?,
            position,
        })
    }
}

#[derive(sqlx::FromRow)]
struct RecordErrorColumns {
    line: i64,
    position: i64,
    field: Option<String>,
    code: String,
    detail: String,
    value: Option<String>,
}

/// What an operator can do to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAction {
    Approve,
    Reject {
        reason: String,
    },
    Retry,
    /// A dead batch leaves the dead-letter queue as rejected, with the operator's reason.
    Discard {
        reason: String,
    },
}

/// A completed batch's counts as its completion's `RETURNING` gives them, and when it
/// completed.
fn completed_from(row: &AnyRow) -> Result<(BatchCompleted, i64)> {
    let completed_at: i64 = row.try_get("completed_at")?;
    let started_at: Option<i64> = row.try_get("started_at")?;
    let done = BatchCompleted {
        records_total: count(row.try_get("records_total")?),
        records_written: count(row.try_get("records_written")?),
        records_unchanged: count(row.try_get("records_unchanged")?),
        records_superseded: count(row.try_get("records_superseded")?),
        records_failed: count(row.try_get("records_failed")?),
        duration_ms: count(completed_at - started_at.unwrap_or(completed_at)),
        changes: match (
            row.try_get::<Option<i64>, _>("changes_first")?,
            row.try_get::<Option<i64>, _>("changes_last")?,
        ) {
            (Some(first), Some(last)) => Some(ChangeRange {
                first: count(first),
                last: count(last),
            }),
            _ => None,
        },
    };
    Ok((done, completed_at))
}

fn fence_rejected(lease: &Lease) -> Error {
    Error::FenceRejected {
        batch_id: lease.batch_id.to_string(),
        epoch: lease.epoch,
    }
}

/// A claim's row as the ledger returns it, before its values are parsed.
#[derive(sqlx::FromRow)]
struct LeaseColumns {
    id: String,
    client_id: String,
    import_id: String,
    accepted_seq: i64,
    lease_epoch: i64,
    attempts: i64,
    takeovers: i64,
    took_over: i64,
    checkpoint: i64,
    records_total: i64,
    format: String,
    policy: String,
    waited_ms: i64,
    schema_version: Option<i64>,
    schema_document: Option<String>,
    traceparent: Option<String>,
    payload_id: Option<String>,
    payload_bytes: i64,
    payload_expired_at: Option<i64>,
}

impl LeaseColumns {
    fn parse(self, owner: &str) -> Result<Lease> {
        Ok(Lease {
            batch_id: parse_id(self.id)?,
            client_id: parse_id(self.client_id)?,
            import_id: parse_id(self.import_id)?,
            accepted_seq: self.accepted_seq,
            owner: owner.to_owned(),
            epoch: self.lease_epoch,
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
            takeovers: u32::try_from(self.takeovers).unwrap_or(u32::MAX),
            took_over: self.took_over != 0,
            checkpoint: count(self.checkpoint),
            records_total: count(self.records_total),
            format: self.format.parse().map_err(Error::stored)?,
            policy: parse_policy(&self.policy)?,
            waited_ms: count(self.waited_ms),
            schema: StoredSchema::from_columns(self.schema_version, self.schema_document)?,
            traceparent: self.traceparent,
            payload: stored_payload(self.payload_id, self.payload_bytes, self.payload_expired_at),
        })
    }
}

/// A batch's [`BATCH_COLUMNS`] as the ledger returns them, before their values are parsed.
#[derive(sqlx::FromRow)]
pub(super) struct BatchColumns {
    id: String,
    import_id: String,
    status: String,
    records_total: i64,
    checkpoint: i64,
    records_written: i64,
    records_unchanged: i64,
    records_superseded: i64,
    records_failed: i64,
    attempts: i64,
    takeovers: i64,
    last_error: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    completed_at: Option<i64>,
    schema_version: Option<i64>,
    priority: i64,
}

impl BatchColumns {
    pub(super) fn parse(self) -> Result<BatchView> {
        let status: BatchStatus = self.status.parse().map_err(Error::stored)?;
        Ok(BatchView {
            id: parse_id(self.id)?,
            import_id: parse_id(self.import_id)?,
            status,
            records_total: count(self.records_total),
            records_processed: count(self.checkpoint),
            records_written: count(self.records_written),
            records_unchanged: count(self.records_unchanged),
            records_superseded: count(self.records_superseded),
            records_failed: count(self.records_failed),
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
            takeovers: u32::try_from(self.takeovers).unwrap_or(u32::MAX),
            last_error: self.last_error,
            created_at: rfc3339(self.created_at),
            started_at: self.started_at.map(rfc3339),
            completed_at: self.completed_at.map(rfc3339),
            duration_ms: match (self.started_at, self.completed_at) {
                (Some(s), Some(c)) if status == BatchStatus::Completed => Some(count(c - s)),
                _ => None,
            },
            schema_version: self.schema_version.map(count),
            priority: Priority::from_rank(self.priority).map_err(Error::stored)?,
        })
    }
}
