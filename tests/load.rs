//! Load in the three zones of tests/zones.rs: 8,000 idle client connections from the internet
//! namespace (spread over 21 source addresses, under the gateway's default 512 per address)
//! plus 50 active echo transfers, through the gateway in dmz (mutual TLS, TLS data connections)
//! and the agent in internal (behind the firewall) to an echo backend; held, then closed.
//! Asserts: no error anywhere (every connection reaches the backend, every transfer comes back
//! identical, every idle connection still answers after the hold, no refusal counted), and
//! the gateway's and the agent's open descriptors and RSS back within 10 % of their baseline
//! (no leak). Reports the peak RSS per connection of both.
//!
//! RSS and glibc: glibc keeps memory a program frees for reuse instead of giving it back. The
//! daemons themselves call `malloc_trim(0)` once their connection count has fallen to half its
//! peak (src/mem.rs), so the daemons run here exactly as shipped and their RSS must come back.
//! SALLYPORT_LOAD_TRIM=1 adds the older LD_PRELOAD shim that trims every second (built with
//! `cc`), for comparison.
//!
//! The CI form holds 8,000 + 50 for 3 s, once. `bench/load` runs longer forms through the
//! environment: SALLYPORT_LOAD_IDLE, _ACTIVE, _ACTIVE_MIB (per transfer), _HOLD_SECS, _ROUNDS,
//! _TRIM (1/0), _DATA_TLS (1/0: plaintext data connections), _PRELOAD (another allocator, e.g. jemalloc, instead of the shim),
//! _DAEMON_ENV (more environment for both daemons, e.g. `MALLOC_ARENA_MAX=2`), _POOL (the
//! agent's `pool`, e.g. `{ min = 4, max = 32 }`: the adaptive pool) and _REPORT (a
//! file that gets one JSON line per round).

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use support::netns::{in_ns, open_fds, rss_kib, runtime_in, sh_in, Zones};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Connections the gateway takes from one address by default (`max_connections_per_ip`),
/// with room to spare.
const PER_SOURCE_IP: usize = 400;
/// Clients connecting at once.
const CONNECTING: usize = 200;
const PUBLIC_PORT: u16 = 9000;

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: not a number: {e}")),
        Err(_) => default,
    }
}

/// What the sampler saw of one process.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    rss_kib: u64,
    fds: usize,
}

fn figures(pid: u32) -> Figures {
    Figures {
        rss_kib: rss_kib(pid),
        fds: open_fds(pid),
    }
}

/// Samples the peaks of `pids` every 100 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Vec<Figures>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(vec![Figures::default(); pids.len()]));
        let (stopped, seen) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                for (i, pid) in pids.iter().enumerate() {
                    let f = figures(*pid);
                    let mut p = seen.lock();
                    p[i].rss_kib = p[i].rss_kib.max(f.rss_kib);
                    p[i].fds = p[i].fds.max(f.fds);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Figures> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let peaks = self.peaks.lock().clone();
        peaks
    }
}

/// The backend: a `+` on accept (so a client knows its connection reached it), then echo.
/// Idle connections hold no buffer.
async fn echo_backend(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            if stream.write_all(b"+").await.is_err() || stream.readable().await.is_err() {
                return;
            }
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Connects from `source` and waits for the backend's `+`.
async fn open_client(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let limit = Duration::from_secs(30);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream = tokio::time::timeout(limit, socket.connect(to)).await??;
    let mut plus = [0u8; 1];
    tokio::time::timeout(limit, stream.read_exact(&mut plus)).await??;
    if plus != *b"+" {
        return Err(std::io::Error::other("the backend's greeting is missing"));
    }
    Ok(stream)
}

/// Opens `count` clients, `CONNECTING` at a time, round robin over `sources`.
async fn open_clients(
    count: usize,
    sources: Arc<Vec<IpAddr>>,
    to: SocketAddr,
) -> (Vec<TcpStream>, Vec<String>) {
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let mut set = JoinSet::new();
    for i in 0..count {
        let (gate, sources) = (gate.clone(), sources.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            open_client(sources[i % sources.len()], to).await
        });
    }
    let (mut streams, mut errors) = (Vec::with_capacity(count), Vec::new());
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(s) => streams.push(s),
            Err(e) => errors.push(format!("open: {e}")),
        }
    }
    (streams, errors)
}

