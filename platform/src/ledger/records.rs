//! Stored records: one by key, listings and exports in key order, and the checksums and
//! values a dry run compares against.

use std::collections::HashMap;

use dataflow_contracts::http::{RawJson, RecordView};
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{BatchId, ClientId};
use sqlx::Row;

use super::clients::parse_id;
use super::{Db, Dialect};
use crate::{Error, Result};

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
                serde_json::value::RawValue::from_string(self.data)
                    .map_err(|e| Error::internal("a stored record is not JSON", e))?,
            ),
            checksum: self.checksum,
            batch_id: parse_id(self.batch_id)?,
            updated_at: rfc3339(self.updated_at),
        })
    }
}

impl Db {
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
        // A key range for the prefix: the keys that start with it sort from it up to it
        // followed by the greatest character (bytewise: the "C" collation, SQLite's BINARY).
        let upper = filter.key_prefix.as_ref().map(|p| format!("{p}\u{10FFFF}"));
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records \
             WHERE client_id = $1 AND ($2 IS NULL OR record_key > $2) \
               AND ($3 IS NULL OR record_key >= $3) AND ($4 IS NULL OR record_key < $4) \
               AND ($5 IS NULL OR updated_at >= $5) AND ($6 IS NULL OR batch_id = $6) \
             ORDER BY record_key LIMIT $7"
        ));
        let rows = sqlx::query_as::<_, RecordColumns>(sql)
            .bind(client.as_str())
            .bind(after)
            .bind(filter.key_prefix.as_deref())
            .bind(upper.as_deref())
            .bind(filter.updated_since_ms)
            .bind(filter.batch_id.as_ref().map(BatchId::as_str))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
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
