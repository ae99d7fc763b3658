//! `/admin`: clients, keys, policies, batch transitions, the job queue (dead letters, their
//! retry and discard) and queue depths, behind the operator token.
//! Every change invalidates the cached copy so the next request sees it.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use dataflow_contracts::http::{
    BatchView, ClientView, CreateClient, CreateKey, ErrorBody, KeyCreated, KeyView, PurgeView,
    QueueDepth, Reason, WorkerInfo,
};
use dataflow_contracts::jobs::{JobCount, JobListQuery, JobPage, JobView};
use dataflow_contracts::live::LiveKind;
use dataflow_contracts::policy::PolicyPatch;
use dataflow_contracts::{BatchId, BatchStatus, ClientId, JobId, Policy};
use dataflow_platform::ledger::{BatchAction, ClientRecord, JobFilter};
use serde::de::DeserializeOwned;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{PathParam, page_limit, parse_path_id, query};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_client, list_clients))
        .routes(routes!(show_client))
        .routes(routes!(activate))
        .routes(routes!(deactivate))
        .routes(routes!(purge))
        .routes(routes!(show_policy, patch_policy))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(show_batch))
        .routes(routes!(approve))
        .routes(routes!(reject))
        .routes(routes!(retry))
        .routes(routes!(discard))
        .routes(routes!(list_jobs))
        .routes(routes!(job_stats))
        .routes(routes!(show_job))
        .routes(routes!(retry_job))
        .routes(routes!(discard_job))
        .routes(routes!(queues))
        .routes(routes!(workers))
        .routes(routes!(drain_worker))
}

/// Jobs newest first; `?status=dead` is the dead-letter queue.
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "admin",
    params(JobListQuery),
    responses(
        (status = 200, description = "One page of jobs", body = JobPage),
        (status = 400, description = "An unknown status or kind, a malformed batch id or \
                                      cursor, or a limit out of range", body = ErrorBody),
    ),
)]
async fn list_jobs(
    State(state): State<AppState>,
    q: Result<Query<JobListQuery>, QueryRejection>,
) -> ApiResult<Json<JobPage>> {
    let q = query(q)?;
    let filter = JobFilter {
        status: q
            .status
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(bad("invalid_status"))?,
        kind: q
            .kind
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(bad("invalid_kind"))?,
        batch_id: q
            .batch_id
            .as_deref()
            .map(str::parse::<BatchId>)
            .transpose()
            .map_err(bad("invalid_batch_id"))?,
    };
    let cursor = q
        .cursor
        .as_deref()
        .map(str::parse::<JobId>)
        .transpose()
        .map_err(bad("invalid_cursor"))?;
    let page = state
        .backends
        .db
        .list_jobs(&filter, cursor.as_ref(), page_limit(q.limit)?)
        .await?;
    Ok(Json(page))
}

/// Jobs per kind and status.
#[utoipa::path(
    get,
    path = "/jobs/stats",
    operation_id = "get_job_stats",
    tag = "admin",
    responses((status = 200, description = "Counts", body = Vec<JobCount>)),
)]
async fn job_stats(State(state): State<AppState>) -> ApiResult<Json<Vec<JobCount>>> {
    Ok(Json(state.backends.db.job_counts().await?))
}

/// A job.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    operation_id = "get_job",
    tag = "admin",
    params(("id" = JobId, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
    ),
)]
async fn show_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<JobView>> {
    let id: JobId = parse_path_id(&id)?;
    let job = state.backends.db.get_job(&id).await?;
    job.map(Json).ok_or_else(ApiError::not_found)
}

/// A dead job gets fresh attempts and is due at once.
#[utoipa::path(
    post,
    path = "/jobs/{id}/retry",
    tag = "admin",
    params(("id" = JobId, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, pending again", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not dead (`invalid_state`)", body = ErrorBody),
    ),
)]
async fn retry_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<JobView>> {
    let id: JobId = parse_path_id(&id)?;
    let job = state.backends.db.retry_job(&id).await?;
    Ok(Json(job))
}

/// A dead job leaves the dead-letter queue without running again.
#[utoipa::path(
    post,
    path = "/jobs/{id}/discard",
    tag = "admin",
    params(("id" = JobId, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, discarded", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not dead (`invalid_state`)", body = ErrorBody),
    ),
)]
async fn discard_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<JobView>> {
    let id: JobId = parse_path_id(&id)?;
    let job = state.backends.db.discard_job(&id).await?;
    Ok(Json(job))
}

