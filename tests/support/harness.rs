//! The in-process harness: a gateway and agents run as library objects
//! ([`sallyport::gateway::Gateway`], [`sallyport::agent::Agent`]) on the test's own tokio
//! runtime, with their admin servers, and a test waits on their state instead of their logs.
//!
//! Rules:
//! - Configs are written with the same helpers as the real-binary suites ([`gateway_config`],
//!   [`write_agent_config`]) and loaded from those files, so a config error names file:line.
//! - Waiting is on state: [`Harness::wait_until`] on the gateway's status watch
//!   ([`sallyport::gateway::GatewayHandle::watch`]), [`AgentRun::wait_until`] on the agent's
//!   ([`sallyport::agent::Agent::status`]). A wait that times out panics with what it waited
//!   for and the last status seen.
//! - Log lines are for assertions about a log line itself (a DEBUG line, a `(N so far)` tally).
//!   One global tracing subscriber per test process collects every daemon's lines (and echoes
//!   them to stderr, shown for a failing test); [`Harness::logs`] sees the lines written since
//!   that harness started. Tests running as threads of one process would see each other's
//!   lines: the suites run under nextest, one process per test.
//! - Shutdown: dropping the harness (or an [`AgentRun`]) cancels its token; the daemons stop as
//!   on SIGTERM, and whatever is left ends with the test's runtime.
//! - Use a multi-thread runtime (`#[tokio::test(flavor = "multi_thread")]`): the test body runs
//!   on the runtime's own thread, so blocking client code there (std sockets, threads) does not
//!   stall the daemons, which run on the workers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use sallyport::agent::{Agent, AgentStatus};
use sallyport::config::{AgentConfig, GatewayConfig};
use sallyport::gateway::watch::GatewayStatus;
use sallyport::gateway::{Gateway, GatewayHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{gateway_config, write_agent_config, ListenerDef, Workdir};

/// A gateway running in this process, and the temp dir of its (and its agents') configs.
pub struct Harness {
    pub dir: Workdir,
    pub control: SocketAddr,
    /// Its admin API (`[admin] listen`, an ephemeral port unless the config says otherwise).
    pub admin: Option<SocketAddr>,
    pub handle: GatewayHandle,
    status: watch::Receiver<GatewayStatus>,
    stop: CancellationToken,
    /// Where this harness's lines start in [`logs`].
    first_line: usize,
    _admin: sallyport::admin::server::AdminServer,
    _slot: sallyport::admin::GatewaySlot,
    _task: JoinHandle<anyhow::Result<sallyport::gateway::Exit>>,
}

impl Harness {
    /// A gateway whose config is [`gateway_config`]'s with an ephemeral control port; `extra`
    /// is appended (e.g. a `[limits]` section).
    pub async fn start(extra: &str) -> Harness {
        Harness::start_with("listen = \"127.0.0.1:0\"", extra).await
    }

    /// A gateway whose `[control]` section is `control` (it must set `listen`).
    pub async fn start_with(control: &str, extra: &str) -> Harness {
        Harness::start_in(Workdir::new(), control, extra).await
    }

    /// [`Harness::start_with`] in `dir`, which may hold files the configs name (certificates).
    pub async fn start_in(dir: Workdir, control: &str, extra: &str) -> Harness {
        let first_line = logs().len();
        // As the daemons do at start: a pool of hundreds of connections on both ends of one
        // process must not run into a soft limit of 1024 descriptors.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let path = dir.write("gateway.toml", &gateway_config(control, extra));
        let config = load(&path, GatewayConfig::load);
        let gateway = Gateway::bind(config.clone())
            .await
            .unwrap_or_else(|e| panic!("gateway: {e:#}"));
        let handle = gateway.handle();
        let (slot, slot_rx) = watch::channel(Some(handle.clone()));
        let state = sallyport::admin::AdminState::new(slot_rx, config.admin_token.clone(), None);
        let admin = sallyport::admin::server::AdminServer::start(&config, state)
            .await
            .unwrap_or_else(|e| panic!("gateway admin: {e:#}"));
        let stop = CancellationToken::new();
        let control = gateway.control_addr();
        let task = tokio::spawn(gateway.run(stop.clone()));
        Harness {
            dir,
            control,
            admin: admin.addr(),
            status: handle.watch(),
            handle,
            stop,
            first_line,
            _admin: admin,
            _slot: slot,
            _task: task,
        }
    }

    /// `http://addr` of the admin API.
    pub fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.admin.expect("this gateway has no admin API")
        )
    }

    /// GET an admin API path with the real curl; the JSON body.
    pub fn api(&self, path: &str) -> serde_json::Value {
        super::api_get(&self.admin_url(), path)
    }

    /// The gateway's status now.
    pub fn status(&self) -> GatewayStatus {
        self.status.borrow().clone()
    }

    /// Waits until `cond` holds for the gateway's status and returns that status; panics after
    /// `timeout` with `what` and the last status seen.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl FnMut(&GatewayStatus) -> bool,
    ) -> GatewayStatus {
        wait_on(&mut self.status.clone(), "gateway", what, timeout, cond).await
    }

    /// Starts an agent of this gateway with [`write_agent_config`]'s config `<name>.toml`
    /// (`top`: top-level keys, `tables`: extra tables) and its admin server, if it has one.
    pub async fn agent(
        &self,
        name: &str,
        listeners: &[ListenerDef],
        top: &str,
        tables: &str,
    ) -> AgentRun {
        let path = write_agent_config(&self.dir, name, &[self.control], listeners, top, tables);
        AgentRun::start(name, &path, self.stop.child_token()).await
    }

    /// The daemons' log lines since this harness started.
    pub fn logs(&self) -> LogView {
        LogView {
            from: self.first_line,
            target: None,
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Loads a config file, or panics with the error (file:line).
fn load<T, E: std::fmt::Display>(path: &Path, read: impl Fn(&Path) -> Result<T, E>) -> T {
    read(path).unwrap_or_else(|e| panic!("{e}"))
}

/// An agent running in this process.
pub struct AgentRun {
    pub name: String,
    pub agent: Arc<Agent>,
    /// Its admin server (`[admin] listen`), if it has one.
    pub admin: Option<SocketAddr>,
    status: watch::Receiver<AgentStatus>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl AgentRun {
    async fn start(name: &str, path: &Path, stop: CancellationToken) -> AgentRun {
        logs();
        let config = load(path, AgentConfig::load);
        let admin_config = config.admin.clone();
        let agent = Arc::new(Agent::from_file(config, Some(path.to_path_buf())));
        let mut admin = None;
        if let Some(addr) = admin_config.listen {
            let what = sallyport::admin::agent::LISTENING;
            let listener = sallyport::admin::bind(addr, what)
                .await
                .unwrap_or_else(|e| panic!("{name} admin: {e:#}"));
            admin = Some(listener.local_addr().unwrap());
            let serve = sallyport::admin::agent::serve(
                listener,
                agent.clone(),
                admin_config.token,
                stop.clone(),
            );
            tokio::spawn(serve);
        }
        let runner = agent.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move { runner.run(token).await });
        AgentRun {
            name: name.to_string(),
            status: agent.status(),
            agent,
            admin,
            stop,
            task: Some(task),
        }
    }

    /// `http://addr` of its admin server.
    pub fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.admin.expect("this agent has no admin API")
        )
    }

    /// The agent's status now.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// As [`Harness::wait_until`], on the agent's status.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl FnMut(&AgentStatus) -> bool,
    ) -> AgentStatus {
        wait_on(&mut self.status.clone(), &self.name, what, timeout, cond).await
    }

    /// Waits until every gateway bound `listener`.
    pub async fn wait_bound(&self, listener: &str) {
        let what = format!("listener {listener:?} bound on every gateway");
        self.wait_until(&what, Duration::from_secs(10), |s| {
            s.bound_everywhere(listener)
        })
        .await;
    }

    /// Stops it as SIGTERM would (control channels and pooled connections closed) and waits
    /// up to 10 s for it to finish.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(ended.is_ok(), "{} did not stop within 10 s", self.name);
        }
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Waits on a status watch; see [`Harness::wait_until`].
async fn wait_on<T: std::fmt::Debug + Clone>(
    status: &mut watch::Receiver<T>,
    who: &str,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut(&T) -> bool,
) -> T {
    let waited = tokio::time::timeout(timeout, status.wait_for(|s| cond(s))).await;
    let why = match waited.map(|seen| seen.map(|s| s.clone())) {
        Ok(Ok(seen)) => return seen,
        Ok(Err(_)) => "the daemon is gone",
        Err(_) => &format!("not within {timeout:?}"),
    };
    panic!(
        "{who}: {what}: {why}; last status:\n{:#?}",
        *status.borrow()
    )
}

