//! What a reload of agent.toml changes while the agent runs: one control channel per entry of
//! `gateways` (a new entry gets one, a removed entry's closes), the `[outbound]` proxy (moved,
//! started or stopped), and new control channels when a key of the channel itself changes
//! (`site`, `name`, `tls`, `source_ip`, `heartbeat`, `max_frame`).
//!
//! A channel is replaced make-before-break: the new one dials, pushes and is accepted before the
//! old one closes, so a site served by this agent alone never loses its ports to a reload. Data
//! connections belong to the agent, not to a channel: they carry on whatever happens here. Other
//! keys need nothing from here: sessions push new listeners, and every task reads the current
//! configuration when it needs it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{outbound, session, AgentCtx};
use crate::config::AgentConfig;

/// How long an old control channel waits for its replacement to be accepted before it closes
/// anyway: the reload asked for the new settings, and a replacement that cannot connect (a
/// rejected certificate, say) keeps retrying and says why in the log.
const REPLACE_WAIT: Duration = Duration::from_secs(30);

/// One gateway's control channel: stopping its token closes it properly.
struct Channel {
    stop: CancellationToken,
}

/// The outbound proxy's accept loop.
struct Proxy {
    asked: SocketAddr,
    stop: CancellationToken,
}

/// Runs the channels and the proxy `ctx.config` asks for, following its reloads, until
/// `ctx.shutdown`. A proxy port that cannot be bound at start is an error.
pub(crate) async fn supervise(ctx: &AgentCtx, tasks: &TaskTracker) -> anyhow::Result<()> {
    let mut config = ctx.config.clone();
    let mut current = config.borrow_and_update().clone();
    let mut proxy = None;
    if let Some(out) = &current.outbound {
        let listener = outbound::bind(out).await?;
        proxy = Some(start_proxy(ctx, tasks, out.listen, listener));
    }
    let mut channels: HashMap<String, Channel> = HashMap::new();
    for gateway in &current.gateways {
        let channel = open_channel(ctx, tasks, gateway, None);
        channels.insert(gateway.clone(), channel);
    }
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            changed = config.changed() => {
                if changed.is_err() {
                    ctx.shutdown.cancelled().await;
                    return Ok(());
                }
                let new = config.borrow_and_update().clone();
                follow_gateways(ctx, tasks, &mut channels, &current, &new);
                follow_proxy(ctx, tasks, &mut proxy, &new).await;
                current = new;
            }
        }
    }
}

fn open_channel(
    ctx: &AgentCtx,
    tasks: &TaskTracker,
    gateway: &str,
    up: Option<oneshot::Sender<()>>,
) -> Channel {
    let stop = ctx.shutdown.child_token();
    let mut own = ctx.clone();
    own.shutdown = stop.clone();
    tasks.spawn(session::keep_connected(own, gateway.to_string(), up));
    Channel { stop }
}

/// Opens channels to added gateways, closes removed ones', and replaces every channel when the
/// channel's own settings changed.
fn follow_gateways(
    ctx: &AgentCtx,
    tasks: &TaskTracker,
    channels: &mut HashMap<String, Channel>,
    old: &AgentConfig,
    new: &AgentConfig,
) {
    let removed: Vec<String> = channels
        .keys()
        .filter(|g| !new.gateways.contains(g))
        .cloned()
        .collect();
    for gateway in removed {
        tracing::info!(gateway = %gateway, "reload: gateway removed: closing its control channel (its data connections finish)");
        if let Some(c) = channels.remove(&gateway) {
            c.stop.cancel();
        }
    }
    let replace = old.needs_reconnect(new);
    for gateway in &new.gateways {
        match channels.get_mut(gateway) {
            None => {
                tracing::info!(gateway = %gateway, "reload: gateway added: opening a control channel");
                channels.insert(gateway.clone(), open_channel(ctx, tasks, gateway, None));
            }
            Some(channel) if replace => {
                tracing::info!(gateway = %gateway, "reload: opening a new control channel with the new settings; the old one closes once it is accepted");
                let (up, accepted) = oneshot::channel();
                let next = open_channel(ctx, tasks, gateway, Some(up));
                let old = std::mem::replace(channel, next);
                let gateway = gateway.clone();
                tasks.spawn(async move {
                    let why = tokio::select! {
                        Ok(()) = accepted => "the new one is accepted",
                        _ = tokio::time::sleep(REPLACE_WAIT) => "the new one is still not accepted (see its errors)",
                        _ = old.stop.cancelled() => return,
                    };
                    tracing::info!(gateway = %gateway, "reload: closing the old control channel: {why}");
                    old.stop.cancel();
                });
            }
            Some(_) => {}
        }
    }
}

fn start_proxy(
    ctx: &AgentCtx,
    tasks: &TaskTracker,
    asked: SocketAddr,
    listener: tokio::net::TcpListener,
) -> Proxy {
    let stop = ctx.shutdown.child_token();
    let mut own = ctx.clone();
    own.shutdown = stop.clone();
    tasks.spawn(outbound::serve(own, listener));
    Proxy { asked, stop }
}

/// Starts, moves or stops the outbound proxy as `[outbound] listen` now says. A new address is
/// bound before the old one closes; if it cannot be, the proxy stays where it was.
async fn follow_proxy(
    ctx: &AgentCtx,
    tasks: &TaskTracker,
    proxy: &mut Option<Proxy>,
    new: &Arc<AgentConfig>,
) {
    let asked = proxy.as_ref().map(|p| p.asked);
    let wanted = new.outbound.as_ref().map(|o| o.listen);
    if asked == wanted {
        return;
    }
    let Some(out) = &new.outbound else {
        if let Some(p) = proxy.take() {
            p.stop.cancel();
            tracing::info!(
                "reload: [outbound] removed: the outbound proxy is closed (its connections finish)"
            );
        }
        return;
    };
    let listener = match outbound::bind(out).await {
        Ok(l) => l,
        // The same port on another address: it must close before it reopens.
        Err(_) if asked.is_some_and(|a| a.port() == out.listen.port()) => {
            if let Some(p) = proxy.take() {
                p.stop.cancel();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            match outbound::bind(out).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(
                        "reload: outbound.listen NOT applied: {e:#}; the outbound proxy is OFF"
                    );
                    return;
                }
            }
        }
        Err(e) => {
            let stays = match asked {
                Some(a) => format!("the outbound proxy stays on {a}"),
                None => "the outbound proxy stays off".to_string(),
            };
            tracing::error!("reload: outbound.listen NOT applied: {e:#}; {stays}");
            return;
        }
    };
    if let Some(p) = proxy.take() {
        p.stop.cancel();
    }
    *proxy = Some(start_proxy(ctx, tasks, out.listen, listener));
}
