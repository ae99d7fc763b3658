//! The OpenAPI 3.1 document, served at `GET /openapi.json` and committed as
//! `docs/openapi.json`.
//!
//! Each handler documents itself (`#[utoipa::path]`) and is registered through
//! `utoipa_axum::routes!`, so a route cannot be served without its operation in the
//! document. What the layers add to every route behind them — the credential checks, the
//! rate-limit headers, the request deadline, the ledger being away — is documented here,
//! once, beside the list of those layers ([`finish`]), instead of on each handler.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use dataflow_contracts::http::ErrorBody;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, RefOr, Response};
use utoipa::{OpenApi as _, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "DataFlow",
        description = "Durable imports of CSV and JSON-lines record batches, their processing \
                       and the follow-up jobs. Every error is JSON `{\"code\", \"detail\"}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "imports", description = "Submitting record batches"),
        (name = "batches", description = "A client's batches, row errors and reports"),
        (name = "records", description = "A client's records: one, a page, or all as NDJSON or CSV"),
        (name = "client", description = "The client a key belongs to, its schema and its webhook key"),
        (name = "admin", description = "Clients, keys, policies, schemas, batches, jobs, queues, \
                                         workers"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
struct Base;

/// The document's starting point: information, tags and the error schema.
pub(crate) fn base() -> OpenApi {
    Base::openapi()
}

/// `GET /openapi.json`.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(document))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
               content_type = "application/json", body = Object)),
)]
async fn document() -> impl IntoResponse {
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| to_json(&crate::openapi()));
    ([(header::CONTENT_TYPE, "application/json")], json.as_str())
}

/// The document as `docs/openapi.json` holds it: pretty-printed, ending in a newline.
pub fn to_json(doc: &OpenApi) -> String {
    // Serialising the document cannot fail: every map in it has string keys.
    let mut json = doc
        .to_pretty_json()
        .expect("an OpenAPI document serialises");
    json.push('\n');
    json
}

/// Who may call a route, by the layer in front of it.
#[derive(Clone, Copy)]
enum Guard {
    /// `/v1`: `auth::require_api_key`, then the client's rate limit.
    ApiKey,
    /// `/admin`: `auth::require_operator`.
    Operator,
    Open,
}

const API_KEY: &str = "api_key";
const OPERATOR: &str = "operator";

/// Adds what the layers and extractors do for every route behind them: the security
/// schemes, their refusals, the `RateLimit` headers of `/v1`, the JSON body's refusals,
/// `Retry-After` on every 429 and 503, and the request deadline's 408.
pub(crate) fn finish(doc: &mut OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        API_KEY,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("dfk_<key id>_<secret>")
                .description(Some(
                    "A client's API key, as `POST /admin/clients/{id}/keys` showed it once. \
                     An unknown key, a wrong secret and a revoked key get the same 401.",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        OPERATOR,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The operator token (`admin_token` in the configuration, \
                     `DATAFLOW_ADMIN_TOKEN`, or the file the server names at startup).",
                ))
                .build(),
        ),
    );
    for (path, item) in &mut doc.paths.paths {
        let guard = if path.starts_with("/v1/") {
            Guard::ApiKey
        } else if path.starts_with("/admin/") {
            Guard::Operator
        } else {
            Guard::Open
        };
        for op in operations(item) {
            if takes_json(op) {
                error(op, 400, "A body that is not JSON.");
                error(op, 413, "A body over the JSON limit (2 MiB).");
                error(op, 415, "A body that is not `application/json`.");
                error(
                    op,
                    422,
                    "A body that is not an object of the documented fields.",
                );
            }
            // After every other answer is in: the rate-limit headers go on all of them.
            guarded(op, guard);
            error(
                op,
                408,
                "The request took longer than `api.request_timeout_secs`.",
            );
            for (status, response) in &mut op.responses.responses {
                if let RefOr::T(response) = response
                    && (status == "429" || status == "503")
                {
                    retry_after(response);
                }
            }
        }
    }
}

/// Operations that read a JSON body answer what axum's JSON extractor refuses, as JSON
/// errors (`invalid_body`) with its status.
fn takes_json(op: &Operation) -> bool {
    op.request_body
        .as_ref()
        .is_some_and(|b| b.content.contains_key("application/json"))
}

fn guarded(op: &mut Operation, guard: Guard) {
    let scheme = match guard {
        Guard::Open => return,
        Guard::ApiKey => API_KEY,
        Guard::Operator => OPERATOR,
    };
    op.security = Some(vec![SecurityRequirement::new(scheme, Vec::<String>::new())]);
    error(op, 401, "Missing or invalid credentials.");
    error(
        op,
        429,
        "Too many failed authentications from this address or for this key (`auth_locked`)\
         , or, for `/v1`, over the client's request rate (`rate_limited`).",
    );
    error(
        op,
        500,
        "An internal error, logged with its cause; the body says no more.",
    );
    error(
        op,
        503,
        "The ledger is unavailable (`ledger_unavailable`); retry later.",
    );
    if let Guard::ApiKey = guard {
        error(
            op,
            403,
            "The key's client is deactivated (`client_inactive`).",
        );
        // The limiter stamps every answer that passed the credential check or was refused by
        // it; the deadline's 408 is made outside that layer and carries none.
        for (status, response) in &mut op.responses.responses {
            if let RefOr::T(response) = response
                && status != "408"
            {
                rate_limit_headers(response);
            }
        }
    }
}

/// An error answer with the JSON error body, unless the handler already documents `status`.
fn error(op: &mut Operation, status: u16, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| {
            let mut response = Response::new(description);
            response.content.insert(
                "application/json".to_owned(),
                Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ErrorBody::name(),
                )))),
            );
            RefOr::T(response)
        });
}

fn rate_limit_headers(response: &mut Response) {
    let text = || String::schema();
    response.headers.insert(
        "RateLimit-Policy".to_owned(),
        HeaderBuilder::new()
            .schema(text())
            .description(Some(
                "The client's quota (draft-ietf-httpapi-ratelimit-headers), e.g. \
                 `\"default\";q=600;w=60`.",
            ))
            .build(),
    );
    response.headers.insert(
        "RateLimit".to_owned(),
        HeaderBuilder::new()
            .schema(text())
            .description(Some(
                "What is left of it: `\"default\";r=<remaining>;t=<seconds to reset>`.",
            ))
            .build(),
    );
}

fn retry_after(response: &mut Response) {
    let seconds = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1));
    response.headers.insert(
        "Retry-After".to_owned(),
        HeaderBuilder::new()
            .schema(seconds)
            .description(Some("Seconds to wait before trying again."))
            .build(),
    );
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}
