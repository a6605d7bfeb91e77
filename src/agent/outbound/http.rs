//! The outbound proxy's HTTP CONNECT side: the request head (parsed with `httparse`, bounded
//! by [`MAX_HEAD`]), Basic proxy authentication when `[outbound] users` are set, the
//! `host:port` authority, and the status line written once the gateway has decided.

use super::*;

pub(super) async fn http_request(
    s: &mut TcpStream,
    config: &OutboundConfig,
) -> anyhow::Result<Option<(Dest, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("HTTP client closed before the end of its request head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            http_reply(
                s,
                "431 Request Header Fields Too Large",
                &[],
                "request head too large",
            )
            .await;
            anyhow::bail!("HTTP request head over {MAX_HEAD} bytes");
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(
        req.parse(&buf[..head_len]),
        Ok(httparse::Status::Complete(_))
    ) {
        http_reply(s, "400 Bad Request", &[], "malformed request").await;
        anyhow::bail!("malformed HTTP request");
    }
    if req.method != Some("CONNECT") {
        let method = req.method.unwrap_or("?").to_string();
        http_reply(
            s,
            "405 Method Not Allowed",
            &["Allow: CONNECT"],
            "this proxy only tunnels with CONNECT (use https:// URLs or a SOCKS5 client)",
        )
        .await;
        anyhow::bail!("HTTP {method} refused: CONNECT only");
    }
    if !config.users.is_empty() {
        let given = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|v| {
                v.strip_prefix("Basic ")
                    .or_else(|| v.strip_prefix("basic "))
            })
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            });
        let ok = given
            .as_deref()
            .and_then(|g| {
                let colon = g.iter().position(|c| *c == b':')?;
                Some(credentials_ok(config, &g[..colon], &g[colon + 1..]))
            })
            .unwrap_or(false);
        if !ok {
            http_reply(
                s,
                "407 Proxy Authentication Required",
                &["Proxy-Authenticate: Basic realm=\"sallyport\""],
                "proxy authentication required",
            )
            .await;
            return Err(AuthFailed("HTTP CONNECT without valid proxy credentials".into()).into());
        }
    }
    let target = req.path.unwrap_or("");
    let Some(dest) = parse_authority(target) else {
        http_reply(s, "400 Bad Request", &[], "CONNECT needs host:port").await;
        anyhow::bail!("HTTP CONNECT to {target:?}: not host:port");
    };
    Ok(Some((dest, buf[head_len..].to_vec())))
}

/// `host:port` or `[v6]:port`.
fn parse_authority(s: &str) -> Option<Dest> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<IpAddr>().ok()?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    check_destination(host).ok()?;
    Some(Dest {
        host: host.to_string(),
        port,
    })
}

pub(super) async fn http_reply(s: &mut TcpStream, status: &str, headers: &[&str], body: &str) {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    let body = format!("{body}\n");
    out.push_str(&format!(
        "Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let _ = s.write_all(out.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let d = parse_authority("example.com:443").unwrap();
        assert_eq!((d.host.as_str(), d.port), ("example.com", 443));
        let d = parse_authority("[2001:db8::1]:22").unwrap();
        assert_eq!((d.host.as_str(), d.port), ("2001:db8::1", 22));
        assert!(parse_authority("example.com").is_none());
        assert!(parse_authority("example.com:0").is_none());
        assert!(parse_authority("http://x:80").is_none());
        assert!(parse_authority("evil\nFORGED:80").is_none());
        assert!(parse_authority("a\u{202e}b:80").is_none());
        assert!(parse_authority("user@host:80").is_none());
    }
}
