//! `sallyport demo`: a gateway, an agent and a tiny HTTP backend in one process on loopback, to
//! see the whole path work in one command.
//!
//! It says "running" only after it has seen itself work: the gateway reported the public
//! listener bound, and a request to the public port came back from this demo's own backend
//! (a per-run mark in its answer). A port held by another program is a clear error and a
//! non-zero exit, never a "running" that sends the operator's curl to someone else.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::config::{AgentConfig, GatewayConfig};
use crate::gateway::Gateway;
use crate::protocol::ListenerStatus;

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(port: u16) -> anyhow::Result<()> {
    let shutdown = crate::cli::stop_on_signals()?;

    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    // The mark of this run's backend: what proves that the public port answers with our page.
    let mark = format!("{:032x}", rand::random::<u128>());
    tokio::spawn(serve_backend(backend, mark.clone()));

    let gateway_config = GatewayConfig::parse(
        Path::new("<demo gateway>"),
        "[control]\nlisten = \"127.0.0.1:0\"\n[clients]\nbind = \"127.0.0.1\"\n\
         [peers]\ndefault = \"deny\"\nexcept = [\"127.0.0.1\"]\n",
    )?;
    let gateway = Gateway::bind(gateway_config).await?;
    let control = gateway.control_addr();
    // The dashboard on the usual port, or any free one if something else has it.
    let admin = match crate::admin::bind(([127, 0, 0, 1], 9090).into(), "admin API and dashboard")
        .await
    {
        Ok(l) => l,
        Err(_) => crate::admin::bind(([127, 0, 0, 1], 0).into(), "admin API and dashboard").await?,
    };
    let dashboard = admin.local_addr()?;
    let (_slot, slot_rx) = tokio::sync::watch::channel(Some(gateway.handle()));
    let state = crate::admin::AdminState::new(slot_rx, None, None);
    tokio::spawn(crate::admin::serve(admin, state, shutdown.clone()));
    let gw_task = tokio::spawn(gateway.run(shutdown.clone()));

    let agent_config = AgentConfig::parse(
        Path::new("<demo agent>"),
        &format!(
            "site = \"demo\"\nname = \"demo-agent\"\ngateways = [\"{control}\"]\n\
             [[listener]]\nname = \"web\"\npublic = \"127.0.0.1:{port}\"\nbackend = \"{backend_addr}\"\n\
             proxy_protocol = \"v2\"\n"
        ),
    )?;
    let agent = Agent::new(agent_config);
    let status = agent.status();
    let agent_shutdown = shutdown.clone();
    let agent_task = tokio::spawn(async move { agent.run(agent_shutdown).await });

    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    let verified = async {
        wait_for_listener(status, public).await?;
        check_it_is_us(public, &mark).await
    };
    if let Err(e) = verified.await {
        shutdown.cancel();
        let _ = agent_task.await;
        let _ = gw_task.await;
        return Err(e);
    }
    println!(
        "\nSallyport demo is running.\n\
         \n  internet client  ->  gateway {public}  <-(control + data, dialed out)-  agent  ->  backend {backend_addr}\n\
         \n  gateway control port: {control}\n\
         \n  dashboard:            http://{dashboard}/\n\
         \nTry it in another terminal:\n\n    curl http://{public}/\n\
         \nThe backend answers with your real address (from the PROXY v2 header the agent sends) and\n\
         the address the TCP connection came from (the agent). Press Ctrl-C to stop.\n"
    );

    let _ = gw_task.await;
    let _ = agent_task.await;
    Ok(())
}

/// What to tell an operator whose port is taken.
fn try_another_port(public: SocketAddr) -> String {
    let other = public.port().checked_add(1).unwrap_or(8081);
    format!("stop that program, or run the demo on another port: sallyport demo --port {other}")
}

/// Waits for the gateway's answer for the demo listener: bound, or why not.
async fn wait_for_listener(
    mut status: tokio::sync::watch::Receiver<crate::agent::AgentStatus>,
    public: SocketAddr,
) -> anyhow::Result<()> {
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let answer = status
                .borrow_and_update()
                .gateways
                .values()
                .find_map(|g| g.listeners.get("web").cloned());
            if let Some(answer) = answer {
                return Some(answer);
            }
            status.changed().await.ok()?;
        }
    })
    .await;
    match answer {
        Ok(Some(ListenerStatus::Bound { .. })) => Ok(()),
        Ok(Some(ListenerStatus::Failed { error })) => anyhow::bail!(
            "the demo cannot listen on {public}: {error} (another program holds the port); {}",
            try_another_port(public)
        ),
        Ok(Some(ListenerStatus::Paused)) => anyhow::bail!("the demo gateway is paused"),
        Ok(None) | Err(_) => {
            anyhow::bail!("the demo's gateway did not open {public} within 10 s")
        }
    }
}

/// One request to the public port must come back with this run's mark: only then is it the
/// demo that answers there (another program may share the port, e.g. with SO_REUSEPORT).
async fn check_it_is_us(public: SocketAddr, mark: &str) -> anyhow::Result<()> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(public).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(64 * 1024)
            .read_to_end(&mut answer)
            .await?;
        anyhow::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 5 s"))
        .and_then(|r| r)
        .with_context(|| format!("the demo's test request to http://{public}/ failed"))?;
    if !answer.contains(&format!("{MARK_HEADER}: {mark}")) {
        let first = answer.lines().next().unwrap_or("(nothing)");
        anyhow::bail!(
            "another program answers on {public} (its answer began {first:?}), not the demo; {}",
            try_another_port(public)
        );
    }
    Ok(())
}

/// The response header that carries the run's mark.
const MARK_HEADER: &str = "X-Sallyport-Demo";

/// A minimal HTTP/1.1 server behind PROXY protocol v2: one response per connection, naming the
/// real client (from the header) and the TCP peer (the agent).
async fn serve_backend(listener: TcpListener, mark: String) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let mark = mark.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => len += n,
                }
            }
            let client = match ppp::HeaderResult::parse(&buf[..len]) {
                ppp::HeaderResult::V2(Ok(h)) => match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        format!("{}:{}", a.source_address, a.source_port)
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        format!("[{}]:{}", a.source_address, a.source_port)
                    }
                    _ => "unknown".to_string(),
                },
                _ => "unknown (no PROXY header)".to_string(),
            };
            let body = format!(
                "Hello from the demo backend behind Sallyport!\n\
                 You are {client} (the real client address, from the PROXY v2 header).\n\
                 The TCP connection itself came from {peer} (the agent).\n"
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 {MARK_HEADER}: {mark}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
