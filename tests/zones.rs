//! Proof in a real network: three namespaces (internet, dmz, internal) with an nftables
//! firewall in internal that drops every new connection into it (`Zones::build` proves it
//! first), the gateway in dmz with mutual TLS and `[peers]` limited to the agent, the agent and
//! real servers (OpenSSH, nginx, vsftpd) in internal, clients in internet. Then faults, each
//! checked for what a user sees: a cut control channel, a killed gateway, a dying backend, a
//! slow client. Root is needed (CI runs as root); without it every test fails, never skips.
//!
//! Figures printed with `--no-capture` are the ones in docs/reliability.md.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use support::ftp::{free_port_range, Vsftpd};
use support::netns::{accepts_in, connect_in, in_ns, listen_in, refuses_in, rss_kib, sh_in, Zones};
use support::nginx::{curl, Nginx, NginxOptions};
use support::sshd::{Sshd, TEST_USER};
use support::*;

const CONTROL_PORT: u16 = 44500;
/// The agent's timers, small so faults heal fast: heartbeat 200 ms (dead after 600 ms),
/// connect timeout 500 ms, reconnect backoff 100 ms doubling to 1 s.
const AGENT_TIMERS: &str = "heartbeat = \"200ms\"\nconnect_timeout = \"500ms\"\n";
const RECONNECT: &str = "\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n";
/// What "within the agent's backoff" allows after a fault is lifted: the longest backoff
/// step (1 s) plus a connect attempt that was already waiting (500 ms), plus 1.5 s for TLS, the
/// config push and this machine's load.
const REOPEN_BOUND: Duration = Duration::from_millis(3000);

/// A gateway in dmz and an agent in internal, with mutual TLS.
struct Deployment {
    dir: Workdir,
    gateway_config: PathBuf,
    gw: Gateway,
    agent: Proc,
}

impl Deployment {
    /// `listeners`: `[[listener]]` tables (and `[outbound]`) for agent.toml; `gateway_extra`:
    /// tables for gateway.toml. Waits until `open` listeners are open on the gateway.
    fn start(z: &Zones, dir: Workdir, gateway_extra: &str, listeners: &str, open: usize) -> Self {
        let certs = make_certs(&dir, "certs", &["--gateway-ip", &z.gateway_ip.to_string()]);
        let gateway_config = dir.write(
            "gateway.toml",
            &format!(
                "[control]\nlisten = \"{}:{CONTROL_PORT}\"\n{}\n\n[peers]\ndefault = \"deny\"\n\
                 except = [\"{}\"]\n\n[clients]\nbind = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
                 {gateway_extra}\n",
                z.gateway_ip,
                gateway_tls(&certs),
                z.internal_ip,
                z.public_ip
            ),
        );
        let gw = in_ns(&z.dmz, || spawn_gateway("gateway", &gateway_config));
        let agent_config = dir.write(
            "agent.toml",
            &format!(
                "site = \"zones\"\nname = \"agent-1\"\ngateways = [\"{}:{CONTROL_PORT}\"]\n{}\n\
                 {AGENT_TIMERS}{RECONNECT}\n{listeners}\n",
                z.gateway_ip,
                agent_tls(&certs, &certs, "agent"),
            ),
        );
        let agent = in_ns(&z.internal, || {
            Proc::spawn(
                "agent",
                &["agent", "--config", agent_config.to_str().unwrap()],
            )
        });
        agent.wait_for_log("control channel up (TLS 1.3", Duration::from_secs(10));
        assert!(
            wait_until(Duration::from_secs(10), || agent
                .count_log("listener open on the gateway")
                >= open),
            "the agent's {open} listener(s) did not open"
        );
        Deployment {
            dir,
            gateway_config,
            gw,
            agent,
        }
    }

    fn stats(&self, z: &Zones) -> Value {
        in_ns(&z.dmz, || self.gw.api("/api/stats"))
    }

