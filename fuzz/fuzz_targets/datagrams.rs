//! Arbitrary bytes from a data connection, fed in arbitrary chunks, through the UDP datagram
//! framing (`sallyport::protocol::datagram`): `decode` on a growing buffer and the async `read`
//! the gateway and agent run. The first byte picks the chunk size.
//!
//! Checks: no panic; every datagram is at most `MAX_PAYLOAD` bytes; the datagrams re-encoded,
//! followed by the bytes left over, are the input exactly (nothing split, merged or lost); the
//! buffer never holds more than one maximal frame plus a chunk; `read` yields the same
//! datagrams and ends cleanly exactly when nothing is left over, with an error otherwise.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sallyport::protocol::datagram::{decode, encode, read, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first).max(1) * 64;
    let mut buf = BytesMut::new();
    let mut datagrams = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(d) = decode(&mut buf) {
            assert!(d.len() <= MAX_PAYLOAD);
            datagrams.push(d);
        }
        assert!(buf.len() < 2 + MAX_PAYLOAD + chunk);
    }
    let mut again = BytesMut::new();
    for d in &datagrams {
        encode(d, &mut again);
    }
    again.extend_from_slice(&buf);
    assert_eq!(&again[..], input, "the framing lost or changed bytes");
    check_read(input, &datagrams, buf.is_empty());
});

/// `read` over the whole input (an in-memory reader is always ready: polling once suffices).
fn check_read(input: &[u8], expected: &[BytesMut], clean_end: bool) {
    let mut reader = input;
    let mut buf = BytesMut::new();
    let mut cx = Context::from_waker(Waker::noop());
    for want in expected {
        let got = poll_once(read(&mut reader, &mut buf), &mut cx);
        assert_eq!(
            &got.expect("a whole datagram").expect("not the end")[..],
            &want[..]
        );
    }
    match poll_once(read(&mut reader, &mut buf), &mut cx) {
        Ok(None) => assert!(clean_end, "a clean end inside a datagram"),
        Err(_) => assert!(!clean_end, "an error at a clean end"),
        Ok(Some(_)) => panic!("more datagrams than decode found"),
    }
}

fn poll_once<F: Future>(f: F, cx: &mut Context<'_>) -> F::Output {
    match pin!(f).poll(cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an in-memory reader is never pending"),
    }
}
