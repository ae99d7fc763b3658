//! The OpenAPI document: the committed copy is the generated one, the server serves it, every
//! documented operation is routed behind the credentials it names, and the statuses and
//! headers real requests get are the ones documented for their operation.

use crate::common::harness::register;
use std::path::PathBuf;

use dataflow::Roles;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, backend_tests, csv};

const REGENERATE: &str = "DATAFLOW_UPDATE_OPENAPI=1 cargo test --test it openapi::";

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

fn generated() -> String {
    dataflow_api::openapi::to_json(&dataflow_api::openapi())
}

fn committed_document_is_the_generated_one() {
    let path = committed_path();
    let fresh = generated();
    if std::env::var("DATAFLOW_UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is not the document the handlers generate; regenerate it with `{REGENERATE}` \
         and commit it",
        path.display()
    );
}
register!(sync committed_document_is_the_generated_one);

fn document_is_openapi_3_1_with_both_security_schemes() {
    let doc: Value = serde_json::from_str(&generated()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["scheme"], "bearer");
    assert_eq!(schemes["operator"]["scheme"], "bearer");
    let submit = &doc["paths"]["/v1/imports"]["post"];
    let content = &submit["requestBody"]["content"];
    assert!(content.get("text/csv").is_some(), "{submit}");
    assert!(content.get("application/x-ndjson").is_some(), "{submit}");
    assert!(
        submit["responses"]["202"]["headers"]
            .get("RateLimit")
            .is_some()
    );
    assert!(
        submit["responses"]["429"]["headers"]
            .get("Retry-After")
            .is_some()
    );
}
register!(sync document_is_openapi_3_1_with_both_security_schemes);

fn every_reference_in_the_document_resolves() {
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let doc: Value = serde_json::from_str(&generated()).unwrap();
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let pointer = r.strip_prefix('#').unwrap_or(r);
        assert!(doc.pointer(pointer).is_some(), "dangling {r}");
    }
}
register!(sync every_reference_in_the_document_resolves);

/// Every operation of the document, as (method, path template).
fn operations(doc: &Value) -> Vec<(Method, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            ops.push((method, path.clone()));
        }
    }
    ops
}

/// A concrete path for a template. Any value will do: the credential check answers before a
/// handler reads it, and only a path no route matches reaches the fallback's 404.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|part| if part.starts_with('{') { "x" } else { part })
        .collect::<Vec<_>>()
        .join("/")
}

/// The document's routes are the router's: each guarded operation answers 401 without
/// credentials (an undocumented or unrouted one would get the fallback's 404), and each open
/// one answers 200 without any.
async fn every_documented_operation_is_routed_behind_its_security() {
    // Dozens of credential-less requests in a row: not an attack to lock out here.
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::ALL, |c| {
        c.api.auth_max_failures = 1_000;
        c.api.anonymous_rate_burst = 1_000;
    })
    .await
    else {
        return;
    };
    let doc = t.open_json("/openapi.json").await;
    assert_eq!(doc, serde_json::from_str::<Value>(&generated()).unwrap());
    let ops = operations(&doc);
    assert!(ops.len() >= 35, "{} operations", ops.len());
    let mut ids: Vec<&str> = ops
        .iter()
        .map(|(m, p)| {
            doc["paths"][p][m.as_str().to_lowercase()]["operationId"]
                .as_str()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "operation ids are not unique");
    for (method, template) in ops {
        let op = &doc["paths"][&template][method.as_str().to_lowercase()];
        let resp = t
            .http
            .request(method.clone(), t.url(&concrete(&template)))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        if op.get("security").is_some() {
            assert_eq!(status, 401, "{method} {template} without credentials");
        } else {
            assert_eq!(status, 200, "{method} {template} is open");
        }
        assert_documented(&doc, &method, &template, &resp);
    }
    t.stop().await;
}
register!(every_documented_operation_is_routed_behind_its_security);

