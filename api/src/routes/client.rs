//! `GET /v1/client`: who the presented key says the caller is. A producer checks it before
//! uploading (`dataflow import --client`), so a key for the wrong tenant is caught before
//! anything is stored under it.

use axum::Json;
use dataflow_contracts::http::ClientIdentity;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Principal;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(show))
}

/// The client the key belongs to, and the key's id.
#[utoipa::path(
    get,
    path = "/client",
    operation_id = "get_client_identity",
    tag = "client",
    responses((status = 200, description = "The key's client", body = ClientIdentity)),
)]
async fn show(p: Principal) -> Json<ClientIdentity> {
    Json(ClientIdentity {
        id: p.client.id,
        name: p.client.name,
        key_id: p.key_id,
    })
}
