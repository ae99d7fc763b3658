//! How a chunk is written: its records upserted under the fence's transaction, never
//! going back in time, its row errors, and its changes appended to the client's feed.

use sqlx::Row;

use super::batches::{ChunkResult, Lease};
use super::records::{ChangeGroup, NewChange, take_change_numbers};
use super::{Db, Dialect, Tx, count};
use crate::Result;
use crate::domain::prepare::{Chunk, RecordRow, RowError};
use dataflow_contracts::http::RecordChangeKind;

/// What an upsert of records does to a record it finds: takes the new values when they
/// differ (the batch is then the record's last writer), and the newer import's place in the
/// order of acceptance either way, but only for an import accepted after the one whose
/// values the record holds, or for a later line of that same import. Returns each record
/// it touched with the batch that last changed it and its version (1: just inserted).
macro_rules! take_newer {
    () => {
        "ON CONFLICT (client_id, record_key) DO UPDATE SET \
           accepted_seq = excluded.accepted_seq, checksum = excluded.checksum, \
           data = CASE WHEN records.checksum = excluded.checksum \
                  THEN records.data ELSE excluded.data END, \
           batch_id = CASE WHEN records.checksum = excluded.checksum \
                      THEN records.batch_id ELSE excluded.batch_id END, \
           updated_at = CASE WHEN records.checksum = excluded.checksum \
                        THEN records.updated_at ELSE excluded.updated_at END, \
           version = CASE WHEN records.checksum = excluded.checksum \
                     THEN records.version ELSE records.version + 1 END \
         WHERE records.accepted_seq < excluded.accepted_seq \
            OR (records.accepted_seq = excluded.accepted_seq \
                AND records.checksum <> excluded.checksum) \
         RETURNING record_key, batch_id, version"
    };
}

/// An upsert under [`take_newer!`] of the records of the JSON set bound as `$set` (objects
/// of `k`, `d` and `c`). The client, the batch and its acceptance number are the
/// expressions `$client`, `$batch` and `$seq`: parameters for one chunk, or more fields of
/// each object for a bundle's (named, with their types, by `$fields` on PostgreSQL).
macro_rules! upsert_records {
    (Postgres, $set:literal, $client:literal, $batch:literal, $seq:literal, $fields:literal) => {
        concat!(
            "INSERT INTO records \
               (client_id, record_key, data, checksum, batch_id, accepted_seq, updated_at) \
             SELECT ",
            $client,
            ", r.k, r.d::jsonb, r.c, ",
            $batch,
            ", ",
            $seq,
            ", {now} FROM json_to_recordset(",
            $set,
            "::json) AS r(",
            $fields,
            "k text, d json, c text) ",
            take_newer!()
        )
    };
    (Sqlite, $set:literal, $client:literal, $batch:literal, $seq:literal) => {
        concat!(
            "INSERT INTO records \
               (client_id, record_key, data, checksum, batch_id, accepted_seq, updated_at) \
             SELECT ",
            $client,
            ", value ->> 'k', value -> 'd', value ->> 'c', ",
            $batch,
            ", ",
            $seq,
            ", {now} FROM jsonb_each(jsonb(",
            $set,
            ")) WHERE true ",
            take_newer!()
        )
    };
}

impl Db {
    /// Writes chunks inside `tx` (a batch's chunk, or the chunks of a bundle): their row
    /// errors, their records, and the changes they made in their clients' feeds, the feed
    /// after every record ([`Db::append_change_groups`]). What each did, with the numbers
    /// its changes took.
    pub(super) async fn write_chunks(
        &self,
        tx: &mut Tx,
        chunks: &[(&Lease, &Chunk)],
    ) -> Result<Vec<ChunkResult>> {
        for (lease, chunk) in chunks {
            self.write_errors(tx, lease, &chunk.errors).await?;
        }
        match (self.dialect, chunks) {
            (Dialect::Postgres, [(lease, chunk)]) => {
                return Ok(vec![self.write_chunk_and_feed(tx, lease, chunk).await?]);
            }
            (Dialect::Sqlite, [(lease, chunk)]) => {
                let (touched, written) = self.upsert_chunk(tx, lease, &chunk.records).await?;
                let mut result = self
                    .chunk_result(tx, lease, chunk, touched, written.len() as u64)
                    .await?;
                result.changes = self.append_chunk_feed(tx, lease, written).await?;
                return Ok(vec![result]);
            }
            _ => {}
        }
        let upserted = self.upsert_records(tx, chunks).await?;
        let mut results = Vec::with_capacity(chunks.len());
        let mut wrote = Vec::with_capacity(chunks.len());
        for ((lease, chunk), (touched, written)) in chunks.iter().zip(upserted) {
            results.push(
                self.chunk_result(tx, lease, chunk, touched, written.len() as u64)
                    .await?,
            );
            wrote.push(Wrote {
                lease,
                records: &chunk.records,
                written,
            });
        }
        let ranges = self.append_written(tx, &wrote).await?;
        for (result, range) in results.iter_mut().zip(ranges) {
            result.changes = range;
        }
        Ok(results)
    }

