//! `sallyport cert init` and `sallyport cert issue`: a private CA and the gateway and agent
//! certificates for mutual TLS.
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

/// `cert init`: makes the CA (or reuses the one in `dir`), the gateway certificate and agent
/// certificates. Returns the report: what it wrote, replaced or kept, and what to copy where.
/// Everything is decided (and refused) before anything is written.
pub fn init(opts: &InitOptions) -> anyhow::Result<String> {
    let dir = &opts.dir;
    check_init_names(opts)?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca_exists = ca_key.exists();
    check_ca_files(opts, &ca_crt, &ca_key, ca_exists)?;
    let fresh_ca = !ca_exists || opts.new_ca;
    // Everything this run issues is replaced when the CA is new: the old files would no longer
    // chain to it.
    let replace = opts.force || opts.new_ca;
    let plan = GatewayPlan::decide(opts, replace)?;
    let agents = plan_agents(opts, fresh_ca, replace)?;

    // Now write.
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut report = Report::default();
    let ca = write_or_keep_ca(&mut report, dir, fresh_ca, ca_exists)?;
    plan.write(&mut report, &ca, opts)?;
    for leaf in &agents {
        let verb = if leaf.exists(dir) {
            "replaced"
        } else {
            "wrote"
        };
        let until = leaf.write(&ca, dir, opts.days)?;
        report.line(
            verb,
            (&leaf.files(dir).0, &leaf.files(dir).1),
            format!("{} (until {})", leaf.role(), date(until)),
        );
    }
    if !agents.iter().any(|a| a.stem == "agent") && dir.join("agent.crt").exists() {
        report.line(
            "kept",
            (&dir.join("agent.crt"), &dir.join("agent.key")),
            "the agent certificate",
        );
    }
    if opts.new_ca && ca_exists {
        let issued: Vec<String> = other_certificates(dir, &plan.leaf, &agents)?;
        if !issued.is_empty() {
            let _ = writeln!(
                report.0,
                "         NOTE: issued by the old CA, no longer valid: {} (reissue each with \
                 `sallyport cert issue`)",
                issued.join(", ")
            );
        }
    }
    let agent = agents.first().map(|a| a.stem.as_str()).unwrap_or("agent");
    then_configure(report.0, opts, agent)
}

/// `cert init`'s names: agents (never "gateway", whose files they would overwrite), the site,
/// the gateway's DNS names.
fn check_init_names(opts: &InitOptions) -> anyhow::Result<()> {
    for name in &opts.agent_names {
        check_agent_name(name).map_err(|e| anyhow::anyhow!("--agent-name: {e}"))?;
        anyhow::ensure!(
            name != "gateway",
            "--agent-name: \"gateway\" would overwrite the gateway's files"
        );
    }
    if let Some(site) = &opts.site {
        check_name(site).map_err(|e| anyhow::anyhow!("--site: invalid site name {e}"))?;
    }
    for name in &opts.gateway_names {
        check_dns_name(name).map_err(|e| anyhow::anyhow!("--gateway-name: {e}"))?;
    }
    Ok(())
}

/// Refuses a CA certificate without its key, and certificates whose CA is missing, unless a
/// new CA is asked for.
fn check_ca_files(
    opts: &InitOptions,
    ca_crt: &Path,
    ca_key: &Path,
    ca_exists: bool,
) -> anyhow::Result<()> {
    if !ca_exists && ca_crt.exists() && !opts.new_ca {
        bail!(
            "{} exists without {}: bring the CA's key, or make a new CA with --new-ca (every \
             certificate the old one issued stops working)",
            ca_crt.display(),
            ca_key.display()
        );
    }
    if !ca_exists && !opts.new_ca && !opts.force {
        if let Some(orphan) = ["gateway.crt", "agent.crt"]
            .iter()
            .map(|f| opts.dir.join(f))
            .find(|p| p.exists())
        {
            bail!(
                "{} exists but {} does not: nothing was written (bring the CA that issued it,                  or add --force to make a new CA and replace it)",
                orphan.display(),
                ca_key.display()
            );
        }
    }
    Ok(())
}

