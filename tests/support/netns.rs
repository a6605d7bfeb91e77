//! Network namespaces built and torn down by a test: unique names per run, veth links, and
//! commands run inside. Deleting a namespace (on drop) removes its links and addresses; the
//! test stops its own processes in it first.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Fails loudly where namespaces cannot be made (not root, no iproute2): never skips silently.
pub fn require_netns() {
    let uid = Command::new("id").arg("-u").output().expect("run id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "network namespace tests need root (CAP_NET_ADMIN); run them as root, as CI does"
    );
    assert!(
        std::path::Path::new("/usr/sbin/ip").exists() || std::path::Path::new("/sbin/ip").exists(),
        "iproute2 is missing: run the tests with scripts/test.sh"
    );
}

/// Runs `ip <args>` and panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a shell command inside `ns` and returns stdout; panics on failure.
pub fn sh_in(ns: &str, script: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "in {ns}: {script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A set of namespaces with a common, unique prefix.
pub struct Namespaces {
    pub prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    pub fn new() -> Namespaces {
        require_netns();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Short: interface names are limited to 15 characters.
        let prefix = format!("sp{}{}", std::process::id() % 100_000, n);
        Namespaces {
            prefix,
            names: Vec::new(),
        }
    }

    /// Creates `<prefix>-<name>` with its loopback up; returns the full name.
    pub fn add(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &full]);
        self.names.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"]);
        full
    }

    /// A veth pair between two namespaces with an address (CIDR) on each end; returns the
    /// interface names (in `a`, in `b`).
    pub fn link(&self, a: &str, a_addr: &str, b: &str, b_addr: &str) -> (String, String) {
        static LINKS: AtomicU32 = AtomicU32::new(0);
        let n = LINKS.fetch_add(1, Ordering::SeqCst);
        let (ia, ib) = (
            format!("{}a{n}", self.prefix),
            format!("{}b{n}", self.prefix),
        );
        ip(&["link", "add", &ia, "type", "veth", "peer", "name", &ib]);
        ip(&["link", "set", &ia, "netns", a]);
        ip(&["link", "set", &ib, "netns", b]);
        ip(&["-n", a, "addr", "add", a_addr, "dev", &ia]);
        ip(&["-n", b, "addr", "add", b_addr, "dev", &ib]);
        ip(&["-n", a, "link", "set", &ia, "up"]);
        ip(&["-n", b, "link", "set", &ib, "up"]);
        (ia, ib)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

// ------------------------------------------------------------------ code running inside a namespace

/// Moves the calling thread into network namespace `ns` for good: sockets it creates and
/// processes it starts from then on belong to `ns`. Use a thread of its own ([`in_ns`]).
// The crate denies unsafe code (Cargo.toml [lints]); this one FFI call is allowed, proved below.
#[allow(unsafe_code)]
pub fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    use std::os::raw::c_int;
    extern "C" {
        fn setns(fd: c_int, nstype: c_int) -> c_int;
    }
    const CLONE_NEWNET: c_int = 0x4000_0000;
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("network namespace {ns}: {e}"));
    // SAFETY: setns(2) receives a namespace file descriptor that `file` keeps open for the whole
    // call; it changes the calling thread's network namespace only and reads no memory of ours.
    let rc = unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `f` on a new thread inside `ns` and returns its result (a panic in `f` panics here).
