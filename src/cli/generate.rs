//! `sallyport generate`: man pages and shell completions, from the clap definition in
//! [`super::Cli`]. It writes only into the directories it is given.

use std::path::Path;

use super::Cli;

/// `sallyport generate`: the man pages and completions, from the clap definition above. A
/// subcommand of the binary rather than a build script: the pages describe exactly the binary
/// that is packaged, and no build of the crate pays for generating them.
pub(super) fn generate(man: Option<&Path>, completions: Option<&Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    if let Some(dir) = man {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        // `help` is a subcommand for the shell, not a page; build() names each subcommand
        // "sallyport-gateway" and so on, the page titles.
        let mut cmd = Cli::command().disable_help_subcommand(true);
        cmd.build();
        write_man_pages(&cmd, dir)?;
    }
    if let Some(dir) = completions {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let path = clap_complete::generate_to(shell, &mut completed(), "sallyport", dir)
                .with_context(|| format!("{shell} completions in {}", dir.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// The command line as the shells complete it: clap_complete would offer hidden subcommands
/// (`generate`) too, so the top level is rebuilt from the visible ones.
fn completed() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    let visible = clap::Command::new("sallyport")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    match full.get_about() {
        Some(about) => visible.about(about.clone()),
        None => visible,
    }
}

/// One page per visible command, sub-subcommands included (`sallyport-cert-init.1`).
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let visible: Vec<&clap::Command> = cmd.get_subcommands().filter(|c| !c.is_hide_set()).collect();
    for sub in &visible {
        write_man_pages(sub, dir)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("sallyport {}", env!("CARGO_PKG_VERSION")))
        .manual("Sallyport");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let top = cmd.get_display_name().is_none();
    if top {
        page.extend_from_slice(MAN_EXIT_STATUS_AND_FILES.as_bytes());
    }
    // SEE ALSO: the top page lists every subcommand's page, the others point back to it.
    let mut see_also = if top {
        Vec::new()
    } else {
        vec!["sallyport".to_string()]
    };
    see_also.extend(
        visible
            .iter()
            .filter_map(|c| c.get_display_name().map(str::to_string)),
    );
    let refs: Vec<String> = see_also.iter().map(|n| format!(".BR {n} (1)")).collect();
    page.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", refs.join(" ,\n")).as_bytes());
    std::fs::write(&path, page).with_context(|| format!("{}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// Sections of sallyport(1) that clap has no field for (roff).
const MAN_EXIT_STATUS_AND_FILES: &str = r#".SH "EXIT STATUS"
.TP
.B 0
A clean stop (SIGTERM, SIGINT, \fBsallyport ctl stop\fR), or a command that succeeded.
.TP
.B 1
A runtime failure, or a failed \fBsallyport check\fR.
.TP
.B 78
An invalid configuration file (EX_CONFIG): the message names the file, line and field, and
nothing was opened. The systemd units do not restart after it.
.SH FILES
.TP
.I /etc/sallyport/gateway.toml
The gateway's configuration, read by sallyport-gateway.service.
.TP
.I /etc/sallyport/agent.toml
The agent's configuration, read by sallyport-agent.service.
.TP
.I /usr/share/doc/sallyport/
README.md and the manual: operations.md, security.md, deployment.md, protocol.md.
"#;