/// What `cert init` does with the gateway certificate: `leaf` to write, or `None` to keep the
/// one there (valid for `existing_sans`).
struct GatewayPlan {
    leaf: Option<Leaf>,
    existing_sans: Option<Vec<String>>,
    /// Names or addresses were given on the command line.
    asked: bool,
}

impl GatewayPlan {
    /// Decides about the gateway certificate before anything is written: an existing one is
    /// kept unless `replace`, and refused when it is valid for other names than those asked.
    fn decide(opts: &InitOptions, replace: bool) -> anyhow::Result<GatewayPlan> {
        let dir = &opts.dir;
        let asked = !opts.gateway_names.is_empty() || !opts.gateway_ips.is_empty();
        let gateway_crt = dir.join("gateway.crt");
        let existing_sans = if gateway_crt.exists() {
            Some(sans_of(&gateway_crt)?)
        } else {
            None
        };
        let gateway = match (&existing_sans, replace) {
            (Some(sans), false) => {
                if asked {
                    let mut want: Vec<String> = opts.gateway_names.clone();
                    want.extend(opts.gateway_ips.iter().map(IpAddr::to_string));
                    let (mut a, mut b) = (want.clone(), sans.clone());
                    a.sort();
                    b.sort();
                    if a != b {
                        bail!(
                            "{} exists and is valid for {}, not for {}: nothing was written.\n  \
                             To replace it (the CA is kept): add --force.\n  \
                             For a second gateway: sallyport cert issue --dir {} --gateway {}",
                            gateway_crt.display(),
                            sans.join(", "),
                            want.join(", "),
                            dir.display(),
                            want.join(",")
                        );
                    }
                }
                None
            }
            // Rotating without new names keeps the names the certificate had.
            (Some(sans), true) if !asked => Some(Leaf {
                stem: "gateway".into(),
                common_name: sans.first().cloned().unwrap_or_else(|| "gateway".into()),
                sans: sans.clone(),
                sites: Vec::new(),
                server: true,
            }),
            _ if asked => Some(Leaf::gateway(
                "gateway",
                &opts.gateway_names,
                &opts.gateway_ips,
            )),
            _ => Some(Leaf::gateway(
                "gateway",
                &["localhost".to_string()],
                &["127.0.0.1".parse()?, "::1".parse()?],
            )),
        };
        Ok(GatewayPlan {
            leaf: gateway,
            existing_sans,
            asked,
        })
    }

    /// Writes the planned certificate, or reports the one kept.
    fn write(&self, report: &mut Report, ca: &Ca, opts: &InitOptions) -> anyhow::Result<()> {
        let dir = &opts.dir;
        let Some(leaf) = &self.leaf else {
            let sans = self.existing_sans.clone().unwrap_or_default();
            report.line(
                "kept",
                (&dir.join("gateway.crt"), &dir.join("gateway.key")),
                format!(
                    "the gateway certificate, valid for {} (--force replaces it)",
                    sans.join(", ")
                ),
            );
            return Ok(());
        };
        let verb = if leaf.exists(dir) {
            "replaced"
        } else {
            "wrote"
        };
        let until = leaf.write(ca, dir, opts.days)?;
        report.line(
            verb,
            (&leaf.files(dir).0, &leaf.files(dir).1),
            format!("{} (until {})", leaf.role(), date(until)),
        );
        if !self.asked && self.existing_sans.is_none() {
            report
                .0
                .push_str("         NOTE: no --gateway-name/--gateway-ip given: the gateway certificate only suits local tests\n");
        }
        Ok(())
    }
}

