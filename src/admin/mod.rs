//! The gateway's admin HTTP server: JSON API, Prometheus `/metrics`, and the web dashboard,
//! whose files are compiled into the binary (no CDN, nothing read from disk).
//!
//! | route | does |
//! |---|---|
//! | `GET /` | the dashboard |
//! | `GET /api/status` | state, light, agents, listeners, agents revoked by reloads (`?site=`) |
//! | `GET /api/stats` | totals and per-listener counters, rates, refusals, chart history (`?site=`) |
//! | `GET /api/connections` | piping clients |
//! | `GET /api/bans` | bans in force per site, as the agents pushed them (read-only) |
//! | `GET /api/health` | 200 while clients can get through, else 503 with the reasons |
//! | `POST /api/{pause,resume,restart,stop}` | control (token + `X-Requested-By` header) |
//! | `GET /metrics` | OpenMetrics text |
//!
//! Every request must name the admin server itself in `Host`: an IP address literal (the listen
//! address, or any of the host's when it listens on a wildcard) or `localhost`, with any port.
//! A DNS-rebinding page (its own name resolving to 127.0.0.1) sends its own name and gets 421,
//! so it never becomes same-origin with the API. Mutating calls need the `X-Requested-By`
//! header (any value), which a browser only sends from the dashboard's own origin, and an
//! `Origin` (when present) equal to `http://` + that Host: a web page elsewhere cannot make the
//! operator's browser stop the gateway. When `[admin] token` is set they also need
//! `Authorization: Bearer TOKEN` (compared in constant time, whatever its length), else 401.
//! Every answer carries `X-Frame-Options: DENY`, a CSP with `frame-ancestors 'none'` and
//! `X-Content-Type-Options: nosniff`, so the dashboard cannot be framed (clickjacking) or a
//! JSON answer run as a script. The server outlives gateway restarts: it serves whichever
//! gateway is current, and a reload applies `[admin]` to it ([`server`]): the token is read at
//! every request.
//!
//! The agent's admin server ([`agent`]) is built from the same pieces, so it applies the same
//! rules: [`Access`] (the `X-Requested-By` header and the token), the Host/Origin guard and the
//! security headers ([`serve_app`]), the page files ([`page_routes`]) and [`bind`]. This file
//! holds those shared pieces; the gateway's routes and handlers are in `admin/gateway.rs`
//! ([`serve`]), the agent's in [`agent`].

pub mod agent;
pub mod agent_metrics;
pub mod client;
pub mod conn;
mod gateway;
pub mod metrics;
pub mod server;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::gateway::GatewayHandle;

pub use gateway::serve;

/// The header mutating calls must carry (CSRF protection).
pub const CSRF_HEADER: &str = "x-requested-by";

const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Helpers shared with the agent's page.
const COMMON_JS: &str = include_str!("dashboard/common.js");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// What every request of the gateway's admin server shares; it outlives gateway restarts and
/// admin rebinds.
#[derive(Clone)]
pub struct AdminState {
    gateway: watch::Receiver<Option<GatewayHandle>>,
    access: Access,
    /// gateway.toml, which `restart` validates before dropping anything (`None` when the
    /// gateway was configured in code: a restart keeps its configuration).
    config_path: Option<Arc<Path>>,
}

impl AdminState {
    pub fn new(
        gateway: watch::Receiver<Option<GatewayHandle>>,
        token: Option<String>,
        config_path: Option<PathBuf>,
    ) -> Self {
        AdminState {
            gateway,
            access: Access::new(token),
            config_path: config_path.map(Arc::from),
        }
    }

    /// Replaces the token mutating calls need (a reload of `[admin] token`).
    pub fn set_token(&self, token: Option<&str>) {
        self.access.set_token(token);
    }
}

/// An API error: its status and a JSON `{"error": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: Cow<'static, str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
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
        self.gateway.borrow().clone().ok_or(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is restarting",
        ))
    }
}

/// Who may make mutating calls: the rule of both daemons' admin servers.
#[derive(Clone, Default)]
pub struct Access {
    /// `[admin] token`, when set; read at every request, so a reload that replaces it applies
    /// to the next request.
    token: Arc<RwLock<Option<Arc<str>>>>,
}

impl Access {
    pub fn new(token: Option<String>) -> Self {
        Access {
            token: Arc::new(RwLock::new(token.map(Arc::from))),
        }
    }

