//! Follow-up jobs: what a batch event asks to be done afterwards, and the message that
//! carries one job through a queue.
//!
//! A job's intent is a row in the SQL ledger, written in the same transaction as the event
//! that caused it; queues only carry copies of it. Its id keys every side effect (the
//! email's `Message-ID`, the webhook's `webhook-id`), so receivers can drop a repeat.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::events::Envelope;
use crate::ids::{BatchId, ClientId, JobId};

/// The kinds of job; each has its own queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Mail the batch result to the client's `notify_email`.
    Email,
    /// Store the batch report (summary and rejected rows) for download.
    Report,
    /// Deliver the event to the client's `webhook_url`, signed (Standard Webhooks).
    Webhook,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [Self::Email, Self::Report, Self::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Report => "report",
            Self::Webhook => "webhook",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown job kind `{s}`"))
    }
}

/// Where a job is. `pending → queued → done`, or `pending → running → done` without Redis;
/// a failed attempt goes back to `pending` (later), the last one to `dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting in SQL until `run_at`.
    Pending,
    /// Handed to the Redis queue.
    Queued,
    /// Claimed from SQL by a worker (embedded mode).
    Running,
    Done,
    /// Attempts used up, or a failure that no retry can fix; an operator may retry it.
    Dead,
    /// A dead job an operator gave up on: out of the dead-letter queue, never run again.
    Discarded,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        Self::Pending,
        Self::Queued,
        Self::Running,
        Self::Done,
        Self::Dead,
        Self::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Dead => "dead",
            Self::Discarded => "discarded",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown job status `{s}`"))
    }
}

/// What one job does, fixed when the intent is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    Email { to: String },
    Report,
    Webhook { url: String, event: Box<Envelope> },
}

impl JobSpec {
    pub fn kind(&self) -> JobKind {
        match self {
            Self::Email { .. } => JobKind::Email,
            Self::Report => JobKind::Report,
            Self::Webhook { .. } => JobKind::Webhook,
        }
    }
}

/// One job as it travels through a queue: the intent plus how often it was tried.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMessage {
    pub id: JobId,
    pub batch_id: BatchId,
    pub client_id: ClientId,
    /// Attempts already made (0 on the first run).
    pub attempts: u32,
    pub max_attempts: u32,
    /// The job's delivery epoch when this message was taken from the ledger (see
    /// [`JobTicket`]). Messages written before epochs existed read as 0, the epoch the
    /// ledger gave every job then.
    #[serde(default)]
    pub epoch: u64,
    /// The [`JobSpec`] as stored; decoded by the handler, so a queue never re-encodes it.
    pub spec: Box<RawValue>,
    /// The W3C trace context the job's run continues (the completion that asked for it);
    /// absent when traces are off, and in messages written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl JobMessage {
    pub fn decode_spec(&self) -> Result<JobSpec, serde_json::Error> {
        serde_json::from_str(self.spec.get())
    }

    /// The delivery this message is.
    pub fn ticket(&self) -> JobTicket {
        JobTicket {
            id: self.id.clone(),
            epoch: self.epoch,
        }
    }
}

/// One delivery of a job: the job, and its delivery epoch, which the ledger moves on every
/// time the job changes hands (each take from the ledger, each hand-back to it). A
/// delivery's result (done, failed) and its removal from the queue apply only while its
/// epoch is the job's current one, so a superseded delivery that answers late (its worker
/// was cut off and presumed dead) changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobTicket {
    pub id: JobId,
    pub epoch: u64,
}

/// A job as operators see it (`GET /admin/jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: JobId,
    pub kind: JobKind,
    pub batch_id: BatchId,
    pub client_id: ClientId,
    pub status: JobStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    /// When the next attempt may start.
    pub run_at: String,
    pub last_error: Option<String>,
    pub created_at: String,
    pub done_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Jobs per kind and status (`GET /admin/jobs/stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobCount {
    pub kind: JobKind,
    pub status: JobStatus,
    pub count: u64,
}

/// The key a client verifies webhook signatures with (`GET /v1/webhooks/secret`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookSecret {
    /// `whsec_` + base64 of the key bytes, as Standard Webhooks libraries expect it.
    pub secret: String,
}

/// The query of `GET /admin/jobs`; every filter is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobListQuery {
    /// `dead` is the dead-letter queue.
    #[param(value_type = Option<JobStatus>)]
    pub status: Option<String>,
    #[param(value_type = Option<JobKind>)]
    pub kind: Option<String>,
    #[param(value_type = Option<BatchId>)]
    pub batch_id: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<JobId>)]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}
