//! The load generator and echo backend of `bench/run`: the measurements that iperf3 and wrk do
//! not make. Each client command prints one JSON object on stdout.
//!
//! ```text
//! loadgen echo  --listen 127.0.0.1:PORT [--mode echo|reply-close]
//!                                                echo server; prints "listening ADDR"
//!                                                (reply-close: echoes once, then closes first)
//! loadgen ports --n N                            N free loopback ports, one a line
//! loadgen ttfb  --addr A --n N [--gap-ms G] [--head HOST]
//!                                                N sequential connect + 1 byte + 1 byte echo
//!                                                (--head: an HTTP/1 request head naming HOST
//!                                                instead of the byte, for a port shared by
//!                                                host name; still one byte read back)
//! loadgen storm --addr A --n N --concurrency C   N connections, C in flight: connect, echo, close
//! loadgen idle  --addr A --n N [--pid NAME=PID]  memory per idle connection (RSS, kernel)
//! loadgen rate  --addr A --per-s R --secs S [--from IP,IP..] [--wait-close 1]
//!                                                open-loop arrivals: R new clients a second
//! loadgen delay --listen A --to B [--ms D | --delay-file F] [--handshake 1]
//!                                                relay adding D ms (or F's number) each way;
//!                                                --handshake 1: new connections pay the RTT
//! ```

mod delay;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod rate;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Args(HashMap<String, Vec<String>>);

impl Args {
    fn parse(rest: &[String]) -> Args {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = rest.iter();
        while let Some(key) = it.next() {
            let key = key
                .strip_prefix("--")
                .unwrap_or_else(|| die(&format!("unexpected {key}")));
            let value = it
                .next()
                .unwrap_or_else(|| die(&format!("--{key} needs a value")));
            map.entry(key.to_string()).or_default().push(value.clone());
        }
        Args(map)
    }
    fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| die(&format!("missing --{key}")))
    }
    fn num(&self, key: &str, default: usize) -> usize {
        match self.0.get(key).and_then(|v| v.last()) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{key}: not a number"))),
            None => default,
        }
    }
    fn float(&self, key: &str, default: f64) -> f64 {
        match self.0.get(key).and_then(|v| v.last()) {
            Some(v) => v
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                .unwrap_or_else(|| die(&format!("--{key}: not a number >= 0"))),
            None => default,
        }
    }
    fn sock(&self, key: &str) -> SocketAddr {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| die(&format!("--{key}: not IP:port")))
    }
    fn addr(&self) -> SocketAddr {
        self.sock("addr")
    }
    fn all(&self, key: &str) -> Vec<String> {
        self.0.get(key).cloned().unwrap_or_default()
    }
}

fn die(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = argv.first() else {
        die("usage: loadgen echo|ports|ttfb|storm|idle|delay [--key value ...]")
    };
    let args = Args::parse(&argv[1..]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match command.as_str() {
        "echo" => {
            let reply_close = match args
                .0
                .get("mode")
                .and_then(|v| v.last())
                .map(String::as_str)
            {
                None | Some("echo") => false,
                Some("reply-close") => true,
                Some(other) => die(&format!("--mode {other}: echo or reply-close")),
            };
            rt.block_on(echo(args.get("listen").to_string(), reply_close))
        }
        "ports" => ports(args.num("n", 1)),
        "ttfb" => ttfb(
            args.addr(),
            args.num("n", 500),
            Duration::from_secs_f64(args.float("gap-ms", 0.0) / 1e3),
            match args.0.get("head").and_then(|v| v.last()) {
                Some(host) => format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
                None => b"x".to_vec(),
            },
        ),
        "storm" => rt.block_on(storm(
            args.addr(),
            args.num("n", 10_000),
            args.num("concurrency", 50),
        )),
        "idle" => rt.block_on(idle(args.addr(), args.num("n", 1000), args.all("pid"))),
        "rate" => {
            let addr = args.addr();
            let from = match args.0.get("from").and_then(|v| v.last()) {
                Some(list) => list
                    .split(',')
                    .map(|ip| {
                        ip.trim()
                            .parse()
                            .unwrap_or_else(|_| die(&format!("--from: {ip} is not an IP")))
                    })
                    .collect(),
                None => vec![if addr.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                }],
            };
            rt.block_on(rate::run(rate::Plan {
                addr,
                per_s: args.float("per-s", 2000.0).max(1.0),
                secs: args.float("secs", 60.0),
                from,
                wait_close: args.num("wait-close", 0) != 0,
                timeout: Duration::from_secs_f64(args.float("timeout-ms", 5000.0) / 1e3),
                max_in_flight: args.num("max-in-flight", 8000),
            }))
        }
        "delay" => {
            let fixed = args.0.get("ms").map(|_| args.float("ms", 0.0));
            rt.block_on(delay::run(delay::Link {
                listen: args.get("listen").to_string(),
                to: args.sock("to"),
                fixed_ms: fixed,
                delay_file: args.all("delay-file").pop().map(Into::into),
                handshake: args.num("handshake", 0) != 0,
            }))
        }
        other => die(&format!("unknown command {other}")),
    }
}

