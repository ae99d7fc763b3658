//! Imports as typed data, through HTTP: a client's schema and its versions, records stored
//! typed and normalised, row errors by cell with their values, a header that does not fit
//! refused before anything is stored, and a batch with more refused records than its error
//! threshold allows refused whole.

use dataflow::Roles;
use dataflow_contracts::events::Event;
use dataflow_contracts::http::{BatchView, ClientView, RecordErrorPage, RecordView, SchemaView};
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_worker::{BatchClaim, Outcome, Worker};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, backend_tests};
use crate::ui::Ui;

backend_tests!(
    a_schema_is_versioned_and_a_batch_keeps_the_version_it_was_accepted_with,
    records_are_stored_typed_and_each_refused_cell_is_reported,
    a_header_that_does_not_fit_the_schema_is_refused_before_anything_is_stored,
    a_batch_over_its_error_threshold_writes_no_record,
    the_dashboard_shows_a_clients_schema_and_its_versions,
    a_dry_run_stores_nothing_and_agrees_with_the_import_that_follows,
    records_are_listed_filtered_and_exported,
    the_changes_feed_lists_every_change_once_in_order,
    the_feed_has_no_gap_while_batches_commit_at_once,
    a_purge_removes_a_clients_data_and_is_logged,
    a_file_refused_under_one_schema_is_imported_again_under_the_next,
);

/// Products: an integer key that also answers to `SKU Code`, a price, a required email, a
/// date, an enum and a pattern.
fn products(kinds: &[&str]) -> Value {
    json!({
        "fields": [
            {"name": "sku", "type": "integer", "aliases": ["SKU Code"]},
            {"name": "price", "type": "number", "constraints": {"minimum": 0}},
            {"name": "email", "type": "string", "format": "email", "constraints": {"required": true}},
            {"name": "day", "type": "date"},
            {"name": "kind", "constraints": {"enum": kinds}},
            {"name": "code", "constraints": {"pattern": "[A-Z]{3}"}}
        ],
        "primaryKey": "sku"
    })
}

async fn put_schema(t: &TestApp, client: &ClientId, schema: &Value) -> reqwest::Response {
    t.admin(Method::PUT, &format!("/admin/clients/{client}/schema"))
        .json(schema)
        .send()
        .await
        .unwrap()
}

async fn set_schema(t: &TestApp, client: &ClientId, schema: &Value) -> SchemaView {
    let resp = put_schema(t, client, schema).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    resp.json().await.unwrap()
}

async fn claim(w: &Worker, id: &BatchId) -> dataflow_platform::ledger::Lease {
    match w.claim_batch(id).await.unwrap() {
        BatchClaim::Taken(mut leases) => leases.remove(0),
        other => panic!("batch {id} not taken: {other:?}"),
    }
}

async fn process(t: &TestApp, key: &str, id: &BatchId) -> (Outcome, BatchView) {
    let w = t.worker();
    let outcome = w.process(claim(&w, id).await, &Default::default()).await;
    (outcome, t.batch(key, id).await)
}

/// Every row error of a batch, page by page (`limit` per page).
async fn all_errors(t: &TestApp, key: &str, id: &BatchId, limit: u32) -> Vec<Value> {
    let mut errors = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/batches/{id}/errors?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let resp = t.get(key, &path).await;
        assert_eq!(resp.status(), 200);
        let page: RecordErrorPage = resp.json().await.unwrap();
        errors.extend(
            page.items
                .iter()
                .map(|e| json!([e.line, e.field, e.code, e.value])),
        );
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return errors,
        }
    }
}

