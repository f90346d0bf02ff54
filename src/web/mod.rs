//! The HTTP control plane (actix-web): health, readiness, Prometheus metrics,
//! the pipeline view, degradation, faults and hybrid queries. Routes are wired here; one
//! file per resource.

mod degradation;
mod faults;
mod health;
mod pipeline;
mod query;
mod sequence;

use std::net::SocketAddr;

use std::sync::Arc;

use actix::Addr;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use iceberg::Catalog;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::actors::Supervisor;
use crate::storage::tables::TableIdents;

/// Largest request body the API accepts.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub supervisor: Addr<Supervisor>,
    pub metrics: PrometheusHandle,
    pub catalog: Arc<dyn Catalog>,
    pub tables: TableIdents,
    /// What table maintenance did last (`/v1/pipeline` shows it).
    pub maintenance: Arc<crate::actors::table_maintainer::MaintenanceStatus>,
    /// Required by mutating endpoints (`X-API-Key`); None refuses them.
    pub api_key: Option<String>,
    /// What `/v1/faults` injects into.
    pub faults: Arc<crate::faults::Faults>,
    /// `[faults] enabled`: false refuses every injection.
    pub faults_enabled: bool,
    /// Hybrid queries over the tables and the lanes' live rows.
    pub query: Arc<crate::query::QueryEngine>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health::health))
        .route("/ready", web::get().to(health::ready))
        .route("/metrics", web::get().to(health::metrics))
        .route("/v1/pipeline", web::get().to(pipeline::get_pipeline))
        .route("/v1/sequence/gaps", web::get().to(sequence::get_gaps))
        .route("/v1/degradation", web::get().to(degradation::get_degradation))
        .route("/v1/degradation", web::put().to(degradation::put_degradation))
        .route(
            "/v1/degradation",
            web::delete().to(degradation::delete_degradation),
        )
        .route("/v1/faults", web::get().to(faults::get_faults))
        .route("/v1/faults", web::post().to(faults::post_fault))
        .route("/v1/faults/{id}", web::delete().to(faults::delete_fault))
        .route("/v1/trades", web::get().to(query::get_trades))
        .route("/v1/trades/recent", web::get().to(query::get_recent))
        .route("/v1/ohlcv", web::get().to(query::get_ohlcv))
        .route("/v1/query", web::post().to(query::post_query));
}

/// Binds the server (port 0 picks a free port) and returns it with the
/// address it listens on. Run it by awaiting the server.
pub fn serve(state: AppState, listen: &str) -> anyhow::Result<(actix_web::dev::Server, SocketAddr)> {
    use anyhow::Context as _;

    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .app_data(web::QueryConfig::default().error_handler(|err, _| {
                let message = format!("bad query string: {err}");
                actix_web::error::InternalError::from_response(
                    err,
                    actix_web::HttpResponse::BadRequest().json(serde_json::json!({ "error": message })),
                )
                .into()
            }))
            .configure(routes)
    })
    .workers(1)
    .disable_signals()
    .bind(listen)
    .with_context(|| format!("failed to listen on {listen}"))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("server bound to no address")?;
    Ok((server.run(), addr))
}

fn error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.into() }))
}

/// The refusal, unless the request carries the configured key.
fn refusal(state: &AppState, request: &HttpRequest) -> Option<HttpResponse> {
    use actix_web::http::StatusCode;
    let given = request.headers().get("x-api-key").map(|v| v.as_bytes());
    let Some(given) = given else {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "this endpoint changes K2's behaviour and needs an API key in the X-API-Key header",
        ));
    };
    let Some(key) = state.api_key.as_deref() else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "mutations are disabled: no API key is configured (set http.api_key or K2_HTTP__API_KEY)",
        ));
    };
    (!constant_time_eq(given, key.as_bytes())).then(|| error(StatusCode::FORBIDDEN, "wrong API key"))
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn keys_compare_exactly() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
    }
}