    /// [`Db::write_chunks`] for one chunk on PostgreSQL, in one statement: the upsert, then
    /// the feed, whose entries take the values the upsert returns. A chunk's records cross
    /// the connection and are parsed once, and only the counts come back. The counter is
    /// still taken after every record was written: its input is the count of what the
    /// upsert wrote, so the upsert runs to its end first.
    async fn write_chunk_and_feed(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        chunk: &Chunk,
    ) -> Result<ChunkResult> {
        let sql = self.sql(concat!(
            "WITH up AS (",
            upsert_records!(Postgres, "$3", "$1", "$2", "$4", ""),
            ", data), \
             wrote AS (SELECT record_key, version, data, \
                    ROW_NUMBER() OVER (ORDER BY record_key) AS n, COUNT(*) OVER () AS total \
                FROM up WHERE batch_id = $2), \
             counter AS (INSERT INTO change_counters (client_id, last, records) \
                SELECT $1, COUNT(*), COUNT(*) FILTER (WHERE version = 1) FROM wrote \
                HAVING COUNT(*) > 0 \
                ON CONFLICT (client_id) DO UPDATE SET last = change_counters.last + excluded.last, \
                    records = change_counters.records + excluded.records \
                RETURNING last), \
             feed AS (INSERT INTO record_changes \
                    (client_id, seq, record_key, kind, batch_id, data, changed_at) \
                SELECT $1, counter.last - wrote.total + wrote.n, wrote.record_key, \
                    CASE WHEN wrote.version = 1 THEN $5 ELSE $6 END, $2, wrote.data, {now} \
                FROM wrote, counter) \
             SELECT (SELECT COUNT(*) FROM up) AS touched, (SELECT COUNT(*) FROM wrote) AS written, \
                 (SELECT last FROM counter) AS last"
        ));
        let row = sqlx::query(sql)
            .bind(lease.client_id.as_str())
            .bind(lease.batch_id.as_str())
            .bind(serde_json::to_string(&chunk.records).unwrap_or_default())
            .bind(lease.accepted_seq)
            .bind(RecordChangeKind::Inserted.as_str())
            .bind(RecordChangeKind::Updated.as_str())
            .fetch_one(&mut **tx)
            .await?;
        let touched = count(row.try_get("touched")?);
        let written = count(row.try_get("written")?);
        let mut result = self
            .chunk_result(tx, lease, chunk, touched, written)
            .await?;
        let last: Option<i64> = row.try_get("last")?;
        result.changes = last.map(|last| (last - written as i64 + 1, last));
        Ok(result)
    }

    /// What a chunk did, from how many of its records its upsert touched (inserted or
    /// updated) and of those wrote (inserted, or changed the values of).
    async fn chunk_result(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        chunk: &Chunk,
        touched: u64,
        written: u64,
    ) -> Result<ChunkResult> {
        let records = chunk.records.len() as u64;
        let mut result = ChunkResult {
            written,
            unchanged: chunk.replaced,
            ..ChunkResult::default()
        };
        // Left alone: held by a newer import, or by an earlier chunk of this batch with the
        // same values. Only the first needs a look (rows the upsert locked).
        if touched < records {
            result.superseded = self.count_newer(tx, lease, &chunk.records).await?;
        }
        result.unchanged += records - written - result.superseded;
        Ok(result)
    }

