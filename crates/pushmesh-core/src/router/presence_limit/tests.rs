//! The cluster-wide presence limit between [`Core`]s linked by hand, in
//! virtual time: frames move only when the test says so, so joins on two
//! nodes at the same moment are really concurrent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pushmesh_protocol::{sign, Limits};
use serde_json::Value;

use super::CLAIM_WAIT;
use crate::{testing, AppConfig, AppIdx, ConnId, Core, NodeId, Output};

const SECRET: &str = "secret";
const LIMIT: usize = 5;

fn core(name: &str) -> Core {
    let limits = Limits {
        max_presence_members: LIMIT,
        ..Limits::default()
    };
    testing::core(
        std::time::Instant::now(),
        AppConfig {
            limits,
            ..testing::app()
        },
        name,
    )
}

struct Net {
    now: Instant,
    names: Vec<String>,
    cores: Vec<Core>,
    /// Frames in flight: (from, to, frame).
    wire: Vec<(usize, usize, bytes::Bytes)>,
    /// Per (node, conn): what the connection received.
    inbox: BTreeMap<(usize, u64), Vec<Value>>,
    next_conn: u64,
    /// Nodes whose incoming frames are dropped.
    deaf: BTreeSet<usize>,
}

impl Net {
    fn new(names: &[&str]) -> Self {
        let mut n = Self {
            now: Instant::now(),
            names: names.iter().map(|s| s.to_string()).collect(),
            cores: names.iter().map(|s| core(s)).collect(),
            wire: Vec::new(),
            inbox: BTreeMap::new(),
            next_conn: 1,
            deaf: BTreeSet::new(),
        };
        for i in 0..names.len() {
            for other in names.iter().filter(|o| **o != names[i]) {
                n.cores[i].peer_up(n.now, NodeId::new(other), 1);
            }
        }
        n.run();
        n
    }

