//! Outgoing mail through lettre: SMTP (`jobs.smtp_url` / `SMTP_URL`, with STARTTLS or TLS
//! as the URL says) in production, `.eml` files in `<data_dir>/mail` in embedded mode.

use std::path::Path;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::JobsConfig;
use crate::{Error, Result};

/// One SMTP conversation never holds a job longer than this.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(AsyncFileTransport<Tokio1Executor>),
}

pub struct Mailer {
    transport: Transport,
    from: Mailbox,
}

impl Mailer {
    pub fn from_config(jobs: &JobsConfig, data_dir: &Path) -> Result<Mailer> {
        let from: Mailbox = jobs
            .mail_from
            .parse()
            .map_err(|e| Error::Config(format!("jobs.mail_from: {e}")))?;
        let transport = match &jobs.smtp_url {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(|e| Error::Config(format!("jobs.smtp_url: {e}")))?
                    .timeout(Some(SMTP_TIMEOUT))
                    .build(),
            ),
            None => {
                let dir = data_dir.join("mail");
                std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })?;
                Transport::Files(AsyncFileTransport::new(dir))
            }
        };
        Ok(Mailer { transport, from })
    }

    /// The configured sender.
    pub fn from(&self) -> &Mailbox {
        &self.from
    }

    /// Where mail goes, for logs.
    pub fn describe(&self) -> &'static str {
        match self.transport {
            Transport::Smtp(_) => "SMTP",
            Transport::Files(_) => "files in the data folder",
        }
    }

    pub async fn send(&self, message: Message) -> std::result::Result<(), SendError> {
        match &self.transport {
            Transport::Smtp(t) => t.send(message).await.map(drop).map_err(SendError::Smtp),
            Transport::Files(t) => t.send(message).await.map(drop).map_err(SendError::File),
        }
    }
}

/// Why a message was not handed on: the SMTP server refused or could not be reached, or
/// the mail folder could not be written. Either is worth another attempt.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("SMTP: {0}")]
    Smtp(lettre::transport::smtp::Error),
    #[error("writing the mail file: {0}")]
    File(lettre::transport::file::Error),
}
