//! The agent's admin HTTP server (`[admin]` in agent.toml, 127.0.0.1:9091 by default): its page,
//! `/api/status`, `/api/stats`, `POST /api/reload` and `/metrics`. It applies the gateway's
//! rules through the same code ([`super::Access`], [`super::serve_app`]): the Host/Origin guard
//! and security headers on every answer, the `X-Requested-By` header and the token on every
//! mutating call. It only reads the agent's state and asks it to reload; it never writes a file.
//!
//! | route | does |
//! |---|---|
//! | `GET /` | the agent's page (`/agent.js`, `/common.js`, `/dashboard.css`) |
//! | `GET /api/status` | gateways, listeners on each, configuration, outbound proxy |
//! | `GET /api/stats` | per-listener counters and the outbound proxy's |
//! | `POST /api/reload` | re-read agent.toml, as SIGHUP does |
//! | `GET /api/bans` | the ban list (and the state file keeping it) |
//! | `POST /api/bans` | `{"target": "IP or CIDR", "for": "10m", "reason": "..."}`: add or replace a ban |
//! | `DELETE /api/bans` | `{"target": "IP or CIDR"}`: remove a ban (404 if there is none) |
//! | `GET /metrics` | Prometheus text format |
//!
//! More routes are added to [`router`]; a mutating one starts with
//! `state.access.check(&headers, "what")` and answers its error when that fails. A ban change
//! is saved to the state file before it is answered, then pushed to every gateway.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{page_routes, serve_app, Access, ApiError, Page};
use crate::agent::Agent;

const AGENT_HTML: &str = include_str!("dashboard/agent.html");
const AGENT_JS: &str = include_str!("dashboard/agent.js");

/// The log line's words when the agent's admin server listens (`... listening on http://ADDR/`).
pub const LISTENING: &str = "agent admin API and page";

/// What every route of the agent's admin server shares.
#[derive(Clone)]
pub struct AgentAdmin {
    pub agent: Arc<Agent>,
    /// Who may make mutating calls.
    pub access: Access,
}

/// The agent's routes, page included, ready for [`serve_app`].
pub fn router(state: AgentAdmin) -> Router {
    page_routes(Page {
        html: AGENT_HTML,
        script_path: "/agent.js",
        script: AGENT_JS,
    })
    .route("/api/status", get(status))
    .route("/api/stats", get(stats))
    .route("/api/reload", post(reload))
    .route("/api/bans", get(bans).post(ban_add).delete(ban_remove))
    .route("/metrics", get(metrics))
    .with_state(state)
}

/// Serves the agent's admin server on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AgentAdmin {
        agent,
        access: Access::new(token),
    };
    serve_app(listener, router(state), shutdown).await
}

async fn status(State(s): State<AgentAdmin>) -> Response {
    Json(s.agent.status_report()).into_response()
}

async fn stats(State(s): State<AgentAdmin>) -> Response {
    Json(s.agent.stats_report()).into_response()
}

async fn metrics(State(s): State<AgentAdmin>) -> Response {
    let body = super::agent_metrics::render(&s.agent.status_report(), &s.agent.stats_report());
    ([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], body).into_response()
}

/// Re-reads agent.toml like SIGHUP. 200 with the new generation, or 422 with the file's error
/// (file, line, field) and nothing changed.
async fn reload(State(s): State<AgentAdmin>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.access.check(&headers, "reload") {
        return refused.into_response();
    }
    tracing::info!("admin API: reload");
    // Reading and parsing the file (and the TLS files it names) blocks.
    let agent = s.agent.clone();
    match tokio::task::spawn_blocking(move || agent.reload_file("admin API")).await {
        Ok(Ok(answer)) => Json(answer).into_response(),
        Ok(Err(error)) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, error).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the reload task failed: {e}"),
        )
        .into_response(),
    }
}

/// `GET /api/bans`.
async fn bans(State(s): State<AgentAdmin>) -> Response {
    let store = &s.agent.bans;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let bans: Vec<serde_json::Value> = store
        .list()
        .into_iter()
        .map(|b| {
            let left = b.expires_ms.map(|t| t.saturating_sub(now).div_ceil(1000));
            let mut v = serde_json::to_value(&b).expect("plain data serializes");
            v["expires_in_secs"] = serde_json::json!(left);
            v
        })
        .collect();
    Json(serde_json::json!({
        "file": store.file().map(|f| f.display().to_string()),
        "bans": bans,
    }))
    .into_response()
}

/// The body of `POST /api/bans` and `DELETE /api/bans`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BanRequest {
    target: String,
    /// A duration (`10m`, `1h 30m`); absent: until removed.
    #[serde(rename = "for", default)]
    duration: Option<String>,
    #[serde(default)]
    reason: String,
}

/// `POST /api/bans`: 200 with the ban, or 422 with why (nothing changed).
async fn ban_add(
    State(s): State<AgentAdmin>,
    headers: HeaderMap,
    Json(req): Json<BanRequest>,
) -> Response {
    if let Err(refused) = s.access.check(&headers, "ban add") {
        return refused.into_response();
    }
    let duration = match req.duration.as_deref().map(humantime::parse_duration) {
        Some(Err(e)) => {
            let why = format!("\"for\": {e} (write e.g. 10m, 2h, 7days)");
            return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why).into_response();
        }
        Some(Ok(d)) => Some(d),
        None => None,
    };
    let store = s.agent.bans.clone();
    let added =
        tokio::task::spawn_blocking(move || store.add(&req.target, duration, &req.reason)).await;
    match added {
        Ok(Ok(ban)) => {
            tracing::info!(
                "admin API: ban added: {} ({}, reason {:?})",
                ban.net,
                duration.map_or("until removed".to_string(), |d| format!(
                    "for {}",
                    humantime::format_duration(d)
                )),
                ban.reason
            );
            Json(serde_json::json!({
                "ban": ban,
                "persisted": s.agent.bans.file().is_some(),
            }))
            .into_response()
        }
        Ok(Err(e)) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `DELETE /api/bans`: 200, 404 when there was no such ban, 422 for a bad target.
async fn ban_remove(
    State(s): State<AgentAdmin>,
    headers: HeaderMap,
    Json(req): Json<BanRequest>,
) -> Response {
    if let Err(refused) = s.access.check(&headers, "ban remove") {
        return refused.into_response();
    }
    let store = s.agent.bans.clone();
    let target = req.target.clone();
    match tokio::task::spawn_blocking(move || store.remove(&target)).await {
        Ok(Ok(true)) => {
            tracing::info!("admin API: ban removed: {}", req.target);
            Json(serde_json::json!({"removed": req.target})).into_response()
        }
        Ok(Ok(false)) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no ban for {} (see `sallyport ban list`)", req.target),
        )
        .into_response(),
        Ok(Err(e)) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