/// Fails unless `resp`'s status is documented for the operation, with every header the
/// document promises for that status that DataFlow always sends.
fn assert_documented(doc: &Value, method: &Method, template: &str, resp: &Response) {
    let status = resp.status().as_str().to_owned();
    let op = &doc["paths"][template][method.as_str().to_lowercase()];
    assert!(op.is_object(), "{method} {template} is not in the document");
    let documented = &op["responses"][&status];
    assert!(
        documented.is_object(),
        "{method} {template} answered {status}, which the document does not list: {}",
        op["responses"]
    );
    for always in ["RateLimit", "RateLimit-Policy", "Retry-After"] {
        if documented["headers"].get(always).is_some() {
            assert!(
                resp.headers().contains_key(always),
                "{method} {template} {status}: no {always} header"
            );
        }
    }
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.split(';').next().unwrap_or("");
    match documented.get("content").and_then(Value::as_object) {
        Some(content) => assert!(
            content.keys().any(|k| k.split(';').next() == Some(media)),
            "{method} {template} {status}: content type {ct} is not documented"
        ),
        None => assert!(
            ct.is_empty(),
            "{method} {template} {status}: undocumented body"
        ),
    }
}

/// Sends requests and checks each answer against the document.
struct Walk<'a> {
    t: &'a TestApp,
    doc: Value,
    seen: usize,
}

