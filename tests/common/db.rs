//! A database that exists for one test (a SQLite file or a PostgreSQL database of its own)
//! and is removed afterwards.

use std::path::PathBuf;

use sqlx::Connection;

use super::services::{on_private_runtime, test_pg_admin_url, unreachable};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test and is removed afterwards, with a folder of its own
/// (`dir`) for the files the test's processes write.
pub struct TestDb {
    pub url: String,
    pub dir: PathBuf,
    pg: Option<(String, String)>,
}

impl TestDb {
    /// `None` (with a message) when PostgreSQL is unreachable and not required.
    pub async fn create(backend: Backend) -> Option<TestDb> {
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let dir = std::env::temp_dir().join(format!("dataflow-test-{tag}"));
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.join("ledger.db").display());
                Some(TestDb { url, dir, pg: None })
            }
            Backend::Postgres => {
                let admin = test_pg_admin_url();
                let mut conn = match sqlx::PgConnection::connect(&admin).await {
                    Ok(c) => c,
                    Err(e) => return unreachable("PostgreSQL", &format!("at {admin}: {e}")),
                };
                let name = format!("dataflow_test_{tag}");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(b, _)| b)
                    .to_owned();
                Some(TestDb {
                    url: format!("{base}/{name}"),
                    dir,
                    pg: Some((admin, name)),
                })
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((admin, name)) = self.pg.take() {
            on_private_runtime(async move {
                let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await else {
                    return;
                };
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await;
            });
        }
    }
}
