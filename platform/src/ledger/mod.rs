//! The SQL ledger: one code path for SQLite and PostgreSQL through sqlx's `Any` driver.
//!
//! Statements use `$N` placeholders (both databases accept them). The few places where
//! the dialects differ are spelled as placeholders in the statement text and filled in by
//! [`Db::sql`]: `{now}` is the database clock in milliseconds (leases are judged by one clock,
//! whichever process asks), `{skip_locked}` is `FOR UPDATE SKIP LOCKED` on PostgreSQL,
//! `{for_update}` is `FOR UPDATE` there (both nothing on SQLite, whose writers take turns),
//! `{id_list}` is the rows of the JSON array of strings bound as `$1`, `{ticket_list}` is
//! the `(id, epoch)` rows of the JSON array of `[id, epoch]` pairs bound as `$1`, and
//! `{accepted_seq}` is the acceptance number of the batch created from row `m` of a
//! [`Db::json_rows`] set (`m.n` is its place in the set, from 1).
//!
//! A statement that writes a set of rows at once (the submits of a group commit, the
//! events of a transaction) takes them as one JSON array of objects bound as `$1`
//! ([`Db::json_rows`]): one statement text whatever the count, which each connection
//! prepares once.
//!
//! Layout: [`clients`] (tenants, keys, policies), [`imports`] (the submit transaction,
//! idempotency, dedup, quota), [`submits`] (the group commit of plain submits), [`batches`] (claims, the fenced lease, views),
//! [`outbox`] (events written in the same transaction as the change they announce),
//! [`payloads`] (stored files a part at a time: uploads, payloads read back, retention),
//! [`jobs`] (follow-up job intents written beside those events, and stored reports),
//! [`queues`] (depth and age of everything waiting), [`operator`] (the dashboard's
//! cross-client batch search and throughput), [`actions`] (the dashboard's action log),
//! [`leases`] (named leases on the ledger's clock: the fleet leader, the outbox relay),
//! [`summaries`] (the daily per-client summaries), [`charts`] (the minute samples the
//! dashboard's charts draw), [`commits`] (what a commit wakes in
//! this process); and for SQLite, `gate` (writers queued, across processes too) and
//! `flush` (commits put on disk little and often, and the group commit of answers).

pub mod actions;
pub mod batches;
pub mod charts;
mod chunk_writes;
pub mod clients;
pub mod commits;
mod filters;
mod flush;
mod gate;
pub mod imports;
pub mod jobs;
pub mod leases;
pub mod operator;
pub mod outbox;
pub mod payloads;
pub mod queues;
pub mod records;
pub mod schemas;
mod submits;
pub mod summaries;

pub use actions::{ActionRecord, NewAction};
pub use batches::{
    BatchAction, Bundle, ChunkResult, Claimable, Completing, ErrorCursor, FailOutcome, Lease,
};
pub use clients::{ClientRecord, KeyRecord, StoredSchema};
pub use commits::CommitWake;
pub use gate::{Tx, Writer};
pub use imports::{IdempotencyClaim, IdempotencyStart, NewImport, Payload, SubmitOutcome};
pub use jobs::{Failure, Handover, JobFilter};
pub use operator::{BatchFilter, BatchRow, Throughput};
pub use outbox::OutboxRow;
pub(crate) use outbox::Outgoing;
pub use payloads::{
    ClientStorage, ExpiredPayloads, NewUpload, PartsReader, Upload, UploadCreated, UploadKind,
    human_bytes,
};
pub use queues::ClientQueue;
pub use records::RecordFilter;

use std::path::Path;
use std::sync::Arc;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, AssertSqlSafe, Connection, Executor};

use dataflow_contracts::ClientId;

use crate::domain::lanes::Lane;
use crate::{Error, Result};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_BEFORE_PING: std::time::Duration = std::time::Duration::from_secs(1);

/// Every SQLite connection: WAL lets readers run beside the one writer; NORMAL sync is
/// durable in WAL mode against process crashes, and against a host crash once [`flush`]
/// has synced the log (within milliseconds, and before anything is answered:
/// [`Db::durable`]); the busy timeout still covers writers outside the gate (another tool on
/// the file); checkpoints run beside the writers, not in their commits (see [`gate`]). The
/// page cache is set per connection by [`sqlite_session`].
const SQLITE_SESSION: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;";

