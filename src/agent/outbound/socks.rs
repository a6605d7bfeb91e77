//! The outbound proxy's SOCKS5 side (RFC 1928, CONNECT only; no authentication, or RFC 1929
//! username/password when `[outbound] users` are set): method selection, authentication and
//! the request, read from the client; the reply written once the gateway has decided.

use super::*;

/// Method selection, authentication and the request. `None` when the client was refused.
pub(super) async fn socks_request(
    s: &mut TcpStream,
    config: &OutboundConfig,
) -> anyhow::Result<Option<(Dest, Vec<u8>)>> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await?;
    let wanted = if config.users.is_empty() { 0x00 } else { 0x02 };
    if !methods.contains(&wanted) {
        s.write_all(&[5, 0xff]).await?;
        anyhow::bail!(
            "SOCKS5 client offered no acceptable method (needs {})",
            if wanted == 0 {
                "no authentication"
            } else {
                "username/password"
            }
        );
    }
    s.write_all(&[5, wanted]).await?;
    if wanted == 0x02 {
        // RFC 1929: VER=1, ULEN, UNAME, PLEN, PASSWD.
        let mut ver_len = [0u8; 2];
        s.read_exact(&mut ver_len).await?;
        let mut user = vec![0u8; ver_len[1] as usize];
        s.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        s.read_exact(&mut plen).await?;
        let mut password = vec![0u8; plen[0] as usize];
        s.read_exact(&mut password).await?;
        if !credentials_ok(config, &user, &password) {
            s.write_all(&[1, 1]).await?;
            return Err(AuthFailed(format!(
                "SOCKS5 authentication failed for user {:?}",
                String::from_utf8_lossy(&user)
            ))
            .into());
        }
        s.write_all(&[1, 0]).await?;
    }
    // VER CMD RSV ATYP
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        anyhow::bail!("SOCKS5 request with version {}", req[0]);
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            s.read_exact(&mut name).await?;
            // Validated here, at the edge: the name is resolved, logged and shown later.
            match String::from_utf8(name) {
                Ok(n) if check_destination(&n).is_ok() => n,
                n => {
                    socks_reply(s, 0x08).await;
                    let shown = n.map_or_else(
                        |e| escape(&String::from_utf8_lossy(e.as_bytes())),
                        |n| escape(&n),
                    );
                    anyhow::bail!("SOCKS5 request for an invalid host name \"{shown}\"");
                }
            }
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        other => {
            socks_reply(s, 0x08).await;
            anyhow::bail!("SOCKS5 address type {other} not supported");
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    if req[1] != 1 {
        socks_reply(s, 0x07).await;
        anyhow::bail!("SOCKS5 command {} not supported (CONNECT only)", req[1]);
    }
    Ok(Some((
        Dest {
            host,
            port: u16::from_be_bytes(port),
        },
        Vec::new(),
    )))
}

/// A reply with an all-zero bound address (clients do not need it for CONNECT).
pub(super) async fn socks_reply(s: &mut TcpStream, code: u8) {
    let _ = s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await;
}
