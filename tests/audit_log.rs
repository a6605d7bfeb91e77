//! Audit logs in JSON (issue 16 part 2): a session of both daemons, the gateway with
//! `--log-format json` and the agent with `SALLYPORT_LOG_FORMAT=json`, every line of both logs
//! parsed with a JSON parser, and each client's two `connection_end` records joined on `conn`:
//! the same client address, public address, listener and bytes on both sides, the backend on the
//! agent's, outcomes for a served client and one whose backend is down, ids unique across a
//! gateway restart, and a hostile proxy request that cannot forge or split a record.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::servers::EchoServer;
use support::*;

/// Every field a `connection_end` record of a client an agent claimed has on both sides.
const FIELDS: [&str; 14] = [
    "timestamp",
    "level",
    "event",
    "daemon",
    "conn",
    "site",
    "listener",
    "client_ip",
    "client_port",
    "gateway",
    "agent",
    "bytes_from_client",
    "bytes_to_client",
    "duration_ms",
];

/// Parses every line of a daemon's output as one JSON object; panics naming the first that is not.
fn parse_all(proc: &Proc) -> Vec<Value> {
    let lines = proc.log_lines();
    assert!(!lines.is_empty(), "{} wrote nothing", proc.name);
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{} line {}: not JSON ({e}): {line:?}", proc.name, i + 1)
            });
            assert!(
                v.is_object(),
                "{} line {}: not an object: {line}",
                proc.name,
                i + 1
            );
            for key in ["timestamp", "level"] {
                assert!(
                    v[key].is_string(),
                    "{} line {}: no {key}: {line}",
                    proc.name,
                    i + 1
                );
            }
            v
        })
        .collect()
}

/// The `connection_end` records of one daemon, keyed by `conn` (each id once).
fn records(all: &[Value], daemon: &str) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    for r in all.iter().filter(|r| r["event"] == "connection_end") {
        assert_eq!(r["daemon"], daemon, "{r}");
        for f in FIELDS {
            assert!(!r[f].is_null(), "{daemon} record without {f}: {r}");
        }
        assert!(r["outcome"].is_string(), "{r}");
        let conn = r["conn"]
            .as_u64()
            .unwrap_or_else(|| panic!("conn is not a number: {r}"));
        assert!(conn < 1 << 53, "conn {conn} does not survive a JSON double");
        assert!(
            out.insert(conn, r.clone()).is_none(),
            "conn {conn} twice on the {daemon}"
        );
    }
    out
}

fn echo_client(public: SocketAddr, request: &[u8]) -> (SocketAddr, Vec<u8>) {
    let mut c = TcpStream::connect(public).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(request).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    (me, back)
}

/// A raw SOCKS5 CONNECT to a domain name of the caller's bytes; the reply code, if any.
fn socks5_connect(proxy: SocketAddr, host: &[u8], port: u16) -> Option<u8> {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).ok()?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).ok()?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).ok()?;
    Some(reply[1])
}

