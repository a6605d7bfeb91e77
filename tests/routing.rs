//! One public port, many services (issue 18 item 1): listeners with `hostnames` share a public
//! port, the gateway routes each client by its TLS SNI or its HTTP Host. Real nginx servers
//! with their own certificates, the real curl with `--resolve`.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::nginx::{curl, Nginx, NginxOptions};
use support::*;

/// Starts an agent of `site` (its own config file) with these listeners.
fn start_site_agent(
    dir: &Workdir,
    site: &str,
    gateway: SocketAddr,
    listeners: &[ListenerDef],
) -> Proc {
    let config = agent_config(&[gateway], listeners, &format!("name = \"{site}-agent\""))
        .replace("site = \"test-site\"", &format!("site = \"{site}\""));
    let config = format!("{config}\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n");
    let path = dir.write(&format!("{site}.toml"), &config);
    Proc::spawn(site, &["agent", "--config", path.to_str().unwrap()])
}

/// A listener on `public` serving `names`.
fn named(name: &str, public: u16, backend: u16, names: &[&str], extra: &str) -> ListenerDef {
    let mut l = listener(name, public, local(backend));
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    l.extra = format!("hostnames = [{}]\n{extra}", quoted.join(", "));
    l
}

/// An nginx serving HTTPS with a certificate for `host` from its own CA; (nginx, CA file).
fn https_nginx(dir: &Workdir, host: &str, proxy_protocol: bool) -> (Nginx, std::path::PathBuf) {
    let certs = make_certs(dir, &format!("{host}-certs"), &["--gateway-name", host]);
    let nginx = Nginx::start(
        dir,
        host,
        NginxOptions {
            proxy_protocol,
            tls: Some((&certs.join("gateway.crt"), &certs.join("gateway.key"))),
            ..Default::default()
        },
    );
    std::fs::write(nginx.root.join("index.html"), format!("page of {host}\n")).unwrap();
    (nginx, certs.join("ca.crt"))
}

/// curl over HTTPS to `host` on the public port, trusting `ca`; (ok, body, verbose stderr).
fn curl_https(host: &str, port: u16, ca: &Path) -> (bool, String, String) {
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/index.html");
    curl(&[
        "-v",
        "--interface",
        "127.0.0.7",
        "--resolve",
        &resolve,
        "--cacert",
        ca.to_str().unwrap(),
        &url,
    ])
}

fn curl_http(host: &str, port: u16) -> (bool, String, String) {
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("http://{host}:{port}/index.html");
    curl(&["--resolve", &resolve, &url])
}

