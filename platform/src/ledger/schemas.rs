//! Client schemas: every version kept, the current one named by `clients.schema_version`.
//! A batch records the version it is checked with when it is accepted (see `imports`), so
//! a schema changed while a batch waits or retries does not change how that batch reads.

use dataflow_contracts::http::SchemaView;
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{ClientId, Policy};

use super::clients::{CLIENT_COLUMNS, ClientColumns, ClientRecord, parse_policy};
use super::{Db, count};
use crate::domain::schema::{Schema, UnknownFields};
use crate::{Error, Result};

/// A schema document larger than this is not one anybody writes by hand or by tool.
pub const MAX_SCHEMA_BYTES: usize = 1024 * 1024;

/// A client's stored versions, each saying whether it is the current one.
const VERSIONS: &str = "SELECT s.version, s.document, s.created_at, \
     CAST(CASE WHEN c.schema_version = s.version THEN 1 ELSE 0 END AS BIGINT) AS current \
     FROM client_schemas s JOIN clients c ON c.id = s.client_id";

/// A stored version's row.
#[derive(sqlx::FromRow)]
struct SchemaColumns {
    version: i64,
    document: String,
    created_at: i64,
    current: i64,
}

impl SchemaColumns {
    fn view(self, client: &ClientId) -> Result<SchemaView> {
        Ok(SchemaView {
            client_id: client.clone(),
            version: count(self.version),
            current: self.current != 0,
            created_at: rfc3339(self.created_at),
            schema: serde_json::from_str(&self.document)
                .map_err(|e| Error::internal("a stored schema is not JSON", e))?,
        })
    }
}

/// Reads a schema document set for a client: one DataFlow can use, or a refusal naming the
/// property at fault.
pub fn parse(document: &str) -> Result<Schema> {
    if document.len() > MAX_SCHEMA_BYTES {
        return Err(Error::Invalid(format!(
            "schema: larger than {MAX_SCHEMA_BYTES} bytes"
        )));
    }
    Schema::parse(document).map_err(|e| Error::Invalid(e.to_string()))
}

/// Whether `schema` identifies records under `policy`: by its `primaryKey`, or by a field
/// named like the policy's key field (or a column of that name kept as it came).
pub fn check_keyed(schema: &Schema, policy: &Policy) -> Result<()> {
    let keyed = !schema.primary_key.is_empty()
        || schema.fields.iter().any(|f| f.name == policy.key_field)
        || schema.unknown_fields == UnknownFields::Keep;
    if !keyed {
        return Err(Error::Invalid(format!(
            "primaryKey: the schema names no primary key and has no field `{}` (the policy's \
             key_field), so its records could not be told apart; add \"primaryKey\"",
            policy.key_field
        )));
    }
    Ok(())
}

impl Db {
    /// Stores `document` as the next version of `client`'s schema and makes it current.
    pub async fn set_schema(&self, client: &ClientId, document: &str) -> Result<SchemaView> {
        // Compiled before the write transaction: its patterns take time, and on SQLite the
        // transaction holds the only write lock.
        let schema = parse(document)?;
        let mut tx = self.begin_write().await?;
        let set = async {
            // Locks the client's row, so that two changes at once take two versions.
            let policy: Option<String> = sqlx::query_scalar(
                self.sql("UPDATE clients SET updated_at = {now} WHERE id = $1 RETURNING policy"),
            )
            .bind(client.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let policy = parse_policy(&policy.ok_or(Error::NotFound)?)?;
            check_keyed(&schema, &policy)?;
            let row = sqlx::query_as::<_, SchemaColumns>(self.sql(
                "INSERT INTO client_schemas (client_id, version, document, created_at) \
                 SELECT $1, COALESCE(MAX(version), 0) + 1, $2, {now} \
                 FROM client_schemas WHERE client_id = $1 \
                 RETURNING version, document, created_at, CAST(1 AS BIGINT) AS current",
            ))
            .bind(client.as_str())
            .bind(document)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("UPDATE clients SET schema_version = $2 WHERE id = $1")
                .bind(client.as_str())
                .bind(row.version)
                .execute(&mut *tx)
                .await?;
            row.view(client)
        }
        .await;
        tx.end(set).await
    }

    /// New imports of `client` are no longer checked by a schema; its versions are kept
    /// (batches name them).
    pub async fn remove_schema(&self, client: &ClientId) -> Result<ClientRecord> {
        let sql = self.sql(&format!(
            "UPDATE clients SET schema_version = NULL, updated_at = {{now}} WHERE id = $1 \
             RETURNING {CLIENT_COLUMNS}"
        ));
        let row = sqlx::query_as::<_, ClientColumns>(sql)
            .bind(client.as_str())
            .fetch_optional(&mut *self.writer().await?)
            .await?
            .ok_or(Error::NotFound)?;
        row.parse()
    }

    /// Every version of `client`'s schema, newest first.
    pub async fn schema_versions(&self, client: &ClientId) -> Result<Vec<SchemaView>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{VERSIONS} WHERE s.client_id = $1 ORDER BY s.version DESC"
        ));
        let rows = sqlx::query_as::<_, SchemaColumns>(sql)
            .bind(client.as_str())
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(|r| r.view(client)).collect()
    }

    /// One version of `client`'s schema, the current one when `version` is `None`.
    pub async fn get_schema(
        &self,
        client: &ClientId,
        version: Option<u64>,
    ) -> Result<Option<SchemaView>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{VERSIONS} WHERE s.client_id = $1 AND s.version = COALESCE($2, c.schema_version)"
        ));
        let row = sqlx::query_as::<_, SchemaColumns>(sql)
            .bind(client.as_str())
            .bind(version.map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| r.view(client)).transpose()
    }
}
