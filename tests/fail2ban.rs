//! Issue 17 item 4: the real fail2ban, inside, bans at the gateways. nginx sits behind two
//! gateways of one site with the PROXY protocol and basic authentication; fail2ban watches its
//! log with the shipped filter and bans through the shipped action (`sallyport ban`). After
//! `maxretry` failed logins from 127.0.0.7 both gateways refuse that address, 127.0.0.8 still
//! gets through, and the ban lifts after `bantime`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::nginx::{Nginx, NginxOptions};
use support::*;

const ATTACKER: &str = "127.0.0.7";
const INNOCENT: &str = "127.0.0.8";
const MAXRETRY: usize = 3;
const BANTIME_SECS: u64 = 5;

/// The HTTP status curl gets from `source` through `addr` ("000": no answer, e.g. reset).
fn http_status(source: &str, addr: std::net::SocketAddr, user: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .args(["--interface", source, "-u", user])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// fail2ban's configuration directory: its own settings, the shipped action and filter, and a
/// jail with a short bantime that bans through `sallyport ban` against `admin`.
fn fail2ban_dir(dir: &Workdir, log: &Path, admin: &str) -> std::path::PathBuf {
    let conf = dir.path().join("fail2ban");
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fail2ban");
    for sub in ["action.d", "filter.d"] {
        std::fs::create_dir_all(conf.join(sub)).unwrap();
    }
    for file in [
        "action.d/sallyport.conf",
        "filter.d/sallyport-nginx-auth.conf",
    ] {
        std::fs::copy(packaging.join(file), conf.join(file)).unwrap();
    }
    let c = conf.display();
    std::fs::write(
        conf.join("fail2ban.conf"),
        format!(
            "[Definition]\nloglevel = INFO\nlogtarget = STDERR\nsocket = {c}/fail2ban.sock\n\
             pidfile = {c}/fail2ban.pid\ndbfile = :memory:\n"
        ),
    )
    .unwrap();
    // The jail as in packaging/fail2ban/jail.d/sallyport.conf.example, with test timings;
    // loopback aliases must not be ignored as "this host".
    std::fs::write(
        conf.join("jail.conf"),
        format!(
            "[DEFAULT]\nignoreself = false\nignoreip =\nbackend = polling\n\n\
             [sallyport-nginx-auth]\nenabled = true\nfilter = sallyport-nginx-auth\n\
             logpath = {}\nmaxretry = {MAXRETRY}\nfindtime = 60\nbantime = {BANTIME_SECS}\n\
             action = sallyport[admin=\"{admin}\", sallyport=\"{BIN}\"]\n",
            log.display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn fail2ban_bans_a_password_guesser_at_both_gateways_for_bantime() {
    assert!(
        Path::new("/usr/bin/fail2ban-client").exists(),
        "fail2ban is missing: run the tests with scripts/test.sh, which installs it"
    );
    let dir = Workdir::new();
    let htpasswd = dir.write("htpasswd", "alice:{PLAIN}secret\n");
    let nginx = Nginx::start(
        &dir,
        "nginx",
        NginxOptions {
            proxy_protocol: true,
            auth_basic: Some(&htpasswd),
            ..Default::default()
        },
    );
    let g1 = start_gateway_named(&dir, "gw1", "");
    let g2 = start_gateway_named(&dir, "gw2", "[clients]\nbind = \"127.0.0.2\"\n");
    let port = free_port();
    let backend = local(nginx.port);
    let web = ListenerDef {
        public: port.to_string(),
        extra: "proxy_protocol = \"v1\"".to_string(),
        ..listener("web", port, backend)
    };
    let state = dir.path().join("state");
    let top = format!("state_dir = \"{}\"", state.display());
    let agent = start_agent(&dir, "agent", &[g1.control, g2.control], &[web], &top, "");
    let admin = agent_admin_url(&agent);
    let fronts = [
        local(port),
        std::net::SocketAddr::new([127, 0, 0, 2].into(), port),
    ];
    for front in fronts {
        wait_open(front, Duration::from_secs(10));
        assert_eq!(http_status(INNOCENT, front, "alice:secret"), "200");
    }

    let conf = fail2ban_dir(&dir, &nginx.fail2ban_log, &admin);
    let c = conf.to_str().unwrap();
    let sock = format!("{c}/fail2ban.sock");
    let pid = format!("{c}/fail2ban.pid");
    let fail2ban = Proc::spawn_program(
        "fail2ban",
        "/usr/bin/fail2ban-client",
        &["-c", c, "-s", &sock, "-p", &pid, "-x", "-f", "start"],
    );
    fail2ban.wait_for_log(
        "Jail 'sallyport-nginx-auth' started",
        Duration::from_secs(30),
    );

    // Password guessing from the attacker, through gateway 1.
    for _ in 0..MAXRETRY {
        assert_eq!(http_status(ATTACKER, fronts[0], "alice:guess"), "401");
    }
    let guessed = Instant::now();
    let refused = |front| http_status(ATTACKER, front, "alice:secret") == "000";
    assert!(
        wait_until(Duration::from_secs(20), || fronts
            .iter()
            .all(|f| refused(*f))),
        "fail2ban's ban did not reach both gateways"
    );
    println!(
        "fail2ban: {MAXRETRY} failures -> refused on both gateways {} ms after the last one",
        guessed.elapsed().as_millis()
    );
    fail2ban.wait_for_log("Ban 127.0.0.7", Duration::from_secs(5));
    for front in fronts {
        assert_eq!(http_status(INNOCENT, front, "alice:secret"), "200");
    }
    let shown = g2.api("/api/bans");
    assert_eq!(shown[0]["bans"][0]["net"], "127.0.0.7/32", "{shown}");
    assert_eq!(
        shown[0]["bans"][0]["reason"], "fail2ban sallyport-nginx-auth",
        "{shown}"
    );

    // The ban lifts after bantime (fail2ban's unban, or the gateways' own expiry).
    let banned_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(BANTIME_SECS + 15), || fronts
            .iter()
            .all(|f| http_status(ATTACKER, *f, "alice:secret") == "200")),
        "the ban did not lift after bantime"
    );
    println!(
        "fail2ban: ban lifted on both gateways {} ms after it was seen (bantime {BANTIME_SECS} s)",
        banned_at.elapsed().as_millis()
    );
    let _ = Command::new("/usr/bin/fail2ban-client")
        .args(["-c", c, "-s", &sock, "stop"])
        .output();
}
