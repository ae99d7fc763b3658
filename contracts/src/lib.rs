//! DataFlow wire types: everything that crosses a process boundary, and nothing that does I/O.
//!
//! Layout:
//! - [`ids`]: prefixed, time-sortable identifiers (`cli_…`, `imp_…`, `bat_…`, `evt_…`, `job_…`).
//! - [`batch`]: batch lifecycle states and import formats.
//! - [`policy`]: the per-client policy and its validation.
//! - [`events`]: the versioned event envelope and the batch lifecycle events.
//! - [`jobs`]: follow-up jobs (email, report, webhook) and their queue message.
//! - [`live`]: the live updates operator dashboards hear over SSE.
//! - [`http`]: request and response bodies of the HTTP API.

pub mod batch;
pub mod events;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod live;
pub mod policy;
pub mod time;

pub use batch::{BatchStatus, ImportFormat, Priority};
pub use ids::{BatchId, ClientId, EventId, IdError, ImportId, JobId, UploadId};
pub use policy::Policy;

/// Longest record key (the value of a policy's `key_field`) DataFlow stores.
pub const MAX_RECORD_KEY_BYTES: usize = 512;
