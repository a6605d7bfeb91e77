//! The gateway's admin HTTP server: JSON API, Prometheus `/metrics`, and the web dashboard,
//! whose files are compiled into the binary (no CDN, nothing read from disk).
//!
//! | route | does |
//! |---|---|
//! | `GET /` | the dashboard |
//! | `GET /api/status` | state, light, agents, listeners |
//! | `GET /api/stats` | totals and per-listener counters, rates, refusals, chart history |
//! | `GET /api/connections` | piping clients |
//! | `POST /api/{pause,resume,restart,stop}` | control (token + `X-Requested-By` header) |
//! | `GET /metrics` | OpenMetrics text |
//!
//! Mutating calls need the `X-Requested-By` header (any value), which a browser only sends
//! from the dashboard's own origin: a web page elsewhere cannot make the operator's browser
//! stop the gateway. When `[admin] token` is set they also need `Authorization: Bearer TOKEN`,
//! else 401. The server outlives gateway restarts: it serves whichever gateway is current.

pub mod client;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::gateway::GatewayHandle;

/// The header mutating calls must carry (CSRF protection).
pub const CSRF_HEADER: &str = "x-requested-by";

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

#[derive(Clone)]
struct AdminState {
    gateway: watch::Receiver<Option<GatewayHandle>>,
    token: Option<Arc<str>>,
}

/// An API error: its status and a JSON `{"error": ...}` body.
struct ApiError {
    status: StatusCode,
    message: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"error": self.message}));
        if self.status == StatusCode::UNAUTHORIZED {
            (
                self.status,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"sallyport\"")],
                body,
            )
                .into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

impl AdminState {
    fn gateway(&self) -> Result<GatewayHandle, ApiError> {
        self.gateway.borrow().clone().ok_or(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the gateway is restarting",
        })
    }

    /// Checks the CSRF header and, when configured, the bearer token.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !headers.contains_key(CSRF_HEADER) {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                message: "mutating calls need the X-Requested-By header",
            });
        }
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "a valid admin token is required",
            })
        }
    }
}

/// Publishes the gateway the admin server serves (`None` while one restarts).
pub type GatewaySlot = watch::Sender<Option<GatewayHandle>>;

/// Binds the admin port. Fails with the address in the message if it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin port {addr}"))?;
    tracing::info!(
        "admin API and dashboard listening on http://{}/",
        listener.local_addr()?
    );
    Ok(listener)
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    gateway: watch::Receiver<Option<GatewayHandle>>,
    token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AdminState {
        gateway,
        token: token.map(Arc::from),
    };
    let app = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    DASHBOARD_JS,
                )
            }),
        )
        .route(
            "/dashboard.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    DASHBOARD_CSS,
                )
            }),
        )
        .route("/api/status", get(status))
        .route("/api/stats", get(stats))
        .route("/api/connections", get(connections))
        .route("/api/pause", post(pause))
        .route("/api/resume", post(resume))
        .route("/api/restart", post(restart))
        .route("/api/stop", post(stop))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn status(State(s): State<AdminState>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.status()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn stats(State(s): State<AdminState>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.stats()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn connections(State(s): State<AdminState>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.connections()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match s.gateway() {
        Ok(g) => (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            metrics::render(&g),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Runs a control action after authorization; answers with the resulting state.
async fn control<F, Fut>(s: AdminState, headers: HeaderMap, action: &str, f: F) -> Response
where
    F: FnOnce(GatewayHandle) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if let Err(e) = s.authorize(&headers) {
        tracing::warn!("admin API: {action} refused (missing or wrong credentials)");
        return e.into_response();
    }
    let g = match s.gateway() {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    tracing::info!("admin API: {action}");
    f(g.clone()).await;
    Json(serde_json::json!({"action": action, "state": g.state()})).into_response()
}

async fn pause(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    control(s, headers, "pause", |g| async move {
        g.pause().await;
    })
    .await
}

async fn resume(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    control(s, headers, "resume", |g| async move {
        g.resume().await;
    })
    .await
}

async fn restart(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    control(s, headers, "restart", |g| async move { g.restart() }).await
}

async fn stop(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    control(s, headers, "stop", |g| async move { g.stop() }).await
}
