//! The operator dashboard: sessions, CSRF and the action log over plain HTTP; live updates
//! over SSE in one process and across processes through Redis; and the pages in a real
//! headless Chromium driven through chromedriver (skipped, with a message, when they are
//! not installed, unless DATAFLOW_TEST_REQUIRE_SERVICES=1).
//!
//! `cargo test --test it ui::screenshots -- --ignored` renders every page into
//! `docs/screenshots/`.

use crate::common::harness::register;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::live::LiveEvent;
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_platform::ledger::charts::{Depth, Latency, MINUTE_MS, Sample, minute_of};
use dataflow_platform::ledger::{Bundle, Claimable};
use reqwest::{Method, StatusCode, header};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv};

backend_tests!(
    unauthenticated_pages_redirect_to_login,
    login_makes_a_session_and_logout_destroys_it,
    posts_without_the_csrf_token_are_refused,
    failed_logins_count_towards_the_lock_out,
    pages_escape_what_they_show_and_refuse_bad_input,
    dead_letters_are_retried_in_bulk_and_workers_drained,
    sql_sessions_slide_and_expire,
    live_updates_reach_the_event_stream,
    live_updates_cross_processes_through_redis,
    an_ended_session_ends_its_event_stream,
    redis_sessions_slide_and_expire,
    a_session_store_that_is_down_answers_503,
    the_dashboard_in_a_browser,
    the_queue_page_shows_each_clients_depth_and_oldest_wait,
    the_charts_follow_completions_live,
);

const TOKEN: &str = "test-operator-token-0123456789";

/// A response header as text ("" when absent).
fn header_of(resp: &reqwest::Response, name: impl header::AsHeaderName) -> &str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// An HTTP client that shows redirects instead of following them.
fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Posts the login form.
async fn try_login(t: &TestApp, operator: &str, token: &str) -> reqwest::Response {
    plain()
        .post(t.url("/ui/login"))
        .form(&[("operator", operator), ("token", token)])
        .send()
        .await
        .unwrap()
}

/// A logged-in dashboard session over plain HTTP.
pub(crate) struct Ui<'a> {
    t: &'a TestApp,
    http: reqwest::Client,
    cookie: String,
}

impl<'a> Ui<'a> {
    pub(crate) async fn login(t: &'a TestApp, operator: &str) -> Ui<'a> {
        let http = plain();
        let resp = try_login(t, operator, TOKEN).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[header::LOCATION], "/ui");
        let set = header_of(&resp, header::SET_COOKIE).to_owned();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
            assert!(set.contains(attribute), "{set}");
        }
        let cookie = set.split(';').next().unwrap().to_owned();
        Ui { t, http, cookie }
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.t.url(path))
            .header(header::COOKIE, &self.cookie)
    }

    pub(crate) async fn page(&self, path: &str) -> String {
        let resp = self.get(path).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        resp.text().await.unwrap()
    }

    /// The session's CSRF token, as every page carries it.
    async fn csrf(&self) -> String {
        let html = self.page("/ui").await;
        let start = html.find("name=\"csrf-token\" content=\"").unwrap() + 27;
        html[start..start + 64].to_owned()
    }

    fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::RequestBuilder {
        self.http
            .post(self.t.url(path))
            .header(header::COOKIE, &self.cookie)
            .header(header::ORIGIN, format!("http://{}", self.t.addr))
            .form(form)
    }

    /// Posts a dashboard action on one target, as its button does.
    pub(crate) async fn act(&self, action: &str, target: &str) -> reqwest::Response {
        let csrf = self.csrf().await;
        let form = [("action", action), ("target", target), ("csrf", &csrf)];
        self.post("/ui/actions", &form).send().await.unwrap()
    }
}

async fn unauthenticated_pages_redirect_to_login(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let http = plain();
    for path in [
        "/ui",
        "/ui/batches",
        "/ui/dead",
        "/ui/events",
        "/ui/actions",
    ] {
        let resp = http.get(t.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(resp.headers()[header::LOCATION], "/ui/login", "{path}");
    }
    let stale = http
        .get(t.url("/ui"))
        .header(header::COOKIE, "dataflow_session=00ff")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::SEE_OTHER);
    assert!(
        header_of(&stale, header::SET_COOKIE).contains("Max-Age=0"),
        "an unknown session's cookie is cleared"
    );
    let login = http.get(t.url("/ui/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    assert!(header_of(&login, "content-security-policy").contains("frame-ancestors 'none'"));
    assert!(login.text().await.unwrap().contains("Operator token"));
    let css = http.get(t.url("/ui/static/app.css")).send().await.unwrap();
    assert_eq!(css.status(), 200);
    assert!(header_of(&css, header::CONTENT_TYPE).starts_with("text/css"));
    t.stop().await;
}

async fn login_makes_a_session_and_logout_destroys_it(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| c.api.ui.cookie_secure = true).await
    else {
        return;
    };
    let wrong = try_login(&t, "mallory", "not-the-token").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(header::SET_COOKIE).is_none());
    let nameless = try_login(&t, " ", TOKEN).await;
    assert_eq!(nameless.status(), StatusCode::BAD_REQUEST);

    let ui = Ui::login(&t, "ann").await;
    assert!(ui.cookie.starts_with("dataflow_session="));
    let overview = ui.page("/ui").await;
    assert!(overview.contains("ann") && overview.contains("Queue depth"));
    let csrf = ui.csrf().await;
    let secure = try_login(&t, "ann", TOKEN).await;
    assert!(header_of(&secure, header::SET_COOKIE).contains("Secure"));

    let out = ui
        .post("/ui/logout", &[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[header::LOCATION], "/ui/login");
    assert!(header_of(&out, header::SET_COOKIE).contains("Max-Age=0"));
    // The session is gone from the store, not only from the browser.
    let after = ui.get("/ui").send().await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);

    let ui = Ui::login(&t, "bob").await;
    let log = ui.page("/ui/actions").await;
    for expected in ["mallory", "refused: wrong token", "logout", "ann", "bob"] {
        assert!(log.contains(expected), "action log lacks {expected}");
    }
    t.stop().await;
}