/// Live worker processes.
#[utoipa::path(
    get,
    path = "/workers",
    operation_id = "list_workers",
    tag = "admin",
    responses((status = 200, description = "Every live worker", body = Vec<WorkerInfo>)),
)]
async fn workers(State(state): State<AppState>) -> ApiResult<Json<Vec<WorkerInfo>>> {
    Ok(Json(state.backends.fleet.list().await?))
}

/// Asks a worker to drain; 202, since it leaves once it has handed back its work.
#[utoipa::path(
    post,
    path = "/workers/{id}/drain",
    tag = "admin",
    params(("id" = String, Path, description = "The worker's id, `<host>-<pid>-<nonce>`")),
    responses(
        (status = 202, description = "Asked; it takes no new work and leaves when done"),
        (status = 404, description = "No such live worker", body = ErrorBody),
    ),
)]
async fn drain_worker(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<StatusCode> {
    if state.backends.fleet.request_drain(&id).await? {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(ApiError::not_found())
    }
}

/// Depth and oldest age of every queue in the ledger.
#[utoipa::path(
    get,
    path = "/queues",
    operation_id = "list_queues",
    tag = "admin",
    responses((status = 200, description = "Every queue by state", body = Vec<QueueDepth>)),
)]
async fn queues(State(state): State<AppState>) -> ApiResult<Json<Vec<QueueDepth>>> {
    Ok(Json(state.backends.db.queue_depths().await?))
}

/// A JSON body, which must be an object, as `T`.
fn json<T: DeserializeOwned>(body: Result<Json<Value>, JsonRejection>) -> ApiResult<T> {
    body.map_err(invalid_body).and_then(|Json(v)| object(v))
}

/// Only an object is read: serde's derived structs also accept an array of their fields in
/// order (`[1000]` would set whichever field comes first), which nobody means and the
/// document does not offer.
fn object<T: DeserializeOwned>(value: Value) -> ApiResult<T> {
    if !value.is_object() {
        return Err(ApiError::unprocessable(
            "invalid_body",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::unprocessable("invalid_body", e.to_string()))
}

/// axum's refusal of a JSON body (its status: 400, 413, 415 or 422) as a JSON error.
pub(super) fn invalid_body(e: JsonRejection) -> ApiError {
    ApiError::new(e.status(), "invalid_body", e.body_text())
}

/// Creates a client (a tenant) with the default policy, patched by `policy`.
#[utoipa::path(
    post,
    path = "/clients",
    tag = "admin",
    request_body = CreateClient,
    responses(
        (status = 201, description = "The client", body = ClientView),
        (status = 422, description = "Unknown or mistyped fields, an invalid name or policy",
         body = ErrorBody),
    ),
)]
async fn create_client(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ClientView>)> {
    let req: CreateClient = json(body)?;
    let policy = match &req.policy {
        Some(patch) => Policy::default()
            .patched(patch)
            .map_err(|e| ApiError::unprocessable("invalid_policy", e))?,
        None => Policy::default(),
    };
    let client = state.backends.db.create_client(&req.name, &policy).await?;
    Ok((StatusCode::CREATED, Json(client.view())))
}

/// The client named in the path, or 404.
pub(super) async fn load_client(state: &AppState, raw_id: &str) -> ApiResult<ClientRecord> {
    let id: ClientId = parse_path_id(raw_id)?;
    state
        .backends
        .db
        .get_client(&id)
        .await?
        .ok_or_else(ApiError::not_found)
}

/// Every client.
#[utoipa::path(
    get,
    path = "/clients",
    tag = "admin",
    responses((status = 200, description = "The clients", body = Vec<ClientView>)),
)]
async fn list_clients(State(state): State<AppState>) -> ApiResult<Json<Vec<ClientView>>> {
    let clients = state.backends.db.list_clients().await?;
    Ok(Json(clients.iter().map(|c| c.view()).collect()))
}

