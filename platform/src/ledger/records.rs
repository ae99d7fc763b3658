//! Stored records: one by key, listings and exports in key order, the checksums and values
//! a dry run compares against, deletion and a client's purge, and the changes feed.

use std::collections::HashMap;

use dataflow_contracts::http::{
    PurgeView, RawJson, RecordChangeKind, RecordChangeView, RecordView,
};
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{BatchId, ClientId};
use serde_json::value::RawValue;
use sqlx::Row;

use super::clients::parse_id;
use super::filters::{Bind, Conditions};
use super::payloads::delete_parts;
use super::{Db, Dialect, NewAction, Tx, count};
use crate::{Error, Result};

/// One writer's changes to append to its client's feed ([`Db::append_change_groups`]).
pub(super) struct ChangeGroup<'a> {
    pub client: &'a ClientId,
    /// The batch that made them, if a batch did.
    pub batch: Option<&'a BatchId>,
    pub changes: &'a [NewChange<'a>],
}

/// An insert into the changes feed of the JSON set bound as `$1` (objects of `s`, `k`,
/// `kind` and `d`). The client and the batch are the expressions `$client` and `$batch`:
/// parameters for one writer, or more fields of each object for several (named, with
/// their types, by `$fields` on PostgreSQL).
macro_rules! insert_changes {
    (Postgres, $client:literal, $batch:literal, $fields:literal) => {
        concat!(
            "INSERT INTO record_changes \
               (client_id, seq, record_key, kind, batch_id, data, changed_at) \
             SELECT ",
            $client,
            ", r.s, r.k, r.kind, ",
            $batch,
            ", r.d::jsonb, {now} FROM json_to_recordset($1::json) AS r(",
            $fields,
            "s bigint, k text, kind text, d json)"
        )
    };
    (Sqlite, $client:literal, $batch:literal) => {
        concat!(
            "INSERT INTO record_changes \
               (client_id, seq, record_key, kind, batch_id, data, changed_at) \
             SELECT ",
            $client,
            ", value ->> 's', value ->> 'k', value ->> 'kind', ",
            $batch,
            ", CASE WHEN value ->> 'd' IS NULL THEN NULL ELSE value -> 'd' END, {now} \
             FROM jsonb_each(jsonb($1))"
        )
    };
}

/// Moves `client`'s feed counter past `n` more changes, which add `held` records to what it
/// holds (negative: take them away); the last of the numbers they take. The counter's row
/// lock orders the client's writers: the numbers are taken after the changes are written.
pub(super) async fn take_change_numbers(
    tx: &mut Tx,
    client: &ClientId,
    n: i64,
    held: i64,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO change_counters (client_id, last, records) VALUES ($1, $2, $3) \
         ON CONFLICT (client_id) DO UPDATE SET last = change_counters.last + excluded.last, \
             records = change_counters.records + excluded.records \
         RETURNING last",
    )
    .bind(client.as_str())
    .bind(n)
    .bind(held)
    .fetch_one(&mut **tx)
    .await?)
}

/// A change to append to a client's feed.
#[derive(Debug, Clone)]
pub struct NewChange<'a> {
    pub key: &'a str,
    pub kind: RecordChangeKind,
    /// The record after the change; `None` when it was deleted.
    pub data: Option<&'a RawValue>,
}

const RECORD_COLUMNS: &str =
    "record_key, CAST(data AS TEXT) AS data, checksum, batch_id, updated_at";

/// Which of a client's records a listing or an export returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// Changed at or after this time (ms since the epoch).
    pub updated_since_ms: Option<i64>,
    /// Last changed by this batch.
    pub batch_id: Option<BatchId>,
    pub key_prefix: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RecordColumns {
    record_key: String,
    data: String,
    checksum: String,
    batch_id: String,
    updated_at: i64,
}

impl RecordColumns {
    fn view(self) -> Result<RecordView> {
        Ok(RecordView {
            key: self.record_key,
            data: RawJson(
                RawValue::from_string(self.data)
                    .map_err(|e| Error::internal("a stored record is not JSON", e))?,
            ),
            checksum: self.checksum,
            batch_id: parse_id(self.batch_id)?,
            updated_at: rfc3339(self.updated_at),
        })
    }
}

