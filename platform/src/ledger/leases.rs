//! Named leases: one holder at a time for a singleton duty (the outbox relay with a broker,
//! the worker fleet's leader). Time is the ledger's clock, so processes on hosts whose
//! clocks disagree still agree on who holds a lease.

use super::Db;
use crate::Result;

/// The lease of the outbox relay that publishes to the broker.
pub const OUTBOX_RELAY: &str = "outbox-relay";
/// The lease of the worker that runs the fleet's singleton duties.
pub const LEADER: &str = "leader";

impl Db {
    /// Takes or renews lease `name` for `owner` for `lease_ms`; false while another holder
    /// has an unexpired one.
    pub async fn take_lease(&self, name: &str, owner: &str, lease_ms: i64) -> Result<bool> {
        let sql = self.sql(
            "INSERT INTO leases (name, owner, expires_at) VALUES ($1, $2, {now} + $3) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at \
             WHERE leases.owner = excluded.owner OR leases.owner IS NULL OR leases.expires_at < {now}",
        );
        let taken = sqlx::query(sql)
            .bind(name)
            .bind(owner)
            .bind(lease_ms)
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected();
        Ok(taken == 1)
    }

    /// Who holds lease `name` (while unexpired), for operators and tests.
    pub async fn lease_owner(&self, name: &str) -> Result<Option<String>> {
        let sql = self.sql("SELECT owner FROM leases WHERE name = $1 AND expires_at >= {now}");
        Ok(sqlx::query_scalar::<_, Option<String>>(sql)
            .bind(name)
            .fetch_optional(self.pool())
            .await?
            .flatten())
    }

    /// Hands lease `name` back (on shutdown), so another process takes over at once.
    pub async fn release_lease(&self, name: &str, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE leases SET owner = NULL, expires_at = 0 WHERE name = $1 AND owner = $2",
        )
        .bind(name)
        .bind(owner)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }
}
