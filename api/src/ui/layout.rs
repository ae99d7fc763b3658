//! The page shell (header, navigation, live-status, logout) and the small view helpers
//! every page uses. maud escapes every interpolated value, so ids, names, error texts and
//! policies from the ledger cannot inject markup.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::session::Operator;

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Batches,
    Queues,
    Workers,
    Dead,
    Clients,
    Actions,
}

const NAV: [(Nav, &str, &str); 7] = [
    (Nav::Overview, "/ui", "Overview"),
    (Nav::Batches, "/ui/batches", "Batches"),
    (Nav::Queues, "/ui/queues", "Queues"),
    (Nav::Workers, "/ui/workers", "Workers"),
    (Nav::Dead, "/ui/dead", "Dead letters"),
    (Nav::Clients, "/ui/clients", "Clients"),
    (Nav::Actions, "/ui/actions", "Action log"),
];

/// What the last action did, carried on the redirect back (`?done=retry&ok=2&refused=0`).
#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    done: Option<String>,
    ok: Option<u32>,
    refused: Option<u32>,
}

/// Never refuses a request: a malformed notice is no notice.
impl<S: Send + Sync> FromRequestParts<S> for Notice {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Query::<Notice>::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default())
    }
}

impl Notice {
    fn render(&self) -> Option<Markup> {
        // Only names of real actions are shown: the query string is the visitor's to write.
        let done = self.done.as_deref()?;
        let action = super::actions::Action::parse(done)?;
        let (ok, refused) = (self.ok.unwrap_or(0), self.refused.unwrap_or(0));
        Some(html! {
            div.notice.refused[refused > 0] role="status" {
                strong { (action.verb()) } ": " (ok) " done"
                @if refused > 0 {
                    ", " (refused) " refused — "
                    a href="/ui/actions" { "see the action log" }
                }
            }
        })
    }
}

/// A whole page for a logged-in operator.
pub fn page(op: &Operator, nav: Nav, title: &str, notice: &Notice, body: Markup) -> Markup {
    shell(
        title,
        html! {
            header.top {
                a.brand href="/ui" { "DataFlow" }
                nav {
                    @for (entry, href, label) in NAV {
                        a.active[entry == nav] href=(href) { (label) }
                    }
                }
                div.who {
                    span #live-status .live-status.off title="Live updates (SSE)" { "offline" }
                    span.operator title={ "session " (op.session.label) } { (op.session.operator) }
                    form method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(op.session.csrf);
                        button.link type="submit" { "Log out" }
                    }
                }
            }
            main {
                h1 { (title) }
                @if let Some(n) = notice.render() { (n) }
                (body)
            }
        },
        Some(&op.session.csrf),
    )
}

/// The document around `content`; `csrf` is exposed to the script for its own posts.
pub fn shell(title: &str, content: Markup, csrf: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(token) = csrf { meta name="csrf-token" content=(token); }
                title { (title) " · DataFlow" }
                link rel="stylesheet" href="/ui/static/app.css";
                script src="/ui/static/app.js" defer {}
            }
            body { (content) }
        }
    }
}

/// A region the script re-reads from the server when a live update arrives.
pub fn live(id: &str, content: Markup) -> Markup {
    html! { section #(id) data-refresh { (content) } }
}

pub fn empty(message: &str) -> Markup {
    html! { p.empty { (message) } }
}

/// A batch or job status as a coloured badge.
pub fn status(s: &str) -> Markup {
    html! { span class={ "badge status-" (s) } { (s) } }
}

/// Milliseconds as a short age: `850 ms`, `42 s`, `7 min`, `3 h`, `2 d`.
pub fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{} s", ms / 1_000),
        60_000..3_600_000 => format!("{} min", ms / 60_000),
        3_600_000..86_400_000 => format!("{} h", ms / 3_600_000),
        _ => format!("{} d", ms / 86_400_000),
    }
}

/// An RFC 3339 timestamp shortened for tables (`2026-12-01 21:40:00`), full on hover.
pub fn time(ts: &str) -> Markup {
    let short = ts.get(..19).unwrap_or(ts).replace('T', " ");
    html! { time datetime=(ts) title=(ts) { (short) } }
}

/// `path?k=v&…` with the values encoded; empty values are left out.
pub fn link(path: &str, params: &[(&str, &str)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params.iter().filter(|(_, v)| !v.is_empty()) {
        query.append_pair(k, v);
    }
    let query = query.finish();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

/// "Older" link to the next page, when there is one.
pub fn pager(next: Option<Markup>) -> Markup {
    html! {
        nav.pager {
            @match next {
                Some(link) => (link),
                None => span.muted { "End of list" },
            }
        }
    }
}

/// A one-button form posting `action` on `target`, back to `back`.
pub fn action_button(
    op: &Operator,
    action: &str,
    target: &str,
    back: &str,
    label: &str,
    danger: bool,
) -> Markup {
    html! {
        form.inline method="post" action="/ui/actions" data-confirm=[danger.then(|| format!("{label} {target}?"))] {
            input type="hidden" name="csrf" value=(op.session.csrf);
            input type="hidden" name="action" value=(action);
            input type="hidden" name="target" value=(target);
            input type="hidden" name="back" value=(back);
            button.danger[danger] type="submit" { (label) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(42_000), "42 s");
        assert_eq!(age(7 * 60_000), "7 min");
        assert_eq!(age(3 * 3_600_000 + 5), "3 h");
        assert_eq!(age(2 * 86_400_000), "2 d");
    }

    #[test]
    fn links_encode_their_values() {
        assert_eq!(
            link("/ui/batches", &[("status", ""), ("q", "a&b")]),
            "/ui/batches?q=a%26b"
        );
        assert_eq!(link("/ui/dead", &[]), "/ui/dead");
    }

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            status("<script>").into_string(),
            "<span class=\"badge status-&lt;script&gt;\">&lt;script&gt;</span>"
        );
    }
}
