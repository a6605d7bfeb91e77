//! A certificate's later life: `cert renew` (a new key and certificate for the same names, site
//! and role) and `cert revoke` (the CA-signed `crl.pem` gateways load as `[control] tls.crl`,
//! by file or by serial). Like init, it decides before it writes.

use super::*;

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
