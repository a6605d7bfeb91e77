//! `sallyport demo`: a gateway, an agent and a tiny HTTP backend in one process on loopback, to
//! see the whole path work in one command.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::config::{AgentConfig, GatewayConfig};
use crate::gateway::Gateway;

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(port: u16) -> anyhow::Result<()> {
    let shutdown = crate::cli::stop_on_signals()?;

    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(serve_backend(backend));

    let gateway_config = GatewayConfig::parse(
        Path::new("<demo gateway>"),
        "[control]\nlisten = \"127.0.0.1:0\"\n[clients]\nbind = \"127.0.0.1\"\n",
    )?;
    let gateway = Gateway::bind(gateway_config).await?;
    let control = gateway.control_addr();
    // The dashboard on the usual port, or any free one if something else has it.
    let admin = match crate::admin::bind(([127, 0, 0, 1], 9090).into()).await {
        Ok(l) => l,
        Err(_) => crate::admin::bind(([127, 0, 0, 1], 0).into()).await?,
    };
    let dashboard = admin.local_addr()?;
    let (_slot, slot_rx) = tokio::sync::watch::channel(Some(gateway.handle()));
    tokio::spawn(crate::admin::serve(admin, slot_rx, None, shutdown.clone()));
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
    let agent_shutdown = shutdown.clone();
    let agent_task = tokio::spawn(async move { agent.run(agent_shutdown).await });

    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_until_listening(public).await.with_context(|| {
        format!("the demo listener did not open on {public} (is the port taken? try --port)")
    })?;
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

async fn wait_until_listening(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("timed out")
}

/// A minimal HTTP/1.1 server behind PROXY protocol v2: one response per connection, naming the
/// real client (from the header) and the TCP peer (the agent).
async fn serve_backend(listener: TcpListener) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
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
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
