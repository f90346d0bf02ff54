//! `/health` (the process answers), `/ready` (it is ingesting: lanes run and
//! none has failed) and `/metrics` (Prometheus text).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::actors::supervisor::GetPipelineStatus;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match state.supervisor.send(GetPipelineStatus).await {
        Ok(Ok(status)) if status.failed_lanes == 0 && !status.lanes.is_empty() => {
            HttpResponse::Ok().json(json!({"ready": true, "lanes": status.lanes.len()}))
        }
        Ok(Ok(status)) => HttpResponse::ServiceUnavailable().json(json!({
            "ready": false,
            "lanes": status.lanes.len(),
            "failed_lanes": status.failed_lanes,
            "reason": if status.lanes.is_empty() { "no partitions assigned yet" } else { "a lane has failed" },
        })),
        Ok(Err(err)) => HttpResponse::ServiceUnavailable().json(json!({"ready": false, "reason": err})),
        Err(err) => HttpResponse::ServiceUnavailable()
            .json(json!({"ready": false, "reason": format!("supervisor unreachable: {err}")})),
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
