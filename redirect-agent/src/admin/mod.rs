//! The admin endpoint (`--admin-addr`): `/metrics` (OpenMetrics text), `/livez` and `/readyz`.
//! Served for every source.
use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::{metrics::Metrics, reconcile::Health};

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

#[derive(Debug, thiserror::Error)]
#[error("admin endpoint: binding {addr}: {source}")]
pub struct AdminError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` (so a taken port fails the start, not a background task) and serves the
/// endpoints on the current tokio runtime. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError { addr, source })?;
    let app = router(metrics, health);
    info!(addr = %bound, "admin endpoint listening (/metrics, /livez, /readyz)");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(addr = %bound, "admin endpoint stopped: {e}");
        }
    });
    Ok((bound, task))
}

fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health })
}

async fn metrics_page(State(s): State<AdminState>) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(s.health.ready()));
    let body = s.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn livez(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.live() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", s.health.reason()),
        )
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let code = if s.health.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{}\n", s.health.reason()))
}
