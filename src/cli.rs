//! The command line: subcommands, logging, signals and exit codes.
//!
//! Exit codes: 0 after a clean stop, 1 on a runtime failure, 78 (`EX_CONFIG`) when a config file
//! is invalid or names an address the daemon cannot listen on (control, admin or outbound port
//! taken by another program): a service manager should not restart in a loop (the systemd units
//! set `RestartPreventExitStatus=78`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::agent::Agent;
use crate::config::{AgentConfig, GatewayConfig};
use crate::gateway::{Exit, Gateway};

/// Exit status for an invalid configuration (sysexits.h `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "sallyport",
    version,
    about = "A DMZ gateway: expose internal TCP services with no inbound hole into the internal network",
    after_help = "Logging: set SALLYPORT_LOG (e.g. debug, or sallyport=debug,info); --log-format json (or SALLYPORT_LOG_FORMAT=json) for JSON lines. Docs: README.md and docs/."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: `text` for people, `json` for a SIEM (one object per line; see
    /// docs/operations.md for the fields of each connection's record).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "SALLYPORT_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `LEVEL message key=value ...`, coloured on a terminal.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message` and the event's fields.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (in the DMZ).
    Gateway {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config file (fields, addresses, TLS files) and exit: 0 when it is
        /// valid, 78 when not. Opens no socket.
        #[arg(long)]
        check_config: bool,
        /// Dry run: validate gateway.toml (TLS files included), print every effective setting,
        /// exit 0, or 78 with file:line: field.
        #[arg(long)]
        check: bool,
    },
    /// Run the agent (inside, next to the backends).
    Agent {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config file (fields, addresses, TLS files) and exit: 0 when it is
        /// valid, 78 when not. Opens no socket and dials no gateway (`sallyport check` does).
        #[arg(long)]
        check_config: bool,
        /// Dry run: validate agent.toml (TLS files included), print every effective setting and
        /// listener, exit 0, or 78 with file:line: field.
        #[arg(long)]
        check: bool,
    },
    /// Run gateway, agent and a tiny HTTP backend in one process on loopback.
    Demo {
        /// Public port of the demo listener on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Troubleshoot an agent's setup: config, gateway reachability, TLS, peer rules, listeners,
    /// backends, a test connection per listener. Exit status 1 on any failure.
    Check {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running gateway's or agent's state, listeners and counters (without --admin:
    /// the gateway on 127.0.0.1:9090, else the agent on 127.0.0.1:9091).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON of /api/status and /api/stats instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Control a running gateway (pause, resume, restart, stop) or agent (reload).
    Ctl {
        action: CtlAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Ban addresses on every gateway of an agent's site (through the agent's admin API,
    /// 127.0.0.1:9091 unless --admin says otherwise).
    Ban {
        #[command(subcommand)]
        command: BanCommand,
    },
    /// Certificates for mutual TLS between agents and gateways.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Write the man pages and shell completions generated from this command line (for
    /// packagers: packaging/build-deb runs it, so they never drift from the binary).
    #[command(hide = true)]
    #[command(group(clap::ArgGroup::new("output").required(true).multiple(true)))]
    Generate {
        /// Directory for sallyport.1 and one page per subcommand (sallyport-gateway.1 ...).
        #[arg(long, value_name = "DIR", group = "output")]
        man: Option<PathBuf>,
        /// Directory for the completions: sallyport.bash, _sallyport (zsh), sallyport.fish.
        #[arg(long, value_name = "DIR", group = "output")]
        completions: Option<PathBuf>,
    },
}

/// Where the admin API is and how to authenticate.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// Base URL of the gateway's or the agent's admin API [default: http://127.0.0.1:9090 for
    /// the gateway, http://127.0.0.1:9091 for the agent].
    #[arg(long, env = "SALLYPORT_ADMIN")]
    pub admin: Option<String>,
    /// Bearer token (`[admin] token` in gateway.toml or agent.toml), needed by ctl when one is
    /// set.
    #[arg(long, env = "SALLYPORT_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The gateway's admin API unless `--admin` says otherwise.
pub const GATEWAY_ADMIN_URL: &str = "http://127.0.0.1:9090";
/// The agent's admin API unless `--admin` says otherwise.
pub const AGENT_ADMIN_URL: &str = "http://127.0.0.1:9091";

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CtlAction {
    /// Close the listeners; established connections and agents stay.
    Pause,
    /// Reopen the listeners.
    Resume,
    /// Drop everything, re-read gateway.toml, start again (agents reconnect by themselves).
    Restart,
    /// Graceful stop: close the listeners, let connections drain, exit.
    Stop,
    /// Agent: re-read agent.toml and push it to every gateway (as SIGHUP does).
    Reload,
}

#[derive(Subcommand, Debug)]
pub enum BanCommand {
    /// Ban an address or a network (IP or CIDR): its new connections are refused at accept on
    /// every gateway of the site, and its established ones closed.
    Add {
        /// `203.0.113.7`, `203.0.113.0/24`, `2001:db8::/32`.
        target: String,
        /// How long (`10m`, `2h`, `7days`); without it, until removed.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// Why, shown on the gateways' status page (printable, at most 200 bytes).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lift the ban of exactly this address or network.
    Remove {
        target: String,
        /// Succeed when there is no such ban (it expired already): for fail2ban's unban.
        #[arg(long)]
        if_present: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The agent's bans, with the time each has left.
    List {
        /// Print the raw JSON of /api/bans.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Make a private CA (or reuse the one in DIR), a gateway certificate and agent certificates.
    Init {
        /// Directory for ca.crt, ca.key, gateway.crt, gateway.key, agent.crt, agent.key.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name of the gateway, as agents dial it (repeat for each name; both gateways of a
        /// pair may share one certificate valid for all their names).
        #[arg(long = "gateway-name")]
        gateway_names: Vec<String>,
        /// IP address of the gateway, as agents dial it (repeat for each address).
        #[arg(long = "gateway-ip")]
        gateway_ips: Vec<std::net::IpAddr>,
        /// Issue a certificate NAME.crt / NAME.key for another agent (repeatable).
        #[arg(long = "agent-name")]
        agent_names: Vec<String>,
        /// Bind the agent certificates this run makes to SITE: gateways refuse them for any
        /// other site.
        #[arg(long, value_name = "SITE")]
        site: Option<String>,
        /// Validity of the gateway and agent certificates, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace gateway.crt and agent.crt (or the --agent-name ones) with new keys; the CA is
        /// kept, so every other certificate stays valid.
        #[arg(long)]
        force: bool,
        /// Replace the CA itself (and gateway.crt, agent.crt): every certificate the old CA
        /// issued stops working, on every host.
        #[arg(long = "new-ca")]
        new_ca: bool,
    },
    /// Sign one more certificate with the CA in DIR: DIR/NAME.crt and DIR/NAME.key.
    #[command(group(clap::ArgGroup::new("subject").required(true).args(["gateway", "agent"])))]
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// A gateway certificate for NAME (the file name and first name) and any further DNS
        /// names or IP addresses agents dial it by: --gateway dmz-gw2.example,192.0.2.11
        #[arg(long, value_name = "NAME[,NAME|IP...]", value_delimiter = ',')]
        gateway: Vec<String>,
        /// An agent certificate named NAME.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Bind the agent certificate to SITE (its agent.toml `site`): gateways refuse it for any
        /// other site.
        #[arg(long, value_name = "SITE", requires = "agent")]
        site: Option<String>,
        /// Validity, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace NAME.crt / NAME.key if they exist (the CA is never replaced here).
        #[arg(long)]
        force: bool,
    },
    /// Replace DIR/NAME.crt and DIR/NAME.key with a new key and certificate from the CA: the
    /// same names, site and role, valid DAYS from today.
    #[command(group(clap::ArgGroup::new("subject").required(true).args(["gateway", "agent"])))]
    Renew {
        /// Directory holding ca.crt, ca.key and NAME.crt.
        #[arg(long)]
        dir: PathBuf,
        /// The agent certificate DIR/NAME.crt.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// The gateway certificate DIR/NAME.crt.
        #[arg(long, value_name = "NAME")]
        gateway: Option<String>,
        /// Validity, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Add a certificate to DIR/crl.pem (signed by the CA; made on first use): gateways that
    /// load it ([control] tls.crl) refuse that certificate and cut its agents at their reload.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["agent", "cert", "serial"])))]
    Revoke {
        /// Directory holding ca.crt and ca.key (and crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// The agent certificate DIR/NAME.crt.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// A certificate file.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// The serial number of a certificate no longer at hand (hex, as `cert renew` prints
        /// it: 3a:07:9c:...).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` prints its own report; only errors of the agent it runs are worth a log line.
    init_logging(
        if matches!(cli.command, Command::Check { .. }) {
            "error"
        } else {
            "info"
        },
        cli.log_format,
    );
    match cli.command {
        Command::Gateway {
            config,
            check_config,
            check,
        } => {
            let cfg = match GatewayConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            if check_config {
                return config_valid(&config, &cfg.notices);
            }
            if check {
                print!("{}", describe_gateway(&config, &cfg));
                return ExitCode::SUCCESS;
            }
            let path = config.clone();
            run_daemon(&path, run_gateway(cfg, config))
        }
        Command::Check { config } => match runtime() {
            Ok(rt) if rt.block_on(crate::check::run(&config)) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(code) => code,
        },
        Command::Status { admin, json } => run_async(status(admin, json)),
        Command::Ctl { action, admin } => run_async(ctl(action, admin)),
        Command::Ban { command } => run_async(ban(command)),
        Command::Agent {
            config,
            check_config,
            check,
        } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            if check_config {
                return config_valid(&config, &cfg.notices);
            }
            if check {
                print!("{}", describe_agent(&config, &cfg));
                return ExitCode::SUCCESS;
            }
            let path = config.clone();
            run_daemon(&path, run_agent(cfg, config))
        }
        Command::Demo { port } => run_async(crate::demo::run(port)),
        Command::Generate { man, completions } => {
            match generate(man.as_deref(), completions.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cert { command } => match cert(command) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn cert(command: CertCommand) -> anyhow::Result<String> {
    match command {
        CertCommand::Init {
            dir,
            gateway_names,
            gateway_ips,
            agent_names,
            site,
            days,
            force,
            new_ca,
        } => crate::certs::init(&crate::certs::InitOptions {
            dir,
            gateway_names,
            gateway_ips,
            agent_names,
            site,
            days,
            force,
            new_ca,
        }),
        CertCommand::Issue {
            dir,
            gateway,
            agent,
            site,
            days,
            force,
        } => {
            let subject = match agent {
                Some(name) => crate::certs::Subject::Agent { name, site },
                None => crate::certs::Subject::Gateway {
                    names: gateway.iter().map(|s| s.trim().to_string()).collect(),
                },
            };
            crate::certs::issue(&crate::certs::IssueOptions {
                dir,
                subject,
                days,
                force,
            })
        }
        CertCommand::Renew {
            dir,
            agent,
            gateway,
            days,
        } => {
            let stem = agent.or(gateway).unwrap_or_default();
            crate::certs::renew(&dir, &stem, days)
        }
        CertCommand::Revoke {
            dir,
            agent,
            cert,
            serial,
        } => {
            let what = match (agent, cert, serial) {
                (Some(name), _, _) => crate::certs::Revoke::Cert(dir.join(format!("{name}.crt"))),
                (_, Some(file), _) => crate::certs::Revoke::Cert(file),
                (_, _, serial) => crate::certs::Revoke::Serial(serial.unwrap_or_default()),
            };
            crate::certs::revoke(&dir, &what)
        }
    }
}

/// `gateway --check`: what the gateway would run with.
fn describe_gateway(path: &Path, cfg: &GatewayConfig) -> String {
    let mut out = format!("{}: valid; the gateway would run with:\n", path.display());
    out.push_str(&crate::config::reference::render(&cfg.settings()));
    for n in &cfg.notices {
        out.push_str(&format!("warning: {n}\n"));
    }
    out
}

/// `agent --check`: what the agent would run with.
fn describe_agent(path: &Path, cfg: &AgentConfig) -> String {
    let mut out = format!("{}: valid; the agent would run with:\n", path.display());
    out.push_str(&crate::config::reference::render(&cfg.settings()));
    out.push_str(&format!(
        "  listeners ({}, config digest {}):\n",
        cfg.listeners.len(),
        &cfg.digest()[..16]
    ));
    for l in &cfg.listeners {
        let backend = match (&l.backend, &l.group) {
            (_, Some(g)) => describe_group(g),
            (crate::config::Backend::Tcp(b), None) => b.to_string(),
            (crate::config::Backend::Local, None) => "(this process)".to_string(),
        };
        out.push_str(&format!(
            "    {}  public {}  backend {}  proxy_protocol {:?}  impersonation {:?}  clients {} except {}\n",
            l.name,
            l.public,
            backend,
            l.proxy_protocol,
            l.impersonation,
            l.clients.default,
            l.clients.except_text()
        ));
    }
    for n in &cfg.notices {
        out.push_str(&format!("warning: {n}\n"));
    }
    out
}

/// A listener's several backends as `--check` prints them: `[a, b] round-robin, health ...`.
fn describe_group(g: &crate::config::BackendGroup) -> String {
    let all: Vec<String> = g.backends.iter().map(|b| b.to_string()).collect();
    let health = match &g.health {
        None => "no health check".to_string(),
        Some(h) => format!(
            "health every {} within {} ({})",
            humantime::format_duration(h.interval),
            humantime::format_duration(h.timeout),
            h.http
                .as_deref()
                .map_or("TCP connect".to_string(), |p| format!("GET {p}"))
        ),
    };
    format!("[{}] {}, {health}", all.join(", "), g.balance.word())
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// `--check-config` on a file that loaded: its warnings, then a line saying it is valid.
fn config_valid(path: &Path, notices: &[String]) -> ExitCode {
    for n in notices {
        eprintln!("warning: {n}");
    }
    println!("{}: valid", path.display());
    ExitCode::SUCCESS
}

/// `sallyport generate`: the man pages and completions, from the clap definition above. A
/// subcommand of the binary rather than a build script: the pages describe exactly the binary
/// that is packaged, and no build of the crate pays for generating them.
fn generate(man: Option<&Path>, completions: Option<&Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    if let Some(dir) = man {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        // `help` is a subcommand for the shell, not a page; build() names each subcommand
        // "sallyport-gateway" and so on, the page titles.
        let mut cmd = Cli::command().disable_help_subcommand(true);
        cmd.build();
        write_man_pages(&cmd, dir)?;
    }
    if let Some(dir) = completions {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let path = clap_complete::generate_to(shell, &mut completed(), "sallyport", dir)
                .with_context(|| format!("{shell} completions in {}", dir.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// The command line as the shells complete it: clap_complete would offer hidden subcommands
/// (`generate`) too, so the top level is rebuilt from the visible ones.
fn completed() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    let visible = clap::Command::new("sallyport")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    match full.get_about() {
        Some(about) => visible.about(about.clone()),
        None => visible,
    }
}

/// One page per visible command, sub-subcommands included (`sallyport-cert-init.1`).
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let visible: Vec<&clap::Command> = cmd.get_subcommands().filter(|c| !c.is_hide_set()).collect();
    for sub in &visible {
        write_man_pages(sub, dir)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("sallyport {}", env!("CARGO_PKG_VERSION")))
        .manual("Sallyport");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let top = cmd.get_display_name().is_none();
    if top {
        page.extend_from_slice(MAN_EXIT_STATUS_AND_FILES.as_bytes());
    }
    // SEE ALSO: the top page lists every subcommand's page, the others point back to it.
    let mut see_also = if top {
        Vec::new()
    } else {
        vec!["sallyport".to_string()]
    };
    see_also.extend(
        visible
            .iter()
            .filter_map(|c| c.get_display_name().map(str::to_string)),
    );
    let refs: Vec<String> = see_also.iter().map(|n| format!(".BR {n} (1)")).collect();
    page.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", refs.join(" ,\n")).as_bytes());
    std::fs::write(&path, page).with_context(|| format!("{}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// Sections of sallyport(1) that clap has no field for (roff).
const MAN_EXIT_STATUS_AND_FILES: &str = r#".SH "EXIT STATUS"
.TP
.B 0
A clean stop (SIGTERM, SIGINT, \fBsallyport ctl stop\fR), or a command that succeeded.
.TP
.B 1
A runtime failure, or a failed \fBsallyport check\fR.
.TP
.B 78
An invalid configuration file (EX_CONFIG): the message names the file, line and field, and
nothing was opened. The systemd units do not restart after it.
.SH FILES
.TP
.I /etc/sallyport/gateway.toml
The gateway's configuration, read by sallyport-gateway.service.
.TP
.I /etc/sallyport/agent.toml
The agent's configuration, read by sallyport-agent.service.
.TP
.I /usr/share/doc/sallyport/
README.md and the manual: operations.md, security.md, deployment.md, protocol.md.
"#;

fn init_logging(default: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("SALLYPORT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        // Peer-supplied names, reasons and hosts reach log lines: escape control characters.
        LogFormat::Text => logger
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(crate::escape::log_fields())
            .init(),
        // Fields at the top level, next to `timestamp`, `level` and `message`: what a SIEM
        // indexes. serde_json escapes every string (control characters too), so a
        // peer-supplied name cannot split or forge a line.
        LogFormat::Json => logger
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// The multi-threaded tokio runtime every command runs on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// A start that failed on the configuration's account (its admin port is taken): the exit
/// status is [`EXIT_CONFIG`], so a service manager does not restart it in a loop.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            if e.downcast_ref::<StartError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs a daemon; an address its config file names that cannot be listened on (taken by another
/// program, not an address of this host) is a configuration error: exit 78 like the others, so a
/// service manager does not restart into the same clash in a loop.
fn run_daemon(
    config: &std::path::Path,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_address_clash(&e) || e.downcast_ref::<StartError>().is_some() => {
            tracing::error!("{}: {e:#}", config.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` comes from listening on an address that is in use or not local.
fn is_address_clash(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable
            )
        })
    })
}

/// Cancels the returned token on SIGINT or SIGTERM.
pub fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping");
        t.cancel();
    });
    Ok(token)
}

fn log_notices(notices: &[String]) {
    for n in notices {
        tracing::warn!("{n}");
    }
}

/// Raises the soft open-files limit to the hard one: every piped client holds two sockets, and
/// the common default soft limit of 1024 would cap a gateway at a few hundred clients.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => {
            tracing::warn!("open files limited to {n}: at most about {} clients", n / 2)
        }
        Ok(n) => tracing::debug!("open files limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

/// Runs the gateway (again after each restart) and its admin server (across restarts; a
/// reload or restart applies `[admin]` to it).
async fn run_gateway(cfg: GatewayConfig, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let signals = stop_on_signals()?;
    let (slot, slot_rx) = tokio::sync::watch::channel(None);
    let state = crate::admin::AdminState::new(slot_rx, cfg.admin_token.clone(), Some(path.clone()));
    let mut admin = crate::admin::server::AdminServer::start(&cfg, state).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut cfg = cfg;
    // The configuration the last gateway ran with, to fall back on if a new one cannot bind.
    let mut last_good: Option<GatewayConfig> = None;
    // An ephemeral control port ("…:0") stays the same across restarts, or agents would lose it.
    let mut bound_control: Option<(std::net::SocketAddr, std::net::SocketAddr)> = None;
    loop {
        let mut bind_cfg = cfg.clone();
        if let Some((asked, got)) = bound_control {
            if asked == cfg.control_listen && asked.port() == 0 {
                bind_cfg.control_listen = got;
            }
        }
        let gateway = match (Gateway::bind(bind_cfg).await, last_good.take()) {
            (Ok(g), _) => g,
            (Err(e), Some(previous)) => {
                tracing::error!("restart: {e:#}; starting again with the previous configuration");
                cfg = previous;
                continue;
            }
            (Err(e), None) => return Err(e),
        };
        bound_control = Some((cfg.control_listen, gateway.control_addr()));
        let handle = gateway.handle();
        slot.send_replace(Some(handle.clone()));
        let running = gateway.run(signals.clone());
        tokio::pin!(running);
        let exit = loop {
            tokio::select! {
                exit = &mut running => break exit?,
                _ = hup.recv() => match GatewayConfig::load(&path) {
                    Ok(new) => {
                        tracing::info!("SIGHUP: {} reloaded", path.display());
                        log_notices(&new.notices);
                        if let Err(e) = admin.apply(&new).await {
                            tracing::error!("reload: {e}");
                        }
                        handle.reload(new.clone()).await;
                        cfg = new;
                    }
                    Err(e) => tracing::error!("SIGHUP: reload refused, keeping the running config: {e}"),
                },
            }
        };
        slot.send_replace(None);
        if exit == Exit::Stop {
            break;
        }
        last_good = Some(handle.config().as_ref().clone());
        // `ctl restart` validated and staged the file; otherwise read it now.
        match handle
            .take_staged()
            .map(Ok)
            .unwrap_or_else(|| GatewayConfig::load(&path))
        {
            Ok(new) => {
                log_notices(&new.notices);
                cfg = new;
            }
            Err(e) => {
                tracing::error!("restart: {e}; starting again with the previous configuration")
            }
        }
        if let Err(e) = admin.apply(&cfg).await {
            tracing::error!("restart: {e}");
        }
        tracing::info!("restarting the gateway");
    }
    admin.stop().await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// `sallyport status`: the given admin API, or the gateway's default address, or (when no
/// gateway answers there) the agent's.
async fn status(admin: AdminArgs, json: bool) -> anyhow::Result<()> {
    let url = match admin.admin {
        Some(url) => url,
        None => {
            let gateway = crate::admin::client::authority(GATEWAY_ADMIN_URL)?;
            if tokio::net::TcpStream::connect(&gateway).await.is_ok() {
                GATEWAY_ADMIN_URL.to_string()
            } else {
                AGENT_ADMIN_URL.to_string()
            }
        }
    };
    crate::status::print(url, admin.token, json).await
}

/// `sallyport ban add|remove|list`, against the agent's admin API.
async fn ban(command: BanCommand) -> anyhow::Result<()> {
    use crate::admin::client::request_json;
    let url = |admin: &AdminArgs| {
        admin
            .admin
            .clone()
            .unwrap_or_else(|| AGENT_ADMIN_URL.to_string())
    };
    let (code, body, admin) = match &command {
        BanCommand::Add {
            target,
            duration,
            reason,
            admin,
        } => {
            let req = serde_json::json!({
                "target": target,
                "for": duration,
                "reason": reason.clone().unwrap_or_default(),
            });
            let (code, body) = request_json(
                &url(admin),
                "POST",
                "/api/bans",
                admin.token.as_deref(),
                Some(&req),
            )
            .await?;
            (code, body, admin)
        }
        BanCommand::Remove { target, admin, .. } => {
            let req = serde_json::json!({ "target": target });
            let (code, body) = request_json(
                &url(admin),
                "DELETE",
                "/api/bans",
                admin.token.as_deref(),
                Some(&req),
            )
            .await?;
            (code, body, admin)
        }
        BanCommand::List { admin, .. } => {
            let (code, body) = request_json(
                &url(admin),
                "GET",
                "/api/bans",
                admin.token.as_deref(),
                None,
            )
            .await?;
            (code, body, admin)
        }
    };
    match code {
        200 => {
            print_ban_answer(&command, &body);
            Ok(())
        }
        404 if matches!(command, BanCommand::Remove { if_present: true, .. })
            && body["error"].is_string() =>
        {
            println!("{} (nothing to do)", crate::escape::escape(body["error"].as_str().unwrap_or("")));
            Ok(())
        }
        401 => anyhow::bail!(
            "401 unauthorized: pass the agent's admin token with --token or SALLYPORT_ADMIN_TOKEN"
        ),
        404 if body["error"].is_null() => anyhow::bail!(
            "{} has no /api/bans: is it an agent's admin API (a gateway's only shows bans, on its dashboard)?",
            url(admin)
        ),
        _ => anyhow::bail!(
            "HTTP {code}: {}",
            body["error"]
                .as_str()
                .map_or_else(|| body.to_string(), crate::escape::escape)
        ),
    }
}

fn print_ban_answer(command: &BanCommand, body: &serde_json::Value) {
    let esc = |v: &serde_json::Value| crate::escape::escape(v.as_str().unwrap_or(""));
    match command {
        BanCommand::Add { .. } => {
            let lasts = match body["ban"]["expires_ms"].as_u64() {
                Some(_) => "for the given time",
                None => "until removed",
            };
            println!(
                "banned {} {lasts}; pushed to every connected gateway",
                esc(&body["ban"]["net"])
            );
            if body["persisted"] == false {
                println!("warning: the agent has no state_dir: this ban is lost when it restarts");
            }
        }
        BanCommand::Remove { .. } => println!("removed the ban of {}", esc(&body["removed"])),
        BanCommand::List { json: true, .. } => println!("{body:#}"),
        BanCommand::List { .. } => {
            let bans = body["bans"].as_array().cloned().unwrap_or_default();
            println!("{:<44} {:<14} reason", "address", "expires in");
            for b in &bans {
                let left = b["expires_in_secs"]
                    .as_u64()
                    .map_or("never".to_string(), |s| {
                        humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
                    });
                println!("{:<44} {:<14} {}", esc(&b["net"]), left, esc(&b["reason"]));
            }
            println!("{} ban(s)", bans.len());
        }
    }
}

async fn ctl(action: CtlAction, admin: AdminArgs) -> anyhow::Result<()> {
    let (path, daemon) = match action {
        CtlAction::Pause => ("/api/pause", "gateway"),
        CtlAction::Resume => ("/api/resume", "gateway"),
        CtlAction::Restart => ("/api/restart", "gateway"),
        CtlAction::Stop => ("/api/stop", "gateway"),
        CtlAction::Reload => ("/api/reload", "agent"),
    };
    let url = admin.admin.unwrap_or_else(|| {
        if daemon == "agent" {
            AGENT_ADMIN_URL
        } else {
            GATEWAY_ADMIN_URL
        }
        .to_string()
    });
    let token = admin.token.as_deref();
    let (code, body) = crate::admin::client::request(&url, "POST", path, token).await?;
    let action_name = &path["/api/".len()..];
    match code {
        200 if daemon == "agent" => {
            println!(
                "ok: {action_name} (agent configuration generation {})",
                body["generation"]
            );
            for n in body["notices"].as_array().into_iter().flatten() {
                println!(
                    "warning: {}",
                    crate::escape::escape(n.as_str().unwrap_or(""))
                );
            }
            Ok(())
        }
        200 => {
            println!(
                "ok: {} (gateway state: {})",
                body["action"].as_str().unwrap_or("done"),
                body["state"].as_str().unwrap_or("?")
            );
            if let Some(changes) = body["changes"].as_array() {
                if changes.is_empty() {
                    println!("gateway.toml: no key changed");
                }
                for c in changes {
                    println!("  {}", c.as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
        401 => anyhow::bail!(
            "401 unauthorized: pass the admin token with --token or SALLYPORT_ADMIN_TOKEN"
        ),
        // The other daemon's admin API: say so rather than "not found".
        404 => {
            let other = crate::admin::client::get(&url, "/api/status", token)
                .await
                .ok()
                .and_then(|s| s["daemon"].as_str().map(String::from))
                .unwrap_or_else(|| "gateway".into());
            match other.as_str() {
                "agent" => anyhow::bail!(
                    "{url} is an agent's admin API: `ctl {action_name}` controls a gateway (an agent has `ctl reload`)"
                ),
                _ => anyhow::bail!(
                    "{url} is a gateway's admin API: `ctl {action_name}` is for an agent (reload a gateway with SIGHUP: systemctl reload sallyport-gateway)"
                ),
            }
        }
        _ => anyhow::bail!(
            "HTTP {code}: {}",
            body["error"]
                .as_str()
                .map_or_else(|| body.to_string(), crate::escape::escape)
        ),
    }
}

async fn run_agent(cfg: AgentConfig, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let shutdown = stop_on_signals()?;
    let admin_config = cfg.admin.clone();
    let bans = match &cfg.state_dir {
        Some(dir) => crate::agent::bans::BanStore::open(dir).map_err(StartError)?,
        None => crate::agent::bans::BanStore::in_memory(),
    };
    let agent = std::sync::Arc::new(Agent::from_file(cfg, Some(path)).with_bans(bans));
    // The admin port is part of the configuration: when it is taken the agent stops before it
    // dials anything, with the config error's exit status, rather than run unobservable.
    let admin_stop = CancellationToken::new();
    let admin = match admin_config.listen {
        Some(addr) => {
            let listener = crate::admin::bind(addr, crate::admin::agent::LISTENING)
                .await
                .map_err(|e| {
                    StartError(format!(
                        "{e:#}: another agent on this host? set [admin] listen to a free port, or enabled = false"
                    ))
                })?;
            Some(tokio::spawn(crate::admin::agent::serve(
                listener,
                agent.clone(),
                admin_config.token,
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    let mut hup = signal(SignalKind::hangup())?;
    let reloader = agent.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A refusal is logged (and shown by the admin API) inside; the running config stays.
            let _ = reloader.reload_file("SIGHUP");
        }
    });
    let result = agent.run(shutdown).await;
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    result
}