    fn listener(&self, z: &Zones, name: &str) -> Value {
        self.stats(z)["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The agent's source port of its current control connection, from the gateway's
    /// "agent connected" log line (`peer=IP:PORT`).
    fn control_port_of_agent(&self) -> u16 {
        let line = self
            .gw
            .proc
            .log_lines()
            .into_iter()
            .rfind(|l| l.contains("agent connected ("))
            .expect("the gateway logged the agent");
        let peer = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peer="))
            .unwrap_or_else(|| panic!("no peer= in {line}"));
        peer.parse::<SocketAddr>().unwrap().port()
    }
}

/// A background process (a client transfer) stopped by PID if the test ends first.
struct Bg(Child);

impl Bg {
    /// Starts `program args` inside `ns`.
    fn spawn(ns: &str, program: &str, args: &[&str]) -> Bg {
        Bg(in_ns(ns, || {
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("start {program}: {e}"))
        }))
    }

    fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// Waits for the exit; (exit code, stderr).
    fn finish(&mut self, timeout: Duration) -> (Option<i32>, String) {
        assert!(
            wait_until(timeout, || !self.running()),
            "still running after {timeout:?}"
        );
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (self.0.wait().unwrap().code(), err)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A curl download from internet, rate limited so it spans a fault.
fn slow_download(z: &Zones, url: &str, out: &Path, rate: &str) -> Bg {
    Bg::spawn(
        &z.internet,
        "curl",
        &[
            "--silent",
            "--show-error",
            "--max-time",
            "90",
            "--limit-rate",
            rate,
            "-o",
            out.to_str().unwrap(),
            url,
        ],
    )
}

/// An HTTP/1.0 download from internet at a steady pace (no bursts, unlike curl's
/// --limit-rate after its buffers filled), so it spans a fault: the body, or the error.
struct Paced {
    got: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
}

impl Paced {
    fn get(z: &Zones, to: SocketAddr, path: &str, bytes_per_sec: f64) -> Paced {
        let mut stream = connect_in(&z.internet, None, to, Duration::from_secs(2)).unwrap();
        let got = Arc::new(AtomicU64::new(0));
        let count = got.clone();
        let request = format!("GET {path} HTTP/1.0\r\nHost: zones\r\n\r\n");
        let handle = std::thread::spawn(move || {
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.write_all(request.as_bytes())?;
            let (started, mut all, mut buf) = (Instant::now(), Vec::new(), vec![0u8; 16 * 1024]);
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                count.store(all.len() as u64, Ordering::SeqCst);
                // The pace is this client's nature: never ahead of bytes_per_sec.
                let due = Duration::from_secs_f64(all.len() as f64 / bytes_per_sec);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
            let head_end = all
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
            let head = String::from_utf8_lossy(&all[..head_end]).to_string();
            if !head.starts_with("HTTP/1.1 200") {
                return Err(std::io::Error::other(head));
            }
            Ok(all.split_off(head_end + 4))
        });
        Paced { got, handle }
    }

    fn running(&self) -> bool {
        !self.handle.is_finished()
    }
}

/// nginx in internal serving `files` (name, bytes) next to its index page.
fn web_server(z: &Zones, dir: &Workdir, proxy_protocol: bool, files: &[(&str, &[u8])]) -> Nginx {
    let ip = z.internal_ip.to_string();
    let nginx = in_ns(&z.internal, || {
        Nginx::start(
            dir,
            "web",
            NginxOptions {
                proxy_protocol,
                ip: &ip,
                ..Default::default()
            },
        )
    });
    for (name, data) in files {
        std::fs::write(nginx.root.join(name), data).unwrap();
    }
    nginx
}

fn web_listener(z: &Zones, nginx: &Nginx, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\npublic = \"8080\"\nbackend = \"{}:{}\"\n{extra}\n",
        z.internal_ip, nginx.port
    )
}

#[test]
fn sftp_http_ftp_and_the_outbound_proxy_cross_the_zones() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("PHASE {what} at {} ms", t0.elapsed().as_millis());
    let z = Zones::build(0);
    phase("zones built");
    let dropped_at_start = z.dropped_into_internal();
    let dir = Workdir::new();
    let (internal_ip, client_ip, public_ip) = (
        z.internal_ip.to_string(),
        z.client_ip.to_string(),
        z.public_ip.to_string(),
    );

    // Real servers in internal; a partner's web server in internet.
    let sshd = Sshd::start_at(&dir, Some(&z.internal), &internal_ip, 22);
    let big = pseudo_random(8 * 1024 * 1024 + 5, 81);
    let web = web_server(&z, &dir, true, &[("big.bin", &big)]);
    const PASSIVE: u16 = 10;
    let base = in_ns(&z.internal, || free_port_range(PASSIVE + 1));
    let ftp = in_ns(&z.internal, || {
        Vsftpd::start(&dir, base + PASSIVE, base, PASSIVE, &public_ip)
    });
    let partner = in_ns(&z.internet, || {
        Nginx::start(
            &dir,
            "partner",
            NginxOptions {
                ip: &client_ip,
                ..Default::default()
            },
        )
    });

    let listeners = format!(
        "[[listener]]\nname = \"sftp\"\npublic = \"2222\"\nbackend = \"{internal_ip}:22\"\n\n\
         {}\n\
         [[listener]]\nname = \"ftp\"\npublic = \"2121\"\nbackend = \"127.0.0.2:{}\"\n\n\
         [[listener]]\nname = \"ftp-pasv\"\npublic = \"{base}-{last}\"\nbackend = \"127.0.0.2:{base}-{last}\"\n\n\
         [outbound]\nlisten = \"{internal_ip}:1080\"\n",
        web_listener(&z, &web, "proxy_protocol = \"v2\""),
        ftp.port,
        last = base + PASSIVE - 1,
    );
    let egress = format!("[egress]\nallow = [\"{client_ip}:{}\"]\n", partner.port);
    let d = Deployment::start(&z, dir, &egress, &listeners, 4);
    let dir = &d.dir;
    d.gw.proc
        .wait_for_log("TLS 1.3, certificate verified", Duration::from_secs(2));

    phase("servers up");
    // SFTP: upload and download 4 MiB, byte for byte.
    let data = pseudo_random(4 * 1024 * 1024 + 3, 82);
    let src = dir.path().join("sftp-up.bin");
    std::fs::write(&src, &data).unwrap();
    let remote = sshd.data_dir.join("zones.bin");
    let back = dir.path().join("sftp-down.bin");
    let batch = format!(
        "put {} {}\nget {} {}\n",
        src.display(),
        remote.display(),
        remote.display(),
        back.display()
    );
    let batch_file = dir.write("sftp-batch", &batch);
    let known_hosts = format!("UserKnownHostsFile={}", sshd.known_hosts.display());
    let mut sftp = Bg::spawn(
        &z.internet,
        "sftp",
        &[
            "-b",
            batch_file.to_str().unwrap(),
            "-i",
            sshd.key.to_str().unwrap(),
            "-P",
            "2222",
            "-o",
            &known_hosts,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "BatchMode=yes",
            "-o",
            "ServerAliveInterval=5",
            &format!("{TEST_USER}@{public_ip}"),
        ],
    );
    if !wait_until(Duration::from_secs(30), || !sftp.running()) {
        for ns in [&z.internet, &z.dmz, &z.internal] {
            eprintln!("DIAG {ns}:\n{}", sh_in(ns, "ss -tnie; nft list ruleset"));
        }
        eprintln!(
            "DIAG connections: {}",
            in_ns(&z.dmz, || d.gw.api("/api/connections"))
        );
        panic!("sftp hangs");
    }
    let (code, err) = sftp.finish(Duration::from_secs(1));
    assert_eq!(
        code,
        Some(0),
        "sftp from internet through the gateway failed: {err}"
    );
    assert_eq!(
        sha256_file(&remote),
        sha256_hex(&data),
        "SFTP upload changed"
    );
    assert_eq!(
        sha256_file(&back),
        sha256_hex(&data),
        "SFTP download changed"
    );
    // sshd speaks no PROXY protocol: it sees the agent, inside.
    assert!(sshd.log_contains(&format!(
        "Accepted publickey for {TEST_USER} from {internal_ip} port"
    )));

    phase("sftp done");
    // HTTP with PROXY protocol v2: nginx logs the internet client's own address.
    let url = format!("http://{public_ip}:8080/");
    let (ok, body, err) = in_ns(&z.internet, || curl(&[&format!("{url}index.html")]));
    assert!(ok, "curl from internet: {err}");
    assert_eq!(body, Nginx::PAGE);
    let got = dir.path().join("http-big.bin");
    let (ok, _, err) = in_ns(&z.internet, || {
        curl(&["-o", got.to_str().unwrap(), &format!("{url}big.bin")])
    });
    assert!(ok, "{err}");
    assert_eq!(sha256_file(&got), sha256_hex(&big), "HTTP download changed");
    let lines = web.access_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert!(
            line.starts_with(&format!("pp={client_ip}:")),
            "nginx must log the internet client {client_ip}: {line}"
        );
        assert!(line.contains(&format!("remote={internal_ip} ")), "{line}");
        assert!(line.contains(" 200 "), "{line}");
    }

