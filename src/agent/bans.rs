//! The agent's ban list: the one place bans are owned (the gateways only hold copies).
//!
//! Rules:
//! - `sallyport ban add|remove` (through the admin API) change it; every change is written to
//!   `<state_dir>/bans.json` before it is answered (temporary file, fsync, rename, so a crash
//!   leaves the old file or the new one, never half of one), then pushed to every gateway.
//! - Without `state_dir` bans live in memory only (and every answer says so).
//! - Expiry is stored as wall-clock time (it must survive a restart) and sent to gateways as
//!   the time left, so their clocks do not matter; expired entries are dropped when read.
//! - At most [`MAX_BANS`] entries; one entry per network (adding it again replaces it).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bans::{check_reason, parse_target, Ban, MAX_BANS, MAX_BAN_MS};
use crate::protocol::{BanList, BAN_CHUNK_BYTES};

/// The state file's name inside `state_dir`.
pub const STATE_FILE: &str = "bans.json";

/// One ban as stored and as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBan {
    /// `203.0.113.7/32`, `2001:db8::/32`.
    pub net: String,
    /// Unix time (seconds) when it was added.
    pub added: u64,
    /// Unix time in milliseconds when it lifts; absent: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default)]
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    bans: Vec<StoredBan>,
}

/// The agent's bans and where they are kept.
#[derive(Debug)]
pub struct BanStore {
    file: Option<PathBuf>,
    bans: Mutex<Vec<StoredBan>>,
    /// Bumped by every change; each control session pushes the list when it moves.
    changed: watch::Sender<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl BanStore {
    /// Bans kept in memory only.
    pub fn in_memory() -> Self {
        BanStore {
            file: None,
            bans: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }

    /// Loads `<state_dir>/bans.json` (none yet: an empty list). A file that cannot be read or
    /// parsed is an error naming it: the agent does not start with its bans silently gone.
    pub fn open(state_dir: &Path) -> Result<Self, String> {
        let file = state_dir.join(STATE_FILE);
        let bans = match std::fs::read(&file) {
            Ok(bytes) => {
                let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "{}: {e} (move the file aside to start without its bans)",
                        file.display()
                    )
                })?;
                for b in &state.bans {
                    parse_target(&b.net).map_err(|e| format!("{}: {e}", file.display()))?;
                }
                state.bans
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        let store = BanStore {
            file: Some(file),
            bans: Mutex::new(bans),
            changed: watch::Sender::new(0),
        };
        store.prune();
        Ok(store)
    }

    /// Where the bans are kept, if on disk.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn prune(&self) {
        let now = now_ms();
        self.bans
            .lock()
            .retain(|b| b.expires_ms.map_or(true, |t| t > now));
    }

    /// The live bans, oldest first.
    pub fn list(&self) -> Vec<StoredBan> {
        self.prune();
        self.bans.lock().clone()
    }