/// A client with its policy.
#[utoipa::path(
    get,
    path = "/clients/{id}",
    operation_id = "get_client",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "The client", body = ClientView),
        (status = 404, description = "No such client", body = ErrorBody),
    ),
)]
async fn show_client(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<ClientView>> {
    Ok(Json(load_client(&state, &id).await?.view()))
}

async fn set_active(state: AppState, id: String, active: bool) -> ApiResult<Json<ClientView>> {
    let id: ClientId = parse_path_id(&id)?;
    let client = state.backends.db.set_client_active(&id, active).await?;
    announced(state.backends.clients.invalidate(id.as_str()).await)?;
    Ok(Json(client.view()))
}

/// Lets the client's keys in again.
#[utoipa::path(
    post,
    path = "/clients/{id}/activate",
    operation_id = "activate_client",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "The client", body = ClientView),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn activate(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<ClientView>> {
    set_active(state, id, true).await
}

/// Refuses the client's keys (403) from the next request on.
#[utoipa::path(
    post,
    path = "/clients/{id}/deactivate",
    operation_id = "deactivate_client",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "The client", body = ClientView),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn deactivate(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<ClientView>> {
    set_active(state, id, false).await
}

/// Removes the client's data from the ledger: its records, their changes feed, the stored
/// files of its imports, their row errors and reports (the client, its keys, policy,
/// schemas, imports and batch counts stay). Written to the action log. Refused while a
/// batch of the client is ready, processing, awaiting approval or dead.
#[utoipa::path(
    post,
    path = "/clients/{id}/purge",
    operation_id = "purge_client",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "What was removed", body = PurgeView),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 409, description = "Batches of the client could still read or write its \
                                      data: the detail says what to do first", body = ErrorBody),
    ),
)]
async fn purge(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<PurgeView>> {
    let client = load_client(&state, &id).await?;
    let purged = state
        .backends
        .db
        .purge_client_logged(&client.id, "operator token", "admin API")
        .await?;
    Ok(Json(purged))
}

/// The client's policy.
#[utoipa::path(
    get,
    path = "/clients/{id}/policy",
    operation_id = "get_policy",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "The policy", body = Policy),
        (status = 404, description = "No such client", body = ErrorBody),
    ),
)]
async fn show_policy(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<Policy>> {
    Ok(Json(load_client(&state, &id).await?.policy))
}

/// Changes the fields present; `null` clears an optional one. Enforced on the next request.
#[utoipa::path(
    patch,
    path = "/clients/{id}/policy",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    request_body = PolicyPatch,
    responses(
        (status = 200, description = "The policy now", body = Policy),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 422, description = "Unknown or mistyped fields, or a policy that is not \
                                      valid", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn patch_policy(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Json<Policy>> {
    let patch: PolicyPatch = json(body)?;
    let client = load_client(&state, &id).await?;
    let policy = client
        .policy
        .patched(&patch)
        .map_err(|e| ApiError::unprocessable("invalid_policy", e))?;
    let updated = state.backends.db.set_policy(&client.id, &policy).await?;
    announced(state.backends.clients.invalidate(client.id.as_str()).await)?;
    Ok(Json(updated.policy))
}

/// A new API key for the client; the secret is in this answer only.
#[utoipa::path(
    post,
    path = "/clients/{id}/keys",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    request_body(content = Option<CreateKey>, description = "Optional: a label for operators"),
    responses(
        (status = 201, description = "The key, with its secret", body = KeyCreated),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 422, description = "Unknown or mistyped fields, or a label over 200 \
                                      characters or with control characters", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn create_key(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    body: Result<Option<Json<Value>>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<KeyCreated>)> {
    let id: ClientId = parse_path_id(&id)?;
    // No body, `null` and `{}` all mean a key without a label.
    let label = match body.map_err(invalid_body)? {
        None | Some(Json(Value::Null)) => None,
        Some(Json(v)) => object::<CreateKey>(v)?.label,
    };
    if label
        .as_ref()
        .is_some_and(|l| l.chars().count() > 200 || l.chars().any(char::is_control))
    {
        return Err(ApiError::unprocessable(
            "invalid_label",
            "label must be at most 200 characters",
        ));
    }
    let key = state.backends.hasher.generate();
    state
        .backends
        .db
        .create_key(&id, &key.key_id, &key.hmac, label.as_deref())
        .await?;
    // A lookup of this id may have cached "no such key" a moment ago.
    announced(state.backends.keys.invalidate(&key.key_id).await)?;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            key_id: key.key_id,
            client_id: id,
            api_key: key.token,
        }),
    ))
}

