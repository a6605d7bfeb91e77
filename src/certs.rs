//! `sallyport cert init` and `sallyport cert issue`: a private CA and the gateway and agent
//! certificates for mutual TLS.
//!
//! This file holds the CA and leaf-certificate pieces and `cert issue`; `cert init` is in
//! `certs/init.rs`, `cert renew` and `cert revoke` in `certs/lifecycle.rs`.
//!
//! The CA is kept in `DIR/ca.crt` / `DIR/ca.key`. `cert init` makes it (or reuses it) with one
//! gateway certificate (`gateway.crt`) and one agent certificate (`agent.crt`); `cert issue`
//! signs one more certificate with the CA already there: `--gateway NAME[,NAME|IP...]` (a
//! second gateway, or a gateway's new names) or `--agent NAME`, as `DIR/NAME.crt` and
//! `DIR/NAME.key`.
//!
//! What it must never do: replace the CA without `--new-ca` (a new CA invalidates every
//! certificate the old one issued, on every host); overwrite a file without `--force`; keep a
//! file silently when the operator asked for something else (a gateway certificate for other
//! names is an error that says what to run). Every run says which files it wrote, replaced or
//! kept. Nothing is written until every decision is made, so a refused run changes nothing.
//! Private keys are written with mode 0600.
//!
//! Lifecycle: `cert renew --dir DIR --name NAME` replaces `NAME.crt` / `NAME.key` with a new key
//! and certificate for the same names, site and role; `cert revoke` adds a certificate to
//! `DIR/crl.pem`, signed by the CA, which gateways load as `[control] tls.crl`. An agent
//! certificate carries its site (`--site`, a `sallyport:site:SITE` URI: see
//! [`crate::certinfo`]).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::config::check_name;

mod init;
mod lifecycle;

pub use init::init;
pub use lifecycle::{renew, revoke, Revoke, CRL_FILE};

/// What `cert init` should make.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    /// DNS names for the gateway certificate.
    pub gateway_names: Vec<String>,
    /// IP addresses for the gateway certificate.
    pub gateway_ips: Vec<IpAddr>,
    /// Extra agent certificates, each as `NAME.crt` / `NAME.key`.
    pub agent_names: Vec<String>,
    /// The site the agent certificates this run makes are bound to (`None`: no site).
    pub site: Option<String>,
    /// Validity of issued (non-CA) certificates.
    pub days: u32,
    /// Replace the gateway and agent certificates this command makes (the CA is kept).
    pub force: bool,
    /// Replace the CA too, and with it the gateway and agent certificates.
    pub new_ca: bool,
}

/// Whom a certificate from `cert issue` is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A gateway, valid for these DNS names and IP addresses (agents check the one they dial),
    /// in this order; the first one names the files.
    Gateway { names: Vec<String> },
    /// An agent (a client certificate), named in gateway logs by its common name, bound to
    /// `site` when given (the gateway then refuses it for any other site).
    Agent { name: String, site: Option<String> },
}

/// What `cert issue` should make.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub dir: PathBuf,
    pub subject: Subject,
    pub days: u32,
    /// Replace `NAME.crt` / `NAME.key` if they exist.
    pub force: bool,
}

const CA_COMMON_NAME: &str = "Sallyport private CA";
const CA_YEARS: i64 = 10;
/// File stems `cert issue` must not write: the CA's own files.
const RESERVED_STEMS: [&str; 1] = ["ca"];

/// A new CA's parameters. Its name carries a random suffix, so two installations' CAs never
/// share a subject and a foreign certificate fails as "unknown issuer".
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sallyport");
    let suffix: u32 = rand::random();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{CA_COMMON_NAME} {suffix:08x}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365 * CA_YEARS);
    Ok(params)
}

