//! The gateway's admin API: its routes (the table in [`super`]) and their handlers. Reads go to
//! the current gateway's [`GatewayHandle`]; `POST /api/{pause,resume,restart,stop}` pass
//! [`super::Access`] first, and a restart loads the new gateway.toml and checks that its new
//! addresses can be bound before it drops anything (else 422, and the running gateway stays).

use super::*;

/// Serves the gateway's admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = page_routes(Page {
        html: INDEX_HTML,
        script_path: "/dashboard.js",
        script: DASHBOARD_JS,
    })
    .route("/api/status", get(status))
    .route("/api/stats", get(stats))
    .route("/api/connections", get(connections))
    .route("/api/bans", get(bans))
    .route("/api/health", get(health))
    .route("/api/pause", post(pause))
    .route("/api/resume", post(resume))
    .route("/api/restart", post(restart))
    .route("/api/stop", post(stop))
    .route("/metrics", get(metrics))
    .with_state(state);
    serve_app(listener, app, shutdown).await
}

/// `?site=NAME` narrows the status and statistics to one site.
#[derive(serde::Deserialize)]
struct SiteFilter {
    site: Option<String>,
}

async fn status(State(s): State<AdminState>, Query(q): Query<SiteFilter>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.status_of(q.site.as_deref())).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /api/health`: 200 only while the gateway runs with at least one agent for every site
/// that has listeners, and every listener open; else 503. The body says why, for a load
/// balancer's or keepalived's check.
async fn health(State(s): State<AdminState>) -> Response {
    let g = match s.gateway() {
        Ok(g) => g,
        Err(e) => {
            let body = serde_json::json!({"healthy": false, "reasons": [e.message]});
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
    };
    let health = g.health();
    let code = if health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health)).into_response()
}

async fn stats(State(s): State<AdminState>, Query(q): Query<SiteFilter>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.stats_of(q.site.as_deref())).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn connections(State(s): State<AdminState>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.connections()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn bans(State(s): State<AdminState>) -> Response {
    match s.gateway() {
        Ok(g) => Json(g.bans()).into_response(),
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
    if let Err(refused) = s.access.check(&headers, action) {
        return refused.into_response();
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

/// `POST /api/restart`: validates gateway.toml first (the file, the TLS files, and that new
/// control and admin addresses can be bound); a bad file drops nothing and answers 422 with the
/// reason. The answer lists what the restart changes.
async fn restart(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.access.check(&headers, "restart") {
        return refused.into_response();
    }
    let g = match s.gateway() {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let staged = match &s.config_path {
        None => None,
        Some(path) => match GatewayConfig::load(path)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                bindable(&g.config(), &new)?;
                Ok(new)
            }) {
            Ok(new) => Some(new),
            Err(why) => {
                tracing::error!(
                    "admin API: restart refused, nothing was dropped, the running configuration stays: {why}"
                );
                let body = serde_json::json!({
                    "error": format!("restart refused, nothing was dropped: {why}"),
                    "state": g.state(),
                });
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
            }
        },
    };
    tracing::info!("admin API: restart");
    let changes: Vec<String> = g
        .restart_with(staged)
        .iter()
        .map(|c| c.at_restart())
        .collect();
    Json(serde_json::json!({"action": "restart", "state": g.state(), "changes": changes}))
        .into_response()
}

/// Whether the addresses `new` asks for and `running` does not hold can be bound now (a
/// restart that cannot bind its control port would leave no gateway at all).
fn bindable(running: &GatewayConfig, new: &GatewayConfig) -> Result<(), String> {
    let mut wanted = vec![(
        "control.listen",
        Some(new.control_listen),
        running.control_listen,
    )];
    if let (Some(a), Some(b)) = (new.admin_listen, running.admin_listen) {
        // Moving the admin API within its own port cannot be tried while it holds it.
        if a.port() != b.port() {
            wanted.push(("admin.listen", Some(a), b));
        }
    }
    for (key, addr, held) in wanted {
        let Some(addr) = addr.filter(|a| *a != held && a.port() != 0) else {
            continue;
        };
        std::net::TcpListener::bind(addr)
            .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

async fn stop(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    control(s, headers, "stop", |g| async move { g.stop() }).await
}