/// Agents: the default "agent" with a new CA or a rotation, and every name asked for; an
/// existing one is refused unless `replace`.
fn plan_agents(opts: &InitOptions, fresh_ca: bool, replace: bool) -> anyhow::Result<Vec<Leaf>> {
    let mut agents: Vec<Leaf> = Vec::new();
    if fresh_ca || (opts.force && opts.agent_names.is_empty()) {
        agents.push(Leaf::agent("agent", opts.site.as_deref()));
    }
    for name in &opts.agent_names {
        if !agents.iter().any(|a| a.stem == *name) {
            agents.push(Leaf::agent(name, opts.site.as_deref()));
        }
    }
    if !replace {
        if let Some(taken) = agents.iter().find(|a| a.exists(&opts.dir)) {
            bail!(
                "{} already exists: nothing was written (add --force to replace it; the CA is \
                 kept)",
                taken.files(&opts.dir).0.display()
            );
        }
    }
    Ok(agents)
}

/// Writes a new CA (or reports the one reused) and returns it.
fn write_or_keep_ca(
    report: &mut Report,
    dir: &Path,
    fresh_ca: bool,
    ca_exists: bool,
) -> anyhow::Result<Ca> {
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if !fresh_ca {
        report.line("kept", (&ca_crt, &ca_key), "the private CA (reused)");
        return load_ca(dir);
    }
    let ca = new_ca()?;
    write_file(&ca_crt, &ca.cert.pem(), false)?;
    write_file(&ca_key, &ca.key.serialize_pem(), true)?;
    if ca_exists {
        report.line(
            "replaced",
            (&ca_crt, &ca_key),
            "a NEW private CA: every certificate the old one issued no longer validates; \
             copy ca.crt to the gateways AND every agent, and reissue their certificates",
        );
    } else {
        report.line(
            "wrote",
            (&ca_crt, &ca_key),
            "the private CA: ca.crt to the gateways AND every agent; keep ca.key offline \
             (only `cert` commands need it)",
        );
    }
    Ok(ca)
}

