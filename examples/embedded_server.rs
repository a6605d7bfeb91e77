//! An HTTP server that lives behind a Sallyport gateway with no agent process and no TCP hop to
//! a backend: it dials the gateway itself, like an agent, and serves the clients the gateway
//! hands it, answering each with its real address.
//!
//! ```sh
//! cargo run --example embedded_server -- --gateway 127.0.0.1:44500 --public 8081
//! curl http://127.0.0.1:8081/
//! ```
//!
//! Options: `--site NAME` (default `embedded`), `--tls-dir DIR` (a `sallyport cert init`
//! directory: uses `ca.crt`, `agent.crt`, `agent.key`).

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use sallyport::agent::{ClientAddr, GatewayListener};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let gateway = arg("--gateway").unwrap_or_else(|| "127.0.0.1:44500".into());
    let public = arg("--public").unwrap_or_else(|| "8081".into());
    let site = arg("--site").unwrap_or_else(|| "embedded".into());

    let mut builder = GatewayListener::builder(&gateway, &site, &public)?;
    if let Some(dir) = arg("--tls-dir") {
        let dir = std::path::Path::new(&dir);
        builder = builder.tls(
            dir.join("ca.crt"),
            dir.join("agent.crt"),
            dir.join("agent.key"),
        )?;
    }
    let listener = builder.bind().await?;
    println!(
        "serving on the gateway at http://{}/",
        listener.local_addr()?
    );

    let app = Router::new().route(
        "/",
        get(
            |ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>| async move {
                format!(
                    "Hello {client}! You reached a server embedded behind a Sallyport gateway.\n"
                )
            },
        ),
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<ClientAddr>(),
    )
    .await
}