    /// Row errors inside `tx`.
    pub(super) async fn write_errors<'a>(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        errors: impl IntoIterator<Item = &'a RowError>,
    ) -> Result<()> {
        let template = match self.dialect {
            Dialect::Postgres => {
                "INSERT INTO record_errors (batch_id, line, position, field, code, detail, value) \
                 SELECT $1, r.line, r.position, r.field, r.code, r.detail, r.value \
                 FROM json_to_recordset($2::json) \
                   AS r(line bigint, position integer, field text, code text, detail text, value text) \
                 ON CONFLICT (batch_id, line, position) DO NOTHING"
            }
            Dialect::Sqlite => {
                "INSERT INTO record_errors (batch_id, line, position, field, code, detail, value) \
                 SELECT $1, value ->> 'line', value ->> 'position', value ->> 'field', \
                        value ->> 'code', value ->> 'detail', value ->> 'value' \
                 FROM jsonb_each(jsonb($2)) WHERE true \
                 ON CONFLICT (batch_id, line, position) DO NOTHING"
            }
        };
        // Bounded pages: a refused batch writes every error of its file at once.
        let errors: Vec<&RowError> = errors.into_iter().collect();
        for page in errors.chunks(10_000) {
            sqlx::query(self.sql(template))
                .bind(lease.batch_id.as_str())
                .bind(serde_json::to_string(page).unwrap_or_default())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Upserts the chunks' records under [`take_newer!`]: for each chunk, how many it
    /// inserted or updated, and of those the ones it wrote (inserted, or changed the values
    /// of), by key with their new version.
    ///
    /// The rows are locked in one key order for the whole transaction, so that writers
    /// that share keys never wait on each other in a circle (PostgreSQL would abort one):
    /// the first statement writes every key once, in key order, each with the first chunk
    /// that has it; a key that more chunks have is written again by the next statements, in
    /// the chunks' order, on rows the transaction already holds. One chunk's records, each
    /// key once, are one statement ([`Db::upsert_chunk`]; on PostgreSQL the feed's too,
    /// [`Db::write_chunk_and_feed`]).
    ///
    /// An unchanged record is updated too when this import is the newer: it takes this
    /// import's number, so that an import older than both, run later, cannot bring its
    /// own values back. The price is a row write per unchanged record of a newer import.
    async fn upsert_records(
        &self,
        tx: &mut Tx,
        chunks: &[(&Lease, &Chunk)],
    ) -> Result<Vec<(u64, Vec<(String, i64)>)>> {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            cl: &'a str,
            b: &'a str,
            s: i64,
            k: &'a str,
            d: &'a serde_json::value::RawValue,
            c: &'a str,
        }
        // Each record's round: how many chunks before its own have its key.
        let mut rounds: Vec<Vec<(&str, usize, &RecordRow)>> = Vec::new();
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (at, (_, chunk)) in chunks.iter().enumerate() {
            for record in &chunk.records {
                let round = seen.entry(record.key.as_str()).or_insert(0);
                if rounds.len() <= *round {
                    rounds.push(Vec::new());
                }
                rounds[*round].push((record.key.as_str(), at, record));
                *round += 1;
            }
        }
        let template = match self.dialect {
            Dialect::Postgres => upsert_records!(
                Postgres,
                "$1",
                "r.cl",
                "r.b",
                "r.s",
                "cl text, b text, s bigint, "
            ),
            Dialect::Sqlite => upsert_records!(
                Sqlite,
                "$1",
                "value ->> 'cl'",
                "value ->> 'b'",
                "value ->> 's'"
            ),
        };
        let mut out: Vec<(u64, Vec<(String, i64)>)> = vec![(0, Vec::new()); chunks.len()];
        for mut round in rounds {
            round.sort_unstable_by_key(|(key, _, _)| *key);
            let rows: Vec<Row<'_>> = round
                .iter()
                .map(|(key, at, record)| {
                    let lease = chunks[*at].0;
                    Row {
                        cl: lease.client_id.as_str(),
                        b: lease.batch_id.as_str(),
                        s: lease.accepted_seq,
                        k: key,
                        d: &record.data,
                        c: &record.checksum,
                    }
                })
                .collect();
            let touched = sqlx::query(self.sql(template))
                .bind(serde_json::to_string(&rows).unwrap_or_default())
                .fetch_all(&mut **tx)
                .await?;
            // A round has each key once: the key tells whose row it was.
            let whose: std::collections::HashMap<&str, usize> =
                round.iter().map(|(key, at, _)| (*key, *at)).collect();
            for row in &touched {
                let key: String = row.try_get("record_key")?;
                let Some(&at) = whose.get(key.as_str()) else {
                    continue;
                };
                let (touched, written) = &mut out[at];
                *touched += 1;
                if row.try_get::<String, _>("batch_id")? == chunks[at].0.batch_id.as_str() {
                    written.push((key, row.try_get("version")?));
                }
            }
        }
        Ok(out)
    }

    /// [`Db::upsert_records`] for one chunk on SQLite, whose keys are distinct and sorted:
    /// one statement, with the client, the batch and its number as parameters (read from
    /// every row instead, they cost a large file's ingest on SQLite a sixth of its rate).
    async fn upsert_chunk(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        records: &[RecordRow],
    ) -> Result<(u64, Vec<(String, i64)>)> {
        let sql = self.sql(upsert_records!(Sqlite, "$3", "$1", "$2", "$4"));
        let touched = sqlx::query(sql)
            .bind(lease.client_id.as_str())
            .bind(lease.batch_id.as_str())
            .bind(serde_json::to_string(records).unwrap_or_default())
            .bind(lease.accepted_seq)
            .fetch_all(&mut **tx)
            .await?;
        let mut written = Vec::new();
        for row in &touched {
            if row.try_get::<String, _>("batch_id")? == lease.batch_id.as_str() {
                written.push((row.try_get("record_key")?, row.try_get("version")?));
            }
        }
        Ok((touched.len() as u64, written))
    }

    /// [`Db::append_written`] for one chunk on SQLite, whose keys are distinct: each row the
    /// upsert wrote holds this chunk's values, so the feed's entries take theirs from the
    /// rows, and only the keys cross the connection again (a record's JSON is read once,
    /// by the upsert). The numbers the changes took, first and last.
    async fn append_chunk_feed(
        &self,
        tx: &mut Tx,
        lease: &Lease,
        mut written: Vec<(String, i64)>,
    ) -> Result<Option<(i64, i64)>> {
        if written.is_empty() {
            return Ok(None);
        }
        written.sort_unstable();
        let n = written.len() as i64;
        let inserted = written.iter().filter(|(_, version)| *version == 1).count() as i64;
        let last = take_change_numbers(tx, &lease.client_id, n, inserted).await?;
        let keys: Vec<&str> = written.iter().map(|(key, _)| key.as_str()).collect();
        // Numbered in key order, as `append_written` does; CROSS JOIN keeps the keys the
        // outer loop, so each finds its row by the primary key.
        let sql = self.sql(
            "INSERT INTO record_changes \
               (client_id, seq, record_key, kind, batch_id, data, changed_at) \
             SELECT $1, $3 + k.key, r.record_key, \
                 CASE WHEN r.version = 1 THEN $4 ELSE $5 END, $2, r.data, {now} \
             FROM json_each($6) AS k CROSS JOIN records AS r \
                 ON r.client_id = $1 AND r.record_key = k.value",
        );
        let first = last - n + 1;
        sqlx::query(sql)
            .bind(lease.client_id.as_str())
            .bind(lease.batch_id.as_str())
            .bind(first)
            .bind(RecordChangeKind::Inserted.as_str())
            .bind(RecordChangeKind::Updated.as_str())
            .bind(serde_json::to_string(&keys).unwrap_or_default())
            .execute(&mut **tx)
            .await?;
        Ok(Some((first, last)))
    }

    /// Appends the changes chunks made (`written`: by key with their versions, among the
    /// chunk's `records`) to their clients' feeds, after every record of the transaction
    /// was written; the numbers each took, first and last.
    async fn append_written(
        &self,
        tx: &mut Tx,
        written: &[Wrote<'_>],
    ) -> Result<Vec<Option<(i64, i64)>>> {
        let changes: Vec<Vec<NewChange<'_>>> = written
            .iter()
            .map(
                |Wrote {
                     records, written, ..
                 }| {
                    let mut keys: Vec<&(String, i64)> = written.iter().collect();
                    keys.sort_unstable();
                    keys.into_iter()
                        .filter_map(|(key, version)| {
                            // `records` is sorted by key: the chunk's distinct keys in lock order.
                            let at = records.binary_search_by(|r| r.key.as_str().cmp(key)).ok()?;
                            Some(NewChange {
                                key,
                                kind: if *version == 1 {
                                    RecordChangeKind::Inserted
                                } else {
                                    RecordChangeKind::Updated
                                },
                                data: Some(&records[at].data),
                            })
                        })
                        .collect()
                },
            )
            .collect();
        let groups: Vec<ChangeGroup<'_>> = written
            .iter()
            .zip(&changes)
            .map(|(Wrote { lease, .. }, changes)| ChangeGroup {
                client: &lease.client_id,
                batch: Some(&lease.batch_id),
                changes,
            })
            .collect();
        self.append_change_groups(tx, &groups).await
    }

    /// How many of `records` a later accepted import holds.
    async fn count_newer(&self, tx: &mut Tx, lease: &Lease, records: &[RecordRow]) -> Result<u64> {
        let sql = self.sql(match self.dialect {
            Dialect::Postgres => {
                "SELECT COUNT(*) FROM records WHERE client_id = $1 AND accepted_seq > $2 \
                 AND record_key IN (SELECT json_array_elements_text($3::json))"
            }
            Dialect::Sqlite => {
                "SELECT COUNT(*) FROM records WHERE client_id = $1 AND accepted_seq > $2 \
                 AND record_key IN (SELECT value FROM json_each($3))"
            }
        });
        let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
        let newer: i64 = sqlx::query_scalar(sql)
            .bind(lease.client_id.as_str())
            .bind(lease.accepted_seq)
            .bind(serde_json::to_string(&keys).unwrap_or_default())
            .fetch_one(&mut **tx)
            .await?;
        Ok(count(newer))
    }
}

/// What one chunk's records did, for the feed ([`Db::append_written`]).
struct Wrote<'a> {
    lease: &'a Lease,
    /// The chunk's records, sorted by key.
    records: &'a [RecordRow],
    /// Those it wrote (inserted, or changed), by key with their new version.
    written: Vec<(String, i64)>,
}
