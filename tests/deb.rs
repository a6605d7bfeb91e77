//! The Debian package (packaging/build-deb, cargo-deb): built from this tree, installed with
//! dpkg on this machine and used as an operator would (the binary, the man pages, the shell
//! completions, the units, the example configs), then removed (only the conffiles stay, with
//! an operator's edit), installed again over them, and purged (nothing stays).
//!
//! It installs into the real /usr and /etc: this machine and CI's are throwaway. A guard
//! purges the package however the test ends; a marker in the temp dir lets the next run purge
//! what a killed run left, and a package this test did not install is never touched. flock(1)
//! keeps two runs on one machine (two worktrees) out of each other's way. Needs root and dpkg.
//!
//! The package packs the release build bench/run --smoke uses too; scripts/test.sh makes it
//! (and installs cargo-deb) before the suite, so the test itself takes seconds.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::Workdir;

const PACKAGE: &str = "sallyport";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const UNITS: [&str; 2] = ["sallyport-gateway.service", "sallyport-agent.service"];

/// Runs a command with no input; its output.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; its stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// dpkg, waiting out the lock another process (an apt-get elsewhere) may hold.
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let locked = !out.status.success() && text(&out.stderr).contains("lock");
        if !locked || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn dpkg_ok(args: &[&str]) {
    let out = dpkg(args);
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// dpkg's status of the package ("install ok installed" ...), None when dpkg knows nothing.
fn status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    let state = text(&out.stdout);
    (out.status.success() && !state.ends_with("not-installed")).then_some(state)
}

/// Every path under /etc, /usr, /var/lib and /run whose path names sallyport (symlinks are
/// listed, not followed).
fn sallyport_paths() -> BTreeSet<String> {
    fn walk(dir: &Path, found: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.to_string_lossy().contains(PACKAGE) {
                found.insert(path.to_string_lossy().into_owned());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, found);
            }
        }
    }
    let mut found = BTreeSet::new();
    for root in ["/etc", "/usr", "/var/lib", "/run"] {
        walk(Path::new(root), &mut found);
    }
    found
}

/// Holds flock(1) on a lock file in the temp dir until dropped; the kernel lets go when this
/// process dies however it dies (the child's stdin closes and it exits).
struct MachineLock(Child);

