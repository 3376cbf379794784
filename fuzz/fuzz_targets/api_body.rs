//! HTTP API bodies: `POST /apps/{id}/events` and `/batch_events`, their
//! `data` turned into event data, their `info` parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushmesh_protocol::api::{BatchRequest, InfoFlags, TriggerRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = serde_json::from_slice::<TriggerRequest>(data) {
        let _ = InfoFlags::parse(t.info.as_deref()).any();
        let _ = t.data.into_string();
    }
    if let Ok(b) = serde_json::from_slice::<BatchRequest>(data) {
        for e in b.batch {
            let _ = InfoFlags::parse(e.info.as_deref());
            let _ = e.data.into_string();
        }
    }
});
