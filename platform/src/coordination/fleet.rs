//! The worker fleet registry: every worker process announces itself (host, pid, version,
//! load) with a heartbeat that expires, so a stopped process leaves at once and a dead one
//! within [`MEMBER_TTL`]. An operator can ask one to drain: it stops taking work, finishes
//! or hands back what it holds, leaves and exits.
//!
//! With Redis the entries are keys with a TTL (`{fleet}:worker:<id>`, `{fleet}:drain:<id>`,
//! and the `{fleet}:members` index, itself expiring when no worker beats; one hash tag, so a
//! Redis Cluster keeps them in one slot for the scripts and pipelines that use them
//! together); without it a `fleet_workers` table in the ledger, judged by the ledger's clock.

use std::time::Duration;

use dataflow_contracts::http::WorkerInfo;
use redis::Script;
use sqlx::Row;

use crate::ledger::Db;
use crate::redis::{Redis, tag};
use crate::{Error, Result};

/// How often a member beats; three missed beats and it is gone.
pub const BEAT: Duration = Duration::from_secs(2);
pub const MEMBER_TTL: Duration = Duration::from_secs(6);
/// A drain request lapses if its worker never sees it (it died first).
const DRAIN_TTL: Duration = Duration::from_secs(3600);

/// KEYS: members, worker entry. ARGV: id, info JSON, TTL ms. Redis clock, so hosts with
/// skewed clocks agree on who expired.
const BEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 10)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
";

/// KEYS: members. Drops expired members, returns the live ids.
const LIVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

pub enum Fleet {
    Redis(Box<Redis>),
    Sql(Db),
}

/// A fleet key: `<prefix>:{fleet}:<parts>`.
fn fleet_key(r: &Redis, parts: &[&str]) -> String {
    let tag = tag(&["fleet"]);
    let mut all = vec![tag.as_str()];
    all.extend_from_slice(parts);
    r.key(&all)
}

impl Fleet {
    fn ttl_ms() -> i64 {
        i64::try_from(MEMBER_TTL.as_millis()).unwrap_or(i64::MAX)
    }

    /// Announces (or renews) `w`.
    pub async fn beat(&self, w: &WorkerInfo) -> Result<()> {
        let info = serde_json::to_string(w)
            .map_err(|e| Error::internal("serializing a worker's entry", e))?;
        match self {
            Fleet::Redis(r) => {
                Script::new(BEAT_SCRIPT)
                    .key(fleet_key(r, &["members"]))
                    .key(fleet_key(r, &["worker", &w.id]))
                    .arg(&w.id)
                    .arg(info)
                    .arg(Self::ttl_ms())
                    .invoke_async::<()>(&mut r.conn())
                    .await?;
            }
            Fleet::Sql(db) => {
                let sql = db.sql(
                    "INSERT INTO fleet_workers (id, info, expires_at) VALUES ($1, $2, {now} + $3) \
                     ON CONFLICT (id) DO UPDATE SET info = excluded.info, \
                         expires_at = excluded.expires_at",
                );
                sqlx::query(sql)
                    .bind(&w.id)
                    .bind(info)
                    .bind(Self::ttl_ms())
                    .execute(&mut *db.writer().await?)
                    .await?;
            }
        }
        Ok(())
    }

    /// Live workers, by id; `draining` set for those asked to drain.
    pub async fn list(&self) -> Result<Vec<WorkerInfo>> {
        let mut workers: Vec<WorkerInfo> = match self {
            Fleet::Redis(r) => {
                let ids: Vec<String> = Script::new(LIVE_SCRIPT)
                    .key(fleet_key(r, &["members"]))
                    .invoke_async(&mut r.conn())
                    .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.get(fleet_key(r, &["worker", id]));
                    pipe.exists(fleet_key(r, &["drain", id]));
                }
                let got: Vec<(Option<String>, bool)> = pipe.query_async(&mut r.conn()).await?;
                got.into_iter()
                    .filter_map(|(info, drain)| Some((serde_json::from_str(&info?).ok()?, drain)))
                    .map(|(mut w, drain): (WorkerInfo, bool)| {
                        w.draining |= drain;
                        w
                    })
                    .collect()
            }
            Fleet::Sql(db) => {
                sqlx::query(db.sql("DELETE FROM fleet_workers WHERE expires_at < {now} - 60000"))
                    .execute(&mut *db.writer().await?)
                    .await?;
                let rows = sqlx::query(db.sql(
                    "SELECT info, drain_requested FROM fleet_workers WHERE expires_at > {now}",
                ))
                .fetch_all(db.pool())
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let info: String = row.try_get("info")?;
                    let drain: i64 = row.try_get("drain_requested")?;
                    if let Ok(mut w) = serde_json::from_str::<WorkerInfo>(&info) {
                        w.draining |= drain != 0;
                        out.push(w);
                    }
                }
                out
            }
        };
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }

    /// Asks `id` to drain; false when no such worker is alive.
    pub async fn request_drain(&self, id: &str) -> Result<bool> {
        if !self.list().await?.iter().any(|w| w.id == id) {
            return Ok(false);
        }
        match self {
            Fleet::Redis(r) => {
                redis::cmd("SET")
                    .arg(fleet_key(r, &["drain", id]))
                    .arg(1)
                    .arg("PX")
                    .arg(u64::try_from(DRAIN_TTL.as_millis()).unwrap_or(u64::MAX))
                    .query_async::<()>(&mut r.conn())
                    .await?;
            }
            Fleet::Sql(db) => {
                sqlx::query("UPDATE fleet_workers SET drain_requested = 1 WHERE id = $1")
                    .bind(id)
                    .execute(&mut *db.writer().await?)
                    .await?;
            }
        }
        Ok(true)
    }

    /// Whether an operator asked `id` to drain.
    pub async fn drain_requested(&self, id: &str) -> Result<bool> {
        match self {
            Fleet::Redis(r) => Ok(redis::cmd("EXISTS")
                .arg(fleet_key(r, &["drain", id]))
                .query_async(&mut r.conn())
                .await?),
            Fleet::Sql(db) => {
                let drain: Option<i64> =
                    sqlx::query_scalar("SELECT drain_requested FROM fleet_workers WHERE id = $1")
                        .bind(id)
                        .fetch_optional(db.pool())
                        .await?;
                Ok(drain.unwrap_or(0) != 0)
            }
        }
    }

    /// Removes `id` at once (a clean stop), with its drain request.
    pub async fn leave(&self, id: &str) -> Result<()> {
        match self {
            Fleet::Redis(r) => {
                let mut pipe = redis::pipe();
                pipe.zrem(fleet_key(r, &["members"]), id)
                    .del(fleet_key(r, &["worker", id]))
                    .del(fleet_key(r, &["drain", id]));
                pipe.query_async::<()>(&mut r.conn()).await?;
            }
            Fleet::Sql(db) => {
                sqlx::query("DELETE FROM fleet_workers WHERE id = $1")
                    .bind(id)
                    .execute(&mut *db.writer().await?)
                    .await?;
            }
        }
        Ok(())
    }
}
