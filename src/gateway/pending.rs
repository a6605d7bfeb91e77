//! The pending table: clients waiting for the agent's data connection.
//!
//! Each entry is keyed by a public, sequential id and guarded by a 128-bit single-use token,
//! compared in constant time. A correct claim removes the entry (so a token works once); a wrong
//! token leaves it in place, so a guesser cannot knock a real client out. Each waiting client
//! task owns its own deadline and removes its entry when it gives up.
//!
//! A client offered to a second agent (the first left) may be claimed by both: the loser is told
//! apart from a guess or a replay ([`ClaimError::Lost`]) because the table remembers the tokens of
//! recently claimed re-offered clients, and only the agent a client is offered to now can fail
//! it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::protocol::Token;
use crate::transport::Stream;

/// A data connection that proved it was sent for this client.
pub(crate) struct DataConn {
    pub stream: Stream,
    /// Bytes the agent sent after its hello, already read; they go to the client first.
    pub leftover: BytesMut,
    pub agent_addr: SocketAddr,
    /// The agent's name, when the connection says it (a warm-pool connection does).
    pub agent: Option<String>,
    /// A reuse-framed warm-pool connection ([`crate::reuse`]): what it served before.
    pub reuse: Option<super::pool::Ticket>,
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
    /// The agent (session id) it is offered to now, and how many offers it has had.
    offered_to: Option<u64>,
    offers: u32,
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
    /// The client was offered to two agents and the other one claimed it first: the right
    /// token, a lost race, not an attack.
    #[error("client id {0} was claimed by another agent it was offered to")]
    Lost(u64),
    /// The right id and token, from a certificate that may not serve the client's site: the
    /// client stays pending for its own site's agents.
    #[error("client id {0}: {1}")]
    WrongSite(u64, String),
}

/// What became of an agent's report that it cannot serve a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failed {
    /// The waiting client was woken with the reason.
    Woken,
    /// The client is offered to another agent now (the reporter left it): it keeps waiting.
    OfferedElsewhere,
    /// No such client waits (claimed, gone, or never there).
    NotPending,
}

/// How many recently gone client ids are remembered, to tell a late data connection from a
/// guessed or replayed one.
const GONE_MEMORY: usize = 4096;

#[derive(Default)]
pub(crate) struct PendingTable {
    entries: Mutex<HashMap<u64, Entry>>,
    gone: Mutex<(VecDeque<u64>, HashSet<u64>)>,
    /// Tokens of recently claimed clients that had been offered more than once.
    claimed: Mutex<(VecDeque<u64>, HashMap<u64, Token>)>,
}

impl PendingTable {
    pub fn insert(&self, id: u64, token: Token, site: &str) -> oneshot::Receiver<Claim> {
        let (tx, rx) = oneshot::channel();
        let entry = Entry {
            token,
            site: site.to_string(),
            tx,
            offered_to: None,
            offers: 0,
        };
        self.entries.lock().insert(id, entry);
        rx
    }

    /// Forgets a client that gave up waiting (it left, timed out, or its agent failed it).
    /// Returns whether it was still there.
    pub fn remove(&self, id: u64) -> bool {
        let removed = self.entries.lock().remove(&id).is_some();
        let mut gone = self.gone.lock();
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
        self.gone.lock().1.contains(&id)
    }

    /// Records that client `id` is being offered to agent session `agent_id`.
    pub fn offered_to(&self, id: u64, agent_id: u64) {
        if let Some(e) = self.entries.lock().get_mut(&id) {
            e.offered_to = Some(agent_id);
            e.offers += 1;
        }
    }

    /// Claims a pending client with its token; on success the entry is gone for good.
    #[cfg(test)]
    pub fn claim(&self, id: u64, token: &Token) -> Result<oneshot::Sender<Claim>, ClaimError> {
        self.claim_for(id, token, |_| Ok(()))
    }

