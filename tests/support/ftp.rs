//! A real vsftpd in passive mode (anonymous, uploads allowed) on 127.0.0.2, announcing the
//! gateway's address in PASV replies. See ../shared/TESTING.md for vsftpd's gotchas.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::sshd::TEST_USER;
use super::{wait_until, Workdir};

pub const VSFTPD: &str = "/usr/sbin/vsftpd";

/// `n` consecutive ports free on both 127.0.0.1 and 127.0.0.2, below the ephemeral range.
pub fn free_port_range(n: u16) -> u16 {
    use std::net::TcpListener;
    for _ in 0..200 {
        let base = 20000 + (rand_u16() % 10000);
        let all_free = (base..base + n).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok()
                && TcpListener::bind(("127.0.0.2", p)).is_ok()
        });
        if all_free {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ std::process::id().wrapping_mul(2654435761)) as u16
}

pub struct Vsftpd {
    pub port: u16,
    /// Anonymous root; uploads go to `pub/` inside it.
    pub root: PathBuf,
    child: Child,
    pub log: PathBuf,
}

impl Vsftpd {
    /// Control port `port` and passive ports `pasv..pasv+count` on 127.0.0.2; PASV replies
    /// announce `announce` (the gateway).
    pub fn start(dir: &Workdir, port: u16, pasv: u16, count: u16, announce: &str) -> Vsftpd {
        assert!(
            Path::new(VSFTPD).exists(),
            "{VSFTPD} is missing: run the tests with scripts/test.sh"
        );
        super::sshd::ensure_user();
        let base = dir.path().join("ftp");
        let root = base.join("root");
        let empty = base.join("empty");
        std::fs::create_dir_all(root.join("pub")).unwrap();
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in [&base, &root, &empty] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // vsftpd refuses a writable anonymous root; the writable place is pub/, owned by the
        // account anonymous sessions run as.
        let status = Command::new("chown")
            .arg(TEST_USER)
            .arg(root.join("pub"))
            .status()
            .unwrap();
        assert!(status.success());
        let log = base.join("vsftpd.log");
        let conf = base.join("vsftpd.conf");
        std::fs::write(
            &conf,
            format!(
                "listen=YES\nlisten_ipv6=NO\nlisten_address=127.0.0.2\nlisten_port={port}\nbackground=NO\n\
                 anonymous_enable=YES\nlocal_enable=NO\nwrite_enable=YES\nanon_upload_enable=YES\n\
                 anon_mkdir_write_enable=YES\nanon_other_write_enable=YES\nanon_umask=022\n\
                 anon_root={}\nno_anon_password=YES\nftp_username={TEST_USER}\n\
                 pasv_enable=YES\npasv_min_port={pasv}\npasv_max_port={}\npasv_address={announce}\n\
                 port_enable=NO\nseccomp_sandbox=NO\nsecure_chroot_dir={}\n\
                 xferlog_enable=YES\nvsftpd_log_file={}\nlog_ftp_protocol=YES\n",
                root.display(),
                pasv + count - 1,
                empty.display(),
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new(VSFTPD)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vsftpd");
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.2", port)).is_ok()),
            "vsftpd did not start on 127.0.0.2:{port} (an unknown config key makes it exit silently)"
        );
        Vsftpd {
            port,
            root,
            child,
            log,
        }
    }
}

impl Drop for Vsftpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