/// The client's keys, revoked ones too; never a secret.
#[utoipa::path(
    get,
    path = "/clients/{id}/keys",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id")),
    responses(
        (status = 200, description = "The keys", body = Vec<KeyView>),
        (status = 404, description = "No such client", body = ErrorBody),
    ),
)]
async fn list_keys(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<Vec<KeyView>>> {
    let client = load_client(&state, &id).await?;
    Ok(Json(state.backends.db.list_keys(&client.id).await?))
}

/// A query value that does not parse: a 400 with the parser's reason.
fn bad<E: std::fmt::Display>(code: &'static str) -> impl Fn(E) -> ApiError {
    move |e| ApiError::bad_request(code, e.to_string())
}

/// A committed change whose cache invalidation could not be broadcast is answered 503, so
/// the operator retries (which is harmless) instead of trusting a change not yet in force.
pub(super) fn announced(result: Result<(), dataflow_platform::Error>) -> ApiResult<()> {
    result.map_err(|e| {
        tracing::error!(error = %e, "cache invalidation failed");
        ApiError::unavailable(
            "invalidation_failed",
            "the change is saved but other processes may not see it yet; repeat the request",
        )
    })
}

/// Revokes a key: refused (401) from the next request on.
#[utoipa::path(
    post,
    path = "/keys/{key_id}/revoke",
    tag = "admin",
    params(("key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 503, description = "Saved, but other processes may not know yet \
                                      (`invalidation_failed`): repeat it", body = ErrorBody),
    ),
)]
async fn revoke_key(
    State(state): State<AppState>,
    PathParam(key_id): PathParam,
) -> ApiResult<StatusCode> {
    if !dataflow_platform::domain::keys::is_key_id(&key_id) {
        return Err(ApiError::not_found());
    }
    state.backends.db.revoke_key(&key_id).await?;
    announced(state.backends.keys.invalidate(&key_id).await)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Any client's batch.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    operation_id = "admin_get_batch",
    tag = "admin",
    params(("id" = BatchId, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 404, description = "No such batch", body = ErrorBody),
    ),
)]
async fn show_batch(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<BatchView>> {
    let id: BatchId = parse_path_id(&id)?;
    state
        .backends
        .db
        .get_batch(None, &id)
        .await?
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

/// An operator transition of a batch (also the dashboard's), announced to dashboards.
pub(crate) async fn transition(
    state: AppState,
    id: String,
    action: BatchAction,
) -> ApiResult<Json<BatchView>> {
    let id: BatchId = parse_path_id(&id)?;
    let view = state.backends.db.transition_batch(&id, action).await?;
    let kind = match view.status {
        BatchStatus::Ready => LiveKind::BatchReady,
        _ => LiveKind::BatchRejected,
    };
    state.backends.live.publish(kind, view.id.as_str());
    Ok(Json(view))
}

/// `awaiting_approval` → `ready`.
#[utoipa::path(
    post,
    path = "/batches/{id}/approve",
    operation_id = "approve_batch",
    tag = "admin",
    params(("id" = BatchId, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch, ready", body = BatchView),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "The batch is not awaiting approval (`invalid_state`)",
         body = ErrorBody),
    ),
)]
async fn approve(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<BatchView>> {
    transition(state, id, BatchAction::Approve).await
}

/// `dead` → `ready`, with fresh attempts.
#[utoipa::path(
    post,
    path = "/batches/{id}/retry",
    operation_id = "retry_batch",
    tag = "admin",
    params(("id" = BatchId, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch, ready", body = BatchView),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "The batch is not dead (`invalid_state`)",
         body = ErrorBody),
    ),
)]
async fn retry(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Json<BatchView>> {
    transition(state, id, BatchAction::Retry).await
}

/// The operator's reason for rejecting or discarding a batch: 1 to 1000 characters.
fn reason(body: Result<Json<Value>, JsonRejection>) -> ApiResult<String> {
    checked_reason(json::<Reason>(body)?.reason)
}

/// A reason is 1 to 1000 characters, without NUL.
pub(crate) fn checked_reason(reason: String) -> ApiResult<String> {
    if reason.trim().is_empty() || reason.chars().count() > 1000 || reason.contains('\0') {
        return Err(ApiError::unprocessable(
            "invalid_reason",
            "reason must be 1 to 1000 characters",
        ));
    }
    Ok(reason)
}

/// `awaiting_approval` → `rejected`.
#[utoipa::path(
    post,
    path = "/batches/{id}/reject",
    operation_id = "reject_batch",
    tag = "admin",
    params(("id" = BatchId, Path, description = "The batch's id")),
    request_body = Reason,
    responses(
        (status = 200, description = "The batch, rejected", body = BatchView),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "The batch is not awaiting approval (`invalid_state`)",
         body = ErrorBody),
        (status = 422, description = "No reason, or not 1 to 1000 characters",
         body = ErrorBody),
    ),
)]
async fn reject(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Json<BatchView>> {
    let reason = reason(body)?;
    transition(state, id, BatchAction::Reject { reason }).await
}

/// A dead batch leaves the dead-letter queue as rejected.
#[utoipa::path(
    post,
    path = "/batches/{id}/discard",
    operation_id = "discard_batch",
    tag = "admin",
    params(("id" = BatchId, Path, description = "The batch's id")),
    request_body = Reason,
    responses(
        (status = 200, description = "The batch, rejected", body = BatchView),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "The batch is not dead (`invalid_state`)",
         body = ErrorBody),
        (status = 422, description = "No reason, or not 1 to 1000 characters",
         body = ErrorBody),
    ),
)]
async fn discard(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Json<BatchView>> {
    let reason = reason(body)?;
    transition(state, id, BatchAction::Discard { reason }).await
}
