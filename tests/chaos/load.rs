//! The recorded load: a few tasks submit imports across the API processes, each with an
//! `Idempotency-Key` and a body of its own, and record every request as ok, failed (the
//! server answered something else) or unknown (a timeout or a connection error: it may or
//! may not have been applied). A request that is not settled is sent again with the same key
//! and body, as a careful client would, until it is or the load gives up.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dataflow_contracts::http::ImportView;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::common::records::csv;

/// Tasks submitting at once, and the pause each takes between two imports.
const TASKS: usize = 3;
const PAUSE: Duration = Duration::from_millis(700);
/// Records in each import (a batch is then several chunks long).
pub const RECORDS: usize = 100;
/// One attempt's limit; shorter than the server's request timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the load goes on retrying what is unsettled once it was told to stop.
const RESOLVE: Duration = Duration::from_secs(45);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

/// One HTTP request of an import.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The API process it went to.
    pub api: usize,
    pub started: Instant,
    pub ended: Instant,
    pub outcome: Outcome,
    /// The answer's status, when there was one.
    pub status: Option<u16>,
    /// The error body's `code`, or the transport error.
    pub detail: String,
    pub retry_after: bool,
    /// An answer replayed from an earlier request with the same key.
    pub replayed: bool,
}

/// One import as the client saw it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub key: String,
    pub records: usize,
    pub attempts: Vec<Attempt>,
    /// The import an answer acknowledged (2xx).
    pub acked: Option<ImportView>,
}

pub struct Load {
    stop: CancellationToken,
    stopped_at: Arc<OnceLock<Instant>>,
    tasks: JoinSet<()>,
    sent: Arc<Mutex<Vec<Sent>>>,
}

impl Load {
    /// Starts submitting to `apis` (base URLs) with the API key `key`; keys and record ids
    /// start with `tag`.
    pub fn start(apis: Vec<String>, key: String, tag: String) -> Load {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let stopped_at = Arc::new(OnceLock::new());
        let sent = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..TASKS {
            let submitter = Submitter {
                http: http.clone(),
                apis: apis.clone(),
                key: key.clone(),
                stop: stop.clone(),
                stopped_at: stopped_at.clone(),
            };
            let (sent, next, tag, stop) = (sent.clone(), next.clone(), tag.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let seq = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let done = submitter.submit(&format!("{tag}-{seq}"), seq).await;
                    sent.lock().unwrap().push(done);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(PAUSE) => {}
                    }
                }
            });
        }
        Load {
            stop,
            stopped_at,
            tasks,
            sent,
        }
    }

    /// Stops new imports, lets the unsettled ones be retried (for a while), and returns
    /// every import sent, in no particular order.
    pub async fn finish(mut self) -> Vec<Sent> {
        let _ = self.stopped_at.set(Instant::now());
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

struct Submitter {
    http: reqwest::Client,
    apis: Vec<String>,
    key: String,
    stop: CancellationToken,
    stopped_at: Arc<OnceLock<Instant>>,
}

impl Submitter {
    /// Submits one import until it is settled: acknowledged, or refused for good, or the
    /// load gave up on it. Each attempt goes to the next API process.
    async fn submit(&self, key: &str, seq: usize) -> Sent {
        let body = csv(key, RECORDS);
        let mut sent = Sent {
            key: key.to_owned(),
            records: RECORDS,
            attempts: Vec::new(),
            acked: None,
        };
        for n in 0.. {
            let api = (seq + n) % self.apis.len();
            let (attempt, acked) = self.attempt(api, key, &body).await;
            let wait = match (&attempt.outcome, attempt.status) {
                (Outcome::Ok, _) => None,
                (Outcome::Unknown, _) => Some(Duration::from_millis(300)),
                // Busy, unavailable or unsure: the same request again later is safe.
                (Outcome::Failed, Some(409 | 429 | 500..)) => {
                    Some(Duration::from_millis(if attempt.retry_after {
                        1000
                    } else {
                        300
                    }))
                }
                (Outcome::Failed, _) => None,
            };
            sent.attempts.push(attempt);
            sent.acked = acked;
            let Some(wait) = wait else { break };
            if self.given_up() {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        sent
    }

    fn given_up(&self) -> bool {
        self.stop.is_cancelled()
            && self
                .stopped_at
                .get()
                .is_some_and(|at| at.elapsed() > RESOLVE)
    }

    async fn attempt(&self, api: usize, key: &str, body: &str) -> (Attempt, Option<ImportView>) {
        let started = Instant::now();
        let sent = self
            .http
            .post(format!("{}/v1/imports", self.apis[api]))
            .bearer_auth(&self.key)
            .header("content-type", "text/csv")
            .header("idempotency-key", key)
            .body(body.to_owned())
            .send()
            .await;
        let mut attempt = Attempt {
            api,
            started,
            ended: started,
            outcome: Outcome::Unknown,
            status: None,
            detail: String::new(),
            retry_after: false,
            replayed: false,
        };
        let mut acked = None;
        match sent {
            Err(e) => attempt.detail = transport_error(&e),
            Ok(resp) => {
                let status = resp.status().as_u16();
                attempt.status = Some(status);
                attempt.retry_after = resp.headers().contains_key("retry-after");
                attempt.replayed = resp
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                match resp.bytes().await {
                    // Without its body a 2xx says nothing about which import it was.
                    Err(e) => attempt.detail = transport_error(&e),
                    Ok(bytes) if (200..300).contains(&status) => {
                        match serde_json::from_slice::<ImportView>(&bytes) {
                            Ok(view) => {
                                attempt.outcome = Outcome::Ok;
                                acked = Some(view);
                            }
                            Err(e) => attempt.detail = format!("unreadable answer: {e}"),
                        }
                    }
                    Ok(bytes) => {
                        attempt.outcome = Outcome::Failed;
                        attempt.detail = serde_json::from_slice::<serde_json::Value>(&bytes)
                            .ok()
                            .and_then(|v| v["code"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                    }
                }
            }
        }
        attempt.ended = Instant::now();
        (attempt, acked)
    }
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "connection".into()
    }
}
