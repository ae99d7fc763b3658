//! The per-client policy: limits and rules applied to every import of one client.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Upper bound for any field name a policy mentions; longer names are certainly mistakes.
const MAX_FIELD_NAME: usize = 128;

/// Largest claim `weight`: a client served this many times as often as a weight-1 client
/// is already as good as unshared, and the ledger's claim counter grows by
/// `1_000_000 / weight` per claim, which stays exact for every weight up to here.
pub const MAX_WEIGHT: u32 = 1_000;

/// A client's policy as stored and as returned by `GET /admin/clients/{id}/policy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Largest accepted request body, in bytes (capped by the server's own limit).
    #[schema(minimum = 1)]
    pub max_payload_bytes: u64,
    /// Most records one import may carry.
    #[schema(minimum = 1)]
    pub max_records: u64,
    /// Fields every record must have, non-empty; records without them become row errors.
    pub required_fields: Vec<String>,
    /// The field whose value identifies a record: re-importing the same key updates it.
    pub key_field: String,
    /// Records accepted per UTC day across all imports; `None` means unlimited.
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    pub daily_record_quota: Option<u64>,
    /// Sustained request rate.
    #[schema(minimum = 1)]
    pub rate_per_minute: u32,
    /// Requests allowed at once above the sustained rate.
    #[schema(minimum = 1)]
    pub rate_burst: u32,
    /// How long an identical payload is answered with the first import instead of a new one.
    pub dedup_window_secs: u64,
    /// New batches wait in `awaiting_approval` until an operator approves them.
    pub approval_required: bool,
    /// Where batch results are mailed.
    pub notify_email: Option<String>,
    /// Where batch events are delivered.
    pub webhook_url: Option<String>,
    /// The share of refused records (0 to 1) above which a batch writes no record at all
    /// and ends `rejected` (`too_many_errors`); `None`: the valid records are always
    /// written. A client schema's `maxErrorRatio` takes precedence.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub max_error_ratio: Option<f64>,
    /// The client's share of the worker fleet while several clients wait: claims go round
    /// the waiting clients, and a client of weight 3 is served three times for every once
    /// of a client of weight 1. Between 1 and 1,000.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1000)]
    pub weight: u32,
    /// Most of the client's batches processed at once across the whole fleet, whatever the
    /// number of workers (a batch over it waits `ready`); `None`: no cap beyond the
    /// fleet's own size.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_concurrent_batches: Option<u32>,
    /// Largest file a resumable upload (`/v1/uploads`) may carry, in bytes.
    #[serde(default = "default_max_upload_bytes")]
    #[schema(minimum = 1, maximum = 9_223_372_036_854_775_807_u64)]
    pub max_upload_bytes: u64,
    /// How long the file of a completed, rejected or dead batch is kept, in seconds; the
    /// batch, its counts and its errors stay after.
    #[serde(default = "default_payload_retention_secs")]
    #[schema(minimum = 1)]
    pub payload_retention_secs: u64,
}

fn one() -> u32 {
    1
}

fn default_max_upload_bytes() -> u64 {
    10 * 1024 * 1024 * 1024
}

fn default_payload_retention_secs() -> u64 {
    7 * 24 * 3600
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_payload_bytes: 32 * 1024 * 1024,
            max_records: 1_000_000,
            required_fields: Vec::new(),
            key_field: "id".to_owned(),
            daily_record_quota: None,
            rate_per_minute: 600,
            rate_burst: 60,
            dedup_window_secs: 24 * 3600,
            approval_required: false,
            notify_email: None,
            webhook_url: None,
            max_error_ratio: None,
            weight: 1,
            max_concurrent_batches: None,
            max_upload_bytes: default_max_upload_bytes(),
            payload_retention_secs: default_payload_retention_secs(),
        }
    }
}

