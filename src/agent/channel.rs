//! One control channel once it is up: [`Link`], what its data connections need of it (the
//! gateway instance it reached, data TLS, the session secret, round trips), and [`Channel`],
//! its state (generations pushed and answered, the last push, edge settings sent, the warm
//! pool) with one method per kind of event the session loop (`session::run_session`) hears.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::push::{
    ban_result, edge_messages, log_config_result, push_message, EdgeSent, LastPush, PushTooLarge,
};
use super::session::{offered, SessionError};
use super::{data, pool, AgentCtx};
use crate::config::AgentConfig;
use crate::net;
use crate::protocol::outbox::Outbox;
use crate::protocol::{ConfigResult, Connection, HelloAck, Message, ProtocolError, Token};
use crate::transport::Stream;

/// What this session's data connections need to know of the control channel they belong to.
pub(super) struct Link {
    /// The address the control channel reached: data goes to the same gateway instance.
    addr: std::net::SocketAddr,
    /// Data connections use TLS when the control channel does, unless the gateway waives it.
    data_tls: bool,
    session: Option<Token>,
    limits: std::sync::Arc<super::limits::GatewayLimits>,
    /// The socket's round-trip time stays readable after the channel is split.
    rtt: Option<net::RttProbe>,
}

impl Link {
    /// Records the channel in the agent's status (what `/api/status` shows of this gateway)
    /// and logs it.
    pub(super) fn record(
        ctx: &AgentCtx,
        current: &AgentConfig,
        gateway: &str,
        conn: &Connection<Stream>,
        ack: &HelloAck,
        session: Option<Token>,
    ) -> Result<Link, SessionError> {
        let stream = conn.get_ref();
        let addr = stream.tcp().peer_addr().map_err(ProtocolError::Io)?;
        let data_tls = current.tls.is_some() && ack.data_tls;
        let tls = stream.is_tls();
        let server_name = current
            .tls
            .as_ref()
            .filter(|_| tls)
            .and_then(|t| t.client.name_for(gateway).ok())
            .map(|n| n.to_str().into_owned());
        let peer_cert = stream
            .peer_certificate()
            .and_then(|der| crate::certinfo::CertInfo::parse(der.as_ref()).ok());
        let link = Link {
            addr,
            data_tls,
            session,
            limits: ctx.limits.gateway(gateway),
            rtt: net::RttProbe::of(stream.tcp()),
        };
        ctx.status.send_modify(|s| {
            let g = s.gateways.entry(gateway.to_string()).or_default();
            g.connected_to = Some(addr);
            g.connected_since = Some(std::time::SystemTime::now());
            g.tls = tls;
            g.data_tls = data_tls;
            g.tls_version = stream.tls_version();
            g.server_name = server_name;
            g.cert = peer_cert;
            g.protocol = Some(ack.version);
            g.heartbeat_ms = Some(ack.heartbeat_ms);
            g.rtt = link.read_rtt();
            g.sessions += 1;
            g.session = session;
        });
        tracing::info!(
            gateway = %gateway, addr = %addr,
            "control channel up ({}, protocol v{}); pushing {} listener(s)",
            match (tls, data_tls) {
                (false, _) => "PLAINTEXT",
                (true, true) => "TLS 1.3, gateway verified",
                (true, false) => "TLS 1.3, gateway verified; data connections in plaintext",
            },
            ack.version,
            current.listeners.len()
        );
        Ok(link)
    }

    pub(super) fn read_rtt(&self) -> Option<Duration> {
        self.rtt.as_ref().and_then(net::RttProbe::rtt)
    }

    /// The previous heartbeats' acknowledgements keep the kernel's figure fresh.
    pub(super) fn refresh_rtt(&self, ctx: &AgentCtx, gateway: &str) {
        let rtt = self.read_rtt();
        ctx.status.send_if_modified(|s| {
            let g = s.gateways.entry(gateway.to_string()).or_default();
            let changed = g.rtt != rtt;
            g.rtt = rtt;
            changed
        });
    }

    /// Where a client of this session goes ([`data::Gateway`]).
    pub(super) fn for_data(&self, gateway: &str) -> data::Gateway {
        data::Gateway {
            name: gateway.to_string(),
            addr: self.addr,
            tls: self.data_tls,
            session: self.session,
            limits: self.limits.clone(),
        }
    }
}

/// One control channel's state once it is up: what was pushed and answered, the warm pool.
pub(super) struct Channel<'a> {
    pub(super) ctx: &'a AgentCtx,
    pub(super) gateway: &'a str,
    pub(super) link: Link,
    /// Where data tasks report clients they cannot serve (the outbox's queue).
    pub(super) outbox_tx: mpsc::Sender<Message>,
    pub(super) established: &'a mut bool,
    pub(super) up: &'a mut Option<oneshot::Sender<()>>,
    /// The site this channel speaks for.
    pub(super) site: String,
    /// The latest generation pushed, and the latest the gateway answered.
    pub(super) generation: u64,
    pub(super) answered: u64,
    /// What the gateway was last sent, to explain its refusal of it.
    pub(super) last_push: Option<LastPush>,
    pub(super) edge_sent: EdgeSent,
    /// The warm pool starts once the gateway has accepted the config (the site is joined) and
    /// stops with this session.
    pub(super) pool: Option<tokio::task::JoinHandle<()>>,
    pub(super) pool_stop: CancellationToken,
    /// This gateway's clients per second, which size the pool (see `pool::Demand`).
    pub(super) demand: std::sync::Arc<pool::Demand>,
}

