//! [`GatewayHandle`]: the operators' view and controls of a running gateway (state, status,
//! statistics, connections, bans, pause/resume, stop/restart, reload). The admin API and the
//! daemon's signal handling act on the gateway only through it; it never opens a socket itself.

use super::*;

/// Operators' view and controls of a running gateway.
#[derive(Clone)]
pub struct GatewayHandle {
    pub(super) shared: Arc<Shared>,
}

impl GatewayHandle {
    pub fn state(&self) -> RunState {
        self.shared.state()
    }

    pub fn agents(&self) -> Vec<AgentView> {
        self.shared
            .sites
            .all()
            .iter()
            .flat_map(|site| {
                site.agents().into_iter().map(|a| AgentView {
                    site: site.name.clone(),
                    name: a.name.clone(),
                    addr: a.addr,
                    connected_since: unix(a.connected_since),
                    connected_seconds: a.connected_since.elapsed().unwrap_or_default().as_secs(),
                    inflight: a.inflight.load(Ordering::Relaxed),
                    cert: a
                        .chain
                        .as_ref()
                        .and_then(|c| c.first())
                        .and_then(|leaf| crate::certinfo::CertView::of_der(leaf.as_ref())),
                })
            })
            .collect()
    }

    pub fn status(&self) -> StatusView {
        self.status_of(None)
    }