/// One active transfer: `data` out and back, compared.
async fn transfer(source: IpAddr, to: SocketAddr, data: Arc<Vec<u8>>) -> Result<(), String> {
    let stream = open_client(source, to)
        .await
        .map_err(|e| format!("transfer open: {e}"))?;
    let (mut r, mut w) = stream.into_split();
    let out = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&out).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut back))
        .await
        .map_err(|_| "transfer: timed out".to_string())?
        .map_err(|e| format!("transfer read: {e}"))?;
    writer
        .await
        .unwrap()
        .map_err(|e| format!("transfer write: {e}"))?;
    if back.len() != data.len() || sha256_hex(&back) != sha256_hex(&data) {
        return Err(format!(
            "transfer: {} bytes came back for {}, or other bytes",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

/// Every idle client sends a byte and gets it echoed: still connected end to end.
async fn ping_all(streams: Vec<TcpStream>) -> (Vec<TcpStream>, Vec<String>) {
    let mut set = JoinSet::new();
    for mut s in streams {
        set.spawn(async move {
            let check = async {
                s.write_all(b"p").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(b == *b"p")
            };
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(30), check).await,
                Ok(Ok(true))
            );
            (s, ok)
        });
    }
    let (mut back, mut errors) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        let (s, ok) = r.unwrap();
        if !ok {
            errors.push("an idle client did not get its byte back".to_string());
        }
        back.push(s);
    }
    (back, errors)
}

/// Runs `fut` on `rt` (whose threads live in a namespace) and waits for it.
fn run<T: Send + 'static>(
    rt: &Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(rt.spawn(fut)).unwrap()
}

/// The LD_PRELOAD shim: a thread that hands freed memory back to the kernel every second.
const TRIM_SHIM: &str = "#include <malloc.h>
#include <pthread.h>
#include <unistd.h>
static void *trim(void *arg) { (void)arg; for (;;) { sleep(1); malloc_trim(0); } return 0; }
__attribute__((constructor)) static void start(void) {
  pthread_t t; pthread_create(&t, 0, trim, 0); pthread_detach(t);
}
";