    /// Replaces the token (a reload of `[admin] token`).
    pub fn set_token(&self, token: Option<&str>) {
        *self.token.write() = token.map(Arc::from);
    }

    /// Checks the CSRF header and, when configured, the bearer token.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !headers.contains_key(CSRF_HEADER) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "mutating calls need the X-Requested-By header",
            ));
        }
        let token = self.token.read().clone();
        let Some(token) = &token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare digests: `ct_eq` on the raw bytes would return at once on a length mismatch,
        // telling a guesser the token's length.
        let (given, token) = (Sha256::digest(given), Sha256::digest(token.as_bytes()));
        if bool::from(given.ct_eq(&token)) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid admin token is required",
            ))
        }
    }

    /// [`Access::authorize`] for `action`, logging a refusal as
    /// `admin API: ACTION refused (missing or wrong credentials)`.
    pub fn check(&self, headers: &HeaderMap, action: &str) -> Result<(), ApiError> {
        self.authorize(headers).inspect_err(|_| {
            tracing::warn!("admin API: {action} refused (missing or wrong credentials)");
        })
    }
}

/// The Content-Security-Policy of every answer: the dashboard loads only its own files, talks
/// only to its own origin, and may not be framed.
const CSP: &str = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Whether `host` (a `Host` header value) names this admin server: an IP literal (the listen
/// address, or any when listening on a wildcard) or `localhost`, with or without a port (an
/// SSH tunnel may use any local port). A DNS name is refused: that is what a rebinding page sends.
fn host_allowed(host: &str, listen: SocketAddr) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => v6,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let port_ok = match host.rsplit_once(':') {
        Some((_, p)) if !host.ends_with(']') => p.parse::<u16>().is_ok(),
        _ => true,
    };
    if !port_ok {
        return false;
    }
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || listen.ip().is_unspecified() || ip == listen.ip(),
        Err(_) => false,
    }
}

/// Host and Origin checks before any route, and the security headers after.
async fn guard(State(listen): State<SocketAddr>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let mut response = if !host_allowed(host, listen) {
        tracing::warn!(
            "admin API: refused a request for Host {:?} (only this server's addresses and localhost are served: DNS rebinding?)",
            host
        );
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this Host is not served: use the admin address or localhost",
        )
        .into_response()
    } else if request.method() != Method::GET
        && request.method() != Method::HEAD
        && headers
            .get(header::ORIGIN)
            .is_some_and(|o| o.as_bytes() != format!("http://{host}").as_bytes())
    {
        tracing::warn!(
            "admin API: refused a {} from origin {:?} (cross-origin)",
            request.method(),
            headers.get(header::ORIGIN)
        );
        ApiError::new(StatusCode::FORBIDDEN, "cross-origin requests are refused").into_response()
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Publishes the gateway the admin server serves (`None` while one restarts).
pub type GatewaySlot = watch::Sender<Option<GatewayHandle>>;

/// Binds an admin port; logs `{what} listening on http://ADDR/`. Fails with the address in the
/// message if it is taken.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin port {addr}"))?;
    tracing::info!("{what} listening on http://{}/", listener.local_addr()?);
    Ok(listener)
}

/// A page served at `/`: its HTML and its script (at `script_path`), with the shared helpers
/// (`/common.js`) and styles (`/dashboard.css`).
pub struct Page {
    pub html: &'static str,
    pub script_path: &'static str,
    pub script: &'static str,
}

/// The routes of a page's files, compiled into the binary.
pub fn page_routes<S: Clone + Send + Sync + 'static>(page: Page) -> Router<S> {
    let file = |content_type: &'static str, body: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) })
    };
    const JS: &str = "text/javascript; charset=utf-8";
    Router::new()
        .route("/", get(move || async move { Html(page.html) }))
        .route("/common.js", file(JS, COMMON_JS))
        .route(page.script_path, file(JS, page.script))
        .route(
            "/dashboard.css",
            file("text/css; charset=utf-8", DASHBOARD_CSS),
        )
}

/// Serves `app` on `listener` until `shutdown`, behind the Host/Origin guard and with the
/// security headers on every answer; connections are capped and closed when idle ([`conn`]).
pub async fn serve_app(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listen = listener.local_addr()?;
    let app = app.layer(middleware::from_fn_with_state(listen, guard));
    axum::serve(conn::Bounded::new(listener), app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
