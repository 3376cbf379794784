//! A Pusher client frame as a WebSocket text message: parsed, and the
//! channel names in it checked, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushmesh_protocol::client::ClientMessage;
use pushmesh_protocol::ChannelName;

fuzz_target!(|data: &[u8]| {
    // WebSocket text messages are valid UTF-8 by the time they are parsed.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = ClientMessage::parse(text) {
        let _ = format!("{m:?}");
    }
    let _ = ChannelName::parse(text);
});
