//! The dashboard's action log: who did what, to which target, with what outcome, from
//! where. Written for every login, logout and action (refused ones too), read newest first.

use dataflow_contracts::time::rfc3339;
use sqlx::Row;

use super::filters::{Bind, Conditions};
use super::{Db, split_page};
use crate::Result;

/// One entry to write.
#[derive(Debug, Clone)]
pub struct NewAction<'a> {
    pub operator: &'a str,
    /// The session's public label.
    pub session: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub outcome: &'a str,
    pub ip: &'a str,
}

/// One entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRecord {
    pub id: i64,
    pub at: String,
    pub operator: String,
    pub session: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub ip: String,
}

impl Db {
    pub async fn record_action(&self, a: &NewAction<'_>) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO ui_actions (at, operator, session, action, target, outcome, ip) \
             VALUES ({now}, $1, $2, $3, $4, $5, $6)",
        );
        sqlx::query(sql)
            .bind(a.operator)
            .bind(a.session)
            .bind(a.action)
            .bind(a.target)
            .bind(a.outcome)
            .bind(a.ip)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// Entries newest first, before the entry `cursor`; the next page's cursor.
    pub async fn list_actions(
        &self,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<ActionRecord>, Option<String>)> {
        let mut given = Conditions::default();
        given.and("id <", cursor.map(Bind::Int));
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT id, at, operator, session, action, target, outcome, ip FROM ui_actions{} \
             ORDER BY id DESC LIMIT ${}",
            given.clause(),
            given.next()
        ));
        let rows = given
            .bind(sqlx::query(sql))
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let items = rows
            .iter()
            .map(|r| {
                Ok(ActionRecord {
                    id: r.try_get("id")?,
                    at: rfc3339(r.try_get("at")?),
                    operator: r.try_get("operator")?,
                    session: r.try_get("session")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    outcome: r.try_get("outcome")?,
                    ip: r.try_get("ip")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(split_page(items, limit, |a| a.id.to_string()))
    }
}