impl Walk<'_> {
    async fn send(
        &mut self,
        method: Method,
        template: &str,
        path: &str,
        f: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> Response {
        let req = self.t.http.request(method.clone(), self.t.url(path));
        let resp = f(req).send().await.unwrap();
        assert_documented(&self.doc, &method, template, &resp);
        self.seen += 1;
        resp
    }

    async fn expect(
        &mut self,
        status: u16,
        method: Method,
        template: &str,
        path: &str,
        f: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> Response {
        let resp = self.send(method.clone(), template, path, f).await;
        assert_eq!(resp.status(), status, "{method} {path}");
        resp
    }
}

const TOKEN: &str = "test-operator-token-0123456789";

async fn live_statuses_are_documented(backend: Backend) {
    let Some(t) = TestApp::spawn(backend).await else {
        return;
    };
    let doc = serde_json::from_str(&generated()).unwrap();
    let mut w = Walk {
        t: &t,
        doc,
        seen: 0,
    };
    let admin = |r: RequestBuilder| r.bearer_auth(TOKEN);
    let (client, key) = t.client(json!({"required_fields": ["name"]})).await;
    let as_key = |r: RequestBuilder| r.bearer_auth(&key);
    let body = |ct: &'static str, b: String| {
        let key = key.clone();
        move |r: RequestBuilder| r.bearer_auth(key).header("content-type", ct).body(b)
    };

    // Imports: accepted, duplicate, and each kind of refusal.
    let imp = "/v1/imports";
    let accepted: Value = w
        .expect(202, Method::POST, imp, imp, body("text/csv", csv("oa", 3)))
        .await
        .json()
        .await
        .unwrap();
    w.expect(200, Method::POST, imp, imp, body("text/csv", csv("oa", 3)))
        .await;
    w.expect(400, Method::POST, imp, imp, body("text/csv", String::new()))
        .await;
    w.expect(415, Method::POST, imp, imp, body("text/plain", "x".into()))
        .await;
    w.expect(
        422,
        Method::POST,
        imp,
        imp,
        body("text/csv", "id\n1\n".into()),
    )
    .await;
    w.expect(401, Method::POST, imp, imp, |r| r.bearer_auth("dfk_x_y"))
        .await;
    let batch = accepted["batch_id"].as_str().unwrap().to_owned();
    let import = accepted["id"].as_str().unwrap().to_owned();
    t.wait_for(
        &key,
        &batch.parse().unwrap(),
        dataflow_contracts::BatchStatus::Completed,
    )
    .await;

    // The client's reads.
    let reads = [
        ("/v1/imports/{id}", format!("/v1/imports/{import}")),
        ("/v1/batches", "/v1/batches?limit=5".to_owned()),
        ("/v1/batches/{id}", format!("/v1/batches/{batch}")),
        (
            "/v1/batches/{id}/errors",
            format!("/v1/batches/{batch}/errors"),
        ),
        (
            "/v1/batches/{id}/report",
            format!("/v1/batches/{batch}/report"),
        ),
        (
            "/v1/batches/{id}/report.csv",
            format!("/v1/batches/{batch}/report.csv"),
        ),
        ("/v1/records/{key}", "/v1/records/oa-1".to_owned()),
        ("/v1/webhooks/secret", "/v1/webhooks/secret".to_owned()),
        ("/v1/client", "/v1/client".to_owned()),
    ];
    for (template, path) in &reads {
        w.expect(200, Method::GET, template, path, as_key).await;
    }
    let missing = [
        ("/v1/imports/{id}", "/v1/imports/imp_nope"),
        (
            "/v1/batches/{id}",
            "/v1/batches/bat_01KB8Q7R6XQ8T2B4C6D8F0G2H4",
        ),
        ("/v1/records/{key}", "/v1/records/nobody"),
        // Not UTF-8 once decoded: no such thing, and still a JSON answer.
        ("/v1/batches/{id}", "/v1/batches/%FF"),
        ("/v1/records/{key}", "/v1/records/%C3%28"),
    ];
    for (template, path) in missing {
        w.expect(404, Method::GET, template, path, as_key).await;
    }
    for query in ["limit=0", "status=lost", "cursor=x", "colour=red"] {
        let path = format!("/v1/batches?{query}");
        w.expect(400, Method::GET, "/v1/batches", &path, as_key)
            .await;
    }
    let errors = format!("/v1/batches/{batch}/errors?cursor=-1");
    w.expect(400, Method::GET, "/v1/batches/{id}/errors", &errors, as_key)
        .await;

    // Admin: clients, policies, keys.
    let clients = "/admin/clients";
    w.expect(201, Method::POST, clients, clients, |r| {
        admin(r).json(&json!({"name": "walk"}))
    })
    .await;
    for refused in [
        json!({"name": "walk", "colour": "red"}),
        json!(["walk"]),
        json!({"name": "walk", "policy": [1000]}),
    ] {
        w.expect(422, Method::POST, clients, clients, |r| {
            admin(r).json(&refused)
        })
        .await;
    }
    w.expect(400, Method::POST, clients, clients, |r| {
        admin(r)
            .header("content-type", "application/json")
            .body("{")
    })
    .await;
    w.expect(415, Method::POST, clients, clients, |r| admin(r).body("{}"))
        .await;
    w.expect(200, Method::GET, clients, clients, admin).await;
    w.expect(401, Method::GET, clients, clients, |r| {
        r.bearer_auth("wrong")
    })
    .await;
    let one = "/admin/clients/{id}";
    w.expect(
        200,
        Method::GET,
        one,
        &format!("/admin/clients/{client}"),
        admin,
    )
    .await;
    w.expect(404, Method::GET, one, "/admin/clients/cli_nope", admin)
        .await;
    w.expect(404, Method::GET, one, "/admin/clients/%FF", admin)
        .await;
    let policy = format!("/admin/clients/{client}/policy");
    let policy_t = "/admin/clients/{id}/policy";
    w.expect(200, Method::GET, policy_t, &policy, admin).await;
    w.expect(200, Method::PATCH, policy_t, &policy, |r| {
        admin(r).json(&json!({"rate_burst": 100}))
    })
    .await;
    w.expect(422, Method::PATCH, policy_t, &policy, |r| {
        admin(r).json(&json!({"rate_burst": 0}))
    })
    .await;
    // serde would read an array as the fields in order; only an object is a patch.
    w.expect(422, Method::PATCH, policy_t, &policy, |r| {
        admin(r).json(&json!([1000]))
    })
    .await;
    let quota = json!({"daily_record_quota": u64::MAX});
    w.expect(422, Method::PATCH, policy_t, &policy, |r| {
        admin(r).json(&quota)
    })
    .await;
    let keys = format!("/admin/clients/{client}/keys");
    let keys_t = "/admin/clients/{id}/keys";
    let created: Value = w
        .expect(201, Method::POST, keys_t, &keys, |r| {
            admin(r).json(&json!({"label": "walk"}))
        })
        .await
        .json()
        .await
        .unwrap();
    w.expect(201, Method::POST, keys_t, &keys, admin).await;
    w.expect(201, Method::POST, keys_t, &keys, |r| {
        admin(r).json(&Value::Null)
    })
    .await;
    w.expect(415, Method::POST, keys_t, &keys, |r| {
        admin(r).header("content-type", "text/plain").body("label")
    })
    .await;
    w.expect(422, Method::POST, keys_t, &keys, |r| {
        admin(r).json(&json!({"label": 7}))
    })
    .await;
    w.expect(200, Method::GET, keys_t, &keys, admin).await;
    let revoke = format!("/admin/keys/{}/revoke", created["key_id"].as_str().unwrap());
    let revoke_t = "/admin/keys/{key_id}/revoke";
    w.expect(204, Method::POST, revoke_t, &revoke, admin).await;
    w.expect(
        404,
        Method::POST,
        revoke_t,
        "/admin/keys/nope/revoke",
        admin,
    )
    .await;

    // Admin: batch transitions in the wrong state, and the job queue.
    let admin_batch = format!("/admin/batches/{batch}");
    w.expect(200, Method::GET, "/admin/batches/{id}", &admin_batch, admin)
        .await;
    for action in ["approve", "retry"] {
        let path = format!("{admin_batch}/{action}");
        let template = format!("/admin/batches/{{id}}/{action}");
        w.expect(409, Method::POST, &template, &path, admin).await;
    }
    for action in ["reject", "discard"] {
        let path = format!("{admin_batch}/{action}");
        let template = format!("/admin/batches/{{id}}/{action}");
        w.expect(409, Method::POST, &template, &path, |r| {
            admin(r).json(&json!({"reason": "walk"}))
        })
        .await;
        w.expect(422, Method::POST, &template, &path, |r| {
            admin(r).json(&json!({"reason": " "}))
        })
        .await;
    }
    let jobs: Value = w
        .expect(
            200,
            Method::GET,
            "/admin/jobs",
            "/admin/jobs?kind=report",
            admin,
        )
        .await
        .json()
        .await
        .unwrap();
    w.expect(
        400,
        Method::GET,
        "/admin/jobs",
        "/admin/jobs?kind=fax",
        admin,
    )
    .await;
    w.expect(
        200,
        Method::GET,
        "/admin/jobs/stats",
        "/admin/jobs/stats",
        admin,
    )
    .await;
    let job = jobs["items"][0]["id"].as_str().unwrap();
    w.expect(
        200,
        Method::GET,
        "/admin/jobs/{id}",
        &format!("/admin/jobs/{job}"),
        admin,
    )
    .await;
    // A job that is not dead cannot be retried or discarded: the same 409 as for batches.
    for action in ["retry", "discard"] {
        let path = format!("/admin/jobs/{job}/{action}");
        let template = format!("/admin/jobs/{{id}}/{action}");
        let resp = w.expect(409, Method::POST, &template, &path, admin).await;
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["code"], "invalid_state");
    }
    w.expect(
        404,
        Method::GET,
        "/admin/jobs/{id}",
        "/admin/jobs/job_nope",
        admin,
    )
    .await;
    w.expect(200, Method::GET, "/admin/queues", "/admin/queues", admin)
        .await;
    w.expect(200, Method::GET, "/admin/workers", "/admin/workers", admin)
        .await;
    let drain = "/admin/workers/{id}/drain";
    w.expect(
        404,
        Method::POST,
        drain,
        "/admin/workers/nobody/drain",
        admin,
    )
    .await;

    // A deactivated client's key is refused with 403; activated again, it works.
    let deactivate = format!("/admin/clients/{client}/deactivate");
    let activate = format!("/admin/clients/{client}/activate");
    w.expect(
        200,
        Method::POST,
        "/admin/clients/{id}/deactivate",
        &deactivate,
        admin,
    )
    .await;
    w.expect(403, Method::GET, "/v1/client", "/v1/client", as_key)
        .await;
    w.expect(
        200,
        Method::POST,
        "/admin/clients/{id}/activate",
        &activate,
        admin,
    )
    .await;

    // The client's rate limit: 429 with Retry-After and the RateLimit headers.
    let tight = format!("/admin/clients/{client}/policy");
    w.expect(200, Method::PATCH, policy_t, &tight, |r| {
        admin(r).json(&json!({"rate_burst": 1, "rate_per_minute": 1}))
    })
    .await;
    let mut limited = false;
    for _ in 0..3 {
        let resp = w
            .send(Method::GET, "/v1/client", "/v1/client", as_key)
            .await;
        limited |= resp.status() == 429;
    }
    assert!(
        limited,
        "a burst of 1 per minute let three requests through"
    );

    for open in ["/healthz", "/readyz", "/openapi.json"] {
        w.expect(200, Method::GET, open, open, |r| r).await;
    }
    assert!(w.seen >= 70, "{} requests walked", w.seen);
    t.stop().await;
}

backend_tests!(live_statuses_are_documented);
