//! The command line: config errors name file, line and field, and the process exits non-zero
//! before it opens anything.

mod support;

use std::process::Command;

use support::*;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn agent_config_error_names_file_line_and_field_and_opens_nothing() {
    let dir = Workdir::new();
    let path = dir.write(
        "agent.toml",
        "site = \"acme-mft\"\ngateways = [\"127.0.0.1:1\"]\n\n[[listener]]\nname = \"sftp\"\npublic = \"2222\"\nbackend = \"10.0.0.5\"\n",
    );
    let (code, stderr) = run(&["agent", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    let want = format!(
        "{}:7: listener \"sftp\": backend: invalid socket address \"10.0.0.5\"",
        path.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
}

#[test]
fn gateway_config_error_exits_before_binding() {
    let dir = Workdir::new();
    let port = free_port();
    let path = dir.write(
        "gateway.toml",
        &format!("[control]\nlisten = \"127.0.0.1:{port}\"\n\n[clients]\nbind = \"not-an-ip\"\n\n[peers]\ndefault = \"allow\"\n"),
    );
    let (code, stderr) = run(&["gateway", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("gateway.toml:5: clients.bind: invalid IP address \"not-an-ip\""),
        "{stderr}"
    );
    // Nothing was opened: the control port is still free.
    std::net::TcpListener::bind(local(port)).expect("the control port must not have been bound");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let (code, stderr) = run(&["gateway", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(code, 78);
    assert!(
        stderr.contains("/nonexistent/gateway.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn the_gateway_refuses_a_second_instance_on_the_same_control_port() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let path = dir.write(
        "second.toml",
        &format!(
            "[control]\nlisten = \"{}\"\n[peers]\ndefault = \"allow\"\n[admin]\nenabled = false\n",
            gw.control
        ),
    );
    let (code, stderr) = run(&["gateway", "--config", path.to_str().unwrap()]);
    // A taken port the config names is a config error (78), like the admin port below.
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: cannot listen on control port {}",
            path.display(),
            gw.control
        )),
        "{stderr}"
    );
}

/// Issue 13 item 13: a taken admin port (or the agent's outbound port) exits 78 with the file,
/// like every other config error, so systemd's RestartPreventExitStatus=78 stops a restart loop
/// (on main: exit 1). Nothing else stays open: the control port is free again afterwards.
#[test]
fn a_taken_admin_or_outbound_port_is_a_config_error() {
    let dir = Workdir::new();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let control = free_port();
    let path = dir.write(
        "gateway.toml",
        &format!(
            "[control]\nlisten = \"127.0.0.1:{control}\"\n[peers]\ndefault = \"allow\"\n[admin]\nlisten = \"{taken}\"\n"
        ),
    );
    let (code, stderr) = run(&["gateway", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: cannot listen on admin port {taken}: Address already in use",
            path.display()
        )),
        "{stderr}"
    );
    std::net::TcpListener::bind(local(control)).expect("the control port must be free again");

    let path = dir.write(
        "agent.toml",
        &format!(
            "site = \"acme\"\ngateways = [\"127.0.0.1:1\"]\n\n[outbound]\nlisten = \"{taken}\"\n"
        ),
    );
    let (code, stderr) = run(&["agent", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: [outbound] cannot listen on {taken}: Address already in use",
            path.display()
        )),
        "{stderr}"
    );
}

fn output(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_validates_a_file_without_opening_or_dialing_anything() {
    let dir = Workdir::new();
    // A port this test holds: the running gateway would fail to bind it and the agent would
    // connect to it; the check must do neither.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    held.set_nonblocking(true).unwrap();
    let port = held.local_addr().unwrap().port();

    let gateway = dir.write(
        "gateway.toml",
        &format!(
            "[control]\nlisten = \"127.0.0.1:{port}\"\n[peers]\ndefault = \"deny\"\nexcept = [\"127.0.0.1\"]\n"
        ),
    );
    let gateway = gateway.to_str().unwrap();
    let (code, stdout, stderr) = output(&["gateway", "--config", gateway, "--check-config"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, format!("{gateway}: valid\n"));
    // The warnings the daemon would log at start come along.
    assert!(
        stderr.contains("warning: no [control] tls configured"),
        "{stderr}"
    );

    let agent = dir.write(
        "agent.toml",
        &format!("site = \"s\"\ngateways = [\"127.0.0.1:{port}\"]\n"),
    );
    let agent = agent.to_str().unwrap();
    let (code, stdout, stderr) = output(&["agent", "--config", agent, "--check-config"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, format!("{agent}: valid\n"));
    assert!(
        matches!(held.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the agent's check dialed the gateway"
    );

    // A bad file: exit status 78, file, line and field, as when the daemon starts.
    let bad = dir.write("bad.toml", "[control]\nlisten = \"127.0.0.1\"\n");
    let (code, stdout, stderr) = output(&[
        "gateway",
        "--config",
        bad.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(code, 78, "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("bad.toml:2: control.listen: invalid socket address"),
        "{stderr}"
    );
    // A rule the daemon enforces at start is checked too: a gateway without [peers] (issue 12).
    let open = dir.write("open.toml", "[control]\nlisten = \"127.0.0.1:0\"\n");
    let (code, _, stderr) = output(&[
        "gateway",
        "--config",
        open.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("no [peers] section"), "{stderr}");
}

/// The subcommands `sallyport ARGS --help` lists (without `help`), each with its own.
fn visible_commands(path: &[String]) -> Vec<Vec<String>> {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let (code, help, stderr) = output(&args);
    assert_eq!(code, 0, "{stderr}");
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| n != "help")
        .collect();
    let mut all = Vec::new();
    for name in names {
        let mut sub = path.to_vec();
        sub.push(name);
        all.extend(visible_commands(&sub));
        all.push(sub);
    }
    all
}

#[test]
fn generate_writes_a_man_page_per_visible_command_and_completions_without_hidden_ones() {
    let dir = Workdir::new();
    let (man, completions) = (dir.path().join("man"), dir.path().join("completions"));
    let (code, _, stderr) = output(&[
        "generate",
        "--man",
        man.to_str().unwrap(),
        "--completions",
        completions.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");

    // One page per command `--help` shows, nested ones included (`cert init`), and none for
    // the hidden `generate`.
    let mut want: Vec<String> = visible_commands(&[])
        .iter()
        .map(|path| format!("sallyport-{}.1", path.join("-")))
        .collect();
    want.push("sallyport.1".into());
    want.sort();
    let mut pages: Vec<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    assert_eq!(pages, want);
    assert!(want.contains(&"sallyport-gateway.1".to_string()));
    assert!(want.contains(&"sallyport-cert-init.1".to_string()));

    let page = |name: &str| std::fs::read_to_string(man.join(name)).unwrap();
    assert!(page("sallyport-gateway.1").contains("check\\-config"));
    let top = page("sallyport.1");
    for section in [
        ".SH \"EXIT STATUS\"",
        ".B 78",
        ".SH FILES",
        ".SH \"SEE ALSO\"",
    ] {
        assert!(top.contains(section), "sallyport.1 lacks {section}");
    }

    for file in ["sallyport.bash", "_sallyport", "sallyport.fish"] {
        let text = std::fs::read_to_string(completions.join(file)).unwrap();
        assert!(text.contains("gateway"), "{file}");
        assert!(
            !text.contains("generate"),
            "{file} offers the hidden subcommand"
        );
    }

    // A packager's typo gets an error, not an empty success.
    let (code, _, stderr) = output(&["generate"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--man"), "{stderr}");
}
