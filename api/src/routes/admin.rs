//! `/admin`: clients, keys, policies, batch transitions, the job queue (dead letters, their
//! retry and discard) and queue depths, behind the operator token.
//! Every change invalidates the cached copy so the next request sees it.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use dataflow_contracts::http::{
    BatchView, ClientView, CreateClient, CreateKey, KeyCreated, KeyView, QueueDepth, WorkerInfo,
};
use dataflow_contracts::jobs::{JobCount, JobPage, JobView};
use dataflow_contracts::live::LiveKind;
use dataflow_contracts::policy::PolicyPatch;
use dataflow_contracts::{BatchId, BatchStatus, ClientId, JobId, Policy};
use dataflow_platform::db::{BatchAction, ClientRecord, JobFilter};
use serde::Deserialize;

use super::{page_limit, parse_path_id, query};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/clients", post(create_client).get(list_clients))
        .route("/clients/{id}", get(show_client))
        .route("/clients/{id}/activate", post(activate))
        .route("/clients/{id}/deactivate", post(deactivate))
        .route("/clients/{id}/policy", get(show_policy).patch(patch_policy))
        .route("/clients/{id}/keys", post(create_key).get(list_keys))
        .route("/keys/{key_id}/revoke", post(revoke_key))
        .route("/batches/{id}", get(show_batch))
        .route("/batches/{id}/approve", post(approve))
        .route("/batches/{id}/reject", post(reject))
        .route("/batches/{id}/retry", post(retry))
        .route("/batches/{id}/discard", post(discard))
        .route("/jobs", get(list_jobs))
        .route("/jobs/stats", get(job_stats))
        .route("/jobs/{id}", get(show_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/jobs/{id}/discard", post(discard_job))
        .route("/queues", get(queues))
        .route("/workers", get(workers))
        .route("/workers/{id}/drain", post(drain_worker))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobQuery {
    status: Option<String>,
    kind: Option<String>,
    batch_id: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

/// Jobs newest first; `?status=dead` is the dead-letter queue.
async fn list_jobs(
    State(state): State<AppState>,
    q: Result<Query<JobQuery>, QueryRejection>,
) -> ApiResult<Json<JobPage>> {
    let q = query(q)?;
    let bad = |code: &'static str| move |e: String| ApiError::bad_request(code, e);
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
            .map(|b| b.parse::<BatchId>().map_err(|e| e.to_string()))
            .transpose()
            .map_err(bad("invalid_batch_id"))?,
    };
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| c.parse::<JobId>().map_err(|e| e.to_string()))
        .transpose()
        .map_err(bad("invalid_cursor"))?;
    let page = state
        .backends
        .db
        .list_jobs(&filter, cursor.as_ref(), page_limit(q.limit)?)
        .await?;
    Ok(Json(page))
}

async fn job_stats(State(state): State<AppState>) -> ApiResult<Json<Vec<JobCount>>> {
    Ok(Json(state.backends.db.job_counts().await?))
}

async fn show_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let id: JobId = parse_path_id(&id)?;
    let job = state.backends.db.get_job(&id).await?;
    job.map(Json).ok_or_else(ApiError::not_found)
}

/// A dead job gets fresh attempts and is due at once.
async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let id: JobId = parse_path_id(&id)?;
    let job = state.backends.db.retry_job(&id).await?;
    Ok(Json(job))
}

/// A dead job leaves the dead-letter queue without running again.
async fn discard_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let id: JobId = parse_path_id(&id)?;
    let job = state.backends.db.discard_job(&id).await?;
    Ok(Json(job))
}

/// Live worker processes.
async fn workers(State(state): State<AppState>) -> ApiResult<Json<Vec<WorkerInfo>>> {
    Ok(Json(state.backends.fleet.list().await?))
}

/// Asks a worker to drain; 202, since it leaves once it has handed back its work.
async fn drain_worker(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if state.backends.fleet.request_drain(&id).await? {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(ApiError::not_found())
    }
}

/// Depth and oldest age of every queue in the ledger.
async fn queues(State(state): State<AppState>) -> ApiResult<Json<Vec<QueueDepth>>> {
    Ok(Json(state.backends.db.queue_depths().await?))
}

fn json<T>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))
}