fn refusal(gateway: &Gateway, key: &str) -> u64 {
    gateway.api("/api/stats")["refusals"][key]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn two_https_servers_behind_one_port_each_with_its_own_certificate() {
    let dir = Workdir::new();
    let (files, files_ca) = https_nginx(&dir, "files.example.test", true);
    let (portal, portal_ca) = https_nginx(&dir, "portal.example.test", false);
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_site_agent(
        &dir,
        "acme",
        gateway.control,
        &[
            named(
                "files",
                public,
                files.port,
                &["files.example.test"],
                "proxy_protocol = \"v2\"",
            ),
            named("portal", public, portal.port, &["*.example.test"], ""),
        ],
    );
    wait_open(local(public), Duration::from_secs(10));

    for (host, ca, page) in [
        (
            "files.example.test",
            &files_ca,
            "page of files.example.test\n",
        ),
        (
            "portal.example.test",
            &portal_ca,
            "page of portal.example.test\n",
        ),
    ] {
        let (ok, body, err) = curl_https(host, public, ca);
        assert!(
            ok,
            "curl https://{host} through the shared port failed: {err}"
        );
        assert_eq!(body, page);
        // The certificate curl verified is that server's own (its SAN matched the name).
        assert!(
            err.contains(&format!("host \"{host}\" matched cert's \"{host}\"")),
            "{err}"
        );
    }
    // The portal's CA does not vouch for what answers for files.example.test: another
    // certificate, another server.
    let (ok, _, _) = curl_https("files.example.test", public, &portal_ca);
    assert!(!ok, "files.example.test must present files' certificate");
    // A wildcard serves any name under it: that is the portal too.
    let (ok, body, _) = {
        let resolve = format!("www.example.test:{public}:127.0.0.1");
        let url = format!("https://www.example.test:{public}/index.html");
        curl(&["--resolve", &resolve, "-k", &url])
    };
    assert!(ok);
    assert_eq!(body, "page of portal.example.test\n");

    // PROXY v2 first, then the ClientHello unchanged: nginx (proxy_protocol on) logged the
    // client's own address and completed the TLS handshake the client started.
    assert!(
        wait_until(Duration::from_secs(5), || files.access_lines().iter().any(
            |l| l.contains("pp=127.0.0.7:") && l.contains("GET /index.html")
        )),
        "nginx must see the client address from the PROXY header: {:?}",
        files.access_lines()
    );
    let status = gateway.api("/api/status");
    let routes = status["routes"].as_array().cloned().unwrap_or_default();
    let shown: Vec<(String, String, String)> = routes
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (s("hostname"), s("site"), s("listener"))
        })
        .collect();
    assert!(shown.contains(&("files.example.test".into(), "acme".into(), "files".into())));
    assert!(shown.contains(&("*.example.test".into(), "acme".into(), "portal".into())));
    assert!(routes.iter().all(|r| r["port"] == public));
    let files_view = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "files")
        .cloned()
        .unwrap();
    assert_eq!(
        files_view["hostnames"],
        serde_json::json!(["files.example.test"])
    );
    // `sallyport status` prints the routes.
    let out = std::process::Command::new(BIN)
        .args(["status", "--admin", &gateway.admin_url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Routes by host name (2)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("*.example.test") && l.contains("acme") && l.contains("portal")),
        "{text}"
    );
}

#[test]
fn plain_http_by_host_unknown_names_refused_then_served_by_a_default_of_another_site() {
    let dir = Workdir::new();
    let mut servers = Vec::new();
    for name in ["alpha", "beta", "fallback"] {
        let nginx = Nginx::start(&dir, name, NginxOptions::default());
        std::fs::write(nginx.root.join("index.html"), format!("page of {name}\n")).unwrap();
        servers.push(nginx);
    }
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _web = start_site_agent(
        &dir,
        "web",
        gateway.control,
        &[
            named(
                "alpha",
                public,
                servers[0].port,
                &["alpha.example.test"],
                "",
            ),
            named("beta", public, servers[1].port, &["Beta.Example.Test."], ""),
        ],
    );
    wait_open(local(public), Duration::from_secs(10));
    for (host, page) in [
        ("alpha.example.test", "page of alpha\n"),
        ("beta.example.test", "page of beta\n"),
    ] {
        let (ok, body, err) = curl_http(host, public);
        assert!(ok, "curl http://{host} failed: {err}");
        assert_eq!(body, page);
    }
    let (ok, body, _) = curl_http("gamma.example.test", public);
    assert!(!ok, "an unknown name must be refused, got {body:?}");
    assert_eq!(refusal(&gateway, "route_unknown"), 1);

    // Another site takes the port's default: unknown names (and requests without one) go there.
    let other = start_site_agent(
        &dir,
        "other",
        gateway.control,
        &[named("fallback", public, servers[2].port, &["*"], "")],
    );
    other.wait_for_log("listener(s) open on the gateway", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || {
        curl_http("gamma.example.test", public).1 == "page of fallback\n"
    }));
    let mut s = TcpStream::connect(local(public)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with("page of fallback\n"), "{answer}");
    // The named ones are still theirs.
    assert_eq!(curl_http("alpha.example.test", public).1, "page of alpha\n");
    // Garbage is reset and counted, never offered.
    let mut g = TcpStream::connect(local(public)).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(g.read(&mut buf), Ok(0) | Err(_)));
    assert_eq!(refusal(&gateway, "route_garbage"), 1);
}

