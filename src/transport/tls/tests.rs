//! Unit tests of `transport::tls`: the session cache is bounded, single-use and counted.

use super::*;

#[test]
fn the_session_cache_is_bounded_single_use_and_counted() {
    use rustls::server::StoresServerSessions;
    let cache = SessionCache::new(3);
    for i in 0u8..10 {
        assert!(cache.put(vec![i; 32], vec![i; 100]));
    }
    let one = entry_size(&[0; 32], &[0; 100]);
    assert_eq!(
        cache.figures(),
        SessionFigures {
            entries: 3,
            bytes: 3 * one
        }
    );
    // The oldest went first.
    assert_eq!(cache.get(&[6; 32]), None);
    assert_eq!(cache.get(&[7; 32]), Some(vec![7; 100]));
    // A ticket is used once.
    assert_eq!(cache.take(&[9; 32]), Some(vec![9; 100]));
    assert_eq!(cache.take(&[9; 32]), None);
    assert_eq!(
        cache.figures(),
        SessionFigures {
            entries: 2,
            bytes: 2 * one
        }
    );
    // Replacing a value keeps one entry; many puts and takes keep the queue bounded.
    assert!(cache.put(vec![7; 32], vec![7; 10]));
    assert_eq!(cache.figures().entries, 2);
    for i in 0u16..1000 {
        let key = i.to_be_bytes().to_vec();
        cache.put(key.clone(), vec![1; 10]);
        cache.take(&key);
    }
    assert!(cache.lock().order.len() <= 6);
    assert_eq!(cache.figures().entries, 2);
    assert!(!SessionCache::new(0).put(vec![1], vec![1]));
}
