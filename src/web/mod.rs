//! The HTTP control plane (actix-web): health, readiness, Prometheus metrics
//! and the pipeline view. Routes are wired here; one file per resource.

mod degradation;
mod health;
mod pipeline;
mod sequence;

use std::net::SocketAddr;

use std::sync::Arc;

use actix::Addr;
use actix_web::{App, HttpServer, web};
use iceberg::Catalog;
use metrics_exporter_prometheus::PrometheusHandle;

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
        );
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