impl MachineLock {
    fn take() -> MachineLock {
        let path = std::env::temp_dir().join("sallyport-deb-test.lock");
        let mut child = Command::new("flock")
            .args(["--exclusive", "--wait", "900"])
            .arg(&path)
            .args(["sh", "-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock (util-linux)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "locked\n", "flock {} failed", path.display());
        MachineLock(child)
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Present while a package this test installed may be on the machine.
fn marker() -> PathBuf {
    std::env::temp_dir().join("sallyport-deb-test.installed")
}

/// Purges the package when dropped, unless disarmed after a checked purge.
struct PurgeGuard {
    armed: bool,
}

impl Drop for PurgeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let out = dpkg(&["--purge", PACKAGE]);
        if out.status.success() {
            let _ = std::fs::remove_file(marker());
        } else {
            eprintln!(
                "dpkg --purge {PACKAGE} failed: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }
}

/// Purges what an interrupted run of this test left; refuses to touch anyone else's package.
fn clear_leftover() {
    let Some(state) = status() else {
        return;
    };
    assert!(
        marker().exists(),
        "a {PACKAGE} package this test did not install is on this machine ({state}); the test \
         does not touch it: `dpkg -P {PACKAGE}` first if it may go"
    );
    eprintln!("purging the {PACKAGE} package an interrupted run of this test left ({state})");
    dpkg_ok(&["--purge", PACKAGE]);
    std::fs::remove_file(marker()).unwrap();
}

/// packaging/build-deb; the path of the .deb it made.
fn build() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build-deb");
    let started = Instant::now();
    // `--fast`: gzip-speed compression. xz (the default, for packages people download) took
    // 30 s of the test's CPU, most of it on the debug symbols; what is checked here does not
    // depend on how the archive is compressed.
    let out = run_ok(script.to_str().unwrap(), &["--fast"]);
    eprintln!("packaging/build-deb: {:.1?}", started.elapsed());
    let deb = out
        .lines()
        .find(|l| l.ends_with(".deb") && !l.contains("-dbgsym"))
        .unwrap_or_else(|| panic!("no .deb path in build-deb's output:\n{out}"));
    let name = format!("{PACKAGE}_{VERSION}-1_");
    assert!(
        deb.contains("/target/debian/") && deb.contains(&name),
        "{deb}"
    );
    PathBuf::from(deb)
}

/// The control fields and file list; returns the conffiles and every file.
fn inspect(deb: &str) -> (Vec<String>, Vec<String>) {
    let fields = run_ok(
        "dpkg-deb",
        &[
            "-f", deb, "Package", "Version", "Section", "Priority", "Depends",
        ],
    );
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {fields}"))
            .to_string()
    };
    assert_eq!(field("Package"), PACKAGE);
    assert_eq!(field("Version"), format!("{VERSION}-1"));
    assert_eq!(field("Section"), "net");
    assert_eq!(field("Priority"), "optional");
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>= "),
        "computed depends: {depends}"
    );
    assert!(depends.contains("systemd | systemd-sysusers"), "{depends}");

    // "-rw-r--r-- 0/0  2925 2026-01-01 00:00 ./etc/sallyport/gateway.toml"
    let files: Vec<String> = run_ok("dpkg-deb", &["-c", deb])
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in [
        "/usr/bin/sallyport",
        "/usr/lib/systemd/system/sallyport-gateway.service",
        "/usr/lib/systemd/system/sallyport-agent.service",
        "/usr/lib/sysusers.d/sallyport.conf",
        "/etc/sallyport/gateway.toml",
        "/etc/sallyport/agent.toml",
        "/usr/share/man/man1/sallyport.1.gz",
        "/usr/share/man/man1/sallyport-gateway.1.gz",
        "/usr/share/man/man1/sallyport-agent.1.gz",
        "/usr/share/bash-completion/completions/sallyport",
        "/usr/share/zsh/vendor-completions/_sallyport",
        "/usr/share/fish/vendor_completions.d/sallyport.fish",
        "/usr/share/doc/sallyport/copyright",
        "/usr/share/doc/sallyport/README.md",
        "/usr/share/doc/sallyport/operations.md",
        "/usr/share/sallyport/grafana/sallyport.json",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} not in {files:#?}");
    }
    let strays: Vec<&String> = files
        .iter()
        .filter(|f| !f.starts_with("/usr/") && !f.starts_with("/etc/sallyport/"))
        .collect();
    assert!(
        strays.is_empty(),
        "files outside /usr and /etc/sallyport: {strays:?}"
    );

    // Every file under /etc is a conffile, so dpkg keeps an operator's edits.
    let control = Workdir::new();
    run_ok("dpkg-deb", &["-e", deb, control.path().to_str().unwrap()]);
    let conffiles: Vec<String> = std::fs::read_to_string(control.path().join("conffiles"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let under_etc: BTreeSet<&String> = files.iter().filter(|f| f.starts_with("/etc/")).collect();
    assert_eq!(conffiles.iter().collect::<BTreeSet<_>>(), under_etc);
    (conffiles, files)
}

/// The group the postinst made through systemd-sysusers, owning /etc/sallyport (0750).
fn check_group_and_config_dir() {
    let entry = run_ok("getent", &["group", PACKAGE]);
    let gid: u32 = entry.split(':').nth(2).unwrap().parse().unwrap();
    let dir = std::fs::metadata("/etc/sallyport").unwrap();
    assert_eq!(dir.mode() & 0o7777, 0o750, "/etc/sallyport mode");
    assert_eq!((dir.uid(), dir.gid()), (0, gid), "/etc/sallyport owner");
}

/// Installing neither enables nor starts a unit: the example configs are not a deployment.
fn check_units_not_enabled_or_started() {
    let links: Vec<String> = sallyport_paths()
        .into_iter()
        .filter(|p| p.starts_with("/etc/systemd/"))
        .collect();
    assert!(links.is_empty(), "units enabled or masked: {links:?}");
    if Path::new("/run/systemd/system").exists() {
        for unit in UNITS {
            let active = run("systemctl", &["is-active", unit]);
            assert_eq!(text(&active.stdout).trim(), "inactive", "{unit}");
        }
    }
}

/// `systemd-analyze verify` of the installed units: their ExecStart binary and their
/// Documentation= man pages exist, and nothing in them draws a warning.
fn check_units_verify() {
    if !installed("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze (Debian package systemd) is not installed");
        return;
    }
    let cwd = Workdir::new();
    for unit in UNITS {
        let path = format!("/usr/lib/systemd/system/{unit}");
        let out = Command::new("systemd-analyze")
            .args(["verify", &path])
            .current_dir(cwd.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{path}: {stderr}");
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(PACKAGE)).collect();
        assert!(ours.is_empty(), "{path}: {ours:#?}");
    }
}

/// The installed pages are exactly what the installed binary generates, `man` finds each by
/// name, and each renders with no groff warning.
fn check_man_pages() {
    let fresh = Workdir::new();
    run_ok(
        "/usr/bin/sallyport",
        &["generate", "--man", fresh.path().to_str().unwrap()],
    );
    let mut generated: Vec<String> = std::fs::read_dir(fresh.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    generated.sort();
    let mut shipped: Vec<String> = std::fs::read_dir("/usr/share/man/man1")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(PACKAGE))
        .map(|n| n.strip_suffix(".gz").expect("gzipped page").to_string())
        .collect();
    shipped.sort();
    assert_eq!(shipped, generated);
    for page in &shipped {
        let path = format!("/usr/share/man/man1/{page}.gz");
        let name = page.strip_suffix(".1").unwrap();
        let content = run_ok("gzip", &["-dc", &path]);
        let fresh_content = std::fs::read_to_string(fresh.path().join(page)).unwrap();
        assert!(content == fresh_content, "{path} differs from the binary's");

        assert_eq!(run_ok("man", &["-w", name]).trim(), path);
        let out = Command::new("man")
            .args(["--warnings", "-l", &path])
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success() && stderr.is_empty(),
            "man -l {path}: {stderr}"
        );
        // NAME, then "sallyport-gateway - Run the gateway ..." (justified: spaces may double).
        let title = stdout
            .lines()
            .skip_while(|l| l.trim() != "NAME")
            .nth(1)
            .unwrap_or_else(|| panic!("{path}: no NAME section: {stdout}"));
        let rest = title.trim().strip_prefix(name).map(str::trim_start);
        assert!(rest.is_some_and(|r| r.starts_with("- ")), "{path}: {title}");
    }
    let top = run_ok("gzip", &["-dc", "/usr/share/man/man1/sallyport.1.gz"]);
    assert!(
        top.contains("EXIT STATUS") && top.contains(".B 78"),
        "{top}"
    );
    eprintln!("man pages: {} render cleanly", shipped.len());
}

/// Each shell finds the completions where it looks by itself, and they complete.
fn check_completions() {
    let bash_completion = Path::new("/usr/share/bash-completion/bash_completion").exists();
    // With bash-completion (what an interactive Debian shell loads), the on-demand loader must
    // find the file by the command's name; without it, source the file.
    let load = if bash_completion {
        "source /usr/share/bash-completion/bash_completion; _completion_loader sallyport"
    } else {
        eprintln!("bash-completion not installed: sourcing the file itself");
        "source /usr/share/bash-completion/completions/sallyport"
    };
    let script = format!(
        r#"{load}
complete -p sallyport
c() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
     COMPREPLY=(); _sallyport sallyport "${{@: -1}}" "${{@: -2:1}}"; echo "${{COMPREPLY[*]}}"; }}
c sallyport ga
c sallyport gateway --c
c sallyport gen
"#
    );
    let out = run_ok("bash", &["-c", &script]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("-F _sallyport sallyport"), "{out}");
    assert_eq!(lines[1], "gateway", "{out}");
    assert!(
        lines[2].contains("--config") && lines[2].contains("--check-config"),
        "{out}"
    );
    assert_eq!(
        lines.get(3).copied().unwrap_or(""),
        "",
        "hidden generate offered: {out}"
    );

