//! The audit record of a client connection's end, the same on both daemons: one INFO event
//! `connection_end` per client connection a gateway accepted, on the gateway and on the agent
//! that served it, with the same field names and the same connection id (`conn`), so a SIEM can
//! join the two (docs/operations.md, "Audit logs in JSON"). With `--log-format json` each is
//! one JSON object on one line; in text it is the connection's one log line. It carries
//! metadata only, never payload, and a daemon logs only what it knows: the gateway never
//! learns a backend address, the agent never sees the client's socket.

use std::net::SocketAddr;
use std::time::Duration;

/// Which daemon writes the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Gateway,
    Agent,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Gateway => "gateway",
            Daemon::Agent => "agent",
        }
    }
}

/// Everything one `connection_end` record says.
#[derive(Debug)]
pub struct ConnectionEnd<'a> {
    /// The gateway's client id (`id` in its `/api/connections`), unique across gateways and
    /// their restarts (see `gateway::next_client_id`); the agent learns it with the offer.
    pub conn: u64,
    pub site: &'a str,
    pub listener: &'a str,
    /// The internet client.
    pub client: SocketAddr,
    /// The public address the client reached.
    pub gateway: SocketAddr,
    /// The serving agent's name, once one claimed the client.
    pub agent: Option<&'a str>,
    /// The agent's data connection as the gateway saw it (gateway only).
    pub agent_addr: Option<SocketAddr>,
    /// The backend the agent dialed (agent only).
    pub backend: Option<&'a str>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    /// How it ended: `closed`, `error`, ... (the lists are in docs/operations.md).
    pub outcome: &'static str,
    /// Why, when the outcome is not `closed`.
    pub error: Option<&'a str>,
}

impl ConnectionEnd<'_> {
    /// Logs the record at INFO, with a sentence for people reading text logs.
    pub fn log(&self, daemon: Daemon) {
        let seconds = self.duration.as_secs_f64();
        let how = match self.error {
            Some(e) => format!("{} ({e})", self.outcome.replace('_', " ")),
            None => self.outcome.replace('_', " "),
        };
        tracing::info!(
            event = "connection_end",
            daemon = daemon.name(),
            conn = self.conn,
            site = self.site,
            listener = self.listener,
            client_ip = %self.client.ip(),
            client_port = self.client.port(),
            gateway = %self.gateway,
            agent = self.agent,
            agent_addr = self.agent_addr.map(tracing::field::display),
            backend = self.backend,
            bytes_from_client = self.bytes_from_client,
            bytes_to_client = self.bytes_to_client,
            duration_ms = self.duration.as_millis() as u64,
            outcome = self.outcome,
            error = self.error,
            "client connection {how} after {seconds:.1} s"
        );
    }
}
