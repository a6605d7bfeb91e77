//! The gateway: the DMZ half of Sallyport.
//!
//! It accepts agents on its control port, opens the public listeners they push, announces each
//! client to an agent of the listener's site, and pipes the client to the data connection the
//! agent dials back. It never dials the internal network.
//!
//! **It never writes to disk.** Listener configuration arrives over the control channel and
//! lives in memory only; payload bytes only pass through [`crate::pipe`]; the log goes to
//! stderr. Nothing in this module may open a file for writing.

mod control;
mod listener;
mod pending;
mod site;
pub mod stats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewayConfig;
use crate::limits::{ConnLimiter, Gauge};
use crate::net;
use pending::PendingTable;
use site::SiteRegistry;
use stats::GatewayStats;

/// How long a stopping gateway waits for established connections to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every task of one gateway.
pub(crate) struct Shared {
    pub config: GatewayConfig,
    pub sites: SiteRegistry,
    pub pending: PendingTable,
    pub stats: GatewayStats,
    /// Control-port connections still in their handshake.
    pub handshakes: ConnLimiter,
    /// Client connections, waiting or piping.
    pub clients: ConnLimiter,
    /// Clients waiting for a data connection, across all listeners.
    pub pending_total: Gauge,
    /// Refusals being written to refused control-port connections.
    pub refusals: Gauge,
    /// Every connection task (control sessions, data hellos, clients), for draining on stop.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    next_client_id: AtomicU64,
    next_agent_id: AtomicU64,
}

impl Shared {
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_agent_id(&self) -> u64 {
        self.next_agent_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A gateway with its control port bound, ready to [`Gateway::run`].
pub struct Gateway {
    shared: Arc<Shared>,
    control: TcpListener,
}

impl Gateway {
    /// Binds the control port. Fails (with the address in the message) if it is taken.
    pub async fn bind(config: GatewayConfig) -> anyhow::Result<Gateway> {
        let addr = config.control_listen;
        let control = net::bind_listener(addr)
            .with_context(|| format!("cannot listen on control port {addr}"))?;
        let shared = Arc::new(Shared {
            sites: SiteRegistry::default(),
            pending: PendingTable::default(),
            stats: GatewayStats::default(),
            handshakes: ConnLimiter::new(
                config.limits.max_handshakes,
                config.limits.max_handshakes_per_ip,
            ),
            clients: ConnLimiter::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
            ),
            pending_total: Gauge::default(),
            refusals: Gauge::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            next_client_id: AtomicU64::new(1),
            next_agent_id: AtomicU64::new(1),
            config,
        });
        Ok(Gateway { shared, control })
    }

    /// The bound control address (useful when the config asked for port 0).
    pub fn control_addr(&self) -> SocketAddr {
        self.control
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// The gateway's counters, live.
    pub fn stats(&self) -> &GatewayStats {
        &self.shared.stats
    }

    /// Serves until `shutdown` is cancelled, then closes the control port and every listener and
    /// gives established connections a short grace period to finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!("control port listening on {}", self.control_addr());
        let shared = self.shared.clone();
        let accept = tokio::spawn(control::accept_loop(shared.clone(), self.control));
        shutdown.cancelled().await;
        tracing::info!(
            pending = shared.pending.len(),
            "stopping: closing the control port and every listener"
        );
        shared.shutdown.cancel();
        let _ = accept.await;
        shared.tasks.close();
        if tokio::time::timeout(DRAIN_GRACE, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} connection task(s) still open after {}; exiting anyway",
                shared.tasks.len(),
                humantime::format_duration(DRAIN_GRACE)
            );
        }
        Ok(())
    }
}