    if installed("zsh") {
        run_ok(
            "zsh",
            &["-n", "/usr/share/zsh/vendor-completions/_sallyport"],
        );
        // compinit registers the function from the default fpath (vendor-completions).
        let out = run_ok(
            "zsh",
            &[
                "-fc",
                "autoload -U compinit; compinit -u -D; print -r -- ${_comps[sallyport]}",
            ],
        );
        assert_eq!(out.trim(), "_sallyport");
    } else {
        eprintln!("SKIPPED: zsh is not installed (scripts/test.sh installs it)");
    }

    if installed("fish") {
        // fish loads vendor_completions.d/sallyport.fish on demand (not with --no-config,
        // which also leaves out the vendor directories).
        let out = run_ok("fish", &["-c", "complete -C'sallyport ga'"]);
        assert!(out.starts_with("gateway\t"), "{out}");
        let out = run_ok("fish", &["-c", "complete -C'sallyport gateway --c'"]);
        assert!(
            out.contains("--config") && out.contains("--check-config"),
            "{out}"
        );
    } else {
        eprintln!("SKIPPED: fish is not installed (scripts/test.sh installs it)");
    }
}

/// Which daemon reads an example config: by its file name.
fn role_of(file: &str) -> &'static str {
    let name = Path::new(file).file_name().unwrap().to_str().unwrap();
    if name.starts_with("gateway") {
        "gateway"
    } else if name.starts_with("agent") {
        "agent"
    } else {
        panic!("{file}: name example configs gateway*.toml or agent*.toml")
    }
}

