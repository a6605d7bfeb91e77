//! Fuzz-style property tests for the control protocol's decoders: the frame codec
//! ([`FrameCodec`]), the message decoder ([`Message::from_frame`]) and the hello path a gateway
//! runs on a new connection ([`read_preamble`] + [`Connection::read_message`]), plus the agent's
//! refusal sniffer ([`Sniff`]); and the text a peer controls (issue 12): the escaping of logs
//! and `status`, the destination-host check and access-rule patterns (section (f)).
//!
//! Every property runs thousands of random and mutated inputs and checks that nothing panics,
//! that errors come back as [`ProtocolError`]s of the expected kind, that decoding does not
//! depend on how the bytes were chunked, and that the memory a decode allocates stays within a
//! bound derived from `max_frame` (see [`decode_alloc_bound`] and [`message_alloc_bound`]).
//! The cargo-fuzz targets in `fuzz/` cover the same code with coverage guidance; see
//! `fuzz/README.md`.
//!
//! Case counts are fixed (see [`config`]); `FUZZ_FRAMES_SCALE=10 cargo test --release --test
//! fuzz_frames` runs ten times as many. Failures are not persisted (no files are written into
//! the source tree): a failure prints its minimized input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestRunner};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder};

use sallyport::access::Policy;
use sallyport::addr::{PortRange, PublicAddr};
use sallyport::protocol::frame::{HEADER_LEN, MIN_MAX_FRAME};
use sallyport::protocol::{
    hello, kind, read_preamble, with_preamble, ClientArrived, ClientFailed, ClientRules,
    ConfigResult, Connection, ControlHello, DataHello, ErrorCode, FrameCodec, Heartbeat, Hello,
    HelloAck, ListenerResult, ListenerSpec, ListenerStatus, Message, OutboundHello, PoolAccepted,
    PoolAssign, PoolHello, ProtocolError, PushConfig, RawFrame, Role, SessionSecret, Token,
    DEFAULT_MAX_FRAME, MAGIC,
};
use sallyport::transport::{refusal, Sniff};

// ------------------------------------------------------------------------------------------
// A counting allocator.
//
// Tests run on parallel threads, so the counters are per thread: each thread measures only the
// allocations it makes itself while its `tracking` flag is set. The counters are a `Copy`
// struct in a `const`-initialized thread local without a destructor, which the standard library
// stores as a plain `#[thread_local]` static: reading or writing it never allocates and never
// registers a destructor, so using it from inside the allocator cannot recurse. (Atomics would
// be needed only for counters shared between threads; the cross-thread maxima reported at the
// end of each property are collected outside the allocator.)
// ------------------------------------------------------------------------------------------

struct CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Clone, Copy)]
struct Counters {
    tracking: bool,
    /// Largest single request (alloc, alloc_zeroed, or the new size of a realloc).
    largest: usize,
    /// Bytes allocated minus bytes freed since tracking started (negative when older memory
    /// was freed).
    live: isize,
    /// The highest `live` reached.
    peak: isize,
    /// Number of allocation requests.
    allocs: usize,
}

impl Counters {
    const IDLE: Counters = Counters {
        tracking: false,
        largest: 0,
        live: 0,
        peak: 0,
        allocs: 0,
    };

    fn grow(&mut self, request: usize, added: isize) {
        self.largest = self.largest.max(request);
        self.allocs += 1;
        self.live += added;
        self.peak = self.peak.max(self.live);
    }
}

thread_local! {
    static COUNTERS: Cell<Counters> = const { Cell::new(Counters::IDLE) };
}

