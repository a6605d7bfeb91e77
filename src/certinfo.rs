//! What Sallyport reads from a certificate: the sites an agent certificate is bound to, its
//! name, its serial number and when it expires.
//!
//! A site is bound with a URI subject alternative name `sallyport:site:SITE`, which
//! `sallyport cert issue --agent NAME --site SITE` writes. A certificate with no such name is
//! bound to no site (every certificate issued before site binding existed); the gateway's
//! `[control] tls.site_binding` decides whether it may still serve one.
//!
//! This module only parses; it never decides. A certificate it cannot parse is an error, never
//! "bound to no site".

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The URI prefix of a site binding.
pub const SITE_URI_PREFIX: &str = "sallyport:site:";

/// Expiry closer than this is warned about (status, `sallyport check`, the log at start).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// The parts of a certificate Sallyport uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// Sites this certificate is bound to (`sallyport:site:SITE` URIs); empty: none.
    pub sites: Vec<String>,
    /// The serial number, as `aa:bb:...` hex.
    pub serial: String,
    /// The serial number's bytes (a CRL entry names them).
    pub serial_bytes: Vec<u8>,
    /// DNS names and IP addresses (subject alternative names), in their order.
    pub names: Vec<String>,
    /// Whether it is a server (gateway) certificate: extended key usage serverAuth.
    pub server: bool,
    /// The end of its validity, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not a readable X.509 certificate: {e}"))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let mut sites = Vec::new();
        let mut names = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::URI(uri) => {
                    if let Some(site) = uri.strip_prefix(SITE_URI_PREFIX) {
                        sites.push(site.to_string());
                    }
                }
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                // 4 bytes are an IPv4 address, 16 an IPv6 one; any other length is skipped.
                GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        names.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
        let server = cert
            .extended_key_usage()
            .ok()
            .flatten()
            .is_some_and(|eku| eku.value.server_auth);
        Ok(CertInfo {
            common_name,
            sites,
            serial: cert.raw_serial_as_string(),
            serial_bytes: cert.raw_serial().to_vec(),
            names,
            server,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// The first certificate of a PEM file (a leaf before its chain).
    pub fn from_pem_file(path: &Path) -> anyhow::Result<CertInfo> {
        let der = CertificateDer::from_pem_file(path)
            .with_context(|| format!("cannot read a certificate from {}", path.display()))?;
        CertInfo::parse(der.as_ref()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Seconds from `now` to the end of its validity (negative once expired).
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        self.not_after - now
    }

    /// Whether it may serve `site`: bound to it, or (`None`) bound to no site at all.
    pub fn serves(&self, site: &str) -> Option<bool> {
        if self.sites.is_empty() {
            None
        } else {
            Some(self.sites.iter().any(|s| s == site))
        }
    }
}

/// A certificate as the status shows it (`/api/status`, `sallyport status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertView {
    /// Its common name.
    pub subject: String,
    pub serial: String,
    /// Sites it is bound to (agent certificates issued with `--site`).
    #[serde(default)]
    pub sites: Vec<String>,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// Seconds from now to `not_after` (negative once expired).
    pub expires_in_seconds: i64,
    /// Set when it expires within 30 days (or has): what to do.
    #[serde(default)]
    pub warning: Option<String>,
}

impl CertView {
    pub fn of(info: &CertInfo, now: SystemTime) -> CertView {
        let left = info.seconds_left(now);
        CertView {
            subject: info.common_name.clone().unwrap_or_default(),
            serial: info.serial.clone(),
            sites: info.sites.clone(),
            not_after: info.not_after,
            expires_in_seconds: left,
            warning: expiry_warns(left).then(|| {
                format!(
                    "certificate \"{}\" {}: renew it (sallyport cert renew)",
                    info.common_name.as_deref().unwrap_or("?"),
                    describe_expiry(left)
                )
            }),
        }
    }

    /// Of a DER certificate; `None` if it does not parse.
    pub fn of_der(der: &[u8]) -> Option<CertView> {
        CertInfo::parse(der)
            .ok()
            .map(|info| CertView::of(&info, SystemTime::now()))
    }
}

/// "expires in 12 days" / "EXPIRED 3 days ago", for people.
pub fn describe_expiry(seconds_left: i64) -> String {
    let days = seconds_left.abs() / 86_400;
    let hours = (seconds_left.abs() % 86_400) / 3600;
    let span = if days > 0 {
        format!("{days} day(s)")
    } else {
        format!("{hours} hour(s)")
    };
    if seconds_left < 0 {
        format!("EXPIRED {span} ago")
    } else {
        format!("expires in {span}")
    }
}

/// Whether `seconds_left` deserves a warning (under [`EXPIRY_WARNING`], or expired).
pub fn expiry_warns(seconds_left: i64) -> bool {
    seconds_left < EXPIRY_WARNING.as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge-1");
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_site_binding_and_the_name() {
        let uri = rcgen::SanType::URI("sallyport:site:acme".try_into().unwrap());
        let other = rcgen::SanType::URI("https://example.org/".try_into().unwrap());
        let info = CertInfo::parse(&leaf(vec![other, uri])).unwrap();
        assert_eq!(info.sites, vec!["acme".to_string()]);
        assert_eq!(info.common_name.as_deref(), Some("edge-1"));
        assert_eq!(info.serves("acme"), Some(true));
        assert_eq!(info.serves("other"), Some(false));
        assert!(info.seconds_left(SystemTime::now()) > 0);
    }

    #[test]
    fn no_site_uri_is_no_binding_and_garbage_is_an_error() {
        let dns = rcgen::SanType::DnsName("edge-1".try_into().unwrap());
        let info = CertInfo::parse(&leaf(vec![dns])).unwrap();
        assert!(info.sites.is_empty());
        assert_eq!(info.serves("acme"), None);
        assert!(CertInfo::parse(b"not a certificate").is_err());
    }

    #[test]
    fn expiry_words() {
        assert_eq!(describe_expiry(10 * 86_400 + 5), "expires in 10 day(s)");
        assert_eq!(describe_expiry(-2 * 86_400), "EXPIRED 2 day(s) ago");
        assert_eq!(describe_expiry(7200), "expires in 2 hour(s)");
        assert!(expiry_warns(10 * 86_400));
        assert!(!expiry_warns(90 * 86_400));
    }
}
