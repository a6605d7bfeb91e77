//! `loadgen rate`: an open-loop arrival rate. New clients are started on a fixed schedule
//! (R per second for S seconds) whether or not earlier ones have finished, as real clients
//! arrive; each connects, sends one byte and waits for its echo, then (with `--wait-close`)
//! waits for the server to close first, as an HTTP server with `Connection: close` does.
//! Latency runs from the scheduled start, so a tunnel that falls behind shows it in the tail
//! instead of slowing the load down (no coordinated omission). It never retries.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

pub struct Plan {
    pub addr: SocketAddr,
    pub per_s: f64,
    pub secs: f64,
    /// Source addresses, used in turn: the clients of a real gateway come from many hosts, and
    /// one source address would bound the load generator's own ports long before the tunnel's.
    pub from: Vec<IpAddr>,
    pub wait_close: bool,
    pub timeout: Duration,
    pub max_in_flight: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    /// Echo received after this long (from the scheduled start).
    Ok(Duration),
    Connect,
    Timeout,
    /// End of stream or a reset before the echo.
    Closed,
    /// More than max_in_flight clients were waiting: not started.
    Shed,
}

pub async fn run(plan: Plan) {
    let total = (plan.per_s * plan.secs).round() as usize;
    let outcomes = Arc::new(Mutex::new(vec![Outcome::Shed; total]));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut max_in_flight = 0;
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(total);
    let mut i = 0;
    while i < total {
        let elapsed = Instant::now()
            .saturating_duration_since(start)
            .as_secs_f64();
        let due = ((elapsed * plan.per_s) as usize + 1).min(total);
        while i < due {
            let scheduled = start + Duration::from_secs_f64(i as f64 / plan.per_s);
            let now_in_flight = in_flight.load(Ordering::Relaxed);
            max_in_flight = max_in_flight.max(now_in_flight);
            if now_in_flight < plan.max_in_flight {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (outcomes, in_flight) = (outcomes.clone(), in_flight.clone());
                let (addr, src) = (plan.addr, plan.from[i % plan.from.len()]);
                let (wait_close, timeout) = (plan.wait_close, plan.timeout);
                tasks.push(tokio::spawn(async move {
                    let outcome = client(addr, src, scheduled, wait_close, timeout).await;
                    outcomes.lock().unwrap()[i] = outcome;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                }));
            }
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let schedule_secs = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    report(
        &plan,
        &outcomes.lock().unwrap(),
        schedule_secs,
        max_in_flight,
    );
}

async fn client(
    addr: SocketAddr,
    src: IpAddr,
    scheduled: Instant,
    wait_close: bool,
    timeout: Duration,
) -> Outcome {
    let socket = match if src.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    } {
        Ok(s) => s,
        Err(_) => return Outcome::Connect,
    };
    if socket.bind(SocketAddr::new(src, 0)).is_err() {
        return Outcome::Connect;
    }
    let deadline = tokio::time::Instant::from_std(scheduled + timeout);
    let mut s = match tokio::time::timeout_at(deadline, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Outcome::Connect,
        Err(_) => return Outcome::Timeout,
    };
    let _ = s.set_nodelay(true);
    let mut b = [0u8; 1];
    let echoed = tokio::time::timeout_at(deadline, async {
        s.write_all(b"x").await?;
        s.read_exact(&mut b).await
    })
    .await;
    let latency = scheduled.elapsed();
    match echoed {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Outcome::Closed,
        Err(_) => return Outcome::Timeout,
    }
    if wait_close {
        // The server closes first; a missing close is not an error of the client's request.
        let mut rest = [0u8; 64];
        let close_by = tokio::time::Instant::now() + timeout;
        while let Ok(Ok(n)) = tokio::time::timeout_at(close_by, s.read(&mut rest)).await {
            if n == 0 {
                break;
            }
        }
    }
    Outcome::Ok(latency)
}

fn report(plan: &Plan, outcomes: &[Outcome], schedule_secs: f64, max_in_flight: usize) {
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let mut lat: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Ok(d) => Some(d.as_secs_f64() * 1e3),
            _ => None,
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ok = lat.len();
    // Ten windows by scheduled time: where a bound sets in shows as errors or a growing tail.
    let window = outcomes.len().div_ceil(10).max(1);
    let windows: Vec<String> = outcomes
        .chunks(window)
        .enumerate()
        .map(|(k, w)| {
            let mut l: Vec<f64> = w
                .iter()
                .filter_map(|o| match o {
                    Outcome::Ok(d) => Some(d.as_secs_f64() * 1e3),
                    _ => None,
                })
                .collect();
            l.sort_by(|a, b| a.partial_cmp(b).unwrap());
            format!(
                "{{\"from_s\":{:.1},\"ok\":{},\"errors\":{},\"p99_ms\":{:.2}}}",
                (k * window) as f64 / plan.per_s,
                l.len(),
                w.len() - l.len(),
                crate::percentile(&l, 99.0)
            )
        })
        .collect();
    println!(
        "{{\"offered_per_s\":{},\"secs\":{},\"attempted\":{},\"ok\":{ok},\"errors\":{},\
         \"connect_errors\":{},\"timeouts\":{},\"closed_early\":{},\"shed\":{},\
         \"achieved_per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\
         \"max_in_flight\":{max_in_flight},\"sources\":{},\"windows\":[{}]}}",
        plan.per_s,
        plan.secs,
        outcomes.len(),
        outcomes.len() - ok,
        count(|o| *o == Outcome::Connect),
        count(|o| *o == Outcome::Timeout),
        count(|o| *o == Outcome::Closed),
        count(|o| *o == Outcome::Shed),
        ok as f64 / schedule_secs,
        crate::percentile(&lat, 50.0),
        crate::percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
        plan.from.len(),
        windows.join(",")
    );
}
