//! Keys, lock-out, client state, rate limits and the admin surface.

use crate::common::harness::register;
use dataflow_contracts::BatchStatus;
use dataflow_contracts::http::{BatchView, ErrorBody};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{
    Backend, Proxy, TestApp, TestDb, backend_tests, csv, service_addr, wrong_secret,
};

backend_tests!(
    corrupt_stored_data_is_an_opaque_500_and_a_wrong_state_a_409,
    keys_authenticate_and_revocation_is_immediate,
    failed_attempts_lock_out_the_ip,
    a_key_id_tried_from_elsewhere_does_not_lock_its_owner_out,
    rate_limit_headers_and_429,
    admin_requires_the_operator_token_and_validates_input,
    approval_and_rejection,
);

async fn keys_authenticate_and_revocation_is_immediate(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let second = t.new_key(&client).await;
    assert_eq!(t.get(&key, "/v1/batches").await.status(), 200);
    assert_eq!(t.get(&second, "/v1/batches").await.status(), 200);

    // Unknown key id, wrong secret, garbage and no header all get the same answer.
    let last = if key.ends_with('0') { "1" } else { "0" };
    let wrong_secret = format!("{}{last}", &key[..key.len() - 1]);
    let secret = key.rsplit('_').next().unwrap();
    let unknown_id = format!("dfk_0000000000000000_{secret}");
    let mut bodies = Vec::new();
    for k in [wrong_secret.as_str(), unknown_id.as_str(), "garbage"] {
        let resp = t.get(k, "/v1/batches").await;
        assert_eq!(resp.status(), 401);
        bodies.push(resp.text().await.unwrap());
    }
    let none = t.http.get(t.url("/v1/batches")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    bodies.push(none.text().await.unwrap());
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");

    let key_id = key.split('_').nth(1).unwrap();
    let revoked = t
        .admin_send(Method::POST, &format!("/admin/keys/{key_id}/revoke"))
        .await;
    assert_eq!(revoked.status(), 204);
    assert_eq!(
        t.get(&key, "/v1/batches").await.status(),
        401,
        "revocation applies to the next request"
    );
    assert_eq!(
        t.get(&second, "/v1/batches").await.status(),
        200,
        "other keys keep working"
    );

    let keys: serde_json::Value = t
        .admin_send(Method::GET, &format!("/admin/clients/{client}/keys"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(keys.to_string().contains("revoked_at"));
    assert!(
        !keys.to_string().contains(&key[25..]),
        "secrets are never listed"
    );

    let off = t
        .admin_send(Method::POST, &format!("/admin/clients/{client}/deactivate"))
        .await;
    assert_eq!(off.status(), 200);
    let resp = t.get(&second, "/v1/batches").await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.json::<ErrorBody>().await.unwrap().code,
        "client_inactive"
    );
    t.admin_send(Method::POST, &format!("/admin/clients/{client}/activate"))
        .await;
    assert_eq!(t.get(&second, "/v1/batches").await.status(), 200);
    t.stop().await;
}

async fn failed_attempts_lock_out_the_ip(b: Backend) {
    let Some(t) =
        TestApp::spawn_with(b, dataflow::Roles::API, |c| c.api.auth_max_failures = 3).await
    else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    t.assert_locks_out(3, &key).await;
    t.stop().await;
}

/// Failures are counted per (IP, key id): whoever learns a key's visible id and fails with
/// it from their own address locks out only that address, never the key's owner.
async fn a_key_id_tried_from_elsewhere_does_not_lock_its_owner_out(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, dataflow::Roles::API, |c| {
        c.api.auth_max_failures = 3;
        c.api.trust_forwarded_for = true;
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let from = |ip: &str, key: &str| {
        t.http
            .get(t.url("/v1/batches"))
            .bearer_auth(key)
            .header("x-forwarded-for", ip)
            .send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    let guess = wrong_secret(&key);
    for _ in 0..3 {
        assert_eq!(status(from("10.0.0.1", &guess).await.unwrap()), 401);
    }
    assert_eq!(status(from("10.0.0.1", &guess).await.unwrap()), 429);
    // The owner's address has failed nothing: its own mistakes are still a plain 401.
    assert_eq!(status(from("10.0.0.2", &guess).await.unwrap()), 401);
    assert_eq!(status(from("10.0.0.2", &key).await.unwrap()), 200);
    assert_eq!(status(from("10.0.0.1", &key).await.unwrap()), 200);
    t.stop().await;
}

/// A ledger that cannot be reached answers a valid key 503 with `Retry-After`, however
/// many such requests come: an outage never counts toward the anonymous limit (which a
/// 429 `rate_limited` would show) nor toward the lock-out.
async fn a_ledger_outage_answers_503_not_the_anonymous_limit() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let proxy = Proxy::start(service_addr(&db.url, 5432)).await;
    let via_proxy = db.url.replacen(
        &service_addr(&db.url, 5432).to_string(),
        &proxy.addr.to_string(),
        1,
    );
    let t = TestApp::spawn_on(db, dataflow::Roles::API, |c| {
        c.database_url = Some(via_proxy);
        c.api.cache_ttl_ms = 100;
        c.api.cache_l1_ttl_ms = 100;
        c.api.auth_max_failures = 2;
        c.api.anonymous_rate_per_minute = 1;
        c.api.anonymous_rate_burst = 1;
    })
    .await;
    let (_, key) = t.client(json!({})).await;
    assert_eq!(t.get(&key, "/v1/batches").await.status(), 200);

    proxy.cut();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let answers = futures::future::join_all((0..6).map(|_| t.get(&key, "/v1/batches"))).await;
    for resp in answers {
        assert_eq!(resp.status(), 503, "a valid key while the ledger is cut");
        assert_eq!(resp.headers()["retry-after"], "1");
        let body: ErrorBody = resp.json().await.unwrap();
        assert_eq!(body.code, "ledger_unavailable");
    }

    proxy.heal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = t.get(&key, "/v1/batches").await.status();
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} after healing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    t.stop().await;
}
register!(a_ledger_outage_answers_503_not_the_anonymous_limit);

async fn rate_limit_headers_and_429(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, dataflow::Roles::API, |_| {}).await else {
        return;
    };
    let (_, key) = t
        .client(json!({"rate_per_minute": 60, "rate_burst": 3}))
        .await;
    for expected in [2, 1, 0] {
        let resp = t.get(&key, "/v1/batches").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"default\";q=60;w=60");
        let current = resp.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            current.starts_with(&format!("\"default\";r={expected};t=")),
            "{current}"
        );
    }
    let over = t.get(&key, "/v1/batches").await;
    assert_eq!(over.status(), 429);
    assert_eq!(over.headers()["retry-after"], "1");
    assert!(over.headers().contains_key("ratelimit"));
    assert_eq!(over.json::<ErrorBody>().await.unwrap().code, "rate_limited");
    // A policy change is enforced on the next request.
    let patch = t
        .admin(
            Method::PATCH,
            &format!(
                "/admin/clients/{}/policy",
                t.db.list_clients().await.unwrap()[0].id
            ),
        )
        .json(&json!({"rate_burst": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 200);
    assert_eq!(
        t.get(&key, "/v1/batches").await.headers()["ratelimit-policy"],
        "\"default\";q=60;w=60"
    );
    t.stop().await;
}

async fn admin_requires_the_operator_token_and_validates_input(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, dataflow::Roles::API, |_| {}).await else {
        return;
    };
    let anon = t.http.get(t.url("/admin/clients")).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    let wrong = t
        .http
        .get(t.url("/admin/clients"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let unknown_field = t
        .admin(Method::POST, "/admin/clients")
        .json(&json!({"name": "x", "colour": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_field.status(), 422);
    let bad_policy = t
        .admin(Method::POST, "/admin/clients")
        .json(&json!({"name": "x", "policy": {"rate_per_minute": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_policy.status(), 422);
    assert_eq!(
        bad_policy.json::<ErrorBody>().await.unwrap().code,
        "invalid_policy"
    );
    let not_json = t
        .admin(Method::POST, "/admin/clients")
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    let bad_key_id = t
        .admin_send(Method::POST, "/admin/keys/nope%00/revoke")
        .await;
    assert_eq!(bad_key_id.status(), 404);
    let missing = t
        .admin_send(Method::GET, "/admin/clients/cli_01J0000000000000000000000")
        .await;
    assert_eq!(missing.status(), 404);
    let (client, _) = t.client(json!({"notify_email": "ops@example.com"})).await;
    let policy: serde_json::Value = t
        .admin_send(Method::GET, &format!("/admin/clients/{client}/policy"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(policy["notify_email"], "ops@example.com");
    let cleared: serde_json::Value = t
        .admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
        .json(&json!({"notify_email": null}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(cleared["notify_email"].is_null());
    t.stop().await;
}

async fn approval_and_rejection(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"approval_required": true})).await;
    let held = t.import(&key, "text/csv", csv("ap", 3)).await;
    assert_eq!(held.status, BatchStatus::AwaitingApproval);
    let refused = t.import(&key, "text/csv", csv("rj", 3)).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        t.batch(&key, &held.batch_id).await.status,
        BatchStatus::AwaitingApproval,
        "workers leave it alone"
    );

    let approved = t
        .admin_send(
            Method::POST,
            &format!("/admin/batches/{}/approve", held.batch_id),
        )
        .await;
    assert_eq!(approved.status(), 200);
    t.wait_for(&key, &held.batch_id, BatchStatus::Completed)
        .await;
    let twice = t
        .admin_send(
            Method::POST,
            &format!("/admin/batches/{}/approve", held.batch_id),
        )
        .await;
    assert_eq!(twice.status(), 409);

    let no_reason = t
        .admin(
            Method::POST,
            &format!("/admin/batches/{}/reject", refused.batch_id),
        )
        .json(&json!({"reason": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_reason.status(), 422);
    let rejected: BatchView = t
        .admin(
            Method::POST,
            &format!("/admin/batches/{}/reject", refused.batch_id),
        )
        .json(&json!({"reason": "not this one"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rejected.status, BatchStatus::Rejected);
    let kinds: Vec<String> =
        t.db.batch_events(refused.batch_id.as_str())
            .await
            .unwrap()
            .iter()
            .map(|e| e.event.kind().to_owned())
            .collect();
    assert_eq!(kinds, ["BatchCreated", "BatchRejected"]);
    t.stop().await;
}

/// What goes wrong inside DataFlow is not the caller's mistake: a stored row that does not
/// read back answers `500 internal` with nothing of the row in it (it used to be a `422`
/// naming the stored policy), while an action on a target in the wrong state is a `409`.
async fn corrupt_stored_data_is_an_opaque_500_and_a_wrong_state_a_409(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, _) = t.client(json!({})).await;
    sqlx::query("UPDATE clients SET policy = '{\"rate_burst\": \"lots\"}' WHERE id = $1")
        .bind(client.as_str())
        .execute(t.db.pool())
        .await
        .unwrap();
    let resp = t
        .admin_send(Method::GET, &format!("/admin/clients/{client}"))
        .await;
    assert_eq!(resp.status(), 500);
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(
        (body.code.as_str(), body.detail.as_str()),
        ("internal", "internal error")
    );

    let (_, key) = t.client(json!({})).await;
    let imported = t.import(&key, "text/csv", "id\n1\n").await;
    t.wait_for(&key, &imported.batch_id, BatchStatus::Completed)
        .await;
    let resp = t
        .admin_send(
            Method::POST,
            &format!("/admin/batches/{}/retry", imported.batch_id),
        )
        .await;
    assert_eq!(resp.status(), 409);
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.code, "invalid_state");
    assert!(body.detail.contains("completed"), "{}", body.detail);
    t.stop().await;
}
