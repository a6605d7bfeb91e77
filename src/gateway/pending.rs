//! The pending table: clients waiting for the agent's data connection.
//!
//! Each entry is keyed by a public, sequential id and guarded by a 128-bit single-use token,
//! compared in constant time. A correct claim removes the entry (so a token works once); a wrong
//! token leaves it in place, so a guesser cannot knock a real client out. Each waiting client
//! task owns its own deadline and removes its entry when it gives up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::sync::oneshot;

use crate::protocol::Token;
use crate::transport::Stream;

/// A data connection that proved it was sent for this client.
pub(crate) struct DataConn {
    pub stream: Stream,
    /// Bytes the agent sent after its hello, already read; they go to the client first.
    pub leftover: BytesMut,
    pub agent_addr: SocketAddr,
}

/// What a waiting client receives.
pub(crate) enum Claim {
    Data(DataConn),
    /// The agent reported it cannot serve this client.
    Failed(String),
}

struct Entry {
    token: Token,
    site: String,
    tx: oneshot::Sender<Claim>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error("unknown, expired or already claimed client id {0}")]
    Unknown(u64),
    #[error("wrong token for client id {0}")]
    BadToken(u64),
    /// The client left or timed out moments ago: a late data connection, not an attack.
    #[error("client id {0} is gone (it left or timed out before its data connection arrived)")]
    Gone(u64),
}

/// How many recently gone client ids are remembered, to tell a late data connection from a
/// guessed or replayed one.
const GONE_MEMORY: usize = 4096;

#[derive(Default)]
pub(crate) struct PendingTable {
    entries: Mutex<HashMap<u64, Entry>>,
    gone: Mutex<(VecDeque<u64>, HashSet<u64>)>,
}

impl PendingTable {
    pub fn insert(&self, id: u64, token: Token, site: &str) -> oneshot::Receiver<Claim> {
        let (tx, rx) = oneshot::channel();
        let entry = Entry {
            token,
            site: site.to_string(),
            tx,
        };
        self.entries.lock().unwrap().insert(id, entry);
        rx
    }

    /// Forgets a client that gave up waiting (it left, timed out, or its agent failed it).
    /// Returns whether it was still there.
    pub fn remove(&self, id: u64) -> bool {
        let removed = self.entries.lock().unwrap().remove(&id).is_some();
        let mut gone = self.gone.lock().unwrap();
        if gone.1.insert(id) {
            gone.0.push_back(id);
            if gone.0.len() > GONE_MEMORY {
                let oldest = gone.0.pop_front().expect("not empty");
                gone.1.remove(&oldest);
            }
        }
        removed
    }

    /// Whether `id` belonged to a client that left or timed out recently.
    pub fn is_gone(&self, id: u64) -> bool {
        self.gone.lock().unwrap().1.contains(&id)
    }

    /// Claims a pending client with its token; on success the entry is gone for good.
    pub fn claim(&self, id: u64, token: &Token) -> Result<oneshot::Sender<Claim>, ClaimError> {
        let mut entries = self.entries.lock().unwrap();
        match entries.get(&id) {
            None if self.is_gone(id) => Err(ClaimError::Gone(id)),
            None => Err(ClaimError::Unknown(id)),
            Some(e) if e.token != *token => Err(ClaimError::BadToken(id)),
            Some(_) => Ok(entries.remove(&id).expect("entry checked above").tx),
        }
    }

    /// The agent of `site` gave up on client `id`: wake the waiting client with the reason.
    /// Agents can only fail their own site's clients.
    pub fn fail(&self, id: u64, site: &str, reason: String) -> bool {
        let entry = {
            let mut entries = self.entries.lock().unwrap();
            match entries.get(&id) {
                Some(e) if e.site == site => entries.remove(&id),
                _ => None,
            }
        };
        match entry {
            Some(e) => {
                let _ = e.tx.send(Claim::Failed(reason));
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_wrong_tokens_do_not_evict() {
        let table = PendingTable::default();
        let token = Token::random();
        let _rx = table.insert(1, token, "s");
        assert_eq!(
            table.claim(1, &Token::random()).unwrap_err(),
            ClaimError::BadToken(1)
        );
        assert!(table.claim(1, &token).is_ok());
        assert_eq!(table.claim(1, &token).unwrap_err(), ClaimError::Unknown(1));
        assert_eq!(table.len(), 0);
        // A client that left: its late data connection is told apart from a guess.
        let late = Token::random();
        let _rx = table.insert(2, late, "s");
        table.remove(2);
        assert_eq!(table.claim(2, &late).unwrap_err(), ClaimError::Gone(2));
    }

    #[test]
    fn only_the_own_site_can_fail_a_client() {
        let table = PendingTable::default();
        let mut rx = table.insert(2, Token::random(), "a");
        assert!(!table.fail(2, "b", "nope".into()));
        assert!(table.fail(2, "a", "backend down".into()));
        assert!(matches!(rx.try_recv(), Ok(Claim::Failed(r)) if r == "backend down"));
    }

    impl std::fmt::Debug for Claim {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                Claim::Data(_) => "Claim::Data",
                Claim::Failed(_) => "Claim::Failed",
            })
        }
    }
}
