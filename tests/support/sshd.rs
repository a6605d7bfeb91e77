//! A real OpenSSH server on a loopback port with its own host key, a test user and a test key,
//! and the real `sftp` client in batch mode. See ../shared/TESTING.md for the gotchas handled
//! here (privilege separation dir, locked accounts, StrictModes under /tmp).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{free_port, local, wait_until, Workdir};

pub const SSHD: &str = "/usr/sbin/sshd";
pub const TEST_USER: &str = "sallyport-test";

/// Fails loudly (never skips) when OpenSSH is missing: `scripts/test.sh` installs it.
pub fn require_openssh() {
    for tool in [SSHD, "/usr/bin/sftp", "/usr/bin/ssh-keygen"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run the test suite with scripts/test.sh, which installs openssh-server and openssh-client"
        );
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test account: created when missing, unlocked for key login (`*` password field).
pub fn ensure_user() {
    let exists = Command::new("id")
        .arg("-u")
        .arg(TEST_USER)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        // Another test may be creating it at the same moment; only the result matters.
        let _ = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", TEST_USER])
            .output();
    }
    run(Command::new("usermod").args(["-p", "*", TEST_USER]));
}

pub struct Sshd {
    pub port: u16,
    child: Child,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// A directory the test user can write to; sftp paths go here.
    pub data_dir: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Sshd {
    pub fn start(dir: &Workdir) -> Sshd {
        Sshd::start_at(dir, None, "127.0.0.1", free_port())
    }

    /// sshd listening on `listen`:`port`, inside network namespace `netns` when given.
    pub fn start_at(dir: &Workdir, netns: Option<&str>, listen: &str, port: u16) -> Sshd {
        require_openssh();
        ensure_user();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let root = dir.path();
        // The temp dir is 0700 by default; the test user must reach its data dir.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data_dir = root.join("sftp-data");
        std::fs::create_dir_all(&data_dir).unwrap();
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o777)).unwrap();

        let host_key = root.join("ssh_host_ed25519_key");
        let key = root.join("client_key");
        for k in [&host_key, &key] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k));
        }
        let authorized = root.join("authorized_keys");
        std::fs::copy(key.with_extension("pub"), &authorized).unwrap();
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o644)).unwrap();

        let config = root.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {listen}\nHostKey {}\nPidFile {}\n\
                 AuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nPermitRootLogin no\nAllowUsers {TEST_USER}\n\
                 Subsystem sftp internal-sftp\nLogLevel VERBOSE\nMaxStartups 100:30:200\n",
                host_key.display(),
                root.join("sshd.pid").display(),
                authorized.display(),
            ),
        )
        .unwrap();
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        let mut child = command
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sshd");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[sshd] {line}");
                log2.lock().push(line);
            }
        });
        let ready = || match netns {
            None => std::net::TcpStream::connect(local(port)).is_ok(),
            Some(_) => log_ready(&log),
        };
        assert!(
            wait_until(Duration::from_secs(10), ready),
            "sshd did not start listening on {listen}:{port}"
        );
        Sshd {
            port,
            child,
            key,
            known_hosts: root.join("known_hosts"),
            data_dir,
            log,
        }
    }

    /// Runs `sftp -b` with `batch` against 127.0.0.1:`port` (sshd itself, or the gateway).
    pub fn sftp(&self, port: u16, batch: &str, workdir: &Workdir) -> Output {
        self.sftp_to(None, "127.0.0.1", port, batch, workdir)
    }

    /// Runs `sftp -b` against `host`:`port`, from inside namespace `netns` when given.
    pub fn sftp_to(
        &self,
        netns: Option<&str>,
        host: &str,
        port: u16,
        batch: &str,
        workdir: &Workdir,
    ) -> Output {
        let batch_file = workdir.write(&format!("batch-{port}-{}", batch.len()), batch);
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "sftp"]);
                c
            }
            None => Command::new("sftp"),
        };
        command
            .arg("-b")
            .arg(&batch_file)
            .arg("-i")
            .arg(&self.key)
            .arg("-P")
            .arg(port.to_string())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
            ])
            .arg(format!("{TEST_USER}@{host}"))
            .output()
            .expect("run sftp")
    }
}

/// sshd -e logs "Server listening on ..." once its socket is open.
fn log_ready(log: &Arc<Mutex<Vec<String>>>) -> bool {
    log.lock().iter().any(|l| l.contains("Server listening on"))
}

impl Sshd {
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
