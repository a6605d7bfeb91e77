//! Reading a client's first bytes to learn the host name it wants, for listeners that share a
//! public port by host name (`hostnames` in agent.toml).
//!
//! Rules:
//! - A first byte of `0x16` (a TLS handshake record) means TLS: the ClientHello is read with
//!   rustls' [`Acceptor`] (the TLS library the gateway already trusts with its control port) and
//!   its SNI is the name. The session itself is never terminated: the bytes go on unchanged.
//! - Anything else is taken for an HTTP/1 request head, parsed with `httparse` (hyper's parser);
//!   its `Host` header (without a port) is the name.
//! - At most [`PEEK_LIMIT`] bytes are looked at; a hello or head not complete within them, or
//!   bytes that are neither, are [`Peeked::Garbage`]. A ClientHello or head without a name
//!   (no SNI, an HTTP/1.0 request without Host) is [`Peeked::Unnamed`]: the port's default.
//! - Names are compared in one form ([`normalize`]): lowercase, no trailing dot.
//!
//! It never allocates more than the bytes it is given, never blocks and never panics on any
//! input (fuzzed: `fuzz/fuzz_targets/peek.rs`).

use rustls::server::Acceptor;

/// The most client bytes read before the name must be known: a ClientHello with post-quantum
/// key shares is about 1.8 KiB, the largest real ones (many extensions, session tickets) stay
/// under 16 KiB, and so do request heads.
pub const PEEK_LIMIT: usize = 16 * 1024;

/// Headers an HTTP request head may have before its Host is looked for (more: garbage).
const MAX_HEADERS: usize = 128;

/// What a client's first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A complete TLS ClientHello or HTTP/1 request head naming this host (normalized).
    Named(String),
    /// A complete ClientHello or request head that names no host.
    Unnamed,
    /// Neither TLS nor HTTP/1, or not complete within [`PEEK_LIMIT`]; why, for the log.
    Garbage(&'static str),
}

/// Classifies a client's first bytes (all of them so far).
pub fn classify(bytes: &[u8]) -> Peeked {
    let verdict = match bytes.first() {
        None => Peeked::NeedMore,
        Some(0x16) => tls_server_name(bytes),
        Some(_) => http_host(bytes),
    };
    match verdict {
        Peeked::NeedMore if bytes.len() >= PEEK_LIMIT => {
            Peeked::Garbage("no complete TLS ClientHello or HTTP request head within 16 KiB")
        }
        v => v,
    }
}

/// The SNI of a TLS ClientHello (which may span several records). Bytes are fed as the
/// acceptor takes them, and it is asked after each feed, so what follows a complete hello is
/// never read.
fn tls_server_name(bytes: &[u8]) -> Peeked {
    let mut acceptor = Acceptor::default();
    let mut rest = &bytes[..bytes.len().min(PEEK_LIMIT)];
    loop {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => return Peeked::NeedMore,
            Ok(_) => {}
            Err(_) => return Peeked::Garbage("not a TLS ClientHello"),
        }
        match acceptor.accept() {
            Ok(None) if rest.is_empty() => return Peeked::NeedMore,
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                return match accepted.client_hello().server_name() {
                    Some(name) => named(name),
                    None => Peeked::Unnamed,
                }
            }
            Err(_) => return Peeked::Garbage("not a TLS ClientHello"),
        }
    }
}

/// The Host of an HTTP/1 request head.
fn http_host(bytes: &[u8]) -> Peeked {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => Peeked::NeedMore,
        Err(_) => Peeked::Garbage("neither TLS nor an HTTP/1 request"),
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| h.value);
            match host.map(std::str::from_utf8) {
                None => Peeked::Unnamed,
                Some(Ok(host)) => match strip_port(host.trim()) {
                    "" => Peeked::Unnamed,
                    host => named(host),
                },
                Some(Err(_)) => Peeked::Garbage("an HTTP Host header that is not text"),
            }
        }
    }
}

fn named(name: &str) -> Peeked {
    match normalize(name) {
        n if n.is_empty() => Peeked::Unnamed,
        n => Peeked::Named(n),
    }
}

/// `host:port` -> `host`; `[v6]:port` -> `[v6]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The form names are compared in: ASCII lowercase, without a trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The name a probe (`sallyport check`) sends to reach the listener serving `hostnames`: its
/// first exact name, else a name under its first wildcard, else one only `"*"` serves.
pub fn probe_name(hostnames: &[String]) -> String {
    let exact = hostnames.iter().find(|n| !n.starts_with('*'));
    let wildcard = hostnames.iter().find_map(|n| n.strip_prefix("*."));
    match (exact, wildcard) {
        (Some(name), _) => name.clone(),
        (None, Some(suffix)) => format!("sallyport-check.{suffix}"),
        (None, None) => "sallyport-check.invalid".to_string(),
    }
}

/// A real TLS ClientHello (rustls' own client) naming `name`: what a probe sends through a
/// shared port. A TLS backend answers it with its ServerHello, a plain HTTP one with an error
/// page: an answer either way. `None` if `name` cannot be an SNI.
pub fn client_hello(name: &str) -> Option<Vec<u8>> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).ok()?;
    let mut out = Vec::new();
    conn.write_tls(&mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(name: &str) -> Vec<u8> {
        super::client_hello(name).unwrap()
    }

    #[test]
    fn a_probe_names_a_host_its_listener_serves() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(probe_name(&names(&["*.a.org", "b.org"])), "b.org");
        assert_eq!(
            probe_name(&names(&["*", "*.a.org"])),
            "sallyport-check.a.org"
        );
        assert_eq!(probe_name(&names(&["*"])), "sallyport-check.invalid");
        let hello = client_hello(&probe_name(&names(&["*.a.org"])));
        assert_eq!(
            classify(&hello),
            Peeked::Named("sallyport-check.a.org".into())
        );
    }

    #[test]
    fn tls_names_its_sni_once_the_hello_is_whole() {
        let hello = client_hello("Files.Example.COM");
        assert_eq!(classify(&hello), Peeked::Named("files.example.com".into()));
        for cut in [1, 5, 6, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), Peeked::NeedMore, "cut at {cut}");
        }
        // An IP address is never sent as SNI: no name.
        assert_eq!(classify(&client_hello("127.0.0.1")), Peeked::Unnamed);
    }

    #[test]
    fn http_names_its_host_without_the_port() {
        let head = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: Web.Example.org.:8080\r\n\r\n";
        assert_eq!(classify(head), Peeked::Named("web.example.org".into()));
        assert_eq!(classify(&head[..20]), Peeked::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.0\r\n\r\n"), Peeked::Unnamed);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Peeked::Named("[::1]".into())
        );
    }

    #[test]
    fn garbage_and_endless_heads_are_refused() {
        assert!(matches!(
            classify(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Peeked::Garbage(_)
        ));
        assert!(matches!(
            classify(&[0x16, 0x99, 0, 0, 1, 0]),
            Peeked::Garbage(_)
        ));
        let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
        endless.resize(PEEK_LIMIT, b'a');
        assert!(matches!(classify(&endless), Peeked::Garbage(_)));
        assert_eq!(classify(&endless[..PEEK_LIMIT - 1]), Peeked::NeedMore);
    }
}