    /// [`PendingTable::claim`] by a connection `serves` says may (or, with its reason, may not)
    /// serve a site. The site is checked after the token, so a connection without the token
    /// learns nothing about the client.
    pub fn claim_for(
        &self,
        id: u64,
        token: &Token,
        serves: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<oneshot::Sender<Claim>, ClaimError> {
        let mut entries = self.entries.lock();
        match entries.get(&id) {
            None if self.lost_race(id, token) => Err(ClaimError::Lost(id)),
            None if self.is_gone(id) => Err(ClaimError::Gone(id)),
            None => Err(ClaimError::Unknown(id)),
            Some(e) if e.token != *token => Err(ClaimError::BadToken(id)),
            Some(e) => {
                if let Err(why) = serves(&e.site) {
                    return Err(ClaimError::WrongSite(id, why));
                }
                let entry = entries.remove(&id).expect("entry checked above");
                if entry.offers > 1 {
                    self.remember_claimed(id, entry.token);
                }
                Ok(entry.tx)
            }
        }
    }

    /// Whether `token` is the right one for a re-offered client that was claimed already.
    fn lost_race(&self, id: u64, token: &Token) -> bool {
        self.claimed.lock().1.get(&id) == Some(token)
    }

    fn remember_claimed(&self, id: u64, token: Token) {
        let mut claimed = self.claimed.lock();
        if claimed.1.insert(id, token).is_none() {
            claimed.0.push_back(id);
            if claimed.0.len() > GONE_MEMORY {
                let oldest = claimed.0.pop_front().expect("not empty");
                claimed.1.remove(&oldest);
            }
        }
    }

    /// Agent session `agent_id` of `site` gave up on client `id`: wake the waiting client with
    /// the reason. Agents can only fail their own site's clients, and only while the client is
    /// offered to them (a report from an agent it was offered to before is late news).
    pub fn fail(&self, id: u64, site: &str, agent_id: u64, reason: String) -> Failed {
        let entry = {
            let mut entries = self.entries.lock();
            match entries.get(&id) {
                Some(e) if e.site == site && e.offered_to.is_some_and(|a| a != agent_id) => {
                    return Failed::OfferedElsewhere
                }
                Some(e) if e.site == site => entries.remove(&id),
                _ => None,
            }
        };
        match entry {
            Some(e) => {
                let _ = e.tx.send(Claim::Failed(reason));
                Failed::Woken
            }
            None => Failed::NotPending,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().len()
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
        assert_eq!(table.fail(2, "b", 1, "nope".into()), Failed::NotPending);
        assert_eq!(table.fail(2, "a", 1, "backend down".into()), Failed::Woken);
        assert!(matches!(rx.try_recv(), Ok(Claim::Failed(r)) if r == "backend down"));
    }

    #[test]
    fn a_re_offered_client_lost_by_its_first_agent_is_a_lost_race_not_a_refusal() {
        let table = PendingTable::default();
        let token = Token::random();
        let mut rx = table.insert(3, token, "s");
        table.offered_to(3, 10);
        // Agent 10 left; the client is offered to agent 11. A late failure report from 10 no
        // longer closes it.
        table.offered_to(3, 11);
        assert_eq!(
            table.fail(3, "s", 10, "late".into()),
            Failed::OfferedElsewhere
        );
        assert!(rx.try_recv().is_err(), "the client still waits");
        // 11 claims it; 10's data connection arrives with the same token: a lost race.
        assert!(table.claim(3, &token).is_ok());
        assert_eq!(table.claim(3, &token).unwrap_err(), ClaimError::Lost(3));
        // A guessed token for the same id is still a refusal.
        assert_eq!(
            table.claim(3, &Token::random()).unwrap_err(),
            ClaimError::Unknown(3)
        );
        // A client offered once and claimed: a second claim is a replay, as before.
        let once = Token::random();
        let _rx = table.insert(4, once, "s");
        table.offered_to(4, 11);
        assert!(matches!(
            table.claim_for(4, &once, |site| Err(format!("not {site}"))),
            Err(ClaimError::WrongSite(4, why)) if why == "not s"
        ));
        assert!(table.claim(4, &once).is_ok());
        assert_eq!(table.claim(4, &once).unwrap_err(), ClaimError::Unknown(4));
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