impl Db {
    /// Appends `changes` to `client`'s feed inside `tx`, numbered after its last; the numbers
    /// taken, first and last. The counter's row stays locked until `tx` commits, so a
    /// client's writers commit in the order of their numbers (see the migration), and the
    /// counter is taken after every record the transaction locks, so no two writers can
    /// wait on each other for it.
    pub(super) async fn append_changes(
        &self,
        tx: &mut Tx,
        client: &ClientId,
        batch: Option<&BatchId>,
        changes: &[NewChange<'_>],
    ) -> Result<Option<(i64, i64)>> {
        let group = ChangeGroup {
            client,
            batch,
            changes,
        };
        let mut taken = self.append_change_groups(tx, &[group]).await?;
        Ok(taken.pop().flatten())
    }

    /// [`Db::append_changes`] for several writers of one transaction (the batches of a
    /// bundle) at once: one counter statement per client, clients in id order, and one
    /// insert for every change. The numbers each group took, in the order given.
    pub(super) async fn append_change_groups(
        &self,
        tx: &mut Tx,
        groups: &[ChangeGroup<'_>],
    ) -> Result<Vec<Option<(i64, i64)>>> {
        // Per client: its changes, and how many records they add (inserted) or take away
        // (deleted), kept beside its counter so that what a client holds is read, not
        // counted.
        let mut totals: Vec<(&ClientId, i64, i64)> = Vec::new();
        for g in groups.iter().filter(|g| !g.changes.is_empty()) {
            let held: i64 = g
                .changes
                .iter()
                .map(|c| match c.kind {
                    RecordChangeKind::Inserted => 1,
                    RecordChangeKind::Deleted => -1,
                    RecordChangeKind::Updated | RecordChangeKind::Purged => 0,
                })
                .sum();
            match totals.iter_mut().find(|(c, _, _)| *c == g.client) {
                Some((_, n, records)) => {
                    *n += g.changes.len() as i64;
                    *records += held;
                }
                None => totals.push((g.client, g.changes.len() as i64, held)),
            }
        }
        totals.sort_unstable();
        // Each client's next free number, once its counter moved past them all.
        let mut next: Vec<(&ClientId, i64)> = Vec::with_capacity(totals.len());
        for (client, n, records) in totals {
            let last = take_change_numbers(tx, client, n, records).await?;
            next.push((client, last - n + 1));
        }
        #[derive(serde::Serialize)]
        struct Row<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            b: Option<&'a str>,
            s: i64,
            k: &'a str,
            kind: &'a str,
            d: Option<&'a RawValue>,
        }
        // One writer's changes (a batch alone, a chunk) name its client and batch once, as
        // parameters; several writers' name theirs on every row.
        let one = match groups {
            [g] => Some((g.client.as_str(), g.batch.map(BatchId::as_str))),
            _ => None,
        };
        let many = one.is_none();
        let mut rows: Vec<Row<'_>> = Vec::new();
        let mut taken = Vec::with_capacity(groups.len());
        for g in groups {
            let Some((_, first)) = next.iter_mut().find(|(c, _)| *c == g.client) else {
                taken.push(None);
                continue;
            };
            if g.changes.is_empty() {
                taken.push(None);
                continue;
            }
            let from = *first;
            for (c, seq) in g.changes.iter().zip(from..) {
                rows.push(Row {
                    c: many.then(|| g.client.as_str()),
                    b: g.batch.filter(|_| many).map(BatchId::as_str),
                    s: seq,
                    k: c.key,
                    kind: c.kind.as_str(),
                    d: c.data,
                });
            }
            *first += g.changes.len() as i64;
            taken.push(Some((from, *first - 1)));
        }
        if rows.is_empty() {
            return Ok(taken);
        }
        let sql = self.sql(match (self.dialect, one.is_some()) {
            (Dialect::Postgres, true) => insert_changes!(Postgres, "$2", "$3", ""),
            (Dialect::Postgres, false) => {
                insert_changes!(Postgres, "r.c", "r.b", "c text, b text, ")
            }
            (Dialect::Sqlite, true) => insert_changes!(Sqlite, "$2", "$3"),
            (Dialect::Sqlite, false) => insert_changes!(Sqlite, "value ->> 'c'", "value ->> 'b'"),
        });
        let insert = sqlx::query(sql).bind(serde_json::to_string(&rows).unwrap_or_default());
        let insert = match one {
            Some((client, batch)) => insert.bind(client).bind(batch),
            None => insert,
        };
        insert.execute(&mut **tx).await?;
        Ok(taken)
    }

    /// Deletes one of `client`'s records, a change in its feed; whether there was one.
    pub async fn delete_record(&self, client: &ClientId, key: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let deleted = async {
            let gone: Option<String> = sqlx::query_scalar(
                "DELETE FROM records WHERE client_id = $1 AND record_key = $2 RETURNING record_key",
            )
            .bind(client.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if gone.is_none() {
                return Ok(false);
            }
            let change = NewChange {
                key,
                kind: RecordChangeKind::Deleted,
                data: None,
            };
            self.append_changes(&mut tx, client, None, &[change])
                .await?;
            Ok(true)
        }
        .await;
        tx.end(deleted).await
    }

    /// Removes `client`'s data from the ledger — its records, their changes, the stored
    /// files of its ended imports, their row errors and reports, and its dedup claims (a
    /// file sent again is imported again) — in one transaction; what it removed. The
    /// client, its keys, policy and schemas stay, and so do its imports and batches with
    /// their counts (no data of the records is in them). Its feed goes on with a `purged`
    /// change, so a follower learns that everything before it is gone.
    ///
    /// Refused while a batch of the client could still read its file or write records
    /// (ready, processing, awaiting approval, or dead and retryable), or a follow-up job
    /// could still read its row errors: deactivate the client, let them end, discard the
    /// dead ones, then purge. Only ended batches' files, errors and reports are deleted, so
    /// an import accepted while the purge runs (PostgreSQL does not hold imports off for
    /// it) keeps its file.
    pub async fn purge_client(&self, client: &ClientId) -> Result<PurgeView> {
        let mut tx = self.begin_write().await?;
        let purged = async {
            let found: Option<String> = sqlx::query_scalar("SELECT id FROM clients WHERE id = $1")
                .bind(client.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(Error::NotFound);
            }
            let (open, jobs): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM batches WHERE client_id = $1 \
                         AND status IN ('ready', 'processing', 'awaiting_approval', 'dead')), \
                        (SELECT COUNT(*) FROM jobs WHERE client_id = $1 \
                         AND status NOT IN ('done', 'dead'))",
            )
            .bind(client.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if open > 0 || jobs > 0 {
                return Err(Error::Conflict(format!(
                    "{open} batches of this client are ready, processing, awaiting approval or \
                     dead, and {jobs} of its follow-up jobs are still to run: deactivate the \
                     client, let them finish (or reject them), discard the dead ones, then purge"
                )));
            }
            let ended = "IN (SELECT id FROM batches WHERE client_id = $1 \
                         AND status IN ('completed', 'rejected'))";
            let mut purged = PurgeView {
                payloads: self.purge_payloads(&mut tx, client).await?,
                ..PurgeView::default()
            };
            for (table, rows, count) in [
                ("records", "client_id = $1", Some(&mut purged.records)),
                (
                    "record_changes",
                    "client_id = $1",
                    Some(&mut purged.changes),
                ),
                (
                    "record_errors",
                    &format!("batch_id {ended}"),
                    Some(&mut purged.row_errors),
                ),
                (
                    "reports",
                    &format!("batch_id {ended}"),
                    Some(&mut purged.reports),
                ),
                ("import_checksums", "client_id = $1", None),
            ] {
                let sql = sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE {rows}"));
                let deleted = sqlx::query(sql)
                    .bind(client.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if let Some(count) = count {
                    *count = deleted;
                }
            }
            // Less what it deleted, not down to nothing: on PostgreSQL a chunk may commit
            // records this purge did not see (imports go on), and counted them itself.
            sqlx::query("UPDATE change_counters SET records = records - $2 WHERE client_id = $1")
                .bind(client.as_str())
                .bind(i64::try_from(purged.records).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            let marker = NewChange {
                key: "",
                kind: RecordChangeKind::Purged,
                data: None,
            };
            self.append_changes(&mut tx, client, None, &[marker])
                .await?;
            Ok(purged)
        }
        .await;
        tx.end(purged).await
    }

    /// [`Db::purge_client`], written to the action log with its outcome (refused ones too)
    /// as done by `operator` through `session` (the admin API, the CLI).
    pub async fn purge_client_logged(
        &self,
        client: &ClientId,
        operator: &str,
        session: &str,
    ) -> Result<PurgeView> {
        let result = self.purge_client(client).await;
        let outcome = match &result {
            Ok(p) => format!("ok: {p}"),
            Err(e) => format!("refused: {e}"),
        };
        self.record_action(&NewAction {
            operator,
            session,
            action: "client.purge",
            target: client.as_str(),
            outcome: &outcome,
            ip: "-",
        })
        .await?;
        result
    }

    /// `client`'s record changes after number `after`, in order, at most `limit`.
    pub async fn list_changes(
        &self,
        client: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<RecordChangeView>> {
        let rows = sqlx::query_as::<_, ChangeColumns>(
            "SELECT seq, record_key, kind, batch_id, CAST(data AS TEXT) AS data, changed_at \
             FROM record_changes WHERE client_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(client.as_str())
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(ChangeColumns::view).collect()
    }

    /// One stored record of a client.
    pub async fn get_record(&self, client: &ClientId, key: &str) -> Result<Option<RecordView>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE client_id = $1 AND record_key = $2"
        ));
        let row = sqlx::query_as::<_, RecordColumns>(sql)
            .bind(client.as_str())
            .bind(key)
            .fetch_optional(self.pool())
            .await?;
        row.map(RecordColumns::view).transpose()
    }

    /// A client's records in key order after `after`, at most `limit`, that pass `filter`.
    pub async fn list_records(
        &self,
        client: &ClientId,
        filter: &RecordFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RecordView>> {
        // Only the conditions given (see `filters`), so that the planner walks the primary
        // key from the first key wanted: an export in pages would otherwise take
        // quadratic time.
        // A key range for the prefix: the keys that start with it sort from it up to it
        // followed by the greatest character (bytewise: the "C" collation, SQLite's BINARY).
        let upper = filter.key_prefix.as_ref().map(|p| format!("{p}\u{10FFFF}"));
        let mut given = Conditions::default();
        given
            .and("client_id =", Some(Bind::Text(client.as_str())))
            .and("record_key >", after.map(Bind::Text))
            .and(
                "record_key >=",
                filter.key_prefix.as_deref().map(Bind::Text),
            )
            .and("record_key <", upper.as_deref().map(Bind::Text))
            .and("updated_at >=", filter.updated_since_ms.map(Bind::Int))
            .and(
                "batch_id =",
                filter.batch_id.as_ref().map(|b| Bind::Text(b.as_str())),
            );
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records{} ORDER BY record_key LIMIT ${}",
            given.clause(),
            given.next()
        ));
        let query = given
            .bind(sqlx::query_as::<_, RecordColumns>(sql))
            .bind(i64::from(limit));
        let rows = query.fetch_all(self.pool()).await?;
        rows.into_iter().map(RecordColumns::view).collect()
    }

    /// The checksums the ledger holds for those of `keys` it has.
    pub async fn stored_checksums(
        &self,
        client: &ClientId,
        keys: &[&str],
    ) -> Result<HashMap<String, String>> {
        self.by_keys(client, keys, "checksum").await
    }

    /// The values (JSON text) the ledger holds for those of `keys` it has.
    pub async fn stored_values(
        &self,
        client: &ClientId,
        keys: &[&str],
    ) -> Result<HashMap<String, String>> {
        self.by_keys(client, keys, "CAST(data AS TEXT)").await
    }

    async fn by_keys(
        &self,
        client: &ClientId,
        keys: &[&str],
        column: &str,
    ) -> Result<HashMap<String, String>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let keys_of = match self.dialect {
            Dialect::Postgres => "SELECT json_array_elements_text($2::json)",
            Dialect::Sqlite => "SELECT value FROM json_each($2)",
        };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT record_key, {column} AS v FROM records \
             WHERE client_id = $1 AND record_key IN ({keys_of})"
        ));
        let rows = sqlx::query(sql)
            .bind(client.as_str())
            .bind(serde_json::to_string(keys).unwrap_or_default())
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("record_key")?, r.try_get("v")?)))
            .collect()
    }
}

