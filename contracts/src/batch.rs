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

/// Where an import's batch stands among its own client's batches: a client's `high`
/// batches are claimed before its `normal` ones, and those before its `low` ones. Between
/// clients the fair share decides, whatever the priorities (one client's `high` does not
/// overtake another client's `low`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    /// As the ledger stores it: the claim takes the greatest first.
    pub fn rank(self) -> i16 {
        match self {
            Self::High => 1,
            Self::Normal => 0,
            Self::Low => -1,
        }
    }

    /// The priority a stored rank stands for.
    pub fn from_rank(rank: i64) -> Result<Self, String> {
        match rank {
            1 => Ok(Self::High),
            0 => Ok(Self::Normal),
            -1 => Ok(Self::Low),
            other => Err(format!("unknown priority rank {other}")),
        }
    }
}

impl FromStr for Priority {
    type Err = String;
    /// `high`, `normal` or `low`, in any case.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Ok(Self::High),
            "normal" => Ok(Self::Normal),
            "low" => Ok(Self::Low),
            _ => Err(format!(
                "priority `{s}` is not one of `high`, `normal`, `low`"
            )),
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
    fn priorities_parse_and_rank() {
        for p in [Priority::High, Priority::Normal, Priority::Low] {
            assert_eq!(p.as_str().parse::<Priority>().unwrap(), p);
            assert_eq!(Priority::from_rank(i64::from(p.rank())).unwrap(), p);
        }
        assert_eq!(" HIGH ".parse::<Priority>().unwrap(), Priority::High);
        assert!("urgent".parse::<Priority>().unwrap_err().contains("urgent"));
        assert!(Priority::High.rank() > Priority::Normal.rank());
        assert!(Priority::Normal.rank() > Priority::Low.rank());
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
