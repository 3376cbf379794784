//! Deterministic N-node simulation of the cluster protocol in virtual time:
//! nodes exchange peer frames over ordered links (as QUIC streams are);
//! deliveries across links interleave in random order; links are cut
//! (in-flight frames lost) and healed; nodes restart with a new epoch.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use pushmesh_protocol::sign;
use pushmesh_protocol::Limits;
use serde_json::Value;

use crate::cluster::PeerFrame;
use crate::{AppConfig, AppIdx, ConnId, Core, CoreConfig, NodeId, Output, PublishRequest};

const KEY: &str = "key";
const SECRET: &str = "secret";
const NODES: usize = 3;
const CHANNELS: [&str; 3] = ["news", "cache-c", "private-p"];
const PRESENCE: [&str; 2] = ["presence-a", "presence-b"];

fn app() -> AppConfig {
    AppConfig {
        id: "1".into(),
        key: KEY.into(),
        secret: SECRET.into(),
        enabled: true,
        client_events: true,
        user_authentication_required: false,
        max_connections: None,
        subscription_count_events: false,
        limits: Limits::default(),
        webhooks: true,
        wsify_event: "broadcast".into(),
    }
}

fn node_name(i: usize) -> NodeId {
    NodeId::new(&format!("node-{i}"))
}

struct SimNode {
    core: Core,
    epoch: u64,
    /// Connection -> every frame it received.
    inbox: BTreeMap<u64, Vec<Value>>,
    conns: Vec<ConnId>,
    next_conn: u64,
}

fn new_core(i: usize, epoch: u64) -> Core {
    Core::new(CoreConfig {
        apps: vec![app()],
        activity_timeout_secs: 120,
        max_connections: None,
        socket_prefix: 100 + i as u32,
        node_id: node_name(i).to_string(),
        epoch,
    })
}

struct Net {
    nodes: Vec<SimNode>,
    /// Directed links that are up, each an ordered queue of frames in flight.
    links: BTreeMap<(usize, usize), VecDeque<Bytes>>,
    now: Instant,
    /// Data frames delivered to a node with no local subscriber (must stay 0).
    misrouted: usize,
    data_frames: usize,
    rng: u64,
}

impl Net {
    fn new() -> Self {
        let nodes = (0..NODES)
            .map(|i| SimNode {
                core: new_core(i, 1),
                epoch: 1,
                inbox: BTreeMap::new(),
                conns: Vec::new(),
                next_conn: 1,
            })
            .collect();
        let mut n = Self {
            nodes,
            links: BTreeMap::new(),
            now: Instant::now(),
            misrouted: 0,
            data_frames: 0,
            rng: 7,
        };
        for i in 0..NODES {
            for j in (i + 1)..NODES {
                n.connect(i, j);
            }
        }
        n
    }

    fn rand(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }

    fn index_of(id: &NodeId) -> usize {
        id.as_str()
            .trim_start_matches("node-")
            .parse()
            .unwrap_or(usize::MAX)
    }

    fn pump(&mut self, i: usize) {
        while let Some(o) = self.nodes[i].core.poll_output() {
            match o {
                Output::Send { conn, frame } => {
                    let v: Value = serde_json::from_slice(&frame).unwrap_or(Value::Null);
                    self.nodes[i].inbox.entry(conn.0).or_default().push(v);
                }
                Output::Peer { to, frame, .. } => {
                    let j = Self::index_of(&to);
                    if let Some(q) = self.links.get_mut(&(i, j)) {
                        q.push_back(frame);
                    }
                }
                Output::Close { .. } | Output::Hook { .. } | Output::HookReleased { .. } => {}
            }
        }
    }

    fn connect(&mut self, i: usize, j: usize) {
        if self.links.contains_key(&(i, j)) {
            return;
        }
        self.links.insert((i, j), VecDeque::new());
        self.links.insert((j, i), VecDeque::new());
        let (ei, ej) = (self.nodes[i].epoch, self.nodes[j].epoch);
        let now = self.now;
        self.nodes[i].core.peer_up(now, node_name(j), ej);
        self.nodes[j].core.peer_up(now, node_name(i), ei);
        self.pump(i);
        self.pump(j);
    }

