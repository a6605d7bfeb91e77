//! The test harness: start the real `sallyport` binary as gateway and agent with config files
//! in a temp dir, read their logs, and offer small loopback servers and clients. [`harness`]
//! runs them in-process instead, for tests that wait on state rather than on log lines.
//!
//! Every process started here is stopped by PID when its handle drops.

#![allow(dead_code)]

pub mod ftp;
pub mod haproxy;
pub mod harness;
pub mod netns;
pub mod nginx;
pub mod relay;
pub mod servers;
pub mod sshd;
pub mod wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub const BIN: &str = env!("CARGO_BIN_EXE_sallyport");

/// A port that was free a moment ago on 127.0.0.1, from the 12,000 ports below the kernel's
/// ephemeral range: a port from inside it (what binding port 0 gives) can be handed to another
/// socket before the daemon binds it (an outgoing connection's source port, or a daemon's admin
/// server bound to port 0), and then the test's clients reach the wrong server.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let first = low.saturating_sub(12000).max(1024);
    let span = low - first;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let seed = nanos
        ^ std::process::id().wrapping_mul(2654435761)
        ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(40503);
    (0..span)
        .map(|i| (first + (seed % span + i) % span) as u16)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("no free port below the ephemeral range")
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a TCP connect to `addr` is refused right now (as opposed to accepted).
pub fn refuses(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// Whether a client connecting to `addr` gets through to the backend: it must accept and
/// not be closed at once. Uses an echo of one line when `echo` is set.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// A running child process whose stderr lines are collected (and echoed for failing tests).
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        Proc::spawn_program(name, BIN, args)
    }

    /// Starts any program (e.g. `strace ... sallyport gateway`) with log collection.
    pub fn spawn_program(name: &str, program: &str, args: &[&str]) -> Proc {
        Proc::spawn_with_env(name, program, args, &[])
    }

    /// Starts `program` with extra environment variables (e.g. `SALLYPORT_LOG_FORMAT=json`).
    pub fn spawn_with_env(name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .env("SALLYPORT_LOG", "info,sallyport=debug")
            // Text logs unless a test asks otherwise, whatever the caller's environment says.
            .env_remove("SALLYPORT_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            let prefix = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{prefix}] {line}");
                    log.lock().push(line);
                }
            });
        }
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().clone()
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let mut found = None;
        let ok = wait_until(timeout, || {
            found = self.log.lock().iter().find(|l| l.contains(needle)).cloned();
            found.is_some()
        });
        assert!(
            ok,
            "{}: no log line containing {needle:?} within {timeout:?}",
            self.name
        );
        found.unwrap()
    }

    /// Kills with SIGKILL: the process gets no chance to say goodbye.
    pub fn kill(&mut self) {
        // A wrapper such as strace runs the daemon as its child, which would outlive it.
        let children: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                    .flat_map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
                    .collect()
            })
            .unwrap_or_default();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !children.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&children).status();
        }
    }

    /// Sends a signal by PID (SIGTERM, SIGHUP ...).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        if sig == "STOP" {
            // Stopped means every thread: a test that sends clients right after must not race
            // a thread that was still running on the other core.
            let stopped = || {
                std::fs::read_dir(format!("/proc/{}/task", self.pid()))
                    .map(|tasks| {
                        tasks.flatten().all(|t| {
                            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                                stat.rsplit(')')
                                    .next()
                                    .is_some_and(|r| r.trim_start().starts_with('T'))
                            })
                        })
                    })
                    .unwrap_or(false)
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !stopped() {
                assert!(Instant::now() < deadline, "{} did not stop", self.pid());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temp dir for config files and test data, removed at the end.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        Workdir {
            dir: tempfile::Builder::new()
                .prefix("sallyport-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

/// A gateway process, its bound control address and its admin API address.
pub struct Gateway {
    pub proc: Proc,
    pub control: SocketAddr,
    pub admin: Option<SocketAddr>,
}

/// The address after `prefix` in a log line, up to a space or slash.
fn addr_after(line: &str, prefix: &str) -> SocketAddr {
    let rest = line.rsplit(prefix).next().unwrap();
    let end = rest.find(['/', ' ']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("cannot parse an address after {prefix:?} in {line:?}: {e}"))
}

/// Starts a gateway on loopback with an ephemeral control port. `extra` is appended to
/// gateway.toml (e.g. a `[limits]` section).
pub fn start_gateway(dir: &Workdir, extra: &str) -> Gateway {
    start_gateway_named(dir, "gateway", extra)
}

pub fn start_gateway_named(dir: &Workdir, name: &str, extra: &str) -> Gateway {
    start_gateway_with(dir, name, "listen = \"127.0.0.1:0\"", extra)
}

/// Starts a gateway whose `[control]` section is `control` (it must set `listen`). Unless
/// `extra` has an `[admin]` section, the admin API listens on an ephemeral loopback port; unless
/// it has `[peers]`, every address is allowed (written out, as a gateway requires), and unless
/// it has `[clients]`, public listeners bind 127.0.0.1.
pub fn start_gateway_with(dir: &Workdir, name: &str, control: &str, extra: &str) -> Gateway {
    let path = dir.write(&format!("{name}.toml"), &gateway_config(control, extra));
    spawn_gateway(name, &path)
}

/// [`start_gateway`] with extra environment variables (e.g. `SALLYPORT_SPLICE=off`).
pub fn start_gateway_env(dir: &Workdir, name: &str, extra: &str, env: &[(&str, &str)]) -> Gateway {
    let config = gateway_config("listen = \"127.0.0.1:0\"", extra);
    let path = dir.write(&format!("{name}.toml"), &config);
    spawn_gateway_env(name, &path, env)
}

/// gateway.toml text for [`start_gateway_with`].
pub fn gateway_config(control: &str, extra: &str) -> String {
    let admin = if extra.contains("[admin]") {
        ""
    } else {
        "[admin]\nlisten = \"127.0.0.1:0\"\n"
    };
    let peers = if extra.contains("[peers]") {
        ""
    } else {
        "[peers]\ndefault = \"allow\"\n"
    };
    let clients = if extra.contains("[clients]") {
        ""
    } else {
        "[clients]\nbind = \"127.0.0.1\"\n"
    };
    format!("[control]\n{control}\n\n{clients}\n{peers}\n{admin}\n{extra}\n")
}

/// Starts `sallyport gateway --config path` and waits for its ports.
pub fn spawn_gateway(name: &str, path: &Path) -> Gateway {
    spawn_gateway_env(name, path, &[])
}

/// [`spawn_gateway`] with extra environment variables (e.g. `SALLYPORT_MAX_PROTOCOL=2`).
pub fn spawn_gateway_env(name: &str, path: &Path, env: &[(&str, &str)]) -> Gateway {
    let args = ["gateway", "--config", path.to_str().unwrap()];
    let proc = Proc::spawn_with_env(name, BIN, &args, env);
    let line = proc.wait_for_log("control port listening on ", Duration::from_secs(10));
    let control = addr_after(&line, "control port listening on ");
    let admin = proc
        .log_lines()
        .iter()
        .find(|l| l.contains("admin API and dashboard listening on http://"))
        .map(|l| addr_after(l, "listening on http://"));
    Gateway {
        proc,
        control,
        admin,
    }
}

impl Gateway {
    /// GET an admin API path with the real curl; the JSON body.
    pub fn api(&self, path: &str) -> serde_json::Value {
        api_get(&self.admin_url(), path)
    }

    /// `http://addr` of the admin API.
    pub fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.admin.expect("this gateway has no admin API")
        )
    }
}

/// GET `path` of the admin server at `url` (`http://addr`) with the real curl; the JSON body
/// (null if there is none).
pub fn api_get(url: &str, path: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("{url}{path}")])
        .output()
        .expect("run curl");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// One `[[listener]]` of an agent config.
