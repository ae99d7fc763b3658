//! `GET /ui/events`: live updates as server-sent events.
//!
//! Events: `change` (data: the [`LiveEvent`] JSON) when something changed, `resync` when
//! updates may have been missed (this client fell behind the process's bounded buffer,
//! or the Redis subscription was re-made) and the page should re-read everything, and
//! `logout` when the session ended. A comment line goes out after every quiet heartbeat
//! interval, which is also when the session is looked at again (without renewing it, so
//! an open tab does not keep an idle session alive). The stream ends when the process
//! shuts down.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use dataflow_contracts::live::LiveEvent;
use dataflow_platform::dashboard::live::Live;
use futures::StreamExt;
use tokio::sync::broadcast::{self, error::RecvError};

use super::session::Operator;
use crate::state::AppState;

/// How long a disconnected browser waits before it reconnects.
const RECONNECT: Duration = Duration::from_secs(2);

struct Watch {
    rx: broadcast::Receiver<Live>,
    state: AppState,
    token: String,
    heartbeat: Duration,
    ended: bool,
}

fn change(event: &LiveEvent) -> Event {
    Event::default()
        .event("change")
        .json_data(event)
        .unwrap_or_else(|_| resync())
}

fn resync() -> Event {
    Event::default().event("resync").data("resync")
}

impl Watch {
    async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let live = self.state.backends.live.clone();
        tokio::select! {
            got = self.rx.recv() => match got {
                Ok(Live::Changed(e)) => Some(change(&e)),
                Ok(Live::Resync) | Err(RecvError::Lagged(_)) => Some(resync()),
                Err(RecvError::Closed) => None,
            },
            _ = tokio::time::sleep(self.heartbeat) => {
                match self.state.backends.sessions.find(&self.token, None).await {
                    Ok(None) => {
                        self.ended = true;
                        Some(Event::default().event("logout").data("logout"))
                    }
                    // A store that does not answer ends nothing: the next page load decides.
                    Ok(Some(_)) | Err(_) => Some(Event::default().comment("heartbeat")),
                }
            }
            _ = live.stopped().cancelled() => None,
        }
    }
}

pub async fn stream(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
) -> impl IntoResponse {
    let watch = Watch {
        rx: state.backends.live.subscribe(),
        heartbeat: Duration::from_secs(state.config.ui.sse_heartbeat_secs),
        state,
        token: op.token,
        ended: false,
    };
    // First, how long a browser waits before reconnecting; it also sends the response
    // head at once, so the page knows it is live before the first change.
    let hello =
        futures::stream::once(async { Ok::<_, Infallible>(Event::default().retry(RECONNECT)) });
    let events = futures::stream::unfold(watch, |mut w| async move {
        let event = w.next().await?;
        Some((Ok(event), w))
    });
    // A buffering proxy (nginx) would hold the updates back; this asks it not to.
    ([("x-accel-buffering", "no")], Sse::new(hello.chain(events)))
}
