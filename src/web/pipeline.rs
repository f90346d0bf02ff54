//! `GET /v1/pipeline`: lanes, partitions, positions, committed offsets, lag
//! and restarts, plus the committer's figures and table maintenance
//! (`maintenance`: state, last pass, and how each table stands).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::actors::supervisor::GetPipelineStatus;

pub async fn get_pipeline(state: web::Data<AppState>) -> HttpResponse {
    match state.supervisor.send(GetPipelineStatus).await {
        Ok(Ok(status)) => {
            let mut body = serde_json::to_value(status).unwrap_or_else(|e| json!({"error": e.to_string()}));
            if let Some(fields) = body.as_object_mut() {
                fields.insert("maintenance".into(), json!(state.maintenance.view()));
            }
            HttpResponse::Ok().json(body)
        }
        Ok(Err(err)) => HttpResponse::ServiceUnavailable().json(json!({"error": err})),
        Err(err) => HttpResponse::ServiceUnavailable()
            .json(json!({"error": format!("supervisor unreachable: {err}")})),
    }
}
