//! `sallyport cert`: a second gateway's certificate from the same CA, rotation that keeps the
//! CA, and output that names every file written, replaced or kept (issue 13 item 9).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::servers::EchoServer;
use support::*;

/// Runs `sallyport cert ARGS`; (exit code, stdout + stderr).
fn cert(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).arg("cert").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- cert {args:?} ---\n{text}");
    (out.status.code().unwrap_or(-1), text)
}

fn digest(dir: &Path, files: &[&str]) -> Vec<String> {
    files.iter().map(|f| sha256_file(&dir.join(f))).collect()
}

/// A TLS gateway whose clients bind to `ip` and whose certificate is `dir/stem.crt`.
fn gateway_on(dir: &Workdir, name: &str, ip: &str, certs: &Path, stem: &str) -> Gateway {
    let config = format!(
        "[control]\nlisten = \"{ip}:0\"\ntls = {{ cert = \"{0}/{stem}.crt\", key = \"{0}/{stem}.key\", client_ca = \"{0}/ca.crt\" }}\n\n[clients]\nbind = \"{ip}\"\n\n[peers]\ndefault = \"allow\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        certs.display()
    );
    let path = dir.write(&format!("{name}.toml"), &config);
    spawn_gateway(name, &path)
}

#[test]
fn a_second_gateway_certificate_and_a_rotation_that_keeps_the_ca() {
    let dir = Workdir::new();
    let certs = dir.path().join("certs");
    let c = certs.to_str().unwrap();
    let (code, out) = cert(&["init", "--dir", c, "--gateway-ip", "127.0.0.1"]);
    assert_eq!(code, 0, "{out}");
    for f in ["ca.crt", "gateway.crt", "agent.crt"] {
        assert!(
            out.contains(&format!("wrote    {}", certs.join(f).display())),
            "{f} in {out}"
        );
    }

    // A certificate for a second gateway, from the same CA.
    let (code, out) = cert(&["issue", "--dir", c, "--gateway", "gw2.test,127.0.0.2"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "kept     {}, {}",
            certs.join("ca.crt").display(),
            certs.join("ca.key").display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "wrote    {}, {}: gateway certificate, valid for gw2.test, 127.0.0.2",
            certs.join("gw2.test.crt").display(),
            certs.join("gw2.test.key").display()
        )),
        "{out}"
    );
    let (code, out) = cert(&["issue", "--dir", c, "--gateway", "gw2.test"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already exists: nothing was written"), "{out}");

    // Both gateways serve one agent, each verified by the address it is dialed at.
    let echo = EchoServer::start();
    let gw1 = gateway_on(&dir, "gw1", "127.0.0.1", &certs, "gateway");
    let gw2 = gateway_on(&dir, "gw2", "127.0.0.2", &certs, "gw2.test");
    let port = free_port();
    let mut l = listener("echo", port, echo.addr);
    l.public = port.to_string();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw1.control, gw2.control],
        &[l],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    let public2 = std::net::SocketAddr::from(([127, 0, 0, 2], port));
    wait_open(local(port), Duration::from_secs(10));
    wait_open(public2, Duration::from_secs(10));
    echo_round_trip(local(port), "through gateway 1");
    echo_round_trip(public2, "through gateway 2");

    // `cert init` for other gateway names no longer keeps the old certificate silently.
    let files = [
        "ca.crt",
        "ca.key",
        "gateway.crt",
        "gateway.key",
        "agent.crt",
    ];
    let before = digest(&certs, &files);
    let (code, out) = cert(&["init", "--dir", c, "--gateway-name", "other.test"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is valid for 127.0.0.1, not for other.test: nothing was written"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "sallyport cert issue --dir {c} --gateway other.test"
        )),
        "{out}"
    );
    assert_eq!(digest(&certs, &files), before);

    // --force rotates the gateway's key and keeps the CA: the running agent, whose certificate
    // and CA were loaded before, reconnects to the restarted gateway and serves again.
    let (code, out) = cert(&["init", "--dir", c, "--force"]);
    assert_eq!(code, 0, "{out}");
    let after = digest(&certs, &files);
    assert_eq!(after[0..2], before[0..2], "--force replaced the CA");
    assert_ne!(after[2], before[2], "gateway.crt was not replaced");
    assert!(
        out.contains(&format!(
            "replaced {}, {}: gateway certificate, valid for 127.0.0.1",
            certs.join("gateway.crt").display(),
            certs.join("gateway.key").display()
        )),
        "{out}"
    );
    assert!(out.contains("the private CA (reused)"), "{out}");
    let control = gw1.control;
    drop(gw1);
    let config = dir.path().join("gw1.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        // The control port first in the file; the admin API keeps its ephemeral port.
        .replacen("127.0.0.1:0", &control.to_string(), 1);
    std::fs::write(&config, text).unwrap();
    let _gw1 = spawn_gateway("gw1", &config);
    wait_open(local(port), Duration::from_secs(15));
    echo_round_trip(local(port), "through gateway 1 with its new key");

    // Only --new-ca replaces the CA, and says what stops working.
    let (code, out) = cert(&["init", "--dir", c, "--new-ca"]);
    assert_eq!(code, 0, "{out}");
    assert_ne!(digest(&certs, &["ca.crt"])[0], before[0]);
    assert!(out.contains("a NEW private CA"), "{out}");
    assert!(out.contains("no longer valid: gw2.test.crt"), "{out}");
}