    phase("http done");
    // FTP, passive: vsftpd announces the gateway, the passive range crosses the gateway.
    let ftp_data = pseudo_random(4 * 1024 * 1024 + 9, 83);
    let ftp_src = dir.path().join("ftp-up.bin");
    std::fs::write(&ftp_src, &ftp_data).unwrap();
    let ftp_url = format!("ftp://{public_ip}:2121/pub/");
    let (ok, _, err) = in_ns(&z.internet, || {
        curl(&[
            "--disable-epsv",
            "-T",
            ftp_src.to_str().unwrap(),
            &format!("{ftp_url}zones.bin"),
        ])
    });
    assert!(ok, "FTP upload: {err}");
    assert_eq!(
        sha256_file(&ftp.root.join("pub/zones.bin")),
        sha256_hex(&ftp_data)
    );
    let ftp_back = dir.path().join("ftp-down.bin");
    let (ok, _, err) = in_ns(&z.internet, || {
        curl(&[
            "--disable-epsv",
            "-o",
            ftp_back.to_str().unwrap(),
            &format!("{ftp_url}zones.bin"),
        ])
    });
    assert!(ok, "FTP download: {err}");
    assert_eq!(sha256_file(&ftp_back), sha256_hex(&ftp_data));
    let log = std::fs::read_to_string(&ftp.log).unwrap_or_default();
    let announce = format!(
        "227 Entering Passive Mode ({},",
        public_ip.replace('.', ",")
    );
    assert!(
        log.contains(&announce),
        "vsftpd must announce the gateway: {log}"
    );
    assert!(
        d.gw.proc
            .log_lines()
            .iter()
            .filter(|l| l.contains("listener=\"ftp-pasv\"") && l.contains("client connected"))
            .count()
            >= 2,
        "the passive connections must cross the gateway's range listener"
    );