/// Sockets made in `f` stay in `ns` and work from any thread; processes started in `f`
/// (`Proc::spawn`, `Nginx::start`, curl ...) run in `ns`, and their handles stop them by PID.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        match s
            .spawn(|| {
                enter(ns);
                f()
            })
            .join()
        {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A tokio runtime whose every thread (workers and blocking pool) lives in `ns`. Spawn the work
/// on it (`rt.spawn`): `block_on` polls its own future on the calling thread.
pub fn runtime_in(ns: &str, workers: usize) -> tokio::runtime::Runtime {
    let ns = ns.to_string();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .on_thread_start(move || enter(&ns))
        .build()
        .expect("tokio runtime")
}

/// A TCP connection opened from inside `ns`, from `source` when given.
pub fn connect_in(
    ns: &str,
    source: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    in_ns(ns, || {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        if let Some(ip) = source {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        socket.connect_timeout(&to.into(), timeout)?;
        Ok(socket.into())
    })
}

/// A TCP listener bound inside `ns`.
pub fn listen_in(ns: &str, addr: SocketAddr) -> TcpListener {
    in_ns(ns, || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"))
}

/// Whether a connect from `ns` to `addr` is refused right now (a closed port answers RST).
pub fn refuses_in(ns: &str, addr: SocketAddr) -> bool {
    matches!(connect_in(ns, None, addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Whether a connect from `ns` to `addr` is accepted right now.
pub fn accepts_in(ns: &str, addr: SocketAddr) -> bool {
    connect_in(ns, None, addr, Duration::from_secs(1)).is_ok()
}

// ------------------------------------------------------------------------------- process figures

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM` ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Open file descriptors of a process (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

// ------------------------------------------------------------------------ three zones, firewalled

/// A DMZ deployment in three namespaces, built, firewalled and checked by [`Zones::build`]:
///
/// ```text
///   internet               dmz                              internal
///   client 10.X.1.2 ─── 10.X.1.1 (public)   10.X.2.1 ─── 10.X.2.2 agent + servers
///                        [gateway, routes between the two]   nftables: nothing new gets in
/// ```
///
/// dmz forwards between the zones (so a missing route never hides a missing firewall), except
/// new TCP connections from internal to the internet: internal hosts go out only through the
/// gateway's outbound proxy. X = 200 + n keeps each test's addresses its own.
pub struct Zones {
    pub internet: String,
    pub dmz: String,
    pub internal: String,
    /// The internet client's address.
    pub client_ip: IpAddr,
    /// dmz towards the internet: the gateway's public listeners.
    pub public_ip: IpAddr,
    /// dmz towards internal: the gateway's control port.
    pub gateway_ip: IpAddr,
    /// The internal host: agent and servers.
    pub internal_ip: IpAddr,
    /// The internet end's interface (more client addresses go there).
    pub internet_if: String,
    /// Last, so the namespaces go after everything else in the struct.
    net: Namespaces,
}

/// The firewall of the internal zone: established and loopback traffic in, nothing new.
pub const INTERNAL_FIREWALL: &str = "table inet sallyport_zones {
  counter dropped_in { }
  chain input {
    type filter hook input priority 0; policy drop;
    iif \"lo\" accept
    ct state established,related accept
    counter name \"dropped_in\" drop
  }
}
";

impl Zones {
    /// Builds the zones for test number `n` (0..=55), then proves the firewall: a listener in
    /// internal is reachable from dmz and internet before it goes up and unreachable (dropped,
    /// counted by the firewall) after, while internal still reaches dmz.
    pub fn build(n: u8) -> Zones {
        assert!(
            n <= 55,
            "test numbers 0..=55 keep addresses in 10.200-255.x.x"
        );
        let x = 200 + n;
        let mut net = Namespaces::new();
        let internet = net.add("inet");
        let dmz = net.add("dmz");
        let internal = net.add("int");
        let (internet_if, dmz_out) = net.link(
            &internet,
            &format!("10.{x}.1.2/24"),
            &dmz,
            &format!("10.{x}.1.1/24"),
        );
        let (dmz_in, _) = net.link(
            &dmz,
            &format!("10.{x}.2.1/24"),
            &internal,
            &format!("10.{x}.2.2/24"),
        );
        sh_in(&internet, &format!("ip route add default via 10.{x}.1.1"));
        sh_in(&internal, &format!("ip route add default via 10.{x}.2.1"));
        sh_in(&dmz, "sysctl -qw net.ipv4.ip_forward=1");
        let ip = |s: String| -> IpAddr { s.parse().unwrap() };
        let zones = Zones {
            client_ip: ip(format!("10.{x}.1.2")),
            public_ip: ip(format!("10.{x}.1.1")),
            gateway_ip: ip(format!("10.{x}.2.1")),
            internal_ip: ip(format!("10.{x}.2.2")),
            internet,
            dmz,
            internal,
            internet_if,
            net,
        };
        zones.raise_firewalls(&dmz_in, &dmz_out);
        zones
    }

    fn raise_firewalls(&self, dmz_in: &str, dmz_out: &str) {
        let probe = listen_in(&self.internal, SocketAddr::new(self.internal_ip, 0));
        let target = probe.local_addr().unwrap();
        probe.set_nonblocking(true).unwrap();
        for ns in [&self.dmz, &self.internet] {
            let before = connect_in(ns, None, target, Duration::from_secs(2));
            assert!(
                before.is_ok(),
                "without the firewall, {ns} must reach {target} (routing): {before:?}"
            );
        }
        while probe.accept().is_ok() {}

        let fw = std::env::temp_dir().join(format!("{}-internal.nft", self.net.prefix));
        std::fs::write(&fw, INTERNAL_FIREWALL).unwrap();
        sh_in(&self.internal, &format!("nft -f {}", fw.display()));
        let _ = std::fs::remove_file(&fw);
        sh_in(
            &self.dmz,
            &format!(
                "nft add table inet sallyport_zones && nft add chain inet sallyport_zones forward \
                 '{{ type filter hook forward priority 0; policy accept; }}' && \
                 nft add rule inet sallyport_zones forward iifname {dmz_in} oifname {dmz_out} \
                 'tcp flags & (syn | ack) == syn' drop"
            ),
        );

        for ns in [&self.dmz, &self.internet] {
            let after = connect_in(ns, None, target, Duration::from_millis(500));
            assert!(
                matches!(&after, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
                "the firewall must drop {ns}'s connection to {target}, got {after:?}"
            );
        }
        assert!(
            matches!(probe.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a connection reached the listener in internal through the firewall"
        );
        let dropped = self.dropped_into_internal();
        assert!(
            dropped >= 2,
            "the firewall counted {dropped} dropped packets"
        );
        // Outbound from internal still works; straight to the internet it does not.
        let in_dmz = listen_in(&self.dmz, SocketAddr::new(self.gateway_ip, 0));
        let out = connect_in(
            &self.internal,
            None,
            in_dmz.local_addr().unwrap(),
            Duration::from_secs(2),
        );
        assert!(out.is_ok(), "internal must reach dmz: {out:?}");
        let in_internet = listen_in(&self.internet, SocketAddr::new(self.client_ip, 0));
        let out = connect_in(
            &self.internal,
            None,
            in_internet.local_addr().unwrap(),
            Duration::from_millis(500),
        );
        assert!(
            out.is_err(),
            "internal must not reach the internet directly"
        );
    }

    /// Packets the internal zone's firewall has dropped.
    pub fn dropped_into_internal(&self) -> u64 {
        let out = sh_in(
            &self.internal,
            "nft list counter inet sallyport_zones dropped_in",
        );
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out}"))
    }

    /// Adds `count` more client addresses (10.X.1.10 ...) in internet; returns them.
    pub fn add_client_ips(&self, count: u8) -> Vec<IpAddr> {
        let x = match self.client_ip {
            IpAddr::V4(v4) => v4.octets()[1],
            IpAddr::V6(_) => unreachable!(),
        };
        (0..count)
            .map(|i| {
                let addr = format!("10.{x}.1.{}", 10 + i as u16);
                ip(&[
                    "-n",
                    &self.internet,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    &self.internet_if,
                ]);
                addr.parse().unwrap()
            })
            .collect()
    }
}
