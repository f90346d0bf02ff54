//! `/v1/faults`: the active faults with their expiry (GET), inject one
//! (POST, a typed body `{kind, target, params, duration_s}`), clear one
//! (DELETE `/v1/faults/{id}`). Mutations need the API key, as for
//! `/v1/degradation`, and `[faults] enabled`; a bad body is a 400 naming the
//! problem. Kinds and their targets: `docs/faults.md`.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::{AppState, error, refusal};
use crate::faults::{FaultRequest, InjectError};

const EXAMPLE: &str = r#"{"kind": "slow_stage", "target": {"stage": "sequencer", "partition": 0}, "params": {"delay_ms": 200}, "duration_s": 30}"#;

pub async fn get_faults(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "enabled": state.faults_enabled,
        "faults": state.faults.list(),
    }))
}

/// The refusal of a mutation: no or a wrong key, or faults disabled.
fn refuse_mutation(state: &AppState, request: &HttpRequest) -> Option<HttpResponse> {
    refusal(state, request).or_else(|| {
        (!state.faults_enabled).then(|| {
            error(
                StatusCode::FORBIDDEN,
                "fault injection is disabled on this process ([faults] enabled = false)",
            )
        })
    })
}

pub async fn post_fault(state: web::Data<AppState>, request: HttpRequest, body: web::Bytes) -> HttpResponse {
    if let Some(response) = refuse_mutation(&state, &request) {
        return response;
    }
    let parsed = serde_json::from_slice::<FaultRequest>(&body)
        .map_err(|err| format!("bad body: {err}; expected e.g. {EXAMPLE}"))
        .and_then(|request| request.parse());
    let (fault, duration) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.faults.inject(fault, duration) {
        Ok(active) => HttpResponse::Created().json(active),
        Err(err @ InjectError::NoBrokerControl) => error(StatusCode::BAD_REQUEST, err.to_string()),
        Err(err @ InjectError::Broker(_)) => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

pub async fn delete_fault(
    state: web::Data<AppState>,
    request: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    if let Some(response) = refusal(&state, &request) {
        return response;
    }
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("fault id {:?} is not a number", id.as_str()),
        );
    };
    match state.faults.clear(id) {
        Some(cleared) => HttpResponse::Ok().json(cleared),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no active fault {id} (it may have expired, been spent or been cleared)"),
        ),
    }
}
