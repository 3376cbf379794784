//! A wsify command (`/ws`) as a WebSocket text message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushmesh_protocol::wsify::WsifyCommand;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = WsifyCommand::parse(text) {
        let _ = (c.name(), c.channel());
    }
});