async fn a_schema_is_versioned_and_a_batch_keeps_the_version_it_was_accepted_with(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;

    // Refusals name the property at fault; nothing becomes a version.
    let look_around = json!({"fields": [{"name": "id", "constraints": {"pattern": "(?=a)"}}]});
    let resp = put_schema(&t, &client, &look_around).await;
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "invalid_schema");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("fields[0].constraints.pattern"),
        "{body}"
    );
    let unkeyed = json!({"fields": [{"name": "name"}]});
    let resp = put_schema(&t, &client, &unkeyed).await;
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().starts_with("primaryKey"),
        "{body}"
    );
    let resp = t.get(&key, "/v1/schema").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "no_schema");

    let v1 = set_schema(&t, &client, &products(&["a", "b"])).await;
    assert_eq!((v1.version, v1.current), (1, true));
    let own: SchemaView = t.get(&key, "/v1/schema").await.json().await.unwrap();
    assert_eq!(own.schema, products(&["a", "b"]));

    // Accepted under version 1, processed after version 2 allows `c`: still refused by 1.
    let csv = "SKU Code,price,email,day,kind,code\n1,2.50,a@x.io,2026-12-06,c,ABC\n";
    let batch = t.import(&key, "text/csv", csv).await.batch_id;
    let v2 = set_schema(&t, &client, &products(&["a", "b", "c"])).await;
    assert_eq!(v2.version, 2);
    let old: SchemaView = t
        .admin(
            Method::GET,
            &format!("/admin/clients/{client}/schema?version=1"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((old.version, old.current), (1, false));
    let (_, done) = process(&t, &key, &batch).await;
    assert_eq!(done.schema_version, Some(1));
    assert_eq!(
        all_errors(&t, &key, &batch, 50).await,
        [json!([2, "kind", "constraint.enum", "c"])]
    );
    // A new import is checked with version 2.
    let csv2 = "sku,price,email,day,kind,code\n1,2.50,a@x.io,2026-12-06,c,ABC\n";
    let batch2 = t.import(&key, "text/csv", csv2).await.batch_id;
    let (_, done2) = process(&t, &key, &batch2).await;
    assert_eq!((done2.schema_version, done2.records_written), (Some(2), 1));

    // Removed: new imports are not checked; the versions stay readable.
    let resp = t
        .admin(Method::DELETE, &format!("/admin/clients/{client}/schema"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let view: ClientView = resp.json().await.unwrap();
    assert_eq!(view.schema_version, None);
    assert_eq!(t.get(&key, "/v1/schema").await.status(), 404);
    let batch3 = t
        .import(&key, "text/csv", "id,x\nfree,form\n")
        .await
        .batch_id;
    let (_, done3) = process(&t, &key, &batch3).await;
    assert_eq!((done3.schema_version, done3.records_written), (None, 1));
    let resp = t
        .admin(
            Method::GET,
            &format!("/admin/clients/{client}/schema?version=2"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A schema keyed by the policy's key field holds the policy to it.
    let by_policy = json!({"fields": [{"name": "id"}, {"name": "x"}]});
    set_schema(&t, &client, &by_policy).await;
    let patch = |key_field: &str| {
        t.admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
            .json(&json!({"key_field": key_field}))
            .send()
    };
    let resp = patch("sku").await.unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("primaryKey"),
        "{body}"
    );
    assert_eq!(patch("x").await.unwrap().status(), 200);
}

async fn records_are_stored_typed_and_each_refused_cell_is_reported(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    set_schema(&t, &client, &products(&["a", "b"])).await;
    let csv = "SKU Code,price,email,day,kind,code\n\
               07,1.50,a@x.io,2026-12-06,a,ABC\n\
               8,-1,nope,2026-02-30,c,abcd\n";
    let batch = t.import(&key, "text/csv", csv).await.batch_id;
    let (_, done) = process(&t, &key, &batch).await;
    assert_eq!((done.records_written, done.records_failed), (1, 1));

    // Typed and normalised: the integer key as a number, the price with its digits as
    // written, never through a float.
    let resp = t.get(&key, "/v1/records/7").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    // (PostgreSQL's jsonb writes a space after the colon.)
    assert!(
        text.replace(": ", ":").contains(r#""price":1.50"#),
        "{text}"
    );
    let record: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        record["data"],
        json!({"sku": 7, "price": 1.5, "email": "a@x.io", "day": "2026-12-06", "kind": "a", "code": "ABC"})
    );

    // Every refused cell of line 3, in field order, with its value; pages of two meet in
    // the middle of the line.
    let expected = [
        json!([3, "price", "constraint.minimum", "-1"]),
        json!([3, "email", "type", "nope"]),
        json!([3, "day", "type", "2026-02-30"]),
        json!([3, "kind", "constraint.enum", "c"]),
        json!([3, "code", "constraint.pattern", "abcd"]),
    ];
    assert_eq!(all_errors(&t, &key, &batch, 2).await, expected);
    assert_eq!(all_errors(&t, &key, &batch, 50).await, expected);
    let resp = t
        .get(&key, &format!("/v1/batches/{batch}/errors?cursor=x"))
        .await;
    assert_eq!(resp.status(), 400);
    let report = t
        .get(&key, &format!("/v1/batches/{batch}/report.csv"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        report.starts_with("line,field,code,detail,value\n"),
        "{report}"
    );
    assert!(
        report.contains(",-1\n"),
        "a number is not defused: {report}"
    );
    assert!(report.contains("\n3,code,constraint.pattern,"), "{report}");

    // `7` and `07` are one integer: the same record, unchanged.
    let again = "sku,price,email,day,kind,code\n7,1.50,a@x.io,2026-12-06,a,ABC\n";
    let batch2 = t.import(&key, "text/csv", again).await.batch_id;
    let (_, done2) = process(&t, &key, &batch2).await;
    assert_eq!((done2.records_written, done2.records_unchanged), (0, 1));
}

async fn a_header_that_does_not_fit_the_schema_is_refused_before_anything_is_stored(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    set_schema(&t, &client, &products(&["a"])).await;
    for (csv, code, names) in [
        ("sku,price\n1,2\n", "missing_field", "`email`"),
        (
            "sku,email,colour\n1,a@x.io,red\n",
            "unknown_field",
            "`colour`",
        ),
    ] {
        let resp = t.submit(&key, "text/csv", csv).send().await.unwrap();
        assert_eq!(resp.status(), 422);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], code);
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.starts_with("line 1: ") && detail.contains(names),
            "{detail}"
        );
    }
    let page: Value = t.get(&key, "/v1/batches").await.json().await.unwrap();
    assert_eq!(page["items"], json!([]), "nothing was stored");
    // NDJSON names its fields per record: an unknown one is that record's error.
    let ndjson =
        "{\"sku\":1,\"email\":\"a@x.io\"}\n{\"sku\":2,\"email\":\"b@x.io\",\"colour\":\"red\"}\n";
    let batch = t
        .import(&key, "application/x-ndjson", ndjson)
        .await
        .batch_id;
    let (_, done) = process(&t, &key, &batch).await;
    assert_eq!((done.records_written, done.records_failed), (1, 1));
    assert_eq!(
        all_errors(&t, &key, &batch, 50).await,
        [json!([2, "colour", "unknown_field", null])]
    );
}

/// 30 records of `tag`, `bad` of them (the first ones) with a negative quantity.
fn items(tag: &str, bad: usize) -> String {
    let mut s = String::from("id,qty\n");
    for i in 0..30 {
        let qty = if i < bad { -1 } else { 1 };
        s.push_str(&format!("{tag}-{i},{qty}\n"));
    }
    s
}

async fn a_batch_over_its_error_threshold_writes_no_record(b: Backend) {
    // Chunks of 10: the refused batch would have committed its valid chunks one by one.
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let schema = json!({
        "fields": [{"name": "id"}, {"name": "qty", "type": "integer", "constraints": {"minimum": 0}}],
        "primaryKey": "id",
        "maxErrorRatio": 0.2
    });
    set_schema(&t, &client, &schema).await;

    let over = t.import(&key, "text/csv", items("over", 10)).await.batch_id;
    let (outcome, refused) = process(&t, &key, &over).await;
    assert_eq!(outcome, Outcome::Refused);
    assert_eq!(refused.status, BatchStatus::Rejected);
    assert_eq!((refused.records_written, refused.records_failed), (0, 10));
    let why = refused.last_error.unwrap();
    assert!(
        why.starts_with("10 of 30 records were refused (33.3 %)"),
        "{why}"
    );
    for i in [0, 15, 29] {
        assert!(
            t.db.get_record(&client, &format!("over-{i}"))
                .await
                .unwrap()
                .is_none(),
            "a refused batch writes no record"
        );
    }
    assert_eq!(
        all_errors(&t, &key, &over, 500).await.len(),
        10,
        "every error is reported"
    );
    let events = t.db.batch_events(over.as_str()).await.unwrap();
    let Some(Event::BatchRejected(rejected)) = events.last().map(|e| &e.event) else {
        panic!("no BatchRejected: {events:?}")
    };
    assert_eq!(rejected.code.as_deref(), Some("too_many_errors"));
    let report: Value = t
        .get(&key, &format!("/v1/batches/{over}/report"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["errors_by_code"]["constraint.minimum"], 10);

    // At or below the threshold the valid records are written, as without one.
    let under = t.import(&key, "text/csv", items("under", 6)).await.batch_id;
    let (_, done) = process(&t, &key, &under).await;
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!((done.records_written, done.records_failed), (24, 6));

    // Without a schema, the policy's threshold applies the same way.
    let (_, strict) = t.client(json!({"max_error_ratio": 0.0})).await;
    let one_bad = "id,qty\nx-1,1\n,2\n";
    let batch = t.import(&strict, "text/csv", one_bad).await.batch_id;
    let (outcome, _) = process(&t, &strict, &batch).await;
    assert_eq!(outcome, Outcome::Refused);
    let resp = t
        .admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
        .json(&json!({"max_error_ratio": 1.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422, "a ratio is between 0 and 1");
}

async fn the_dashboard_shows_a_clients_schema_and_its_versions(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, _) = t.client(json!({})).await;
    let ui = Ui::login(&t, "ann").await;
    let page = ui.page(&format!("/ui/clients/{client}/schema")).await;
    assert!(
        page.contains("No schema: records are stored as they come"),
        "{page}"
    );
    set_schema(&t, &client, &products(&["a"])).await;
    let mut v2 = products(&["a", "b"]);
    v2["fields"][0]["name"] = json!("<b>sku</b>");
    v2["primaryKey"] = json!("<b>sku</b>");
    v2["maxErrorRatio"] = json!(0.05);
    set_schema(&t, &client, &v2).await;
    let list = ui.page("/ui/clients").await;
    assert!(list.contains(&format!("/ui/clients/{client}/schema")) && list.contains("version 2"));
    let page = ui.page(&format!("/ui/clients/{client}/schema")).await;
    assert!(
        page.contains("Imports are checked with version 2"),
        "{page}"
    );
    assert!(
        page.contains("&lt;b&gt;sku&lt;/b&gt;") && !page.contains("<b>sku"),
        "escaped"
    );
    assert!(page.contains("SKU Code") && page.contains("[A-Z]{3}") && page.contains("5 %"));
    let old = ui
        .page(&format!("/ui/clients/{client}/schema?version=1"))
        .await;
    assert!(old.contains("Version 1") && old.contains(">sku<"), "{old}");
    for (path, status) in [
        (format!("/ui/clients/{client}/schema?version=9"), 404),
        (format!("/ui/clients/{client}/schema?version=x"), 400),
        ("/ui/clients/cli_nope/schema".to_owned(), 404),
    ] {
        assert_eq!(
            ui.get(&path).send().await.unwrap().status(),
            status,
            "{path}"
        );
    }
}

/// A product row of [`products`] (kind `a`, code `ABC`).
fn product(sku: &str, price: &str) -> String {
    format!("{sku},{price},p{sku}@x.io,2026-12-06,a,ABC\n")
}

async fn dry_run(t: &TestApp, key: &str, body: String) -> reqwest::Response {
    t.http
        .post(t.url("/v1/imports?dry_run=true"))
        .bearer_auth(key)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn a_dry_run_stores_nothing_and_agrees_with_the_import_that_follows(b: Backend) {
    // Chunks of 10 records (the test configuration): the file below repeats a key within a
    // chunk and across two, which the import counts differently.
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    set_schema(&t, &client, &products(&["a"])).await;
    let header = "sku,price,email,day,kind,code\n";
    let mut first = header.to_owned();
    for sku in 1..=5 {
        first.push_str(&product(&sku.to_string(), "1.50"));
    }
    let batch = t.import(&key, "text/csv", first).await.batch_id;
    process(&t, &key, &batch).await;

    let mut body = header.to_owned();
    body.push_str("03,1.50,p3@x.io,2026-12-06,a,ABC\n"); // 3: the same values
    body.push_str(&product("4", "2.00")); // 4: a new price
    body.push_str(&product("5", "9")); // 5: twice in one chunk, the last wins
    body.push_str(&product("5", "1.50"));
    body.push_str("x,1,bad,2026-12-06,a,ABC\n"); // refused: two cells
    for sku in 100..115 {
        body.push_str(&product(&sku.to_string(), "3")); // new
    }
    body.push_str(&product("100", "4")); // a later chunk changes one of them
    let before: Value = t.get(&key, "/v1/batches").await.json().await.unwrap();

    let resp = dry_run(&t, &key, body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("location").is_none());
    let view: Value = resp.json().await.unwrap();
    assert_eq!(
        (
            &view["records"],
            &view["valid"],
            &view["rejected"],
            &view["would_insert"],
            &view["would_update"],
            &view["unchanged"]
        ),
        (
            &json!(21),
            &json!(20),
            &json!(1),
            &json!(15),
            &json!(2),
            &json!(3)
        ),
        "{view}"
    );
    assert_eq!(view["schema_version"], 1);
    assert_eq!(view["refusal"], Value::Null);
    let errors: Vec<&str> = view["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert_eq!(errors, ["type", "type"], "{view}");
    let updates: Vec<&Value> = view["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change"] == "update")
        .collect();
    assert_eq!(updates.len(), 1, "{view}");
    let update = updates[0];
    assert_eq!(update["key"], "4");
    assert_eq!(
        update["fields"],
        json!([{"field": "price", "old": 1.50, "new": 2.00}])
    );
    let inserts = view["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change"] == "insert")
        .count();
    assert_eq!(inserts, 15, "{view}");
    // Nothing was stored.
    let after: Value = t.get(&key, "/v1/batches").await.json().await.unwrap();
    assert_eq!(before, after);
    assert_eq!(t.get(&key, "/v1/records/100").await.status(), 404);

    // The import itself does what the dry run said.
    let batch = t.import(&key, "text/csv", body.clone()).await.batch_id;
    let (_, done) = process(&t, &key, &batch).await;
    assert_eq!(done.records_written, 15 + 2);
    assert_eq!((done.records_unchanged, done.records_failed), (3, 1));

    // The same payload again: the import would be the earlier one, changing nothing.
    let view: Value = dry_run(&t, &key, body).await.json().await.unwrap();
    assert_eq!(
        view["duplicate_of"],
        json!(batch_import(&t, &key, &batch).await)
    );
    assert_eq!(view["would_insert"], 0);

    // Past the threshold: refused whole, nothing it would write.
    let strict = json!({"fields": [{"name": "sku", "type": "integer"}], "primaryKey": "sku", "maxErrorRatio": 0.1});
    set_schema(&t, &client, &strict).await;
    let view: Value = dry_run(&t, &key, "sku\n1\nx\n".into())
        .await
        .json()
        .await
        .unwrap();
    assert!(
        view["refusal"]
            .as_str()
            .unwrap()
            .starts_with("1 of 2 records were refused"),
        "{view}"
    );
    assert_eq!(
        (&view["would_insert"], &view["changes"]),
        (&json!(0), &json!([]))
    );

    // Refused as an import would be.
    assert_eq!(
        dry_run(&t, &key, "sku,colour\n1,red\n".into())
            .await
            .status(),
        422
    );
    assert_eq!(dry_run(&t, &key, "sku\n\"1\n".into()).await.status(), 400);
    let resp = t
        .http
        .post(t.url("/v1/imports?dry_run=maybe"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body("sku\n1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

async fn batch_import(t: &TestApp, key: &str, batch: &BatchId) -> String {
    t.batch(key, batch).await.import_id.to_string()
}

async fn export(t: &TestApp, key: &str, query: &str, accept: &str) -> String {
    let resp = t
        .http
        .get(t.url(&format!("/v1/records{query}")))
        .bearer_auth(key)
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{query}");
    resp.text().await.unwrap()
}

async fn records_are_listed_filtered_and_exported(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |c| c.worker.chunk_size = 1_000).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let mut first = String::from("id,name\n");
    for i in 0..25 {
        first.push_str(&format!("k-{i:02},=n{i}\n"));
    }
    let batch1 = t.import(&key, "text/csv", first).await.batch_id;
    process(&t, &key, &batch1).await;
    // (A JSON number passes through a float on the way in: a decimal whose digits matter is
    // sent as text, or typed by a schema.)
    let ndjson = "{\"id\":\"k-03\",\"name\":\"three\",\"price\":\"1.50\"}\n";
    let batch2 = t
        .import(&key, "application/x-ndjson", ndjson)
        .await
        .batch_id;
    process(&t, &key, &batch2).await;

    // Pages in key order, the cursor the last key.
    let mut keys = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: Value = t
            .get(&key, &format!("/v1/records?limit=10&cursor={cursor}"))
            .await
            .json()
            .await
            .unwrap();
        keys.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["key"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("k-{i:02}")).collect();
    assert_eq!(keys, expected);

    let page: Value = t
        .get(&key, "/v1/records?key_prefix=k-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 10);
    let page: Value = t
        .get(&key, &format!("/v1/records?batch_id={batch2}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"][0]["key"], "k-03");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let page: Value = t
        .get(&key, "/v1/records?updated_since=2999-01-01T00:00:00Z")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"], json!([]));
    for bad in [
        "updated_since=yesterday",
        "batch_id=nope",
        "limit=0",
        "colour=red",
    ] {
        assert_eq!(
            t.get(&key, &format!("/v1/records?{bad}")).await.status(),
            400,
            "{bad}"
        );
    }

    // NDJSON: every record, one per line, as the API shows it.
    let lines = export(&t, &key, "", "application/x-ndjson").await;
    let records: Vec<RecordView> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 25);
    assert_eq!(records[3].data.value()["price"], "1.50");
    // CSV: columns from the first records read (fields past them would go to `_extra`),
    // formulas defused.
    let csv = export(&t, &key, "?key_prefix=k-0", "text/csv").await;
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "key,id,name,price,_extra");
    assert_eq!(rows.len(), 11);
    assert_eq!(rows[1], "k-00,k-00,'=n0,,");
    assert_eq!(rows[4], "k-03,k-03,three,1.50,");
}

/// Follows the feed from the start, `limit` per request; every change in order.
/// The records `client` holds, as `dataflow status` and the dashboard show it.
async fn held_records(t: &TestApp, client: &ClientId) -> u64 {
    let storage = t.db.storage_by_client().await.unwrap();
    storage
        .iter()
        .find(|s| &s.client_id == client)
        .unwrap()
        .records
}

async fn follow_feed(t: &TestApp, key: &str, limit: u32) -> Vec<Value> {
    let mut changes = Vec::new();
    let mut after = 0u64;
    loop {
        let page = feed_page(t, key, after, limit).await;
        changes.extend(page["items"].as_array().unwrap().iter().cloned());
        after = page["cursor"].as_str().unwrap().parse().unwrap();
        if page["more"] == false {
            return changes;
        }
    }
}

async fn the_changes_feed_lists_every_change_once_in_order(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let (_, other) = t.client(json!({})).await;
    let rows = |range: std::ops::Range<u32>, tag: &str| {
        let mut s = String::from("id,v\n");
        for i in range {
            s.push_str(&format!("k{i:02},{tag}\n"));
        }
        s
    };
    let a = t.import(&key, "text/csv", rows(0..30, "a")).await.batch_id;
    process(&t, &key, &a).await;
    // Updates 10 records, leaves 10 as they are, inserts 5.
    let mut body = rows(10..20, "b");
    body.push_str(&rows(20..30, "a")["id,v\n".len()..]);
    body.push_str(&rows(30..35, "b")["id,v\n".len()..]);
    let b2 = t.import(&key, "text/csv", body).await.batch_id;
    process(&t, &key, &b2).await;
    let delete = || {
        t.http
            .delete(t.url("/v1/records/k05"))
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 204);
    assert_eq!(delete().await.unwrap().status(), 404, "deleted already");
    assert_eq!(t.get(&key, "/v1/records/k05").await.status(), 404);
    // What the client holds follows: 30 inserted, 5 more, 10 updated, 1 deleted.
    assert_eq!(held_records(&t, &client).await, 34);

    let feed = follow_feed(&t, &key, 7).await;
    let seqs: Vec<u64> = feed.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=46).collect::<Vec<u64>>(),
        "every change once, in order"
    );
    let kinds = |batch: &BatchId, kind: &str| {
        feed.iter()
            .filter(|c| c["batch_id"] == batch.as_str() && c["kind"] == kind)
            .count()
    };
    assert_eq!((kinds(&a, "inserted"), kinds(&a, "updated")), (30, 0));
    assert_eq!((kinds(&b2, "inserted"), kinds(&b2, "updated")), (5, 10));
    let last = feed.last().unwrap();
    assert_eq!(
        (
            &last["key"],
            &last["kind"],
            &last["data"],
            &last["batch_id"]
        ),
        (&json!("k05"), &json!("deleted"), &Value::Null, &Value::Null)
    );
    let k12: Vec<&Value> = feed.iter().filter(|c| c["key"] == "k12").collect();
    assert_eq!(k12[1]["data"], json!({"id": "k12", "v": "b"}));

    // Each completion names its span of the feed.
    for (batch, span) in [(&a, (1, 30)), (&b2, (31, 45))] {
        let events = t.db.batch_events(batch.as_str()).await.unwrap();
        let Some(Event::BatchCompleted(done)) = events.last().map(|e| &e.event) else {
            panic!("{events:?}")
        };
        let range = done.changes.unwrap();
        assert_eq!((range.first, range.last), span);
    }
    // A client sees its own feed only; an empty one answers with the cursor it was given.
    let page: Value = t
        .get(&other, "/v1/changes?after=3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page, json!({"items": [], "cursor": "3", "more": false}));
    for bad in ["after=-1", "after=x", "limit=0", "limit=1001"] {
        assert_eq!(
            t.get(&key, &format!("/v1/changes?{bad}")).await.status(),
            400,
            "{bad}"
        );
    }
}

/// Eight imports of one client processed four at a time, in chunks of ten, while a reader
/// follows the feed: it never sees a number before a smaller one has committed (which would
/// be a change it skips), and in the end it has seen every change once.
async fn the_feed_has_no_gap_while_batches_commit_at_once(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| c.worker.concurrency = 4).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let mut batches = Vec::new();
    for n in 0..8 {
        let mut body = String::from("id,v\n");
        for i in 0..200 {
            body.push_str(&format!("b{n}-{i:03},x\n"));
        }
        batches.push(t.import(&key, "text/csv", body).await.batch_id);
    }
    let mut seen = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen < 1_600 {
        assert!(
            std::time::Instant::now() < deadline,
            "the feed stopped at {seen}"
        );
        let page = feed_page(&t, &key, seen, 1000).await;
        for c in page["items"].as_array().unwrap() {
            seen += 1;
            assert_eq!(
                c["seq"].as_u64().unwrap(),
                seen,
                "a change seen out of order"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for batch in &batches {
        t.wait_for(&key, batch, BatchStatus::Completed).await;
    }
    let page = feed_page(&t, &key, seen, 1000).await;
    assert_eq!(page["items"], json!([]), "nothing past the 1,600 changes");
    t.stop().await;
}

/// One page of the change feed; tests poll faster than a client's rate allows, so a 429
/// is waited out rather than read as a page.
async fn feed_page(t: &TestApp, key: &str, after: u64, limit: u32) -> Value {
    loop {
        let resp = t
            .get(key, &format!("/v1/changes?after={after}&limit={limit}"))
            .await;
        if resp.status() == 429 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(resp.status(), 200);
        return resp.json().await.unwrap();
    }
}

/// A record written while a purge runs (PostgreSQL lets imports go on) stays counted in
/// what its client holds: the purge takes away what it deleted, not everything.
async fn a_record_written_during_a_purge_stays_counted() {
    let Some(t) = TestApp::spawn_with(Backend::Postgres, Roles::ALL, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let done = t
        .import(&key, "text/csv", "id,v\n1,a\n2,b\n")
        .await
        .batch_id;
    t.wait_for(&key, &done, BatchStatus::Completed).await;
    // Its follow-up jobs end first: a job that could still read the batch holds a purge off.
    while t
        .db
        .queue_depths()
        .await
        .unwrap()
        .iter()
        .any(|d| d.queue.starts_with("jobs:") && d.state != "dead")
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(held_records(&t, &client).await, 2);

    // A writer in the middle of a chunk holds the client's feed counter.
    let mut writer = t.db.pool().begin().await.unwrap();
    sqlx::query("SELECT last FROM change_counters WHERE client_id = $1 FOR UPDATE")
        .bind(client.as_str())
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    // The purge deletes the records it sees, then waits for the counter.
    let purge = tokio::spawn({
        let (db, client) = (t.db.clone(), client.clone());
        async move { db.purge_client(&client).await }
    });
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'UPDATE change_counters%'",
        )
        .fetch_one(t.db.pool())
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while waiting().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge never reached the counter"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The writer's record lands after the purge's look, counted as a chunk counts it.
    sqlx::query(
        "INSERT INTO records (client_id, record_key, data, checksum, batch_id, updated_at) \
         VALUES ($1, 'late', '{}', 'x', $2, 0)",
    )
    .bind(client.as_str())
    .bind(done.as_str())
    .execute(&mut *writer)
    .await
    .unwrap();
    sqlx::query("UPDATE change_counters SET records = records + 1 WHERE client_id = $1")
        .bind(client.as_str())
        .execute(&mut *writer)
        .await
        .unwrap();
    writer.commit().await.unwrap();

    let purged = purge.await.unwrap().unwrap();
    assert_eq!(purged.records, 2);
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records WHERE client_id = $1")
        .bind(client.as_str())
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!((stored, held_records(&t, &client).await), (1, 1));
}
crate::common::harness::register!(a_record_written_during_a_purge_stays_counted);

async fn a_purge_removes_a_clients_data_and_is_logged(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let (_, other) = t.client(json!({})).await;
    let first_file = "id,v\n1,a\n2,b\n,c\n";
    let done = t.import(&key, "text/csv", first_file).await.batch_id;
    t.wait_for(&key, &done, BatchStatus::Completed).await;
    let kept = t
        .import(&other, "text/csv", "id,v\n1,kept\n")
        .await
        .batch_id;
    t.wait_for(&other, &kept, BatchStatus::Completed).await;
    let purge = || {
        t.admin(Method::POST, &format!("/admin/clients/{client}/purge"))
            .send()
    };

    // A batch that could still read its file or write records holds the purge off.
    let resp = t
        .admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
        .json(&json!({"approval_required": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let waiting = t.import(&key, "text/csv", "id,v\n3,c\n").await.batch_id;
    let resp = purge().await.unwrap();
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().starts_with("1 batches"),
        "{body}"
    );
    let resp = t
        .admin(Method::POST, &format!("/admin/batches/{waiting}/approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    t.wait_for(&key, &waiting, BatchStatus::Completed).await;

    // So do follow-up jobs still to run (they read row errors): wait for the reports.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let purged: Value = loop {
        let resp = purge().await.unwrap();
        if resp.status() == 200 {
            break resp.json().await.unwrap();
        }
        assert_eq!(resp.status(), 409);
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            resp.text().await.unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        purged,
        json!({"records": 3, "changes": 3, "payloads": 2, "row_errors": 1, "reports": 2})
    );
    // Gone from the ledger, not hidden; followers of the feed are told.
    let page: Value = t.get(&key, "/v1/records").await.json().await.unwrap();
    assert_eq!(page["items"], json!([]));
    let feed: Value = t
        .get(&key, "/v1/changes?after=3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(feed["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        (&feed["items"][0]["seq"], &feed["items"][0]["kind"]),
        (&json!(4), &json!("purged"))
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM records WHERE client_id = $1) \
              + (SELECT COUNT(*) FROM record_changes WHERE client_id = $1 AND kind <> 'purged') \
              + (SELECT COUNT(*) FROM payload_parts p JOIN batches b ON b.payload_id = p.payload_id WHERE b.client_id = $1) \
              + (SELECT COUNT(*) FROM record_errors e JOIN batches b ON b.id = e.batch_id WHERE b.client_id = $1) \
              + (SELECT COUNT(*) FROM reports r JOIN batches b ON b.id = r.batch_id WHERE b.client_id = $1)",
    )
    .bind(client.as_str())
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(left, 0);
    assert_eq!(held_records(&t, &client).await, 0, "what it holds says so");
    assert_eq!(
        t.get(&other, "/v1/records/1").await.status(),
        200,
        "another client's stay"
    );
    assert_eq!(
        t.batch(&key, &done).await.records_written,
        2,
        "the batch's counts stay"
    );
    // The same file again is a new import (its dedup claim went with the data), numbered
    // after the purge in the feed.
    let resp = t
        .admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
        .json(&json!({"approval_required": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let again = t.import(&key, "text/csv", first_file).await.batch_id;
    t.wait_for(&key, &again, BatchStatus::Completed).await;
    let feed: Value = t
        .get(&key, "/v1/changes?after=4")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(feed["items"][0]["seq"], 5);

    // The dashboard's button runs the same purge; each one is in the action log.
    let ui = Ui::login(&t, "ann").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while t.get(&key, "/v1/records/1").await.status() == 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard's purge never ran"
        );
        assert_eq!(ui.act("purge", client.as_str()).await.status(), 303);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (log, _) = t.db.list_actions(None, 200).await.unwrap();
    let purges: Vec<(&str, &str)> = log
        .iter()
        .filter(|a| a.action == "client.purge")
        .map(|a| (a.session.as_str(), a.outcome.as_str()))
        .collect();
    assert!(
        purges
            .iter()
            .any(|(s, o)| *s == "admin API" && o.starts_with("refused: 1 batches"))
    );
    assert!(
        purges
            .iter()
            .any(|(s, o)| *s == "admin API" && o.starts_with("ok: 3 records, 3 changes")),
        "{purges:?}"
    );
    assert!(
        purges
            .iter()
            .any(|(s, o)| *s != "admin API" && o.starts_with("ok: 2 records")),
        "{purges:?}"
    );
    t.stop().await;
}

/// The refusal says "import the file again": after the schema changed, the same bytes are a
/// new import, not the refused one answered again; under one version they stay a duplicate.
async fn a_file_refused_under_one_schema_is_imported_again_under_the_next(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let strict = json!({
        "fields": [{"name": "id"}, {"name": "qty", "type": "integer", "constraints": {"minimum": 0}}],
        "primaryKey": "id",
        "maxErrorRatio": 0
    });
    set_schema(&t, &client, &strict).await;
    let file = "id,qty\na,1\nb,-1\n";
    let refused = t.import(&key, "text/csv", file).await.batch_id;
    let (outcome, _) = process(&t, &key, &refused).await;
    assert_eq!(outcome, Outcome::Refused);
    let resp = t.submit(&key, "text/csv", file).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the same file under the same schema is a duplicate"
    );

    let mut lenient = strict.clone();
    lenient["fields"][1]["constraints"] = json!({});
    set_schema(&t, &client, &lenient).await;
    let view: Value = dry_run(&t, &key, file.into()).await.json().await.unwrap();
    assert_eq!(
        (&view["duplicate_of"], &view["would_insert"]),
        (&Value::Null, &json!(2))
    );
    let again = t.import(&key, "text/csv", file).await.batch_id;
    assert_ne!(again, refused);
    let (_, done) = process(&t, &key, &again).await;
    assert_eq!(
        (done.status, done.records_written),
        (BatchStatus::Completed, 2)
    );
}
