//! The admin server's life across reloads: `[admin] enabled`, `listen` and `token` of a re-read
//! gateway.toml take effect without a new process.
//!
//! A new address is bound before the old one closes, so a reload that cannot bind it (in use,
//! not on this host) leaves the admin API where it was and says so; requests in flight on the
//! old address finish. It never touches the gateway it serves.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::AdminState;
use crate::config::GatewayConfig;

/// The admin HTTP server, (re)bound as `[admin]` says.
pub struct AdminServer {
    state: AdminState,
    running: Option<Running>,
}

struct Running {
    /// The address the config asked for (a `:0` port stays bound across reloads).
    asked: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl AdminServer {
    /// Starts serving as `config` says (or not, with `[admin] enabled = false`). A port that
    /// cannot be bound at start is an error: the operator asked for an admin API.
    pub async fn start(config: &GatewayConfig, state: AdminState) -> anyhow::Result<Self> {
        let mut server = AdminServer {
            state,
            running: None,
        };
        if let Some(addr) = config.admin_listen {
            let listener = super::bind(addr, "admin API and dashboard").await?;
            server.spawn(addr, listener)?;
        }
        Ok(server)
    }

    /// Where it listens now, if it does.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(|r| r.bound)
    }

    fn spawn(&mut self, asked: SocketAddr, listener: TcpListener) -> anyhow::Result<()> {
        let bound = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(super::serve(listener, self.state.clone(), stop.clone()));
        self.running = Some(Running {
            asked,
            bound,
            stop,
            task,
        });
        Ok(())
    }

    /// Applies `[admin]` of a re-read gateway.toml. The error says what was not applied and
    /// where the admin API stays.
    pub async fn apply(&mut self, config: &GatewayConfig) -> Result<(), String> {
        self.state.set_token(config.admin_token.as_deref());
        let asked = self.running.as_ref().map(|r| r.asked);
        match (config.admin_listen, asked) {
            (None, None) => Ok(()),
            (Some(new), Some(old)) if new == old => Ok(()),
            (None, Some(_)) => {
                self.stop_running().await;
                tracing::warn!("admin API closed ([admin] enabled = false)");
                Ok(())
            }
            (Some(new), _) => self.move_to(new).await,
        }
    }

    async fn move_to(&mut self, new: SocketAddr) -> Result<(), String> {
        let listener = match super::bind(new, "admin API and dashboard").await {
            Ok(l) => l,
            // The same port on another address of this host: it must close before it reopens.
            Err(_) if self.addr().is_some_and(|old| old.port() == new.port()) => {
                let old = self.running.as_ref().expect("checked").asked;
                self.stop_running().await;
                match super::bind(new, "admin API and dashboard").await {
                    Ok(l) => l,
                    Err(e) => {
                        let back = super::bind(old, "admin API and dashboard").await.map_err(|e2| {
                            format!("admin.listen: cannot listen on {new}: {e:#}; and the old address {old} cannot be bound again: {e2:#}: the admin API is OFF")
                        })?;
                        self.spawn(old, back).map_err(|e| e.to_string())?;
                        return Err(format!(
                            "admin.listen: cannot listen on {new}: {e:#}; the admin API stays on {old}"
                        ));
                    }
                }
            }
            Err(e) => {
                let stays = match self.addr() {
                    Some(a) => format!("the admin API stays on {a}"),
                    None => "the admin API stays off".to_string(),
                };
                return Err(format!(
                    "admin.listen: cannot listen on {new}: {e:#}; {stays}"
                ));
            }
        };
        self.stop_running().await;
        self.spawn(new, listener).map_err(|e| e.to_string())
    }

    async fn stop_running(&mut self) {
        if let Some(mut r) = self.running.take() {
            r.stop.cancel();
            // In-flight requests finish; a client that holds its connection open does not
            // hold the move.
            if tokio::time::timeout(std::time::Duration::from_secs(5), &mut r.task)
                .await
                .is_err()
            {
                r.task.abort();
            }
        }
    }

    /// Stops serving (the gateway stopped).
    pub async fn stop(mut self) {
        self.stop_running().await;
    }
}
