//! Identifiers are a type prefix plus a ULID, so they sort by creation time (which the
//! cursor pagination relies on) and a stray id in a log says what it points at.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An id string that does not have the expected `prefix_ULID` shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError {
    pub expected_prefix: &'static str,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected an id of the form {}_<ULID>",
            self.expected_prefix
        )
    }
}

impl std::error::Error for IdError {}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id; ids made later sort after ids made earlier (to the millisecond).
            pub fn generate() -> Self {
                Self::from_ulid(ulid::Ulid::new())
            }

            /// The id of this ULID: the first id minted at a millisecond is
            /// `from_ulid(Ulid::from_parts(ms, 0))`, a bound for a range of ids by time.
            pub fn from_ulid(ulid: ulid::Ulid) -> Self {
                Self(format!("{}_{}", $prefix, ulid))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The ULID part (ids are validated when they are made, so it always parses).
            pub fn ulid(&self) -> ulid::Ulid {
                let rest = self.0.get($prefix.len() + 1..).unwrap_or_default();
                ulid::Ulid::from_string(rest).unwrap_or_default()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let err = IdError { expected_prefix: $prefix };
                let rest = s
                    .strip_prefix($prefix)
                    .and_then(|r| r.strip_prefix('_'))
                    .ok_or(err.clone())?;
                let ulid = ulid::Ulid::from_string(rest).map_err(|_| err)?;
                // Normalise to the canonical upper-case form so lookups match stored ids.
                Ok(Self(format!("{}_{}", $prefix, ulid)))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        // By hand rather than derived: the wire form is the prefixed string, not the newtype.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                id_schema($prefix)
            }
        }

        impl utoipa::ToSchema for $name {}

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// The OpenAPI schema of an id: `prefix_` and a ULID in Crockford's base 32. Ids leave
/// DataFlow upper-case; lower-case input is accepted and normalised, so the pattern says so.
fn id_schema(prefix: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!(
            "^{prefix}_[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{{26}}$"
        )))
        .examples([format!("{prefix}_01KB8Q7R6XQ8T2B4C6D8F0G2H4")])
        .into()
}

prefixed_id!(
    /// A tenant.
    ClientId,
    "cli"
);
prefixed_id!(
    /// One accepted `POST /v1/imports`.
    ImportId,
    "imp"
);
prefixed_id!(
    /// The unit of processing created for an import.
    BatchId,
    "bat"
);
prefixed_id!(
    /// A file on its way in: a resumable upload (`/v1/uploads`), or a large request body
    /// while it is read and checked.
    UploadId,
    "upl"
);
prefixed_id!(
    /// A lifecycle event; consumers deduplicate on it.
    EventId,
    "evt"
);
prefixed_id!(
    /// A follow-up job (email, report, webhook); side effects are keyed by it.
    JobId,
    "job"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip_and_sort() {
        let a = BatchId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = BatchId::generate();
        assert!(a < b);
        assert_eq!(a.as_str().parse::<BatchId>().unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<BatchId>(&json).unwrap(), a);
    }

    #[test]
    fn rejects_wrong_prefix_and_garbage() {
        let b = BatchId::generate();
        assert!(
            b.as_str()
                .replace("bat_", "imp_")
                .parse::<BatchId>()
                .is_err()
        );
        assert!("bat_".parse::<BatchId>().is_err());
        assert!("bat_not-a-ulid".parse::<BatchId>().is_err());
        assert!(serde_json::from_str::<ClientId>("\"x\"").is_err());
    }

    #[test]
    fn lower_case_input_is_normalised() {
        let b = BatchId::generate();
        let lower = b.as_str().to_lowercase();
        assert_eq!(lower.parse::<BatchId>().unwrap(), b);
    }
}
