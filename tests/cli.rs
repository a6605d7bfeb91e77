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
        &format!("[control]\nlisten = \"127.0.0.1:{port}\"\n\n[clients]\nbind = \"not-an-ip\"\n"),
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
            "[control]\nlisten = \"{}\"\n[admin]\nenabled = false\n",
            gw.control
        ),
    );
    let (code, stderr) = run(&["gateway", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on control port {}", gw.control)),
        "{stderr}"
    );
}
