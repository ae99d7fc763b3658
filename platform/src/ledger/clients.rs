//! Tenants, their API keys and their policies.

use dataflow_contracts::http::{ClientView, KeyView};
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{ClientId, Policy};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Db, count, flag};
use crate::domain::compiled::CompiledSchemas;
use crate::domain::schema::Schema;
use crate::{Error, Result};

/// What authentication needs to know about a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub client_id: ClientId,
    pub secret_hmac: Vec<u8>,
    pub revoked: bool,
}

/// A client as the request path sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRecord {
    pub id: ClientId,
    pub name: String,
    pub active: bool,
    pub policy: Policy,
    pub created_at: i64,
    /// The schema new imports are checked with, if the client has one. (A default, so that
    /// copies cached before schemas existed still read.)
    #[serde(default)]
    pub schema: Option<StoredSchema>,
}

/// One version of a client's schema as stored: the document as it was set. (Shared, not
/// copied: every request of the client carries it.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSchema {
    pub version: u64,
    pub document: Arc<str>,
}

impl StoredSchema {
    /// The version a row names with its document; a version without one is a fault.
    pub(super) fn from_columns(
        version: Option<i64>,
        document: Option<String>,
    ) -> Result<Option<StoredSchema>> {
        match (version, document) {
            (Some(version), Some(document)) => Ok(Some(StoredSchema {
                version: count(version),
                document: document.into(),
            })),
            (Some(version), None) => Err(Error::stored(format!(
                "schema version {version} is not stored"
            ))),
            (None, _) => Ok(None),
        }
    }

    /// Compiled (once per process, through `memo`); a stored version that does not compile
    /// any more is a fault of the ledger, not of the caller.
    pub fn compiled(&self, client: &ClientId, memo: &CompiledSchemas) -> Result<Arc<Schema>> {
        memo.get(client, self.version, &self.document)
            .map_err(|e| Error::stored(format!("schema version {}: {e}", self.version)))
    }
}

impl ClientRecord {
    pub fn view(&self) -> ClientView {
        ClientView {
            id: self.id.clone(),
            name: self.name.clone(),
            active: self.active,
            created_at: rfc3339(self.created_at),
            policy: self.policy.clone(),
            schema_version: self.schema.as_ref().map(|s| s.version),
        }
    }
}

/// A client's columns, with its current schema's document beside its version.
pub(super) const CLIENT_COLUMNS: &str = "id, name, active, policy, created_at, schema_version, \
     (SELECT document FROM client_schemas s \
      WHERE s.client_id = clients.id AND s.version = clients.schema_version) AS schema_document";

/// A client's row as the ledger returns it, before its values are parsed.
#[derive(sqlx::FromRow)]
pub(super) struct ClientColumns {
    id: String,
    name: String,
    active: i64,
    policy: String,
    created_at: i64,
    schema_version: Option<i64>,
    schema_document: Option<String>,
}

impl ClientColumns {
    pub(super) fn parse(self) -> Result<ClientRecord> {
        Ok(ClientRecord {
            id: parse_id(self.id)?,
            name: self.name,
            active: flag(self.active),
            policy: parse_policy(&self.policy)?,
            created_at: self.created_at,
            schema: StoredSchema::from_columns(self.schema_version, self.schema_document)?,
        })
    }
}

/// A policy as the ledger stores it (JSON, in `clients` and with each batch).
pub(crate) fn parse_policy(json: &str) -> Result<Policy> {
    serde_json::from_str(json).map_err(|e| Error::internal("a stored policy is unreadable", e))
}

pub(crate) fn parse_id<T: std::str::FromStr>(s: String) -> Result<T> {
    s.parse()
        .map_err(|_| Error::stored(format!("the id `{s}` is malformed")))
}

fn policy_json(policy: &Policy) -> String {
    serde_json::to_string(policy).unwrap_or_default()
}

