//! Active health checks of a listener's backends: every `interval`, each backend of a set is
//! checked at once (a TCP connect, or an HTTP GET answered 2xx, after a PROXY header when the
//! listener sends one), each within `timeout`. The results go to the set
//! ([`BackendSet::check_passed`], [`BackendSet::check_failed`]), which decides when a
//! backend leaves or rejoins the rotation. The checks stop when the set is gone or cancelled.

use super::*;

/// Checks every backend of a set each interval until the set is gone or `cancel` fires.
pub(super) async fn run_checks(
    set: std::sync::Weak<BackendSet>,
    health: HealthCheck,
    proxy: ProxyProtocol,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let Some(set) = set.upgrade() else { return };
        let checks = set.members.iter().map(|m| {
            let target = m.addr.target(0).unwrap_or_default();
            let check = check_one(target, health.http.clone(), proxy);
            tokio::time::timeout(health.timeout, check)
        });
        let results = futures::future::join_all(checks).await;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(Ok(())) => set.check_passed(i),
                Ok(Err(why)) => set.check_failed(i, why),
                Err(_) => set.check_failed(
                    i,
                    format!(
                        "no answer within {}",
                        humantime::format_duration(health.timeout)
                    ),
                ),
            }
        }
    }
}

/// One check: a TCP connect, or a GET answered 2xx.
async fn check_one(
    target: String,
    http: Option<String>,
    proxy: ProxyProtocol,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(target.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Some(path) = http else {
        return Ok(());
    };
    let mut request = match proxy {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec(),
    };
    let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
    request.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sallyport-health-check\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let status = line.split_whitespace().nth(1).unwrap_or_default();
    if line.starts_with("HTTP/") && status.len() == 3 && status.starts_with('2') {
        Ok(())
    } else {
        Err(format!(
            "GET {path} answered {:?}",
            crate::escape::escape(line)
        ))
    }
}