#[test]
fn a_second_site_claiming_a_taken_name_is_refused_and_the_first_keeps_it() {
    let dir = Workdir::new();
    let first = Nginx::start(&dir, "first", NginxOptions::default());
    std::fs::write(first.root.join("index.html"), "page of first\n").unwrap();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _a = start_site_agent(
        &dir,
        "first",
        gateway.control,
        &[named(
            "files",
            public,
            first.port,
            &["files.example.test"],
            "",
        )],
    );
    wait_open(local(public), Duration::from_secs(10));
    let b = start_site_agent(
        &dir,
        "second",
        gateway.control,
        &[named(
            "grab",
            public,
            free_port(),
            &["files.example.test", "x.example.test"],
            "",
        )],
    );
    let line = b.wait_for_log("listener FAILED on the gateway", Duration::from_secs(10));
    let expected = format!(
        "host name \"files.example.test\" on port {public} is already served by listener \"files\" of site \"first\""
    );
    assert!(line.contains(&expected), "{line}");
    assert_eq!(curl_http("files.example.test", public).1, "page of first\n");
    // Nothing of the refused listener was routed: its other name is unknown.
    assert!(!curl_http("x.example.test", public).0);
    let health = gateway.api("/api/health");
    assert_eq!(health["healthy"], false, "{health}");
}

#[test]
fn a_silent_client_is_closed_at_the_peek_deadline_and_counted() {
    let dir = Workdir::new();
    let backend = Nginx::start(&dir, "backend", NginxOptions::default());
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _a = start_site_agent(
        &dir,
        "site",
        gateway.control,
        &[named("web", public, backend.port, &["*"], "")],
    );
    wait_open(local(public), Duration::from_secs(10));
    let mut silent = TcpStream::connect(local(public)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let got = silent.read(&mut buf);
    let after = started.elapsed();
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    assert!(
        after >= Duration::from_millis(4900) && after < Duration::from_secs(15),
        "closed after {after:?}, the deadline is 5 s"
    );
    assert_eq!(refusal(&gateway, "route_timeout"), 1);
    // A client that speaks is served on the same port meanwhile.
    let (ok, body, err) = curl_http("any.example.test", public);
    assert!(ok, "{err}");
    assert_eq!(body, Nginx::PAGE);
}

#[test]
fn config_refuses_a_listener_without_hostnames_on_a_shared_port() {
    let dir = Workdir::new();
    let public = free_port();
    let config = agent_config(
        &["127.0.0.1:1".parse().unwrap()],
        &[
            named("a", public, 1, &["a.example.test"], ""),
            listener("b", public, local(2)),
        ],
        "",
    );
    let path = dir.write("agent.toml", &config);
    let out = std::process::Command::new(BIN)
        .args(["agent", "--config", path.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("agent.toml:") && err.contains("is shared by host name (listener \"a\")"),
        "{err}"
    );
}

#[test]
fn check_routes_its_test_connection_to_each_listener_by_name() {
    let dir = Workdir::new();
    let (tls, _) = https_nginx(&dir, "files.example.test", false);
    let plain = Nginx::start(&dir, "plain", NginxOptions::default());
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let listeners = [
        named("files", public, tls.port, &["files.example.test"], ""),
        named("web", public, plain.port, &["*.example.test"], ""),
    ];
    let config = agent_config(&[gateway.control], &listeners, "");
    let path = dir.write("agent.toml", &config);
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in {text}"))
            .to_string()
    };
    assert!(
        line("as files.example.test (listener files)").contains("answered with a TLS handshake")
    );
    assert!(line("as sallyport-check.example.test (listener web)").contains("HTTP/1.1 400"));
    assert_eq!(refusal(&gateway, "route_timeout"), 0);
}
