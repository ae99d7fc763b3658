//! Schemas compiled once per process: a version never changes, so a compiled copy is good
//! for as long as the process lives, and a burst of small imports does not compile the same
//! patterns once per import.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dataflow_contracts::ClientId;

use super::schema::{Schema, SchemaError};

/// Beyond this many versions held, the memo starts again empty.
const MAX_HELD: usize = 1_000;

#[derive(Debug, Default)]
pub struct CompiledSchemas {
    held: Mutex<HashMap<(ClientId, u64), Arc<Schema>>>,
}

impl CompiledSchemas {
    /// `client`'s schema `version`, compiled from `document` unless it was before.
    pub fn get(
        &self,
        client: &ClientId,
        version: u64,
        document: &str,
    ) -> Result<Arc<Schema>, SchemaError> {
        let key = (client.clone(), version);
        if let Some(schema) = self.lock().get(&key) {
            return Ok(schema.clone());
        }
        let schema = Arc::new(Schema::parse(document)?);
        let mut held = self.lock();
        if held.len() >= MAX_HELD {
            held.clear();
        }
        held.insert(key, schema.clone());
        Ok(schema)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ClientId, u64), Arc<Schema>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_compiled_once_and_versions_are_kept_apart() {
        let memo = CompiledSchemas::default();
        let client = ClientId::generate();
        let one = r#"{"fields": [{"name": "id"}]}"#;
        let two = r#"{"fields": [{"name": "id"}, {"name": "qty", "type": "integer"}]}"#;
        let a = memo.get(&client, 1, one).unwrap();
        // The same version is not read again, whatever text comes with it.
        assert!(Arc::ptr_eq(&a, &memo.get(&client, 1, two).unwrap()));
        assert_eq!(memo.get(&client, 2, two).unwrap().fields.len(), 2);
        assert!(memo.get(&client, 3, "{").is_err());
    }
}