    phase("ftp done");
    // Outbound: internal reaches the partner only through the agent's proxy and the gateway.
    let partner_url = format!("http://{client_ip}:{}/", partner.port);
    let proxy = format!("{internal_ip}:1080");
    let (ok, _, _) = in_ns(&z.internal, || {
        curl(&["--connect-timeout", "1", &partner_url])
    });
    assert!(!ok, "internal must not reach the internet directly");
    let (ok, body, err) = in_ns(&z.internal, || curl(&["--socks5", &proxy, &partner_url]));
    assert!(ok, "curl through SOCKS5: {err}");
    assert_eq!(body, Nginx::PAGE);
    let (ok, body, err) = in_ns(&z.internal, || {
        curl(&[
            "--proxytunnel",
            "--proxy",
            &format!("http://{proxy}"),
            &partner_url,
        ])
    });
    assert!(ok, "curl through HTTP CONNECT: {err}");
    assert_eq!(body, Nginx::PAGE);
    let partner_lines = partner.access_lines();
    assert_eq!(partner_lines.len(), 2, "{partner_lines:?}");
    for line in &partner_lines {
        assert!(
            line.contains(&format!("remote={public_ip} ")),
            "the partner must see the gateway's public address: {line}"
        );
    }
    // A destination outside [egress] allow is refused by the gateway.
    let other = format!("http://{client_ip}:{}/", partner.port + 1);
    let (ok, _, err) = in_ns(&z.internal, || curl(&["--socks5", &proxy, &other]));
    assert!(!ok);
    assert!(err.contains("SOCKS5"), "{err}");
    let stats = d.stats(&z);
    assert_eq!(
        stats["refusals"]["egress_denied"], 1,
        "{}",
        stats["refusals"]
    );

    phase("outbound done");
    // Everything crossed the firewall from the inside out: nothing had to get in.
    assert_eq!(
        z.dropped_into_internal(),
        dropped_at_start,
        "a connection into internal was attempted (and dropped)"
    );
    drop((d, sshd, web, ftp, partner));
}

/// An nftables table in dmz that cuts the agent's control connection (source port `port`) and
/// every new connection to the control port, with `verdict` ("drop" or "reject with tcp
/// reset"). Data connections already open are untouched: stateless rules, no conntrack.
fn cut_control_channel(z: &Zones, port: u16, verdict: &str) {
    let a = z.internal_ip;
    sh_in(
        &z.dmz,
        &format!(
            "nft -f - <<'EOF'\n\
             table inet sallyport_cut {{\n\
               chain input {{ type filter hook input priority -10; policy accept;\n\
                 ip saddr {a} tcp dport {CONTROL_PORT} tcp flags & (syn | ack) == syn {verdict}\n\
                 ip saddr {a} tcp sport {port} tcp dport {CONTROL_PORT} {verdict}\n\
               }}\n\
               chain output {{ type filter hook output priority -10; policy accept;\n\
                 ip daddr {a} tcp sport {CONTROL_PORT} tcp dport {port} {verdict}\n\
               }}\n\
             }}\nEOF"
        ),
    );
}

