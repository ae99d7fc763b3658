//! Request and response bodies of the HTTP API. Request bodies reject unknown fields so a
//! typo is a 400, not a silently ignored setting.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ids::{BatchId, ClientId, ImportId};
use crate::policy::{Policy, PolicyPatch};
use crate::{BatchStatus, ImportFormat, Priority};

/// Every 4xx and 5xx body: a stable machine-readable `code` and a human `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub detail: String,
}

/// Where a resumable upload (`/v1/uploads`, the tus protocol) stands: `GET
/// /v1/uploads/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UploadView {
    pub id: crate::UploadId,
    /// The file's length, as declared when the upload was created.
    pub length: u64,
    /// Bytes received and stored: where the next part starts.
    pub offset: u64,
    pub state: UploadState,
    /// The import the finished file became (or, for a duplicate, the earlier one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportView>,
    /// Why the finished file was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// When an unfinished upload expires, RFC 3339.
    pub expires_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    /// Parts are still to come.
    Receiving,
    /// Every byte arrived; the file is being checked, or will be by the next `PATCH`.
    Received,
    /// The file became an import (or was a duplicate of one).
    Imported,
    /// The file was refused; `error` says why.
    Refused,
}

/// `POST /v1/imports` answers (202 new, 200 duplicate) and `GET /v1/imports/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImportView {
    pub id: ImportId,
    pub batch_id: BatchId,
    pub status: BatchStatus,
    pub format: ImportFormat,
    pub records: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the request body.
    pub checksum: String,
    pub created_at: String,
    /// True when this answer is the earlier import with the same payload.
    pub duplicate: bool,
    /// Its batch's place among the client's own batches (the `Priority` header).
    #[serde(default)]
    pub priority: Priority,
}

impl ImportView {
    /// The same import, as the answer to a later identical submission.
    pub fn into_duplicate(self) -> Self {
        Self {
            duplicate: true,
            ..self
        }
    }
}

/// `GET /v1/batches/{id}` and the items of `GET /v1/batches`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchView {
    pub id: BatchId,
    pub import_id: ImportId,
    pub status: BatchStatus,
    pub records_total: u64,
    /// Records handled so far (the checkpoint); equals `records_total` once completed.
    pub records_processed: u64,
    pub records_written: u64,
    pub records_unchanged: u64,
    /// Records left as they were because an import accepted after this one had written
    /// them already (this batch ran late: retried, resumed, or beside the newer one).
    pub records_superseded: u64,
    pub records_failed: u64,
    /// Attempts started: the first claim and each retry after a failure.
    pub attempts: u32,
    /// Times another worker took the batch over because its holder's lease lapsed (the
    /// holder died, stalled or lost the ledger); these spend no attempt.
    pub takeovers: u32,
    pub last_error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// First claim to completion.
    pub duration_ms: Option<u64>,
    /// The version of the client's schema the batch is checked with; `null`: none.
    pub schema_version: Option<u64>,
    /// Its place among the client's own batches.
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchPage {
    pub items: Vec<BatchView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One record that could not be stored, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecordErrorView {
    /// 1-based line in the submitted file (CSV: the header is line 1).
    pub line: u64,
    pub field: Option<String>,
    /// From the catalogue in docs/schemas.md: `type`, `constraint.minimum`,
    /// `missing_key`, `too_many_errors` …
    pub code: String,
    pub detail: String,
    /// The offending value as it came, shortened.
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecordErrorPage {
    pub items: Vec<RecordErrorView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    /// 1 to 200 characters, no control characters; surrounding white space is dropped.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub name: String,
    #[serde(default, deserialize_with = "patch_object")]
    pub policy: Option<PolicyPatch>,
}

/// `policy` is an object or `null`: serde's derived structs also take an array of their
/// fields in order (`[1000]` would set whichever comes first), which nobody means.
fn patch_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PolicyPatch>, D::Error> {
    match Option::<serde_json::Map<String, serde_json::Value>>::deserialize(d)? {
        None => Ok(None),
        Some(fields) => PolicyPatch::deserialize(serde_json::Value::Object(fields))
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClientView {
    pub id: ClientId,
    pub name: String,
    pub active: bool,
    pub created_at: String,
    pub policy: Policy,
    /// The version of the client's schema new imports are checked with; `null`: none.
    pub schema_version: Option<u64>,
}

/// One version of a client's schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchemaView {
    pub client_id: ClientId,
    /// 1 for the first schema set, one more for each change.
    pub version: u64,
    /// Whether new imports are checked with this version.
    pub current: bool,
    pub created_at: String,
    /// The Frictionless Table Schema document as it was set (stored as compact JSON).
    #[schema(value_type = Object)]
    pub schema: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A note for operators, e.g. which service holds the key: at most 200 characters, no
    /// control characters.
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub label: Option<String>,
}

/// The only time the secret is ever shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyCreated {
    pub key_id: String,
    pub client_id: ClientId,
    pub api_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub key_id: String,
    pub client_id: ClientId,
    pub label: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
}

/// `POST /v1/imports?dry_run=true`: what the import would do to the records as they are
/// now, with nothing stored, spent or announced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DryRunView {
    pub format: ImportFormat,
    pub records: u64,
    /// Records that fit the client's rules (its schema, or its policy's key and required
    /// fields).
    pub valid: u64,
    pub rejected: u64,
    pub would_insert: u64,
    pub would_update: u64,
    /// Records it would leave as they are (the same values, or replaced by a later record
    /// of the same file with the same key).
    pub unchanged: u64,
    /// The version of the client's schema it was checked with; `null`: none.
    pub schema_version: Option<u64>,
    /// Why the import would be refused whole (more records refused than the error
    /// threshold allows), when it would: then it would write nothing, and the counts of
    /// what it would write are 0.
    pub refusal: Option<String>,
    /// The same payload was imported within the dedup window: the import would be answered
    /// with that one and change nothing.
    pub duplicate_of: Option<ImportId>,
    /// The first row errors, in file order.
    pub errors: Vec<RecordErrorView>,
    /// The first changes, in file order.
    pub changes: Vec<ChangeView>,
}

/// What `POST /v1/imports` answers with `200`: the earlier import of the same payload, or
/// (`?dry_run=true`) what the import would do. (For the API document: the answers are the
/// two views themselves.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SubmitAnswer {
    Import(ImportView),
    DryRun(Box<DryRunView>),
}