pub struct ListenerDef {
    pub name: String,
    pub public: String,
    pub backend: String,
    pub extra: String,
}

pub fn listener(name: &str, public_port: u16, backend: SocketAddr) -> ListenerDef {
    ListenerDef {
        name: name.to_string(),
        public: format!("127.0.0.1:{public_port}"),
        backend: backend.to_string(),
        extra: String::new(),
    }
}

/// agent.toml text: `extra` holds top-level keys (it may end with tables). Unless it sets the
/// admin server, that listens on an ephemeral port: agents of tests running in parallel must not
/// all take the default 127.0.0.1:9091.
pub fn agent_config(gateways: &[SocketAddr], listeners: &[ListenerDef], extra: &str) -> String {
    if extra.contains("[admin]") || extra.contains("admin.") {
        agent_config_without_admin(gateways, listeners, extra)
    } else {
        // Before `extra`, which may end inside a table of its own.
        let extra = format!("admin.listen = \"127.0.0.1:0\"\n{extra}");
        agent_config_without_admin(gateways, listeners, &extra)
    }
}

/// [`agent_config`] for a caller that appends its own `[admin]` table.
pub fn agent_config_without_admin(
    gateways: &[SocketAddr],
    listeners: &[ListenerDef],
    extra: &str,
) -> String {
    let gws: Vec<String> = gateways.iter().map(|g| format!("\"{g}\"")).collect();
    // `extra` may name the agent itself (several agents of one site).
    let name = if extra.lines().any(|l| l.trim_start().starts_with("name ")) {
        ""
    } else {
        "name = \"test-agent\"\n"
    };
    let mut config = format!(
        "site = \"test-site\"\n{name}gateways = [{}]\n{extra}\n",
        gws.join(", ")
    );
    for l in listeners {
        // A list (`["a:1", "b:2"]`) is written as it is.
        let backend = if l.backend.starts_with('[') {
            l.backend.clone()
        } else {
            format!("\"{}\"", l.backend)
        };
        config.push_str(&format!(
            "\n[[listener]]\nname = \"{}\"\npublic = \"{}\"\nbackend = {}\n{}\n",
            l.name, l.public, backend, l.extra
        ));
    }
    config
}