fn lift_cut(z: &Zones) {
    sh_in(&z.dmz, "nft delete table inet sallyport_cut");
}

#[test]
fn a_cut_control_channel_keeps_transfers_closes_and_reopens_the_listener() {
    let z = Zones::build(1);
    let dir = Workdir::new();
    let file = pseudo_random(24 * 1024 * 1024, 91);
    let web = web_server(&z, &dir, false, &[("big.bin", &file)]);
    let d = Deployment::start(&z, dir, "", &web_listener(&z, &web, ""), 1);
    let public = SocketAddr::new(z.public_ip, 8080);
    let want = sha256_hex(&file);
    // What the gateway has read from the agent for each piping connection, by id.
    let piping = || -> Vec<(u64, u64)> {
        let conns = in_ns(&z.dmz, || d.gw.api("/api/connections"));
        let mut v: Vec<(u64, u64)> = conns
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let agent_read = c["bytes"]["agent_read"].as_u64().unwrap();
                (c["id"].as_u64().unwrap(), agent_read)
            })
            .collect();
        v.sort_unstable();
        v
    };

    for verdict in ["drop", "reject with tcp reset"] {
        let opened_before = d.agent.count_log("listener open on the gateway");
        // Three transfers of 24 MiB at 3 MiB/s: 8 s each, across the cut. (Socket buffers
        // hold up to 10 MB of each, so the gateway's part of them ends about 3 s earlier.)
        let transfers: Vec<Paced> = (0..3)
            .map(|_| Paced::get(&z, public, "/big.bin", 3.0 * 1048576.0))
            .collect();
        assert!(
            wait_until(Duration::from_secs(10), || transfers
                .iter()
                .all(|t| t.got.load(Ordering::SeqCst) >= 256 * 1024)),
            "the transfers did not start"
        );
        let at_cut = piping();
        assert_eq!(at_cut.len(), 3, "{at_cut:?}");

        let port = d.control_port_of_agent();
        let cut_at = Instant::now();
        cut_control_channel(&z, port, verdict);
        assert!(
            wait_until(Duration::from_secs(5), || refuses_in(&z.internet, public)),
            "{verdict}: the public listener did not close"
        );
        let closed_in = cut_at.elapsed();
        d.gw.proc
            .wait_for_log("closing listener", Duration::from_secs(1));
        // While the control channel is down and the listener closed, the transfers keep
        // moving through the gateway, each on its own data connection.
        let closed_at = piping();
        assert!(
            wait_until(Duration::from_secs(5), || {
                let now = piping();
                at_cut.iter().all(|(id, _)| {
                    let then = closed_at.iter().find(|c| c.0 == *id).map_or(0, |c| c.1);
                    now.iter().any(|c| c.0 == *id && c.1 >= then + 512 * 1024)
                })
            }),
            "{verdict}: transfers stalled while the control channel was cut: {at_cut:?} at the \
             cut, {closed_at:?} when the listener closed, {:?} now",
            piping(),
        );
        assert!(transfers.iter().all(Paced::running));
        // Still cut: the listener stays closed (the agent cannot get back in).
        assert!(refuses_in(&z.internet, public));
        assert_eq!(
            d.agent.count_log("listener open on the gateway"),
            opened_before
        );

        let lifted = Instant::now();
        lift_cut(&z);
        assert!(
            wait_until(Duration::from_secs(10), || accepts_in(&z.internet, public)),
            "{verdict}: the listener did not reopen"
        );
        let reopened_in = lifted.elapsed();
        // The gateway opens the port before the agent reads the acknowledgement and logs it.
        assert!(wait_until(Duration::from_secs(2), || d
            .agent
            .count_log("listener open on the gateway")
            > opened_before));
        assert!(
            reopened_in <= REOPEN_BOUND,
            "{verdict}: reopened {reopened_in:?} after the cut was lifted (bound {REOPEN_BOUND:?})"
        );
        let cut_for = lifted - cut_at;
        for t in transfers {
            let body = t.handle.join().unwrap();
            let body = body.unwrap_or_else(|e| panic!("{verdict}: a transfer failed: {e}"));
            assert_eq!(sha256_hex(&body), want, "{verdict}: a transfer changed");
        }
        eprintln!(
            "FIGURE control cut ({verdict}): listener closed {} ms after the cut, cut lifted after \
             {} ms, listener reopened {} ms after that; 3 of 3 transfers (24 MiB each) identical",
            closed_in.as_millis(),
            cut_for.as_millis(),
            reopened_in.as_millis()
        );
        // New clients get through again.
        let (ok, body, err) = in_ns(&z.internet, || {
            curl(&[&format!("http://{public}/index.html")])
        });
        assert!(ok, "{err}");
        assert_eq!(body, Nginx::PAGE);
    }
    assert!(wait_until(Duration::from_secs(5), || d.listener(&z, "web")
        ["active"]
        == 0));
    drop((d, web));
}

