//! Unit tests of `gateway::site`: a re-offer does not skip an agent's turn.

use super::*;

fn agent(id: u64) -> AgentHandle {
    AgentHandle::for_test(id)
}

/// Two equal agents, each client offered first to one and, when that one fails it, again
/// to the other (as `Offering` does): each agent is asked first for half of the clients.
/// Before, every pick moved the rotation on, so the re-offer used up the other agent's
/// turn and agent 1 was asked first for all 10.
#[test]
fn a_reoffer_does_not_skip_an_agents_turn() {
    let site = Site::new("s");
    site.agents.lock().extend([agent(1), agent(2)]);
    let mut first = HashMap::<u64, usize>::new();
    for _ in 0..10 {
        let turn = site.next_turn();
        let a = site.pick_agent(turn, &[], &[]).unwrap();
        *first.entry(a.id).or_default() += 1;
        let b = site.pick_agent(turn, &[], &[a.id]).unwrap();
        assert_ne!(a.id, b.id, "the re-offer went to the agent that failed it");
    }
    assert_eq!(first.get(&1), Some(&5), "asked first: {first:?}");
    assert_eq!(first.get(&2), Some(&5), "asked first: {first:?}");
}