/// Echoes every connection until it ends and never closes first; with `reply_close`, echoes
/// the first chunk and then closes first (a server answering `Connection: close`).
async fn echo(listen: String, reply_close: bool) {
    let listener = TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| die(&format!("bind {listen}: {e}")));
    println!("listening {}", listener.local_addr().unwrap());
    let _ = std::io::stdout().flush();
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            // Out of descriptors for a moment: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() || reply_close {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Free loopback ports (bound then released; the caller uses them at once), from the 12,000
/// ports below the kernel's ephemeral range. A port taken from inside that range (what binding
/// port 0 gives) can be handed by the kernel to any other socket between this check and the
/// tunnel's own bind: an outgoing connection's source port, or another process's port-0 bind.
/// Once an agent's admin server (bound to port 0) got the public port its gateway was about to
/// open, and every client of that run reached the admin server instead (bench/run's CI failure
/// "no echo through sp-tls").
fn ports(n: usize) {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let first = low.saturating_sub(12000).max(1024);
    let span = low - first;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let start = (nanos ^ std::process::id().wrapping_mul(2654435761)) % span;
    let held: Vec<std::net::TcpListener> = (0..span)
        .map(|i| first + (start + i) % span)
        .filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", port as u16)).ok())
        .take(n)
        .collect();
    assert_eq!(held.len(), n, "fewer than {n} free ports below {low}");
    for l in &held {
        println!("{}", l.local_addr().unwrap().port());
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One connection: connect, send one byte, wait for its echo (blocking, for timing).
fn one_echo(addr: SocketAddr, first: &[u8]) -> std::io::Result<std::net::TcpStream> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(first)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(s)
}

/// Time to first byte of a new connection, sequentially, with blocking sockets (no runtime in
/// the measured path). `gap` spaces the connections out (a site whose clients come one at a
/// time, so a tunnel's pool has refilled before the next one).
fn ttfb(addr: SocketAddr, n: usize, gap: Duration, first: Vec<u8>) {
    let mut samples = Vec::with_capacity(n);
    let mut errors = 0;
    for i in 0..n {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let t = Instant::now();
        match one_echo(addr, &first) {
            Ok(s) => {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                drop(s);
            }
            Err(_) => errors += 1,
        }
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{{\"n\":{n},\"errors\":{errors},\"p50_us\":{:.1},\"p99_us\":{:.1},\"min_us\":{:.1}}}",
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.first().copied().unwrap_or(f64::NAN)
    );
}

async fn echo_once(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(s)
}

/// `n` connections as fast as possible with `concurrency` in flight.
async fn storm(addr: SocketAddr, n: usize, concurrency: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, errors) = (next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match tokio::time::timeout(TIMEOUT, echo_once(addr)).await {
                    Ok(Ok(s)) => drop(s),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "{{\"n\":{n},\"concurrency\":{concurrency},\"errors\":{errors},\"secs\":{secs:.3},\"conns_per_s\":{:.1}}}",
        (n - errors) as f64 / secs
    );
}

/// One process's memory and descriptors.
#[derive(Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    fds: u64,
}

fn proc_sample(pid: &str) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = field_kib(&status, "VmRSS:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    ProcSample { rss_kib, fds }
}

fn field_kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory that follows sockets: slab (socket, file, inode and dentry objects ...) and
/// the TCP socket-buffer pages of /proc/net/sockstat. Both are system-wide.
#[derive(Clone, Copy, Default)]
struct KernelSample {
    slab_kib: u64,
    tcp_mem_kib: u64,
    sockets: u64,
}

fn kernel_sample() -> KernelSample {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let mut tcp_mem_pages = 0;
    let mut sockets = 0;
    for line in sockstat.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"TCP:") {
            if let Some(i) = words.iter().position(|w| *w == "mem") {
                tcp_mem_pages = words.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        if words.first() == Some(&"sockets:") {
            sockets = words.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    KernelSample {
        slab_kib: field_kib(&meminfo, "Slab:"),
        tcp_mem_kib: tcp_mem_pages * 4,
        sockets,
    }
}

/// Memory per idle piped connection: samples the named processes and the kernel, opens `n`
/// connections (each proves the path with a one-byte echo), samples again, closes them, and
/// waits for the processes to let go of their descriptors.
async fn idle(addr: SocketAddr, n: usize, pids: Vec<String>) {
    let pids: Vec<(String, String)> = pids
        .iter()
        .map(|p| {
            let (name, pid) = p.split_once('=').unwrap_or_else(|| die("--pid NAME=PID"));
            (name.to_string(), pid.to_string())
        })
        .collect();
    let procs_before: Vec<ProcSample> = pids.iter().map(|(_, p)| proc_sample(p)).collect();
    let kernel_before = kernel_sample();

    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100.min(n) {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut errors = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match tokio::time::timeout(TIMEOUT, echo_once(addr)).await {
                    Ok(Ok(s)) => mine.push(s),
                    _ => errors += 1,
                }
            }
            (mine, errors)
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut errors = 0;
    for t in tasks {
        let (mine, e) = t.await.unwrap();
        held.extend(mine);
        errors += e;
    }
    let open_secs = start.elapsed().as_secs_f64();
    // Let lazily freed memory and deferred work settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let procs_after: Vec<ProcSample> = pids.iter().map(|(_, p)| proc_sample(p)).collect();
    let kernel_after = kernel_sample();

    let mut procs_json = Vec::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let (b, a) = (procs_before[i], procs_after[i]);
        procs_json.push(format!(
            "\"{name}\":{{\"rss_before_kib\":{},\"rss_after_kib\":{},\"fds_before\":{},\"fds_after\":{}}}",
            b.rss_kib, a.rss_kib, b.fds, a.fds
        ));
    }
    println!(
        "{{\"n\":{n},\"open\":{},\"errors\":{errors},\"open_secs\":{open_secs:.3},\"procs\":{{{}}},\
         \"slab_before_kib\":{},\"slab_after_kib\":{},\"tcp_mem_before_kib\":{},\"tcp_mem_after_kib\":{},\
         \"sockets_before\":{},\"sockets_after\":{}}}",
        held.len(),
        procs_json.join(","),
        kernel_before.slab_kib,
        kernel_after.slab_kib,
        kernel_before.tcp_mem_kib,
        kernel_after.tcp_mem_kib,
        kernel_before.sockets,
        kernel_after.sockets
    );
    let _ = std::io::stdout().flush();

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, (_, pid)) in pids.iter().enumerate() {
        while proc_sample(pid).fds > procs_before[i].fds + 32 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
