//! The cost of compressing one publish: `deflate_message` on realistic
//! ~2.6 KB Pusher event frames (a JSON order with a dozen line items, as
//! `pushmesh-bench --json-order` publishes), at levels 1, 6 and 9.
//!
//! `cargo run --release -p pushmesh-protocol --example deflate_cost`

use std::time::Instant;

use pushmesh_protocol::wire::deflate_message;

fn event(seq: u64) -> String {
    let items: Vec<String> = (0..12u64)
        .map(|i| {
            let k = seq.wrapping_mul(31).wrapping_add(i * 7919);
            format!(
                r#"{{"sku":"SKU-{:06}","name":"Item {} of the spring catalogue, size {}","qty":{},"unit_price_cents":{},"currency":"EUR","warehouse":"eu-west-{}","gift_wrap":{}}}"#,
                k % 1_000_000,
                k % 997,
                ["S", "M", "L", "XL"][(k % 4) as usize],
                1 + k % 5,
                499 + k % 20_000,
                1 + k % 3,
                k.is_multiple_of(7)
            )
        })
        .collect();
    let data = format!(
        r#"{{"seq":{seq},"ts":1,"order":{{"order_id":"ord_{:012x}","status":"confirmed","customer":{{"id":"cus_{}","email":"customer{}@example.com","tier":"gold"}},"shipping":{{"method":"express","address":{{"city":"Lyon","postcode":"69002","country":"FR"}}}},"items":[{}],"total_cents":{}}}}}"#,
        seq.wrapping_mul(0x9e37_79b9),
        seq % 10_000,
        seq % 10_000,
        items.join(","),
        10_000 + seq % 90_000
    );
    let escaped = data.replace('"', "\\\"");
    format!(r#"{{"event":"bench","channel":"bench-abc-0","data":"{escaped}"}}"#)
}

fn main() {
    let events: Vec<String> = (0..1000).map(event).collect();
    let n = 20_000;
    for level in [1u32, 6, 9] {
        let (mut plain, mut compressed) = (0usize, 0usize);
        let t = Instant::now();
        for i in 0..n {
            let e = events[i % events.len()].as_bytes();
            let z = deflate_message(e, level).unwrap_or_default();
            plain += e.len();
            compressed += z.len();
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "level {level}: {us:.1} µs per message, {} -> {} bytes ({:.1} %)",
            plain / n,
            compressed / n,
            100.0 * compressed as f64 / plain as f64
        );
    }
}