fn build_trim_shim(dir: &Workdir) -> PathBuf {
    let src = dir.write("trim.c", TRIM_SHIM);
    let lib = dir.path().join("libtrim.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-lpthread")
        .output()
        .expect("cc (the C compiler Rust links with) builds the malloc_trim shim");
    assert!(
        out.status.success(),
        "cc trim.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// Starts `sallyport ROLE --config path` in `ns` at the shipped log level (info), with
/// `preload` as LD_PRELOAD.
fn spawn_daemon(ns: &str, name: &str, role: &str, config: &Path, preload: Option<&str>) -> Proc {
    let mut args = vec!["SALLYPORT_LOG=info".to_string()];
    if let Some(lib) = preload {
        args.push(format!("LD_PRELOAD={lib}"));
    }
    // Extra environment for both daemons (e.g. MALLOC_ARENA_MAX=2), space separated.
    if let Ok(extra) = std::env::var("SALLYPORT_LOAD_DAEMON_ENV") {
        args.extend(extra.split_whitespace().map(str::to_string));
    }
    for a in [BIN, role, "--config", config.to_str().unwrap()] {
        args.push(a.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = in_ns(ns, || Proc::spawn_program(name, "env", &args));
    // env execs the binary: the PID is the daemon's own.
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{}/comm", proc.pid()))
            .is_ok_and(|c| c.trim() == "sallyport")
    }));
    proc
}

/// The figures of `pid` once they stop moving: two samples 1.2 s apart (more than the trim
/// shim's period) within 1 %.
fn settled_figures(pid: u32) -> Figures {
    let mut last = figures(pid);
    wait_until(Duration::from_secs(15), || {
        std::thread::sleep(Duration::from_millis(1200));
        let now = figures(pid);
        let stable =
            now.fds == last.fds && now.rss_kib.abs_diff(last.rss_kib) * 100 <= last.rss_kib;
        last = now;
        stable
    });
    last
}

/// Connections in TIME-WAIT in a namespace.
fn time_wait(ns: &str) -> usize {
    sh_in(ns, "ss -tanH state time-wait | wc -l")
        .trim()
        .parse()
        .unwrap()
}

fn within_10_percent(now: u64, base: u64) -> bool {
    now * 10 <= base * 11
}

#[test]
fn eight_thousand_idle_and_fifty_active_clients_then_no_leak() {
    let idle = env_or("SALLYPORT_LOAD_IDLE", 8000) as usize;
    let active = env_or("SALLYPORT_LOAD_ACTIVE", 50) as usize;
    let active_bytes = env_or("SALLYPORT_LOAD_ACTIVE_MIB", 4) as usize * 1024 * 1024;
    let hold = Duration::from_secs(env_or("SALLYPORT_LOAD_HOLD_SECS", 3));
    let rounds = env_or("SALLYPORT_LOAD_ROUNDS", 1);
    let trim = env_or("SALLYPORT_LOAD_TRIM", 0) == 1;
    let data_tls = env_or("SALLYPORT_LOAD_DATA_TLS", 1) == 1;
    let preload_other = std::env::var("SALLYPORT_LOAD_PRELOAD").ok();
    let report = std::env::var("SALLYPORT_LOAD_REPORT").ok();
    // The agent's `pool` as a TOML value (`{ min = 4, max = 32 }`: the adaptive pool); shipped
    // default otherwise.
    let pool = std::env::var("SALLYPORT_LOAD_POOL")
        .map(|p| format!("pool = {p}\n"))
        .unwrap_or_default();
    let clients = idle + active;

    // This process holds both ends in its two namespaces: a client and a backend socket each.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
    assert!(
        nofile as usize >= 2 * clients + 500,
        "{clients} clients need {} open files in this test process; the limit is {nofile}",
        2 * clients + 500
    );

    let z = Zones::build(10);
    let sources = Arc::new(z.add_client_ips(clients.div_ceil(PER_SOURCE_IP) as u8));
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &["--gateway-ip", &z.gateway_ip.to_string()]);

    let shim = (trim && preload_other.is_none()).then(|| build_trim_shim(&dir));
    let preload = preload_other
        .clone()
        .or_else(|| shim.as_ref().map(|p| p.display().to_string()));
    let allocator = match (&preload_other, trim) {
        (Some(lib), _) => lib.clone(),
        (None, true) => "glibc + malloc_trim shim".to_string(),
        (None, false) => "glibc, as shipped (trims after load peaks)".to_string(),
    };
    // Clients and the agent open 8,000 connections a round: let TIME-WAIT ports be reused.
    for ns in [&z.internet, &z.internal] {
        sh_in(ns, "sysctl -qw net.ipv4.tcp_tw_reuse=1");
    }

    let backend_rt = runtime_in(&z.internal, 2);
    let backend_addr = SocketAddr::new(z.internal_ip, 7000);
    let listener = run(
        &backend_rt,
        async move { TcpListener::bind(backend_addr).await },
    )
    .expect("bind the backend in internal");
    backend_rt.spawn(echo_backend(listener));

    let gateway_config = dir.write(
        "gateway.toml",
        &format!(
            "[control]\nlisten = \"{}:44500\"\n{}\ndata_tls = {data_tls}\n\n[peers]\ndefault = \"deny\"\nexcept = [\"{}\"]\n\n\
             [clients]\nbind = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            z.gateway_ip,
            gateway_tls(&certs),
            z.internal_ip,
            z.public_ip
        ),
    );
    let gw_proc = spawn_daemon(
        &z.dmz,
        "gateway",
        "gateway",
        &gateway_config,
        preload.as_deref(),
    );
    let line = gw_proc.wait_for_log(
        "admin API and dashboard listening on http://",
        Duration::from_secs(10),
    );
    let admin: SocketAddr = line
        .rsplit("http://")
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let gw = Gateway {
        control: SocketAddr::new(z.gateway_ip, 44500),
        admin: Some(admin),
        proc: gw_proc,
    };
    let agent_config = dir.write(
        "agent.toml",
        &format!(
            "site = \"load\"\nname = \"agent-1\"\ngateways = [\"{}\"]\n{}\n{pool}\n\
             [[listener]]\nname = \"echo\"\npublic = \"{PUBLIC_PORT}\"\nbackend = \"{backend_addr}\"\n",
            gw.control,
            agent_tls(&certs, &certs, "agent")
        ),
    );
    let agent = spawn_daemon(
        &z.internal,
        "agent",
        "agent",
        &agent_config,
        preload.as_deref(),
    );
    agent.wait_for_log("open on the gateway", Duration::from_secs(10));
    let stats = || in_ns(&z.dmz, || gw.api("/api/stats"));
    let public = SocketAddr::new(z.public_ip, PUBLIC_PORT);
    let pids = [gw.proc.pid(), agent.pid()];

    let client_rt = runtime_in(&z.internet, 2);
    let data = Arc::new(pseudo_random(active_bytes, 4242));

    // Warm-up: pools, allocator arenas, the TLS session machinery.
    let (warm, errors) = run(&client_rt, open_clients(200, sources.clone(), public));
    assert!(errors.is_empty(), "{errors:?}");
    drop(warm);
    assert!(wait_until(Duration::from_secs(20), || stats()["totals"]
        ["active"]
        == 0));
    // The cold baseline, once the descriptors (the agent refills its warm pool) and RSS settle.
    let cold: Vec<Figures> = pids.iter().map(|p| settled_figures(*p)).collect();
    // Round 0 is a full-size warm-up: what a daemon keeps once it has served this load (hash
    // tables keep their capacity, the splice pipe pool up to 64 pipes) is its baseline, not a
    // leak; every later round must come back to it.
    let mut base = cold.clone();
    let mut accepted = stats()["totals"]["accepted"].as_u64().unwrap();

    for round in 0..=rounds {
        let sampler = Sampler::start(pids.to_vec());
        let started = Instant::now();
        let (streams, mut errors) = run(&client_rt, open_clients(idle, sources.clone(), public));
        let opened_in = started.elapsed();
        let held = Instant::now();
        // The active transfers run while the idle clients are held.
        let results = run(&client_rt, {
            let (sources, data) = (sources.clone(), data.clone());
            async move {
                let mut set = JoinSet::new();
                for i in 0..active {
                    let (sources, data) = (sources.clone(), data.clone());
                    set.spawn(async move {
                        transfer(sources[(idle + i) % sources.len()], public, data).await
                    });
                }
                let mut out = Vec::new();
                while let Some(r) = set.join_next().await {
                    out.push(r.unwrap());
                }
                out
            }
        });
        let transferred_in = held.elapsed();
        errors.extend(results.into_iter().filter_map(Result::err));
        let during = stats();
        if let Some(left) = hold.checked_sub(held.elapsed()) {
            std::thread::sleep(left); // the hold itself: how long the load stays on
        }
        let (streams, ping_errors) = run(&client_rt, ping_all(streams));
        errors.extend(ping_errors);
        let held_for = held.elapsed();
        let open_at_end = streams.len();
        let closing = Instant::now();
        drop(streams);
        assert!(
            wait_until(Duration::from_secs(60), || stats()["totals"]["active"] == 0),
            "the gateway still has active clients: {}",
            stats()["totals"]
        );
        // Back to the baseline: descriptors at once, memory once trimmed.
        let check_rss = preload_other.is_none();
        let back = round == 0
            || wait_until(Duration::from_secs(30), || {
                pids.iter().zip(&base).all(|(p, b)| {
                    let f = figures(*p);
                    within_10_percent(f.fds as u64, b.fds as u64)
                        && (!check_rss || within_10_percent(f.rss_kib, b.rss_kib))
                })
            });
        let closed_in = closing.elapsed();
        let peaks = sampler.finish();
        let after: Vec<Figures> = pids.iter().map(|p| settled_figures(*p)).collect();
        let end = stats();
        let time_waits = (
            time_wait(&z.internet),
            time_wait(&z.dmz),
            time_wait(&z.internal),
        );

        let per_conn = |i: usize| {
            (peaks[i].rss_kib.saturating_sub(cold[i].rss_kib)) as f64 * 1024.0 / clients as f64
        };
        let daemon = |i: usize| {
            serde_json::json!({
                "cold_rss_kib": cold[i].rss_kib,
                "base_rss_kib": base[i].rss_kib,
                "peak_rss_kib": peaks[i].rss_kib,
                "after_rss_kib": after[i].rss_kib,
                "cold_fds": cold[i].fds,
                "base_fds": base[i].fds,
                "peak_fds": peaks[i].fds,
                "after_fds": after[i].fds,
                "peak_rss_bytes_per_conn": per_conn(i).round(),
            })
        };
        let line = serde_json::json!({
            "round": round,
            "warmup": round == 0,
            "allocator": allocator,
            "data_tls": data_tls,
            "idle": idle,
            "active": active,
            "active_mib": active_bytes / 1048576,
            "hold_s": (held_for.as_secs_f64() * 10.0).round() / 10.0,
            "opened_s": (opened_in.as_secs_f64() * 100.0).round() / 100.0,
            "transfers_s": (transferred_in.as_secs_f64() * 100.0).round() / 100.0,
            "closed_s": (closed_in.as_secs_f64() * 100.0).round() / 100.0,
            "errors": errors.len(),
            "time_wait": {"internet": time_waits.0, "dmz": time_waits.1, "internal": time_waits.2},
            "gateway": daemon(0),
            "agent": daemon(1),
        });
        eprintln!("LOAD {line}");
        if let Some(path) = &report {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            writeln!(f, "{line}").unwrap();
        }

        assert!(
            errors.is_empty(),
            "{} errors, first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        assert_eq!(open_at_end, idle);
        assert_eq!(
            during["totals"]["active"].as_u64().unwrap() as usize,
            idle,
            "{}",
            during["totals"]
        );
        accepted += clients as u64;
        assert_eq!(end["totals"]["accepted"], accepted, "{}", end["totals"]);
        assert_eq!(end["totals"]["rejected"], 0, "{}", end["totals"]);
        for (reason, count) in end["refusals"].as_object().unwrap() {
            assert_eq!(count, 0, "refusals.{reason}: {}", end["refusals"]);
        }
        assert!(
            peaks[0].fds >= 2 * idle && peaks[1].fds >= 2 * idle,
            "both daemons held two sockets per client: {peaks:?}"
        );
        assert!(
            back,
            "not back within 10 % of the baseline ({allocator}): {cold:?} cold, {base:?} after \
             the warm-up round, {after:?} now"
        );
        if round == 0 {
            base = after;
        }
    }
    drop((agent, gw, client_rt, backend_rt));
}