    /// A `watch` of the gateway's state (sites, agents, listeners, pool, counters), current
    /// from the start; when it changes: [`super::watch`]'s module doc.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<super::watch::GatewayStatus> {
        let receiver = self.shared.status.subscribe();
        super::watch::refresh(&self.shared);
        receiver
    }

    /// The status, of one site only when `site` is given (its agents and listeners; the light
    /// is that site's).
    pub fn status_of(&self, site: Option<&str>) -> StatusView {
        let s = &self.shared;
        let mut agents = self.agents();
        agents.retain(|a| site.map_or(true, |name| a.site == name));
        let state = s.state();
        let light = match state {
            RunState::Paused => "amber",
            RunState::Running if !agents.is_empty() => "green",
            _ => "red",
        };
        let config = s.config();
        StatusView {
            daemon: "gateway".into(),
            state,
            light: light.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: unix(s.started),
            uptime_seconds: s.started_at.elapsed().as_secs(),
            control: ControlView {
                listen: s.control_addr,
                tls: config.tls.is_some(),
                data_tls: config.tls.is_some() && config.data_tls,
                cert: config
                    .tls
                    .as_ref()
                    .map(|t| crate::certinfo::CertView::of(&t.identity, SystemTime::now())),
            },
            agents,
            listeners: s
                .sites
                .all()
                .iter()
                .filter(|one| site.map_or(true, |name| one.name == name))
                .flat_map(|site| site.listener_views())
                .collect(),
            routes: s
                .routes
                .views()
                .into_iter()
                .filter(|r| site.map_or(true, |name| r.site == name))
                .collect(),
            revoked: s.revoked.lock().iter().cloned().collect(),
        }
    }

    pub fn stats(&self) -> StatsView {
        self.stats_of(None)
    }

    /// The statistics, of one site only when `site` is given (its listeners, their sum as the
    /// totals, its agents and pool; refusals and history stay gateway-wide).
    pub fn stats_of(&self, site: Option<&str>) -> StatsView {
        let s = &self.shared;
        let (mut per, mut totals) = s.traffic.snapshot();
        let sites: Vec<_> = s
            .sites
            .all()
            .into_iter()
            .filter(|one| site.map_or(true, |name| one.name == name))
            .collect();
        if let Some(name) = site {
            per.retain(|(l, _)| l.site == name);
            totals = stats::sum(per.iter().map(|(_, t)| t));
        }
        StatsView {
            uptime_seconds: s.started_at.elapsed().as_secs(),
            agents: sites.iter().map(|site| site.agent_count()).sum(),
            pooled: sites.iter().map(|site| site.pool.len()).sum(),
            totals,
            listeners: per
                .into_iter()
                .map(|(l, traffic)| ListenerStatsView {
                    site: l.site.clone(),
                    name: l.name.clone(),
                    traffic,
                })
                .collect(),
            refusals: s
                .stats
                .refusals()
                .into_iter()
                .map(|(k, n)| (k.into(), n))
                .collect(),
            check_probes: s.stats.check_probes.count(),
            tls: TlsView {
                handshakes_full: s.stats.tls_full.load(Ordering::Relaxed),
                handshakes_resumed: s.stats.tls_resumed.load(Ordering::Relaxed),
                sessions: (s.config().tls.as_ref())
                    .map(|t| t.server.sessions())
                    .unwrap_or_default(),
            },
            history: s.traffic.history(),
        }
    }

    /// Whether a load balancer should send clients here, and if not, why.
    pub fn health(&self) -> HealthView {
        let s = &self.shared;
        let state = s.state();
        let mut reasons = Vec::new();
        match state {
            RunState::Running => {}
            RunState::Paused => reasons.push("the gateway is paused".to_string()),
            RunState::Stopping => reasons.push("the gateway is stopping".to_string()),
        }
        let sites = s.sites.all();
        let agents: usize = sites.iter().map(|site| site.agent_count()).sum();
        if agents == 0 {
            reasons.push("no agent connected".to_string());
        }
        for site in &sites {
            if site.agent_count() == 0 && site.last_pushed() > 0 {
                reasons.push(format!(
                    "site \"{}\": no agent connected (its {} listener(s) are closed)",
                    site.name,
                    site.last_pushed()
                ));
            }
            for l in site.listener_views() {
                if let Some(error) = l.error.filter(|_| l.state == ListenerState::Failed) {
                    reasons.push(format!(
                        "site \"{}\": listener \"{}\" failed: {error}",
                        site.name, l.name
                    ));
                }
            }
        }
        HealthView {
            healthy: reasons.is_empty(),
            state,
            agents,
            reasons,
        }
    }

    /// The bans in force, per site that has any.
    pub fn bans(&self) -> Vec<bans::SiteBansView> {
        self.shared
            .sites
            .all()
            .iter()
            .map(|site| site.bans.view(&site.name))
            .filter(|v| v.total > 0)
            .collect()
    }

    pub fn connections(&self) -> Vec<ConnectionView> {
        self.shared
            .traffic
            .connections()
            .into_iter()
            .map(|c| ConnectionView {
                id: c.id,
                site: c.listener.site.clone(),
                listener: c.listener.name.clone(),
                client: c.client_addr,
                gateway: c.gateway_addr,
                agent: c.agent_addr,
                started_at: unix(c.started),
                age_seconds: c.started_at.elapsed().as_secs_f64(),
                bytes: c.bytes(),
            })
            .collect()
    }

    async fn set_state(&self, state: RunState) -> RunState {
        {
            let mut current = self.shared.state.lock();
            if *current == RunState::Stopping || *current == state {
                return *current;
            }
            *current = state;
        }
        self.shared.traffic.changes.mark();
        tracing::warn!(
            "gateway {}",
            if state == RunState::Paused {
                "PAUSED: listeners closed, established connections and agents kept"
            } else {
                "RESUMED: listeners reopen"
            }
        );
        for site in self.shared.sites.all() {
            site.reconcile_now(&self.shared).await;
        }
        self.shared.state()
    }

    /// Closes every listener (new clients are refused); connections and agents stay.
    pub async fn pause(&self) -> RunState {
        self.set_state(RunState::Paused).await
    }

    /// Reopens the listeners of every site that has an agent.
    pub async fn resume(&self) -> RunState {
        self.set_state(RunState::Running).await
    }

    /// Graceful stop: `Gateway::run` closes everything and drains, then returns [`Exit::Stop`].
    pub fn stop(&self) {
        tracing::warn!("stop requested");
        self.shared.request_exit(Exit::Stop);
    }

    /// `Gateway::run` drops everything and returns [`Exit::Restart`].
    pub fn restart(&self) {
        tracing::warn!("restart requested");
        self.shared.request_exit(Exit::Restart);
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.shared.config()
    }

    /// Applies a re-read gateway.toml and says, key by key, what changed and whether it took
    /// effect (logged too). Keys that need a restart (`control.listen`, `control.data_tls`)
    /// keep their running value. Agents the new `[peers]` rules deny are cut at once.
    /// `[admin]` is the admin server's: its caller applies it.
    pub async fn reload(&self, new: GatewayConfig) -> Vec<Change> {
        let old = self.shared.config();
        let changes = old.changes(&new);
        let mut applied = new;
        applied.control_listen = old.control_listen;
        applied.data_tls = old.data_tls;
        let limits = &applied.limits;
        self.shared
            .handshakes
            .set_limits(limits.max_handshakes, limits.max_handshakes_per_ip);
        self.shared
            .handshakes
            .set_reserved(limits.max_handshakes / 4);
        self.shared
            .clients
            .set_limits(limits.max_connections, limits.max_connections_per_ip);
        *self.shared.config.write() = Arc::new(applied);
        // Who is cut is noted before they are told (they leave their sites at once).
        self.revoke_denied_agents();
        self.revoke_rejected_certificates();
        // After the swap: every connection waiting in `denied` now sees the new rules.
        self.shared.peer_rules.send_modify(|g| *g += 1);
        for site in self.shared.sites.all() {
            site.reconcile_now(&self.shared).await;
        }
        for change in &changes {
            if change.needs_restart() {
                tracing::warn!("reload: {change}");
            } else {
                tracing::info!("reload: {change}");
            }
        }
        let later = changes.iter().filter(|c| c.needs_restart()).count();
        tracing::info!(
            "reload: gateway configuration applied ({} key(s) changed, {later} need(s) a restart)",
            changes.len()
        );
        changes
    }

    /// Closes the pooled connections of agents `[peers]` now denies, and says who is cut (their
    /// sessions and connections end by themselves in [`Shared::denied`] once the rules'
    /// generation moves).
    fn revoke_denied_agents(&self) {
        let config = self.shared.config();
        let denied = |ip: IpAddr| !config.peers.allows(ip);
        let connections = self.shared.traffic.connections();
        for site in self.shared.sites.all() {
            let pooled = site.pool.remove_peers(denied);
            for agent in site.agents().into_iter().filter(|a| denied(a.addr.ip())) {
                let established = connections
                    .iter()
                    .filter(|c| c.agent_addr.ip() == agent.addr.ip())
                    .count();
                let pooled = pooled.get(&agent.addr.ip()).copied().unwrap_or(0);
                let reason = format!(
                    "{} is no longer allowed by the gateway's [peers] rules",
                    agent.addr.ip()
                );
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %agent.addr,
                    "reload: agent REVOKED: {reason}: control channel closed, {pooled} pooled \
                     connection(s) closed, {established} established connection(s) {}",
                    if config.drop_established {
                        "closed"
                    } else {
                        "left to finish ([peers] drop_established = false)"
                    }
                );
                self.note_revoked(RevokedView {
                    site: site.name.clone(),
                    agent: agent.name.clone(),
                    addr: agent.addr,
                    at: unix(SystemTime::now()),
                    reason,
                    pooled,
                    established,
                    established_closed: config.drop_established,
                });
            }
        }
    }

    /// Cuts the agents whose certificate the new TLS settings refuse (a CRL that lists it, a
    /// client_ca that did not issue it): their control sessions end with REVOKED, and with
    /// them their pooled connections; the client and outbound connections they pipe end in
    /// [`Shared::cut`] (under `[peers] drop_established`, as for a `[peers]` revocation).
    fn revoke_rejected_certificates(&self) {
        let config = self.shared.config();
        let Some(tls) = &config.tls else {
            return;
        };
        let connections = self.shared.traffic.connections();
        for site in self.shared.sites.all() {
            for agent in site.agents() {
                let Some(chain) = &agent.chain else {
                    continue;
                };
                let Err(e) = tls.server.verify_client(chain) else {
                    continue;
                };
                let reason = format!("its certificate is now refused: {e}");
                // Connections from its address: what the cut in [`Shared::cut`] reaches.
                let established = connections
                    .iter()
                    .filter(|c| c.agent_addr.ip() == agent.addr.ip())
                    .count();
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %agent.addr,
                    "reload: agent REVOKED: {reason}: control channel and pooled connections \
                     closed, established connection(s) {}",
                    if config.drop_established {
                        "closed"
                    } else {
                        "left to finish ([peers] drop_established = false)"
                    }
                );
                self.shared.stats.revoked.hit();
                self.note_revoked(RevokedView {
                    site: site.name.clone(),
                    agent: agent.name.clone(),
                    addr: agent.addr,
                    at: unix(SystemTime::now()),
                    reason,
                    pooled: site.pool.agent_count(agent.id),
                    established,
                    established_closed: config.drop_established,
                });
                agent.cert_revoked.cancel();
            }
        }
    }

    fn note_revoked(&self, view: RevokedView) {
        let mut revoked = self.shared.revoked.lock();
        if revoked.len() == 32 {
            revoked.pop_front();
        }
        revoked.push_back(view);
    }

    /// Restarts with `new` (validated by the caller; `None`: the caller re-reads the file) and
    /// returns what it changes. Every key applies at a restart.
    pub fn restart_with(&self, new: Option<GatewayConfig>) -> Vec<Change> {
        let changes = match &new {
            Some(new) => self.shared.config().changes(new),
            None => Vec::new(),
        };
        *self.shared.staged.lock() = new;
        self.restart();
        changes
    }

    /// The configuration `restart_with` staged, for the next gateway.
    pub fn take_staged(&self) -> Option<GatewayConfig> {
        self.shared.staged.lock().take()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