impl Db {
    pub async fn create_client(&self, name: &str, policy: &Policy) -> Result<ClientRecord> {
        // The length is counted before the trim: the limit is the one the caller's string
        // is held to (and the OpenAPI document states).
        let trimmed = name.trim();
        if trimmed.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "name must be 1 to 200 characters without control characters".into(),
            ));
        }
        let name = trimmed;
        policy.validate().map_err(Error::Invalid)?;
        let id = ClientId::generate();
        let sql = self.sql(&format!(
            "INSERT INTO clients (id, name, active, policy, claim_weight, max_concurrent_batches, \
                                  created_at, updated_at) \
             VALUES ($1, $2, 1, $3, $4, $5, {{now}}, {{now}}) RETURNING {CLIENT_COLUMNS}"
        ));
        let row = sqlx::query_as::<_, ClientColumns>(sql)
            .bind(id.as_str())
            .bind(name)
            .bind(policy_json(policy))
            .bind(i64::from(policy.weight))
            .bind(policy.max_concurrent_batches.map(i64::from))
            .fetch_one(&mut *self.writer().await?)
            .await?;
        row.parse()
    }

    pub async fn get_client(&self, id: &ClientId) -> Result<Option<ClientRecord>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"
        ));
        let row = sqlx::query_as::<_, ClientColumns>(sql)
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await?;
        row.map(ClientColumns::parse).transpose()
    }

    pub async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {CLIENT_COLUMNS} FROM clients ORDER BY id"));
        let rows = sqlx::query_as::<_, ClientColumns>(sql)
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(ClientColumns::parse).collect()
    }

    pub async fn set_client_active(&self, id: &ClientId, active: bool) -> Result<ClientRecord> {
        let sql = self.sql(&format!(
            "UPDATE clients SET active = $2, updated_at = {{now}} WHERE id = $1 \
             RETURNING {CLIENT_COLUMNS}"
        ));
        let row = sqlx::query_as::<_, ClientColumns>(sql)
            .bind(id.as_str())
            .bind(i64::from(active))
            .fetch_optional(&mut *self.writer().await?)
            .await?
            .ok_or(Error::NotFound)?;
        row.parse()
    }

    pub async fn set_policy(&self, id: &ClientId, policy: &Policy) -> Result<ClientRecord> {
        policy.validate().map_err(Error::Invalid)?;
        // A new key field must still name the records of the client's schema.
        if let Some(current) = self.get_client(id).await?.and_then(|c| c.schema) {
            super::schemas::check_keyed(&super::schemas::parse(&current.document)?, policy)?;
        }
        let sql = self.sql(&format!(
            "UPDATE clients SET policy = $2, claim_weight = $3, max_concurrent_batches = $4, \
                 updated_at = {{now}} WHERE id = $1 \
             RETURNING {CLIENT_COLUMNS}"
        ));
        let row = sqlx::query_as::<_, ClientColumns>(sql)
            .bind(id.as_str())
            .bind(policy_json(policy))
            .bind(i64::from(policy.weight))
            .bind(policy.max_concurrent_batches.map(i64::from))
            .fetch_optional(&mut *self.writer().await?)
            .await?
            .ok_or(Error::NotFound)?;
        row.parse()
    }

    pub async fn create_key(
        &self,
        client: &ClientId,
        key_id: &str,
        secret_hmac: &[u8],
        label: Option<&str>,
    ) -> Result<()> {
        if self.get_client(client).await?.is_none() {
            return Err(Error::NotFound);
        }
        let sql = self.sql(
            "INSERT INTO api_keys (key_id, client_id, secret_hmac, label, created_at) \
             VALUES ($1, $2, $3, $4, {now})",
        );
        sqlx::query(sql)
            .bind(key_id)
            .bind(client.as_str())
            .bind(secret_hmac.to_vec())
            .bind(label)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    pub async fn get_key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(
            "SELECT key_id, client_id, secret_hmac, revoked_at FROM api_keys WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(KeyRecord {
                key_id: r.try_get("key_id")?,
                client_id: parse_id(r.try_get("client_id")?)?,
                secret_hmac: r.try_get("secret_hmac")?,
                revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
            })
        })
        .transpose()
    }

    pub async fn list_keys(&self, client: &ClientId) -> Result<Vec<KeyView>> {
        let rows = sqlx::query(
            "SELECT key_id, client_id, label, created_at, revoked_at, last_used_at \
             FROM api_keys WHERE client_id = $1 ORDER BY created_at, key_id",
        )
        .bind(client.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyView {
                    key_id: r.try_get("key_id")?,
                    client_id: parse_id(r.try_get("client_id")?)?,
                    label: r.try_get("label")?,
                    created_at: rfc3339(r.try_get("created_at")?),
                    revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(rfc3339),
                    last_used_at: r.try_get::<Option<i64>, _>("last_used_at")?.map(rfc3339),
                })
            })
            .collect()
    }

    /// Revokes a key; returns the owning client. Revoking twice keeps the first time.
    pub async fn revoke_key(&self, key_id: &str) -> Result<ClientId> {
        let sql = self.sql(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {now}) WHERE key_id = $1 \
             RETURNING client_id",
        );
        let client: String = sqlx::query_scalar(sql)
            .bind(key_id)
            .fetch_optional(&mut *self.writer().await?)
            .await?
            .ok_or(Error::NotFound)?;
        parse_id(client)
    }

    pub async fn touch_key(&self, key_id: &str) -> Result<()> {
        let sql = self.sql("UPDATE api_keys SET last_used_at = {now} WHERE key_id = $1");
        sqlx::query(sql)
            .bind(key_id)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }
}
