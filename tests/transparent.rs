//! Transparent impersonation in network namespaces: the client in one, the gateway and the agent
//! in another, sshd in a third whose replies route back through the agent host. sshd (which
//! knows no PROXY protocol) logs the client's own address, not the agent's.
//!
//!   client 10.77.1.2 --- 10.77.1.1 [gateway + agent] 10.77.2.1 --- 10.77.2.2 sshd
//!                                   transparent-routing.sh up      default via 10.77.2.1

mod support;

use std::time::Duration;

use support::netns::{sh_in, Namespaces};
use support::sshd::{Sshd, TEST_USER};
use support::*;

#[test]
fn sshd_sees_the_client_address_through_a_transparent_agent() {
    let dir = Workdir::new();
    let mut net = Namespaces::new();
    let client_ns = net.add("cli");
    let agent_ns = net.add("agt");
    let backend_ns = net.add("srv");
    net.link(&client_ns, "10.77.1.2/24", &agent_ns, "10.77.1.1/24");
    net.link(&agent_ns, "10.77.2.1/24", &backend_ns, "10.77.2.2/24");
    sh_in(&backend_ns, "ip route add default via 10.77.2.1");
    // The documented agent-host routing, from the packaging script itself.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/transparent-routing.sh");
    let out = sh_in(&agent_ns, &format!("sh {} up", script.display()));
    assert!(out.contains("transparent routing up"), "{out}");

    let sshd = Sshd::start_at(&dir, Some(&backend_ns), "10.77.2.2", 22);
    let config = dir.write(
        "gateway.toml",
        "[control]\nlisten = \"127.0.0.1:0\"\n[clients]\nbind = \"10.77.1.1\"\n[peers]\ndefault = \"deny\"\nexcept = [\"127.0.0.1\"]\n[admin]\nenabled = false\n",
    );
    let gateway = Proc::spawn_program(
        "gateway",
        "ip",
        &[
            "netns",
            "exec",
            &agent_ns,
            BIN,
            "gateway",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let line = gateway.wait_for_log("control port listening on ", Duration::from_secs(10));
    let control = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .to_string();
    let agent_config = dir.write(
        "agent.toml",
        &format!(
            "site = \"transparent\"\ngateways = [\"{control}\"]\n\n[[listener]]\nname = \"ssh\"\npublic = \"2222\"\n\
             backend = \"10.77.2.2:22\"\nimpersonation = \"transparent\"\n"
        ),
    );
    let agent = Proc::spawn_program(
        "agent",
        "ip",
        &[
            "netns",
            "exec",
            &agent_ns,
            BIN,
            "agent",
            "--config",
            agent_config.to_str().unwrap(),
        ],
    );
    agent.wait_for_log(
        "listener open on the gateway at 10.77.1.1:2222",
        Duration::from_secs(10),
    );

    let out = sshd.sftp_to(Some(&client_ns), "10.77.1.1", 2222, "ls\n", &dir);
    assert!(
        out.status.success(),
        "sftp from the client namespace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sshd.log_contains("Connection from 10.77.1.2 port"),
        "sshd must see the client's own address at the socket level"
    );
    assert!(sshd.log_contains(&format!(
        "Accepted publickey for {TEST_USER} from 10.77.1.2 port"
    )));
    assert!(
        !sshd.log_contains("Connection from 10.77.2.1"),
        "sshd must never see the agent's address"
    );
    agent.wait_for_log("client_ip=10.77.1.2 ", Duration::from_secs(2));
    drop((agent, gateway, sshd));
}
