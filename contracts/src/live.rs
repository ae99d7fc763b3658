//! Live updates for operator dashboards: a small note that something changed, sent where
//! the change happened (API, worker) and fanned out to every process's SSE clients.
//!
//! A live update is a hint, never the record: it carries only what changed and when, and a
//! dashboard that hears it re-reads the ledger. Lost updates cost freshness, not truth.

use serde::{Deserialize, Serialize};

use crate::time;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveEvent {
    pub kind: LiveKind,
    /// The batch, job or worker id the change is about.
    pub subject: String,
    pub at: String,
}

impl LiveEvent {
    /// `kind` happened to `subject` just now (by this host's clock).
    pub fn now(kind: LiveKind, subject: impl Into<String>) -> Self {
        Self {
            kind,
            subject: subject.into(),
            at: time::rfc3339(time::now_ms()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveKind {
    BatchCreated,
    BatchReady,
    BatchProcessing,
    BatchCompleted,
    BatchFailed,
    BatchRejected,
    BatchDead,
    JobDead,
    WorkerJoined,
    WorkerLeft,
}

impl LiveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BatchCreated => "batch_created",
            Self::BatchReady => "batch_ready",
            Self::BatchProcessing => "batch_processing",
            Self::BatchCompleted => "batch_completed",
            Self::BatchFailed => "batch_failed",
            Self::BatchRejected => "batch_rejected",
            Self::BatchDead => "batch_dead",
            Self::JobDead => "job_dead",
            Self::WorkerJoined => "worker_joined",
            Self::WorkerLeft => "worker_left",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialize_as_their_names() {
        for kind in [
            LiveKind::BatchProcessing,
            LiveKind::JobDead,
            LiveKind::WorkerLeft,
        ] {
            let json = serde_json::to_value(kind).unwrap_or_default();
            assert_eq!(json, kind.as_str());
        }
    }
}