/// The session of each of `connections` SQLite connections sharing `cache_mib` of page
/// cache evenly (at least 1 MiB each).
///
/// Why a share of one budget and not a size per connection: a process's memory is bounded
/// by the sum, which an operator sets once whatever the pool's size. Little is lost by it:
/// in WAL mode a connection empties its cache whenever another connection has written
/// since its last transaction, so in a process that writes a large cache does not stay
/// warm for long anyway.
fn sqlite_session(cache_mib: u32, connections: u32) -> String {
    let kib = (u64::from(cache_mib) * 1024 / u64::from(connections.max(1))).max(1024);
    format!("{SQLITE_SESSION} PRAGMA cache_size = -{kib};")
}

/// How a process's pool connects ([`Db::connect_with`]).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Connections in the main pool.
    pub max_connections: u32,
    /// PostgreSQL: how long a session may sit idle inside a transaction
    /// ([`DEFAULT_IDLE_IN_TRANSACTION`] says why).
    pub idle_in_transaction: std::time::Duration,
    /// SQLite: the page cache all of the pool's connections share ([`sqlite_session`]).
    pub sqlite_cache_mib: u32,
}

impl PoolSettings {
    /// `max_connections` with the defaults for the rest.
    pub fn new(max_connections: u32) -> PoolSettings {
        PoolSettings {
            max_connections,
            idle_in_transaction: DEFAULT_IDLE_IN_TRANSACTION,
            sqlite_cache_mib: DEFAULT_SQLITE_CACHE_MIB,
        }
    }
}

/// The page cache a process's SQLite connections share unless configured otherwise.
pub const DEFAULT_SQLITE_CACHE_MIB: u32 = 64;

/// Bookkeeping on PostgreSQL: relay marks, the job ledger's claims and settles, stored
/// reports and daily summaries ([`Db::background_writer`]) commit with `synchronous_commit
/// = off`, on a pool of their own (half as many connections as the main pool, at least one).
///
/// Why: each durable commit waits for an fsync of the WAL behind everyone else's, and a
/// batch made about seven (submit, claim, completion, and four bookkeeping writes), so the
/// WAL syncs, not the work, set the ledger's pace (docs/performance.md has the figures).
///
/// Why it is safe: the WAL is one sequence, so a bookkeeping commit is on disk as soon as
/// any later durable commit is (and within three `wal_writer_delay`s, 600 ms by default,
/// when none comes). Only a PostgreSQL crash can lose the last of them, and each one lost
/// is done again: an event whose mark is lost is published again (consumers deduplicate by
/// event id), a job whose claim or settle is lost runs again (at least once, as after a
/// worker crash), a report is stored before its job's settle, a summary is computed again.
/// Nothing anyone outside was promised rides on these commits: submits, batch claims and
/// their fence, completions and every outbox row stay durable commits on the main pool.
const BOOKKEEPING: &str = "SET synchronous_commit = off";

/// How long a PostgreSQL session may sit idle inside a transaction before the server ends
/// it, when the caller sets nothing shorter ([`PoolSettings`]).
///
/// Why: a process that stops between two statements of a transaction (`SIGSTOP`, a VM
/// pause, a debugger) keeps its row locks for as long as it is stopped. Its lease lapses,
/// but its successor would wait on those locks (or skip the locked batch) until the frozen
/// process resumed. Ended by the server, the session's transaction rolls back and its
/// locks go; the frozen process finds its connection gone when it wakes, and the fence
/// refuses whatever it tries next. DataFlow's own transactions never wait between their
/// statements, so only a stopped or hung process reaches the limit.
pub const DEFAULT_IDLE_IN_TRANSACTION: std::time::Duration = std::time::Duration::from_secs(10);

