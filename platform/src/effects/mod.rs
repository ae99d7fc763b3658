//! What leaves DataFlow: [`mail`] (lettre SMTP, or `.eml` files embedded), signed
//! [`webhook`] deliveries, the rejected-rows [`report`], and record [`export`]s.

pub mod export;
pub mod mail;
pub mod report;
pub mod webhook;
