//! TLS for the control and data connections: the gateway's server config ([`ServerTls`]: its
//! certificate, the agents' CA, the CRL), the agent's client config ([`ClientTls`]), and the
//! bounded, single-use session cache that lets later connections resume.

use super::*;

/// TLS session resumption for connections after the first (pool refills, data connections,
/// reconnects): TLS 1.3 PSK with (EC)DHE, so they skip the certificate signatures and chain
/// checks of a full handshake. On by default; `SALLYPORT_TLS_RESUMPTION=off` (or `0`, `false`,
/// `no`) turns it off on the side that reads it, for comparisons. Read once per process.
pub fn resumption_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("SALLYPORT_TLS_RESUMPTION").as_deref(),
            Ok("off" | "0" | "false" | "no")
        )
    })
}

/// Sessions a gateway keeps for resumption (each a few hundred bytes plus the agent's
/// certificate chain: about 0.8 KiB each, 0.2 MiB when full). An agent keeps at most 8 tickets per
/// gateway name (rustls's client cache), so this serves 32 agents without a full handshake.
pub const SERVER_SESSIONS: usize = 256;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM certificate in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate found",
        path.display()
    );
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

fn load_crls(
    path: &Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>> {
    use rustls::pki_types::CertificateRevocationListDer;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the CRL {}", path.display()))?;
    let crls = if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("invalid PEM CRL in {}", path.display()))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    anyhow::ensure!(!crls.is_empty(), "{}: no CRL found", path.display());
    Ok(crls)
}

/// Why a certificate and a key were refused together.
fn not_an_identity(cert: &Path, key: &Path) -> String {
    let (cert, key) = (cert.display(), key.display());
    format!("{cert} and {key} do not form a usable identity")
}

fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    Ok(roots)
}

/// The gateway's TLS side: its identity, the CA its agents' certificates must chain to, and
/// the revocation list they are checked against.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The same verifier the acceptor uses: a reload re-checks connected agents' certificates
    /// with the new one (a CRL that now revokes them, a CA that no longer issues them).
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// The sessions kept for resumption (empty when it is off).
    sessions: Arc<SessionCache>,
}

impl ServerTls {
    /// Sessions kept for resumption now, and the heap they hold.
    pub fn sessions(&self) -> SessionFigures {
        self.sessions.figures()
    }

    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        crl: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(load_roots(client_ca)?),
            provider(),
        );
        if let Some(crl) = crl {
            // Only the agents' own certificates are looked up: the CRL comes from the CA that
            // issued them (`sallyport cert revoke`), and a certificate it does not cover is
            // refused (unknown status), so a CRL of another CA cannot pass everything.
            builder = builder
                .with_crls(load_crls(crl)?)
                .only_check_end_entity_revocation();
        }
        // The builder parses the CRLs: a broken file is refused here, by name.
        let verifier = builder.build().map_err(|e| match crl {
            Some(crl) => anyhow::anyhow!("{}: not a usable CRL: {e}", crl.display()),
            None => anyhow::anyhow!("cannot build the client certificate verifier: {e}"),
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 unavailable")?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(load_certs(cert)?, load_key(key)?)
            .with_context(|| not_an_identity(cert, key))?;
        // Stateful tickets: the session (with the agent's certificate chain) stays in this
        // process's memory, never in a ticket the agent could carry to another config. A reload
        // builds a new config, so a new CA or CRL also starts with an empty cache.
        let sessions = Arc::new(SessionCache::new(SERVER_SESSIONS));
        if resumption_enabled() {
            config.session_storage = sessions.clone();
        } else {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            verifier,
            sessions,
        })
    }

    /// Checks an agent's certificate chain (leaf first) as a new handshake would now: `Err`
    /// says why it would be refused (revoked, expired, unknown issuer).
    pub fn verify_client(&self, chain: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let now = rustls::pki_types::UnixTime::now();
        self.verifier
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
    }

    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        Ok(Stream::ServerTls(Box::new(
            self.acceptor.accept(tcp).await?,
        )))
    }
}

