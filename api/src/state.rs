//! Shared state of the HTTP application.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataflow_contracts::ClientId;
use dataflow_platform::config::ApiConfig;
use dataflow_platform::domain::compiled::CompiledSchemas;
use dataflow_platform::ledger::{ClientRecord, KeyRecord};
use dataflow_platform::{Backends, Error};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ratelimit::Rejections;

/// `last_used_at` is written at most this often per key, to keep writes off the hot path.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// How long an import waits for one of its client's slots before it is refused with a
/// `429`: slots free as imports are answered, within a few milliseconds under load, so a
/// wait this long means the client's imports are not getting through anyway.
pub const IMPORT_SLOT_WAIT: Duration = Duration::from_secs(1);
#[derive(Clone)]
pub struct AppState {
    pub backends: Arc<Backends>,
    pub config: Arc<ApiConfig>,
    /// Recent rate-limit refusals, for the dashboard.
    pub rejections: Arc<Rejections>,
    /// Client schemas compiled once (a CSV header is checked against its client's).
    pub schemas: Arc<CompiledSchemas>,
    /// The workers' chunk size: a dry run cuts a file as a worker will, so that it counts
    /// a key the file repeats as the import will.
    pub chunk_size: usize,
    import_slots: Arc<Mutex<HashMap<ClientId, Arc<Semaphore>>>>,
    touched: Arc<Mutex<HashMap<String, Instant>>>,
}

impl AppState {
    pub fn new(backends: Arc<Backends>, config: ApiConfig, chunk_size: usize) -> Self {
        Self {
            backends,
            config: Arc::new(config),
            rejections: Arc::default(),
            schemas: Arc::default(),
            chunk_size,
            import_slots: Arc::default(),
            touched: Arc::default(),
        }
    }

    /// A key by id through the cache.
    pub async fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, Arc<Error>> {
        let db = self.backends.db.clone();
        let id = key_id.to_owned();
        self.backends
            .keys
            .get_or_load(key_id, || async move { db.get_key(&id).await })
            .await
    }

    /// A client (with its policy) through the cache.
    pub async fn client(&self, id: &ClientId) -> Result<Option<ClientRecord>, Arc<Error>> {
        let db = self.backends.db.clone();
        let owned = id.clone();
        self.backends
            .clients
            .get_or_load(id.as_str(), || async move { db.get_client(&owned).await })
            .await
    }

    /// Records that a key was used, at most once a minute per key and off the request path.
    pub fn touch_key(&self, key_id: &str) {
        let now = Instant::now();
        {
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if touched
                .get(key_id)
                .is_some_and(|t| now.duration_since(*t) < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() > 100_000 {
                touched.clear();
            }
            touched.insert(key_id.to_owned(), now);
        }
        let db = self.backends.db.clone();
        let key_id = key_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = db.touch_key(&key_id).await {
                tracing::debug!(error = %e, "could not record key use");
            }
        });
    }

    /// One of the client's concurrent-import slots, waiting up to [`IMPORT_SLOT_WAIT`] for
    /// one to free: a producer with more connections than slots gets its imports through
    /// at the slots' pace instead of a refusal for most of them. `None` when none freed.
    pub async fn import_slot(&self, client: &ClientId) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut slots = self.import_slots.lock().unwrap_or_else(|p| p.into_inner());
            // Drop idle semaphores (nobody else holds a reference to them) now and then.
            if slots.len() > 10_000 {
                slots.retain(|_, s| Arc::strong_count(s) > 1);
            }
            slots
                .entry(client.clone())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(
                        self.config.max_concurrent_imports_per_client,
                    ))
                })
                .clone()
        };
        match sem.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => tokio::time::timeout(IMPORT_SLOT_WAIT, sem.acquire_owned())
                .await
                .ok()?
                .ok(),
        }
    }
}

/// The caller's address as the lock-out and anonymous limits see it.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// When the server gives up on this request (`api.request_timeout_secs` after it began).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);