/// Starts an agent. `top` holds extra top-level keys (e.g. `heartbeat = "200ms"`), `tables`
/// extra tables; reconnects are fast (100 ms doubling to 1 s) unless `tables` has `[reconnect]`.
pub fn start_agent(
    dir: &Workdir,
    name: &str,
    gateways: &[SocketAddr],
    listeners: &[ListenerDef],
    top: &str,
    tables: &str,
) -> Proc {
    let path = write_agent_config(dir, name, gateways, listeners, top, tables);
    Proc::spawn(name, &["agent", "--config", path.to_str().unwrap()])
}

/// Writes `<dir>/<name>.toml` for [`start_agent`] (the same arguments) and returns its path.
pub fn write_agent_config(
    dir: &Workdir,
    name: &str,
    gateways: &[SocketAddr],
    listeners: &[ListenerDef],
    top: &str,
    tables: &str,
) -> PathBuf {
    let mut config = if tables.contains("[admin]") {
        agent_config_without_admin(gateways, listeners, top)
    } else {
        agent_config(gateways, listeners, top)
    };
    if !tables.contains("[reconnect]") {
        config.push_str("\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n");
    }
    config.push_str(tables);
    dir.write(&format!("{name}.toml"), &config)
}

/// Starts `sallyport agent --config <dir>/<name>.toml` (written before) with extra environment
/// variables.
pub fn spawn_agent_env(dir: &Workdir, name: &str, env: &[(&str, &str)]) -> Proc {
    let path = dir.path().join(format!("{name}.toml"));
    let args = ["agent", "--config", path.to_str().unwrap()];
    Proc::spawn_with_env(name, BIN, &args, env)
}

/// The log line an agent writes once its admin server listens.
pub const AGENT_ADMIN_LINE: &str = "agent admin API and page listening on http://";

/// `http://addr` of an agent's admin server, from its log (waits for the line).
pub fn agent_admin_url(agent: &Proc) -> String {
    let line = agent.wait_for_log(AGENT_ADMIN_LINE, Duration::from_secs(10));
    format!("http://{}", addr_after(&line, "listening on http://"))
}

/// Waits until a public port accepts connections.
pub fn wait_open(addr: SocketAddr, timeout: Duration) {
    assert!(
        wait_until(timeout, || accepts(addr)),
        "{addr} did not open within {timeout:?}"
    );
}

/// Waits until a public port refuses connections.
pub fn wait_refused(addr: SocketAddr, timeout: Duration) {
    assert!(
        wait_until(timeout, || refuses(addr)),
        "{addr} still accepts after {timeout:?}"
    );
}

/// Sends `line\n` and expects it echoed back: proves the whole path works.
pub fn echo_round_trip(addr: SocketAddr, line: &str) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut got = vec![0u8; line.len() + 1];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, format!("{line}\n").as_bytes());
}

/// A TCP connection from a chosen loopback source address (127.0.0.2 ... play other hosts).
pub fn connect_from(source: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

/// Runs `sallyport cert init --dir <dir>/<sub> <args>` and returns that directory.
pub fn make_certs(dir: &Workdir, sub: &str, args: &[&str]) -> PathBuf {
    let path = dir.path().join(sub);
    let out = Command::new(BIN)
        .args(["cert", "init", "--dir"])
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cert init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `tls = {...}` for gateway.toml's [control] from a cert dir.
pub fn gateway_tls(certs: &Path) -> String {
    format!(
        "tls = {{ cert = \"{0}/gateway.crt\", key = \"{0}/gateway.key\", client_ca = \"{0}/ca.crt\" }}",
        certs.display()
    )
}

/// `tls = {...}` for agent.toml from a cert dir and an agent cert name.
pub fn agent_tls(ca_dir: &Path, cert_dir: &Path, name: &str) -> String {
    format!(
        "tls = {{ ca = \"{}/ca.crt\", cert = \"{1}/{2}.crt\", key = \"{1}/{2}.key\" }}",
        ca_dir.display(),
        cert_dir.display(),
        name
    )
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn sha256_file(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}