/// What a [`SessionCache`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionFigures {
    pub entries: usize,
    /// Keys and values plus [`SessionCache::OVERHEAD`] per entry: an estimate of the heap held.
    pub bytes: usize,
}

/// The gateway's store of TLS 1.3 sessions for resumption: at most `capacity` entries, the
/// oldest dropped first (as rustls's own `ServerSessionMemoryCache`), each ticket usable once
/// (`take`). Counted, so `/metrics` shows what it holds and bench/soak's leak check can tell
/// this bounded cache filling up from a leak.
#[derive(Debug)]
pub struct SessionCache {
    capacity: usize,
    inner: parking_lot::Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    map: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in insertion order; may name keys already taken (skipped when evicting).
    order: std::collections::VecDeque<Vec<u8>>,
    bytes: usize,
}

impl SessionCache {
    /// Bookkeeping per entry beyond its key and value: the map's slot, the order queue's copy
    /// of the key, allocator headers.
    pub const OVERHEAD: usize = 160;

    pub fn new(capacity: usize) -> Self {
        SessionCache {
            capacity,
            inner: parking_lot::Mutex::new(Sessions::default()),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Sessions> {
        self.inner.lock()
    }

    pub fn figures(&self) -> SessionFigures {
        let s = self.lock();
        SessionFigures {
            entries: s.map.len(),
            bytes: s.bytes,
        }
    }
}

fn entry_size(key: &[u8], value: &[u8]) -> usize {
    2 * key.len() + value.len() + SessionCache::OVERHEAD
}

impl rustls::server::StoresServerSessions for SessionCache {
    fn put(&self, mut key: Vec<u8>, mut value: Vec<u8>) -> bool {
        if self.capacity == 0 {
            return false;
        }
        // rustls encodes a session into a Vec grown by doubling: kept as is, a 0.5 KiB session
        // would hold 1 KiB of heap.
        key.shrink_to_fit();
        value.shrink_to_fit();
        let mut s = self.lock();
        let size = entry_size(&key, &value);
        match s.map.insert(key.clone(), value) {
            Some(old) => s.bytes -= entry_size(&key, &old),
            None => s.order.push_back(key),
        }
        s.bytes += size;
        while s.map.len() > self.capacity {
            let Some(oldest) = s.order.pop_front() else {
                break;
            };
            if let Some(old) = s.map.remove(&oldest) {
                s.bytes -= entry_size(&oldest, &old);
            }
        }
        // Taken keys leave stale names in `order`: keep it from outgrowing the map.
        if s.order.len() > 2 * self.capacity.max(1) {
            let Sessions { map, order, .. } = &mut *s;
            order.retain(|k| map.contains_key(k));
        }
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().map.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut s = self.lock();
        let value = s.map.remove(key)?;
        s.bytes -= entry_size(key, &value);
        Some(value)
    }

    fn can_cache(&self) -> bool {
        self.capacity > 0
    }
}

/// The agent's TLS side: its identity and the CA the gateway's certificate must chain to.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    /// Name to verify instead of the host in the gateway address.
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 unavailable")?
            .with_root_certificates(load_roots(ca)?)
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .with_context(|| not_an_identity(cert, key))?;
        if !resumption_enabled() {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_string())
                    .with_context(|| format!("invalid TLS server name \"{n}\""))
            })
            .transpose()?;
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name to verify for a gateway dialed as `host:port`.
    pub fn name_for(&self, gateway: &str) -> io::Result<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = host_of(gateway);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid TLS server name \"{host}\""),
            )
        })
    }

    pub async fn connect(&self, name: ServerName<'static>, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self.connector.connect(name, Sniff::new(tcp)).await?;
        Ok(Stream::ClientTls(Box::new(tls)))
    }
}

#[cfg(test)]
mod tests;
