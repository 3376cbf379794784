//! The cluster's promise as a property over seeded schedules: every publish
//! acknowledged (not refused) reaches every connection that had
//! `subscription_succeeded` before the publish and stayed connected,
//! exactly once, in order per publisher — through cuts, heals, restarts
//! (crash: new epoch), drains (graceful: flush, leave, start again), false
//! death declarations, virtual time, and data
//! streams that drop, duplicate and reorder frames.
//!
//! Excluded, as the promise says: connections that were closed (restart,
//! disconnect, or the node learned a peer had forgotten it), subscriptions
//! whose barrier timed out (the node said so with a metric), and publishes
//! of a node that crashed while it still held them.
//!
//! `PUSHMESH_SIM_SCHEDULES` sets the number of schedules (default 5,000),
//! `PUSHMESH_SIM_OPS` their length (default 80), `PUSHMESH_SIM_SEED` the
//! first seed, `PUSHMESH_SIM_TRACE` prints each operation.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Faults, Net, SimFailure};
use crate::{AppIdx, ConnId, PublishRequest};

const CHANNELS: [&str; 3] = ["c-a", "c-b", "presence-p"];

#[derive(Debug, Clone, Copy)]
enum Op {
    Open(usize),
    Sub(usize, usize, usize),
    Publish(usize, usize),
    Step(usize),
    Tick,
    Cut(usize, usize),
    Heal(usize, usize),
    Restart(usize),
    Drain(usize),
    DeclareDead(usize, usize),
    Disconnect(usize, usize),
}

/// A small deterministic generator (xorshift), so a failing seed replays.
struct Gen(u64);

impl Gen {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }

    fn op(&mut self, nodes: usize) -> Op {
        let n = |g: &mut Gen| g.next(nodes);
        match self.next(100) {
            0..=11 => Op::Open(n(self)),
            12..=31 => Op::Sub(n(self), self.next(6), self.next(CHANNELS.len())),
            32..=56 => Op::Publish(n(self), self.next(CHANNELS.len())),
            57..=71 => Op::Step(1 + self.next(20)),
            72..=79 => Op::Tick,
            80..=85 => Op::Cut(n(self), n(self)),
            86..=91 => Op::Heal(n(self), n(self)),
            92..=93 => Op::Restart(n(self)),
            94 => Op::Drain(n(self)),
            95..=96 => Op::DeclareDead(n(self), n(self)),
            _ => Op::Disconnect(n(self), self.next(6)),
        }
    }
}

/// One acknowledged publish.
struct Published {
    from: usize,
    from_epoch: u64,
    channel: usize,
    event: String,
    /// (node, conn) that had `subscription_succeeded` for the channel before it.
    expected: Vec<(usize, u64)>,
}