    fn cut(&mut self, i: usize, j: usize) {
        if self.links.remove(&(i, j)).is_none() {
            return;
        }
        self.links.remove(&(j, i));
        let now = self.now;
        self.nodes[i].core.peer_down(now, &node_name(j));
        self.nodes[j].core.peer_down(now, &node_name(i));
        self.pump(i);
        self.pump(j);
    }

    fn restart(&mut self, i: usize) {
        for j in 0..NODES {
            if j != i {
                self.cut(i, j);
            }
        }
        let epoch = self.nodes[i].epoch + 1;
        self.nodes[i] = SimNode {
            core: new_core(i, epoch),
            epoch,
            inbox: BTreeMap::new(),
            conns: Vec::new(),
            next_conn: 1,
        };
        for j in 0..NODES {
            if j != i {
                self.connect(i, j);
            }
        }
    }

    /// Delivers every frame in flight, picking links at random.
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            let busy: Vec<(usize, usize)> = self
                .links
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| *k)
                .collect();
            if busy.is_empty() {
                return;
            }
            let (from, to) = busy[self.rand(busy.len())];
            let Some(frame) = self
                .links
                .get_mut(&(from, to))
                .and_then(VecDeque::pop_front)
            else {
                continue;
            };
            if let Ok(PeerFrame::Publish { channel, .. }) = PeerFrame::decode(&frame) {
                self.data_frames += 1;
                if self.nodes[to]
                    .core
                    .local_subscriber_count(AppIdx(0), &channel)
                    == 0
                {
                    self.misrouted += 1;
                }
            }
            let now = self.now;
            let r = self.nodes[to]
                .core
                .handle_peer_frame(now, &node_name(from), &frame);
            assert!(r.is_ok());
            self.pump(to);
        }
        panic!("network did not settle");
    }

    fn open(&mut self, i: usize) -> ConnId {
        let n = &mut self.nodes[i];
        let c = ConnId(n.next_conn);
        n.next_conn += 1;
        let now = self.now;
        assert!(n.core.open(now, AppIdx(0), c).is_ok());
        n.conns.push(c);
        self.pump(i);
        c
    }

    fn frame(&mut self, i: usize, c: ConnId, v: Value) {
        let now = self.now;
        self.nodes[i].core.handle_frame(now, c, &v.to_string());
        self.pump(i);
    }

    fn socket(i: usize, c: ConnId) -> String {
        format!("{}.{}", 100 + i, c.0)
    }

    fn subscribe(&mut self, i: usize, c: ConnId, channel: &str) {
        let auth = format!(
            "{KEY}:{}",
            sign::sign(SECRET, &sign::channel_string(&Self::socket(i, c), channel))
        );
        self.frame(
            i,
            c,
            serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}),
        );
    }

    fn join(&mut self, i: usize, c: ConnId, channel: &str, user: &str) {
        let data = serde_json::json!({"user_id": user}).to_string();
        let sig = sign::sign(
            SECRET,
            &sign::presence_string(&Self::socket(i, c), channel, &data),
        );
        self.frame(i, c, serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":format!("{KEY}:{sig}"),"channel_data":data}}));
    }

    fn received(&self, i: usize, c: ConnId, event: &str) -> usize {
        self.nodes[i]
            .inbox
            .get(&c.0)
            .map_or(0, |v| v.iter().filter(|f| f["event"] == event).count())
    }
}

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
                    seq += 1;
                    let event = format!("ev{seq}");
                    let channel = if ch < CHANNELS.len() { CHANNELS[ch] } else { PRESENCE[ch - CHANNELS.len()] };
                    let now = net.now;
                    let channels = vec![channel.to_string()];
                    let r = net.nodes[from].core.publish(now, AppIdx(0), &PublishRequest { name: &event, data: "{}", channels: &channels, exclude_socket: None });
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
        net.settle();
        prop_assert_eq!(net.misrouted, 0, "data frames to nodes without interest");
        // Presence: every node's view equals the members on itself and the nodes linked to it.
        for p in PRESENCE {
            for i in 0..NODES {
                let mut want = BTreeSet::new();
                for ((n, c), set) in &subs {
                    if set.contains(p) && (*n == i || net.links.contains_key(&(i, *n))) {
                        // The user of that membership: the model does not keep it; ask the owning node.
                        let _ = c;
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
    let now = net.now;
    let channels = vec!["news".to_string()];
    assert!(net.nodes[2]
        .core
        .publish(
            now,
            AppIdx(0),
            &PublishRequest {
                name: "e",
                data: "1",
                channels: &channels,
                exclude_socket: None
            }
        )
        .is_ok());
    net.pump(2);
    net.settle();
    assert_eq!(net.data_frames - before, 1);
    assert_eq!(net.received(0, a, "e"), 1);
    // Node 1 dies: bob is removed on node 0, once.
    net.cut(1, 0);
    net.cut(1, 2);
    net.settle();
    assert_eq!(net.received(0, ua, "pusher_internal:member_removed"), 1);
    let users = net.nodes[0]
        .core
        .channel_users(AppIdx(0), "presence-a")
        .unwrap_or_default();
    assert_eq!(users, vec!["alice".to_string()]);
    // Healing brings bob back with one member_added.
    net.connect(1, 0);
    net.settle();
    assert_eq!(net.received(0, ua, "pusher_internal:member_added"), 2);
    // socket_id exclusion across nodes: a publish on node 2 excluding node 0's socket.
    let socket = Net::socket(0, a);
    let now = net.now;
    assert!(net.nodes[2]
        .core
        .publish(
            now,
            AppIdx(0),
            &PublishRequest {
                name: "x",
                data: "1",
                channels: &channels,
                exclude_socket: Some(&socket)
            }
        )
        .is_ok());
    net.pump(2);
    net.settle();
    assert_eq!(net.received(0, a, "x"), 0);
    // Cluster-wide channel info from a node without subscribers.
    let info = net.nodes[2]
        .core
        .channel(now, AppIdx(0), "news", false)
        .unwrap_or_default();
    assert!(info.occupied);
}

#[test]
fn cache_users_terminate_and_watchlists_span_nodes() {
    let mut net = Net::new();
    let now = net.now;
    // Cache: published on node 2 with no subscriber anywhere, found from node 0.
    let channels = vec!["cache-c".to_string()];
    assert!(net.nodes[2]
        .core
        .publish(
            now,
            AppIdx(0),
            &PublishRequest {
                name: "last",
                data: "7",
                channels: &channels,
                exclude_socket: None
            }
        )
        .is_ok());
    net.pump(2);
    net.settle();
    let late = net.open(0);
    net.subscribe(0, late, "cache-c");
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
    let to_user = vec!["#server-to-user-v".to_string()];
    assert!(net.nodes[0]
        .core
        .publish(
            now,
            AppIdx(0),
            &PublishRequest {
                name: "hi",
                data: "{}",
                channels: &to_user,
                exclude_socket: None
            }
        )
        .is_ok());
    net.pump(0);
    net.settle();
    assert_eq!(net.received(2, v, "hi"), 1);
}

#[test]
fn a_sync_of_100k_channels_is_one_frame_and_applies() {
    let mut net = Net::new();
    let c = net.open(0);
    for k in 0..100_000 {
        net.nodes[0].core.handle_frame(
            net.now,
            c,
            &format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"ch-{k}"}}}}"#),
        );
    }
    // Drop the 100k subscription_succeeded frames and the deltas in flight.
    net.pump(0);
    net.settle();
    assert_eq!(
        net.nodes[1]
            .core
            .channels(net.now, AppIdx(0), None, false)
            .map(|v| v.len())
            .unwrap_or(0),
        100_000
    );
    // A fresh link carries everything in one Sync frame.
    net.cut(0, 1);
    net.connect(0, 1);
    let frames = net.links.get(&(0, 1)).map_or(0, VecDeque::len);
    assert_eq!(frames, 1, "one sync frame");
    let bytes = net
        .links
        .get(&(0, 1))
        .and_then(|q| q.front())
        .map_or(0, |f| f.len());
    assert!(
        bytes < 4 * 1024 * 1024,
        "sync of 100k channels is {bytes} bytes"
    );
    net.settle();
    assert_eq!(
        net.nodes[1]
            .core
            .channels(net.now, AppIdx(0), None, false)
            .map(|v| v.len())
            .unwrap_or(0),
        100_000
    );
}