impl<'a> Channel<'a> {
    /// A channel that has pushed nothing yet, for `site`.
    pub(super) fn new(
        ctx: &'a AgentCtx,
        gateway: &'a str,
        link: Link,
        outbox_tx: mpsc::Sender<Message>,
        established: &'a mut bool,
        up: &'a mut Option<oneshot::Sender<()>>,
        site: String,
    ) -> Self {
        Channel {
            ctx,
            gateway,
            link,
            outbox_tx,
            established,
            up,
            site,
            generation: 1,
            answered: 0,
            last_push: None,
            edge_sent: EdgeSent::default(),
            pool: None,
            pool_stop: CancellationToken::new(),
            demand: pool::Demand::new(),
        }
    }
}

impl Channel<'_> {
    /// Rate limits and automatic bans, then the first push: they are in force when the
    /// listeners open. `Ok(Err)`: the push is too large for this agent's `max_frame` and was
    /// not sent.
    pub(super) fn push_first(
        &mut self,
        current: &AgentConfig,
        outbox: &Outbox,
    ) -> Result<Result<(), PushTooLarge>, SessionError> {
        for msg in edge_messages(current, self.gateway, &mut self.edge_sent) {
            outbox.send(msg)?;
        }
        let (push, bytes) = match push_message(current, self.generation) {
            Ok(ready) => ready,
            Err(too_large) => return Ok(Err(too_large)),
        };
        outbox.send(push)?;
        let listeners = current.listeners.len();
        self.last_push = Some(LastPush { bytes, listeners });
        Ok(Ok(()))
    }

    /// One message from the gateway; `Err`: the session ends with it.
    pub(super) fn on_message(&mut self, msg: Message) -> Result<(), SessionError> {
        match msg {
            Message::Heartbeat(_) => Ok(()),
            Message::ClientArrived(arrived) => {
                self.demand.arrived(false);
                let gateway = self.link.for_data(self.gateway);
                offered(self.ctx, gateway, arrived, &self.outbox_tx);
                Ok(())
            }
            Message::ConfigResult(result) => self.on_config_result(result),
            Message::BanResult(result) => {
                ban_result(self.ctx, self.gateway, result);
                Ok(())
            }
            Message::Error(e) => match self.last_push.and_then(|p| p.refused(&e)) {
                Some(too_large) => Err(SessionError::PushTooLarge(too_large)),
                None => Err(ProtocolError::Peer(e).into()),
            },
            other => Err(SessionError::Unexpected(other.name())),
        }
    }

    /// The gateway's answer to a push: one per push, in order (anything else is made up).
    /// The answer to the latest push establishes the session and starts the warm pool.
    pub(super) fn on_config_result(
        &mut self,
        mut result: ConfigResult,
    ) -> Result<(), SessionError> {
        let (generation, answered) = (self.generation, self.answered);
        if result.generation <= answered || result.generation > generation {
            return Err(SessionError::NeverPushed(format!(
                "config-result for generation {} (pushed: {generation}, answered: {answered})",
                result.generation
            )));
        }
        self.answered = result.generation;
        // Only listeners of this agent are shown and logged, whatever the gateway names.
        let config = self.ctx.config();
        result
            .listeners
            .retain(|l| config.listener(&l.name).is_some());
        log_config_result(self.gateway, &result);
        if result.generation == generation {
            *self.established = true;
            if let Some(up) = self.up.take() {
                let _ = up.send(());
            }
        }
        if self.pool.is_none() && self.ctx.config().pool.enabled() {
            let (ctx, gateway) = (self.ctx.clone(), self.link.for_data(self.gateway));
            let (outbox, demand) = (self.outbox_tx.clone(), self.demand.clone());
            let maintain = pool::maintain(ctx, gateway, outbox, demand, self.pool_stop.clone());
            self.pool = Some(tokio::spawn(maintain));
        }
        self.ctx.status.send_modify(|s| {
            let g = s.gateways.entry(self.gateway.to_string()).or_default();
            g.listeners = result
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.status.clone()))
                .collect();
            g.last_error = None;
            g.failures = 0;
        });
        Ok(())
    }

    /// A reloaded configuration: pushed as the next generation (edge settings first). A push
    /// too large is logged and not sent: the channel stays up with the listeners the gateway
    /// has. A new site is not this channel's: a new channel replaces it.
    pub(super) fn on_reload(
        &mut self,
        new: &AgentConfig,
        outbox: &Outbox,
    ) -> Result<(), SessionError> {
        if new.site != self.site {
            return Ok(());
        }
        let gateway = self.gateway;
        match push_message(new, self.generation + 1) {
            Ok((push, bytes)) => {
                let edge = edge_messages(new, gateway, &mut self.edge_sent);
                if let Some(e) = edge.into_iter().find_map(|m| outbox.send(m).err()) {
                    return Err(e.into());
                }
                self.generation += 1;
                let listeners = new.listeners.len();
                self.last_push = Some(LastPush { bytes, listeners });
                let generation = self.generation;
                tracing::info!(gateway = %gateway, "configuration reloaded; pushing generation {generation}");
                outbox.send(push)?;
            }
            Err(too_large) => tracing::error!(
                gateway = %gateway,
                "configuration reloaded, but {too_large}; the gateway keeps the listeners of generation {}",
                self.generation
            ),
        }
        Ok(())
    }
}