#[test]
fn both_daemons_log_one_json_object_per_line_and_connection_records_join() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let dead_backend = local(free_port());
    let gw_config = dir.write(
        "gateway.toml",
        "[control]\nlisten = \"127.0.0.1:0\"\n\n[clients]\nbind = \"127.0.0.1\"\n\n\
         [peers]\ndefault = \"deny\"\nexcept = [\"127.0.0.1\"]\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[egress]\nallow = []\n",
    );
    let gw_proc = Proc::spawn(
        "gateway",
        &[
            "gateway",
            "--log-format",
            "json",
            "--config",
            gw_config.to_str().unwrap(),
        ],
    );
    // Addresses from the JSON log lines themselves.
    let admin_line =
        gw_proc.wait_for_log("admin API and dashboard listening", Duration::from_secs(10));
    let control_line = gw_proc.wait_for_log("control port listening on", Duration::from_secs(10));
    let addr_in = |line: &str, after: &str| -> SocketAddr {
        let v: Value = serde_json::from_str(line).unwrap();
        let msg = v["message"].as_str().unwrap();
        let rest = msg.split(after).nth(1).unwrap();
        rest.trim_end_matches('/')
            .split([' ', '/'])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let control = addr_in(&control_line, "listening on ");
    let admin = format!("http://{}", addr_in(&admin_line, "http://"));

    let (echo_port, dead_port, proxy) = (free_port(), free_port(), local(free_port()));
    let mut config = agent_config(
        &[control],
        &[
            listener("echo", echo_port, echo.addr),
            listener("dead", dead_port, dead_backend),
        ],
        "",
    );
    config.push_str(&format!(
        "\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n\n[outbound]\nlisten = \"{proxy}\"\n"
    ));
    let agent_path = dir.write("agent.toml", &config);
    let mut agent = Proc::spawn_with_env(
        "agent",
        BIN,
        &["agent", "--config", agent_path.to_str().unwrap()],
        &[("SALLYPORT_LOG_FORMAT", "json")],
    );
    // Waiting on the agent's log, not by connecting: a probe would be a client with a record.
    let echo_open = format!("listener open on the gateway at {}", local(echo_port));
    agent.wait_for_log(&echo_open, Duration::from_secs(10));
    let mut gw_proc = gw_proc;

    // Eight clients at once (more than the warm pool holds, so both ways of handing a client
    // over are used), each with its own payload.
    let clients: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let request = pseudo_random(500 + i * 1000, i as u64);
                let (me, back) = echo_client(local(echo_port), &request);
                assert_eq!(back, request);
                (me, request.len() as u64)
            })
        })
        .collect();
    let mut served: Vec<(SocketAddr, u64)> =
        clients.into_iter().map(|t| t.join().unwrap()).collect();
    // One client whose backend is down.
    let mut c = TcpStream::connect(local(dead_port)).unwrap();
    let failed_client = c.local_addr().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.read(&mut [0u8; 1]);
    gw_proc.wait_for_log("agent could not serve client", Duration::from_secs(5));
    drop(c);
    // A hostile outbound request: a name with a newline and a forged record after it.
    let forged = b"x\"}\n{\"event\":\"connection_end\",\"conn\":7,\"daemon\":\"agent\"}\n";
    let code = socks5_connect(proxy, forged, 443);
    assert_ne!(
        code,
        Some(0),
        "the gateway's empty egress list allows nothing"
    );

    // A gateway restart: connection ids must not start again where they started.
    let out = Command::new(BIN)
        .args(["ctl", "restart", "--admin", &admin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(15), || gw_proc
            .count_log("agent connected")
            >= 2),
        "the agent did not come back after the restart"
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent.count_log(&echo_open) >= 2),
        "the listener did not reopen after the restart"
    );
    let request = pseudo_random(4321, 99);
    let (me, back) = echo_client(local(echo_port), &request);
    assert_eq!(back, request);
    served.push((me, request.len() as u64));
    let accepted_after_restart = {
        let stats: Value = serde_json::from_slice(
            &Command::new("curl")
                .args(["-s", &format!("{admin}/api/stats")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        stats["totals"]["accepted"].as_u64().unwrap()
    };

    // Both stop; then every line of both logs must parse.
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0));
    gw_proc.signal("TERM");
    assert_eq!(gw_proc.wait_exit(Duration::from_secs(15)), Some(0));
    let (gw_all, agent_all) = (parse_all(&gw_proc), parse_all(&agent));
    let (on_gw, on_agent) = (records(&gw_all, "gateway"), records(&agent_all, "agent"));
    // (A forged line would have failed to parse, or lacked a record's fields, above.)
    assert!(
        !on_agent.contains_key(&7),
        "a forged record made it into the agent's log"
    );

    // Every served client: one record on each side, joined by conn, agreeing field by field.
    for (client, bytes) in &served {
        let g = on_gw
            .values()
            .find(|r| r["client_port"] == client.port())
            .unwrap_or_else(|| panic!("no gateway record for {client}: {on_gw:#?}"));
        let conn = g["conn"].as_u64().unwrap();
        let a = on_agent
            .get(&conn)
            .unwrap_or_else(|| panic!("no agent record with conn {conn}: {g}"));
        for f in [
            "site",
            "listener",
            "client_ip",
            "client_port",
            "gateway",
            "agent",
        ] {
            assert_eq!(g[f], a[f], "{f} differs for conn {conn}:\n{g}\n{a}");
        }
        assert_eq!(g["client_ip"], client.ip().to_string());
        assert_eq!(g["gateway"], local(echo_port).to_string());
        assert_eq!(
            (g["site"].as_str(), g["listener"].as_str()),
            (Some("test-site"), Some("echo"))
        );
        assert_eq!(g["agent"], "test-agent");
        for side in [g, a] {
            assert_eq!(side["bytes_from_client"], *bytes, "{side}");
            assert_eq!(side["bytes_to_client"], *bytes, "{side}");
            assert_eq!(side["outcome"], "closed", "{side}");
            assert!(side["duration_ms"].as_u64().is_some(), "{side}");
        }
        assert!(
            g.get("backend").is_none(),
            "the gateway never learns internal addresses: {g}"
        );
        assert_eq!(a["backend"], echo.addr.to_string());
        assert!(
            g["agent_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{g}"
        );
    }

    // The client whose backend was down: the agent says why, the gateway that the agent failed.
    let g = on_gw
        .values()
        .find(|r| r["client_port"] == failed_client.port())
        .expect("a gateway record for the failed client");
    let a = &on_agent[&g["conn"].as_u64().unwrap()];
    assert_eq!(a["outcome"], "backend_unreachable", "{a}");
    assert_eq!(a["backend"], dead_backend.to_string());
    assert_eq!(g["outcome"], "agent_failed", "{g}");
    assert!(g["error"].as_str().unwrap().contains("unreachable"), "{g}");

    // One gateway record per accepted client, and ids not reused by the restarted gateway.
    assert_eq!(on_gw.len(), served.len() + 1);
    let last = on_gw
        .values()
        .find(|r| r["client_port"] == served.last().unwrap().0.port())
        .unwrap();
    assert_eq!(
        accepted_after_restart, 1,
        "the restarted gateway counted one client"
    );
    let before: BTreeSet<u64> = on_gw
        .keys()
        .copied()
        .filter(|c| *c != last["conn"].as_u64().unwrap())
        .collect();
    assert!(!before.contains(&last["conn"].as_u64().unwrap()));
    let smallest_before = before.iter().min().unwrap();
    assert_ne!(
        last["conn"].as_u64().unwrap() & 0xffff_ffff,
        0,
        "ids are never 0 (`sallyport check`'s probe id)"
    );
    assert_ne!(
        last["conn"].as_u64().unwrap() >> 32,
        smallest_before >> 32,
        "a restarted gateway draws new connection ids"
    );
}