#[test]
fn a_killed_gateway_is_rejoined_by_the_agent_on_its_own() {
    let z = Zones::build(2);
    let dir = Workdir::new();
    let file = pseudo_random(24 * 1024 * 1024, 92);
    let web = web_server(&z, &dir, false, &[("big.bin", &file)]);
    let mut d = Deployment::start(&z, dir, "", &web_listener(&z, &web, ""), 1);
    let public = SocketAddr::new(z.public_ip, 8080);
    let url = format!("http://{public}/big.bin");
    let agent_pid = d.agent.pid();

    // A transfer in flight when the gateway dies goes down with it.
    let inflight = Paced::get(&z, public, "/big.bin", 4.0 * 1048576.0);
    assert!(wait_until(Duration::from_secs(10), || inflight
        .got
        .load(Ordering::SeqCst)
        >= 512 * 1024));
    d.gw.proc.kill();
    let ended = inflight.handle.join().unwrap();
    let how = match &ended {
        Ok(body) => format!("closed after {} of {} bytes", body.len(), file.len()),
        Err(e) => format!("error: {e}"),
    };
    assert!(
        ended.as_ref().map_or(true, |b| b.len() < file.len()),
        "the in-flight transfer cannot complete"
    );
    eprintln!("FIGURE gateway SIGKILL: the in-flight transfer ended: {how}");
    assert!(refuses_in(&z.internet, public));
    d.agent
        .wait_for_log("control channel lost", Duration::from_secs(5));

    // Restart it with the same config; the agent comes back without being touched.
    let restarted = Instant::now();
    d.gw = in_ns(&z.dmz, || spawn_gateway("gateway-2", &d.gateway_config));
    assert!(
        wait_until(Duration::from_secs(10), || accepts_in(&z.internet, public)),
        "the listener did not reopen after the gateway restart"
    );
    let reopened_in = restarted.elapsed();
    assert!(
        reopened_in <= REOPEN_BOUND,
        "reopened {reopened_in:?} after the restart"
    );
    assert_eq!(d.agent.pid(), agent_pid);
    // The agent logs "control channel up" as the gateway opens the listener: the line may
    // reach the test a moment after the port answers.
    assert!(
        wait_until(Duration::from_secs(2), || d
            .agent
            .count_log("control channel up")
            == 2),
        "the agent did not log its second control channel"
    );
    let got = d.dir.path().join("after.bin");
    let (ok, _, err) = in_ns(&z.internet, || curl(&["-o", got.to_str().unwrap(), &url]));
    assert!(ok, "{err}");
    assert_eq!(sha256_file(&got), sha256_hex(&file));
    eprintln!(
        "FIGURE gateway restart: listener open again {} ms after the new gateway process started",
        reopened_in.as_millis()
    );
    drop((d, web));
}

