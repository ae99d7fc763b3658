//! The one error type of the platform crate. Variants are what callers branch on.

use crate::domain::records::ParseError;

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

    /// The target is in a state that refuses the action (a batch that is not dead cannot
    /// be retried); the message says which state it is in.
    #[error("{0}")]
    Conflict(String),

    /// A fault inside DataFlow, not the caller's: stored data that does not read back, a
    /// value that does not serialize, a panic. Logged with its cause; answered opaquely.
    #[error("{context}{}", cause(.source))]
    Internal {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The lease epoch moved on: another worker owns the batch, and this write was refused.
    #[error("lease lost: batch {batch_id} is no longer held at epoch {epoch}")]
    FenceRejected { batch_id: String, epoch: i64 },

    #[error("database: {0}")]
    Db(#[from] sqlx::Error),

    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// RabbitMQ refused, lost or did not confirm something; the outbox retries it.
    #[error("broker: {context}{}", cause(.source))]
    Broker {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The ledger's schema is not the one this binary was built for (with `auto_migrate`
    /// off); the message says which migration differs and what to run.
    #[error("{0}")]
    Schema(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// How a variant with an optional cause prints it. Every variant's message says its cause,
/// as sqlx's and lapin's do, so a log line of `%error` is whole; a printer of the whole
/// chain leaves out what a message already said (`dataflow::cli::one_line`).
fn cause(source: &Option<Box<dyn std::error::Error + Send + Sync>>) -> String {
    source
        .as_ref()
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

impl Error {
    /// Stored data that does not read back as what was written (a value no version of
    /// DataFlow writes): an [`Error::Internal`].
    pub fn stored(detail: String) -> Error {
        Error::Internal {
            context: format!("stored data is unreadable: {detail}"),
            source: None,
        }
    }

    /// An [`Error::Internal`] with its cause.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Internal {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An [`Error::Broker`] with its cause.
    pub fn broker(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Broker {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The ledger cannot serve right now (unreachable, overloaded, busy, or the transaction
    /// lost a conflict): a retry later can succeed, so callers answer 503, not 500.
    pub fn is_unavailable(&self) -> bool {
        // The ledger's own waits (for SQLite's write lock, for its log to reach the disk).
        if let Error::Io { source, .. } = self {
            return source.kind() == std::io::ErrorKind::TimedOut;
        }
        let Error::Db(e) = self else { return false };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(db) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or("");
                // SQLite reports extended codes: the low byte is the primary one.
                let sqlite_busy = code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
                // PostgreSQL: serialization failure, deadlock, lock not available, too many
                // connections, statement timeout, admin or crash shutdown, cannot connect now.
                sqlite_busy
                    || matches!(
                        code,
                        "40001"
                            | "40P01"
                            | "55P03"
                            | "53300"
                            | "57014"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                    )
            }
            _ => false,
        }
    }
}