fn leaf_params(
    common_name: &str,
    sans: Vec<String>,
    sites: &[String],
    server: bool,
    days: u32,
) -> anyhow::Result<CertificateParams> {
    let mut params =
        CertificateParams::new(sans).with_context(|| format!("invalid name for {common_name}"))?;
    for site in sites {
        let uri = format!("{}{site}", crate::certinfo::SITE_URI_PREFIX);
        let uri = uri
            .try_into()
            .map_err(|_| anyhow::anyhow!("invalid site name \"{site}\""))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sallyport");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days as i64);
    Ok(params)
}

/// Writes a file (replacing it if there is one: the caller decided). Keys get mode 0600.
fn write_file(path: &Path, content: &str, private: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if private {
        // `mode` applies only to new files; a replaced one is tightened here.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(content.as_bytes())?;
    Ok(())
}

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// Loads the CA from `dir`: any CA certificate with a key rcgen can sign with, including one
/// the operator brings.
fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    let key_path = dir.join("ca.key");
    let pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&pem)
        .with_context(|| format!("{}: not a private key", key_path.display()))?;
    let cert_path = dir.join("ca.crt");
    let cert_pem = std::fs::read_to_string(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    // Rebuilding the CA from its own certificate keeps its subject and key identifier, so what
    // it issues now chains to the ca.crt agents and gateways already have.
    let params = CertificateParams::from_ca_cert_pem(&cert_pem)
        .with_context(|| format!("{}: not a usable CA certificate", cert_path.display()))?;
    let cert = params.self_signed(&key)?;
    Ok(Ca { cert, key })
}

fn new_ca() -> anyhow::Result<Ca> {
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// A certificate to sign and where it goes.
struct Leaf {
    stem: String,
    common_name: String,
    sans: Vec<String>,
    /// Sites an agent certificate is bound to (a `sallyport:site:SITE` URI each).
    sites: Vec<String>,
    server: bool,
}

impl Leaf {
    fn gateway(stem: &str, names: &[String], ips: &[IpAddr]) -> Leaf {
        let sans: Vec<String> = names
            .iter()
            .cloned()
            .chain(ips.iter().map(IpAddr::to_string))
            .collect();
        Leaf {
            stem: stem.to_string(),
            common_name: sans[0].clone(),
            sans,
            sites: Vec::new(),
            server: true,
        }
    }

    fn agent(name: &str, site: Option<&str>) -> Leaf {
        Leaf {
            stem: name.to_string(),
            common_name: name.to_string(),
            sans: vec![name.to_string()],
            sites: site.map(str::to_string).into_iter().collect(),
            server: false,
        }
    }

    fn files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{}.crt", self.stem)),
            dir.join(format!("{}.key", self.stem)),
        )
    }

    fn exists(&self, dir: &Path) -> bool {
        let (crt, key) = self.files(dir);
        crt.exists() || key.exists()
    }

    /// Signs a new key and writes both files.
    fn write(&self, ca: &Ca, dir: &Path, days: u32) -> anyhow::Result<time::OffsetDateTime> {
        let params = leaf_params(
            &self.common_name,
            self.sans.clone(),
            &self.sites,
            self.server,
            days,
        )?;
        let until = params.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
        let (crt, key_path) = self.files(dir);
        write_file(&crt, &cert.pem(), false)?;
        write_file(&key_path, &key.serialize_pem(), true)?;
        Ok(until)
    }

    /// What to tell the operator about it.
    fn role(&self) -> String {
        if self.server {
            format!(
                "gateway certificate, valid for {}: copy both to that gateway",
                self.sans.join(", ")
            )
        } else {
            let site = match self.sites.first() {
                Some(site) => format!(" for site \"{site}\" only"),
                None => " (bound to no site)".to_string(),
            };
            format!(
                "agent certificate \"{}\"{site}: copy both to that agent's host",
                self.common_name
            )
        }
    }
}

/// The names and addresses an existing certificate is valid for.
fn sans_of(path: &Path) -> anyhow::Result<Vec<String>> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let params = CertificateParams::from_ca_cert_pem(&pem)
        .with_context(|| format!("{}: not a certificate", path.display()))?;
    Ok(params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::DnsName(n) => n.to_string(),
            SanType::IpAddress(ip) => ip.to_string(),
            other => format!("{other:?}"),
        })
        .collect())
}

fn date(t: time::OffsetDateTime) -> String {
    format!("{}-{:02}-{:02}", t.year(), t.month() as u8, t.day())
}

/// The report of one run: one line per pair of files.
#[derive(Default)]
struct Report(String);

impl Report {
    fn line(&mut self, verb: &str, files: (&Path, &Path), what: impl std::fmt::Display) {
        let _ = writeln!(
            self.0,
            "{verb:<9}{}, {}: {what}",
            files.0.display(),
            files.1.display()
        );
    }
}

