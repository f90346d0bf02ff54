//! `/v1/degradation`: the level, its mode, every signal with its thresholds
//! and the last 50 transitions (GET); force a level (PUT) or return to auto
//! (DELETE). Mutations need the API key in `X-API-Key`: 401 without it, 403
//! with a wrong one (or when no key is configured); a bad body is a 400
//! naming the problem.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::{AppState, error, refusal};
use crate::actors::supervisor::{ClearForce, ForceLevel, GetDegradation};
use crate::degradation::DegradationLevel;

/// Longest force an operator can set: a forgotten force must end by itself
/// eventually (7 days).
const MAX_TTL_S: u64 = 7 * 24 * 3600;
const MAX_REASON_CHARS: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceBody {
    level: String,
    reason: String,
    ttl_s: Option<u64>,
}

fn unavailable(err: actix::MailboxError) -> HttpResponse {
    error(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        format!("supervisor unreachable: {err}"),
    )
}

pub async fn get_degradation(state: web::Data<AppState>) -> HttpResponse {
    match state.supervisor.send(GetDegradation).await {
        Ok(view) => HttpResponse::Ok().json(view),
        Err(err) => unavailable(err),
    }
}

pub async fn put_degradation(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    if let Some(response) = refusal(&state, &request) {
        return response;
    }
    let body: ForceBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad body: {err}; expected {{\"level\": \"AGGRESSIVE\", \"reason\": \"...\", \"ttl_s\": 300}}"
                ),
            );
        }
    };
    let level: DegradationLevel = match body.level.parse() {
        Ok(level) => level,
        Err(err) => return error(StatusCode::BAD_REQUEST, err.to_string()),
    };
    let reason = body.reason.trim().to_string();
    if reason.is_empty() {
        return error(StatusCode::BAD_REQUEST, "`reason` must not be empty");
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`reason` is longer than {MAX_REASON_CHARS} characters"),
        );
    }
    let ttl = match body.ttl_s {
        Some(0) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`ttl_s` must be at least 1 (or absent: until cleared)",
            );
        }
        Some(s) if s > MAX_TTL_S => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`ttl_s` {s} is above the maximum of {MAX_TTL_S} (7 days)"),
            );
        }
        other => other.map(Duration::from_secs),
    };
    match state.supervisor.send(ForceLevel { level, reason, ttl }).await {
        Ok(view) => HttpResponse::Ok().json(view),
        Err(err) => unavailable(err),
    }
}

pub async fn delete_degradation(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    if let Some(response) = refusal(&state, &request) {
        return response;
    }
    match state.supervisor.send(ClearForce).await {
        Ok(view) => HttpResponse::Ok().json(view),
        Err(err) => unavailable(err),
    }
}