/// The report's last lines: what to write in gateway.toml and agent.toml.
fn then_configure(mut out: String, opts: &InitOptions, agent: &str) -> anyhow::Result<String> {
    writeln!(out, "\nThen configure:")?;
    writeln!(
        out,
        "  gateway.toml:  [control] tls = {{ cert = \"gateway.crt\", key = \"gateway.key\", client_ca = \"ca.crt\", site_binding = \"required\" }}"
    )?;
    if opts.site.is_none() {
        writeln!(
            out,
            "  NOTE: the agent certificates are bound to no site (no --site): with site_binding = \"required\" the gateway refuses them; issue one per site with `sallyport cert issue --agent NAME --site SITE`, or set site_binding = \"optional\""
        )?;
    }
    writeln!(
        out,
        "  agent.toml:    tls = {{ ca = \"ca.crt\", cert = \"{agent}.crt\", key = \"{agent}.key\" }}"
    )?;
    Ok(out)
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

/// `cert renew`: a new key and certificate for `DIR/NAME.crt` from the CA in `dir`, with the
/// same names, site and role as the one it replaces, valid `days` from today. The old
/// certificate stays valid until it expires (revoke it with `cert revoke` if its key leaked).
pub fn renew(dir: &Path, stem: &str, days: u32) -> anyhow::Result<String> {
    check_agent_name(stem)
        .or_else(|_| check_dns_name(stem))
        .map_err(|e| anyhow::anyhow!("renew: {e}"))?;
    anyhow::ensure!(
        !RESERVED_STEMS.contains(&stem),
        "the CA is not renewed here: `sallyport cert init --new-ca` replaces it"
    );
    let crt = dir.join(format!("{stem}.crt"));
    let old = crate::certinfo::CertInfo::from_pem_file(&crt)?;
    if !dir.join("ca.key").exists() {
        bail!(
            "no CA in {}: {} is missing (renew on the host that keeps the CA)",
            dir.display(),
            dir.join("ca.key").display()
        );
    }
    let leaf = Leaf {
        stem: stem.to_string(),
        common_name: old.common_name.clone().unwrap_or_else(|| stem.to_string()),
        sans: old.names.clone(),
        sites: old.sites.clone(),
        server: old.server,
    };
    anyhow::ensure!(
        !leaf.sans.is_empty(),
        "{}: no DNS name or IP address to renew it for",
        crt.display()
    );
    let ca = load_ca(dir)?;
    let until = leaf.write(&ca, dir, days)?;
    let mut report = Report::default();
    report.line(
        "kept",
        (&dir.join("ca.crt"), &dir.join("ca.key")),
        "the private CA that signed it",
    );
    report.line(
        "renewed",
        (&crt, &dir.join(format!("{stem}.key"))),
        format!(
            "{} (new key; until {}; it replaced serial {})",
            leaf.role(),
            date(until),
            old.serial
        ),
    );
    let mut out = report.0;
    writeln!(
        out,
        "\nCopy both files over the old ones and reload that daemon (SIGHUP): established \
         connections stay up, new ones use the new certificate.\nThe old certificate stays \
         valid until {}; if its key may have leaked: sallyport cert revoke --dir {} --serial {}",
        date(time::OffsetDateTime::from_unix_timestamp(old.not_after)?),
        dir.display(),
        old.serial
    )?;
    Ok(out)
}

/// The CRL `cert revoke` writes, next to the CA.
pub const CRL_FILE: &str = "crl.pem";

/// What `cert revoke` revokes: a certificate file, or a serial number (`aa:bb:..` hex) of one
/// that is gone (replaced by a renewal).
#[derive(Debug, Clone)]
pub enum Revoke {
    Cert(PathBuf),
    Serial(String),
}

/// `cert revoke`: adds a certificate to `DIR/crl.pem` (made on first use), signed by the CA in
/// `dir`. The gateways that load it (`[control] tls.crl`) refuse that certificate from their
/// next reload on, and cut the agents presenting it.
pub fn revoke(dir: &Path, what: &Revoke) -> anyhow::Result<String> {
    let (serial, label) = match what {
        Revoke::Cert(path) => {
            let info = crate::certinfo::CertInfo::from_pem_file(path)?;
            let name = info.common_name.unwrap_or_default();
            (
                info.serial_bytes,
                format!("\"{name}\" ({})", path.display()),
            )
        }
        Revoke::Serial(hex) => (parse_serial(hex)?, format!("serial {hex}")),
    };
    let ca = load_ca(dir)?;
    let crl_path = dir.join(CRL_FILE);
    let (mut revoked, number) = read_crl(&crl_path)?;
    let already = revoked
        .iter()
        .any(|r| r.serial_number.as_ref() == serial.as_slice());
    if !already {
        revoked.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial),
            revocation_time: time::OffsetDateTime::now_utc(),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let now = time::OffsetDateTime::now_utc();
    let count = revoked.len();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        // Gateways do not enforce it; other readers get a list that does not go stale before
        // the CA does.
        next_update: now + time::Duration::days(365 * CA_YEARS),
        crl_number: rcgen::SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.cert, &ca.key)
        .context("cannot sign the CRL with the CA")?;
    write_file(&crl_path, &crl.pem()?, false)?;
    let mut out = String::new();
    writeln!(
        out,
        "{}  {}: {label} {}; {count} certificate(s) revoked in all",
        if already { "kept    " } else { "revoked " },
        crl_path.display(),
        if already {
            "was already revoked"
        } else {
            "added"
        },
    )?;
    writeln!(
        out,
        "\nCopy {CRL_FILE} to every gateway ([control] tls = {{ ..., crl = \"{CRL_FILE}\" }}) and \
         reload it (SIGHUP): agents presenting the certificate are cut at once and refused at \
         every handshake after."
    )?;
    Ok(out)
}