#[test]
fn a_backend_that_dies_or_refuses_closes_the_client_and_is_counted() {
    let z = Zones::build(3);
    let dir = Workdir::new();
    let file = pseudo_random(32 * 1024 * 1024, 93);
    let web = web_server(&z, &dir, false, &[("big.bin", &file)]);
    let d = Deployment::start(&z, dir, "", &web_listener(&z, &web, ""), 1);
    let public = SocketAddr::new(z.public_ip, 8080);

    // Dies mid-stream: nginx is SIGKILLed while it sends.
    let out = d.dir.path().join("partial.bin");
    let mut transfer = slow_download(&z, &format!("http://{public}/big.bin"), &out, "4M");
    assert!(wait_until(Duration::from_secs(10), || file_len(&out) >= 1024 * 1024));
    let killed = Instant::now();
    drop(web);
    let (code, err) = transfer.finish(Duration::from_secs(20));
    let closed_in = killed.elapsed();
    // curl 18: "transfer closed with N bytes remaining", an orderly close, not a reset or a hang.
    assert_eq!(code, Some(18), "curl: {err}");
    let got = std::fs::read(&out).unwrap();
    assert!(got.len() < file.len());
    assert!(
        file.starts_with(&got),
        "the {} bytes that arrived must be the file's first bytes",
        got.len()
    );
    let web_stats = d.listener(&z, "web");
    assert_eq!(web_stats["accepted"], 1, "{web_stats}");
    assert_eq!(web_stats["closed"], 1, "{web_stats}");
    assert_eq!(web_stats["active"], 0, "{web_stats}");
    let written = web_stats["bytes"]["client_written"].as_u64().unwrap();
    assert!(
        written >= got.len() as u64 && written < file.len() as u64,
        "client_written {written}, client got {}",
        got.len()
    );
    eprintln!(
        "FIGURE backend SIGKILL mid-stream: client closed (curl exit 18) {} ms after the kill \
         while draining at 4 MiB/s, with {} of {} bytes, all identical",
        closed_in.as_millis(),
        got.len(),
        file.len()
    );

    // Refuses: nginx is gone, the port is closed; the client is closed at once, not left
    // waiting for its 10 s deadline.
    let started = Instant::now();
    let (ok, _, err) = in_ns(&z.internet, || {
        curl(&[&format!("http://{public}/index.html")])
    });
    let refused_in = started.elapsed();
    assert!(!ok);
    assert!(err.contains("Empty reply"), "{err}");
    assert!(refused_in < Duration::from_secs(2), "{refused_in:?}");
    d.agent.wait_for_log("unreachable", Duration::from_secs(2));
    let stats = d.stats(&z);
    assert_eq!(
        stats["refusals"]["client_agent_failed"], 1,
        "{}",
        stats["refusals"]
    );
    let web_stats = d.listener(&z, "web");
    assert_eq!(web_stats["accepted"], 2, "{web_stats}");
    assert_eq!(web_stats["closed"], 2, "{web_stats}");
    eprintln!(
        "FIGURE backend refuses: client closed after {} ms, counted as client_agent_failed",
        refused_in.as_millis()
    );
}

/// One connection of the firehose: (bytes sent, still open).
type Sending = (Arc<AtomicU64>, Arc<AtomicBool>);

/// A backend in internal that sends an endless stream to every connection as fast as it is let,
/// counting what each connection's socket took.
struct Firehose {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Sending>>>,
}

impl Firehose {
    fn start(z: &Zones) -> Firehose {
        let listener = listen_in(&z.internal, SocketAddr::new(z.internal_ip, 0));
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Sending>>> = Arc::default();
        let registry = conns.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (sent, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(true)));
                registry.lock().push((sent.clone(), open.clone()));
                std::thread::spawn(move || {
                    let chunk = vec![0x5au8; 64 * 1024];
                    while let Ok(n) = stream.write(&chunk) {
                        if n == 0 {
                            break;
                        }
                        sent.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    open.store(false, Ordering::SeqCst);
                });
            }
        });
        Firehose { addr, conns }
    }

    /// Bytes sent on the connections still open.
    fn sent_open(&self) -> u64 {
        self.conns
            .lock()
            .iter()
            .filter(|(_, open)| open.load(Ordering::SeqCst))
            .map(|(sent, _)| sent.load(Ordering::SeqCst))
            .sum()
    }
}

/// A client in internet that reads 1 KiB per second until dropped.
struct SlowReader {
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SlowReader {
    fn start(z: &Zones, to: SocketAddr) -> SlowReader {
        let mut stream = connect_in(&z.internet, None, to, Duration::from_secs(2)).unwrap();
        let read = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (read.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            // The reader's pace is the point of this client: 1 KiB, then a second's pause.
            while !stopped.load(Ordering::SeqCst) && stream.read_exact(&mut buf).is_ok() {
                count.fetch_add(1024, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(1));
            }
            // Closing with unread data resets the connection, as a client that gives up does.
        });
        SlowReader { read, stop }
    }
}

