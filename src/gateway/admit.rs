//! Admission: the checks a new public client passes before it is served, in order — the site's
//! bans, the listener's rate limit and automatic bans, its client rules, then the gateway-wide
//! places (descriptors, client connections in total and per address).
//!
//! Every refusal is counted in the listener's `rejected` and in one gateway-wide counter, and
//! logged at most once per interval (an attacker's flood costs a tally, not a line per
//! connection). Nothing here reads or writes the client's bytes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::listener::ListenerInfo;
use super::site::Site;
use super::Shared;
use crate::limits::ConnPermit;

/// The listener's own checks of a new client: its site's bans, its rate limit and automatic
/// bans, its client rules. Counts and logs a refusal.
pub(super) fn admit_to_listener(
    shared: &Shared,
    site: &Site,
    info: &ListenerInfo,
    client_addr: SocketAddr,
) -> bool {
    // A banned address: refused before anything else (no agent hears of it).
    if is_banned(shared, site, info, client_addr) {
        return false;
    }
    if !within_rate(shared, site, info, client_addr)
        || auto_banned_now(shared, site, info, client_addr)
    {
        return false;
    }
    if !info.rules.allows(client_addr.ip()) {
        info.stats.rejected.fetch_add(1, Ordering::Relaxed);
        let occ = shared.stats.clients_rejected.hit();
        if occ.log {
            tracing::info!(
                listener = %info.spec.name, client = %client_addr,
                "client rejected by the listener's rules{}", occ.tally()
            );
        }
        return false;
    }
    true
}

/// The gateway-wide places a client takes: descriptors first (at the limit new clients are
/// refused, so the admin API, agents and established connections keep theirs), then its place
/// among the client connections (in total and per address). `info`: the listener that counts
/// a refusal, when it is known yet.
pub(super) fn take_permit(
    shared: &Shared,
    info: Option<&ListenerInfo>,
    label: &str,
    client_addr: SocketAddr,
) -> Option<ConnPermit> {
    if !shared.fds.admit(crate::fds::PER_CLIENT, false) {
        over_limit(
            shared,
            label,
            client_addr,
            format_args!(
                "the gateway's open files are near their limit of {} ({} kept in reserve)",
                shared.fds.limit(),
                shared.fds.reserve()
            ),
        );
        return None;
    }
    match shared.clients.try_acquire(client_addr.ip()) {
        Ok(p) => Some(p),
        Err(limit) => {
            if let Some(info) = info {
                info.stats.rejected.fetch_add(1, Ordering::Relaxed);
            }
            let what = format_args!("client connections reached {limit}");
            over_limit(shared, label, client_addr, what);
            None
        }
    }
}

/// Whether the site bans the client's address; counts it, and logs it at most once per 10 s
/// per ban.
pub(crate) fn is_banned(
    shared: &Shared,
    site: &Site,
    info: &ListenerInfo,
    client: SocketAddr,
) -> bool {
    let Some(ban) = site.bans.check(client.ip()) else {
        return false;
    };
    info.stats.rejected.fetch_add(1, Ordering::Relaxed);
    shared.stats.clients_banned.hit();
    if ban.should_log() {
        tracing::info!(
            listener = %info.spec.name, client = %client,
            "client refused: banned ({})", ban.describe()
        );
    }
    true
}

/// Whether the client is within its listener's `new_connections_per_ip`; counts and logs (at
/// most once per 10 s) a refusal.
pub(crate) fn within_rate(
    shared: &Shared,
    site: &Site,
    info: &ListenerInfo,
    client: SocketAddr,
) -> bool {
    let Some(limits) = site.limits.get(&info.spec.name) else {
        return true;
    };
    if limits.admit(client.ip()) {
        return true;
    }
    info.stats.rejected.fetch_add(1, Ordering::Relaxed);
    let occ = shared.stats.clients_rate_limited.hit();
    if occ.log {
        tracing::info!(
            listener = %info.spec.name, client = %client,
            "client refused: over the listener's new_connections_per_ip{}", occ.tally()
        );
    }
    false
}

/// Whether this connection is one too many for the listener's `auto_ban`: the address is then
/// banned on this gateway, and this connection refused as banned.
fn auto_banned_now(shared: &Shared, site: &Site, info: &ListenerInfo, client: SocketAddr) -> bool {
    let banner = site.autobans.get(&info.spec.name);
    let Some(verdict) = banner.and_then(|b| b.on_connect(client.ip())) else {
        return false;
    };
    auto_ban(site, info, client, verdict);
    info.stats.rejected.fetch_add(1, Ordering::Relaxed);
    shared.stats.clients_banned.hit();
    true
}

/// Puts an automatic ban in force (and logs it, at most 20 lines per 10 s).
fn auto_ban(site: &Site, info: &ListenerInfo, client: SocketAddr, v: super::autoban::Verdict) {
    static BANNED: crate::limits::Event = crate::limits::Event::some_per_10s();
    let occ = BANNED.hit();
    if occ.log {
        tracing::warn!(
            listener = %info.spec.name, client = %client,
            "banned {} for {}: {}{}",
            v.net, humantime::format_duration(v.lasts), v.reason, occ.tally()
        );
    }
    site.bans.add(AUTOMATIC, v.net, v.lasts, v.reason);
}

/// The name automatic bans are listed under (no agent can have it).
const AUTOMATIC: &str = "(automatic)";

/// Reports the end of a served client to its listener's `auto_ban` (short connections).
pub(super) struct EndWatch {
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    client: SocketAddr,
    started: Instant,
}

impl EndWatch {
    pub(super) fn new(site: Arc<Site>, info: Arc<ListenerInfo>, client: SocketAddr) -> Self {
        EndWatch {
            site,
            info,
            client,
            started: Instant::now(),
        }
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        let Some(banner) = self.site.autobans.get(&self.info.spec.name) else {
            return;
        };
        if let Some(v) = banner.on_end(self.client.ip(), self.started.elapsed()) {
            auto_ban(&self.site, &self.info, self.client, v);
        }
    }
}

/// Counts a client refused by a limit; logs at most once per interval.
pub(super) fn over_limit(
    shared: &Shared,
    label: &str,
    client: SocketAddr,
    what: std::fmt::Arguments<'_>,
) {
    let occ = shared.stats.clients_over_limit.hit();
    if occ.log {
        tracing::warn!(listener = %label, client = %client, "client refused: {what}{}", occ.tally());
    }
}
