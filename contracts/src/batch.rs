//! Batch lifecycle states and import formats.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a batch is in its life. The transitions are:
/// `awaiting_approval → ready | rejected`, `ready → processing`,
/// `processing → completed | ready (retry) | dead`, and `dead → ready` by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    AwaitingApproval,
    Ready,
    Processing,
    Completed,
    Rejected,
    Dead,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 6] = [
        Self::AwaitingApproval,
        Self::Ready,
        Self::Processing,
        Self::Completed,
        Self::Rejected,
        Self::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingApproval => "awaiting_approval",
            Self::Ready => "ready",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Rejected => "rejected",
            Self::Dead => "dead",
        }
    }

    /// A batch in a terminal state never changes again without an operator.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Rejected | Self::Dead)
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BatchStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown batch status `{s}`"))
    }
}

/// The two record formats an import can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImportFormat {
    /// `text/csv` with a header row.
    Csv,
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
}

impl ImportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Ndjson => "ndjson",
        }
    }

    /// The media type, parameters ignored (`text/csv; charset=utf-8` is CSV).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "text/csv" => Some(Self::Csv),
            "application/x-ndjson" | "application/jsonl" | "application/jsonlines" => {
                Some(Self::Ndjson)
            }
            _ => None,
        }
    }
}

impl FromStr for ImportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "csv" => Ok(Self::Csv),
            "ndjson" => Ok(Self::Ndjson),
            other => Err(format!("unknown import format `{other}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for st in BatchStatus::ALL {
            assert_eq!(st.as_str().parse::<BatchStatus>().unwrap(), st);
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            ImportFormat::from_content_type("text/csv; charset=utf-8"),
            Some(ImportFormat::Csv)
        );
        assert_eq!(
            ImportFormat::from_content_type("Application/X-NDJSON"),
            Some(ImportFormat::Ndjson)
        );
        assert_eq!(ImportFormat::from_content_type("application/json"), None);
    }
}
