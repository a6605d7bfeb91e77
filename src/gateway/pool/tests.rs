//! Unit tests of `gateway::pool`.

use super::*;
use tokio::net::{TcpListener, TcpStream};

fn agent(id: u64) -> AgentHandle {
    AgentHandle::for_test(id)
}

/// A pooled connection over real loopback sockets, and the agent's end of it.
async fn member() -> (Pooled, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_end = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (gateway_end, peer) = listener.accept().await.unwrap();
    let pooled = Pooled {
        conn: Connection::new(Stream::Plain(gateway_end), 4096),
        agent_addr: peer,
        agent: "agent".to_string(),
        since: Instant::now(),
        version: crate::protocol::MAX_VERSION,
        reuse: None,
    };
    (pooled, agent_end)
}

#[tokio::test]
async fn a_member_closed_a_moment_ago_is_not_taken_for_alive() {
    let (pooled, agent_end) = member().await;
    assert!(pooled.alive());
    // The agent closes; its FIN is in the gateway socket's queue at once (loopback), but
    // this runtime has not polled its reactor since: a readiness-cache check calls it alive.
    drop(agent_end);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!pooled.alive(), "a closed member was taken for alive");

    // Bytes from the agent on an idle member (it never writes there) make it unusable too.
    let (pooled, mut agent_end) = member().await;
    agent_end.write_all(b"x").await.unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!pooled.alive());
}

#[tokio::test]
async fn no_member_is_parked_under_a_session_that_has_left() {
    let pool = Pool::default();
    let a = agent(1);
    let (first, _keep1) = member().await;
    assert!(pool.add(&a, first).is_ok());
    // The session ends: `gone` first, then its pool is emptied (as run_session does). A
    // member whose hello was accepted just before arrives in between.
    a.gone.cancel();
    pool.remove_agent(a.id);
    let (late, _keep2) = member().await;
    let refused = pool.add(&a, late);
    assert!(matches!(refused, Err((NotParked::AgentGone, _))));
    assert_eq!(
        pool.len(),
        0,
        "a member was parked under a departed session"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_pool_is_renewed_one_member_at_a_time_not_all_at_once() {
    let pool = Pool::default();
    let a = agent(1);
    let mut agent_ends = Vec::new();
    for _ in 0..4 {
        let (m, end) = member().await;
        assert!(pool.add(&a, m).is_ok());
        agent_ends.push(end);
    }
    // An idle minute and more: every member is past MAX_IDLE.
    tokio::time::advance(MAX_IDLE + Duration::from_secs(1)).await;
    // A client arriving now still finds a pooled connection.
    let (id, taken) = pool
        .take(pool.next_turn(), &[])
        .expect("the whole pool expired at once");
    assert_eq!(id, 1);
    drop(taken);
    assert_eq!(pool.len(), 3);
    // The recycler closes one expired member per agent and tick.
    assert_eq!(pool.recycle(), 1);
    assert_eq!(pool.len(), 2);
    assert_eq!(pool.recycle(), 1);
    assert_eq!(pool.len(), 1);
}

#[tokio::test]
async fn members_their_agent_closed_leave_the_pool_at_the_next_tick() {
    let pool = Pool::default();
    let a = agent(1);
    let mut ends = Vec::new();
    for _ in 0..3 {
        let (m, end) = member().await;
        assert!(pool.add(&a, m).is_ok());
        ends.push(end);
    }
    // The agent closes two of them (its target fell); none has expired.
    drop(ends.drain(..2));
    // Loopback: their FINs are queued at once (the check asks the socket, not the runtime).
    assert_eq!(pool.recycle(), 0, "none had expired");
    assert_eq!(pool.len(), 1, "closed members stayed counted");
}

#[tokio::test]
async fn a_shunned_agent_s_members_are_left_alone() {
    let pool = Pool::default();
    let (a, b) = (agent(1), agent(2));
    let mut ends = Vec::new();
    for owner in [&a, &a, &b] {
        let (m, end) = member().await;
        assert!(pool.add(owner, m).is_ok());
        ends.push(end);
    }
    // a has members (two), but it is shunned for this client.
    let (id, _) = pool.take(pool.next_turn(), &[a.id]).unwrap();
    assert_eq!(id, b.id);
    assert!(pool.take(pool.next_turn(), &[a.id]).is_none());
    assert_eq!(pool.take(pool.next_turn(), &[]).unwrap().0, a.id);
}

#[tokio::test]
async fn agents_take_turns_however_many_idle_members_each_has() {
    let pool = Pool::default();
    let (a, b) = (agent(1), agent(2));
    let mut ends = Vec::new();
    // a's pool is three times b's (it grew with the clients it got).
    for owner in [&a, &a, &a, &a, &a, &a, &b, &b] {
        let (m, end) = member().await;
        assert!(pool.add(owner, m).is_ok());
        ends.push(end);
    }
    let taken: Vec<u64> = (0..4)
        .map(|_| pool.take(pool.next_turn(), &[]).unwrap().0)
        .collect();
    assert_eq!(
        taken.iter().filter(|&&id| id == b.id).count(),
        2,
        "{taken:?}"
    );
    // b is out of members: a serves the rest.
    assert!((0..4).all(|_| pool.take(pool.next_turn(), &[]).unwrap().0 == a.id));
}

#[tokio::test]
async fn a_client_handed_on_after_a_decline_keeps_its_turn() {
    let pool = Pool::default();
    let (a, b) = (agent(1), agent(2));
    let mut ends = Vec::new();
    for owner in [&a, &a, &a, &a, &b, &b, &b, &b] {
        let (m, end) = member().await;
        assert!(pool.add(owner, m).is_ok());
        ends.push(end);
    }
    // Each client: its first pick, and after that agent declined it, the next one. Which
    // agent is asked first must still alternate between clients.
    let mut first = Vec::new();
    for _ in 0..4 {
        let turn = pool.next_turn();
        let (id, _) = pool.take(turn, &[]).unwrap();
        first.push(id);
        let (other, _) = pool.take(turn, &[id]).unwrap();
        assert_ne!(other, id);
    }
    assert_eq!(
        first.iter().filter(|&&id| id == a.id).count(),
        2,
        "{first:?}"
    );
}
