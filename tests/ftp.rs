//! FTP in passive mode through the gateway: one listener for the control port and one range
//! listener forwarding the passive ports port for port, with a real vsftpd, curl and lftp.

mod support;

use std::process::Command;
use std::time::Duration;

use support::ftp::{free_port_range, Vsftpd};
use support::nginx::curl;
use support::*;

const PASSIVE_PORTS: u16 = 10;

#[test]
fn ftp_passive_list_upload_download_through_one_range_listener() {
    let dir = Workdir::new();
    // Ports 0..PASSIVE_PORTS of the block are passive ports, the next one the FTP control port.
    let base = free_port_range(PASSIVE_PORTS + 1);
    let control_port = base + PASSIVE_PORTS;
    let ftp = Vsftpd::start(&dir, control_port, base, PASSIVE_PORTS, "127.0.0.1");
    let gateway = start_gateway(&dir, "");
    let public_ftp = free_port();
    let passive = ListenerDef {
        name: "ftp-pasv".into(),
        public: format!("127.0.0.1:{base}-{}", base + PASSIVE_PORTS - 1),
        backend: format!("127.0.0.2:{base}-{}", base + PASSIVE_PORTS - 1),
        extra: String::new(),
    };
    let control = ListenerDef {
        name: "ftp".into(),
        public: format!("127.0.0.1:{public_ftp}"),
        backend: format!("127.0.0.2:{control_port}"),
        extra: String::new(),
    };
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[control, passive],
        "",
        "",
    );
    wait_open(local(public_ftp), Duration::from_secs(10));
    wait_open(local(base + PASSIVE_PORTS - 1), Duration::from_secs(10));

    let source = dir.path().join("ten-mib.bin");
    std::fs::write(&source, pseudo_random(10 * 1024 * 1024, 21)).unwrap();
    let want = sha256_file(&source);
    let url = format!("ftp://127.0.0.1:{public_ftp}/pub/");

    // curl uses EPSV by default, which ignores pasv_address: force PASV.
    let (ok, _, err) = curl(&[
        "--disable-epsv",
        "-T",
        source.to_str().unwrap(),
        &format!("{url}curl.bin"),
    ]);
    assert!(ok, "curl upload failed: {err}");
    assert_eq!(
        sha256_file(&ftp.root.join("pub/curl.bin")),
        want,
        "upload changed the bytes"
    );
    let (ok, listing, err) = curl(&["--disable-epsv", "--list-only", &url]);
    assert!(ok, "curl list failed: {err}");
    assert!(listing.lines().any(|l| l.trim() == "curl.bin"), "{listing}");
    let downloaded = dir.path().join("curl-down.bin");
    let (ok, _, err) = curl(&[
        "--disable-epsv",
        "-o",
        downloaded.to_str().unwrap(),
        &format!("{url}curl.bin"),
    ]);
    assert!(ok, "curl download failed: {err}");
    assert_eq!(sha256_file(&downloaded), want, "download changed the bytes");

    // lftp, in passive mode as well.
    let lftp_down = dir.path().join("lftp-down.bin");
    let script = format!(
        "set ftp:passive-mode true; set ftp:prefer-epsv false; set ftp:ssl-allow false; \
         set net:max-retries 1; set net:timeout 15; \
         open -u anonymous,test ftp://127.0.0.1:{public_ftp}; cd pub; \
         put {} -o lftp.bin; get lftp.bin -o {}; cls -1",
        source.display(),
        lftp_down.display()
    );
    let out = Command::new("lftp")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("run lftp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lftp failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().any(|l| l.trim() == "lftp.bin"), "{stdout}");
    assert_eq!(sha256_file(&ftp.root.join("pub/lftp.bin")), want);
    assert_eq!(sha256_file(&lftp_down), want);

    // The passive connections really went through the range listener.
    let log = std::fs::read_to_string(&ftp.log).unwrap_or_default();
    assert!(
        log.contains("227 Entering Passive Mode (127,0,0,1,"),
        "vsftpd must announce the gateway: {log}"
    );
    let passive_through_gateway = gateway
        .proc
        .log_lines()
        .iter()
        .filter(|l| l.contains("listener=\"ftp-pasv\"") && l.contains("client connected"))
        .count();
    // curl: upload, list, download; lftp: put, get, cls.
    assert!(
        passive_through_gateway >= 6,
        "only {passive_through_gateway} passive connections crossed the gateway"
    );
}
