//! Dashboard sessions: created by a login with the operator token, renewed by every
//! request (a sliding TTL), destroyed by logout.
//!
//! The browser holds a random token; the store keys the session by the token's SHA-256,
//! so a copy of the store (a Redis dump, a database backup) cannot be replayed as a
//! cookie. With Redis a session is one key with a TTL (`ui:session:<digest>`), renewed by
//! `GETEX`; without it a `ui_sessions` row judged by the ledger's clock, renewed by the
//! same statement that reads it. Sessions do not fall back from Redis to SQL: a session
//! store that is down refuses dashboard requests (503), and the bearer-token `/admin` API
//! stays available.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::domain::keys;
use crate::ledger::Db;
use crate::redis::Redis;
use crate::{Error, Result};

/// What a session knows about its operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The name the operator gave at login (the action log records it).
    pub operator: String,
    /// The synchronizer token every form of this session must send back.
    pub csrf: String,
    /// Where the login came from.
    pub ip: String,
    pub created_at_ms: i64,
    /// A short, public name of this session for the action log: the start of its digest.
    #[serde(skip)]
    pub label: String,
}

pub enum SessionStore {
    Redis(Box<Redis>),
    Sql(Db),
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn label(digest: &str) -> String {
    digest[..12].to_owned()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SessionStore {
    /// A new session for `operator`; returns the token for the cookie and the session.
    pub async fn create(
        &self,
        operator: &str,
        ip: &str,
        ttl: Duration,
    ) -> Result<(String, Session)> {
        let token = keys::random_token();
        let id = digest(&token);
        let mut session = Session {
            operator: operator.to_owned(),
            csrf: keys::random_token(),
            ip: ip.to_owned(),
            created_at_ms: dataflow_contracts::time::now_ms(),
            label: label(&id),
        };
        match self {
            SessionStore::Redis(r) => {
                let json = serde_json::to_string(&session)
                    .map_err(|e| Error::internal("serializing a session", e))?;
                redis::cmd("SET")
                    .arg(r.key(&["ui", "session", &id]))
                    .arg(json)
                    .arg("PX")
                    .arg(ms(ttl))
                    .query_async::<()>(&mut r.conn())
                    .await?;
            }
            SessionStore::Sql(db) => {
                // Expired rows go when someone logs in: the table stays as small as the
                // sessions alive, without a sweeper.
                sqlx::query(db.sql("DELETE FROM ui_sessions WHERE expires_at < {now}"))
                    .execute(&mut *db.writer().await?)
                    .await?;
                let row = sqlx::query(db.sql(
                    "INSERT INTO ui_sessions (id, operator, csrf, ip, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, {now}, {now} + $5) RETURNING created_at",
                ))
                .bind(&id)
                .bind(&session.operator)
                .bind(&session.csrf)
                .bind(&session.ip)
                .bind(ms(ttl))
                .fetch_one(&mut *db.writer().await?)
                .await?;
                session.created_at_ms = row.try_get("created_at")?;
            }
        }
        Ok((token, session))
    }

    /// The live session of `token`, `None` when it expired or never was. `renew`: start
    /// its TTL again (a request from its operator); `None` only looks (a heartbeat of an
    /// open page, which must not keep an idle session alive).
    pub async fn find(&self, token: &str, renew: Option<Duration>) -> Result<Option<Session>> {
        let id = digest(token);
        let found = match self {
            SessionStore::Redis(r) => {
                let key = r.key(&["ui", "session", &id]);
                let cmd = match renew {
                    Some(ttl) => {
                        let mut c = redis::cmd("GETEX");
                        c.arg(&key).arg("PX").arg(ms(ttl));
                        c
                    }
                    None => {
                        let mut c = redis::cmd("GET");
                        c.arg(&key);
                        c
                    }
                };
                let json: Option<String> = cmd.query_async(&mut r.conn()).await?;
                json.and_then(|j| serde_json::from_str::<Session>(&j).ok())
            }
            SessionStore::Sql(db) => {
                let query = match renew {
                    Some(ttl) => sqlx::query(db.sql(
                        "UPDATE ui_sessions SET expires_at = {now} + $2 \
                         WHERE id = $1 AND expires_at > {now} \
                         RETURNING operator, csrf, ip, created_at",
                    ))
                    .bind(&id)
                    .bind(ms(ttl)),
                    None => sqlx::query(db.sql(
                        "SELECT operator, csrf, ip, created_at FROM ui_sessions \
                         WHERE id = $1 AND expires_at > {now}",
                    ))
                    .bind(&id),
                };
                let row = match renew {
                    Some(_) => query.fetch_optional(&mut *db.writer().await?).await?,
                    None => query.fetch_optional(db.pool()).await?,
                };
                match row {
                    Some(r) => Some(Session {
                        operator: r.try_get("operator")?,
                        csrf: r.try_get("csrf")?,
                        ip: r.try_get("ip")?,
                        created_at_ms: r.try_get("created_at")?,
                        label: String::new(),
                    }),
                    None => None,
                }
            }
        };
        Ok(found.map(|s| Session {
            label: label(&id),
            ..s
        }))
    }

    /// Ends the session of `token` (nothing happens when there is none).
    pub async fn destroy(&self, token: &str) -> Result<()> {
        let id = digest(token);
        match self {
            SessionStore::Redis(r) => {
                redis::cmd("DEL")
                    .arg(r.key(&["ui", "session", &id]))
                    .query_async::<()>(&mut r.conn())
                    .await?;
            }
            SessionStore::Sql(db) => {
                sqlx::query("DELETE FROM ui_sessions WHERE id = $1")
                    .bind(&id)
                    .execute(&mut *db.writer().await?)
                    .await?;
            }
        }
        Ok(())
    }
}
