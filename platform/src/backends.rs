//! The one place where backends are chosen from configuration. Callers get [`Backends`]
//! and never learn which implementation sits behind each part.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::cache::Cache;
use crate::config::{Config, Secret};
use crate::db::{ClientRecord, Db, KeyRecord};
use crate::events::Publisher;
use crate::keys::{self, KeyHasher};
use crate::limiter::{InProcessLimiter, Limiter};
use crate::lockout::{InProcessLockout, Lockout, LockoutPolicy};
use crate::{Error, Result};

pub struct Backends {
    pub db: Db,
    pub limiter: Limiter,
    pub lockout: Lockout,
    /// API keys by key id.
    pub keys: Cache<KeyRecord>,
    /// Clients (with their policies) by client id.
    pub clients: Cache<ClientRecord>,
    pub publisher: Publisher,
    /// Signalled after a commit that wrote outbox rows, so the relay runs at once.
    pub outbox_wake: Arc<Notify>,
    pub hasher: KeyHasher,
    pub admin_token: Secret,
}

impl Backends {
    /// Connects and migrates the ledger and builds every adapter.
    pub async fn build(config: &Config) -> Result<Arc<Backends>> {
        let db = Db::connect(&config.database_url(), config.db_max_connections).await?;
        db.migrate().await?;
        let secret = resolve_secret(config.secret.as_ref(), &config.data_dir, "server-secret")?;
        let admin_token =
            resolve_secret(config.admin_token.as_ref(), &config.data_dir, "admin-token")?;
        let api = &config.api;
        let ttl = Duration::from_millis(api.cache_ttl_ms);
        let negative_ttl = Duration::from_millis(api.cache_negative_ttl_ms);
        Ok(Arc::new(Backends {
            db,
            limiter: Limiter::InProcess(InProcessLimiter::default()),
            lockout: Lockout::InProcess(InProcessLockout::new(LockoutPolicy {
                max_failures: api.auth_max_failures,
                window: Duration::from_secs(api.auth_window_secs),
                lockout: Duration::from_secs(api.auth_lockout_secs),
            })),
            keys: Cache::new(ttl, negative_ttl),
            clients: Cache::new(ttl, negative_ttl),
            publisher: Publisher::in_process(),
            outbox_wake: Arc::new(Notify::new()),
            hasher: KeyHasher::new(secret.expose()),
            admin_token,
        }))
    }
}

/// The configured secret, or the one kept in `<data_dir>/<name>` (created on first start).
fn resolve_secret(configured: Option<&Secret>, data_dir: &Path, name: &str) -> Result<Secret> {
    if let Some(s) = configured {
        return Ok(s.clone());
    }
    let path = data_dir.join(name);
    let io = |context: String| move |source| Error::Io { context, source };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(Secret::new(s.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
    let token = keys::random_token();
    write_private(&path, &token).map_err(io(format!("writing {}", path.display())))?;
    tracing::info!(path = %path.display(), "generated {name}; keep this file private");
    Ok(Secret::new(token))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}
