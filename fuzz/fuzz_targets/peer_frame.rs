//! A frame from a peer node, after the link's length prefix and kind byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = pushmesh_core::PeerFrame::decode(data) {
        let _ = format!("{f:?}");
    }
});
