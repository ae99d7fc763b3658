//! The checksum-dedup fast path: Redis `SET NX PX` on (client, payload checksum) before the
//! submit transaction. It only ever short-cuts to an answer SQL already gave (the id of a
//! committed import); every other case goes to the SQL transaction, whose primary key on
//! (client, checksum) stays the decider. So a Redis flush, an eviction or an outage can
//! cost speed, never correctness.

use std::time::Duration;

use dataflow_contracts::{ClientId, ImportId};

use crate::redis::Redis;

/// What the fast path knows about a payload before the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupClaim {
    /// First sighting: this request holds the claim (`token`) until it settles.
    Claimed { token: String },
    /// An import with this payload committed within the window.
    Known(ImportId),
    /// Another request holds the claim, or Redis could not say: ask SQL.
    Unknown,
}

/// Deletes the key only while it still holds our pending token.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

pub enum DedupFastPath {
    /// Embedded: the SQL transaction alone decides.
    Off,
    Redis(Box<Redis>),
}

impl DedupFastPath {
    fn key(redis: &Redis, client: &ClientId, checksum: &str) -> String {
        redis.key(&["dedup", client.as_str(), checksum])
    }

    pub async fn claim(&self, client: &ClientId, checksum: &str, window: Duration) -> DedupClaim {
        let DedupFastPath::Redis(redis) = self else {
            return DedupClaim::Unknown;
        };
        if window.is_zero() {
            return DedupClaim::Unknown;
        }
        let token = format!("pending:{}", ulid::Ulid::new());
        let key = Self::key(redis, client, checksum);
        let mut conn = redis.conn();
        let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async(&mut conn)
            .await;
        match set {
            Ok(Some(_)) => DedupClaim::Claimed { token },
            Ok(None) => {
                let held: redis::RedisResult<Option<String>> =
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await;
                match held.ok().flatten().and_then(|v| v.parse::<ImportId>().ok()) {
                    Some(id) => DedupClaim::Known(id),
                    None => DedupClaim::Unknown,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "dedup fast path unavailable; SQL decides");
                DedupClaim::Unknown
            }
        }
    }

    /// After the transaction: record the import that owns this payload (`Some`), or give
    /// up our pending claim (`None`) so the next request is not held back.
    pub async fn settle(
        &self,
        client: &ClientId,
        checksum: &str,
        claim: &DedupClaim,
        owner: Option<&ImportId>,
        window: Duration,
    ) {
        let (DedupFastPath::Redis(redis), DedupClaim::Claimed { token }) = (self, claim) else {
            return;
        };
        let key = Self::key(redis, client, checksum);
        let mut conn = redis.conn();
        let done: redis::RedisResult<()> = match owner {
            Some(id) => {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(id.as_str())
                    .arg("PX")
                    .arg(window.as_millis().max(1) as u64)
                    .query_async(&mut conn)
                    .await
            }
            None => {
                redis::Script::new(RELEASE_LUA)
                    .key(&key)
                    .arg(token)
                    .invoke_async(&mut conn)
                    .await
            }
        };
        if let Err(e) = done {
            tracing::debug!(error = %e, "dedup fast path not updated; its key expires on its own");
        }
    }
}