/// Applies `f` to this thread's counters if it is tracking. Never allocates, never panics
/// (`try_with` instead of `with`; a const thread local without destructor is always
/// accessible anyway).
#[inline]
fn record(f: impl FnOnce(&mut Counters)) {
    let _ = COUNTERS.try_with(|cell| {
        let mut c = cell.get();
        if c.tracking {
            f(&mut c);
            cell.set(c);
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which implements the
// `GlobalAlloc` contract, and returns `System`'s result unchanged; so the memory handed out,
// its layout, and its release are exactly `System`'s. The only additional work is `record`,
// which reads and writes a `Cell` of plain integers in a const thread local without destructor:
// it does not allocate (so there is no reentrancy into this allocator), does not unwind (no
// panicking operation: `try_with`, integer arithmetic on counters that cannot realistically
// overflow `usize`/`isize` and would only wrap in release builds), and touches no memory that
// `System` manages.
// The crate denies unsafe code (Cargo.toml [lints]); this counting allocator is allowed, proved
// above and in each block.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`; we pass it on as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            record(|c| c.grow(layout.size(), layout.size() as isize));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            record(|c| c.grow(layout.size(), layout.size() as isize));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        record(|c| c.live -= layout.size() as isize);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the rest of
        // `realloc`'s contract for `new_size`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            record(|c| c.grow(new_size, new_size as isize - layout.size() as isize));
        }
        new
    }
}

/// What one measured piece of code allocated on this thread.
#[derive(Debug, Clone, Copy, Default)]
struct Allocs {
    largest: usize,
    peak: usize,
    count: usize,
}

/// Starts measuring this thread's allocations from zero.
fn start_tracking() {
    COUNTERS.with(|c| {
        c.set(Counters {
            tracking: true,
            ..Counters::IDLE
        })
    });
}

fn set_tracking(on: bool) {
    COUNTERS.with(|cell| {
        let mut c = cell.get();
        c.tracking = on;
        cell.set(c);
    });
}

/// Stops measuring and returns what was measured since [`start_tracking`].
fn stop_tracking() -> Allocs {
    set_tracking(false);
    let c = COUNTERS.with(Cell::get);
    Allocs {
        largest: c.largest,
        peak: c.peak.max(0) as usize,
        count: c.allocs,
    }
}

/// Turns tracking off even when the measured code panics (proptest catches the panic and goes
/// on shrinking on the same thread).
struct TrackingGuard;

impl Drop for TrackingGuard {
    fn drop(&mut self) {
        set_tracking(false);
    }
}

/// Runs `f`, measuring what it allocates on this thread.
fn measure<R>(f: impl FnOnce() -> R) -> (R, Allocs) {
    let guard = TrackingGuard;
    start_tracking();
    let r = f();
    let allocs = stop_tracking();
    drop(guard);
    (r, allocs)
}

/// A future whose polls (and only those: not the other tasks of the runtime, nor the timeout
/// around it) are measured. Call [`start_tracking`]-style reset via [`Tracked::new`].
struct Tracked<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> Tracked<F> {
    fn new(inner: F) -> Self {
        COUNTERS.with(|c| c.set(Counters::IDLE));
        Tracked {
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = (F::Output, Allocs);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let guard = TrackingGuard;
        set_tracking(true);
        let polled = self.inner.as_mut().poll(cx);
        set_tracking(false);
        drop(guard);
        polled.map(|out| {
            let c = COUNTERS.with(Cell::get);
            let allocs = Allocs {
                largest: c.largest,
                peak: c.peak.max(0) as usize,
                count: c.allocs,
            };
            COUNTERS.with(|cell| cell.set(Counters::IDLE));
            (out, allocs)
        })
    }
}

// ------------------------------------------------------------------------------------------
// The allocation bounds.
// ------------------------------------------------------------------------------------------

/// Bytes a `Bytes`/`BytesMut` needs when `split_to` first shares a buffer: one boxed `Shared`
/// header (a `Vec<u8>` and two words, 40 bytes on 64-bit targets). `FrameCodec::decode` makes
/// no other allocation when it returns a frame.
const SHARED_HEADER: usize = 64;

/// The largest single allocation one `FrameCodec::decode` call may make: `4 * (4 + max_frame)`.
///
/// The decoder itself only ever calls `src.reserve(4 + len - src.len())` with `len <=
/// max_frame`, i.e. it asks for a capacity of at most `4 + max_frame`. But `BytesMut::reserve`
/// (bytes 1.x) amortizes: it allocates `max(2 * old_capacity, offset + wanted)` where `offset`
/// is the already consumed prefix of the underlying vector it keeps, and it allocates at all
/// only when `old_capacity < offset + wanted`. With `wanted <= 4 + max_frame` and `offset <
/// src.len() < 4 + max_frame` (otherwise it reuses the buffer by copying the data to the front),
/// every allocation is below `2 * (offset + wanted) < 4 * (4 + max_frame)`. In the
/// realistic case (`Framed`, or the harness below, which starts from an empty buffer) the
/// observed worst case is just under `2 * (4 + max_frame)`: a frame of length `L` read into a
/// buffer of capacity `C < 4 + L` doubles it. A `BytesMut` that is shared with a live frame
/// instead gets a fresh vector of `max(4 + len, original_capacity)`, and `original_capacity`
/// is 0 here (the harness starts with `BytesMut::new()`; `Framed` uses 8 KiB).
fn decode_alloc_bound(max_frame: usize) -> usize {
    4 * (4 + max_frame)
}

/// The largest `size_of` of an element of a `Vec` in a v1 message: `ListenerSpec`.
fn largest_vec_element() -> usize {
    size_of::<ListenerSpec>()
        .max(size_of::<ListenerResult>())
        .max(size_of::<SocketAddr>())
        .max(size_of::<String>())
}

/// Heap bytes of fixed overhead a `from_frame` call may allocate besides the decoded value: the
/// error reason strings (postcard's message, `"{reason}; the peer speaks protocol versions
/// {a}..={b}"`, `"{n} trailing bytes"`) and the minimum capacity (4 elements) of a `Vec` that
/// grows from empty.
const MESSAGE_SLACK: usize = 1024;

/// Bounds on what `Message::from_frame` allocates for a payload of `n` bytes, as
/// `(largest single allocation, peak live bytes)`.
///
/// This is NOT `max_frame` plus a small slack: a postcard payload expands when it is decoded.
/// - A `String` costs its exact length: postcard checks the length against the remaining input
///   before it copies.
/// - A `Vec<T>` count is checked against the remaining input too: postcard 1.2's
///   `SeqAccess::size_hint` is `None` when the count exceeds the bytes left, so serde's
///   `size_hint::cautious` preallocates at most `min(remaining, 1 MiB / size_of::<T>())`
///   elements: `size_of::<T>()` bytes per payload byte, at most 1 MiB. Without a hint, or past
///   the preallocation, the `Vec` doubles as elements actually decode, each of which took at
///   least one byte: at most `2 * size_of::<T>()` bytes per payload byte, with NO 1 MiB cap.
///   The worst element is `ListenerSpec` (80 bytes) preallocated, or `String` (24 bytes, and an
///   empty string is 1 byte on the wire) grown: 48.
///
/// So one allocation is at most `size_of::<ListenerSpec>() * n` (80 n), and the peak (an outer
/// `Vec`, the inner `Vec`s of its elements, all strings) at most `(80 + 48 + 1) * n`, each plus
/// [`MESSAGE_SLACK`]. `regression_postcard_expansion` measures the worst cases.
fn message_alloc_bound(n: usize) -> (usize, usize) {
    let single = largest_vec_element() * n;
    let peak = (largest_vec_element() + 2 * size_of::<String>() + 1) * n;
    (single + MESSAGE_SLACK, peak + MESSAGE_SLACK)
}

// ------------------------------------------------------------------------------------------
// Statistics for the report printed after each property (visible with `--nocapture`).
// ------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Stats {
    decode_calls: u64,
    frames: u64,
    messages_ok: u64,
    messages_err: u64,
    advisory: u64,
    decode_errors: u64,
    /// Largest single allocation of one decode call, and its `max_frame`.
    decode_largest: (usize, usize),
    /// The largest `largest / (4 + max_frame)` seen, in thousandths.
    decode_ratio_milli: usize,
    /// The largest buffer length after `Ok(None)`, relative to `max_frame`, as (len, max).
    pending_len: (usize, usize),
    /// from_frame: (largest single, payload len) with the largest single allocation, and the
    /// largest per-byte expansion (single, peak) in thousandths for payloads of >= 64 bytes.
    message_largest: (usize, usize),
    message_peak: (usize, usize),
    message_single_per_byte_milli: usize,
    message_peak_per_byte_milli: usize,
    /// Hello path: largest single allocation and peak of one `read_message`.
    conn_largest: usize,
    conn_peak: usize,
}

impl Stats {
    fn decode(&mut self, max: usize, a: &Allocs) {
        self.decode_calls += 1;
        if a.largest > self.decode_largest.0 {
            self.decode_largest = (a.largest, max);
        }
        self.decode_ratio_milli = self.decode_ratio_milli.max(a.largest * 1000 / (4 + max));
    }

    fn message(&mut self, n: usize, a: &Allocs) {
        if a.largest > self.message_largest.0 {
            self.message_largest = (a.largest, n);
        }
        if a.peak > self.message_peak.0 {
            self.message_peak = (a.peak, n);
        }
        if n >= 64 {
            self.message_single_per_byte_milli =
                self.message_single_per_byte_milli.max(a.largest * 1000 / n);
            self.message_peak_per_byte_milli =
                self.message_peak_per_byte_milli.max(a.peak * 1000 / n);
        }
    }

    fn print(&self, name: &str, cases: u32, elapsed: Duration) {
        eprintln!("{name}: {cases} cases in {elapsed:.2?}\n  {self:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Checks shared by the properties.
// ------------------------------------------------------------------------------------------

/// Every type this build decodes, advisory ones (the ban list) included.
const KNOWN_KINDS: [u16; 15] = [
    kind::HELLO,
    kind::HELLO_ACK,
    kind::ERROR,
    kind::SESSION_SECRET,
    kind::PUSH_CONFIG,
    kind::CONFIG_RESULT,
    kind::CLIENT_ARRIVED,
    kind::CLIENT_FAILED,
    kind::HEARTBEAT,
    kind::POOL_ASSIGN,
    kind::POOL_ACCEPTED,
    kind::BAN_LIST,
    kind::BAN_RESULT,
    kind::EDGE_LIMITS,
    kind::AUTO_BANS,
];

fn header_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// Decodes one frame's message and checks the result; returns it (errors as their text).
fn check_message(frame: &RawFrame, stats: &mut Stats) -> Result<Option<Message>, String> {
    let n = frame.payload.len();
    let (result, allocs) = measure(|| Message::from_frame(frame));
    stats.message(n, &allocs);
    let (single, peak) = message_alloc_bound(n);
    assert!(
        allocs.largest <= single && allocs.peak <= peak,
        "from_frame(kind 0x{:04x}, {n} payload bytes) allocated {allocs:?}, over the bounds \
         (single {single}, peak {peak})",
        frame.kind
    );
    match result {
        Ok(Some(msg)) => {
            stats.messages_ok += 1;
            assert_eq!(msg.kind(), frame.kind);
            // Round-trip stability: what decoded re-encodes to a payload that decodes to the
            // same message, and re-encodes to the same bytes again (canonical form).
            let again = msg.to_frame();
            assert_eq!(again.kind, frame.kind);
            assert!(
                again.payload.len() <= n,
                "re-encoding grew the payload from {n} to {} bytes: {msg:?}",
                again.payload.len()
            );
            let decoded = Message::from_frame(&again)
                .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"))
                .expect("a known type");
            assert_eq!(decoded, msg);
            assert_eq!(decoded.to_frame(), again);
            Ok(Some(msg))
        }
        Ok(None) => {
            stats.advisory += 1;
            assert!(frame.kind >= kind::FIRST_ADVISORY, "{frame:?} skipped");
            Ok(None)
        }
        Err(e) => {
            stats.messages_err += 1;
            match &e {
                ProtocolError::UnknownMessage { kind } => {
                    assert_eq!(*kind, frame.kind);
                    assert!(*kind < kind::FIRST_ADVISORY && !KNOWN_KINDS.contains(kind));
                    assert_eq!(e.code(), ErrorCode::UNKNOWN_MESSAGE);
                }
                ProtocolError::BadPayload { kind, reason } => {
                    assert_eq!(*kind, frame.kind);
                    assert!(KNOWN_KINDS.contains(kind));
                    assert!(!reason.is_empty());
                }
                ProtocolError::NoCommonVersion { .. } => assert_eq!(frame.kind, kind::HELLO),
                other => panic!("from_frame returned an unexpected error kind: {other:?}"),
            }
            Err(e.to_string())
        }
    }
}

/// What decoding a byte stream produced, chunking aside.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    /// Bytes consumed by whole frames.
    consumed: usize,
    /// Each frame's message (`Ok(None)`: advisory), or the text of its error.
    messages: Vec<Result<Option<Message>, String>>,
    /// The codec's error, if the stream ended with one.
    error: Option<String>,
}

impl Outcome {
    /// What a `Connection` reading this stream returns, call by call: messages, skipping
    /// advisory frames, up to the first error, then `Ok(None)` on a clean end.
    fn connection_view(&self) -> Vec<Result<Option<Message>, String>> {
        let mut out = Vec::new();
        for m in &self.messages {
            match m {
                Ok(None) => {}
                Ok(Some(m)) => out.push(Ok(Some(m.clone()))),
                Err(e) => {
                    out.push(Err(e.clone()));
                    return out;
                }
            }
        }
        match &self.error {
            Some(e) => out.push(Err(e.clone())),
            None => out.push(Ok(None)),
        }
        out
    }
}

/// Feeds `input` to a fresh `FrameCodec::new(max_frame)` in chunks ending at `cuts` (sorted),
/// decoding after each chunk until it yields nothing, then at the end of the stream; checks
/// every call. `keep_frames` holds on to the frames (so the buffer stays shared), as a caller
/// that keeps payloads would.
fn run_decoder(
    max_frame: usize,
    input: &[u8],
    cuts: &[usize],
    keep_frames: bool,
    stats: &mut Stats,
) -> Outcome {
    let mut codec = FrameCodec::new(max_frame);
    let max = codec.max_frame();
    assert_eq!(max, max_frame.max(MIN_MAX_FRAME));
    let mut buf = BytesMut::new();
    let mut outcome = Outcome::default();
    let mut kept = Vec::new();
    let mut fed = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        let eof = false;
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        if !decode_all(
            &mut codec,
            &mut buf,
            input,
            eof,
            &mut outcome,
            &mut kept,
            stats,
        ) {
            return outcome;
        }
        if !keep_frames {
            kept.clear();
        }
    }
    decode_all(
        &mut codec,
        &mut buf,
        input,
        true,
        &mut outcome,
        &mut kept,
        stats,
    );
    outcome
}

/// Decodes until `Ok(None)` (returns true) or an error (returns false).
fn decode_all(
    codec: &mut FrameCodec,
    buf: &mut BytesMut,
    input: &[u8],
    eof: bool,
    outcome: &mut Outcome,
    kept: &mut Vec<RawFrame>,
    stats: &mut Stats,
) -> bool {
    let max = codec.max_frame();
    loop {
        let before = buf.len();
        let (result, allocs) = measure(|| {
            if eof {
                codec.decode_eof(buf)
            } else {
                codec.decode(buf)
            }
        });
        stats.decode(max, &allocs);
        assert!(
            allocs.largest <= decode_alloc_bound(max),
            "decode (max_frame {max}, {before} bytes buffered) allocated {allocs:?}"
        );
        match result {
            Ok(Some(frame)) => {
                stats.frames += 1;
                // Exactly one whole frame was consumed, and it is the one at this position.
                let at = outcome.consumed;
                let len = header_len(&input[at..]);
                assert!((2..=max).contains(&len));
                assert_eq!(before - buf.len(), 4 + len);
                assert_eq!(frame.payload.len(), len - 2);
                assert_eq!(
                    frame.kind,
                    u16::from_be_bytes([input[at + 4], input[at + 5]])
                );
                assert_eq!(&frame.payload[..], &input[at + HEADER_LEN..at + 4 + len]);
                assert!(
                    allocs.largest <= SHARED_HEADER,
                    "returning a frame allocated {allocs:?}"
                );
                outcome.consumed += 4 + len;
                let msg = check_message(&frame, stats);
                let failed = msg.is_err();
                outcome.messages.push(msg);
                kept.push(frame);
                if failed {
                    // A connection stops at its first undecodable message.
                    return false;
                }
            }
            Ok(None) => {
                // Nothing consumed; what is left is a partial frame: fewer than 4 bytes, or a
                // valid header (2 <= len <= max_frame) and fewer than 4 + len bytes, for which
                // the decoder has reserved room. So the buffer holds at most 3 + max_frame.
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                assert!(buf.len() <= 3 + max, "{} bytes pending", buf.len());
                if buf.len() > stats.pending_len.0 {
                    stats.pending_len = (buf.len(), max);
                }
                if buf.len() >= 4 {
                    let len = header_len(buf);
                    assert!((2..=max).contains(&len) && buf.len() < 4 + len);
                    assert!(
                        buf.capacity() >= 4 + len,
                        "room for the frame was not reserved"
                    );
                }
                if eof {
                    assert!(buf.is_empty(), "decode_eof left {} bytes", buf.len());
                }
                return true;
            }
            Err(e) => {
                stats.decode_errors += 1;
                let _ = e.code();
                let at = &input[outcome.consumed..];
                match e {
                    ProtocolError::FrameTooLarge { len, max: m } => {
                        assert_eq!((len, m), (header_len(at), max));
                        assert!(len > max);
                        assert_eq!(allocs.count, 0, "an oversized header allocated");
                    }
                    ProtocolError::FrameTooShort { len } => {
                        assert_eq!(len, header_len(at));
                        assert!(len < 2);
                        assert_eq!(allocs.count, 0, "a short header allocated");
                    }
                    ProtocolError::Truncated { have, need } if eof => {
                        assert_eq!(have, buf.len());
                        let want = if have >= 4 { 4 + header_len(at) } else { 4 };
                        assert_eq!(need, want);
                        assert!(0 < have && have < need);
                    }
                    other => panic!("the frame decoder returned {other:?}"),
                }
                outcome.error = Some(e.to_string());
                return false;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Strategies.
// ------------------------------------------------------------------------------------------

fn bytes(size: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), size)
}

/// Sorted cut points for an input of `len` bytes.
fn cut_points(idx: &[Index], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = idx.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

fn max_frame() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0), // clamped to MIN_MAX_FRAME
        Just(MIN_MAX_FRAME),
        MIN_MAX_FRAME..=64 * 1024,
        Just(DEFAULT_MAX_FRAME),
    ]
}

/// A length prefix: anything, the edges around each maximum, and the classics.
fn length_field() -> impl Strategy<Value = u32> {
    let m = MIN_MAX_FRAME as u32;
    let d = DEFAULT_MAX_FRAME as u32;
    prop_oneof![
        any::<u32>(),
        0u32..=3,
        Just(u32::MAX),
        Just(0x8000_0000u32),
        Just(u32::from_be_bytes(MAGIC)),
        (m - 8)..(m + 8),
        0xfff0u32..0x10010,
        (d - 8)..(d + 8),
        0u32..70_000,
    ]
}

fn frame_kind() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => proptest::sample::select(KNOWN_KINDS.to_vec()),
        1 => kind::FIRST_ADVISORY..=u16::MAX,
        1 => any::<u16>(),
        1 => Just(0x0777u16),
    ]
}