/// The query of `POST /v1/imports`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Store nothing: answer with what the import would do (`200`, a `DryRunView`).
    pub dry_run: Option<bool>,
}

/// One record an import would insert or update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChangeView {
    pub key: String,
    pub change: ChangeKind,
    /// For an update, each field it would change (absent for an insert).
    pub fields: Vec<FieldChangeView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Insert,
    Update,
}

/// A field's value before and after, as JSON (`null` where the field is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldChangeView {
    pub field: String,
    pub old: Option<RawJson>,
    pub new: Option<RawJson>,
}

/// JSON text passed through as it is (a record's fields as stored, a field's value), so a
/// number keeps every digit it was written with (`1.50` stays `1.50`; read into a float it
/// would not). PostgreSQL's `jsonb` writes a number with an exponent out in full (`1.5e3`
/// as `1500`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = Value)]
pub struct RawJson(pub Box<serde_json::value::RawValue>);

impl RawJson {
    /// As a JSON value (numbers as `serde_json` reads them).
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

/// `GET /v1/records/{key}`: one stored record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecordView {
    pub key: String,
    pub data: RawJson,
    pub checksum: String,
    /// The batch that last changed it.
    pub batch_id: BatchId,
    pub updated_at: String,
}

/// `GET /v1/batches/{id}/report`: the outcome of a batch in numbers; the rejected rows
/// themselves are at `GET /v1/batches/{id}/report.csv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchReport {
    pub batch: BatchView,
    /// Row errors per error code, e.g. `{"missing_key": 3}`.
    pub errors_by_code: std::collections::BTreeMap<String, u64>,
    /// Where the rejected rows can be downloaded as CSV.
    pub rejected_rows_csv: String,
}

/// One queue in one state: how much waits there and for how long
/// (`GET /admin/queues`, `dataflow status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueueDepth {
    /// `batches`, `outbox`, or `jobs:<kind>`.
    pub queue: String,
    /// The state counted: a batch or job status, or `unpublished` for the outbox.
    pub state: String,
    pub count: u64,
    /// Age of the oldest item in this state (since it was created), in milliseconds.
    pub oldest_age_ms: Option<u64>,
}

/// A client's UTC day in numbers, written once after the day ended by the fleet leader's
/// daily schedule (`GET /v1/summaries`, `GET /admin/clients/{id}/summaries`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DailySummary {
    pub client_id: ClientId,
    /// `YYYY-MM-DD`, UTC.
    #[schema(format = Date, example = "2026-12-01")]
    pub day: String,
    /// Imports accepted that day (their batches are counted below by where they stand now).
    pub imports: u64,
    /// Batches of that day's imports by status when the summary was written.
    pub batches_by_status: std::collections::BTreeMap<String, u64>,
    pub records_total: u64,
    pub records_written: u64,
    pub records_unchanged: u64,
    pub records_superseded: u64,
    pub records_failed: u64,
    /// Row errors per error code, the most frequent first (at most ten codes).
    pub top_errors: Vec<ErrorCount>,
    pub generated_at: String,
}

/// How many row errors carried one code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorCount {
    pub code: String,
    pub count: u64,
}

/// One live worker process (`GET /admin/workers`, `dataflow workers list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerInfo {
    /// `<host>-<pid>-<nonce>`, unique per process start.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// The DataFlow version it runs.
    pub version: String,
    pub started_at: String,
    /// Its last heartbeat (by its own clock).
    pub heartbeat_at: String,
    /// Batches it is processing now.
    pub in_flight: u64,
    /// Batch attempts it has finished (completed or failed) since it started.
    pub processed: u64,
    /// An operator asked it to drain: it takes no new work and leaves when done.
    pub draining: bool,
    /// It holds the fleet's leader lease: it runs the job sweeper and the daily summaries.
    #[serde(default)]
    pub leader: bool,
}

