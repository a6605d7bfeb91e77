//! A [`Message`] to a frame and back: its type number and name, postcard payloads, and the
//! critical/advisory rule for types this version does not know (a critical one is an error, an
//! advisory one is skipped).

use super::*;

impl Message {
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::HelloAck(_) => kind::HELLO_ACK,
            Message::Error(_) => kind::ERROR,
            Message::SessionSecret(_) => kind::SESSION_SECRET,
            Message::PushConfig(_) => kind::PUSH_CONFIG,
            Message::ConfigResult(_) => kind::CONFIG_RESULT,
            Message::ClientArrived(_) => kind::CLIENT_ARRIVED,
            Message::ClientFailed(_) => kind::CLIENT_FAILED,
            Message::Heartbeat(_) => kind::HEARTBEAT,
            Message::PoolAssign(_) => kind::POOL_ASSIGN,
            Message::PoolAccepted(_) => kind::POOL_ACCEPTED,
            Message::BanList(_) => kind::BAN_LIST,
            Message::BanResult(_) => kind::BAN_RESULT,
            Message::EdgeLimits(_) => kind::EDGE_LIMITS,
            Message::AutoBans(_) => kind::AUTO_BANS,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::HelloAck(_) => "hello-ack",
            Message::Error(_) => "error",
            Message::SessionSecret(_) => "session-secret",
            Message::PushConfig(_) => "push-config",
            Message::ConfigResult(_) => "config-result",
            Message::ClientArrived(_) => "client-arrived",
            Message::ClientFailed(_) => "client-failed",
            Message::Heartbeat(_) => "heartbeat",
            Message::PoolAssign(_) => "pool-assign",
            Message::PoolAccepted(_) => "pool-accepted",
            Message::BanList(_) => "ban-list",
            Message::BanResult(_) => "ban-result",
            Message::EdgeLimits(_) => "edge-limits",
            Message::AutoBans(_) => "auto-bans",
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorMsg {
            code,
            message: message.into(),
        })
    }

    pub fn to_frame(&self) -> RawFrame {
        let payload = match self {
            Message::Hello(m) => postcard::to_stdvec(m),
            Message::HelloAck(m) => postcard::to_stdvec(m),
            Message::Error(m) => postcard::to_stdvec(m),
            Message::SessionSecret(m) => postcard::to_stdvec(m),
            Message::PushConfig(m) => postcard::to_stdvec(m),
            Message::ConfigResult(m) => postcard::to_stdvec(m),
            Message::ClientArrived(m) => postcard::to_stdvec(m),
            Message::ClientFailed(m) => postcard::to_stdvec(m),
            Message::Heartbeat(m) => postcard::to_stdvec(m),
            Message::PoolAssign(m) => postcard::to_stdvec(m),
            Message::PoolAccepted(m) => postcard::to_stdvec(m),
            Message::BanList(m) => postcard::to_stdvec(m),
            Message::BanResult(m) => postcard::to_stdvec(m),
            Message::EdgeLimits(m) => postcard::to_stdvec(m),
            Message::AutoBans(m) => postcard::to_stdvec(m),
        }
        .expect("serializing plain data into a Vec cannot fail");
        RawFrame {
            kind: self.kind(),
            payload: Bytes::from(payload),
        }
    }

    /// Decodes a frame. `Ok(None)` is an unknown advisory type, to be skipped; an unknown
    /// critical type is an error.
    pub fn from_frame(frame: &RawFrame) -> Result<Option<Message>, ProtocolError> {
        let p = &frame.payload[..];
        let k = frame.kind;
        let msg = match k {
            kind::HELLO => Message::Hello(payload(k, p).map_err(|e| explain_hello(e, p))?),
            kind::HELLO_ACK => Message::HelloAck(payload(k, p)?),
            kind::ERROR => Message::Error(payload(k, p)?),
            kind::SESSION_SECRET => Message::SessionSecret(payload(k, p)?),
            kind::PUSH_CONFIG => Message::PushConfig(payload(k, p)?),
            kind::CONFIG_RESULT => Message::ConfigResult(payload(k, p)?),
            kind::CLIENT_ARRIVED => Message::ClientArrived(payload(k, p)?),
            kind::CLIENT_FAILED => Message::ClientFailed(payload(k, p)?),
            kind::HEARTBEAT => Message::Heartbeat(payload(k, p)?),
            kind::POOL_ASSIGN => Message::PoolAssign(payload(k, p)?),
            kind::POOL_ACCEPTED => Message::PoolAccepted(payload(k, p)?),
            kind::BAN_LIST => Message::BanList(payload(k, p)?),
            kind::BAN_RESULT => Message::BanResult(payload(k, p)?),
            kind::EDGE_LIMITS => Message::EdgeLimits(payload(k, p)?),
            kind::AUTO_BANS => Message::AutoBans(payload(k, p)?),
            k if k >= kind::FIRST_ADVISORY => return Ok(None),
            k => return Err(ProtocolError::UnknownMessage { kind: k }),
        };
        Ok(Some(msg))
    }
}

/// A hello that did not decode may still carry a readable version range (its layout is frozen):
/// name it, so "a newer agent" is told apart from garbage.
fn explain_hello(err: ProtocolError, payload: &[u8]) -> ProtocolError {
    if let Ok((v, _)) = postcard::take_from_bytes::<HelloVersions>(payload) {
        if let Err(no_common) = crate::protocol::negotiate(v.min_version, v.max_version) {
            return no_common;
        }
    }
    match (err, postcard::take_from_bytes::<HelloVersions>(payload)) {
        (ProtocolError::BadPayload { kind, reason }, Ok((v, _))) => ProtocolError::BadPayload {
            kind,
            reason: format!(
                "{reason}; the peer speaks protocol versions {}..={}",
                v.min_version, v.max_version
            ),
        },
        (err, _) => err,
    }
}

/// Decodes a whole payload: trailing bytes are a protocol error, not silently ignored, and so
/// is any encoding but the shortest (postcard itself accepts padded varints such as `88 a7 00`
/// for 5000): one message has one encoding, as docs/protocol.md section 3 says. Checked by
/// encoding the value again; control frames are small and few, the data path has none.
fn payload<T: DeserializeOwned + Serialize>(kind: u16, bytes: &[u8]) -> Result<T, ProtocolError> {
    let bad = |reason: String| ProtocolError::BadPayload { kind, reason };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} trailing bytes", rest.len())));
    }
    let canonical = postcard::to_stdvec(&value).map_err(|e| bad(e.to_string()))?;
    if canonical != bytes {
        return Err(bad(format!(
            "not in its shortest encoding ({} bytes where {} suffice: a padded varint)",
            bytes.len(),
            canonical.len()
        )));
    }
    Ok(value)
}