#[derive(Debug, Clone)]
enum Piece {
    Garbage(Vec<u8>),
    /// A frame; `len: None` writes the right length.
    Frame {
        len: Option<u32>,
        kind: u16,
        payload: Vec<u8>,
    },
}

fn piece() -> impl Strategy<Value = Piece> {
    let payload = prop_oneof![
        6 => bytes(0..64),
        3 => bytes(0..1024),
        1 => bytes(0..16 * 1024),
    ];
    prop_oneof![
        1 => bytes(0..16).prop_map(Piece::Garbage),
        6 => (prop::option::weighted(0.2, length_field()), frame_kind(), payload)
            .prop_map(|(len, kind, payload)| Piece::Frame { len, kind, payload }),
    ]
}

fn concat(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Garbage(b) => out.extend_from_slice(b),
            Piece::Frame { len, kind, payload } => {
                let len = len.unwrap_or(2 + payload.len() as u32);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(payload);
            }
        }
    }
    out
}

/// Raw bytes (0 to 64 KiB) or a stream of well- and ill-formed frames.
fn decoder_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => bytes(0..64),
        2 => bytes(0..4096),
        1 => bytes(0..64 * 1024),
        6 => vec(piece(), 0..8).prop_map(|p| concat(&p)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        vec(0x20u8..0x7f, 0..16).prop_map(|b| String::from_utf8(b).unwrap()),
        vec(any::<char>(), 0..12).prop_map(String::from_iter),
    ]
}