/// The type of a field of [`Db::json_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Text,
    Int,
    /// Bytes, written in the JSON as hex.
    Hex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn now_ms(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
        }
    }

    fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => "FOR UPDATE",
        }
    }

    fn id_list(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SELECT value FROM json_each($1)",
            Dialect::Postgres => "SELECT json_array_elements_text($1::json)",
        }
    }

    fn ticket_list(self) -> &'static str {
        match self {
            Dialect::Sqlite => {
                "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM jsonb_each(jsonb($1))"
            }
            Dialect::Postgres => {
                "SELECT t->>0, (t->>1)::bigint FROM json_array_elements($1::json) t"
            }
        }
    }

    /// The next import's place in the order of acceptance (migration 0010 says why each
    /// dialect's way keeps that order).
    fn accepted_seq(self) -> &'static str {
        match self {
            // Writers take turns, and the set's numbers follow the largest in order.
            Dialect::Sqlite => "(SELECT COALESCE(MAX(accepted_seq), 0) FROM batches) + m.n",
            Dialect::Postgres => "nextval('batches_accepted_seq')",
        }
    }
}

/// A handle on the ledger; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
    /// Attempts each new job intent gets (`jobs.max_attempts`).
    job_max_attempts: u32,
    /// Where [`Db::background_writer`] writes: on PostgreSQL a pool of its own whose
    /// commits do not wait for the disk ([`BOOKKEEPING`]); on SQLite the one pool.
    bookkeeping: AnyPool,
    /// SQLite on a file: what every write passes first ([`gate`]).
    gate: Option<Arc<gate::Gate>>,
    /// Signalled by this handle's (and its clones') commits ([`commits`]).
    commits: Arc<CommitWake>,
    /// SQLite: [`Db::durable`] waits for the disk (`sqlite_durable_commits`).
    durable_commits: bool,
    /// Plain submits waiting to share a transaction ([`submits`]).
    groups: Arc<submits::Groups>,
}

