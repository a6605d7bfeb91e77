//! # Sallyport
//!
//! A DMZ gateway: it exposes internal TCP services (SFTP, FTPS, HTTPS, any TCP protocol) to the
//! internet without a single inbound connection from the DMZ into the internal network, and
//! without storing configuration or payload in the DMZ.
//!
//! Two daemons come from one binary:
//!
//! - the [`gateway`] runs in the DMZ and holds almost no configuration of its own;
//! - the [`agent`] runs inside, dials *out* to the gateway's control port, pushes the listener
//!   configuration, and for each client dials a data connection back and connects to the
//!   backend. The gateway pipes the client and the data connection together.
//!
//! The wire protocol between them is in [`protocol`] (specified in `docs/protocol.md`); the
//! config files in [`config`]; the byte pump in [`pipe`].
//!
//! # Embedding: a server that talks to the gateway itself
//!
//! A Rust server can skip the agent process and the TCP hop to a backend:
//! [`agent::GatewayListener`] dials the gateway, opens a public port there, and yields each
//! client's stream with its *real* address, wherever a `TcpListener` would be used. With axum:
//!
//! ```no_run
//! use axum::{extract::ConnectInfo, routing::get, Router};
//! use sallyport::agent::{ClientAddr, GatewayListener};
//!
//! # async fn run() -> std::io::Result<()> {
//! let listener = GatewayListener::builder("dmz-gw1.example:44500", "acme-web", "8080")?
//!     .tls("ca.crt", "agent.crt", "agent.key")?
//!     .bind()
//!     .await?; // fails with the gateway's reason, e.g. "address in use"
//!
//! let app = Router::new().route(
//!     "/",
//!     get(|ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>| async move {
//!         format!("hello, {client}\n")
//!     }),
//! );
//! axum::serve(listener, app.into_make_service_with_connect_info::<ClientAddr>()).await
//! # }
//! ```
//!
//! `examples/embedded_server.rs` is the runnable version.

// unwrap() outside tests: a warning (an error under clippy -D warnings); write `expect` with the
// invariant, or handle the case. Set here rather than in Cargo.toml's [lints] so that it covers
// the library and not the integration tests' helpers (tests/support), which unwrap by design.
#![warn(clippy::unwrap_used)]

pub mod access;
pub mod addr;
pub mod admin;
pub mod agent;
pub mod audit;
pub mod bans;
pub mod certinfo;
pub mod certs;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod egress;
pub mod escape;
pub mod fds;
pub mod gateway;
pub mod limits;
pub mod mem;
pub mod net;
pub mod peek;
pub mod pipe;
pub mod protocol;
pub mod ratelimit;
pub mod reuse;
pub mod status;
pub mod transport;
