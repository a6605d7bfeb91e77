//! The command line: subcommands, logging, signals and exit codes.
//!
//! This file holds the arguments (clap) and the dispatch; each subcommand's work is in a module
//! of its own: `cli/run.rs` (the daemons, their runtime, signals and exit status), `cli/admin.rs`
//! (`status`, `ctl`, `ban`), `cli/config.rs` (`--check-config`, `--check`), `cli/cert.rs` and
//! `cli/generate.rs`.
//!
//! Exit codes: 0 after a clean stop, 1 on a runtime failure, 78 (`EX_CONFIG`) when a config file
//! is invalid or names an address the daemon cannot listen on (control, admin or outbound port
//! taken by another program): a service manager should not restart in a loop (the systemd units
//! set `RestartPreventExitStatus=78`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{AgentConfig, GatewayConfig};

mod admin;
mod cert;
mod config;
mod generate;
mod run;

use admin::{ban, ctl, status};
use cert::cert;
use config::{config_error, config_valid, describe_agent, describe_gateway};
use generate::generate;
use run::{run_agent, run_async, run_daemon, run_gateway, runtime};
pub use run::{stop_on_signals, StartError};

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
