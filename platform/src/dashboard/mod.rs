//! The dashboard's shared state: the [`live`] update bus behind its server-sent events, and
//! the login [`sessions`].

pub mod live;
pub mod sessions;
