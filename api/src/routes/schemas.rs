//! Client schemas: `PUT`, `GET` and `DELETE /admin/clients/{id}/schema` for operators, and
//! `GET /v1/schema` for the producer, who sees what its files are checked against.
//! Every change is a new version; a batch keeps the version it was accepted with.

use axum::Json;
use axum::extract::Query;
use axum::extract::State;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use dataflow_contracts::ClientId;
use dataflow_contracts::http::{ClientView, ErrorBody, SchemaQuery, SchemaView};
use dataflow_platform::Error;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::{announced, invalid_body, load_client};
use super::{PathParam, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// `/v1` routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(own))
}

/// `/admin` routes.
pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(show, set, remove))
}

/// The schema the caller's imports are checked against.
#[utoipa::path(
    get,
    path = "/schema",
    operation_id = "get_own_schema",
    tag = "client",
    responses(
        (status = 200, description = "The current schema", body = SchemaView),
        (status = 404, description = "This client has no schema: records are stored as they \
                                      come", body = ErrorBody),
    ),
)]
async fn own(State(state): State<AppState>, p: Principal) -> ApiResult<Json<SchemaView>> {
    current_or_404(&state, &p.client.id, None).await
}

async fn current_or_404(
    state: &AppState,
    client: &ClientId,
    version: Option<u64>,
) -> ApiResult<Json<SchemaView>> {
    match state.backends.db.get_schema(client, version).await? {
        Some(view) => Ok(Json(view)),
        None => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "no_schema",
            match version {
                Some(v) => format!("the client has no schema version {v}"),
                None => "the client has no schema: its records are stored as they come".into(),
            },
        )),
    }
}

/// One version of the client's schema: the current one unless `version` is given.
#[utoipa::path(
    get,
    path = "/clients/{id}/schema",
    operation_id = "get_schema",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id"), SchemaQuery),
    responses(
        (status = 200, description = "The schema", body = SchemaView),
        (status = 400, description = "A malformed version", body = ErrorBody),
        (status = 404, description = "No such client, or no such version", body = ErrorBody),
    ),
)]
async fn show(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    q: Result<Query<SchemaQuery>, QueryRejection>,
) -> ApiResult<Json<SchemaView>> {
    let q = query(q)?;
    let client = load_client(&state, &id).await?;
    current_or_404(&state, &client.id, q.version).await
}

/// Sets the client's schema, a [Frictionless Table Schema](https://specs.frictionlessdata.io/table-schema/)
/// with DataFlow's extensions (docs/schemas.md), as its next version. Imports accepted
/// from now on are checked with it; those accepted before keep theirs.
#[utoipa::path(
    put,
    path = "/clients/{id}/schema",
    operation_id = "set_schema",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    request_body(content = Object, description = "A Frictionless Table Schema"),
    responses(
        (status = 200, description = "The new version, now current", body = SchemaView),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 422, description = "Not a schema DataFlow can use (`invalid_schema`); the \
                                      detail names the property at fault", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn set(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Json<SchemaView>> {
    let Json(document) = body.map_err(invalid_body)?;
    let client = load_client(&state, &id).await?;
    let view = match state
        .backends
        .db
        .set_schema(&client.id, &document.to_string())
        .await
    {
        Ok(view) => view,
        Err(Error::Invalid(detail)) => {
            return Err(ApiError::unprocessable("invalid_schema", detail));
        }
        Err(e) => return Err(e.into()),
    };
    announced(state.backends.clients.invalidate(client.id.as_str()).await)?;
    Ok(Json(view))
}

/// Imports accepted from now on are no longer checked by a schema; the versions are kept.
#[utoipa::path(
    delete,
    path = "/clients/{id}/schema",
    operation_id = "remove_schema",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "The client, without a schema", body = ClientView),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn remove(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<ClientView>> {
    let client = load_client(&state, &id).await?;
    let updated = state.backends.db.remove_schema(&client.id).await?;
    announced(state.backends.clients.invalidate(client.id.as_str()).await)?;
    Ok(Json(updated.view()))
}
