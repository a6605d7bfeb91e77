//! [`Traffic`]: the connection table and the byte totals per listener. A connection is entered
//! once when it starts and folded into its listener's totals once when it ends, never locked per
//! chunk; live totals add the active connections' counters on read; [`run_sampler`] records the
//! totals every second for rates over a sliding window and the dashboard's charts.

use super::*;

/// Seconds kept for charts.
const HISTORY: usize = 300;
/// Seconds over which rates are averaged.
const RATE_WINDOW: usize = 5;

/// (site, listener name).
type ListenerKey = (String, String);

/// A listener's recent byte totals, for its rates.
type RateWindow = VecDeque<(Instant, Bytes4)>;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    bytes: Bytes4,
    active: u64,
}

/// Failure reports remembered for clients that are not piping yet.
const EARLY_FAILURES: usize = 64;

/// Listener stats, active connections and the rate history.
#[derive(Debug, Default)]
pub struct Traffic {
    listeners: Mutex<BTreeMap<(String, String), Arc<ListenerStats>>>,
    connections: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    /// Agents' failure reports for clients not piping yet (a warm-pool agent may report one
    /// before the gateway has read its `PoolAccepted`), oldest first, at most [`EARLY_FAILURES`].
    early_failures: Mutex<VecDeque<(u64, String)>>,
    samples: Mutex<VecDeque<Sample>>,
    listener_samples: Mutex<HashMap<ListenerKey, RateWindow>>,
    /// Marked when a connection starts or stops piping ([`crate::gateway::watch`]).
    pub changes: crate::gateway::watch::Changes,
}

/// A connection registered in [`Traffic`] until this is dropped.
pub struct Tracking<'a> {
    traffic: &'a Traffic,
    id: u64,
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        self.traffic.finish(self.id);
    }
}

/// Totals and rates of one listener or of the whole gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficSnapshot {
    pub accepted: u64,
    pub rejected: u64,
    pub closed: u64,
    pub active: u64,
    pub pending: u64,
    pub bytes: Bytes4,
    /// Bytes per second over the last few seconds.
    pub rates: Rates4,
    /// A UDP listener's datagram counts (absent for TCP and in totals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSnapshot>,
}

impl TrafficSnapshot {
    /// No client, no byte: what totals start from.
    fn zero(rates: Rates4) -> Self {
        TrafficSnapshot {
            accepted: 0,
            rejected: 0,
            closed: 0,
            active: 0,
            pending: 0,
            bytes: Bytes4::default(),
            rates,
            udp: None,
        }
    }

    /// Adds another snapshot's counters and bytes (not its rates).
    fn add_counts(&mut self, t: &TrafficSnapshot) {
        self.accepted += t.accepted;
        self.rejected += t.rejected;
        self.closed += t.closed;
        self.active += t.active;
        self.pending += t.pending;
        self.bytes = self.bytes + t.bytes;
    }
}

/// The sum of several listeners' snapshots (rates add up too).
pub fn sum<'a>(snaps: impl Iterator<Item = &'a TrafficSnapshot>) -> TrafficSnapshot {
    let mut total = TrafficSnapshot::zero(Rates4::default());
    for t in snaps {
        total.add_counts(t);
        total.rates.client_read += t.rates.client_read;
        total.rates.client_written += t.rates.client_written;
        total.rates.agent_read += t.rates.agent_read;
        total.rates.agent_written += t.rates.agent_written;
    }
    total
}

/// The charts' data: one point per second, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct History {
    pub interval_seconds: u64,
    pub client_read: Vec<f64>,
    pub client_written: Vec<f64>,
    pub agent_read: Vec<f64>,
    pub agent_written: Vec<f64>,
    pub active: Vec<u64>,
}

impl Traffic {
    /// The stats of a listener, made on first use.
    pub fn listener(&self, site: &str, name: &str) -> Arc<ListenerStats> {
        self.listeners
            .lock()
            .entry((site.to_string(), name.to_string()))
            .or_insert_with(|| Arc::new(ListenerStats::new(site, name)))
            .clone()
    }

    pub fn listeners(&self) -> Vec<Arc<ListenerStats>> {
        self.listeners.lock().values().cloned().collect()
    }

    /// Registers a connection that starts piping.
    pub fn start(&self, entry: Arc<ConnEntry>) {
        let mut connections = self.connections.lock();
        let mut early = self.early_failures.lock();
        if let Some(at) = early.iter().position(|(id, _)| *id == entry.id) {
            let (_, reason) = early.remove(at).expect("found");
            let _ = entry.failure.set(reason);
        }
        connections.insert(entry.id, entry);
        self.changes.mark();
    }