impl Db {
    /// Connects (creating the SQLite file and its folder when needed).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db> {
        Self::connect_with(url, PoolSettings::new(max_connections)).await
    }

    /// [`Db::connect`] with every pool setting chosen; a worker passes a fraction of its
    /// lease as `idle_in_transaction`, so no lock outlives a lease.
    pub async fn connect_with(url: &str, settings: PoolSettings) -> Result<Db> {
        let PoolSettings {
            max_connections,
            idle_in_transaction,
            sqlite_cache_mib,
        } = settings;
        install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        let (url, gate) = match dialect {
            Dialect::Sqlite => {
                crate::memory::sqlite_allocates_from_mimalloc();
                let (url, file) = prepare_sqlite_url(url)?;
                (url, file.map(|f| gate::Gate::of(&f)).transpose()?)
            }
            Dialect::Postgres => (url.to_owned(), None),
        };
        let (session, bookkeeping_session) = match dialect {
            Dialect::Sqlite => (sqlite_session(sqlite_cache_mib, max_connections), None),
            Dialect::Postgres => {
                let hold = format!(
                    "SET idle_in_transaction_session_timeout = {}",
                    idle_in_transaction.as_millis().max(1)
                );
                (hold.clone(), Some(format!("{BOOKKEEPING}; {hold}")))
            }
        };
        let pool = pool_options(max_connections, session).connect(&url).await?;
        let bookkeeping = match bookkeeping_session {
            None => pool.clone(),
            Some(session) => {
                pool_options((max_connections / 2).max(1), session).connect_lazy(&url)?
            }
        };
        Ok(Db {
            pool,
            bookkeeping,
            dialect,
            job_max_attempts: 1,
            gate,
            commits: Arc::default(),
            durable_commits: true,
            groups: Arc::default(),
        })
    }

    /// Whether [`Db::durable`] waits for the disk on SQLite (it does unless told not to).
    pub fn with_durable_commits(mut self, durable: bool) -> Db {
        self.durable_commits = durable;
        self
    }

    /// Waits until what this process has written so far is on disk, before it is answered
    /// or published: on SQLite a commit is in the log but not yet synced ([`flush`] shares
    /// one sync among the writers that meet here); on PostgreSQL a commit is durable when it
    /// returns, and this costs nothing. With `sqlite_durable_commits = false` it returns at
    /// once and a power cut may lose the last few milliseconds of answered writes.
    pub async fn durable(&self) -> Result<()> {
        match &self.gate {
            Some(gate) if self.durable_commits => gate.barrier().await,
            _ => Ok(()),
        }
    }

    /// Sets the attempts that job intents written from now on get.
    pub fn with_job_max_attempts(mut self, attempts: u32) -> Db {
        self.job_max_attempts = attempts.max(1);
        self
    }

    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    fn migrator(&self) -> &'static Migrator {
        match self.dialect {
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    /// Checks, without changing anything, that the ledger's schema is exactly this binary's:
    /// every migration it knows applied, none it does not know. What a process does instead
    /// of migrating when `auto_migrate` is off.
    pub async fn check_schema(&self) -> Result<()> {
        let exists = self.sql(match self.dialect {
            Dialect::Sqlite => {
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
            Dialect::Postgres => {
                "SELECT count(*) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
            }
        });
        let tracked: i64 = sqlx::query_scalar(exists).fetch_one(&self.pool).await?;
        // (version, applied successfully, checksum) of every recorded migration.
        let recorded: Vec<(i64, bool, Vec<u8>)> = if tracked == 0 {
            Vec::new()
        } else {
            let rows: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(
                "SELECT version, CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT), checksum \
                 FROM _sqlx_migrations ORDER BY version",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter()
                .map(|(version, success, checksum)| (version, success == 1, checksum))
                .collect()
        };
        let migrate = "run `dataflow migrate` with this version (auto_migrate is off)";
        for m in self.migrator().iter() {
            match recorded.iter().find(|(v, ..)| *v == m.version) {
                None => {
                    return Err(Error::Schema(format!(
                        "the ledger lacks migration {} ({}) of this DataFlow: {migrate}",
                        m.version, m.description
                    )));
                }
                Some((_, false, _)) => {
                    return Err(Error::Schema(format!(
                        "migration {} ({}) failed part-way on this ledger: repair it, then \
                         {migrate}",
                        m.version, m.description
                    )));
                }
                Some((_, true, checksum)) if checksum.as_slice() != &*m.checksum => {
                    return Err(Error::Schema(format!(
                        "migration {} ({}) on this ledger differs from this DataFlow's: the \
                         ledger was migrated by another build",
                        m.version, m.description
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some((newer, ..)) = recorded
            .iter()
            .find(|(v, ..)| !self.migrator().iter().any(|m| m.version == *v))
        {
            return Err(Error::Schema(format!(
                "the ledger has migration {newer}, which this DataFlow does not know: it was \
                 migrated by a newer version; run that one"
            )));
        }
        Ok(())
    }

    /// What this process's commits wake: the outbox relay and the job workers wait on it.
    pub fn commits(&self) -> &Arc<CommitWake> {
        &self.commits
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.bookkeeping.close().await;
    }

    /// Fills the dialect placeholders of a statement.
    pub(crate) fn sql(&self, template: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(
            template
                .replace("{now}", self.dialect.now_ms())
                .replace("{skip_locked}", self.dialect.skip_locked())
                .replace("{for_update}", self.dialect.for_update())
                .replace("{id_list}", self.dialect.id_list())
                .replace("{ticket_list}", self.dialect.ticket_list())
                .replace("{accepted_seq}", self.dialect.accepted_seq()),
        )
    }

    /// The rows of the JSON array of objects bound as `$1`, as a subquery with one column
    /// per field: `(SELECT … FROM json_to_recordset($1) …)` on PostgreSQL, `jsonb_each` on
    /// SQLite. A [`Field::Hex`] arrives as hex text and reads as bytes. `rows`, the objects
    /// to be bound, must each name every field (a null is named too): checked in debug
    /// builds, since a misspelt name would read as NULL, not fail.
    pub(crate) fn json_rows(&self, fields: &[(&str, Field)], rows: &[serde_json::Value]) -> String {
        debug_assert!(
            rows.iter()
                .all(|row| fields.iter().all(|(name, _)| row.get(name).is_some())),
            "a row of a JSON set misses one of the fields {fields:?}"
        );
        let list = |f: &dyn Fn(&(&str, Field)) -> String| {
            fields.iter().map(f).collect::<Vec<_>>().join(", ")
        };
        match self.dialect {
            Dialect::Sqlite => format!(
                "(SELECT {} FROM jsonb_each(jsonb($1)))",
                list(&|(name, field)| match field {
                    Field::Hex => format!("unhex(json_extract(value, '$.{name}')) AS {name}"),
                    _ => format!("json_extract(value, '$.{name}') AS {name}"),
                })
            ),
            Dialect::Postgres => format!(
                "(SELECT {} FROM json_to_recordset($1::json) AS r({}))",
                list(&|(name, field)| match field {
                    Field::Hex => format!("decode(r.{name}, 'hex') AS {name}"),
                    _ => format!("r.{name}"),
                }),
                list(&|(name, field)| match field {
                    Field::Int => format!("{name} BIGINT"),
                    Field::Text | Field::Hex => format!("{name} TEXT"),
                })
            ),
        }
    }

    /// Starts a transaction that will write, through the gate. SQLite takes the write lock
    /// up front, so a writer outside the gate makes it wait rather than fail when it would
    /// upgrade a read lock.
    pub(crate) async fn begin_write(&self) -> Result<Tx> {
        self.begin_write_as(gate::Urgency::Normal(Lane::SHARED))
            .await
    }

    /// A [`Db::begin_write`] made for `client` alone: on SQLite it takes turns with the
    /// writes of other clients rather than queueing behind all of this client's
    /// ([`Lane`]), so one client's flood cannot hold the one writer from the others.
    pub(crate) async fn begin_write_for(&self, client: &ClientId) -> Result<Tx> {
        self.begin_write_as(gate::Urgency::Normal(Lane::of(client)))
            .await
    }

    /// A [`Db::begin_write`] for bookkeeping nobody waits on: it lets the other writers
    /// waiting in this process go first ([`gate::Urgency::Background`]). Unlike
    /// [`Db::background_writer`] it stays on the main pool and its commit waits for the disk:
    /// a transaction can carry outbox rows, which must never be undone once relayed.
    pub(crate) async fn begin_background_write(&self) -> Result<Tx> {
        self.begin_write_as(gate::Urgency::Background).await
    }

    /// A [`Db::begin_write`] that goes ahead of the other writers waiting in this process:
    /// for a write a worker waits on to start (a claim).
    pub(crate) async fn begin_urgent_write(&self) -> Result<Tx> {
        self.begin_write_as(gate::Urgency::Urgent).await
    }

    async fn begin_write_as(&self, urgency: gate::Urgency) -> Result<Tx> {
        let pass = self.enter(urgency).await?;
        let tx = match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        };
        Ok(Tx::new(gate::Held::new(tx, pass), self.commits.clone()))
    }

    /// A connection, through the gate, for one statement that writes outside a
    /// transaction: `.execute(&mut *db.writer().await?)`. Never ask for one while this
    /// task holds a [`Tx`] or another `Writer` of the same ledger: the gate is not
    /// reentrant (the second would wait out [`gate::WAIT`] and fail).
    pub async fn writer(&self) -> Result<Writer> {
        self.writer_as(gate::Urgency::Normal(Lane::SHARED)).await
    }

    /// A [`Db::writer`] that lets the other writers waiting in this process go first: for
    /// bookkeeping nobody waits on ([`gate::Urgency::Background`]), which on PostgreSQL
    /// commits without waiting for the disk ([`BOOKKEEPING`]): only writes that are done
    /// again when a crash undoes them, and never one that writes outbox rows.
    pub(crate) async fn background_writer(&self) -> Result<Writer> {
        self.writer_as(gate::Urgency::Background).await
    }

    /// A [`Db::writer`] for a statement made for `client` alone, in its turn among the
    /// clients ([`Db::begin_write_for`]).
    pub(crate) async fn writer_for(&self, client: &ClientId) -> Result<Writer> {
        self.writer_as(gate::Urgency::Normal(Lane::of(client)))
            .await
    }

    async fn writer_as(&self, urgency: gate::Urgency) -> Result<Writer> {
        let pass = self.enter(urgency).await?;
        let pool = match urgency {
            gate::Urgency::Background => &self.bookkeeping,
            gate::Urgency::Urgent | gate::Urgency::Normal(_) => &self.pool,
        };
        Ok(Writer::new(pool.acquire().await?, pass))
    }

    async fn enter(&self, urgency: gate::Urgency) -> Result<Option<gate::Pass>> {
        match &self.gate {
            Some(g) => Ok(Some(g.enter(&self.pool, urgency).await?)),
            None => Ok(None),
        }
    }

    /// Milliseconds since the epoch on the database clock.
    pub async fn now_ms(&self) -> Result<i64> {
        let sql = self.sql("SELECT {now}");
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// Cheap reachability check.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// The pool settings of a ledger; `session` is run on each new connection.
fn pool_options(max_connections: u32, session: String) -> AnyPoolOptions {
    // sqlx pings every connection it hands out by default: a round trip to PostgreSQL, or
    // a hop to SQLite's worker thread and back, before each statement. Only a connection
    // that sat idle can have been cut off unnoticed (a server restart, a proxy's idle
    // timeout); one in steady use fails its next statement like any other, and the
    // caller's retry gets a fresh one.
    let options = AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(gate::WAIT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    conn.ping().await?;
                }
                Ok(true)
            })
        });
    let session: Arc<str> = session.into();
    options.after_connect(move |conn, _| {
        let session = session.clone();
        Box::pin(async move {
            conn.execute(AssertSqlSafe(&*session)).await?;
            Ok(())
        })
    })
}

/// `sqlite://dir/file.db` → make sure `dir` exists and ask sqlite to create the file; the
/// URL to connect with, and the file (`None` in memory).
fn prepare_sqlite_url(url: &str) -> Result<(String, Option<std::path::PathBuf>)> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:"
        && let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating database folder {}", dir.display()),
            source,
        })?;
    }
    let url = if query.is_empty() {
        format!("sqlite://{path}?mode=rwc")
    } else {
        url.to_owned()
    };
    let file = (path != ":memory:" && !query.contains("mode=memory")).then(|| path.into());
    Ok((url, file))
}

/// Values as the JSON array that `{id_list}` (and the other list placeholders) expand.
pub(crate) fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_default()
}