async fn create_client(
    State(state): State<AppState>,
    body: Result<Json<CreateClient>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ClientView>)> {
    let req = json(body)?;
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
async fn load_client(state: &AppState, raw_id: &str) -> ApiResult<ClientRecord> {
    let id: ClientId = parse_path_id(raw_id)?;
    state
        .backends
        .db
        .get_client(&id)
        .await?
        .ok_or_else(ApiError::not_found)
}

async fn list_clients(State(state): State<AppState>) -> ApiResult<Json<Vec<ClientView>>> {
    let clients = state.backends.db.list_clients().await?;
    Ok(Json(clients.iter().map(|c| c.view()).collect()))
}

async fn show_client(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ClientView>> {
    Ok(Json(load_client(&state, &id).await?.view()))
}

async fn set_active(state: AppState, id: String, active: bool) -> ApiResult<Json<ClientView>> {
    let id: ClientId = parse_path_id(&id)?;
    let client = state.backends.db.set_client_active(&id, active).await?;
    announced(state.backends.clients.invalidate(id.as_str()).await)?;
    Ok(Json(client.view()))
}

async fn activate(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ClientView>> {
    set_active(state, id, true).await
}

async fn deactivate(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ClientView>> {
    set_active(state, id, false).await
}

async fn show_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Policy>> {
    Ok(Json(load_client(&state, &id).await?.policy))
}

async fn patch_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<PolicyPatch>, JsonRejection>,
) -> ApiResult<Json<Policy>> {
    let patch = json(body)?;
    let client = load_client(&state, &id).await?;
    let policy = client
        .policy
        .patched(&patch)
        .map_err(|e| ApiError::unprocessable("invalid_policy", e))?;
    let updated = state.backends.db.set_policy(&client.id, &policy).await?;
    announced(state.backends.clients.invalidate(client.id.as_str()).await)?;
    Ok(Json(updated.policy))
}

async fn create_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<CreateKey>>,
) -> ApiResult<(StatusCode, Json<KeyCreated>)> {
    let id: ClientId = parse_path_id(&id)?;
    let label = body.and_then(|Json(b)| b.label);
    if label
        .as_ref()
        .is_some_and(|l| l.len() > 200 || l.chars().any(char::is_control))
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

async fn list_keys(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<KeyView>>> {
    let client = load_client(&state, &id).await?;
    Ok(Json(state.backends.db.list_keys(&client.id).await?))
}

/// A committed change whose cache invalidation could not be broadcast is answered 503, so
/// the operator retries (which is harmless) instead of trusting a change not yet in force.
fn announced(result: Result<(), String>) -> ApiResult<()> {
    result.map_err(|e| {
        tracing::error!(error = %e, "cache invalidation failed");
        ApiError::unavailable(
            "invalidation_failed",
            "the change is saved but other processes may not see it yet; repeat the request",
        )
    })
}

async fn revoke_key(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
) -> ApiResult<StatusCode> {
    if !dataflow_platform::keys::is_key_id(&key_id) {
        return Err(ApiError::not_found());
    }
    state.backends.db.revoke_key(&key_id).await?;
    announced(state.backends.keys.invalidate(&key_id).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn show_batch(
    State(state): State<AppState>,
    Path(id): Path<String>,
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
    let view = state
        .backends
        .db
        .transition_batch(&id, action)
        .await
        .map_err(|e| match e {
            dataflow_platform::Error::Invalid(detail) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", detail)
            }
            other => other.into(),
        })?;
    state.backends.outbox_wake.notify_one();
    let kind = match view.status {
        BatchStatus::Ready => LiveKind::BatchReady,
        _ => LiveKind::BatchRejected,
    };
    state.backends.live.publish(kind, view.id.as_str());
    Ok(Json(view))
}

async fn approve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BatchView>> {
    transition(state, id, BatchAction::Approve).await
}

async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BatchView>> {
    transition(state, id, BatchAction::Retry).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: String,
}

/// The operator's reason for rejecting or discarding a batch: 1 to 1000 characters.
fn reason(body: Result<Json<ReasonBody>, JsonRejection>) -> ApiResult<String> {
    checked_reason(json(body)?.reason)
}

/// A reason is 1 to 1000 characters, without NUL.
pub(crate) fn checked_reason(reason: String) -> ApiResult<String> {
    if reason.trim().is_empty() || reason.len() > 1000 || reason.contains('\0') {
        return Err(ApiError::unprocessable(
            "invalid_reason",
            "reason must be 1 to 1000 characters",
        ));
    }
    Ok(reason)
}

async fn reject(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ReasonBody>, JsonRejection>,
) -> ApiResult<Json<BatchView>> {
    let reason = reason(body)?;
    transition(state, id, BatchAction::Reject { reason }).await
}

/// A dead batch leaves the dead-letter queue as rejected.
async fn discard(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ReasonBody>, JsonRejection>,
) -> ApiResult<Json<BatchView>> {
    let reason = reason(body)?;
    transition(state, id, BatchAction::Discard { reason }).await
}