/// `GET /v1/client`: the client the presented key belongs to ("who am I"), so a producer
/// can check it holds the key it means to use before it uploads anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientIdentity {
    pub id: ClientId,
    pub name: String,
    /// The key id of the presented key (`dfk_<key id>_<secret>`).
    pub key_id: String,
}

/// The body of `POST /admin/batches/{id}/reject` and `…/discard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// Why, for the record: 1 to 1000 characters, not only white space, no NUL.
    #[schema(min_length = 1, max_length = 1000, pattern = r"^[^\x00]*$")]
    pub reason: String,
}

/// `GET /healthz` is plain `ok`; `GET /readyz` answers this (200 when the ledger answers,
/// 503 when it does not; the other parts are reported, never a reason for 503).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: String,
    /// `up` or `down`.
    pub ledger: String,
    /// `embedded` (no Redis configured), `up` or `down`.
    pub redis: String,
    pub events: EventsReadiness,
    pub fallbacks: FallbackCounts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventsReadiness {
    /// `embedded`, `broker`, or `polling` while RabbitMQ is unreachable.
    pub mode: String,
    /// Outbox events not yet published; absent when the ledger did not answer.
    pub outbox_backlog: Option<u64>,
    /// The RabbitMQ node this process's link is up to, as `host:port` from `amqp_url`
    /// (one of a cluster's nodes); absent while there is no link or no broker.
    pub node: Option<String>,
}

/// Decisions made in process because Redis did not answer, since the process started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FallbackCounts {
    pub limiter: u64,
    pub lockout: u64,
}

/// The query of `GET /v1/batches`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BatchListQuery {
    /// Only batches in this state.
    #[param(value_type = Option<BatchStatus>)]
    pub status: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<BatchId>)]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// The query of `GET /v1/batches/{id}/errors`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ErrorPageQuery {
    /// The `next_cursor` of the previous page (`LINE.POSITION`; a bare `LINE` starts
    /// after that line).
    #[param(pattern = r"^[0-9]{1,19}(\.[0-9]{1,18})?$")]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// `GET /v1/records` as JSON: one page in key order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecordPage {
    pub items: Vec<RecordView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One change to a record, as `GET /v1/changes` lists them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecordChangeView {
    /// Its number in the client's feed: 1, 2, … in the order the changes committed.
    pub seq: u64,
    pub key: String,
    pub kind: RecordChangeKind,
    /// The batch that made it; `null` for a deletion through the API.
    pub batch_id: Option<BatchId>,
    /// The record after the change; `null` when it was deleted.
    pub data: Option<RawJson>,
    pub changed_at: String,
}

/// What happened to a record (or, `purged`, to all of a client's records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecordChangeKind {
    Inserted,
    Updated,
    Deleted,
    /// An operator purged the client's data: every record of the changes before this one
    /// is gone (`key` is empty).
    Purged,
}

impl RecordChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inserted => "inserted",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
            Self::Purged => "purged",
        }
    }
}

impl std::str::FromStr for RecordChangeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Inserted, Self::Updated, Self::Deleted, Self::Purged]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown change kind `{s}`"))
    }
}

/// `GET /v1/changes`: the next changes after the cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChangePage {
    pub items: Vec<RecordChangeView>,
    /// Pass as `after` next time: the last change listed, or the `after` given when there
    /// is none yet (poll again with it).
    pub cursor: String,
    /// More changes follow right away.
    pub more: bool,
}

/// The query of `GET /v1/changes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// A `cursor` from an earlier answer; default: from the first change.
    pub after: Option<u64>,
    /// Changes per answer, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The query of `GET /v1/records`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecordListQuery {
    /// The `next_cursor` of the previous page (a record key): records after it.
    #[param(max_length = 512)]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50); an export (NDJSON or CSV) has no pages.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Records changed at or after this time (RFC 3339, e.g. `2026-12-06T00:00:00Z`).
    pub updated_since: Option<String>,
    /// Records last changed by this batch.
    pub batch_id: Option<String>,
    /// Records whose key starts with this.
    #[param(max_length = 512)]
    pub key_prefix: Option<String>,
}

/// `POST /admin/clients/{id}/purge`: what was removed from the ledger, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PurgeView {
    pub records: u64,
    /// Entries of the changes feed.
    pub changes: u64,
    /// Stored files of the client's imports.
    pub payloads: u64,
    pub row_errors: u64,
    pub reports: u64,
}

impl std::fmt::Display for PurgeView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records, {} changes, {} payloads, {} row errors, {} reports removed",
            self.records, self.changes, self.payloads, self.row_errors, self.reports
        )
    }
}

/// The query of `GET /admin/clients/{id}/schema`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SchemaQuery {
    /// A version (1, 2, …); default: the current one.
    #[param(minimum = 1)]
    pub version: Option<u64>,
}

/// The query of `GET /v1/summaries` and `GET /admin/clients/{id}/summaries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SummaryQuery {
    /// Only this UTC day, `YYYY-MM-DD`.
    #[param(format = Date, example = "2026-12-01")]
    pub day: Option<String>,
    /// Most summaries, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}