    /// Takes every node's outputs; frames go on the wire.
    fn collect(&mut self) {
        for i in 0..self.cores.len() {
            while let Some(o) = self.cores[i].poll_output() {
                match o {
                    Output::Send { conn, frame } => {
                        let v: Value = serde_json::from_slice(&frame).unwrap_or(Value::Null);
                        self.inbox.entry((i, conn.0)).or_default().push(v);
                    }
                    Output::Peer { to, frame, .. } => {
                        if let Some(j) = self.names.iter().position(|n| n == to.as_str()) {
                            self.wire.push((i, j, frame));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Delivers what is on the wire until nothing moves.
    fn run(&mut self) {
        loop {
            self.collect();
            if self.wire.is_empty() {
                return;
            }
            for (i, j, frame) in std::mem::take(&mut self.wire) {
                if self.deaf.contains(&j) {
                    continue;
                }
                let from = NodeId::new(&self.names[i]);
                let now = self.now;
                let _ = self.cores[j].handle_peer_frame(now, &from, &frame);
            }
        }
    }

    fn open(&mut self, node: usize) -> ConnId {
        let c = ConnId(self.next_conn);
        self.next_conn += 1;
        let now = self.now;
        self.cores[node]
            .open(now, AppIdx(0), c)
            .unwrap_or_else(|e| panic!("{e:?}"));
        c
    }

    /// Sends a join of `user` on `conn` (not delivered further: call `run`).
    fn join(&mut self, node: usize, conn: ConnId, channel: &str, user: &str) {
        let data = serde_json::json!({ "user_id": user }).to_string();
        let socket = format!("1.{}", conn.0);
        let sig = sign::sign(SECRET, &sign::presence_string(&socket, channel, &data));
        let frame = serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":format!("key:{sig}"),"channel_data":data}});
        let now = self.now;
        self.cores[node].handle_frame(now, conn, &frame.to_string());
        self.collect();
    }

    /// A join whose subscribe frame carries a filter.
    fn join_filtered(
        &mut self,
        node: usize,
        conn: ConnId,
        channel: &str,
        user: &str,
        filter: Value,
    ) {
        let data = serde_json::json!({ "user_id": user }).to_string();
        let socket = format!("1.{}", conn.0);
        let sig = sign::sign(SECRET, &sign::presence_string(&socket, channel, &data));
        let frame = serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":format!("key:{sig}"),"channel_data":data,"filter":filter}});
        let now = self.now;
        self.cores[node].handle_frame(now, conn, &frame.to_string());
        self.collect();
    }

    /// A publish through `node` tagged with `tags` (JSON), delivered.
    fn publish_with_tags(&mut self, node: usize, channel: &str, name: &str, tags: &str) {
        let channels = vec![channel.to_string()];
        let tags = crate::filter::Tags::parse_json(tags).unwrap_or_else(|e| panic!("{e}"));
        let now = self.now;
        let r = self.cores[node].publish_with(
            now,
            AppIdx(0),
            &crate::PublishRequest {
                name,
                data: "{}",
                channels: &channels,
                exclude_socket: None,
            },
            Some(&tags),
        );
        assert!(r.is_ok(), "{r:?}");
        self.run();
    }

    /// The events named `name` a connection received.
    fn got(&self, node: usize, conn: ConnId, name: &str) -> usize {
        self.inbox
            .get(&(node, conn.0))
            .map_or(0, |v| v.iter().filter(|f| f["event"] == name).count())
    }

    fn leave(&mut self, node: usize, conn: ConnId, channel: &str) {
        let frame = serde_json::json!({"event":"pusher:unsubscribe","data":{"channel":channel}});
        let now = self.now;
        self.cores[node].handle_frame(now, conn, &frame.to_string());
        self.collect();
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        for c in &mut self.cores {
            c.tick(now);
        }
        self.collect();
    }

    /// The answer a connection got: Some(true) admitted, Some(false) refused.
    fn answer(&self, node: usize, conn: ConnId) -> Option<bool> {
        let got = self.inbox.get(&(node, conn.0))?;
        got.iter().find_map(|v| match v["event"].as_str() {
            Some("pusher_internal:subscription_succeeded") => Some(true),
            Some("pusher:subscription_error") => {
                assert_eq!(v["data"]["status"], 403, "{v}");
                Some(false)
            }
            _ => None,
        })
    }

    fn members(&self, node: usize, channel: &str) -> usize {
        self.cores[node]
            .channel_users(AppIdx(0), channel)
            .map_or(0, |u| u.len())
    }
}

/// A presence channel whose owner among `names` is `names[owner]`.
/// Nodes `names` and a presence channel owned by the second.
fn owned_by_b(names: &[&str]) -> (Net, String) {
    (Net::new(names), channel_owned_by(names, 1))
}

/// Nodes `names`; ann joins on node 0 a channel owned by node 1, which
/// hears nothing: the join is not answered.
fn waiting_for_a_deaf_owner(names: &[&str]) -> (Net, ConnId) {
    let (mut net, ch) = owned_by_b(names);
    net.deaf.insert(1);
    let c = net.open(0);
    net.join(0, c, &ch, "ann");
    net.run();
    assert_eq!(net.answer(0, c), None, "waiting for the owner");
    (net, c)
}

fn channel_owned_by(names: &[&str], owner: usize) -> String {
    (0..)
        .map(|i| format!("presence-room-{i}"))
        .find(|c| {
            let me = NodeId::new(names[owner]);
            let others: BTreeSet<NodeId> = names
                .iter()
                .filter(|n| **n != names[owner])
                .map(|n| NodeId::new(n))
                .collect();
            crate::routing::is_owner(&me, &others, "1", c)
        })
        .unwrap_or_default()
}

#[test]
fn joins_on_two_nodes_at_the_same_moment_never_exceed_the_limit() {
    let names = ["a", "b", "c"];
    // Owner elsewhere (c), and owner among the joining nodes (a).
    for owner in [2, 0] {
        let mut net = Net::new(&names);
        let ch = channel_owned_by(&names, owner);
        let mut conns = Vec::new();
        // Four new members on a and four on b, before any frame moves.
        for k in 0..4 {
            for node in [0, 1] {
                let c = net.open(node);
                net.join(node, c, &ch, &format!("u{node}-{k}"));
                conns.push((node, c));
            }
        }
        net.run();
        let answers: Vec<Option<bool>> = conns.iter().map(|(n, c)| net.answer(*n, *c)).collect();
        assert!(
            answers.iter().all(Option::is_some),
            "every join answered: {answers:?}"
        );
        let admitted = answers.iter().filter(|a| **a == Some(true)).count();
        assert_eq!(admitted, LIMIT, "owner {}: {answers:?}", names[owner]);
        for (node, name) in names.iter().enumerate() {
            assert_eq!(net.members(node, &ch), LIMIT, "members seen by {name}");
        }
        // No local decision was needed.
        let local: u64 = net
            .cores
            .iter()
            .map(|c| c.presence_limit_stats().local_decisions)
            .sum();
        assert_eq!(local, 0);
    }
}

#[test]
fn many_seeded_interleavings_stay_within_the_limit() {
    let names = ["a", "b", "c", "d", "e"];
    for seed in 0..200u64 {
        let mut net = Net::new(&names);
        let ch = channel_owned_by(&names, (seed % 5) as usize);
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize
        };
        let mut conns = Vec::new();
        for k in 0..12 {
            let node = next() % names.len();
            let c = net.open(node);
            // Some users join twice (another tab, maybe another node).
            let user = format!("u{}", if k % 4 == 3 { next() % k } else { k });
            net.join(node, c, &ch, &user);
            conns.push((node, c));
            // Sometimes the frames move in between.
            if next() % 3 == 0 {
                net.run();
            }
        }
        net.run();
        for (node, name) in names.iter().enumerate() {
            let m = net.members(node, &ch);
            assert!(m <= LIMIT, "seed {seed}: {m} members seen by {name}");
        }
        assert!(
            conns.iter().all(|(n, c)| net.answer(*n, *c).is_some()),
            "seed {seed}"
        );
    }
}

#[test]
fn an_unreachable_owner_is_waited_for_at_most_claim_wait_then_decided_locally() {
    let (mut net, c) = waiting_for_a_deaf_owner(&["a", "b"]);
    net.tick(CLAIM_WAIT / 2);
    assert_eq!(net.answer(0, c), None);
    net.tick(CLAIM_WAIT / 2);
    // Decided; the confirmation still waits for the subscription barrier
    // (the deaf owner never acknowledges the new interest): bounded too.
    for _ in 0..8 {
        if net.answer(0, c).is_some() {
            break;
        }
        net.tick(CLAIM_WAIT / 4);
    }
    assert_eq!(
        net.answer(0, c),
        Some(true),
        "decided locally after CLAIM_WAIT"
    );
    assert_eq!(net.cores[0].presence_limit_stats().local_decisions, 1);
    assert_eq!(net.cores[0].presence_limit_stats().claims, 1);
}

#[test]
fn a_connection_that_leaves_while_waiting_is_not_admitted_later() {
    let (mut net, ch) = owned_by_b(&["a", "b"]);
    let c = net.open(0);
    net.join(0, c, &ch, "ann");
    net.leave(0, c, &ch);
    net.run();
    assert_eq!(net.answer(0, c), None);
    assert_eq!(net.members(0, &ch), 0);
    net.tick(CLAIM_WAIT * 2);
    assert_eq!(net.answer(0, c), None);
    // The owner's reservation expires: the seat is free again.
    net.tick(super::RESERVATION_TTL);
    for k in 0..LIMIT {
        let c = net.open(1);
        net.join(1, c, &ch, &format!("v{k}"));
        net.run();
        assert_eq!(net.answer(1, c), Some(true), "member {k}");
    }
}

#[test]
fn the_owner_counts_what_it_granted_before_it_shows_up() {
    let (mut net, ch) = owned_by_b(&["a", "b"]);
    // Five claims from a reach b and are granted, but b does not see the
    // members (a's deltas are held back).
    for k in 0..LIMIT {
        let c = net.open(0);
        net.join(0, c, &ch, &format!("u{k}"));
    }
    net.collect();
    let claims: Vec<_> = std::mem::take(&mut net.wire);
    for (i, j, f) in claims {
        let now = net.now;
        let from = NodeId::new(&net.names[i]);
        let _ = net.cores[j].handle_peer_frame(now, &from, &f);
    }
    net.collect();
    let held: Vec<_> = std::mem::take(&mut net.wire);
    assert_eq!(net.cores[1].presence_limit_stats().granted, LIMIT as u64);
    // A local join on the owner now is refused: five seats are reserved.
    let c = net.open(1);
    net.join(1, c, &ch, "late");
    assert_eq!(net.answer(1, c), Some(false));
    net.wire = held;
    net.run();
    assert_eq!(net.members(0, &ch), LIMIT);
    assert_eq!(net.members(1, &ch), LIMIT);
}

#[test]
fn a_join_waiting_for_an_owner_whose_link_drops_is_decided_at_once() {
    let (mut net, c) = waiting_for_a_deaf_owner(&["a", "b", "c"]);
    let now = net.now;
    net.cores[0].peer_down(now, &NodeId::new("b"));
    net.run(); // c acknowledges the interest: the barrier lets it through
    assert_eq!(
        net.answer(0, c),
        Some(true),
        "no wait for a peer that is gone"
    );
    assert_eq!(net.cores[0].presence_limit_stats().local_decisions, 1);
}

#[test]
fn a_filtered_presence_join_waiting_for_the_owner_keeps_its_filter() {
    // Owned by b: a's joins are claimed from b before they are answered.
    let (mut net, ch) = owned_by_b(&["a", "b"]);
    let eu = net.open(0);
    net.join_filtered(0, eu, &ch, "eve", serde_json::json!({"zone": "eu"}));
    assert_eq!(net.answer(0, eu), None, "parked for the owner");
    let plain = net.open(0);
    net.join(0, plain, &ch, "pat");
    net.run();
    assert_eq!(net.answer(0, eu), Some(true));
    assert_eq!(net.answer(0, plain), Some(true));
    assert_eq!(net.cores[0].presence_limit_stats().claims, 2);
    // Membership is per channel: both are members everywhere.
    assert_eq!(net.members(0, &ch), 2);
    assert_eq!(net.members(1, &ch), 2);
    // What each receives follows its own filter, whichever node publishes.
    for node in [0, 1] {
        net.publish_with_tags(node, &ch, &format!("eu-{node}"), r#"{"zone":"eu"}"#);
        net.publish_with_tags(node, &ch, &format!("us-{node}"), r#"{"zone":"us"}"#);
        assert_eq!(net.got(0, eu, &format!("eu-{node}")), 1);
        assert_eq!(net.got(0, eu, &format!("us-{node}")), 0);
        assert_eq!(net.got(0, plain, &format!("eu-{node}")), 1);
        assert_eq!(net.got(0, plain, &format!("us-{node}")), 1);
    }
}

#[test]
fn a_refused_filtered_join_leaves_no_filter_behind() {
    let (mut net, ch) = owned_by_b(&["a", "b"]);
    let mut members = Vec::new();
    for k in 0..LIMIT {
        let c = net.open(1);
        net.join(1, c, &ch, &format!("m{k}"));
        net.run();
        assert_eq!(net.answer(1, c), Some(true));
        members.push(c);
    }
    // Full: a filtered join on a is claimed and refused.
    let c = net.open(0);
    net.join_filtered(0, c, &ch, "late", serde_json::json!({"zone": "eu"}));
    net.run();
    assert_eq!(net.answer(0, c), Some(false));
    // A seat frees; the same connection joins again without a filter and
    // gets every event (the refused join's filter is gone).
    net.leave(1, members[0], &ch);
    net.run();
    net.tick(super::RESERVATION_TTL);
    net.inbox.remove(&(0, c.0));
    net.join(0, c, &ch, "late");
    net.run();
    assert_eq!(net.answer(0, c), Some(true));
    net.publish_with_tags(1, &ch, "us", r#"{"zone":"us"}"#);
    assert_eq!(net.got(0, c, "us"), 1);
}
