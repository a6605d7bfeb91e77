//! `sallyport cert init`: decides everything first (names, the CA to make or keep, the gateway
//! and agent certificates to write, replace or keep), then writes; a refused run writes nothing.
//! It never replaces a CA without `--new-ca` nor a file without `--force`.

use super::*;

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
