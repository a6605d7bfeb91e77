//! Network namespaces built and torn down by a test: unique names per run, veth links, and
//! commands run inside. Deleting a namespace (on drop) removes its links and addresses; the
//! test stops its own processes in it first.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

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

    /// A veth pair between two namespaces with an address (CIDR) on each end.
    pub fn link(&self, a: &str, a_addr: &str, b: &str, b_addr: &str) {
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
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
