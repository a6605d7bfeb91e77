//! A shared port's first bytes through the route parser (issue 18): TLS ClientHellos (rustls'
//! Acceptor) and HTTP/1 request heads (httparse). No panic; the verdict on a prefix is never
//! more final than on the whole (a name found in a prefix stays the same name); a found name is
//! normalized.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport::peek::{classify, normalize, Peeked, PEEK_LIMIT};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(PEEK_LIMIT + 64)];
    let whole = classify(data);
    if let Peeked::Named(name) = &whole {
        assert_eq!(&normalize(name), name);
        assert!(!name.is_empty());
    }
    if data.len() >= PEEK_LIMIT {
        assert_ne!(whole, Peeked::NeedMore, "the peek is bounded");
    }
    // Cut anywhere: a name decided early is the name of the whole too.
    if data.len() > 1 {
        let cut = data[0] as usize % data.len();
        if let Peeked::Named(early) = classify(&data[..cut]) {
            assert_eq!(whole, Peeked::Named(early));
        }
    }
});
