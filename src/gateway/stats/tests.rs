//! Unit tests of `gateway::stats`: finished and live connections' bytes add up.

use super::*;

fn entry(traffic: &Traffic, id: u64) -> Arc<ConnEntry> {
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    Arc::new(ConnEntry {
        id,
        listener: traffic.listener("s", "l"),
        client_addr: a,
        gateway_addr: a,
        agent_addr: a,
        started: SystemTime::now(),
        started_at: Instant::now(),
        counters: PipeCounters::default(),
        failure: Default::default(),
    })
}

#[test]
fn finished_and_live_bytes_add_up() {
    let t = Traffic::default();
    let c1 = entry(&t, 1);
    let c2 = entry(&t, 2);
    t.start(c1.clone());
    t.start(c2.clone());
    c1.counters.a_read.fetch_add(100, Ordering::Relaxed);
    c2.counters.b_written.fetch_add(7, Ordering::Relaxed);
    let (_, total) = t.snapshot();
    assert_eq!(
        (
            total.active,
            total.bytes.client_read,
            total.bytes.agent_written
        ),
        (2, 100, 7)
    );
    t.finish(1);
    c1.counters.a_read.fetch_add(1000, Ordering::Relaxed); // after finish: not counted
    let (per, total) = t.snapshot();
    assert_eq!(
        (total.active, total.closed, total.bytes.client_read),
        (1, 1, 100)
    );
    assert_eq!(per.len(), 1);
}