/// `aa:bb:cc` (or `aabbcc`) hex to bytes.
fn parse_serial(hex: &str) -> anyhow::Result<Vec<u8>> {
    let digits: String = hex.chars().filter(|c| *c != ':').collect();
    anyhow::ensure!(
        !digits.is_empty() && digits.len() % 2 == 0 && digits.len() <= 40,
        "--serial: \"{hex}\" is not a serial number (hex bytes, e.g. 3a:07:9c)"
    );
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .map_err(|_| anyhow::anyhow!("--serial: \"{hex}\" is not hex"))
        })
        .collect()
}

/// The entries and number of the CRL at `path`; none and 0 when there is no file yet.
fn read_crl(path: &Path) -> anyhow::Result<(Vec<rcgen::RevokedCertParams>, u64)> {
    if !path.exists() {
        return Ok((Vec::new(), 0));
    }
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateRevocationListDer::from_pem_file(path)
        .with_context(|| format!("cannot read a CRL from {}", path.display()))?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: not a readable CRL: {e}", path.display()))?;
    let number = crl
        .crl_number()
        .and_then(|n| n.to_string().parse::<u64>().ok())
        .unwrap_or(0);
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| {
            let at = time::OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
            rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(r.raw_serial()),
                revocation_time: at,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }
        })
        .collect();
    Ok((entries, number))
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
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn opts(dir: &Path) -> InitOptions {
        InitOptions {
            dir: dir.to_path_buf(),
            gateway_names: vec!["dmz-gw1.example".into()],
            gateway_ips: vec!["192.0.2.10".parse().unwrap()],
            agent_names: vec![],
            site: None,
            days: 30,
            force: false,
            new_ca: false,
        }
    }

    fn read(d: &Path, f: &str) -> Vec<u8> {
        std::fs::read(d.join(f)).unwrap()
    }

    #[test]
    fn init_makes_every_file_and_tls_accepts_them() {
        let dir = tempfile::tempdir().unwrap();
        let summary = init(&opts(dir.path())).unwrap();
        assert!(
            summary.contains("valid for dmz-gw1.example, 192.0.2.10"),
            "{summary}"
        );
        for f in [
            "ca.crt",
            "ca.key",
            "gateway.crt",
            "gateway.key",
            "agent.crt",
            "agent.key",
        ] {
            assert!(summary.contains(&format!("{}", dir.path().join(f).display())));
            let meta = std::fs::metadata(dir.path().join(f)).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if f.ends_with(".key") {
                assert_eq!(mode, 0o600, "{f}");
            } else {
                assert_eq!(mode, 0o644, "{f}");
            }
        }
        let d = dir.path();
        crate::transport::ServerTls::load(
            &d.join("gateway.crt"),
            &d.join("gateway.key"),
            &d.join("ca.crt"),
            None,
        )
        .unwrap();
        crate::transport::ClientTls::load(
            &d.join("ca.crt"),
            &d.join("agent.crt"),
            &d.join("agent.key"),
            None,
        )
        .unwrap();

        // Again: nothing is overwritten, and more agents come from the same CA.
        let ca_before = read(d, "ca.crt");
        let mut more = opts(d);
        more.agent_names = vec!["agent-b".into()];
        let summary = init(&more).unwrap();
        assert!(summary.contains("kept     "), "{summary}");
        assert!(summary.contains("the private CA (reused)"), "{summary}");
        assert_eq!(read(d, "ca.crt"), ca_before);
        assert!(d.join("agent-b.key").exists());
        assert!(init(&more)
            .unwrap_err()
            .to_string()
            .contains("already exists: nothing was written"));
    }

    #[test]
    fn init_with_other_gateway_names_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init(&opts(d)).unwrap();
        let before: Vec<Vec<u8>> = ["ca.crt", "gateway.crt", "agent.crt"]
            .iter()
            .map(|f| read(d, f))
            .collect();
        let mut other = opts(d);
        other.gateway_names = vec!["dmz-gw2.example".into()];
        other.gateway_ips = vec![];
        let err = init(&other).unwrap_err().to_string();
        assert!(
            err.contains("valid for dmz-gw1.example, 192.0.2.10, not for dmz-gw2.example"),
            "{err}"
        );
        assert!(err.contains("cert issue --dir"), "{err}");
        let after: Vec<Vec<u8>> = ["ca.crt", "gateway.crt", "agent.crt"]
            .iter()
            .map(|f| read(d, f))
            .collect();
        assert_eq!(before, after);
        // The same names in another order are the same certificate: kept.
        let mut same = opts(d);
        same.gateway_names = vec!["dmz-gw1.example".into()];
        let summary = init(&same).unwrap();
        assert!(
            summary.contains("the gateway certificate, valid for"),
            "{summary}"
        );
    }

    #[test]
    fn force_rotates_the_leaves_and_keeps_the_ca_new_ca_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init(&opts(d)).unwrap();
        let (ca, gw) = (read(d, "ca.crt"), read(d, "gateway.crt"));
        let mut force = opts(d);
        force.gateway_names = vec![];
        force.gateway_ips = vec![];
        force.force = true;
        let summary = init(&force).unwrap();
        assert_eq!(read(d, "ca.crt"), ca, "--force replaced the CA");
        assert_ne!(read(d, "gateway.crt"), gw);
        // No names given: the rotated certificate keeps the old names.
        assert_eq!(
            sans_of(&d.join("gateway.crt")).unwrap(),
            ["dmz-gw1.example", "192.0.2.10"]
        );
        assert!(summary.contains("replaced "), "{summary}");

        issue(&IssueOptions {
            dir: d.to_path_buf(),
            subject: Subject::Agent {
                name: "agent-b".into(),
                site: Some("acme".into()),
            },
            days: 5,
            force: false,
        })
        .unwrap();
        let info = crate::certinfo::CertInfo::from_pem_file(&d.join("agent-b.crt")).unwrap();
        assert_eq!(info.sites, ["acme"]);
        assert_eq!(info.common_name.as_deref(), Some("agent-b"));
        let mut new = opts(d);
        new.new_ca = true;
        let summary = init(&new).unwrap();
        assert_ne!(read(d, "ca.crt"), ca);
        assert!(summary.contains("a NEW private CA"), "{summary}");
        assert!(
            summary.contains("no longer valid: agent-b.crt"),
            "{summary}"
        );
    }

    #[test]
    fn issue_writes_name_files_signed_by_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let gw2 = IssueOptions {
            dir: d.to_path_buf(),
            subject: Subject::Gateway {
                names: vec!["dmz-gw2.example".into(), "192.0.2.11".into()],
            },
            days: 10,
            force: false,
        };
        assert!(issue(&gw2).unwrap_err().to_string().contains("no CA in"));
        init(&opts(d)).unwrap();
        let summary = issue(&gw2).unwrap();
        assert!(
            summary.contains("valid for dmz-gw2.example, 192.0.2.11"),
            "{summary}"
        );
        crate::transport::ServerTls::load(
            &d.join("dmz-gw2.example.crt"),
            &d.join("dmz-gw2.example.key"),
            &d.join("ca.crt"),
            None,
        )
        .unwrap();
        assert!(issue(&gw2)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        for bad in [
            Subject::Agent {
                name: "ca".into(),
                site: None,
            },
            Subject::Agent {
                name: "../x".into(),
                site: None,
            },
            Subject::Agent {
                name: "edge".into(),
                site: Some("bad site".into()),
            },
            Subject::Gateway {
                names: vec!["*.example".into()],
            },
            Subject::Gateway {
                names: vec!["a/b".into()],
            },
            Subject::Gateway { names: vec![] },
        ] {
            let o = IssueOptions {
                subject: bad.clone(),
                ..gw2.clone()
            };
            assert!(issue(&o).is_err(), "{bad:?}");
        }
    }
}