    /// Adds (or replaces) the ban of `target`, saves and pushes it. Blocks on the file write.
    pub fn add(
        &self,
        target: &str,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<StoredBan, String> {
        let net = parse_target(target)?;
        check_reason(reason)?;
        let now = now_ms();
        let expires_ms = match duration {
            Some(d) if d.is_zero() => return Err("a ban must last longer than 0s".to_string()),
            Some(d) if d.as_millis() > MAX_BAN_MS as u128 => {
                return Err("a ban may last at most ten years".to_string())
            }
            Some(d) => Some(now + d.as_millis() as u64),
            None => None,
        };
        let ban = StoredBan {
            net: net.to_string(),
            added: now / 1000,
            expires_ms,
            reason: reason.to_string(),
        };
        self.change(|bans| {
            bans.retain(|b| b.net != ban.net);
            if bans.len() >= MAX_BANS as usize {
                return Err(format!("the ban list is full ({MAX_BANS} entries)"));
            }
            bans.push(ban.clone());
            Ok(())
        })?;
        Ok(ban)
    }

    /// Removes the ban of exactly `target`; whether there was one.
    pub fn remove(&self, target: &str) -> Result<bool, String> {
        let net = parse_target(target)?.to_string();
        let mut found = false;
        self.change(|bans| {
            let before = bans.len();
            bans.retain(|b| b.net != net);
            found = bans.len() != before;
            Ok(())
        })?;
        Ok(found)
    }

    /// Applies `edit` to a copy, saves the copy, then makes it the list and tells the sessions.
    fn change(
        &self,
        edit: impl FnOnce(&mut Vec<StoredBan>) -> Result<(), String>,
    ) -> Result<(), String> {
        self.prune();
        let mut bans = self.bans.lock();
        let mut next = bans.clone();
        edit(&mut next)?;
        if let Some(file) = &self.file {
            save(file, &next)?;
        }
        *bans = next;
        drop(bans);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// The list as gateways receive it: live entries with the time each has left, cut into
    /// chunks that fit any gateway's frame limit.
    pub fn wire_chunks(&self, generation: u64) -> Vec<BanList> {
        let now = now_ms();
        let bans: Vec<Ban> = self
            .list()
            .iter()
            .filter_map(|b| {
                let net: IpNet = b.net.parse().ok()?;
                Some(Ban {
                    addr: net.addr(),
                    prefix: net.prefix_len(),
                    // An entry due this very millisecond still lasts 1 ms (0 means forever).
                    remaining_ms: b.expires_ms.map_or(0, |t| t.saturating_sub(now).max(1)),
                    reason: b.reason.clone(),
                })
            })
            .collect();
        chunk(generation, bans)
    }
}

/// Cuts a list into [`BanList`] chunks of at most [`BAN_CHUNK_BYTES`] of entries each (an empty
/// list is one empty chunk).
fn chunk(generation: u64, bans: Vec<Ban>) -> Vec<BanList> {
    let total = bans.len() as u32;
    let mut chunks = vec![];
    let mut current = Vec::new();
    let mut size = 0;
    for ban in bans {
        let len = postcard::to_stdvec(&ban).map_or(BAN_CHUNK_BYTES, |v| v.len());
        if size + len > BAN_CHUNK_BYTES && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(ban);
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(current);
    }
    chunks
        .into_iter()
        .map(|bans| BanList {
            generation,
            total,
            bans,
        })
        .collect()
}

/// Writes the list atomically: a temporary file in the same directory, synced, renamed over the
/// old one, and the directory synced.
fn save(file: &Path, bans: &[StoredBan]) -> Result<(), String> {
    use std::io::Write;
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = file.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(&StateFile {
        version: 1,
        bans: bans.to_vec(),
    })
    .expect("plain data serializes");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot save the bans to {}: {e}", file.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_survive_a_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = BanStore::open(dir.path()).unwrap();
        store.add("203.0.113.7", None, "brute force").unwrap();
        store
            .add("10.0.0.0/8", Some(Duration::from_secs(2)), "")
            .unwrap();
        assert!(store.add("10.0.0.1/8", None, "").is_err());
        let again = BanStore::open(dir.path()).unwrap();
        assert_eq!(again.list().len(), 2);
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(again.list().len(), 1);
        assert!(again.remove("203.0.113.7").unwrap());
        assert!(!again.remove("203.0.113.7").unwrap());
        assert!(BanStore::open(dir.path()).unwrap().list().is_empty());
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        assert!(BanStore::open(dir.path())
            .unwrap_err()
            .contains("bans.json"));
    }

    #[test]
    fn chunks_fit_the_smallest_frame() {
        let bans: Vec<Ban> = (0..5000u32)
            .map(|i| Ban {
                addr: std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
                prefix: 32,
                remaining_ms: 600_000,
                reason: "r".repeat(40),
            })
            .collect();
        let chunks = chunk(7, bans);
        assert!(chunks.len() > 1);
        assert_eq!(chunks.iter().map(|c| c.bans.len()).sum::<usize>(), 5000);
        for c in &chunks {
            let frame = crate::protocol::Message::BanList(c.clone()).to_frame();
            assert!(frame.payload.len() <= crate::protocol::frame::MIN_MAX_FRAME - 16);
        }
        assert_eq!(chunk(1, vec![]).len(), 1);
    }
}
