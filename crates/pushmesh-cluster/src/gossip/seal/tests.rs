use super::*;

const KEY: [u8; 32] = [7; 32];
const NOW: u64 = 1_800_000_000_000;

fn sealed(sealer: &mut Sealer, at: u64, text: &[u8]) -> Vec<u8> {
    sealer
        .seal(at, text)
        .unwrap_or_else(|e| panic!("seal failed: {e}"))
}

#[test]
fn round_trip() {
    let mut s = Sealer::new(&KEY, 42);
    let mut o = Opener::new(&KEY);
    let d = sealed(&mut s, NOW, b"hello gossip");
    assert_eq!(d.len(), b"hello gossip".len() + OVERHEAD);
    let h = parse_header(&d).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((h.sender, h.timestamp_ms, h.counter), (42, NOW, 1));
    assert_eq!(o.open(NOW, &d), Ok(b"hello gossip".to_vec()));
    let empty = sealed(&mut s, NOW, b"");
    assert_eq!(o.open(NOW + 5, &empty), Ok(Vec::new()));
    // The plaintext does not appear in the datagram.
    let d = sealed(&mut s, NOW, b"a recognisable plaintext");
    assert!(!d
        .windows(b"recognisable".len())
        .any(|w| w == b"recognisable"));
}

#[test]
fn wrong_key_is_rejected() {
    let mut s = Sealer::new(&[8; 32], 1);
    let mut o = Opener::new(&KEY);
    let d = sealed(&mut s, NOW, b"from another cluster");
    assert_eq!(o.open(NOW, &d), Err(OpenError::Auth));
    assert_eq!(o.senders(), 0, "a rejected datagram leaves no state");
}

#[test]
fn tampering_anywhere_is_rejected() {
    let mut s = Sealer::new(&KEY, 1);
    let d = sealed(&mut s, NOW, b"payload of some length");
    for i in 0..d.len() {
        let mut t = d.clone();
        t[i] ^= 0x01;
        let mut o = Opener::new(&KEY);
        let r = o.open(NOW, &t);
        assert!(
            matches!(r, Err(OpenError::Auth) | Err(OpenError::Version(_))),
            "byte {i} flipped: {r:?}"
        );
    }
    let mut o = Opener::new(&KEY);
    assert_eq!(o.open(NOW, &d[..d.len() - 1]), Err(OpenError::Auth));
    assert_eq!(o.open(NOW, &d[..OVERHEAD - 1]), Err(OpenError::Short));
    assert_eq!(o.open(NOW, &[]), Err(OpenError::Short));
    assert!(
        o.open(NOW, &d).is_ok(),
        "the untouched datagram still opens"
    );
}

#[test]
fn replayed_datagram_is_rejected() {
    let mut s = Sealer::new(&KEY, 9);
    let mut o = Opener::new(&KEY);
    let d1 = sealed(&mut s, NOW, b"one");
    let d2 = sealed(&mut s, NOW, b"two");
    let d3 = sealed(&mut s, NOW, b"three");
    assert!(o.open(NOW, &d1).is_ok());
    assert_eq!(o.open(NOW, &d1), Err(OpenError::Replay));
    // Out of order within the window is fine, once.
    assert!(o.open(NOW, &d3).is_ok());
    assert!(o.open(NOW, &d2).is_ok());
    assert_eq!(o.open(NOW, &d2), Err(OpenError::Replay));
    assert_eq!(o.open(NOW, &d3), Err(OpenError::Replay));
}

#[test]
fn counters_below_the_window_are_rejected() {
    let mut s = Sealer::new(&KEY, 9);
    let mut o = Opener::new(&KEY);
    let first = sealed(&mut s, NOW, b"first");
    let mut last = Vec::new();
    for _ in 0..REPLAY_WINDOW {
        last = sealed(&mut s, NOW, b"x");
    }
    assert!(o.open(NOW, &last).is_ok());
    // Never seen, but REPLAY_WINDOW behind the highest counter.
    assert_eq!(o.open(NOW, &first), Err(OpenError::Replay));
}

#[test]
fn senders_have_separate_windows() {
    let mut a = Sealer::new(&KEY, 1);
    let mut b = Sealer::new(&KEY, 2);
    let mut o = Opener::new(&KEY);
    assert!(o.open(NOW, &sealed(&mut a, NOW, b"a1")).is_ok());
    // b's counter 1 is not a's counter 1.
    assert!(o.open(NOW, &sealed(&mut b, NOW, b"b1")).is_ok());
    assert_eq!(o.senders(), 2);
}

#[test]
fn too_old_or_too_new_timestamps_are_rejected() {
    let mut s = Sealer::new(&KEY, 3);
    let mut o = Opener::new(&KEY);
    let old = sealed(&mut s, NOW - MAX_SKEW_MS - 1, b"old");
    assert_eq!(
        o.open(NOW, &old),
        Err(OpenError::TooOld {
            age_ms: MAX_SKEW_MS + 1
        })
    );
    let new = sealed(&mut s, NOW + MAX_SKEW_MS + 1, b"new");
    assert_eq!(
        o.open(NOW, &new),
        Err(OpenError::TooNew {
            ahead_ms: MAX_SKEW_MS + 1
        })
    );
    let edge = sealed(&mut s, NOW - MAX_SKEW_MS, b"just in time");
    assert!(o.open(NOW, &edge).is_ok());
}

#[test]
fn a_replay_after_the_window_is_forgotten_is_still_too_old() {
    let mut s = Sealer::new(&KEY, 4);
    let mut other = Sealer::new(&KEY, 5);
    let mut o = Opener::new(&KEY);
    let d = sealed(&mut s, NOW, b"captured");
    assert!(o.open(NOW, &d).is_ok());
    let later = NOW + MAX_SKEW_MS + 1;
    // A new sender makes the opener drop windows that can no longer matter.
    assert!(o.open(later, &sealed(&mut other, later, b"new")).is_ok());
    assert_eq!(o.senders(), 1, "the old sender's window was dropped");
    assert!(matches!(o.open(later, &d), Err(OpenError::TooOld { .. })));
}

#[test]
fn size_is_bounded_by_the_udp_limit() {
    let mut s = Sealer::new(&KEY, 6);
    let mut o = Opener::new(&KEY);
    let biggest = vec![0xAB; MAX_PLAINTEXT];
    let d = sealed(&mut s, NOW, &biggest);
    assert_eq!(d.len(), MAX_DATAGRAM);
    assert_eq!(o.open(NOW, &d), Ok(biggest));
    assert_eq!(
        s.seal(NOW, &vec![0; MAX_PLAINTEXT + 1]),
        Err(SealError::TooLarge {
            len: MAX_DATAGRAM + 1
        })
    );
    // chitchat's (patched) budget for one envelope fits once sealed.
    let budget = vec![1; chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE];
    assert!(sealed(&mut s, NOW, &budget).len() <= MAX_DATAGRAM);
}

#[test]
fn other_versions_are_rejected() {
    let mut s = Sealer::new(&KEY, 7);
    let mut d = sealed(&mut s, NOW, b"v");
    d[0] = 1;
    assert_eq!(Opener::new(&KEY).open(NOW, &d), Err(OpenError::Version(1)));
}