    /// [`Traffic::start`], and [`Traffic::finish`] when the returned guard is dropped (for
    /// [`crate::pipe::tracked`]).
    pub fn track(&self, entry: Arc<ConnEntry>) -> Tracking<'_> {
        let id = entry.id;
        self.start(entry);
        Tracking { traffic: self, id }
    }

    /// Unregisters a connection and folds its bytes into its listener's totals.
    pub fn finish(&self, id: u64) {
        let Some(entry) = self.connections.lock().remove(&id) else {
            return;
        };
        let bytes = entry.bytes();
        let mut finished = entry.listener.finished.lock();
        *finished = *finished + bytes;
        entry.listener.closed.fetch_add(1, Ordering::Relaxed);
        self.changes.mark();
    }

    /// Records the agent's report that it cannot serve a client that is piping already, or
    /// about to (kept for [`Traffic::start`]; the oldest of [`EARLY_FAILURES`] are forgotten).
    pub fn fail(&self, id: u64, reason: &str) {
        let connections = self.connections.lock();
        match connections.get(&id) {
            Some(entry) => {
                let _ = entry.failure.set(reason.to_string());
            }
            None => {
                let mut early = self.early_failures.lock();
                if early.len() >= EARLY_FAILURES {
                    early.pop_front();
                }
                early.push_back((id, reason.to_string()));
            }
        }
    }

    pub fn connections(&self) -> Vec<Arc<ConnEntry>> {
        let mut v: Vec<_> = self.connections.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Live bytes and active count per listener.
    fn live(&self) -> HashMap<(String, String), (Bytes4, u64)> {
        let mut live: HashMap<(String, String), (Bytes4, u64)> = HashMap::new();
        for c in self.connections.lock().values() {
            let e = live
                .entry((c.listener.site.clone(), c.listener.name.clone()))
                .or_default();
            e.0 = e.0 + c.bytes();
            e.1 += 1;
        }
        live
    }

    /// Per listener: totals, plus the gateway-wide sum.
    pub fn snapshot(&self) -> (Vec<(Arc<ListenerStats>, TrafficSnapshot)>, TrafficSnapshot) {
        let live = self.live();
        let rates = self.listener_rates();
        let mut per = Vec::new();
        let mut total = TrafficSnapshot::zero(self.rates());
        for l in self.listeners() {
            let key = (l.site.clone(), l.name.clone());
            let (live_bytes, active) = live.get(&key).copied().unwrap_or_default();
            let snap = TrafficSnapshot {
                accepted: l.accepted.load(Ordering::Relaxed),
                rejected: l.rejected.load(Ordering::Relaxed),
                closed: l.closed.load(Ordering::Relaxed),
                active,
                pending: l.pending.get() as u64,
                bytes: *l.finished.lock() + live_bytes,
                rates: rates.get(&key).copied().unwrap_or_default(),
                udp: l.udp.snapshot(),
            };
            total.add_counts(&snap);
            per.push((l, snap));
        }
        (per, total)
    }

    /// Records one sample: called every second by the sampler task.
    pub fn sample(&self) {
        let at = Instant::now();
        let (per, total) = self.snapshot();
        {
            let mut samples = self.samples.lock();
            samples.push_back(Sample {
                at,
                bytes: total.bytes,
                active: total.active,
            });
            while samples.len() > HISTORY + 1 {
                samples.pop_front();
            }
        }
        let mut ls = self.listener_samples.lock();
        for (l, snap) in per {
            let q = ls.entry((l.site.clone(), l.name.clone())).or_default();
            q.push_back((at, snap.bytes));
            while q.len() > RATE_WINDOW + 1 {
                q.pop_front();
            }
        }
    }

    /// Gateway-wide rates over the sliding window.
    pub fn rates(&self) -> Rates4 {
        let samples = self.samples.lock();
        if samples.len() < 2 {
            return Rates4::default();
        }
        let (Some(last), Some(first)) = (
            samples.back(),
            samples.iter().rev().nth(RATE_WINDOW.min(samples.len() - 1)),
        ) else {
            return Rates4::default();
        };
        Rates4::over(
            last.bytes - first.bytes,
            last.at.duration_since(first.at).as_secs_f64(),
        )
    }

    fn listener_rates(&self) -> HashMap<(String, String), Rates4> {
        self.listener_samples
            .lock()
            .iter()
            .filter_map(|(k, q)| {
                let (first, last) = (q.front()?, q.back()?);
                Some((
                    k.clone(),
                    Rates4::over(
                        last.1 - first.1,
                        last.0.duration_since(first.0).as_secs_f64(),
                    ),
                ))
            })
            .collect()
    }

    /// Per-second points for the charts.
    pub fn history(&self) -> History {
        let samples = self.samples.lock();
        let mut h = History {
            interval_seconds: 1,
            ..Default::default()
        };
        for pair in samples.iter().collect::<Vec<_>>().windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let r = Rates4::over(b.bytes - a.bytes, b.at.duration_since(a.at).as_secs_f64());
            h.client_read.push(r.client_read);
            h.client_written.push(r.client_written);
            h.agent_read.push(r.agent_read);
            h.agent_written.push(r.agent_written);
            h.active.push(b.active);
        }
        h
    }
}

/// Samples `traffic` every second until `stop`.
pub async fn run_sampler(traffic: Arc<Traffic>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => traffic.sample(),
        }
    }
}