/// `sallyport ROLE --config FILE --check-config`: (exit code, stdout, stderr).
fn check_config(role: &str, file: &Path) -> (i32, String, String) {
    let out = run(
        "/usr/bin/sallyport",
        &[role, "--config", file.to_str().unwrap(), "--check-config"],
    );
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// The example configs (in /etc/sallyport, and any in /usr/share/doc/sallyport/examples): as
/// shipped they are valid or wait only for the TLS files they name; beside certificates from
/// `sallyport cert init` they are valid; with every commented-out setting ("#key = value",
/// "#[section]") switched on they are still valid, so the comments show real keys and values.
fn check_example_configs(files: &[String]) {
    let dir = Workdir::new();
    run_ok(
        "/usr/bin/sallyport",
        &[
            "cert",
            "init",
            "--dir",
            dir.path().to_str().unwrap(),
            "--gateway-name",
            "gateway.example",
        ],
    );
    let examples: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".toml"))
        .filter(|f| {
            f.starts_with("/etc/sallyport/") || f.starts_with("/usr/share/doc/sallyport/examples/")
        })
        .collect();
    assert!(examples.len() >= 2, "{examples:?}");
    for file in examples {
        let role = role_of(file);
        let (code, _, stderr) = check_config(role, Path::new(file));
        if code != 0 {
            assert_eq!(code, 78, "{file}: {stderr}");
            assert!(
                stderr.contains(&format!("{file}:")) && stderr.contains("tls: cannot read"),
                "{file} as shipped: {stderr}"
            );
            eprintln!("{file} as shipped: {}", stderr.trim());
        }

        let shipped = std::fs::read_to_string(file).unwrap();
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        let copy = dir.write(name, &shipped);
        let (code, stdout, stderr) = check_config(role, &copy);
        assert_eq!(code, 0, "{file} beside certificates: {stderr}");
        assert_eq!(stdout, format!("{}: valid\n", copy.display()));

        let mut switched_on = 0;
        let full: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with([' ', '#', '!']) && !rest.is_empty() => {
                    switched_on += 1;
                    format!("{rest}\n")
                }
                _ => format!("{l}\n"),
            })
            .collect();
        assert!(switched_on > 0, "{file} shows no optional setting");
        let all = dir.write(&format!("all-{name}"), &full);
        let (code, _, stderr) = check_config(role, &all);
        assert_eq!(
            code, 0,
            "{file} with its {switched_on} commented settings on: {stderr}"
        );
    }
}

