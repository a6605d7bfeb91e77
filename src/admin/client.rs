//! A small client for the admin API, for `sallyport status` and `sallyport ctl`.

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::CSRF_HEADER;

/// `http://host:port` (a trailing slash is fine; only plain HTTP: the admin API listens on
/// loopback or a management network).
pub fn authority(base: &str) -> anyhow::Result<String> {
    let rest = base
        .strip_prefix("http://")
        .with_context(|| format!("admin URL {base:?} must start with http://"))?;
    Ok(rest.trim_end_matches('/').to_string())
}

/// Sends one request; returns the status code and the body as JSON (or a JSON string).
pub async fn request(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    request_json(base, method, path, token, None).await
}

/// [`request`] with a JSON body.
pub async fn request_json(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let authority = authority(base)?;
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot reach the admin API at {base} (is the daemon running, with [admin] enabled?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, &authority)
        .header(CSRF_HEADER, "sallyport-cli");
    if let Some(token) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let payload = match body {
        Some(body) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let resp = sender.send_request(req.body(Full::new(payload))?).await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((code, value))
}

/// GET that must succeed.
pub async fn get(base: &str, path: &str, token: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let (code, value) = request(base, "GET", path, token).await?;
    if code != 200 {
        bail!("{path}: HTTP {code}: {value}");
    }
    Ok(value)
}