/// Every log line of this test process's daemons.
pub struct Logs {
    lines: Mutex<Vec<String>>,
    /// How many lines there are: waiters wake on each new one.
    count: watch::Sender<usize>,
}

impl Logs {
    fn len(&self) -> usize {
        self.lines.lock().len()
    }

    fn push(&self, text: &str) {
        let mut lines = self.lines.lock();
        for line in text.lines().filter(|l| !l.is_empty()) {
            eprintln!("[in-process] {line}");
            lines.push(line.to_string());
        }
        let n = lines.len();
        drop(lines);
        self.count.send_replace(n);
    }
}

/// The process's log collector, installed (as the global tracing subscriber, at the level the
/// real-binary suites run the daemons with: `info,sallyport=debug`) on first use.
pub fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    let mut first = false;
    let logs = LOGS.get_or_init(|| {
        first = true;
        Logs {
            lines: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
        }
    });
    if first {
        let installed = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,sallyport=debug"))
            .with_writer(|| Capture(Vec::new()))
            .with_ansi(false)
            .try_init();
        assert!(installed.is_ok(), "another tracing subscriber is installed");
    }
    logs
}

/// One formatted event, handed to [`Logs`] when the formatter drops it.
struct Capture(Vec<u8>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        logs().push(&String::from_utf8_lossy(&self.0));
    }
}

