//! `sallyport cert init`: a private CA and the gateway and agent certificates for mutual TLS.
//!
//! The CA is kept in `ca.crt` / `ca.key`; running again with `--agent-name` in the same
//! directory reuses it to issue more agent certificates. Private keys are created with mode
//! 0600 and existing files are never overwritten without `--force`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
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
    /// Validity of issued (non-CA) certificates.
    pub days: u32,
    pub force: bool,
}

const CA_COMMON_NAME: &str = "Sallyport private CA";
const CA_YEARS: i64 = 10;

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
    server: bool,
    days: u32,
) -> anyhow::Result<CertificateParams> {
    let mut params =
        CertificateParams::new(sans).with_context(|| format!("invalid name for {common_name}"))?;
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

/// Writes a new file; refuses to replace one unless `force`.
fn write_file(path: &Path, content: &str, private: bool, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists (use --force to replace it)",
            path.display()
        );
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if private {
        // `mode` applies only to new files; an existing one (with --force) is tightened here.
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

/// Loads the CA from `dir` (any CA certificate with a key rcgen can sign with, including one
/// the operator brings), or makes one. Returns it and whether it is new.
fn load_or_create_ca(dir: &Path, force: bool) -> anyhow::Result<(Ca, bool)> {
    let key_path = dir.join("ca.key");
    if key_path.exists() && !force {
        let pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a private key", key_path.display()))?;
        let cert_path = dir.join("ca.crt");
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?;
        // Rebuilding the CA from its own certificate keeps its subject and key identifier, so
        // what it issues now chains to the ca.crt agents and gateways already have.
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .with_context(|| format!("{}: not a usable CA certificate", cert_path.display()))?;
        let cert = params.self_signed(&key)?;
        return Ok((Ca { cert, key }, false));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_file(&dir.join("ca.crt"), &cert.pem(), false, force)?;
    write_file(&key_path, &key.serialize_pem(), true, force)?;
    Ok((Ca { cert, key }, true))
}

fn issue(
    ca: &Ca,
    dir: &Path,
    file_stem: &str,
    params: CertificateParams,
    force: bool,
) -> anyhow::Result<()> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    write_file(
        &dir.join(format!("{file_stem}.crt")),
        &cert.pem(),
        false,
        force,
    )?;
    write_file(
        &dir.join(format!("{file_stem}.key")),
        &key.serialize_pem(),
        true,
        force,
    )?;
    Ok(())
}

/// Makes the CA (or reuses the one in `dir`) and the certificates; returns a summary of what to
/// copy where.
pub fn init(opts: &InitOptions) -> anyhow::Result<String> {
    for name in &opts.agent_names {
        check_name(name).map_err(|e| anyhow::anyhow!("--agent-name: {e}"))?;
        anyhow::ensure!(
            !matches!(name.as_str(), "ca" | "gateway"),
            "--agent-name: \"{name}\" would overwrite the CA or gateway files"
        );
    }
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let (ca, new_ca) = load_or_create_ca(&opts.dir, opts.force)?;
    let mut out = String::new();
    let dir = opts.dir.display();
    if new_ca {
        writeln!(out, "Created a private CA in {dir}:")?;
        writeln!(
            out,
            "  ca.crt          the CA certificate: copy it to the gateway AND to every agent"
        )?;
        writeln!(out, "  ca.key          the CA private key (mode 0600): keep it offline; only `cert init` needs it")?;
    } else {
        writeln!(out, "Reusing the private CA in {dir} (ca.crt, ca.key)")?;
    }

    let make_gateway = new_ca || opts.force || !opts.dir.join("gateway.crt").exists();
    if make_gateway {
        let mut names = opts.gateway_names.clone();
        let mut ips = opts.gateway_ips.clone();
        let defaults = names.is_empty() && ips.is_empty();
        if defaults {
            names.push("localhost".into());
            ips.extend(["127.0.0.1".parse::<IpAddr>()?, "::1".parse()?]);
        }
        let common_name = names.first().cloned().unwrap_or_else(|| ips[0].to_string());
        let sans: Vec<String> = names
            .iter()
            .cloned()
            .chain(ips.iter().map(|ip| ip.to_string()))
            .collect();
        issue(
            &ca,
            &opts.dir,
            "gateway",
            leaf_params(&common_name, sans.clone(), true, opts.days)?,
            opts.force,
        )?;
        writeln!(
            out,
            "  gateway.crt     \\ copy to the gateway host; valid for: {}",
            sans.join(", ")
        )?;
        writeln!(out, "  gateway.key     / (mode 0600)")?;
        if defaults {
            writeln!(
                out,
                "  NOTE: no --gateway-name/--gateway-ip given: the gateway certificate only suits local tests"
            )?;
        }
    }
    let mut agents: Vec<String> = Vec::new();
    if new_ca || (opts.force && opts.agent_names.is_empty()) {
        agents.push("agent".to_string());
    }
    agents.extend(opts.agent_names.iter().cloned());
    for name in &agents {
        issue(
            &ca,
            &opts.dir,
            name,
            leaf_params(name, vec![name.clone()], false, opts.days)?,
            opts.force,
        )?;
        writeln!(
            out,
            "  {:<15} \\ copy to the agent host \"{name}\"",
            format!("{name}.crt")
        )?;
        writeln!(out, "  {:<15} / (mode 0600)", format!("{name}.key"))?;
    }
    writeln!(
        out,
        "\nCertificates are valid for {} days. Then configure:",
        opts.days
    )?;
    writeln!(out, "  gateway.toml:  [control]")?;
    writeln!(
        out,
        "                 tls = {{ cert = \"gateway.crt\", key = \"gateway.key\", client_ca = \"ca.crt\" }}"
    )?;
    let agent = agents.first().map(String::as_str).unwrap_or("agent");
    writeln!(
        out,
        "  agent.toml:    tls = {{ ca = \"ca.crt\", cert = \"{agent}.crt\", key = \"{agent}.key\" }}"
    )?;
    Ok(out)
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
            days: 30,
            force: false,
        }
    }

    #[test]
    fn init_makes_every_file_and_tls_accepts_them() {
        let dir = tempfile::tempdir().unwrap();
        let summary = init(&opts(dir.path())).unwrap();
        assert!(summary.contains("dmz-gw1.example, 192.0.2.10"), "{summary}");
        for f in [
            "ca.crt",
            "ca.key",
            "gateway.crt",
            "gateway.key",
            "agent.crt",
            "agent.key",
        ] {
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
        let ca_before = std::fs::read(d.join("ca.crt")).unwrap();
        let mut more = opts(d);
        more.agent_names = vec!["agent-b".into()];
        let summary = init(&more).unwrap();
        assert!(summary.contains("Reusing the private CA"), "{summary}");
        assert_eq!(std::fs::read(d.join("ca.crt")).unwrap(), ca_before);
        assert!(d.join("agent-b.key").exists());
        more.agent_names = vec!["agent-b".into()];
        assert!(init(&more)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }
}
