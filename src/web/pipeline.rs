//! `GET /v1/pipeline`: lanes, partitions, positions, committed offsets, lag
//! and restarts, plus the committer's figures.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::actors::supervisor::GetPipelineStatus;

pub async fn get_pipeline(state: web::Data<AppState>) -> HttpResponse {
    match state.supervisor.send(GetPipelineStatus).await {
        Ok(Ok(status)) => HttpResponse::Ok().json(status),
        Ok(Err(err)) => HttpResponse::ServiceUnavailable().json(json!({"error": err})),
        Err(err) => HttpResponse::ServiceUnavailable()
            .json(json!({"error": format!("supervisor unreachable: {err}")})),
    }
}