/// A partial update: only the fields present change. `null` clears an optional field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_payload_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_records: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_fields: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    pub daily_record_quota: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub rate_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub rate_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_required: Option<bool>,
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub notify_email: Option<Option<String>>,
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub webhook_url: Option<Option<String>>,
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 0, maximum = 1)]
    pub max_error_ratio: Option<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub weight: Option<u32>,
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1)]
    pub max_concurrent_batches: Option<Option<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9_223_372_036_854_775_807_u64)]
    pub max_upload_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub payload_retention_secs: Option<u64>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl Policy {
    /// Applies a patch and validates the result; the policy is unchanged on error.
    pub fn patched(&self, patch: &PolicyPatch) -> Result<Policy, String> {
        let mut p = self.clone();
        macro_rules! take {
            ($($f:ident),*) => { $(if let Some(v) = &patch.$f { p.$f = v.clone(); })* };
        }
        take!(
            max_payload_bytes,
            max_records,
            required_fields,
            key_field,
            daily_record_quota,
            rate_per_minute,
            rate_burst,
            dedup_window_secs,
            approval_required,
            notify_email,
            webhook_url,
            max_error_ratio,
            weight,
            max_concurrent_batches,
            max_upload_bytes,
            payload_retention_secs
        );
        p.validate()?;
        Ok(p)
    }

    /// Checks the rules a policy must satisfy; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_payload_bytes == 0 {
            return Err("max_payload_bytes must be at least 1".into());
        }
        if self.max_records == 0 {
            return Err("max_records must be at least 1".into());
        }
        // Offsets are signed 64-bit integers in the ledger.
        if self.max_upload_bytes == 0 || i64::try_from(self.max_upload_bytes).is_err() {
            return Err(format!(
                "max_upload_bytes must be between 1 and {}",
                i64::MAX
            ));
        }
        // Milliseconds of it must fit the ledger's clock arithmetic.
        if self.payload_retention_secs == 0 || self.payload_retention_secs > i64::MAX as u64 / 4000
        {
            return Err(format!(
                "payload_retention_secs must be between 1 and {}",
                i64::MAX / 4000
            ));
        }
        if self.rate_per_minute == 0 || self.rate_burst == 0 {
            return Err("rate_per_minute and rate_burst must be at least 1".into());
        }
        // The ledger counts records in signed 64-bit integers.
        if self
            .daily_record_quota
            .is_some_and(|q| i64::try_from(q).is_err())
        {
            return Err(format!("daily_record_quota must be at most {}", i64::MAX));
        }
        check_field_name("key_field", &self.key_field)?;
        for f in &self.required_fields {
            check_field_name("required_fields", f)?;
        }
        if let Some(email) = &self.notify_email {
            let (local, domain) = email.split_once('@').unwrap_or(("", ""));
            if local.is_empty()
                || !domain.contains('.')
                || email.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!("notify_email `{email}` is not an email address"));
            }
        }
        if let Some(r) = self.max_error_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(format!("max_error_ratio must be between 0 and 1, not {r}"));
        }
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            return Err(format!(
                "weight must be between 1 and {MAX_WEIGHT}, not {}",
                self.weight
            ));
        }
        // Stored as a signed 32-bit integer beside the client.
        if self
            .max_concurrent_batches
            .is_some_and(|n| n == 0 || i32::try_from(n).is_err())
        {
            return Err(format!(
                "max_concurrent_batches must be between 1 and {} (or null: no cap)",
                i32::MAX
            ));
        }
        if let Some(url) = &self.webhook_url
            && (!(url.starts_with("https://") || url.starts_with("http://"))
                || url.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(format!("webhook_url `{url}` must be an http(s) URL"));
        }
        Ok(())
    }
}

fn check_field_name(what: &str, name: &str) -> Result<(), String> {
    if name.chars().any(char::is_control) {
        return Err(format!(
            "{what}: field names must not contain control characters"
        ));
    }
    if name.trim().is_empty() {
        return Err(format!("{what}: field names must not be empty"));
    }
    if name.len() > MAX_FIELD_NAME {
        return Err(format!(
            "{what}: field name longer than {MAX_FIELD_NAME} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_valid() {
        Policy::default().validate().unwrap();
    }

    #[test]
    fn patch_distinguishes_absent_from_null() {
        let base = Policy {
            notify_email: Some("ops@example.com".into()),
            ..Policy::default()
        };
        let keep: PolicyPatch = serde_json::from_str(r#"{"rate_burst": 5}"#).unwrap();
        let p = base.patched(&keep).unwrap();
        assert_eq!(p.rate_burst, 5);
        assert_eq!(p.notify_email.as_deref(), Some("ops@example.com"));
        let clear: PolicyPatch = serde_json::from_str(r#"{"notify_email": null}"#).unwrap();
        assert_eq!(base.patched(&clear).unwrap().notify_email, None);
    }

    #[test]
    fn fair_share_fields_default_and_are_bounded() {
        // A policy stored before the fields existed reads with the defaults.
        let mut stored = serde_json::to_value(Policy::default()).unwrap();
        let fields = stored.as_object_mut().unwrap();
        fields.remove("weight");
        fields.remove("max_concurrent_batches");
        let old: Policy = serde_json::from_value(stored).unwrap();
        assert_eq!((old.weight, old.max_concurrent_batches), (1, None));
        for bad in [
            r#"{"weight": 0}"#,
            r#"{"weight": 1001}"#,
            r#"{"max_concurrent_batches": 0}"#,
            r#"{"max_concurrent_batches": 4000000000}"#,
        ] {
            let patch: PolicyPatch = serde_json::from_str(bad).unwrap();
            assert!(Policy::default().patched(&patch).is_err(), "{bad}");
        }
        let ok: PolicyPatch =
            serde_json::from_str(r#"{"weight": 3, "max_concurrent_batches": 2}"#).unwrap();
        let p = Policy::default().patched(&ok).unwrap();
        assert_eq!((p.weight, p.max_concurrent_batches), (3, Some(2)));
        let uncap: PolicyPatch =
            serde_json::from_str(r#"{"max_concurrent_batches": null}"#).unwrap();
        assert_eq!(p.patched(&uncap).unwrap().max_concurrent_batches, None);
    }

    #[test]
    fn patch_rejects_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<PolicyPatch>(r#"{"rate": 5}"#).is_err());
        let zero: PolicyPatch = serde_json::from_str(r#"{"rate_per_minute": 0}"#).unwrap();
        assert!(Policy::default().patched(&zero).is_err());
        let email: PolicyPatch = serde_json::from_str(r#"{"notify_email": "nope"}"#).unwrap();
        assert!(
            Policy::default()
                .patched(&email)
                .unwrap_err()
                .contains("notify_email")
        );
    }
}
