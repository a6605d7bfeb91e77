//! Liveness of a control channel, the same rule on both ends: send a heartbeat every interval,
//! and declare the peer dead once nothing at all was heard from it for [`MISSED`] intervals.
//!
//! The gateway's agent session and the agent's gateway session each own one [`Liveness`] and
//! poll it in their select loop next to the read. It never reads or writes a socket itself, so
//! it can never be held up by one: writes go through [`super::outbox`], whose own stall limit
//! ([`Liveness::write_limit`]) is the same three intervals, and so is the kernel's own give-up
//! time on the socket ([`Liveness::arm`]). A dead peer is reported as a [`Silence`], which both
//! sessions' errors show the same way ("... for 3.001s (3 heartbeats missed)").

use std::fmt;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use super::{Heartbeat, Message};

/// Intervals of silence after which the peer is dead.
pub const MISSED: u32 = 3;

/// What the session should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    /// Time to send this heartbeat.
    Send(Message),
    /// Nothing was heard for this long (more than [`MISSED`] intervals): the peer is dead.
    Dead(Duration),
}

/// How long a dead peer said nothing (more than [`MISSED`] intervals): what a session's error
/// says when [`Beat::Dead`] ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence(pub Duration);

impl fmt::Display for Silence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({MISSED} heartbeats missed)", self.0)
    }
}

/// A heartbeat ticker and a silence deadline.
pub struct Liveness {
    interval: Duration,
    ticker: Interval,
    last_heard: Instant,
    /// `last_heard + MISSED × interval`; reset on every message heard.
    deadline: std::pin::Pin<Box<Sleep>>,
    seq: u64,
}

impl Liveness {
    /// Starts now: the first heartbeat is due at once, the peer has `MISSED` intervals to speak.
    pub fn new(interval: Duration) -> Self {
        let mut ticker = tokio::time::interval(interval);
        // A late tick (a busy runtime) sends one heartbeat, not a burst of them.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let now = Instant::now();
        Liveness {
            interval,
            ticker,
            last_heard: now,
            deadline: Box::pin(tokio::time::sleep_until(now + interval * MISSED)),
            seq: 0,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long one write may wait for the peer to read before the channel counts as dead, and
    /// the kernel's `TCP_USER_TIMEOUT` for the socket: as long as the peer may stay silent.
    pub fn write_limit(&self) -> Duration {
        self.interval * MISSED
    }

    /// Sets the socket's keepalive and `TCP_USER_TIMEOUT` to [`Liveness::write_limit`], so the
    /// kernel gives up on a vanished peer (or a black-holed path with bytes queued) within the
    /// same time as this check does.
    pub fn arm(&self, socket: &TcpStream) {
        crate::net::keepalive(socket, self.write_limit());
        crate::net::user_timeout(socket, self.write_limit());
    }

    /// Any message from the peer proves it alive.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.deadline
            .as_mut()
            .reset(self.last_heard + self.interval * MISSED);
    }

    /// Waits for the next thing to do: a heartbeat to send, or the peer's death. Cancel safe.
    pub async fn next(&mut self) -> Beat {
        tokio::select! {
            biased;
            () = self.deadline.as_mut() => Beat::Dead(self.last_heard.elapsed()),
            _ = self.ticker.tick() => {
                self.seq += 1;
                Beat::Send(Message::Heartbeat(Heartbeat { seq: self.seq }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn heartbeats_every_interval_and_death_after_three_silent_ones() {
        let t = Duration::from_millis(100);
        let start = Instant::now();
        let mut l = Liveness::new(t);
        let mut sent = 0;
        let dead_after = loop {
            match l.next().await {
                Beat::Send(Message::Heartbeat(h)) => {
                    sent += 1;
                    assert_eq!(h.seq, sent);
                }
                Beat::Send(other) => panic!("{other:?}"),
                Beat::Dead(silence) => break (start.elapsed(), silence),
            }
        };
        // Exactly three intervals of silence, not "three to four".
        assert_eq!(dead_after.0, t * 3);
        assert_eq!(dead_after.1, t * 3);
        assert_eq!(sent, 3, "at 0, 100 and 200 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn anything_heard_postpones_the_verdict() {
        let t = Duration::from_millis(100);
        let start = Instant::now();
        let mut l = Liveness::new(t);
        let mut heard_at = Vec::new();
        loop {
            match l.next().await {
                Beat::Send(_) if start.elapsed() < t * 5 => {
                    l.heard();
                    heard_at.push(start.elapsed());
                }
                Beat::Send(_) => {}
                Beat::Dead(_) => break,
            }
        }
        // The last message was heard at 400 ms: dead at 700 ms.
        assert_eq!(*heard_at.last().unwrap(), t * 4);
        assert_eq!(start.elapsed(), t * 7);
        assert_eq!(l.write_limit(), t * 3);
    }
}
