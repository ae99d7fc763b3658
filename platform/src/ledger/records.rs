//! Stored records: one by key, and the checksums and values a dry run compares against.

use std::collections::HashMap;

use dataflow_contracts::ClientId;
use dataflow_contracts::http::{RawJson, RecordView};
use dataflow_contracts::time::rfc3339;
use sqlx::Row;

use super::clients::parse_id;
use super::{Db, Dialect};
use crate::{Error, Result};

impl Db {
    /// One stored record of a client.
    pub async fn get_record(&self, client: &ClientId, key: &str) -> Result<Option<RecordView>> {
        let row = sqlx::query(
            "SELECT record_key, CAST(data AS TEXT) AS data, checksum, batch_id, updated_at \
             FROM records WHERE client_id = $1 AND record_key = $2",
        )
        .bind(client.as_str())
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            let data: String = r.try_get("data")?;
            Ok(RecordView {
                key: r.try_get("record_key")?,
                data: RawJson(
                    serde_json::value::RawValue::from_string(data)
                        .map_err(|e| Error::internal("a stored record is not JSON", e))?,
                ),
                checksum: r.try_get("checksum")?,
                batch_id: parse_id(r.try_get("batch_id")?)?,
                updated_at: rfc3339(r.try_get("updated_at")?),
            })
        })
        .transpose()
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