impl Drop for SlowReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_slow_client_neither_slows_others_nor_grows_gateway_memory() {
    const SLOW: usize = 4;
    const FAST_BYTES: u64 = 256 * 1024 * 1024;
    let z = Zones::build(4);
    let dir = Workdir::new();
    let firehose = Firehose::start(&z);
    let listener = format!(
        "[[listener]]\nname = \"stream\"\npublic = \"8080\"\nbackend = \"{}\"\n",
        firehose.addr
    );
    let d = Deployment::start(&z, dir, "", &listener, 1);
    let public = SocketAddr::new(z.public_ip, 8080);
    let gw_pid = d.gw.proc.pid();
    let agent_pid = d.agent.pid();
    let active = || d.listener(&z, "stream")["active"].as_u64().unwrap();

    // A fast client reads 256 MiB as fast as it can; its speed in bytes/s.
    let fast = || -> f64 {
        let mut s = connect_in(&z.internet, None, public, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 1024 * 1024];
        let (started, mut got) = (Instant::now(), 0u64);
        while got < FAST_BYTES {
            let n = s.read(&mut buf).expect("fast client read");
            assert!(n > 0, "the stream ended early");
            got += n as u64;
        }
        got as f64 / started.elapsed().as_secs_f64()
    };
    fast(); // warm-up
    assert!(wait_until(Duration::from_secs(5), || active() == 0));
    let gw_base = rss_kib(gw_pid);
    let agent_base = rss_kib(agent_pid);

    // Alone, then with four 1 KiB/s readers lagging behind, three times over.
    let (mut alone, mut with_slow, mut lags) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gw_peak, mut agent_peak) = (gw_base, agent_base);
    for _ in 0..3 {
        alone.push(fast());
        assert!(wait_until(Duration::from_secs(5), || active() == 0));
        let slow: Vec<SlowReader> = (0..SLOW).map(|_| SlowReader::start(&z, public)).collect();
        // Backpressure: once every buffer between the backend and the slow readers is full,
        // the backend can send no more (its count stands still for half a second).
        let (mut last, mut since) = (u64::MAX, Instant::now());
        assert!(
            wait_until(Duration::from_secs(20), || {
                let now = firehose.sent_open();
                if now.abs_diff(last) > 64 * 1024 {
                    (last, since) = (now, Instant::now());
                }
                active() == SLOW as u64 && since.elapsed() >= Duration::from_millis(500)
            }),
            "the backend never stopped sending to the slow readers ({last} bytes)"
        );
        let read: u64 = slow.iter().map(|r| r.read.load(Ordering::SeqCst)).sum();
        lags.push(firehose.sent_open().saturating_sub(read) / SLOW as u64);
        with_slow.push(fast());
        gw_peak = gw_peak.max(rss_kib(gw_pid));
        agent_peak = agent_peak.max(rss_kib(agent_pid));
        drop(slow);
        assert!(
            wait_until(Duration::from_secs(10), || active() == 0),
            "the slow clients' connections did not close"
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (alone_m, with_m) = (median(&mut alone), median(&mut with_slow));
    let ratio = with_m / alone_m;
    let lag_min = *lags.iter().min().unwrap();
    eprintln!(
        "FIGURE slow clients: fast client {:.0} MiB/s alone, {:.0} MiB/s with {SLOW} readers at \
         1 KiB/s (ratio {ratio:.2}); each slow reader {:.1} MiB behind the backend (min of 3), \
         which then stops; gateway RSS {gw_base} KiB -> peak {gw_peak} KiB, agent RSS \
         {agent_base} KiB -> peak {agent_peak} KiB",
        alone_m / 1048576.0,
        with_m / 1048576.0,
        lag_min as f64 / 1048576.0,
    );
    assert!(
        ratio >= 0.5,
        "slow clients slowed a fast one: {alone:?} alone, {with_slow:?} with them"
    );
    assert!(
        lag_min >= 2 * 1024 * 1024,
        "the slow readers should lag by megabytes, lag {lag_min}"
    );
    // Bounded: what the slow readers have not read sits in kernel socket buffers (bounded by
    // tcp_rmem/tcp_wmem), not in the gateway's or the agent's heap.
    assert!(
        gw_peak < gw_base + 16 * 1024,
        "gateway RSS grew from {gw_base} to {gw_peak} KiB"
    );
    assert!(
        agent_peak < agent_base + 16 * 1024,
        "agent RSS grew from {agent_base} to {agent_peak} KiB"
    );
    drop(d);
}
