//! The router's sharding is invisible: the same operations on a node with
//! 1, 3 or 8 shards give every connection the same frames in the same
//! order, and the per-kind counters kept by the shards match a recount.

use std::collections::BTreeMap;
use std::time::Instant;

use proptest::prelude::*;
use pushmesh_protocol::sign;
use serde_json::json;

use crate::{testing, AppConfig, ConnId, Core, Output, PublishRequest};

const CHANNELS: [&str; 6] = ["a", "b", "cache-c", "private-p", "presence-x", "presence-y"];

fn core(shards: usize) -> Core {
    let app = AppConfig {
        subscription_count_events: true,
        webhooks: true,
        ..testing::app()
    };
    Core::with_shards(
        std::time::Instant::now(),
        testing::config(vec![app], "n", 9),
        shards,
    )
}

#[derive(Debug, Clone)]
enum Op {
    Open,
    Sub(usize, usize),
    Unsub(usize, usize),
    Publish(usize),
    ClientEvent(usize, usize),
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Open),
        4 => (0..8usize, 0..CHANNELS.len()).prop_map(|(c, n)| Op::Sub(c, n)),
        2 => (0..8usize, 0..CHANNELS.len()).prop_map(|(c, n)| Op::Unsub(c, n)),
        3 => (0..CHANNELS.len()).prop_map(Op::Publish),
        1 => (0..8usize, 0..CHANNELS.len()).prop_map(|(c, n)| Op::ClientEvent(c, n)),
        1 => (0..8usize).prop_map(Op::Close),
    ]
}

/// What each connection received, and the per-kind stats.
type Seen = (
    BTreeMap<u64, Vec<String>>,
    Vec<(&'static str, usize, usize)>,
);

/// Runs `ops`; returns what each connection received and the stats.
fn run(shards: usize, ops: &[Op]) -> Seen {
    let mut c = core(shards);
    let now = Instant::now();
    let mut open: Vec<ConnId> = Vec::new();
    let mut next = 1;
    let mut inbox: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Open => {
                let id = ConnId(next);
                next += 1;
                if c.open(now, crate::AppIdx(0), id).is_ok() {
                    open.push(id);
                }
            }
            Op::Sub(i, n) | Op::Unsub(i, n) | Op::ClientEvent(i, n) if !open.is_empty() => {
                let conn = open[i % open.len()];
                let channel = CHANNELS[*n];
                let socket = c.socket_id(conn).unwrap_or_default().to_owned();
                let frame = match op {
                    Op::Sub(..) => {
                        let user = format!("u{}", conn.0 % 3);
                        let data = json!({ "user_id": user }).to_string();
                        let to_sign = if channel.starts_with("presence-") {
                            sign::presence_string(&socket, channel, &data)
                        } else {
                            sign::channel_string(&socket, channel)
                        };
                        let auth = format!("key:{}", sign::sign("secret", &to_sign));
                        json!({"event": "pusher:subscribe", "data": {
                            "channel": channel, "auth": auth, "channel_data": data }})
                    }
                    Op::Unsub(..) => {
                        json!({"event": "pusher:unsubscribe", "data": { "channel": channel }})
                    }
                    _ => json!({"event": "client-x", "channel": channel, "data": {"n": 1}}),
                };
                c.handle_frame(now, conn, &frame.to_string());
            }
            Op::Publish(n) => {
                let channels = vec![CHANNELS[*n].to_string()];
                let _ = c.publish(
                    now,
                    crate::AppIdx(0),
                    &PublishRequest {
                        name: "e",
                        data: "{}",
                        channels: &channels,
                        exclude_socket: None,
                    },
                );
            }
            Op::Close(i) if !open.is_empty() => {
                let conn = open.remove(i % open.len());
                c.disconnect(now, conn);
            }
            _ => {}
        }
        while let Some(o) = c.poll_output() {
            if let Output::Send { conn, frame } = o {
                inbox
                    .entry(conn.0)
                    .or_default()
                    .push(String::from_utf8_lossy(&frame).into_owned());
            }
        }
    }
    (inbox, c.channel_stats())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn sharding_changes_nothing_a_client_sees(ops in proptest::collection::vec(op(), 1..120)) {
        let (one, stats_one) = run(1, &ops);
        for shards in [3, 8] {
            let (many, stats_many) = run(shards, &ops);
            prop_assert_eq!(&one, &many, "frames differ with {} shards", shards);
            prop_assert_eq!(&stats_one, &stats_many);
        }
    }
}

#[test]
fn kind_counters_match_a_recount() {
    let ops: Vec<Op> = (0..6)
        .map(|_| Op::Open)
        .chain((0..6).flat_map(|c| (0..CHANNELS.len()).map(move |n| Op::Sub(c, n))))
        .chain([Op::Unsub(0, 0), Op::Close(1)])
        .collect();
    let (_, stats) = run(4, &ops);
    let by_kind: BTreeMap<_, _> = stats.iter().map(|(k, c, s)| (*k, (*c, *s))).collect();
    // 6 connections; one left "a", one closed: "a" 4, "b" 5, "cache-c" 5.
    assert_eq!(by_kind["public"], (3, 14));
    assert_eq!(by_kind["private"], (1, 5));
    assert_eq!(by_kind["presence"], (2, 10));
}