/// After `dpkg -r`: the conffiles (with the operator's edit) and the bookkeeping Debian keeps
/// for a removed package (dpkg's, and deb-systemd-helper's masks of the removed units),
/// nothing else.
fn check_removed(conffiles: &[String], edited: &str, edit: &str) {
    assert_eq!(status().as_deref(), Some("deinstall ok config-files"));
    let left = sallyport_paths();
    let mut unexpected = Vec::new();
    for path in &left {
        let mask = UNITS
            .iter()
            .any(|u| *path == format!("/etc/systemd/system/{u}"));
        if mask {
            let target = std::fs::read_link(path).unwrap();
            assert_eq!(target, Path::new("/dev/null"), "{path}");
            continue;
        }
        let kept = conffiles.contains(path)
            || path == "/etc/sallyport"
            || path.starts_with("/var/lib/dpkg/info/sallyport.")
            || path.starts_with("/var/lib/systemd/deb-systemd-helper-");
        if !kept {
            unexpected.push(path);
        }
    }
    assert!(unexpected.is_empty(), "left by dpkg -r: {unexpected:#?}");
    for file in conffiles {
        assert!(left.contains(file), "{file} went with dpkg -r");
    }
    assert!(std::fs::read_to_string(edited).unwrap().ends_with(edit));
    eprintln!("after dpkg -r: {left:#?}");
}

#[test]
fn the_debian_package_installs_works_and_is_removed_and_purged_cleanly() {
    let root = run("id", &["-u"]).stdout == b"0\n";
    if !root || !installed("dpkg") {
        eprintln!("SKIPPED: needs root and dpkg to install the package on this machine");
        return;
    }
    let _lock = MachineLock::take();
    clear_leftover();
    let before = sallyport_paths();
    assert!(
        before.is_empty(),
        "sallyport files no package owns are on this machine: {before:#?}"
    );

    let deb = build();
    let deb = deb.to_str().unwrap();
    let (conffiles, files) = inspect(deb);

    let started = Instant::now();
    std::fs::write(marker(), deb).unwrap();
    let mut guard = PurgeGuard { armed: true };
    dpkg_ok(&["--install", deb]);
    assert_eq!(status().as_deref(), Some("install ok installed"));

    assert_eq!(
        run_ok("/usr/bin/sallyport", &["--version"]),
        format!("sallyport {VERSION}\n")
    );
    check_group_and_config_dir();
    check_units_not_enabled_or_started();
    check_units_verify();
    check_man_pages();
    check_completions();
    check_example_configs(&files);

    // An operator edits a config, removes the package, and installs it again: the edit stays
    // through both, with no question asked (stdin is closed).
    let edited = "/etc/sallyport/gateway.toml";
    let edit = "\n# edited by tests/deb.rs\n";
    let mut text_now = std::fs::read_to_string(edited).unwrap();
    text_now.push_str(edit);
    std::fs::write(edited, &text_now).unwrap();

    dpkg_ok(&["--remove", PACKAGE]);
    check_removed(&conffiles, edited, edit);

    dpkg_ok(&["--install", deb]);
    assert_eq!(status().as_deref(), Some("install ok installed"));
    assert!(std::fs::read_to_string(edited).unwrap().ends_with(edit));
    check_group_and_config_dir();
    check_units_not_enabled_or_started();

    dpkg_ok(&["--purge", PACKAGE]);
    guard.armed = false;
    std::fs::remove_file(marker()).unwrap();
    assert_eq!(status(), None, "dpkg still knows the package after --purge");
    let left = sallyport_paths();
    assert!(left.is_empty(), "left by dpkg -P: {left:#?}");
    let overrides = run_ok("dpkg-statoverride", &["--list"]);
    assert!(!overrides.contains("/etc/sallyport"), "{overrides}");
    // The group stays, as Debian leaves system groups: files an operator gave it (keys) must
    // not pass to a later group that reuses its number.
    run_ok("getent", &["group", PACKAGE]);
    eprintln!(
        "install, checks, remove, reinstall, purge: {:.1?}",
        started.elapsed()
    );
}
