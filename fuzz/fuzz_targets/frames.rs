//! Arbitrary bytes, fed in arbitrary chunks, through the frame codec and every frame it yields
//! through the message decoder. The first byte picks `max_frame`, the second the chunk size.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sallyport::protocol::frame::MIN_MAX_FRAME;
use sallyport::protocol::{FrameCodec, Message};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max_frame = MIN_MAX_FRAME << (data[0] % 9); // 4 KiB .. 1 MiB
    let chunk = usize::from(data[1]).max(1);
    let mut codec = FrameCodec::new(max_frame);
    let mut buf = BytesMut::new();
    for piece in data[2..].chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() + 2 <= max_frame);
                    let _ = Message::from_frame(&frame);
                }
                Ok(None) => break,
                Err(_) => return, // a framing error ends the connection
            }
        }
        // The buffer never holds more than one maximal frame plus the chunk just added.
        assert!(buf.len() <= 4 + max_frame + chunk);
    }
    let _ = codec.decode_eof(&mut buf);
});
