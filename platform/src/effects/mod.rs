//! What jobs do to the outside world: [`mail`] (lettre SMTP, or `.eml` files embedded),
//! signed [`webhook`] deliveries, and the rejected-rows [`report`].

pub mod mail;
pub mod report;
pub mod webhook;