fn token() -> impl Strategy<Value = Token> {
    any::<[u8; 16]>().prop_map(Token::from_bytes)
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    // `SocketAddr::new` leaves an IPv6 flow info and scope id at 0: they are not on the wire.
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        (text(), text(), any::<u32>()).prop_map(|(site, agent, heartbeat_ms)| {
            Role::Control(ControlHello {
                site,
                agent,
                heartbeat_ms,
            })
        }),
        (any::<u64>(), token()).prop_map(|(id, token)| Role::Data(DataHello { id, token })),
        (outbound_hello(), proptest::option::of(token())).prop_map(|(h, secret)| match secret {
            Some(s) => Role::SessionOutbound(h, s),
            None => Role::Outbound(h),
        }),
        (text(), text(), proptest::option::of(token())).prop_map(|(site, agent, secret)| {
            let h = PoolHello { site, agent };
            match secret {
                Some(s) => Role::SessionPool(h, s),
                None => Role::Pool(h),
            }
        }),
    ]
}

fn outbound_hello() -> impl Strategy<Value = OutboundHello> {
    (text(), text(), any::<u16>(), socket_addr()).prop_map(|(site, host, port, client_addr)| {
        OutboundHello {
            site,
            host,
            port,
            client_addr,
        }
    })
}

/// The messages of the warm pool and of session binding (v2 adds PoolAccepted and
/// SessionSecret).
fn pool_and_session_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u64>(),
            text(),
            any::<u16>(),
            socket_addr(),
            socket_addr()
        )
            .prop_map(|(id, listener, port_offset, client_addr, gateway_addr)| {
                Message::PoolAssign(PoolAssign {
                    id,
                    listener,
                    port_offset,
                    client_addr,
                    gateway_addr,
                })
            }),
        any::<u64>().prop_map(|id| Message::PoolAccepted(PoolAccepted { id })),
        token().prop_map(|secret| Message::SessionSecret(SessionSecret { secret })),
    ]
}

fn listener_spec() -> impl Strategy<Value = ListenerSpec> {
    (
        text(),
        any::<Option<IpAddr>>(),
        any::<u16>(),
        0u16..4096,
        any::<bool>(),
        vec(text(), 0..4),
    )
        .prop_map(|(name, ip, first, span, deny, except)| ListenerSpec {
            name,
            public: PublicAddr {
                ip,
                ports: PortRange::new(first, first.saturating_add(span)).unwrap(),
            },
            clients: ClientRules {
                default: if deny { Policy::Deny } else { Policy::Allow },
                except,
            },
        })
}

fn listener_result() -> impl Strategy<Value = ListenerResult> {
    let status = prop_oneof![
        (vec(socket_addr(), 0..4), any::<bool>())
            .prop_map(|(addrs, kept)| ListenerStatus::Bound { addrs, kept }),
        text().prop_map(|error| ListenerStatus::Failed { error }),
        Just(ListenerStatus::Paused),
    ];
    (text(), status).prop_map(|(name, status)| ListenerResult { name, status })
}

/// Every message of versions 1 and 2, with arbitrary field values.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), text(), role()).prop_map(|(min, max, software, role)| {
            Message::Hello(Hello {
                min_version: min,
                max_version: max,
                software,
                role,
            })
        }),
        role().prop_map(hello),
        (any::<u16>(), text(), any::<u32>(), any::<bool>()).prop_map(|(v, s, h, t)| {
            Message::HelloAck(HelloAck {
                version: v,
                software: s,
                heartbeat_ms: h,
                data_tls: t,
            })
        }),
        (any::<u16>(), text()).prop_map(|(c, m)| Message::error(ErrorCode(c), m)),
        (any::<u64>(), text(), vec(listener_spec(), 0..4)).prop_map(|(g, d, l)| {
            Message::PushConfig(PushConfig {
                generation: g,
                digest: d,
                listeners: l,
            })
        }),
        (any::<u64>(), vec(listener_result(), 0..4)).prop_map(|(g, l)| {
            Message::ConfigResult(ConfigResult {
                generation: g,
                listeners: l,
            })
        }),
        (
            any::<u64>(),
            token(),
            text(),
            any::<u16>(),
            socket_addr(),
            socket_addr()
        )
            .prop_map(|(id, token, listener, port_offset, c, g)| {
                Message::ClientArrived(ClientArrived {
                    id,
                    token,
                    listener,
                    port_offset,
                    client_addr: c,
                    gateway_addr: g,
                })
            }),
        (any::<u64>(), text())
            .prop_map(|(id, reason)| Message::ClientFailed(ClientFailed { id, reason })),
        any::<u64>().prop_map(|seq| Message::Heartbeat(Heartbeat { seq })),
        pool_and_session_message(),
    ]
}

