//! End-to-end tests: a real DataFlow process per test, over HTTP on port 0, against a fresh
//! SQLite file and a fresh PostgreSQL database.

mod helpers;

mod auth;
mod imports;
mod worker;
