//! The admin API's clients: `sallyport status`, `ctl` and `ban`. Each sends one request to a
//! running daemon's admin port and prints the answer; none reads a config file or changes a
//! daemon's state other than through that API.

use super::{AdminArgs, BanCommand, CtlAction, AGENT_ADMIN_URL, GATEWAY_ADMIN_URL};

/// `sallyport status`: the given admin API, or the gateway's default address, or (when no
/// gateway answers there) the agent's.
pub(super) async fn status(admin: AdminArgs, json: bool) -> anyhow::Result<()> {
    let url = match admin.admin {
        Some(url) => url,
        None => {
            let gateway = crate::admin::client::authority(GATEWAY_ADMIN_URL)?;
            if tokio::net::TcpStream::connect(&gateway).await.is_ok() {
                GATEWAY_ADMIN_URL.to_string()
            } else {
                AGENT_ADMIN_URL.to_string()
            }
        }
    };
    crate::status::print(url, admin.token, json).await
}

/// `sallyport ban add|remove|list`, against the agent's admin API.
pub(super) async fn ban(command: BanCommand) -> anyhow::Result<()> {
    use crate::admin::client::request_json;
    let url = |admin: &AdminArgs| {
        admin
            .admin
            .clone()
            .unwrap_or_else(|| AGENT_ADMIN_URL.to_string())
    };
    let (code, body, admin) = match &command {
        BanCommand::Add {
            target,
            duration,
            reason,
            admin,
        } => {
            let req = serde_json::json!({
                "target": target,
                "for": duration,
                "reason": reason.clone().unwrap_or_default(),
            });
            let (code, body) = request_json(
                &url(admin),
                "POST",
                "/api/bans",
                admin.token.as_deref(),
                Some(&req),
            )
            .await?;
            (code, body, admin)
        }
        BanCommand::Remove { target, admin, .. } => {
            let req = serde_json::json!({ "target": target });
            let (code, body) = request_json(
                &url(admin),
                "DELETE",
                "/api/bans",
                admin.token.as_deref(),
                Some(&req),
            )
            .await?;
            (code, body, admin)
        }
        BanCommand::List { admin, .. } => {
            let (code, body) = request_json(
                &url(admin),
                "GET",
                "/api/bans",
                admin.token.as_deref(),
                None,
            )
            .await?;
            (code, body, admin)
        }
    };
    match code {
        200 => {
            print_ban_answer(&command, &body);
            Ok(())
        }
        404 if matches!(command, BanCommand::Remove { if_present: true, .. })
            && body["error"].is_string() =>
        {
            println!("{} (nothing to do)", crate::escape::escape(body["error"].as_str().unwrap_or("")));
            Ok(())
        }
        401 => anyhow::bail!(
            "401 unauthorized: pass the agent's admin token with --token or SALLYPORT_ADMIN_TOKEN"
        ),
        404 if body["error"].is_null() => anyhow::bail!(
            "{} has no /api/bans: is it an agent's admin API (a gateway's only shows bans, on its dashboard)?",
            url(admin)
        ),
        _ => anyhow::bail!(
            "HTTP {code}: {}",
            body["error"]
                .as_str()
                .map_or_else(|| body.to_string(), crate::escape::escape)
        ),
    }
}

fn print_ban_answer(command: &BanCommand, body: &serde_json::Value) {
    let esc = |v: &serde_json::Value| crate::escape::escape(v.as_str().unwrap_or(""));
    match command {
        BanCommand::Add { .. } => {
            let lasts = match body["ban"]["expires_ms"].as_u64() {
                Some(_) => "for the given time",
                None => "until removed",
            };
            println!(
                "banned {} {lasts}; pushed to every connected gateway",
                esc(&body["ban"]["net"])
            );
            if body["persisted"] == false {
                println!("warning: the agent has no state_dir: this ban is lost when it restarts");
            }
        }
        BanCommand::Remove { .. } => println!("removed the ban of {}", esc(&body["removed"])),
        BanCommand::List { json: true, .. } => println!("{body:#}"),
        BanCommand::List { .. } => {
            let bans = body["bans"].as_array().cloned().unwrap_or_default();
            println!("{:<44} {:<14} reason", "address", "expires in");
            for b in &bans {
                let left = b["expires_in_secs"]
                    .as_u64()
                    .map_or("never".to_string(), |s| {
                        humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
                    });
                println!("{:<44} {:<14} {}", esc(&b["net"]), left, esc(&b["reason"]));
            }
            println!("{} ban(s)", bans.len());
        }
    }
}

pub(super) async fn ctl(action: CtlAction, admin: AdminArgs) -> anyhow::Result<()> {
    let (path, daemon) = match action {
        CtlAction::Pause => ("/api/pause", "gateway"),
        CtlAction::Resume => ("/api/resume", "gateway"),
        CtlAction::Restart => ("/api/restart", "gateway"),
        CtlAction::Stop => ("/api/stop", "gateway"),
        CtlAction::Reload => ("/api/reload", "agent"),
    };
    let url = admin.admin.unwrap_or_else(|| {
        if daemon == "agent" {
            AGENT_ADMIN_URL
        } else {
            GATEWAY_ADMIN_URL
        }
        .to_string()
    });
    let token = admin.token.as_deref();
    let (code, body) = crate::admin::client::request(&url, "POST", path, token).await?;
    let action_name = &path["/api/".len()..];
    match code {
        200 if daemon == "agent" => {
            println!(
                "ok: {action_name} (agent configuration generation {})",
                body["generation"]
            );
            for n in body["notices"].as_array().into_iter().flatten() {
                println!(
                    "warning: {}",
                    crate::escape::escape(n.as_str().unwrap_or(""))
                );
            }
            Ok(())
        }
        200 => {
            println!(
                "ok: {} (gateway state: {})",
                body["action"].as_str().unwrap_or("done"),
                body["state"].as_str().unwrap_or("?")
            );
            if let Some(changes) = body["changes"].as_array() {
                if changes.is_empty() {
                    println!("gateway.toml: no key changed");
                }
                for c in changes {
                    println!("  {}", c.as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
        401 => anyhow::bail!(
            "401 unauthorized: pass the admin token with --token or SALLYPORT_ADMIN_TOKEN"
        ),
        // The other daemon's admin API: say so rather than "not found".
        404 => {
            let other = crate::admin::client::get(&url, "/api/status", token)
                .await
                .ok()
                .and_then(|s| s["daemon"].as_str().map(String::from))
                .unwrap_or_else(|| "gateway".into());
            match other.as_str() {
                "agent" => anyhow::bail!(
                    "{url} is an agent's admin API: `ctl {action_name}` controls a gateway (an agent has `ctl reload`)"
                ),
                _ => anyhow::bail!(
                    "{url} is a gateway's admin API: `ctl {action_name}` is for an agent (reload a gateway with SIGHUP: systemctl reload sallyport-gateway)"
                ),
            }
        }
        _ => anyhow::bail!(
            "HTTP {code}: {}",
            body["error"]
                .as_str()
                .map_or_else(|| body.to_string(), crate::escape::escape)
        ),
    }
}
