//! Batch lifecycle events in one versioned envelope.
//!
//! JSON form (what a consumer in any language reads):
//! ```json
//! {"id":"evt_01J…","type":"BatchCompleted","version":1,"occurred_at":"2026-11-23T12:00:00.000Z",
//!  "batch_id":"bat_01J…","client_id":"cli_01J…",
//!  "payload":{"records_total":3,"records_written":2,"records_unchanged":0,"records_superseded":0,"records_failed":1,"duration_ms":12}}
//! ```
//! Events are small: ids and counts, never the records themselves. The JSON Schema of the
//! envelope and of every payload is `contracts/schema/events.schema.json`; a test checks
//! that what this code writes matches it.

use serde::{Deserialize, Serialize};

use crate::ids::{BatchId, ClientId, EventId, ImportId};
use crate::{ImportFormat, time};

/// The envelope version this code writes and understands.
pub const ENVELOPE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: EventId,
    pub version: u32,
    pub occurred_at: String,
    pub batch_id: BatchId,
    pub client_id: ClientId,
    #[serde(flatten)]
    pub event: Event,
}

impl Envelope {
    pub fn new(batch_id: BatchId, client_id: ClientId, occurred_at_ms: i64, event: Event) -> Self {
        Self {
            id: EventId::generate(),
            version: ENVELOPE_VERSION,
            occurred_at: time::rfc3339(occurred_at_ms),
            batch_id,
            client_id,
            event,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum Event {
    BatchCreated(BatchCreated),
    BatchReady(BatchReady),
    BatchCompleted(BatchCompleted),
    BatchFailed(BatchFailed),
    BatchRejected(BatchRejected),
    BatchDead(BatchDead),
}

impl Event {
    /// The event's name, as in the envelope's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BatchCreated(_) => "BatchCreated",
            Self::BatchReady(_) => "BatchReady",
            Self::BatchCompleted(_) => "BatchCompleted",
            Self::BatchFailed(_) => "BatchFailed",
            Self::BatchRejected(_) => "BatchRejected",
            Self::BatchDead(_) => "BatchDead",
        }
    }

    /// The topic routing key, `batch.<state>`.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Self::BatchCreated(_) => "batch.created",
            Self::BatchReady(_) => "batch.ready",
            Self::BatchCompleted(_) => "batch.completed",
            Self::BatchFailed(_) => "batch.failed",
            Self::BatchRejected(_) => "batch.rejected",
            Self::BatchDead(_) => "batch.dead",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCreated {
    pub import_id: ImportId,
    pub format: ImportFormat,
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReady {
    pub import_id: ImportId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCompleted {
    pub records_total: u64,
    pub records_written: u64,
    pub records_unchanged: u64,
    /// Records left alone because an import accepted after this one had written them
    /// (absent from events written before it was counted).
    #[serde(default)]
    pub records_superseded: u64,
    pub records_failed: u64,
    pub duration_ms: u64,
    /// The numbers of the first and the last record change the batch made in the client's
    /// changes feed (`GET /v1/changes?after=<first - 1>` starts at its first); absent when it
    /// changed no record. Other batches' changes may fall between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeRange>,
}

/// A span of change numbers, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRange {
    pub first: u64,
    pub last: u64,
}

/// One attempt failed; the batch is retried at `retry_at` unless it went `dead`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFailed {
    pub attempt: u32,
    pub error: String,
    pub retry_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRejected {
    pub reason: String,
    /// Why, as a stable code: `operator` (rejected or discarded by an operator) or
    /// `too_many_errors` (more records refused than the error threshold allows: nothing
    /// was written). Absent in events written before codes existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl BatchRejected {
    pub const BY_OPERATOR: &str = "operator";
    pub const TOO_MANY_ERRORS: &str = "too_many_errors";

    /// Refused for its errors: the batch has a report of them to send.
    pub fn for_errors(&self) -> bool {
        self.code.as_deref() == Some(Self::TOO_MANY_ERRORS)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchDead {
    pub attempts: u32,
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn envelope_round_trips_with_documented_shape() {
        let env = Envelope::new(
            BatchId::generate(),
            ClientId::generate(),
            0,
            Event::BatchCompleted(BatchCompleted {
                records_total: 3,
                records_written: 2,
                records_unchanged: 0,
                records_superseded: 0,
                records_failed: 1,
                duration_ms: 12,
                changes: None,
            }),
        );
        let v = serde_json::to_value(&env).unwrap();
        assert_eq!(v["type"], "BatchCompleted");
        assert_eq!(v["version"], 1);
        assert_eq!(v["occurred_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["payload"]["records_failed"], 1);
        assert!(v["id"].as_str().unwrap().starts_with("evt_"));
        let back: Envelope = serde_json::from_value(v).unwrap();
        assert_eq!(back, env);
    }

    fn all_six() -> Vec<Event> {
        vec![
            Event::BatchCreated(BatchCreated {
                import_id: ImportId::generate(),
                format: ImportFormat::Csv,
                records: 1,
                bytes: 2,
            }),
            Event::BatchReady(BatchReady {
                import_id: ImportId::generate(),
            }),
            Event::BatchCompleted(BatchCompleted {
                records_total: 3,
                records_written: 2,
                records_unchanged: 0,
                records_superseded: 0,
                records_failed: 1,
                duration_ms: 12,
                changes: Some(ChangeRange { first: 4, last: 5 }),
            }),
            Event::BatchFailed(BatchFailed {
                attempt: 1,
                error: "e".into(),
                retry_at: "t".into(),
            }),
            Event::BatchRejected(BatchRejected {
                reason: "r".into(),
                code: Some(BatchRejected::TOO_MANY_ERRORS.into()),
            }),
            Event::BatchDead(BatchDead {
                attempts: 5,
                error: "e".into(),
            }),
        ]
    }

    #[test]
    fn every_event_round_trips() {
        for ev in all_six() {
            let env = Envelope::new(BatchId::generate(), ClientId::generate(), 1, ev);
            let json = serde_json::to_string(&env).unwrap();
            assert!(json.contains(env.event.kind()));
            assert_eq!(serde_json::from_str::<Envelope>(&json).unwrap(), env);
        }
    }

    const SCHEMA: &str = include_str!("../schema/events.schema.json");

    /// The subset of JSON Schema the events schema uses: `type`, `required`, `properties`,
    /// `additionalProperties: false`, `enum`, `const`, `minimum`, `$ref` and `oneOf`
    /// (`pattern` and `format` are documentation here).
    fn check(schema: &Value, root: &Value, v: &Value) -> Result<(), String> {
        let schema = match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/$defs/");
                &root["$defs"][name]
            }
            None => schema,
        };
        match schema.get("type").and_then(Value::as_str) {
            Some("object") if !v.is_object() => return Err(format!("{v} is not an object")),
            Some("string") if !v.is_string() => return Err(format!("{v} is not a string")),
            Some("integer") if !(v.is_u64() || v.is_i64()) => {
                return Err(format!("{v} is not an integer"));
            }
            _ => {}
        }
        if let Some(min) = schema.get("minimum").and_then(Value::as_i64)
            && v.as_i64().is_some_and(|n| n < min)
        {
            return Err(format!("{v} is below {min}"));
        }
        if let Some(c) = schema.get("const")
            && c != v
        {
            return Err(format!("{v} is not {c}"));
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !options.contains(v)
        {
            return Err(format!("{v} is not one of {options:?}"));
        }
        let props = schema.get("properties").and_then(Value::as_object);
        if let (Some(obj), Some(props)) = (v.as_object(), props) {
            for req in schema["required"].as_array().into_iter().flatten() {
                let req = req.as_str().unwrap_or_default();
                if !obj.contains_key(req) {
                    return Err(format!("missing {req}"));
                }
            }
            for (k, field) in obj {
                match props.get(k) {
                    Some(s) => check(s, root, field).map_err(|e| format!("{k}: {e}"))?,
                    None if schema["additionalProperties"] == false => {
                        return Err(format!("unexpected field {k}"));
                    }
                    None => {}
                }
            }
        }
        if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
            let matching = branches
                .iter()
                .filter(|b| check(b, root, v).is_ok())
                .count();
            if matching != 1 {
                return Err(format!("{matching} oneOf branches match {v}"));
            }
        }
        Ok(())
    }

    #[test]
    fn every_event_matches_the_published_json_schema() {
        let root: Value = serde_json::from_str(SCHEMA).unwrap();
        for ev in all_six() {
            let env = Envelope::new(BatchId::generate(), ClientId::generate(), 1, ev);
            let v = serde_json::to_value(&env).unwrap();
            check(&root, &root, &v).unwrap_or_else(|e| panic!("{}: {e}", env.event.kind()));
        }
        // The checker does reject what the schema forbids.
        let ready = Envelope::new(
            BatchId::generate(),
            ClientId::generate(),
            1,
            all_six().swap_remove(1),
        );
        let mut v = serde_json::to_value(&ready).unwrap();
        v["payload"] = serde_json::json!({"records": 1});
        assert!(check(&root, &root, &v).is_err());
        v["type"] = "BatchLost".into();
        assert!(check(&root, &root, &v).is_err());
    }
}
