//! Frame codec: the length prefix, the message type and the raw payload.
//!
//! A frame on the wire is
//!
//! ```text
//! +---------------------------+------------------+-------------------+
//! | length: u32, big endian   | type: u16, BE    | payload           |
//! +---------------------------+------------------+-------------------+
//!   length = 2 + payload length (it counts the type and the payload)
//! ```
//!
//! This module knows nothing of what a type means; [`super::message`] does. The decoder checks a
//! frame's header before it reserves or parses anything, so a hostile length prefix costs at most
//! the 4 bytes it took to send it: a length above the configured maximum is an error at once, and
//! the read buffer never grows beyond `4 + max_frame`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::ProtocolError;

/// Bytes before the payload: the length prefix and the type.
pub const HEADER_LEN: usize = 6;

/// The default hard maximum of `length` (type + payload), 1 MiB. A full site configuration of a
/// few thousand listeners fits comfortably.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// The smallest maximum a peer may configure: a Hello must always fit.
pub const MIN_MAX_FRAME: usize = 4 * 1024;
/// The largest frame a gateway reads before the peer's hello was accepted.
pub const HELLO_MAX_FRAME: usize = MIN_MAX_FRAME;

/// One undecoded frame: its type and its payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u16,
    pub payload: Bytes,
}

/// Encodes and decodes [`RawFrame`]s, enforcing the maximum frame size both ways.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.max(MIN_MAX_FRAME),
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the limit for the frames still to come (e.g. raised once a hello was accepted).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.max(MIN_MAX_FRAME);
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = RawFrame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, ProtocolError> {
        // Check pass: is a whole, acceptable frame here? Nothing is consumed until it is.
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len < 2 {
            return Err(ProtocolError::FrameTooShort { len });
        }
        if src.len() < 4 + len {
            // Reserve only what this frame still needs; bounded by max_frame above.
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        // Parse pass.
        src.advance(4);
        let kind = src.get_u16();
        let payload = src.split_to(len - 2).freeze();
        Ok(Some(RawFrame { kind, payload }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, ProtocolError> {
        self.decode_at_eof(src)
    }
}

impl FrameCodec {
    /// At end of stream: a whole frame is still a frame; a partial one is an error that says
    /// how much was missing.
    fn decode_at_eof(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, ProtocolError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let need = if src.len() >= 4 {
            4 + u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize
        } else {
            4
        };
        Err(ProtocolError::Truncated {
            have: src.len(),
            need,
        })
    }
}

impl Encoder<RawFrame> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: RawFrame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = frame.payload.len() + 2;
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        dst.put_u16(frame.kind);
        dst.put_slice(&frame.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: u16, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(
                RawFrame {
                    kind,
                    payload: Bytes::copy_from_slice(payload),
                },
                &mut buf,
            )
            .unwrap();
        buf
    }

    #[test]
    fn round_trip() {
        let mut buf = encode(7, b"hello");
        assert_eq!(&buf[..], b"\0\0\0\x07\0\x07hello");
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.kind, 7);
        assert_eq!(&frame.payload[..], b"hello");
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_wait_without_consuming() {
        let full = encode(1, &[9u8; 100]);
        let mut codec = FrameCodec::default();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(codec.decode(&mut part).unwrap(), None, "cut at {cut}");
            assert_eq!(part.len(), cut, "a partial frame must not be consumed");
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_allocation() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 1][..]);
        let cap_before = buf.capacity();
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::FrameTooLarge {
                len: 0xffff_ffff,
                ..
            }
        ));
        assert_eq!(buf.capacity(), cap_before);
    }

    #[test]
    fn too_short_length_is_rejected() {
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0][..]);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(ProtocolError::FrameTooShort { len: 1 })
        ));
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut buf = encode(1, b"a");
        buf.extend_from_slice(&encode(2, b"bc"));
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().kind, 1);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().kind, 2);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn end_of_stream_inside_a_frame_says_how_much_is_missing() {
        let mut buf = encode(1, &[0u8; 10]);
        buf.truncate(8);
        let err = FrameCodec::default().decode_eof(&mut buf).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Truncated { have: 8, need: 16 }),
            "{err}"
        );
        assert_eq!(
            FrameCodec::default()
                .decode_eof(&mut BytesMut::new())
                .unwrap(),
            None
        );
    }

    #[test]
    fn encoder_refuses_oversized_payload() {
        let mut codec = FrameCodec::new(MIN_MAX_FRAME);
        let err = codec
            .encode(
                RawFrame {
                    kind: 1,
                    payload: Bytes::from(vec![0u8; MIN_MAX_FRAME]),
                },
                &mut BytesMut::new(),
            )
            .unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { .. }));
    }
}