/// Encodes `msg` with the codec (default maximum) onto `out`; returns the frame's offset.
fn encode_onto(msg: &Message, out: &mut Vec<u8>) -> usize {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(msg.to_frame(), &mut buf)
        .expect("generated messages fit the default maximum");
    let at = out.len();
    out.extend_from_slice(&buf);
    at
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    Truncate(Index),
    Extend(Vec<u8>),
    /// Replace the length prefix of one of the frames.
    SetLength(Index, u32),
    /// Add to the length prefix of one of the frames (wrapping).
    AdjustLength(Index, i32),
    /// Replace the type of one of the frames.
    SetKind(Index, u16),
    /// Overwrite a run of bytes with a varint (a count or a length in a payload).
    Varint(Index, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        1 => (any::<Index>(), bytes(1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => bytes(1..64).prop_map(Mutation::Extend),
        2 => (any::<Index>(), length_field()).prop_map(|(i, l)| Mutation::SetLength(i, l)),
        1 => (any::<Index>(), -8i32..=8).prop_map(|(i, d)| Mutation::AdjustLength(i, d)),
        1 => (any::<Index>(), frame_kind()).prop_map(|(i, k)| Mutation::SetKind(i, k)),
        2 => (any::<Index>(), prop_oneof![any::<u64>(), 0u64..300, Just(u64::from(u32::MAX))])
            .prop_map(|(i, v)| Mutation::Varint(i, v)),
    ]
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Applies the mutations in order. `frames` holds the offsets of the frame headers (for the
/// header mutations; those that no longer fit the data are skipped).
fn mutate(data: &mut Vec<u8>, frames: &[usize], mutations: &[Mutation]) {
    let header = |i: &Index| -> Option<usize> {
        if frames.is_empty() {
            return None;
        }
        Some(frames[i.index(frames.len())])
    };
    for m in mutations {
        let len = data.len();
        match m {
            Mutation::FlipBit(i, b) if len > 0 => data[i.index(len)] ^= 1 << b,
            Mutation::SetByte(i, b) if len > 0 => data[i.index(len)] = *b,
            Mutation::Insert(i, b) => {
                let at = i.index(len + 1);
                data.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i.index(len);
                data.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(i) => data.truncate(i.index(len + 1)),
            Mutation::Extend(b) => data.extend_from_slice(b),
            Mutation::SetLength(i, l) => {
                if let Some(at) = header(i).filter(|at| at + 4 <= len) {
                    data[at..at + 4].copy_from_slice(&l.to_be_bytes());
                }
            }
            Mutation::AdjustLength(i, d) => {
                if let Some(at) = header(i).filter(|at| at + 4 <= len) {
                    let l = header_len(&data[at..]) as u32;
                    data[at..at + 4].copy_from_slice(&l.wrapping_add_signed(*d).to_be_bytes());
                }
            }
            Mutation::SetKind(i, k) => {
                if let Some(at) = header(i).filter(|at| at + 6 <= len) {
                    data[at + 4..at + 6].copy_from_slice(&k.to_be_bytes());
                }
            }
            Mutation::Varint(i, v) if len > 0 => {
                let at = i.index(len);
                let mut enc = Vec::new();
                varint(*v, &mut enc);
                let end = (at + enc.len()).min(len);
                data.splice(at..end, enc);
            }
            _ => {}
        }
    }
}

/// A payload aimed at the `Vec` preallocation: a valid message's encoding cut short, then a
/// count (often exactly the bytes that follow, the most a preallocation will trust), then
/// filler that decodes as many small elements (zeros: empty strings, minimal listener specs;
/// `00 02`: paused listener results).
fn crafted_payload() -> impl Strategy<Value = RawFrame> {
    #[derive(Debug, Clone, Copy)]
    enum Count {
        Remaining,
        Value(u64),
    }
    let count = prop_oneof![
        3 => Just(Count::Remaining),
        1 => any::<u64>().prop_map(Count::Value),
        1 => (0u64..20_000).prop_map(Count::Value),
    ];
    let filler = prop_oneof![
        (0usize..8192).prop_map(|n| vec![0u8; n]),
        (0usize..4096).prop_map(|n| [0u8, 2].repeat(n)),
        bytes(0..2048),
    ];
    (message(), any::<Index>(), count, filler).prop_map(|(msg, cut, count, filler)| {
        let frame = msg.to_frame();
        let keep = cut.index(frame.payload.len() + 1);
        let mut p = frame.payload[..keep].to_vec();
        varint(
            match count {
                Count::Remaining => filler.len() as u64,
                Count::Value(v) => v,
            },
            &mut p,
        );
        p.extend_from_slice(&filler);
        RawFrame {
            kind: frame.kind,
            payload: Bytes::from(p),
        }
    })
}

fn config(cases: u32) -> Config {
    let scale = std::env::var("FUZZ_FRAMES_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    Config {
        cases: cases * scale,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// Runs one property with a fixed case count; prints its statistics.
fn run_property<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let config = config(cases);
    let cases = config.cases;
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name}: {e}");
    }
    eprintln!("{name}: {cases} cases in {:.2?}", started.elapsed());
}

/// `tokio::time::timeout` needs the runtime's timer when it is created, so create it inside
/// the future that `block_on` drives.
async fn within<F: Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, fut).await
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ------------------------------------------------------------------------------------------
// (a) + (b) Arbitrary bytes through the frame decoder, every frame through the message decoder.
// ------------------------------------------------------------------------------------------

#[test]
fn decoder_survives_arbitrary_bytes_in_arbitrary_chunks() {
    let stats = RefCell::new(Stats::default());
    let strategy = (
        max_frame(),
        decoder_input(),
        vec(any::<Index>(), 0..24),
        any::<bool>(),
    );
    let started = Instant::now();
    run_property(
        "arbitrary bytes",
        4096,
        strategy,
        |(max, input, cuts, keep)| {
            let stats = &mut stats.borrow_mut();
            let cuts = cut_points(&cuts, input.len());
            let chunked = run_decoder(max, &input, &cuts, keep, stats);
            // Chunking does not change what a stream decodes to.
            let whole = run_decoder(max, &input, &[], false, stats);
            prop_assert_eq!(chunked, whole);
            Ok(())
        },
    );
    stats
        .borrow()
        .print("arbitrary bytes", config(4096).cases, started.elapsed());
}

#[test]
fn message_decoder_survives_arbitrary_payloads() {
    let stats = RefCell::new(Stats::default());
    let frame = prop_oneof![
        (frame_kind(), bytes(0..512)).prop_map(|(kind, p)| RawFrame {
            kind,
            payload: Bytes::from(p),
        }),
        (frame_kind(), bytes(0..8192)).prop_map(|(kind, p)| RawFrame {
            kind,
            payload: Bytes::from(p),
        }),
        crafted_payload(),
        (message(), vec(mutation(), 1..4)).prop_map(|(msg, m)| {
            let frame = msg.to_frame();
            let mut p = frame.payload.to_vec();
            mutate(&mut p, &[], &m);
            RawFrame {
                kind: frame.kind,
                payload: Bytes::from(p),
            }
        }),
    ];
    let started = Instant::now();
    run_property("message payloads", 8192, frame, |frame| {
        let _ = check_message(&frame, &mut stats.borrow_mut());
        Ok(())
    });
    stats
        .borrow()
        .print("message payloads", config(8192).cases, started.elapsed());
}

// ------------------------------------------------------------------------------------------
// (c) Mutated valid frames.
// ------------------------------------------------------------------------------------------

#[test]
fn mutated_valid_frames_decode_or_fail_cleanly() {
    let stats = RefCell::new(Stats::default());
    let strategy = (
        prop_oneof![Just(MIN_MAX_FRAME), Just(DEFAULT_MAX_FRAME)],
        vec(message(), 1..4),
        vec(mutation(), 0..5),
        vec(any::<Index>(), 0..8),
    );
    let started = Instant::now();
    run_property(
        "mutated frames",
        8192,
        strategy,
        |(max, msgs, mutations, cuts)| {
            let stats = &mut stats.borrow_mut();
            let mut data = Vec::new();
            let frames: Vec<usize> = msgs.iter().map(|m| encode_onto(m, &mut data)).collect();
            let pristine = mutations.is_empty();
            mutate(&mut data, &frames, &mutations);
            let cuts = cut_points(&cuts, data.len());
            let outcome = run_decoder(max, &data, &cuts, false, stats);
            if pristine {
                // Unmutated frames decode to exactly what was encoded (unless one is over the
                // reader's maximum, which must then be the error).
                let fit = msgs
                    .iter()
                    .take_while(|m| m.to_frame().payload.len() + 2 <= max)
                    .count();
                let decoded: Vec<_> = outcome.messages.to_vec();
                let expected: Vec<_> = msgs[..fit].iter().cloned().map(|m| Ok(Some(m))).collect();
                prop_assert_eq!(decoded, expected);
                prop_assert_eq!(outcome.error.is_some(), fit < msgs.len());
            }
            Ok(())
        },
    );
    stats
        .borrow()
        .print("mutated frames", config(8192).cases, started.elapsed());
}

// ------------------------------------------------------------------------------------------
// (d) The hello path: preamble and first messages through a `Connection`, as the gateway reads
// a new control-port connection; and the agent's side, the answer through `Sniff`.
// ------------------------------------------------------------------------------------------

/// Writes `input` into a duplex pipe in chunks ending at `cuts`, yielding between chunks so the
/// reader sees partial data; then closes the pipe.
fn spawn_writer(mut tx: tokio::io::DuplexStream, input: Vec<u8>, cuts: Vec<usize>) {
    tokio::spawn(async move {
        let mut fed = 0;
        for end in cuts.into_iter().chain([input.len()]) {
            if tx.write_all(&input[fed..end]).await.is_err() {
                return; // the reader gave up
            }
            fed = end;
            tokio::task::yield_now().await;
        }
    });
}

/// The gateway's reading of a new connection: preamble, then up to `reads` messages. Returns
/// the preamble error, or what each `read_message` call returned.
async fn gateway_reads(
    input: Vec<u8>,
    cuts: Vec<usize>,
    max_frame: usize,
    reads: usize,
    stats: &RefCell<Stats>,
) -> Result<Vec<Result<Option<Message>, String>>, ProtocolError> {
    let (tx, mut rx) = tokio::io::duplex(4096);
    spawn_writer(tx, input, cuts);
    let (preamble, _) = Tracked::new(read_preamble(&mut rx)).await;
    preamble?;
    let mut conn = Connection::new(rx, max_frame);
    let mut out = Vec::new();
    for _ in 0..reads {
        let (result, allocs) = Tracked::new(conn.read_message()).await;
        {
            let mut s = stats.borrow_mut();
            s.conn_largest = s.conn_largest.max(allocs.largest);
            s.conn_peak = s.conn_peak.max(allocs.peak);
        }
        let (single, peak) = message_alloc_bound(max_frame);
        assert!(
            allocs.largest <= decode_alloc_bound(max_frame).max(single)
                && allocs.peak <= decode_alloc_bound(max_frame) + peak,
            "read_message allocated {allocs:?}"
        );
        let done = !matches!(result, Ok(Some(_)));
        if let Err(e) = &result {
            let _ = e.code();
            assert!(
                !matches!(e, ProtocolError::Io(_) | ProtocolError::Closed),
                "unexpected error {e:?}"
            );
        }
        out.push(result.map_err(|e| e.to_string()));
        if done {
            break;
        }
    }
    Ok(out)
}

#[test]
fn hello_path_survives_mutated_hellos() {
    let rt = current_thread_runtime();
    let stats = RefCell::new(Stats::default());
    let preamble = prop_oneof![
        8 => Just(MAGIC),
        1 => Just([0x16, 0x03, 0x01, 0x00]),
        1 => any::<[u8; 4]>(),
    ];
    let strategy = (
        preamble,
        role(),
        vec(message(), 0..2),
        vec(mutation(), 0..4),
        vec(any::<Index>(), 0..6),
        prop_oneof![Just(MIN_MAX_FRAME), Just(DEFAULT_MAX_FRAME)],
    );
    let started = Instant::now();
    run_property(
        "hello path",
        4096,
        strategy,
        |(preamble, role, more, mutations, cuts, max)| {
            let mut data = with_preamble(&hello(role)).to_vec();
            data[..4].copy_from_slice(&preamble);
            let mut frames = vec![4];
            for m in &more {
                frames.push(encode_onto(m, &mut data));
            }
            mutate(&mut data, &frames, &mutations);
            let cuts = cut_points(&cuts, data.len());
            let reads = more.len() + 2;
            let result = rt.block_on(within(
                Duration::from_secs(10),
                gateway_reads(data.clone(), cuts, max, reads, &stats),
            ));
            let result = result.expect("the hello path hung");
            // The same answers as decoding the bytes synchronously in one piece.
            match result {
                Err(e) => {
                    let first: Option<[u8; 4]> = data.get(..4).map(|b| b.try_into().unwrap());
                    match (e, first) {
                        (ProtocolError::Closed, None) => {}
                        (ProtocolError::UnexpectedTls, Some(f)) => {
                            prop_assert!(sallyport::protocol::looks_like_tls(&f))
                        }
                        (ProtocolError::BadMagic(b), Some(f)) => {
                            prop_assert_eq!(b, f);
                            prop_assert!(f != MAGIC && !sallyport::protocol::looks_like_tls(&f));
                        }
                        (e, first) => panic!("preamble {first:?} gave {e:?}"),
                    }
                }
                Ok(reads_got) => {
                    prop_assert_eq!(&data[..4], &MAGIC[..]);
                    let sync = run_decoder(max, &data[4..], &[], false, &mut stats.borrow_mut());
                    let mut expected = sync.connection_view();
                    expected.truncate(reads_got.len());
                    prop_assert_eq!(reads_got, expected);
                }
            }
            Ok(())
        },
    );
    stats
        .borrow()
        .print("hello path", config(4096).cases, started.elapsed());
}

/// The agent's side: the gateway's answer (a HelloAck, a bare Error, or a refusal: `SPRT` and an
/// Error) read through `Sniff` and a `Connection`, mutated.
#[test]
fn agent_reads_mutated_answers() {
    let rt = current_thread_runtime();
    let strategy = (
        prop_oneof![
            (any::<u16>(), text(), any::<u32>(), any::<bool>()).prop_map(|(v, s, h, t)| {
                Message::HelloAck(HelloAck {
                    version: v,
                    software: s,
                    heartbeat_ms: h,
                    data_tls: t,
                })
            }),
            (any::<u16>(), text()).prop_map(|(c, m)| Message::error(ErrorCode(c), m)),
        ],
        any::<bool>(),
        bytes(0..32),
        vec(mutation(), 0..4),
        vec(any::<Index>(), 0..6),
    );
    run_property(
        "agent answers",
        2048,
        strategy,
        |(msg, refusal_form, trailer, mutations, cuts)| {
            let mut data = Vec::new();
            let at = if refusal_form {
                data.extend_from_slice(&with_preamble(&msg));
                4
            } else {
                encode_onto(&msg, &mut data)
            };
            data.extend_from_slice(&trailer);
            let pristine = mutations.is_empty();
            mutate(&mut data, &[at], &mutations);
            let cuts = cut_points(&cuts, data.len());
            let result = rt.block_on(within(Duration::from_secs(10), async {
                let (tx, rx) = tokio::io::duplex(4096);
                spawn_writer(tx, data, cuts);
                let mut conn = Connection::new(Sniff::new(rx), DEFAULT_MAX_FRAME);
                conn.expect_message().await
            }));
            let result = result.expect("reading the answer hung");
            if let Err(e) = &result {
                let _ = (e.code(), e.to_string());
            }
            if pristine {
                match (refusal_form, &msg, result) {
                    (true, Message::Error(sent), Err(ProtocolError::Io(e))) => {
                        prop_assert_eq!(refusal(&e), Some(sent));
                    }
                    (false, Message::Error(sent), Err(ProtocolError::Peer(got))) => {
                        prop_assert_eq!(&got, sent);
                    }
                    (false, sent, Ok(got)) => prop_assert_eq!(&got, sent),
                    (true, Message::HelloAck(_), Err(ProtocolError::Io(e))) => {
                        // SPRT + a non-error frame: still a refusal, "unreadable".
                        prop_assert_eq!(refusal(&e).map(|r| r.code), Some(ErrorCode::PROTOCOL));
                    }
                    (r, m, res) => panic!("refusal {r}, {m:?}: {res:?}"),
                }
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------------------
// (f) Text a peer controls (the stable form of fuzz/fuzz_targets/peer_text.rs, issue 12 items 8
//     and 9): the escaping every log line and `status` apply, the destination-host check, and
//     access-rule patterns, IPv4-mapped ones included.
// ------------------------------------------------------------------------------------------

/// Text biased towards what an attacker sends: controls (C0, C1, DEL), bidi and zero-width
/// marks, the host characters, and any char at all.
fn hostile_text() -> impl Strategy<Value = String> {
    let c = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => proptest::sample::select(vec!['.', '-', '_', ':', '0', '9', '\\', ' ', '[', ']']),
        2 => proptest::char::range('\0', '\u{1f}'),
        1 => proptest::char::range('\u{7f}', '\u{9f}'),
        1 => proptest::sample::select(vec![
            '\u{200b}', '\u{200e}', '\u{200f}', '\u{2028}', '\u{2029}', '\u{202a}', '\u{202e}',
            '\u{2060}', '\u{2066}', '\u{2069}', '\u{feff}',
        ]),
        1 => any::<char>(),
    ];
    vec(c, 0..40).prop_map(String::from_iter)
}

#[test]
fn peer_text_is_escaped_and_checked() {
    use sallyport::egress::{check_destination, EgressRules};
    use sallyport::escape::{escape, is_unsafe};
    run_property("peer text", 8192, hostile_text(), |text| {
        let shown = escape(&text);
        // Nothing unsafe survives, so no line break, ESC or bidi override reaches a log or a
        // terminal...
        prop_assert!(!shown.chars().any(is_unsafe), "{:?} -> {:?}", text, shown);
        // ...and text with nothing unsafe reads unchanged.
        if !text.chars().any(is_unsafe) {
            prop_assert_eq!(&shown, &text);
        }
        if check_destination(&text).is_ok() {
            prop_assert!(
                text.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c)),
                "accepted destination {:?}",
                text
            );
        }
        let _ = EgressRules::parse(&[&text]);
        let _ = text.parse::<sallyport::access::IpPattern>();
        Ok(())
    });
}

#[test]
fn ipv4_mapped_patterns_match_like_their_ipv4_form() {
    use sallyport::access::IpPattern;
    use std::net::Ipv4Addr;
    let strategy = (
        any::<u32>(),
        0u8..=32,
        any::<u32>(),
        0u8..4,
        any::<[u16; 8]>(),
    );
    run_property(
        "ipv4-mapped patterns",
        4096,
        strategy,
        |(net, len, probe, near, v6)| {
            let (net, probe) = (Ipv4Addr::from(net), Ipv4Addr::from(probe));
            // Half the probes fall inside the network, whatever its prefix.
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let probe = match near {
                0 | 1 => Ipv4Addr::from((u32::from(net) & mask) | (u32::from(probe) & !mask)),
                _ => probe,
            };
            let hi = Ipv4Addr::from(u32::from(net).max(u32::from(probe)));
            let lo = Ipv4Addr::from(u32::from(net).min(u32::from(probe)));
            let pairs = [
                (format!("::ffff:{net}/{}", 96 + len), format!("{net}/{len}")),
                (format!("::ffff:{net}"), format!("{net}")),
                (format!("::ffff:{lo}-::ffff:{hi}"), format!("{lo}-{hi}")),
                (format!("::ffff:{lo} - {hi}"), format!("{lo}-{hi}")),
            ];
            let other_v6 = IpAddr::from(std::net::Ipv6Addr::from(v6));
            for (mapped, plain) in &pairs {
                let m: IpPattern = mapped.parse().map_err(TestCaseError::fail)?;
                let p: IpPattern = plain.parse().map_err(TestCaseError::fail)?;
                prop_assert_eq!(&m, &p, "{} is not canonicalised to {}", mapped, plain);
                for ip in [IpAddr::V4(probe), IpAddr::V4(net), other_v6] {
                    let as_mapped = match ip {
                        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                        v6 => v6,
                    };
                    // A client seen as IPv4 or as IPv4-mapped IPv6 (a dual-stack socket) is
                    // matched the same by the mapped rule and by its IPv4 form.
                    prop_assert_eq!(m.matches(ip), p.matches(ip), "{} on {}", mapped, ip);
                    prop_assert_eq!(
                        m.matches(as_mapped),
                        m.matches(ip),
                        "{} on {}",
                        mapped,
                        as_mapped
                    );
                }
                prop_assert!(m.matches(IpAddr::V4(net)), "{} misses {}", mapped, net);
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------------------
// Regression cases.
// ------------------------------------------------------------------------------------------

fn read_all(
    input: &[u8],
    max_frame: usize,
) -> Result<Vec<Result<Option<Message>, String>>, ProtocolError> {
    let rt = current_thread_runtime();
    let stats = RefCell::new(Stats::default());
    rt.block_on(within(
        Duration::from_secs(10),
        gateway_reads(input.to_vec(), vec![], max_frame, 8, &stats),
    ))
    .expect("hung")
}

#[test]
fn regression_four_gib_length_prefix() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x01, 0x01][..]);
    let (result, allocs) = measure(|| FrameCodec::default().decode(&mut buf));
    assert!(matches!(
        result,
        Err(ProtocolError::FrameTooLarge {
            len: 0xffff_ffff,
            max: DEFAULT_MAX_FRAME
        })
    ));
    assert_eq!(allocs.count, 0, "{allocs:?}");
    // Through a connection, after the preamble: the error, with the code the peer is sent.
    let got = read_all(b"SPRT\xff\xff\xff\xff\x00\x01", DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(got.len(), 1);
    let err = got[0].as_ref().unwrap_err();
    assert!(err.contains("4294967295"), "{err}");
    // And at every maximum a peer may configure.
    for max in [MIN_MAX_FRAME, DEFAULT_MAX_FRAME, 64 << 20] {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let (result, allocs) = measure(|| FrameCodec::new(max).decode(&mut buf));
        assert!(matches!(result, Err(ProtocolError::FrameTooLarge { .. })));
        assert_eq!(allocs.count, 0);
    }
}

#[test]
fn regression_length_zero_one_two() {
    for len in [0u8, 1] {
        let mut buf = BytesMut::from(&[0, 0, 0, len, 0, 0x30, 1][..]);
        let (result, allocs) = measure(|| FrameCodec::default().decode(&mut buf));
        assert!(
            matches!(result, Err(ProtocolError::FrameTooShort { len: l }) if l == len as usize),
            "{result:?}"
        );
        assert_eq!(allocs.count, 0);
    }
    // Three bytes of a zero length are not a frame yet.
    let mut buf = BytesMut::from(&[0, 0, 0][..]);
    assert_eq!(FrameCodec::default().decode(&mut buf).unwrap(), None);
    // Length 2: a type and an empty payload, which no v1 message accepts...
    let mut buf = BytesMut::from(&[0, 0, 0, 2, 0, 0x30][..]);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert!(frame.payload.is_empty());
    assert!(matches!(
        Message::from_frame(&frame),
        Err(ProtocolError::BadPayload { kind: 0x30, .. })
    ));
    // ...but an advisory type with it is skipped.
    let frame = RawFrame {
        kind: 0x8001,
        payload: Bytes::new(),
    };
    assert_eq!(Message::from_frame(&frame).unwrap(), None);
}

#[test]
fn regression_truncated_hello() {
    let full = with_preamble(&hello(Role::Control(ControlHello {
        site: "acme-mft".into(),
        agent: "int1".into(),
        heartbeat_ms: 5000,
    })));
    let frame_len = full.len() - 4;
    for cut in 0..=full.len() {
        let got = read_all(&full[..cut], DEFAULT_MAX_FRAME);
        match cut {
            0..=3 => assert!(matches!(got, Err(ProtocolError::Closed)), "{cut}: {got:?}"),
            4 => assert_eq!(got.unwrap(), vec![Ok(None)]),
            c if c < full.len() => {
                let got = got.unwrap();
                let want = ProtocolError::Truncated {
                    have: c - 4,
                    need: if c >= 8 { frame_len } else { 4 },
                }
                .to_string();
                assert_eq!(got, vec![Err(want)], "cut at {cut}");
            }
            _ => {
                let got = got.unwrap();
                assert!(matches!(got[0], Ok(Some(Message::Hello(_)))));
                assert_eq!(got[1], Ok(None));
            }
        }
    }
    // A hello whose payload is cut short inside a whole frame: a bad payload that still names
    // the peer's versions.
    let frame = hello(Role::Data(DataHello {
        id: 42,
        token: Token::from_bytes([7; 16]),
    }))
    .to_frame();
    let short = RawFrame {
        kind: frame.kind,
        payload: frame.payload.slice(..frame.payload.len() - 3),
    };
    let err = Message::from_frame(&short).unwrap_err().to_string();
    let versions = format!("versions 1..={}", sallyport::protocol::MAX_VERSION);
    assert!(err.contains(&versions), "{err}");
}

#[test]
fn regression_unknown_critical_type_and_advisory_skip() {
    let frame = |kind: u16, payload: &[u8]| {
        let mut out = (2 + payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(payload);
        out
    };
    // An unknown critical type fails the connection with UNKNOWN_MESSAGE.
    let mut input = MAGIC.to_vec();
    input.extend(frame(0x0777, b"xyz"));
    let err = Message::from_frame(&RawFrame {
        kind: 0x0777,
        payload: Bytes::from_static(b"xyz"),
    })
    .unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::UnknownMessage { kind: 0x0777 }
    ));
    assert_eq!(err.code(), ErrorCode::UNKNOWN_MESSAGE);
    assert_eq!(
        read_all(&input, DEFAULT_MAX_FRAME).unwrap(),
        vec![Err(err.to_string())]
    );
    // An advisory type, even with a payload no v1 message has, is skipped: the hello after it
    // is the first message.
    let hello = hello(Role::Data(DataHello {
        id: 1,
        token: Token::from_bytes([1; 16]),
    }));
    let mut input = MAGIC.to_vec();
    input.extend(frame(0x8001, &[0xff; 100]));
    input.extend(frame(0xffff, b""));
    encode_onto(&hello, &mut input);
    assert_eq!(
        read_all(&input, DEFAULT_MAX_FRAME).unwrap(),
        vec![Ok(Some(hello)), Ok(None)]
    );
}

/// The worst expansions of a payload into decoded values (see [`message_alloc_bound`]),
/// measured. These are findings, not goals: the test only checks they stay within the
/// documented bound.
#[test]
fn regression_postcard_expansion() {
    let measure_frame = |name: &str, kind: u16, payload: Vec<u8>| {
        let n = payload.len();
        let frame = RawFrame {
            kind,
            payload: Bytes::from(payload),
        };
        let (result, allocs) = measure(|| Message::from_frame(&frame));
        eprintln!(
            "{name}: {n}-byte payload -> {} (largest single allocation {} = {:.1}x, peak {} = \
             {:.1}x)",
            match &result {
                Ok(Some(m)) => m.name().to_string(),
                Ok(None) => "skipped".into(),
                Err(e) => format!("error: {e}"),
            },
            allocs.largest,
            allocs.largest as f64 / n as f64,
            allocs.peak,
            allocs.peak as f64 / n as f64,
        );
        let (single, peak) = message_alloc_bound(n);
        assert!(
            allocs.largest <= single && allocs.peak <= peak,
            "{allocs:?}"
        );
        (result, allocs)
    };
    for max in [MIN_MAX_FRAME, DEFAULT_MAX_FRAME] {
        let n = max - 2; // the largest payload a frame can carry

        // PushConfig{generation 0, digest "", listeners: [count = the bytes left]} and zeros:
        // the count passes postcard's check, so serde preallocates min(count, 1 MiB / 80)
        // ListenerSpecs; each 6 zero bytes then decode as a minimal listener, and the payload
        // ends in the middle of one.
        let mut p = vec![0, 0];
        varint((n - 5) as u64, &mut p);
        p.resize(n, 0);
        let (r, _) = measure_frame(
            "PushConfig, listener count = bytes left",
            kind::PUSH_CONFIG,
            p,
        );
        assert!(r.is_err());

        // A VALID PushConfig: one listener whose `except` holds as many empty strings as there
        // are bytes left: the Vec<String> grows past the preallocation by doubling, 24 bytes of
        // String per payload byte, times up to 2.
        let mut p = vec![0, 0, 1, 0, 0, 0, 0, 0];
        // The count's own varint length depends on the count: 2 bytes below 16384, else 3.
        let rest = n - p.len();
        let count = if rest - 2 < 1 << 14 {
            rest - 2
        } else {
            rest - 3
        };
        varint(count as u64, &mut p);
        p.resize(n, 0);
        let (r, _) = measure_frame(
            "PushConfig, 1 listener, empty exceptions",
            kind::PUSH_CONFIG,
            p,
        );
        assert!(matches!(r, Ok(Some(Message::PushConfig(_)))), "{r:?}");

        // A VALID ConfigResult of paused, unnamed listener results: 2 bytes each, 56 bytes of
        // ListenerResult.
        let mut p = vec![0];
        let count = (n - 4) / 2;
        varint(count as u64, &mut p);
        for _ in 0..count {
            p.extend_from_slice(&[0, 2]);
        }
        assert!(p.len() <= n);
        let (r, _) = measure_frame("ConfigResult, paused results", kind::CONFIG_RESULT, p);
        assert!(r.is_ok());

        // A small frame claiming a huge count: postcard refuses to hint more than the bytes
        // left, so nothing large is preallocated.
        let mut p = vec![0, 0];
        varint(u64::from(u32::MAX), &mut p);
        p.extend_from_slice(&[0; 8]);
        let (_, allocs) = measure_frame("PushConfig, 13 bytes, count 2^32-1", kind::PUSH_CONFIG, p);
        assert!(allocs.largest < 1024, "{allocs:?}");
    }
}

/// The read buffer of a `Connection` grows by doubling: after a frame of length `L`, a frame
/// of length `L' > L` makes it allocate up to `2 * (4 + L)`, not just `4 + L'`. Measured here
/// at a 64 KiB maximum; the bound is [`decode_alloc_bound`].
#[test]
fn regression_read_buffer_growth() {
    let max = 64 * 1024;
    let rt = current_thread_runtime();
    rt.block_on(async {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let mut conn = Connection::new(rx, max);
        let big = |n: usize| Message::error(ErrorCode::PROTOCOL, "x".repeat(n - 2 - 1 - 3));
        let first = big(max * 9 / 10);
        let second = big(max);
        let mut bytes = Vec::new();
        encode_onto(&first, &mut bytes);
        let second_at = encode_onto(&second, &mut bytes);
        assert_eq!(bytes.len() - second_at, 4 + max);
        tx.write_all(&bytes[..second_at + 8]).await.unwrap();
        let (got, _) = Tracked::new(conn.read_message()).await;
        assert_eq!(got.unwrap(), Some(first));
        tx.write_all(&bytes[second_at + 8..]).await.unwrap();
        let (got, allocs) = Tracked::new(conn.read_message()).await;
        assert_eq!(got.unwrap(), Some(second));
        eprintln!(
            "read buffer growth at max_frame {max}: largest allocation {} = {:.2} x (4 + \
             max_frame)",
            allocs.largest,
            allocs.largest as f64 / (4 + max) as f64
        );
        assert!(allocs.largest <= decode_alloc_bound(max).max(message_alloc_bound(max).0));
    });
}

// ------------------------------------------------------------------------------------------
// (g) A shared port's first bytes (the stable form of fuzz/fuzz_targets/peek.rs, issue 18):
//     the route parser on TLS ClientHellos (real ones from rustls, mutated and cut) and HTTP/1
//     request heads (hostile bytes behind a request line).
// ------------------------------------------------------------------------------------------

/// The verdict's invariants: a found name is normalized and non-empty; 16 KiB or more is never
/// "need more" (the peek is bounded).
fn check_peeked(bytes: &[u8]) -> Result<sallyport::peek::Peeked, TestCaseError> {
    use sallyport::peek::{classify, normalize, Peeked, PEEK_LIMIT};
    let verdict = classify(bytes);
    if let Peeked::Named(name) = &verdict {
        prop_assert!(!name.is_empty());
        prop_assert_eq!(&normalize(name), name);
    }
    if bytes.len() >= PEEK_LIMIT {
        prop_assert_ne!(&verdict, &Peeked::NeedMore);
    }
    Ok(verdict)
}

#[test]
fn client_hellos_cut_and_mutated_never_panic_nor_name_another_host() {
    use sallyport::peek::{client_hello, Peeked};
    let name = "[a-z]{1,12}(\\.[a-z][a-z0-9]{0,3}-?[a-z0-9]{1,5}){0,3}";
    let strategy = (
        name,
        any::<Index>(),
        vec((any::<Index>(), any::<u8>()), 0..4),
    );
    run_property("client hellos", 2048, strategy, |(name, cut, flips)| {
        let hello = client_hello(&name).expect("a DNS name is a valid SNI");
        prop_assert_eq!(check_peeked(&hello)?, Peeked::Named(name.clone()));
        // A cut hello is never taken for another host's.
        let cut = cut.index(hello.len());
        match check_peeked(&hello[..cut])? {
            Peeked::NeedMore | Peeked::Garbage(_) => {}
            other => prop_assert!(false, "cut at {}: {:?}", cut, other),
        }
        let mut mutated = hello.clone();
        for (at, byte) in flips {
            let at = at.index(mutated.len());
            mutated[at] = byte;
        }
        check_peeked(&mutated)?;
        Ok(())
    });
}

#[test]
fn request_heads_with_hostile_bytes_never_panic() {
    let line = prop_oneof![
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(b"\x16\x03\x01".to_vec()),
        Just(Vec::new()),
    ];
    let tail = vec(
        prop_oneof![
            4 => proptest::sample::select(b"Host: \r\n:.-[]*0123456789abcXYZ \t".to_vec()),
            1 => any::<u8>(),
        ],
        0..200,
    );
    let long = prop_oneof![9 => Just(0usize), 1 => 16_000usize..17_000];
    run_property(
        "request heads",
        4096,
        (line, tail, long),
        |(line, tail, long)| {
            let mut bytes = line;
            bytes.extend_from_slice(&tail);
            bytes.resize(bytes.len().max(long), b'a');
            check_peeked(&bytes)?;
            Ok(())
        },
    );
}
