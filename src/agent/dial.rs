//! Dialing the gateway, for control and data connections alike: TCP from the configured source
//! address, TLS when configured, the preamble and hello, then the gateway's answer: a
//! hello-ack, or a refusal whose reason ends up in the agent's log.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::AgentConfig;
use crate::net;
use crate::protocol::{self, Connection, ErrorMsg, HelloAck, Message, ProtocolError, Role, MAGIC};
use crate::transport::{self, Stream};

#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("TLS handshake with {target} failed: {source}")]
    Tls { target: String, source: io::Error },
    #[error("the gateway refused the connection: {0}")]
    Refused(ErrorMsg),
    #[error("the gateway rejected this agent's TLS certificate as REVOKED (its [control] tls.crl lists it): this agent needs a new certificate (`sallyport cert renew`)")]
    CertificateRevoked,
    #[error("the gateway rejected this agent's TLS certificate (alert {0:?}): is it issued by the gateway's client_ca, and still valid?")]
    CertificateRejected(rustls::AlertDescription),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("no answer to the hello within {0:?}")]
    Timeout(Duration),
}

impl DialError {
    fn from_io(target: &str, e: io::Error, during_tls: bool) -> DialError {
        if let Some(refusal) = transport::refusal(&e) {
            return DialError::Refused(refusal.clone());
        }
        // In TLS 1.3 the server checks the client certificate after the client considers the
        // handshake done: a rejection arrives as an alert on the first read.
        if let Some(rustls::Error::AlertReceived(alert)) =
            e.get_ref().and_then(|i| i.downcast_ref())
        {
            if *alert == rustls::AlertDescription::CertificateRevoked {
                return DialError::CertificateRevoked;
            }
            return DialError::CertificateRejected(*alert);
        }
        let target = target.to_string();
        if during_tls {
            DialError::Tls { target, source: e }
        } else {
            DialError::Connect { target, source: e }
        }
    }
}

impl DialError {
    /// Whether dialing again soon cannot help: the gateway refuses this agent's certificate
    /// for what it is (revoked, or bound to another site) until an operator acts. The control
    /// channel then retries at its longest `[reconnect]` interval, not faster.
    pub fn needs_operator(&self) -> bool {
        match self {
            DialError::CertificateRevoked => true,
            DialError::Refused(e) => {
                e.code == protocol::ErrorCode::WRONG_SITE || e.code == protocol::ErrorCode::REVOKED
            }
            _ => false,
        }
    }
}

/// Where to dial: the gateway as configured (`host:port`, which also names it for TLS), and
/// optionally the address it already resolved to (data connections go to the same gateway
/// instance as their control channel).
pub(crate) struct Target<'a> {
    pub gateway: &'a str,
    pub resolved: Option<SocketAddr>,
}

/// Data, pool and outbound connections of a `source_ip` list take its addresses in turn.
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

/// The source address for a connection of `role`: the control channel (and v1's pool and
/// outbound connections, which a plaintext gateway binds to their control session's address)
/// the first of `source_ip`, the rest in turn (see `AgentConfig::data_source_ips`).
fn source_for(config: &AgentConfig, role: &Role) -> Option<std::net::IpAddr> {
    let all = &config.data_source_ips;
    match role {
        Role::Data(_) | Role::SessionPool(..) | Role::SessionOutbound(..) if all.len() > 1 => {
            Some(all[NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % all.len()])
        }
        _ => config.source_ip,
    }
}

/// Opens a connection with `role`. `tls` says whether to use TLS on it (the config must have
/// it). Returns the connection after the hello-ack, and the ack.
pub(crate) async fn dial(
    config: &AgentConfig,
    target: Target<'_>,
    role: Role,
    tls: bool,
) -> Result<(Connection<Stream>, HelloAck), DialError> {
    dial_up_to(config, target, role, tls, protocol::max_version()).await
}

/// [`dial`], offering protocol versions up to `max_version` at most.
pub(crate) async fn dial_up_to(
    config: &AgentConfig,
    target: Target<'_>,
    role: Role,
    tls: bool,
    max_version: u16,
) -> Result<(Connection<Stream>, HelloAck), DialError> {
    let timeout = config.connect_timeout;
    let dial_to = target.resolved.map(|a| a.to_string());
    let dial_to = dial_to.as_deref().unwrap_or(target.gateway);
    let tcp = net::connect_from(dial_to, source_for(config, &role), timeout)
        .await
        .map_err(|e| DialError::from_io(dial_to, e, false))?;

    let mut stream = match (&config.tls, tls) {
        (Some(t), true) => {
            let name = t
                .client
                .name_for(target.gateway)
                .map_err(|e| DialError::from_io(target.gateway, e, true))?;
            tokio::time::timeout(timeout, t.client.connect(name, tcp))
                .await
                .map_err(|_| DialError::Timeout(timeout))?
                .map_err(|e| DialError::from_io(target.gateway, e, true))?
        }
        _ => Stream::Plain(tcp),
    };

    let hello = protocol::hello_up_to(role, max_version);
    let answer = async {
        stream
            .write_all(&protocol::with_preamble(&hello))
            .await
            .map_err(ProtocolError::Io)?;
        read_answer(stream, config.max_frame).await
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| DialError::Timeout(timeout))?
}

/// Reads the gateway's first words: [`MAGIC`] starts a refusal, anything else is a frame.
async fn read_answer(
    mut stream: Stream,
    max_frame: usize,
) -> Result<(Connection<Stream>, HelloAck), DialError> {
    let mut head = [0u8; 4];
    if let Err(e) = stream.read_exact(&mut head).await {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the gateway closed the connection without an answer (a firewall, or the gateway's handshake limits?)",
            ))
            .into());
        }
        return Err(DialError::from_io("the gateway", e, false));
    }
    if head == MAGIC {
        let mut conn = Connection::new(stream, max_frame);
        return match conn.read_message().await? {
            Some(Message::Error(e)) => Err(DialError::Refused(e)),
            _ => Err(ProtocolError::Unexpected {
                expected: "a refusal after the preamble",
                got: "something else",
            }
            .into()),
        };
    }
    let mut conn = Connection::with_prefix(stream, max_frame, &head);
    match conn.expect_message().await? {
        Message::HelloAck(ack)
            if !(protocol::MIN_VERSION..=protocol::max_version()).contains(&ack.version) =>
        {
            Err(ProtocolError::NoCommonVersion {
                our_min: protocol::MIN_VERSION,
                our_max: protocol::max_version(),
                their_min: ack.version,
                their_max: ack.version,
            }
            .into())
        }
        Message::HelloAck(ack) => Ok((conn, ack)),
        other => Err(ProtocolError::Unexpected {
            expected: "hello-ack",
            got: other.name(),
        }
        .into()),
    }
}
