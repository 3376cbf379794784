//! Scenarios on the simulated network: routing only where interested,
//! presence across nodes and false deaths, cache, users and watchlists, a
//! large sync, and a property over random operations in the steady state.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proptest::prelude::*;
use pushmesh_protocol::sign;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Open(usize),
    Sub(usize, usize, usize),
    Unsub(usize, usize, usize),
    Join(usize, usize, usize, usize),
    Disconnect(usize, usize),
    Cut(usize, usize),
    Heal(usize, usize),
    Restart(usize),
    Publish(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NODES;
    prop_oneof![
        3 => n.clone().prop_map(Op::Open),
        4 => (n.clone(), 0..6usize, 0..CHANNELS.len()).prop_map(|(i, c, ch)| Op::Sub(i, c, ch)),
        2 => (n.clone(), 0..6usize, 0..CHANNELS.len()).prop_map(|(i, c, ch)| Op::Unsub(i, c, ch)),
        3 => (n.clone(), 0..6usize, 0..PRESENCE.len(), 0..4usize).prop_map(|(i, c, ch, u)| Op::Join(i, c, ch, u)),
        1 => (n.clone(), 0..6usize).prop_map(|(i, c)| Op::Disconnect(i, c)),
        1 => (n.clone(), n.clone()).prop_map(|(i, j)| Op::Cut(i, j)),
        2 => (n.clone(), n.clone()).prop_map(|(i, j)| Op::Heal(i, j)),
        1 => n.clone().prop_map(Op::Restart),
        4 => (n.clone(), 0..(CHANNELS.len() + PRESENCE.len())).prop_map(|(i, ch)| Op::Publish(i, ch)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever the interleaving, partitions and restarts: once the network
    /// has settled, a publish reaches every subscriber of every node the
    /// publisher is linked to exactly once, nobody else, and no data frame
    /// goes to a node without a subscriber; presence member lists agree
    /// among linked nodes.
    #[test]
    fn cluster_delivers_exactly_once_and_only_where_interested(ops in proptest::collection::vec(op(), 1..60)) {
        let mut net = Net::new();
        // (node, conn) -> channels, as the model sees them.
        let mut subs: BTreeMap<(usize, u64), BTreeSet<&'static str>> = BTreeMap::new();
        let mut seq = 0;
        for op in ops {
            match op {
                Op::Open(i) => { let c = net.open(i); subs.insert((i, c.0), BTreeSet::new()); }
                Op::Sub(i, c, ch) if c < net.nodes[i].conns.len() => {
                    let conn = net.nodes[i].conns[c];
                    net.subscribe(i, conn, CHANNELS[ch]);
                    subs.entry((i, conn.0)).or_default().insert(CHANNELS[ch]);
                }
                Op::Unsub(i, c, ch) if c < net.nodes[i].conns.len() => {
                    let conn = net.nodes[i].conns[c];
                    net.frame(i, conn, serde_json::json!({"event":"pusher:unsubscribe","data":{"channel":CHANNELS[ch]}}));
                    subs.entry((i, conn.0)).or_default().remove(CHANNELS[ch]);
                }
                Op::Join(i, c, ch, u) if c < net.nodes[i].conns.len() => {
                    let conn = net.nodes[i].conns[c];
                    let set = subs.entry((i, conn.0)).or_default();
                    if !set.contains(PRESENCE[ch]) {
                        net.join(i, conn, PRESENCE[ch], &format!("u{u}"));
                        set.insert(PRESENCE[ch]);
                    }
                }
                Op::Disconnect(i, c) if c < net.nodes[i].conns.len() => {
                    let conn = net.nodes[i].conns.remove(c);
                    let now = net.now;
                    net.nodes[i].core.disconnect(now, conn);
                    net.pump(i);
                    subs.remove(&(i, conn.0));
                }
                Op::Cut(i, j) if i != j => net.cut(i, j),
                Op::Heal(i, j) if i != j => net.connect(i, j),
                Op::Restart(i) => {
                    net.restart(i);
                    subs.retain(|(n, _), _| *n != i);
                }
                Op::Publish(from, ch) => {
                    net.settle();
                    // Parked presence joins (owner claims, at most 1 s) and
                    // held subscriptions (barrier, at most 1 s) are decided.
                    for _ in 0..10 {
                        net.tick();
                        net.settle();
                    }
                    seq += 1;
                    let event = format!("ev{seq}");
                    let channel = if ch < CHANNELS.len() { CHANNELS[ch] } else { PRESENCE[ch - CHANNELS.len()] };
                    let channels = vec![channel.to_string()];
                    let r = net.publish(from, &PublishRequest { name: &event, data: "{}", channels: &channels, exclude_socket: None }, None);
                    prop_assert!(r.is_ok());
                    net.pump(from);
                    net.settle();
                    for ((i, c), set) in &subs {
                        let reachable = *i == from || net.links.contains_key(&(from, *i));
                        let expected = usize::from(reachable && set.contains(channel));
                        let got = net.received(*i, ConnId(*c), &event);
                        prop_assert_eq!(got, expected, "node {} conn {} channel {}", i, c, channel);
                    }
                }
                _ => {}
            }
        }
        net.heal_all();
        // (Data frames held across a cut may reach a node whose subscriber
        // left meanwhile; routing only to interested nodes is checked in
        // the steady state by `uninterested_node_gets_no_data_frames...`.)
        // Presence, once healed: every node's view is the members on every node.
        for p in PRESENCE {
            for i in 0..NODES {
                let mut want = BTreeSet::new();
                for ((n, _), set) in &subs {
                    if set.contains(p) {
                        want.extend(net.nodes[*n].core.local_members(AppIdx(0), p));
                    }
                }
                let got: BTreeSet<String> = net.nodes[i].core.channel_users(AppIdx(0), p).unwrap_or_default().into_iter().collect();
                prop_assert_eq!(got, want, "presence {} seen from node {}", p, i);
            }
        }
    }
}

#[test]
fn uninterested_node_gets_no_data_frames_and_presence_spans_nodes() {
    let mut net = Net::new();
    let a = net.open(0);
    net.subscribe(0, a, "news");
    let ua = net.open(0);
    net.join(0, ua, "presence-a", "alice");
    let ub = net.open(1);
    net.join(1, ub, "presence-a", "bob");
    net.settle();
    // Node 1 sees both members; alice (node 0) got member_added for bob.
    let users: BTreeSet<String> = net.nodes[1]
        .core
        .channel_users(AppIdx(0), "presence-a")
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(
        users,
        ["alice".to_string(), "bob".to_string()]
            .into_iter()
            .collect()
    );
    assert_eq!(net.received(0, ua, "pusher_internal:member_added"), 1);
    // Publish on node 2 to "news": only node 0 gets a data frame.
    let before = net.data_frames;
    net.publish_settled(2, "news", "e", "1", None);
    assert_eq!(net.data_frames - before, 1);
    assert_eq!(net.received(0, a, "e"), 1);
    // socket_id exclusion across nodes: a publish on node 2 excluding node 0's socket.
    let socket = Net::socket(0, a);
    let now = net.now;
    net.publish_settled(2, "news", "x", "1", Some(&socket));
    assert_eq!(net.received(0, a, "x"), 0);
    // Cluster-wide channel info from a node without subscribers.
    let info = net.nodes[2]
        .core
        .channel(now, AppIdx(0), "news", false)
        .unwrap_or_default();
    assert!(info.occupied);
    // Node 1 is cut off: while only its links are down, bob stays (node 1
    // may come back; messages for it are held).
    net.cut(1, 0);
    net.cut(1, 2);
    net.settle();
    assert_eq!(net.received(0, ua, "pusher_internal:member_removed"), 0);
    // Declared dead: bob is removed on node 0, once.
    net.declare_dead(0, 1);
    net.declare_dead(2, 1);
    net.settle();
    assert_eq!(net.received(0, ua, "pusher_internal:member_removed"), 1);
    let users = net.nodes[0]
        .core
        .channel_users(AppIdx(0), "presence-a")
        .unwrap_or_default();
    assert_eq!(users, vec!["alice".to_string()]);
    // It was alive all along: when the links heal, node 1 learns it was
    // forgotten, and nodes 0 and 2 that they forgot a live node: all close
    // their clients (they reconnect) rather than let them miss messages
    // silently. Bob does not come back by himself.
    net.connect(1, 0);
    net.connect(1, 2);
    net.settle();
    assert_eq!(net.broken, [0, 1, 2].into_iter().collect());
    assert_eq!(net.received(0, ua, "pusher_internal:member_added"), 1);
    assert!(net.nodes[0]
        .core
        .channel_users(AppIdx(0), "presence-a")
        .unwrap_or_default()
        .iter()
        .all(|u| u != "bob"));
}

#[test]
fn cache_users_terminate_and_watchlists_span_nodes() {
    let mut net = Net::new();
    // Cache: published on node 2 with no subscriber anywhere, found from node 0.
    net.publish_settled(2, "cache-c", "last", "7", None);
    let late = net.open(0);
    net.subscribe(0, late, "cache-c");
    net.settle();
    assert_eq!(
        net.received(0, late, "last"),
        1,
        "cached event found on another node"
    );
    // Sign-in on node 1 with a watchlist; the watched user signs in on node 2.
    let signin = |net: &mut Net, i: usize, c: ConnId, data: &str| {
        let sig = sign::sign(SECRET, &sign::signin_string(&Net::socket(i, c), data));
        net.frame(i, c, serde_json::json!({"event":"pusher:signin","data":{"auth":format!("{KEY}:{sig}"),"user_data":data}}));
    };
    let watcher = net.open(1);
    signin(&mut net, 1, watcher, r#"{"id":"w","watchlist":["u"]}"#);
    let u = net.open(2);
    signin(&mut net, 2, u, r#"{"id":"u"}"#);
    net.settle();
    let online = net.nodes[1].inbox.get(&watcher.0).map_or(0, |v| {
        v.iter()
            .filter(|f| {
                f["event"] == "pusher_internal:watchlist_events"
                    && f["data"]["events"][0]["user_ids"][0] == "u"
            })
            .count()
    });
    assert_eq!(
        online, 1,
        "watcher on node 1 told that u came online on node 2"
    );
    // terminate_connections on node 0 closes u's connection on node 2.
    net.nodes[0].core.terminate_user(AppIdx(0), "u");
    net.pump(0);
    net.settle();
    let errors = net.received(2, u, "pusher:error");
    assert_eq!(errors, 1, "u got the 4009 error before its close");
    // sendToUser through node 0 reaches u's #server-to-user channel on node 2.
    let v = net.open(2);
    signin(&mut net, 2, v, r#"{"id":"v"}"#);
    net.frame(
        2,
        v,
        serde_json::json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-v"}}),
    );
    net.settle();
    net.publish_settled(0, "#server-to-user-v", "hi", "{}", None);
    assert_eq!(net.received(2, v, "hi"), 1);
}

#[test]
fn a_sync_of_100k_channels_is_streamed_in_bounded_chunks_and_applies() {
    let mut net = Net::new();
    let c = net.open(0);
    for k in 0..100_000 {
        net.nodes[0].core.handle_frame(
            net.now,
            c,
            &format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"ch-{k}"}}}}"#),
        );
    }
    net.pump(0);
    net.settle();
    let count = |net: &Net, i: usize| {
        net.nodes[i]
            .core
            .channels(net.now, AppIdx(0), None, false)
            .map(|v| v.len())
            .unwrap_or(0)
    };
    assert_eq!(count(&net, 1), 100_000);
    // A fresh link carries everything in chunks of at most SYNC_CHUNK
    // entries (the interest of 100k channels; counts are replicated on ticks).
    net.cut(0, 1);
    net.connect(0, 1);
    let frames: Vec<usize> = net
        .links
        .get(&(0, 1))
        .map(|w| w.control.iter().map(Bytes::len).collect())
        .unwrap_or_default();
    let chunks = 100_000usize.div_ceil(crate::replication::SYNC_CHUNK);
    assert_eq!(frames.len(), chunks, "sync frames");
    assert!(
        frames.iter().all(|b| *b < 1024 * 1024),
        "every chunk under 1 MiB: {:?}",
        frames.iter().max()
    );
    net.settle();
    assert_eq!(count(&net, 1), 100_000);
}
