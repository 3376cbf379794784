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

use super::schedule::{env, faulty_net, out_of_order, Gen, NetOp, Published};
use super::{Net, SimFailure};
use crate::ConnId;

const CHANNELS: [&str; 3] = ["c-a", "c-b", "presence-p"];

#[derive(Debug, Clone, Copy)]
enum Op {
    Open(usize),
    Sub(usize, usize, usize),
    Publish(usize, usize),
    Net(NetOp),
    Restart(usize),
    Drain(usize),
    DeclareDead(usize, usize),
    Disconnect(usize, usize),
}

/// The next operation of a schedule on `nodes` nodes.
fn draw(g: &mut Gen, nodes: usize) -> Op {
    let n = |g: &mut Gen| g.next(nodes);
    match g.next(100) {
        0..=11 => Op::Open(n(g)),
        12..=31 => Op::Sub(n(g), g.next(6), g.next(CHANNELS.len())),
        32..=56 => Op::Publish(n(g), g.next(CHANNELS.len())),
        57..=71 => Op::Net(NetOp::Step(1 + g.next(20))),
        72..=79 => Op::Net(NetOp::Tick),
        80..=85 => Op::Net(NetOp::Cut(n(g), n(g))),
        86..=91 => Op::Net(NetOp::Heal(n(g), n(g))),
        92..=93 => Op::Restart(n(g)),
        94 => Op::Drain(n(g)),
        95..=96 => Op::DeclareDead(n(g), n(g)),
        _ => Op::Disconnect(n(g), g.next(6)),
    }
}

/// Runs one schedule; returns a description of the first violation.
fn run(seed: u64, nodes: usize, len: usize) -> Result<(), SimFailure> {
    let mut net = faulty_net(nodes, seed);
    let mut g = Gen::new(seed);
    // (node, conn) that had `subscription_succeeded` before each publish.
    let mut published: Vec<Published<(usize, u64)>> = Vec::new();
    // (node, conn) -> channels subscribed (as asked).
    let mut asked: BTreeMap<(usize, u64), BTreeSet<usize>> = BTreeMap::new();
    // Connections closed at some point (excluded).
    let mut closed: BTreeSet<(usize, u64)> = BTreeSet::new();
    // Crashed publishers: (node, epoch).
    let mut crashed: BTreeSet<(usize, u64)> = BTreeSet::new();
    let mut n = 0u64;
    let mut log = Vec::new();
    for _ in 0..len {
        let op = draw(&mut g, nodes);
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
                if !net.publish_at(i, CHANNELS[ch], &event) {
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
                published.push(Published::new(&net, log.len(), i, ch, event, expected));
            }
            Op::Net(op) => net.apply(op),
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
            Op::DeclareDead(j, i) => net.declare_dead_if_cut(j, i),
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
            let events = frames.iter().filter_map(|f| f["event"].as_str());
            if let Some((k, from)) = out_of_order(events, &published) {
                let what = format!("node {i} conn {c} got e{k} after a later event of node {from}");
                return Err(SimFailure::new(seed, nodes, what, &log));
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
    let schedules = env("PUSHMESH_SIM_SCHEDULES", 5_000);
    let first = env("PUSHMESH_SIM_SEED", 1);
    let ops = env("PUSHMESH_SIM_OPS", 80) as usize;
    for seed in first..first + schedules {
        let nodes = 3 + (seed % 4) as usize; // 3 to 6 nodes
        if let Err(e) = run(seed, nodes, ops) {
            panic!("{e}");
        }
    }
}
