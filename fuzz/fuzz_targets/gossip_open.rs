//! The sealed gossip transport's receive path: any datagram through
//! `Opener::open`; and, so the fuzzer reaches past authentication, any
//! plaintext sealed with the right key, opened, and parsed as a chitchat
//! envelope (what a node holding the secret could send).
#![no_main]

use chitchat::ChitchatEnvelope;
use libfuzzer_sys::fuzz_target;
use pushmesh_cluster::gossip::seal::{Opener, Sealer, MAX_SKEW_MS};

const KEY: [u8; 32] = [0x42; 32];
const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut opener = Opener::new(&KEY);
    if mode & 1 == 0 {
        // Raw datagram from anyone.
        let _ = opener.open(NOW, rest);
        return;
    }
    // A sealed datagram: timestamp skew and sender from the input too.
    let skew = u64::from(mode >> 1) * (MAX_SKEW_MS / 64);
    let mut sealer = Sealer::new(&KEY, u64::from(mode));
    let Ok(d) = sealer.seal_with_nonce(NOW - skew, rest, [mode; 12]) else {
        return;
    };
    let plain = opener.open(NOW, &d);
    if skew <= MAX_SKEW_MS {
        assert_eq!(
            plain.as_deref().ok(),
            Some(rest),
            "a fresh sealed datagram opens"
        );
    } else {
        assert!(plain.is_err(), "a datagram too old never opens");
    }
    assert!(opener.open(NOW, &d).is_err(), "a replay never opens");
    let _ = ChitchatEnvelope::deserialize(&mut &rest[..]);
});