#[derive(sqlx::FromRow)]
struct ChangeColumns {
    seq: i64,
    record_key: String,
    kind: String,
    batch_id: Option<String>,
    data: Option<String>,
    changed_at: i64,
}

impl ChangeColumns {
    fn view(self) -> Result<RecordChangeView> {
        Ok(RecordChangeView {
            seq: count(self.seq),
            key: self.record_key,
            kind: self.kind.parse().map_err(Error::stored)?,
            batch_id: self.batch_id.map(parse_id).transpose()?,
            data: self
                .data
                .map(|d| {
                    RawValue::from_string(d)
                        .map(RawJson)
                        .map_err(|e| Error::internal("a stored change is not JSON", e))
                })
                .transpose()?,
            changed_at: rfc3339(self.changed_at),
        })
    }
}

impl Db {
    /// Deletes the payloads of the client's ended batches and its unfinished uploads, in
    /// the purge's transaction. Returns how many batches' payloads went.
    async fn purge_payloads(&self, tx: &mut Tx, client: &ClientId) -> Result<u64> {
        let sql = self.sql(
            "UPDATE batches SET payload_expired_at = {now} \
             WHERE client_id = $1 AND status IN ('completed', 'rejected') \
               AND payload_expired_at IS NULL \
             RETURNING payload_id",
        );
        let payloads: Vec<Option<String>> = sqlx::query_scalar(sql)
            .bind(client.as_str())
            .fetch_all(&mut **tx)
            .await?;
        for id in payloads.iter().flatten() {
            delete_parts(tx, id).await?;
        }
        sqlx::query(
            "DELETE FROM payload_parts WHERE payload_id IN \
               (SELECT id FROM uploads WHERE client_id = $1 AND import_id IS NULL)",
        )
        .bind(client.as_str())
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM uploads WHERE client_id = $1")
            .bind(client.as_str())
            .execute(&mut **tx)
            .await?;
        Ok(payloads.len() as u64)
    }
}
