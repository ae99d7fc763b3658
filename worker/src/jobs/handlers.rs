//! What each kind of job does. Every side effect is keyed by the job id: the email's
//! `Message-ID`, the webhook's `webhook-id`, the report's batch (stored by upsert).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dataflow_contracts::http::BatchReport;
use dataflow_contracts::jobs::{JobMessage, JobSpec};
use dataflow_contracts::{BatchId, BatchStatus};
use dataflow_platform::domain::keys::KeyHasher;
use dataflow_platform::effects::mail::Mailer;
use dataflow_platform::effects::report;
use dataflow_platform::effects::webhook::{DeliveryError, WebhookSender, target_host};
use dataflow_platform::ledger::Db;
use futures::future::BoxFuture;
use lettre::Message;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, MultiPart, SinglePart};

use super::{JobError, JobHandler};

/// A stored report keeps its CSV up to this size; larger ones are streamed on request.
const STORED_CSV_MAX: usize = 8 * 1024 * 1024;
/// Mail attaches the rejected rows up to this size; larger ones are linked.
const ATTACHED_CSV_MAX: usize = 1024 * 1024;

pub struct Handlers {
    pub db: Db,
    pub hasher: KeyHasher,
    pub mailer: Arc<Mailer>,
    pub webhooks: Arc<WebhookSender>,
    pub webhook_slots: Arc<WebhookSlots>,
}

/// Webhook deliveries in flight in this process, counted by target host and by client, so
/// that one slow or failing receiver (or one client's receivers) cannot take every webhook
/// slot: a delivery over either cap is deferred instead of waiting in a slot.
pub struct WebhookSlots {
    per_host: usize,
    per_client: usize,
    /// Deliveries in flight by `host:…` and `client:…`; an entry goes at zero.
    held: Mutex<HashMap<String, usize>>,
}

impl WebhookSlots {
    pub fn new(per_host: usize, per_client: usize) -> Arc<WebhookSlots> {
        Arc::new(WebhookSlots {
            per_host,
            per_client,
            held: Mutex::default(),
        })
    }

    /// A place for one delivery to `host` for `client`, held until it is dropped; `None`
    /// when either is at its cap.
    fn take(self: &Arc<Self>, host: &str, client: &str) -> Option<WebhookSlot> {
        let keys = [format!("host:{host}"), format!("client:{client}")];
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let room = |key: &String, cap: usize| held.get(key).copied().unwrap_or(0) < cap;
        if !(room(&keys[0], self.per_host) && room(&keys[1], self.per_client)) {
            return None;
        }
        for key in &keys {
            *held.entry(key.clone()).or_default() += 1;
        }
        Some(WebhookSlot {
            slots: self.clone(),
            keys,
        })
    }
}

/// One delivery's place under the caps of [`WebhookSlots`].
struct WebhookSlot {
    slots: Arc<WebhookSlots>,
    keys: [String; 2],
}

impl Drop for WebhookSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(n) = held.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    held.remove(key);
                }
            }
        }
    }
}

impl JobHandler for Handlers {
    fn handle<'a>(&'a self, job: &'a JobMessage) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let spec = job
                .decode_spec()
                .map_err(|e| JobError::Permanent(format!("unreadable job spec: {e}")))?;
            match spec {
                JobSpec::Email { to } => self.email(job, &to).await,
                JobSpec::Report => self.report(&job.batch_id).await,
                JobSpec::Webhook { url, event } => {
                    let body = serde_json::to_string(&event)
                        .map_err(|e| JobError::Permanent(e.to_string()))?;
                    // A URL without a host is refused by the delivery itself.
                    let host = target_host(&url).unwrap_or_else(|| url.clone());
                    let Some(_slot) = self.webhook_slots.take(&host, job.client_id.as_str()) else {
                        return Err(JobError::Defer(format!(
                            "deferred: as many webhooks to {host} or for this client as \
                             allowed at once are in flight"
                        )));
                    };
                    let key = self.hasher.webhook_key(job.client_id.as_str());
                    self.webhooks
                        .deliver(&url, job.id.as_str(), &key, body)
                        .await
                        .map(drop)
                        .map_err(|e| match e {
                            DeliveryError::Refused(m) => JobError::Permanent(m),
                            DeliveryError::Failed(m) => JobError::Retry(m),
                        })
                }
            }
        })
    }
}