/// The lines of [`logs`] from one harness's start on, of one daemon's code or of all.
#[derive(Clone, Copy)]
pub struct LogView {
    from: usize,
    /// Only lines whose tracing target starts with this (` sallyport::gateway`).
    target: Option<&'static str>,
}

impl LogView {
    /// Only the gateway's lines (those of `sallyport::gateway::*`).
    pub fn gateway(self) -> LogView {
        LogView {
            target: Some(" sallyport::gateway"),
            ..self
        }
    }

    /// Only the agents' lines (those of `sallyport::agent::*`), of every agent of the test.
    pub fn agents(self) -> LogView {
        LogView {
            target: Some(" sallyport::agent"),
            ..self
        }
    }

    fn matching(&self, needle: &str) -> Vec<String> {
        let lines = logs().lines.lock();
        let ours = |l: &&String| self.target.map_or(true, |t| l.contains(t));
        let found = lines[self.from..].iter().filter(ours);
        found.filter(|l| l.contains(needle)).cloned().collect()
    }

    pub fn lines(&self) -> Vec<String> {
        self.matching("")
    }

    /// Lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.matching(needle).len()
    }

    /// Waits for a line containing `needle` and returns it (the first one); panics after
    /// `timeout`.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let find = || self.matching(needle).into_iter().next();
        let mut count = logs().count.subscribe();
        let waited = tokio::time::timeout(timeout, count.wait_for(|_| find().is_some())).await;
        assert!(
            waited.is_ok(),
            "no log line containing {needle:?} within {timeout:?}"
        );
        find().expect("found")
    }

    /// Waits until `n` lines contain `needle`; panics after `timeout` with how many did.
    pub async fn wait_count(&self, needle: &str, n: usize, timeout: Duration) {
        let mut count = logs().count.subscribe();
        let waited = tokio::time::timeout(timeout, count.wait_for(|_| self.count(needle) == n));
        assert!(
            waited.await.is_ok(),
            "{} log lines containing {needle:?} after {timeout:?}, not {n}",
            self.count(needle)
        );
    }
}