/// Runs one schedule; returns a description of the first violation.
fn run(seed: u64, nodes: usize, len: usize) -> Result<(), SimFailure> {
    let faults = Faults {
        drop: 30,
        dup: 30,
        swap: 30,
    };
    let mut net = Net::with(nodes, seed, faults);
    let mut g = Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut published: Vec<Published> = Vec::new();
    // (node, conn) -> channels subscribed (as asked).
    let mut asked: BTreeMap<(usize, u64), BTreeSet<usize>> = BTreeMap::new();
    // Connections closed at some point (excluded).
    let mut closed: BTreeSet<(usize, u64)> = BTreeSet::new();
    // Crashed publishers: (node, epoch).
    let mut crashed: BTreeSet<(usize, u64)> = BTreeSet::new();
    let mut n = 0u64;
    let mut log = Vec::new();
    for _ in 0..len {
        let op = g.op(nodes);
        log.push(format!("{op:?}"));
        if std::env::var("PUSHMESH_SIM_TRACE").is_ok() {
            let conns: Vec<_> = net.nodes.iter().map(|n| n.conns.clone()).collect();
            eprintln!(
                "op {op:?}; links {:?}; conns {conns:?}",
                net.links.keys().collect::<Vec<_>>()
            );
        }
        match op {
            Op::Open(i) => {
                let c = net.open(i);
                asked.insert((i, c.0), BTreeSet::new());
            }
            Op::Sub(i, c, ch) => {
                let Some(&conn) = net.nodes[i].conns.get(c) else {
                    continue;
                };
                let set = asked.entry((i, conn.0)).or_default();
                if set.insert(ch) {
                    if CHANNELS[ch].starts_with("presence-") {
                        net.join(i, conn, CHANNELS[ch], &format!("u{}-{}", i, conn.0));
                    } else {
                        net.subscribe(i, conn, CHANNELS[ch]);
                    }
                }
            }
            Op::Publish(i, ch) => {
                if !net.check_joined(i) {
                    continue; // 503 joining: not acknowledged
                }
                n += 1;
                let event = format!("e{n}");
                let channels = vec![CHANNELS[ch].to_string()];
                let now = net.now;
                net.sync_room(i);
                let r = net.nodes[i].core.publish(
                    now,
                    AppIdx(0),
                    &PublishRequest {
                        name: &event,
                        data: "{}",
                        channels: &channels,
                        exclude_socket: None,
                    },
                );
                if r.is_err() {
                    continue;
                }
                // Who had subscription_succeeded before this publish.
                let mut expected = Vec::new();
                for (k, node) in net.nodes.iter().enumerate() {
                    for c in &node.conns {
                        if succeeded(node.inbox.get(&c.0), CHANNELS[ch]) {
                            expected.push((k, c.0));
                        }
                    }
                }
                net.pump(i);
                if std::env::var("PUSHMESH_SIM_TRACE").is_ok() {
                    eprintln!(
                        "publish {event} from {i} on {}: expected {expected:?}",
                        CHANNELS[ch]
                    );
                }
                published.push(Published {
                    from: i,
                    from_epoch: net.nodes[i].epoch,
                    channel: ch,
                    event,
                    expected,
                });
            }
            Op::Step(k) => {
                for _ in 0..k {
                    if !net.step() {
                        break;
                    }
                }
            }
            Op::Tick => net.tick(),
            Op::Cut(i, j) => net.cut(i, j),
            Op::Heal(i, j) => net.connect(i, j),
            Op::Restart(i) => {
                for c in &net.nodes[i].conns {
                    closed.insert((i, c.0));
                }
                crashed.insert((i, net.nodes[i].epoch));
                net.restart(i);
            }
            Op::Drain(i) => {
                // Its clients are closed; what it acknowledged is delivered.
                for c in &net.nodes[i].conns {
                    closed.insert((i, c.0));
                }
                net.drain(i);
            }
            Op::DeclareDead(j, i) => {
                if i != j && !net.links.contains_key(&(i, j)) {
                    net.declare_dead(j, i);
                }
            }
            Op::Disconnect(i, c) => {
                if c < net.nodes[i].conns.len() {
                    let conn = net.nodes[i].conns.remove(c);
                    closed.insert((i, conn.0));
                    let now = net.now;
                    net.nodes[i].core.disconnect(now, conn);
                    net.pump(i);
                }
            }
        }
        exclude_broken(&net, &asked, &mut closed);
    }
    net.heal_all();
    exclude_broken(&net, &asked, &mut closed);
    for p in &published {
        for &(i, c) in &p.expected {
            if closed.contains(&(i, c)) || net.nodes[i].core.barrier_timed_out(ConnId(c)) {
                continue;
            }
            let got = count(net.nodes[i].inbox.get(&c), &p.event);
            let may_miss = crashed.contains(&(p.from, p.from_epoch));
            if got > 1 || (got == 0 && !may_miss) {
                let what = format!(
                    "event {} on {} from node {} reached node {i} conn {c} {got} times",
                    p.event, CHANNELS[p.channel], p.from
                );
                return Err(SimFailure::new(seed, nodes, what, &log));
            }
        }
    }
    // Order per publisher (incarnation) at every connection.
    for (i, node) in net.nodes.iter().enumerate() {
        for (c, frames) in &node.inbox {
            let mut last: BTreeMap<(usize, u64), u64> = BTreeMap::new();
            for f in frames {
                let Some(e) = f["event"].as_str().and_then(|e| e.strip_prefix('e')) else {
                    continue;
                };
                let Ok(k) = e.parse::<u64>() else { continue };
                // Refused publishes are not in `published`: found by name.
                let name = format!("e{k}");
                let Some(p) = published.iter().find(|p| p.event == name) else {
                    continue;
                };
                let key = (p.from, p.from_epoch);
                if last.get(&key).is_some_and(|l| *l >= k) {
                    let what = format!(
                        "node {i} conn {c} got e{k} after a later event of node {}",
                        p.from
                    );
                    return Err(SimFailure::new(seed, nodes, what, &log));
                }
                last.insert(key, k);
            }
        }
    }
    Ok(())
}

/// Connections closed because their node learned a peer had forgotten it.
fn exclude_broken(
    net: &Net,
    asked: &BTreeMap<(usize, u64), BTreeSet<usize>>,
    closed: &mut BTreeSet<(usize, u64)>,
) {
    for &b in &net.broken {
        for &(i, c) in asked.keys() {
            if i == b && !net.nodes[i].conns.contains(&ConnId(c)) {
                closed.insert((i, c));
            }
        }
    }
}

fn succeeded(inbox: Option<&Vec<Value>>, channel: &str) -> bool {
    inbox.is_some_and(|v| {
        v.iter().any(|f| {
            f["event"] == "pusher_internal:subscription_succeeded" && f["channel"] == channel
        })
    })
}

fn count(inbox: Option<&Vec<Value>>, event: &str) -> usize {
    inbox.map_or(0, |v| v.iter().filter(|f| f["event"] == event).count())
}

#[test]
fn acknowledged_publishes_reach_every_confirmed_subscriber_exactly_once_in_order() {
    let schedules: u64 = std::env::var("PUSHMESH_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let first: u64 = std::env::var("PUSHMESH_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ops: usize = std::env::var("PUSHMESH_SIM_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(80);
    for seed in first..first + schedules {
        let nodes = 3 + (seed % 4) as usize; // 3 to 6 nodes
        if let Err(e) = run(seed, nodes, ops) {
            panic!("{e}");
        }
    }
}
