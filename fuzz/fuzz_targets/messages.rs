//! Arbitrary payloads for every message type: decoding never panics, and whatever decodes
//! re-encodes to a frame that decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sallyport::protocol::{Message, RawFrame};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let kind = u16::from_be_bytes([data[0], data[1]]) & 0x803f; // known types (up to 0x0030) and a few others
    let frame = RawFrame {
        kind,
        payload: Bytes::copy_from_slice(&data[2..]),
    };
    if let Ok(Some(msg)) = Message::from_frame(&frame) {
        let again = msg.to_frame();
        let back = Message::from_frame(&again).expect("a re-encoded message decodes");
        assert_eq!(back, Some(msg));
    }
});
