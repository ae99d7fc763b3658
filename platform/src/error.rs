//! The one error type of the platform crate. Variants are what callers branch on.

use crate::records::ParseError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),

    /// The submitted records are malformed; nothing was stored.
    #[error(transparent)]
    Parse(#[from] ParseError),

    /// A caller-supplied value breaks a rule; the message says which.
    #[error("{0}")]
    Invalid(String),

    #[error("not found")]
    NotFound,

    /// The lease epoch moved on: another worker owns the batch, and this write was refused.
    #[error("lease lost: batch {batch_id} is no longer held at epoch {epoch}")]
    FenceRejected { batch_id: String, epoch: i64 },

    #[error("database: {0}")]
    Db(#[from] sqlx::Error),

    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}