async fn posts_without_the_csrf_token_are_refused(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"approval_required": true})).await;
    let held = t.import(&key, "text/csv", csv("held", 3)).await;
    let ui = Ui::login(&t, "ann").await;
    let csrf = ui.csrf().await;
    let target = held.batch_id.as_str();
    let approve =
        |token: &'static str| [("action", "approve"), ("target", target), ("csrf", token)];

    let missing = ui
        .post("/ui/actions", &[("action", "approve"), ("target", target)])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::FORBIDDEN);
    assert!(
        missing.text().await.unwrap().contains("reload the page"),
        "an HTML page explains"
    );
    let forged = ui
        .post("/ui/actions", &approve("0000"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    // The right token from another site's page (as if it had leaked) is refused too.
    for origin in ["https://evil.example", "null"] {
        let cross_site = ui
            .http
            .post(t.url("/ui/actions"))
            .header(header::COOKIE, &ui.cookie)
            .header(header::ORIGIN, origin)
            .form(&[("action", "approve"), ("target", target), ("csrf", &csrf)])
            .send()
            .await
            .unwrap();
        assert_eq!(cross_site.status(), StatusCode::FORBIDDEN, "{origin}");
    }
    let cross_site_fetch = ui
        .http
        .post(t.url("/ui/actions"))
        .header(header::COOKIE, &ui.cookie)
        .header("sec-fetch-site", "cross-site")
        .form(&[("action", "approve"), ("target", target), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site_fetch.status(), StatusCode::FORBIDDEN);
    let logout = ui.post("/ui/logout", &[]).send().await.unwrap();
    assert_eq!(
        logout.status(),
        StatusCode::FORBIDDEN,
        "logout is a form post too"
    );
    assert_eq!(
        t.batch(&key, &held.batch_id).await.status,
        BatchStatus::AwaitingApproval,
        "nothing refused changed anything"
    );

    let done = ui
        .post(
            "/ui/actions",
            &[
                ("action", "approve"),
                ("target", target),
                ("csrf", &csrf),
                ("back", "/ui/batches"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        done.headers()[header::LOCATION],
        "/ui/batches?done=approve&ok=1&refused=0"
    );
    t.wait_for(&key, &held.batch_id, BatchStatus::Completed)
        .await;
    // The same action again is refused by the batch's state, and logged as such.
    let again = ui
        .post(
            "/ui/actions",
            &[("action", "approve"), ("target", target), ("csrf", &csrf)],
        )
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.headers()[header::LOCATION],
        "/ui?done=approve&ok=0&refused=1"
    );
    let log = ui.page("/ui/actions").await;
    assert!(
        log.contains("batch.approve")
            && log.contains("refused: batch is completed, not awaiting_approval"),
        "{log}"
    );
    t.stop().await;
}

async fn failed_logins_count_towards_the_lock_out(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| c.api.auth_max_failures = 3).await else {
        return;
    };
    for _ in 0..3 {
        let resp = try_login(&t, "mallory", "guess").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let locked = try_login(&t, "mallory", "another guess").await;
    assert_eq!(
        locked.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the next guess waits out the lock-out"
    );
    assert!(locked.headers().contains_key(header::RETRY_AFTER));
    // The same lock-out covers the bearer-token API.
    let guess = t
        .http
        .get(t.url("/admin/queues"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(guess.status(), 429);
    // The right token is never locked out, on the dashboard or the API.
    assert_eq!(
        try_login(&t, "ann", TOKEN).await.status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        t.admin_send(Method::GET, "/admin/queues").await.status(),
        200
    );
    t.stop().await;
}

async fn pages_escape_what_they_show_and_refuse_bad_input(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let resp = t
        .admin(Method::POST, "/admin/clients")
        .json(&json!({"name": "<script>alert(1)</script>"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let ui = Ui::login(&t, "<b>eve</b>").await;
    let clients = ui.page("/ui/clients").await;
    assert!(clients.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!clients.contains("<script>alert"));
    assert!(clients.contains("&lt;b&gt;eve&lt;/b&gt;") && !clients.contains("<b>eve"));
    for path in [
        "/ui",
        "/ui/batches",
        "/ui/queues",
        "/ui/workers",
        "/ui/dead",
        "/ui/actions",
    ] {
        assert!(ui.page(path).await.contains("</html>"), "{path}");
    }
    for (path, status) in [
        ("/ui/batches?status=bogus", 400),
        ("/ui/batches?window=1y", 400),
        ("/ui/batches?client=nope", 400),
        ("/ui/batches?cursor=nope", 400),
        ("/ui/batches?id=bat_nope", 404),
        ("/ui/batches/nonsense", 404),
        ("/ui/batches/nonsense/report.csv", 404),
        ("/ui/dead?jobs=x", 400),
        ("/ui/actions?cursor=x", 400),
        ("/ui/nowhere", 404),
    ] {
        let resp = ui.get(path).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert!(
            header_of(&resp, header::CONTENT_TYPE).starts_with("text/html"),
            "{path}"
        );
    }
    let csrf = ui.csrf().await;
    for form in [
        vec![("action", "explode"), ("target", "bat_x")],
        vec![("action", "retry")],
        vec![("action", "retry"), ("target", "cli_x")],
    ] {
        let mut form = form;
        form.push(("csrf", &csrf));
        let resp = ui.post("/ui/actions", &form).send().await.unwrap();
        assert!(
            resp.status() == 400 || resp.status() == 303,
            "{form:?}: {}",
            resp.status()
        );
        assert!(!resp.status().is_server_error());
    }
    t.stop().await;
}

async fn dead_letters_are_retried_in_bulk_and_workers_drained(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let worker = t.sibling(Roles::WORKER).await;
    let (_, key) = t.client(json!({"approval_required": true})).await;
    let first = dead_batch(&t, &key, "one").await;
    let second = dead_batch(&t, &key, "two").await;
    let ui = Ui::login(&t, "ann").await;
    let page = ui.page("/ui/dead").await;
    assert!(page.contains(first.as_str()) && page.contains(second.as_str()));
    let csrf = ui.csrf().await;
    let bulk = ui
        .post(
            "/ui/actions",
            &[
                ("csrf", csrf.as_str()),
                ("action", "retry"),
                ("target", first.as_str()),
                ("target", second.as_str()),
                ("target", "job_01M8T79NQA174FW7V98NTBC130"),
                ("back", "/ui/dead"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        bulk.headers()[header::LOCATION],
        "/ui/dead?done=retry&ok=2&refused=1",
        "both batches retried, the unknown job refused"
    );
    for id in [&first, &second] {
        t.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let drain = |target: String| {
        let csrf = csrf.clone();
        let ui = &ui;
        async move {
            let form = [
                ("csrf", csrf.as_str()),
                ("action", "drain"),
                ("target", target.as_str()),
            ];
            let resp = ui.post("/ui/actions", &form).send().await.unwrap();
            header_of(&resp, header::LOCATION).to_owned()
        }
    };
    assert_eq!(
        drain("nobody".to_owned()).await,
        "/ui?done=drain&ok=0&refused=1"
    );
    assert_eq!(
        drain(worker.worker_id()).await,
        "/ui?done=drain&ok=1&refused=0"
    );
    let log = ui.page("/ui/actions").await;
    for expected in [
        "batch.retry",
        "refused: no such resource",
        "worker.drain",
        &worker.worker_id(),
    ] {
        assert!(log.contains(expected), "action log lacks {expected}");
    }
    // A drained worker stops its own process.
    worker.app.unwrap().wait().await;
    t.stop().await;
}

async fn sessions_slide_and_expire(t: &TestApp) {
    let sessions = &t.app.as_ref().unwrap().backends.sessions;
    let ttl = Duration::from_millis(1500);
    let (token, created) = sessions.create("ann", "127.0.0.1", ttl).await.unwrap();
    assert_eq!(created.label.len(), 12);
    assert!(
        !token.contains(&created.label),
        "the label is not a piece of the token"
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let found = sessions.find(&token, Some(ttl)).await.unwrap();
        assert_eq!(
            found.as_ref().map(|s| s.operator.as_str()),
            Some("ann"),
            "renewed by use"
        );
        assert_eq!(found.unwrap().csrf, created.csrf);
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        sessions.find(&token, None).await.unwrap().is_some(),
        "looking does not end it"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        sessions.find(&token, None).await.unwrap().is_none(),
        "looking does not renew it either"
    );
    let (other, _) = sessions.create("bob", "127.0.0.1", ttl).await.unwrap();
    sessions.destroy(&other).await.unwrap();
    assert!(sessions.find(&other, Some(ttl)).await.unwrap().is_none());
}

async fn sql_sessions_slide_and_expire(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    sessions_slide_and_expire(&t).await;
    t.stop().await;
}

async fn redis_sessions_slide_and_expire(b: Backend) {
    let Some(t) = TestApp::spawn_redis(b, Roles::API, None, |_| {}).await else {
        return;
    };
    sessions_slide_and_expire(&t).await;
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let keys = redis.keys_with_prefix().await.unwrap();
    assert!(
        !keys.iter().any(|k| k.contains(":ui:session:")),
        "ended sessions leave no key: {keys:?}"
    );
    redis.delete_all_under_prefix().await.unwrap();
    t.stop().await;
}

async fn a_session_store_that_is_down_answers_503(b: Backend) {
    let Some((t, proxy)) = crate::redis::behind_proxy(b, Roles::ALL, |_| {}).await else {
        return;
    };
    let ui = Ui::login(&t, "ann").await;
    assert_eq!(ui.get("/ui").send().await.unwrap().status(), 200);
    proxy.cut();
    let down = ui.get("/ui").send().await.unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        down.text()
            .await
            .unwrap()
            .contains("session store is unavailable")
    );
    assert_eq!(try_login(&t, "ann", TOKEN).await.status(), 503);
    assert_eq!(
        t.admin_send(Method::GET, "/admin/queues").await.status(),
        200,
        "the bearer-token API does not need the session store"
    );
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(15);
    while ui.get("/ui").send().await.unwrap().status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the session is back once Redis is"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    redis.delete_all_under_prefix().await.unwrap();
    t.stop().await;
}

/// An open `/ui/events` stream, read event by event.
struct EventStream {
    resp: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(ui: &Ui<'_>) -> EventStream {
        let resp = ui.get("/ui/events").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(header_of(&resp, header::CONTENT_TYPE).starts_with("text/event-stream"));
        EventStream {
            resp,
            buffer: String::new(),
        }
    }

    /// The next event or comment, as its lines.
    async fn next_block(&mut self) -> String {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                return self.buffer.drain(..end + 2).collect();
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.resp.chunk())
                .await
                .expect("an event within 20 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next `change` event, skipping heartbeats and resyncs.
    async fn next_change(&mut self) -> LiveEvent {
        loop {
            let block = self.next_block().await;
            if block.lines().any(|l| l == "event: change") {
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                return serde_json::from_str(data.unwrap()).unwrap();
            }
        }
    }

    /// Waits (up to 30 s) for `kind` about `subject`; returns the kinds seen about it
    /// until then.
    async fn until(&mut self, subject: &str, kind: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no {kind} about {subject}; saw {seen:?}"
            );
            let e = self.next_change().await;
            if e.subject == subject {
                seen.push(e.kind.as_str().to_owned());
                if e.kind.as_str() == kind {
                    return seen;
                }
            }
        }
    }
}

async fn live_updates_reach_the_event_stream(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let ui = Ui::login(&t, "ann").await;
    let mut events = EventStream::open(&ui).await;
    let import = t.import(&key, "text/csv", csv("live", 25)).await;
    let seen = events
        .until(import.batch_id.as_str(), "batch_completed")
        .await;
    assert_eq!(
        seen.first().map(String::as_str),
        Some("batch_created"),
        "{seen:?}"
    );
    assert!(seen.contains(&"batch_processing".to_owned()), "{seen:?}");
    t.stop().await;
}

async fn an_ended_session_ends_its_event_stream(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| c.api.ui.sse_heartbeat_secs = 1).await
    else {
        return;
    };
    let ui = Ui::login(&t, "ann").await;
    let csrf = ui.csrf().await;
    let mut events = EventStream::open(&ui).await;
    assert!(
        events.next_block().await.starts_with("retry: 2000"),
        "the stream opens with its reconnect hint"
    );
    // The process's own worker may announce that it joined after the stream opened (it
    // registers beside the API, and a busy machine delays it); beyond that, nothing.
    let mut block = events.next_block().await;
    while block.contains("\"kind\":\"worker_joined\"") {
        block = events.next_block().await;
    }
    assert_eq!(block, ": heartbeat\n\n", "a quiet stream beats");
    let out = ui
        .post("/ui/logout", &[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let mut blocks = Vec::new();
    loop {
        let block = events.next_block().await;
        if block.contains("event: logout") {
            break;
        }
        blocks.push(block);
        assert!(blocks.len() < 5, "no logout event: {blocks:?}");
    }
    let end = tokio::time::timeout(Duration::from_secs(5), events.resp.chunk()).await;
    assert!(
        matches!(end, Ok(Ok(None))),
        "the stream ends after logout: {end:?}"
    );
    t.stop().await;
}

async fn live_updates_cross_processes_through_redis(b: Backend) {
    let Some(api) = TestApp::spawn_redis(b, Roles::API, None, |_| {}).await else {
        return;
    };
    let (_, key) = api.client(json!({})).await;
    let ui = Ui::login(&api, "ann").await;
    let mut events = EventStream::open(&ui).await;
    // Only the worker process claims, processes and registers: every such update below
    // crossed from it to the API process through Redis.
    let worker = api.sibling(Roles::WORKER).await;
    let worker_id = worker.worker_id();
    events.until(&worker_id, "worker_joined").await;
    let import = api.import(&key, "text/csv", csv("cross", 25)).await;
    let seen = events
        .until(import.batch_id.as_str(), "batch_completed")
        .await;
    assert!(seen.contains(&"batch_processing".to_owned()), "{seen:?}");
    let second = ui.get("/ui/events").send().await.unwrap();
    assert_eq!(
        second.status(),
        200,
        "several dashboards can listen at once"
    );
    drop(second);
    worker.stop().await;
    events.until(&worker_id, "worker_left").await;
    let redis = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    redis.delete_all_under_prefix().await.unwrap();
    api.stop().await;
}

// ---- the browser --------------------------------------------------------------------

mod browser {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use fantoccini::{Client, ClientBuilder, Locator};
    use serde_json::json;

    /// A headless Chromium behind its own chromedriver, ended (by its pid) on drop.
    pub struct Browser {
        pub client: Client,
        driver: Child,
    }

    fn binary(env: &str, default: &str) -> Option<String> {
        let path = std::env::var(env).unwrap_or_else(|_| default.to_owned());
        std::path::Path::new(&path).exists().then_some(path)
    }

    impl Browser {
        /// `None` (with a message) when Chromium or chromedriver is missing and not required.
        pub async fn start() -> Option<Browser> {
            let found = binary("DATAFLOW_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
                .zip(binary("DATAFLOW_TEST_CHROMIUM", "/usr/bin/chromium"));
            let Some((driver_path, chromium)) = found else {
                return crate::common::services::unreachable(
                    "Chromium",
                    "chromium or chromedriver not installed: apt-get install chromium chromium-driver",
                );
            };
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let driver = Command::new(driver_path)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let mut caps = serde_json::Map::new();
            caps.insert(
                "goog:chromeOptions".into(),
                json!({"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1440,1000", "--hide-scrollbars"]}),
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            let client = loop {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                match ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&format!("http://127.0.0.1:{port}"))
                    .await
                {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => {
                        panic!("chromedriver did not answer: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            Some(Browser { client, driver })
        }

        pub async fn goto(&self, url: &str) {
            self.client.goto(url).await.unwrap();
        }

        pub async fn path(&self) -> String {
            self.client.current_url().await.unwrap().path().to_owned()
        }

        /// Evaluates `script` (a function body) until it returns true, up to `secs`.
        pub async fn wait_until(&self, secs: u64, what: &str, script: &str) {
            let deadline = Instant::now() + Duration::from_secs(secs);
            loop {
                let v = self.client.execute(script, vec![]).await.unwrap();
                if v.as_bool() == Some(true) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: still not true after {secs} s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        pub async fn fill(&self, css: &str, text: &str) {
            let field = self.client.find(Locator::Css(css)).await.unwrap();
            field.clear().await.unwrap();
            field.send_keys(text).await.unwrap();
        }

        /// Clicks the element; again when a live refresh replaced it between the finding
        /// and the click (the page re-reads its live regions when its stream opens).
        pub async fn click(&self, css: &str) {
            for _ in 0..5 {
                let element = self.client.find(Locator::Css(css)).await.unwrap();
                match element.click().await {
                    Ok(()) => return,
                    Err(e) if e.is_stale_element_reference() => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("clicking {css}: {e}"),
                }
            }
            panic!("{css} kept being replaced");
        }

        pub async fn login(&self, base: &str, operator: &str) {
            self.goto(&format!("{base}/ui")).await;
            assert_eq!(
                self.path().await,
                "/ui/login",
                "an unauthenticated visit lands on the login"
            );
            self.fill("input[name=operator]", operator).await;
            self.fill("input[name=token]", super::TOKEN).await;
            self.click("main.login button[type=submit]").await;
            self.wait_until(10, "logged in", "return location.pathname === '/ui'")
                .await;
        }

        pub async fn stop(self) {
            let Browser { client, mut driver } = self;
            let _ = client.close().await;
            let _ = driver.kill();
            let _ = driver.wait();
        }
    }
}

/// A batch that has used up its attempts, as the worker leaves one (set directly: the
/// failure itself is the worker tests' subject).
async fn dead_batch(t: &TestApp, key: &str, prefix: &str) -> BatchId {
    let held = t.import(key, "text/csv", csv(prefix, 4)).await;
    sqlx::query("UPDATE batches SET status = 'dead', attempts = 5, last_error = $1 WHERE id = $2")
        .bind("connection reset by peer while writing chunk 1")
        .bind(held.batch_id.as_str())
        .execute(t.db.pool())
        .await
        .unwrap();
    held.batch_id
}

async fn the_dashboard_in_a_browser(b: Backend) {
    let Some(browser) = browser::Browser::start().await else {
        return;
    };
    let Some(t) = TestApp::spawn(b).await else {
        browser.stop().await;
        return;
    };
    let base = format!("http://{}", t.addr);
    let (_, key) = t.client(json!({})).await;
    let (_, held_key) = t.client(json!({"approval_required": true})).await;
    browser.login(&base, "ann").await;

    // A batch submitted while the page is open appears and completes without a reload.
    browser.goto(&format!("{base}/ui/batches")).await;
    browser
        .wait_until(
            10,
            "live updates connected",
            "return document.getElementById('live-status').textContent === 'live'",
        )
        .await;
    browser
        .client
        .execute("window.__sameDocument = true; return true", vec![])
        .await
        .unwrap();
    let import = t.import(&key, "text/csv", csv("browser", 25)).await;
    let row = format!("tr[data-batch='{}'] .status", import.batch_id);
    browser
        .wait_until(20, "the new batch shows completed", &format!("var c = document.querySelector(\"{row}\"); return !!c && c.textContent.trim() === 'completed'"))
        .await;
    browser
        .wait_until(
            1,
            "no reload happened",
            "return window.__sameDocument === true",
        )
        .await;

    // A dead batch is retried from the dead-letter page and runs to completion.
    let dead = dead_batch(&t, &held_key, "dead").await;
    browser.goto(&format!("{base}/ui/dead")).await;
    let retry = format!("tr[data-batch='{dead}'] form.inline button:not(.danger)");
    browser.click(&retry).await;
    browser
        .wait_until(10, "back on the dead letters with a notice", "var n = document.querySelector('.notice'); return location.pathname === '/ui/dead' && !!n && n.textContent.includes('1 done')")
        .await;
    t.wait_for(&held_key, &dead, BatchStatus::Completed).await;
    browser
        .wait_until(
            10,
            "the retried batch left the dead letters",
            &format!("return !document.querySelector(\"tr[data-batch='{dead}']\")"),
        )
        .await;
    browser.goto(&format!("{base}/ui/actions")).await;
    browser
        .wait_until(5, "the retry is in the action log", &format!("return document.body.textContent.includes('batch.retry') && document.body.textContent.includes('{dead}')"))
        .await;

    // Every page, twice over: each goes live at once (a page left behind must not keep its
    // stream, or the browser runs out of connections to the server after a few pages).
    for round in 0..2 {
        for path in [
            "/ui",
            "/ui/batches",
            "/ui/queues",
            "/ui/workers",
            "/ui/dead",
            "/ui/clients",
            "/ui/actions",
        ] {
            let started = Instant::now();
            browser.goto(&format!("{base}{path}")).await;
            browser
                .wait_until(
                    5,
                    path,
                    "return document.getElementById('live-status').textContent === 'live'",
                )
                .await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{path} (round {round}) took {:?}",
                started.elapsed()
            );
        }
    }

    // Logging out destroys the session: the dashboard is behind the login again.
    browser.click("header.top form button").await;
    browser
        .wait_until(10, "logged out", "return location.pathname === '/ui/login'")
        .await;
    browser.goto(&format!("{base}/ui/dead")).await;
    assert_eq!(browser.path().await, "/ui/login");
    browser.stop().await;
    t.stop().await;
}

async fn the_charts_follow_completions_live(b: Backend) {
    let Some(browser) = browser::Browser::start().await else {
        return;
    };
    let Some(t) = TestApp::spawn(b).await else {
        browser.stop().await;
        return;
    };
    let base = format!("http://{}", t.addr);
    let (client, key) = t.client(json!({})).await;
    browser.login(&base, "ann").await;
    // The batches of the minute in progress, as the page draws it, put to `test` (on `v`).
    let latest = |test: &str| {
        format!(
            "var p = document.querySelector(\"svg[data-chart='batches-hour'] path[data-series='batches']\"); \
             var v = p ? Number(p.getAttribute('data-last')) : -1; return {test};"
        )
    };
    for (round, path) in ["/ui".to_owned(), format!("/ui/clients/{client}")]
        .iter()
        .enumerate()
    {
        browser.goto(&format!("{base}{path}")).await;
        browser
            .wait_until(
                10,
                "live updates connected",
                "return document.getElementById('live-status').textContent === 'live'",
            )
            .await;
        // Eight charts (four a window), each titled for screen readers, with a legend.
        browser
            .wait_until(
                5,
                &format!("{path}: the charts"),
                "return document.querySelectorAll('svg.chart[role=img] > title').length === 8 \
                 && document.querySelectorAll('figure.chart ul.legend li').length === 18 \
                 && document.querySelector(\"svg[data-chart='depth-day'] path[data-series='dead']\") !== null",
            )
            .await;
        browser
            .client
            .execute("window.__sameDocument = true; return true", vec![])
            .await
            .unwrap();
        crate::charts::clear_of_a_minutes_end(&t).await;
        let before = browser.client.execute(&latest("v"), vec![]).await.unwrap();
        let before = before.as_f64().unwrap();
        assert!(before >= 0.0, "{path}: no batches chart");
        let body = csv(&format!("live{round}"), 8);
        let done = t.import(&key, "text/csv", body).await.batch_id;
        t.wait_for(&key, &done, BatchStatus::Completed).await;
        browser
            .wait_until(
                10,
                &format!("{path}: the completion in the batches chart"),
                &latest(&format!("v >= {}", before + 1.0)),
            )
            .await;
        browser
            .wait_until(
                1,
                "no reload happened",
                "return window.__sameDocument === true",
            )
            .await;
    }
    browser.stop().await;
    t.stop().await;
}

/// A day of minute samples behind the charts, for the fleet and for `client`: a day
/// cannot be waited for, so the screenshots draw this one (a daily swell with bursts,
/// latency rising with load, a backlog during the bursts); the minute in progress stays
/// the ledger's own.
async fn seed_chart_history(t: &TestApp, client: &ClientId) {
    let now = minute_of(t.db.now_ms().await.unwrap());
    sqlx::query("DELETE FROM chart_samples")
        .execute(t.db.pool())
        .await
        .unwrap();
    let mut noise: u64 = 0x2545_f491_4f6c_dd1d;
    let mut samples = Vec::new();
    for back in (1..=1_440i64).rev() {
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        let jitter = (noise % 1_000) as f64 / 1_000.0;
        let day = (back as f64 / 1_440.0 * std::f64::consts::TAU).cos();
        let burst = if back % 240 < 12 { 2.2 } else { 1.0 };
        let load = (1.0 + 0.55 * day) * burst * (0.85 + 0.3 * jitter);
        let records = (load * 2_400.0) as u64;
        let p50 = (600.0 + 500.0 * load) as u64;
        let sample = |share: f64, client_id: Option<ClientId>| {
            let fleet = client_id.is_none();
            Sample {
                client_id,
                minute: now - back * MINUTE_MS,
                batches: ((records as f64 * share) / 120.0).round() as u64,
                records: (records as f64 * share) as u64,
                latency: Some(Latency {
                    p50_ms: p50,
                    p95_ms: p50 * 2 + (jitter * 400.0) as u64,
                    p99_ms: p50 * 3 + (jitter * 1_500.0) as u64,
                }),
                // Batches waiting in the bursts; the dead one and those awaiting approval are
                // another client's.
                depth: Depth {
                    awaiting_approval: u64::from(fleet && back % 300 < 40),
                    ready: ((if burst > 1.0 {
                        20.0 + jitter * 40.0
                    } else {
                        jitter * 4.0
                    }) * share) as u64,
                    processing: (load * 2.5 * share).round() as u64,
                    dead: u64::from(fleet && back < 700),
                },
            }
        };
        samples.push(sample(1.0, None));
        samples.push(sample(0.6, Some(client.clone())));
    }
    t.db.store_samples(&samples).await.unwrap();
}

/// Renders every page into `docs/screenshots/` from a small, realistic ledger.
async fn screenshots() {
    let Some(browser) = browser::Browser::start().await else {
        return;
    };
    let t = TestApp::spawn_with(Backend::Sqlite, Roles::ALL, |c| c.worker.chunk_size = 500)
        .await
        .unwrap();
    let base = format!("http://{}", t.addr);
    let (acme_id, acme) = t
        .client(json!({"rate_per_minute": 600, "rate_burst": 50, "required_fields": ["email"]}))
        .await;
    let (globex_id, globex) = t
        .client(json!({"approval_required": true, "daily_record_quota": 1000000}))
        .await;
    // People, every 37th without the email the policy requires.
    let people = |prefix: &str, n: usize| {
        let mut body = String::from("id,email,name\n");
        for r in 0..n {
            let email = if r % 37 == 5 {
                String::new()
            } else {
                format!("user{r}@example.com")
            };
            body.push_str(&format!("{prefix}-{r},{email},User {r}\n"));
        }
        body
    };
    let mut last = None;
    for i in 0..6 {
        last = Some(
            t.import(&acme, "text/csv", people(&i.to_string(), 120 * (i + 1)))
                .await
                .batch_id,
        );
    }
    t.wait_for(&acme, last.as_ref().unwrap(), BatchStatus::Completed)
        .await;
    t.import(&globex, "text/csv", csv("waiting", 40)).await;
    dead_batch(&t, &globex, "gone").await;
    sqlx::query("UPDATE jobs SET status = 'dead', attempts = max_attempts, last_error = $1 WHERE id IN (SELECT id FROM jobs ORDER BY id LIMIT 1)")
        .bind("storing the report: the ledger did not answer within 10 s")
        .execute(t.db.pool())
        .await
        .unwrap();
    let (initech_id, slow) = t
        .client(json!({"rate_per_minute": 1, "rate_burst": 1}))
        .await;
    for (id, name) in [
        (&acme_id, "Acme Corp"),
        (&globex_id, "Globex"),
        (&initech_id, "Initech"),
    ] {
        sqlx::query("UPDATE clients SET name = $1 WHERE id = $2")
            .bind(name)
            .bind(id.as_str())
            .execute(t.db.pool())
            .await
            .unwrap();
    }
    for _ in 0..3 {
        t.get(&slow, "/v1/batches").await;
    }
    seed_chart_history(&t, &acme_id).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    browser.goto(&format!("{base}/ui/login")).await;
    std::fs::write(
        dir.join("login.png"),
        browser.client.screenshot().await.unwrap(),
    )
    .unwrap();
    browser.login(&base, "ann").await;
    let detail = format!("/ui/batches/{}", last.unwrap());
    let client_page = format!("/ui/clients/{acme_id}");
    let started = Instant::now();
    // A refused login, for the action log.
    try_login(&t, "mallory", "guess").await;
    for (name, path) in [
        ("overview", "/ui"),
        ("batches", "/ui/batches"),
        ("batch", detail.as_str()),
        ("queues", "/ui/queues"),
        ("workers", "/ui/workers"),
        ("dead-letters", "/ui/dead"),
        ("clients", "/ui/clients"),
        ("client", client_page.as_str()),
        ("charts", "/ui"),
        ("actions", "/ui/actions"),
    ] {
        if name == "actions" {
            // An action of this session, for the action log.
            browser
                .goto(&format!("{base}/ui/batches?status=awaiting_approval"))
                .await;
            browser
                .click("tr[data-batch] form.inline button:not(.danger)")
                .await;
            browser
                .wait_until(10, "approved", "return !!document.querySelector('.notice')")
                .await;
        }
        let shown = Instant::now();
        browser.goto(&format!("{base}{path}")).await;
        browser
            .wait_until(
                10,
                "live",
                "return document.getElementById('live-status').textContent === 'live'",
            )
            .await;
        eprintln!("{name}: live after {:?}", shown.elapsed());
        if name == "overview" {
            // Something to show in the live feed.
            t.import(&acme, "text/csv", people("feed", 30)).await;
            browser
                .wait_until(
                    10,
                    "feed",
                    "return document.querySelectorAll('#feed li:not(.empty)').length >= 3",
                )
                .await;
            // The cards follow the feed by one refresh.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        if name == "charts" {
            browser
                .client
                .execute(
                    "document.querySelector('h2 + #charts').previousElementSibling.scrollIntoView(); return true",
                    vec![],
                )
                .await
                .unwrap();
        }
        std::fs::write(
            dir.join(format!("{name}.png")),
            browser.client.screenshot().await.unwrap(),
        )
        .unwrap();
    }
    eprintln!(
        "screenshots written to {} in {:?}",
        dir.display(),
        started.elapsed()
    );
    browser.stop().await;
    t.stop().await;
}
register!(ignore = "writes docs/screenshots/*.png; run on purpose" screenshots);

async fn the_queue_page_shows_each_clients_depth_and_oldest_wait(b: Backend) {
    // No worker: the batches wait.
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (busy, busy_key) = t.client(json!({"max_concurrent_batches": 2})).await;
    let (quiet, quiet_key) = t.client(json!({"weight": 4})).await;
    let mut busy_batches = Vec::new();
    for i in 0..3 {
        let body = csv(&format!("busy{i}"), 2);
        busy_batches.push(t.import(&busy_key, "text/csv", body).await.batch_id);
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    t.import(&quiet_key, "text/csv", csv("quiet", 2)).await;
    let held =
        t.db.claim(
            &busy_batches[2],
            "holder",
            60_000,
            Claimable::AnyClient,
            Bundle::ONE,
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 1);

    let ui = Ui::login(&t, "ann").await;
    let page = ui.page("/ui/queues").await;
    let row = |client: &ClientId| {
        let at = page
            .find(&format!("data-client=\"{client}\""))
            .unwrap_or_else(|| panic!("no row for {client}: {page}"));
        page[at..at + page[at..].find("</tr>").unwrap()].to_owned()
    };
    let (busy_row, quiet_row) = (row(&busy), row(&quiet));
    assert!(
        busy_row.contains(r#"data-ready="2" data-processing="1""#),
        "{busy_row}"
    );
    assert!(
        quiet_row.contains(r#"data-ready="1" data-processing="0""#),
        "{quiet_row}"
    );
    // The busy client's oldest batch has waited over a second, and it is listed first.
    assert!(
        busy_row.contains("<td class=\"num\">2</td>"),
        "its cap: {busy_row}"
    );
    assert!(
        quiet_row.contains("<td class=\"num\">4</td>"),
        "its weight: {quiet_row}"
    );
    assert!(page.find(&busy_row).unwrap() < page.find(&quiet_row).unwrap());
    let age = |row: &str| {
        let cells: Vec<&str> = row.split("<td class=\"num\">").collect();
        cells.last().unwrap().split('<').next().unwrap().to_owned()
    };
    assert!(
        age(&busy_row).ends_with(" s"),
        "waited over a second: {busy_row}"
    );
    t.stop().await;
}