/// `*.crt` files in `dir` other than the CA's and the ones just written.
fn other_certificates(
    dir: &Path,
    gateway: &Option<Leaf>,
    agents: &[Leaf],
) -> anyhow::Result<Vec<String>> {
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".crt") else {
            continue;
        };
        let written = stem == "ca"
            || gateway.as_ref().is_some_and(|g| g.stem == stem)
            || agents.iter().any(|a| a.stem == stem);
        if !written {
            others.push(name);
        }
    }
    others.sort();
    Ok(others)
}

/// `cert issue`: one more gateway or agent certificate from the CA in `dir`.
pub fn issue(opts: &IssueOptions) -> anyhow::Result<String> {
    let dir = &opts.dir;
    let leaf = match &opts.subject {
        Subject::Gateway { names } => {
            let mut dns = Vec::new();
            let mut ips = Vec::new();
            for n in names {
                match n.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => {
                        check_dns_name(n).map_err(|e| anyhow::anyhow!("--gateway: {e}"))?;
                        dns.push(n.clone());
                    }
                }
            }
            let stem = match names.first() {
                Some(n) if n.contains('*') => bail!(
                    "--gateway: the first name names the files and cannot be a wildcard (\"{n}\"): \
                     put a plain name first"
                ),
                Some(n) => n.clone(),
                None => bail!("--gateway: at least one name or address"),
            };
            Leaf::gateway(&stem, &dns, &ips)
        }
        Subject::Agent { name, site } => {
            check_agent_name(name).map_err(|e| anyhow::anyhow!("--agent: {e}"))?;
            if let Some(site) = site {
                check_name(site).map_err(|e| anyhow::anyhow!("--site: invalid site name {e}"))?;
            }
            Leaf::agent(name, site.as_deref())
        }
    };
    anyhow::ensure!(
        !RESERVED_STEMS.contains(&leaf.stem.as_str()),
        "\"{}\" would overwrite the CA's files",
        leaf.stem
    );
    if !dir.join("ca.key").exists() {
        bail!(
            "no CA in {}: {} is missing (run `sallyport cert init --dir {}` first, or issue on \
             the host that keeps the CA)",
            dir.display(),
            dir.join("ca.key").display(),
            dir.display()
        );
    }
    let existed = leaf.exists(dir);
    if existed && !opts.force {
        bail!(
            "{} already exists: nothing was written (add --force to replace it with a new key; \
             the old certificate stays valid until it expires, as the CA is kept)",
            leaf.files(dir).0.display()
        );
    }
    let ca = load_ca(dir)?;
    let until = leaf.write(&ca, dir, opts.days)?;
    let mut report = Report::default();
    report.line(
        "kept",
        (&dir.join("ca.crt"), &dir.join("ca.key")),
        "the private CA that signed it",
    );
    let (crt, key) = leaf.files(dir);
    report.line(
        if existed { "replaced" } else { "wrote" },
        (&crt, &key),
        format!("{} (until {})", leaf.role(), date(until)),
    );
    let mut out = report.0;
    let (crt, key) = (format!("{}.crt", leaf.stem), format!("{}.key", leaf.stem));
    if leaf.server {
        writeln!(
            out,
            "\nThen configure that gateway:  [control] tls = {{ cert = \"{crt}\", key = \"{key}\", client_ca = \"ca.crt\" }}"
        )?;
    } else {
        writeln!(
            out,
            "\nThen configure that agent:  tls = {{ ca = \"ca.crt\", cert = \"{crt}\", key = \"{key}\" }}"
        )?;
        match leaf.sites.first() {
            Some(site) => writeln!(
                out,
                "It serves site \"{site}\" only (agent.toml: site = \"{site}\"); gateways refuse it for any other site."
            )?,
            None => writeln!(
                out,
                "NOTE: bound to no site (no --site): gateways with [control] tls.site_binding = \"required\" refuse it."
            )?,
        }
    }
    Ok(out)
}

/// An agent name: a file stem and a certificate name (the config's name rules).
fn check_agent_name(name: &str) -> Result<(), String> {
    check_name(name)?;
    if RESERVED_STEMS.contains(&name) {
        return Err(format!("\"{name}\" would overwrite the CA's files"));
    }
    Ok(())
}

/// A DNS name for a gateway certificate (a leading `*.` wildcard allowed), also safe as a file
/// name.
fn check_dns_name(name: &str) -> Result<(), String> {
    let plain = name.strip_prefix("*.").unwrap_or(name);
    let ok = !plain.is_empty()
        && name.len() <= 253
        && plain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a DNS name (letters, digits and '-' in dot-separated labels)"
        ))
    }
}

#[cfg(test)]
mod tests;