/// Splits the `limit + 1` rows a page query fetched into the page and the cursor of the
/// next one (absent on the last page).
pub(crate) fn split_page<T>(
    mut items: Vec<T>,
    limit: u32,
    cursor_of: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let limit = limit as usize;
    if items.len() <= limit {
        return (items, None);
    }
    items.truncate(limit);
    let next = items.last().map(cursor_of);
    (items, next)
}

/// Maps a stored integer flag back to a bool.
pub(crate) fn flag(v: i64) -> bool {
    v != 0
}

/// Converts a non-negative counter read from SQL.
pub(crate) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of a JSON set that misses a field the statement reads is a mistake in the
    /// code (it would read as NULL): debug builds stop on it.
    #[tokio::test]
    #[should_panic(expected = "misses one of the fields")]
    async fn a_json_set_row_without_a_statements_field_is_caught() {
        let dir = std::env::temp_dir().join(format!("dataflow-json-{}", ulid::Ulid::new()));
        let db = Db::connect(&format!("sqlite://{}", dir.join("ledger.db").display()), 1)
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let rows = [serde_json::json!({"batch_id": "b", "bdoy": "00"})];
        db.json_rows(&[("batch_id", Field::Text), ("body", Field::Hex)], &rows);
    }

    /// Bookkeeping commits without waiting for the WAL flush; every other write waits.
    #[tokio::test]
    async fn postgres_bookkeeping_alone_commits_without_waiting_for_the_disk() {
        let url = std::env::var("DATAFLOW_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let db = match Db::connect(&url, 2).await {
            Ok(db) => db,
            Err(e) if std::env::var("DATAFLOW_TEST_REQUIRE_SERVICES").as_deref() != Ok("1") => {
                eprintln!(
                    "SKIPPED: PostgreSQL unreachable at {url} ({e}); set DATAFLOW_TEST_REQUIRE_SERVICES=1 to fail instead"
                );
                return;
            }
            Err(e) => panic!("PostgreSQL is required but unreachable at {url}: {e}"),
        };
        let show = || sqlx::query_scalar::<_, String>("SHOW synchronous_commit");
        let mut writer = db.background_writer().await.unwrap();
        assert_eq!(show().fetch_one(&mut *writer).await.unwrap(), "off");
        drop(writer);
        let mut writer = db.writer().await.unwrap();
        assert_eq!(show().fetch_one(&mut *writer).await.unwrap(), "on");
        drop(writer);
        for mut tx in [
            db.begin_write().await.unwrap(),
            db.begin_urgent_write().await.unwrap(),
        ] {
            assert_eq!(show().fetch_one(&mut *tx).await.unwrap(), "on");
            tx.end(Ok(())).await.unwrap();
        }
        db.close().await;
    }
}