impl Handlers {
    async fn summary(&self, batch: &BatchId) -> Result<BatchReport, JobError> {
        let view = self
            .db
            .get_batch(None, batch)
            .await
            .map_err(retry)?
            .ok_or_else(|| JobError::Permanent(format!("batch {batch} does not exist")))?;
        report::summary(&self.db, view).await.map_err(retry)
    }

    /// Stores the report: the summary as JSON, and the rejected rows as CSV when small
    /// enough to keep.
    async fn report(&self, batch: &BatchId) -> Result<(), JobError> {
        let summary = self.summary(batch).await?;
        let csv = report::rejected_csv_within(&self.db, &summary.batch, STORED_CSV_MAX)
            .await
            .map_err(retry)?;
        let json =
            serde_json::to_string(&summary).map_err(|e| JobError::Permanent(e.to_string()))?;
        self.db
            .store_report(batch, &json, csv.as_deref())
            .await
            .map_err(retry)
    }

    async fn email(&self, job: &JobMessage, to: &str) -> Result<(), JobError> {
        let summary = self.summary(&job.batch_id).await?;
        let csv = if summary.batch.records_failed > 0 {
            report::rejected_csv_within(&self.db, &summary.batch, ATTACHED_CSV_MAX)
                .await
                .map_err(retry)?
        } else {
            None
        };
        let to = to
            .parse()
            .map_err(|e| JobError::Permanent(format!("notify_email `{to}`: {e}")))?;
        let text = SinglePart::plain(body_text(&summary, csv.is_some()));
        let body = match csv {
            Some(bytes) => MultiPart::mixed().singlepart(text).singlepart(
                Attachment::new(format!("{}-rejected.csv", job.batch_id)).body(
                    bytes,
                    ContentType::parse("text/csv")
                        .map_err(|e| JobError::Permanent(e.to_string()))?,
                ),
            ),
            None => MultiPart::mixed().singlepart(text),
        };
        let message = Message::builder()
            .from(self.mailer.from().clone())
            .to(to)
            .subject(subject(&summary))
            // Keyed by the job: a repeat after a crash carries the same id.
            .message_id(Some(format!("<{}@dataflow>", job.id)))
            .multipart(body)
            .map_err(|e| JobError::Permanent(format!("building the message: {e}")))?;
        self.mailer
            .send(message)
            .await
            .map_err(|e| JobError::Retry(e.to_string()))
    }
}

fn retry(e: dataflow_platform::Error) -> JobError {
    JobError::Retry(e.to_string())
}

fn subject(r: &BatchReport) -> String {
    let b = &r.batch;
    match b.status {
        BatchStatus::Completed => format!(
            "DataFlow: batch {} completed ({} written, {} unchanged, {} rejected)",
            b.id, b.records_written, b.records_unchanged, b.records_failed
        ),
        status => format!("DataFlow: batch {} {status}", b.id),
    }
}

fn body_text(r: &BatchReport, attached: bool) -> String {
    let b = &r.batch;
    let mut text = format!(
        "Batch {} (import {}) is {}.\n\n\
         Records: {} in total, {} written, {} unchanged, {} superseded (a newer import \
         holds them), {} rejected.\n",
        b.id,
        b.import_id,
        b.status,
        b.records_total,
        b.records_written,
        b.records_unchanged,
        b.records_superseded,
        b.records_failed
    );
    if let Some(e) = &b.last_error {
        text.push_str(&format!("Last error: {e}\n"));
    }
    if !r.errors_by_code.is_empty() {
        text.push_str("\nRejected rows by reason:\n");
        for (code, n) in &r.errors_by_code {
            text.push_str(&format!("  {code}: {n}\n"));
        }
    }
    text.push_str(&format!(
        "\nReport: GET /v1/batches/{}/report\nRejected rows: GET {}\n",
        b.id, r.rejected_rows_csv
    ));
    if b.records_failed > 0 && !attached {
        text.push_str("(The rejected rows are too many to attach; download them instead.)\n");
    }
    text
}
