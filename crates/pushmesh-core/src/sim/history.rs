//! History and recovery as a property over seeded schedules.
//!
//! A client is a chain of connections: when its connection is closed
//! (disconnect, restart, drain) it reconnects to any node and resubscribes
//! with the last position it saw, as the JS add-on does (the position of the
//! last event; of `subscription_succeeded` unless that said `recovered:
//! true`). For every client whose resubscribes were all answered
//! `recovered: true`, every acknowledged publish on its channel after its
//! first `subscription_succeeded` arrives exactly once, in order per
//! publisher — through cuts, heals, crashes, drains, false deaths, virtual
//! time, and data streams that drop, duplicate and reorder frames. Publishes
//! of an incarnation that crashed while holding them may be missing (the
//! continuity rule); a client that was told `recovered: false` is excluded
//! (the server said so). The property is not vacuous: most reconnects must
//! recover.
//!
//! `PUSHMESH_SIM_SCHEDULES` / `PUSHMESH_SIM_SEED` / `PUSHMESH_SIM_OPS` as
//! in `continuity.rs` (default here: 2,000 schedules).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::schedule::{env, faulty_net, out_of_order, Gen, NetOp, Published};
use super::{Net, SimFailure};
use crate::{AppIdx, ConnId};

const CH: [&str; 3] = ["h-a", "h-b", "presence-h"];

#[derive(Debug, Clone, Copy)]
enum Op {
    NewClient(usize, usize),
    Publish(usize, usize),
    Net(NetOp),
    Restart(usize),
    Drain(usize),
    DeclareDead(usize, usize),
    Disconnect(usize),
    Reconnect(usize, usize),
}

/// The next operation of a schedule on `nodes` nodes.
fn draw(g: &mut Gen, nodes: usize) -> Op {
    let n = |g: &mut Gen| g.next(nodes);
    match g.next(100) {
        0..=9 => Op::NewClient(n(g), g.next(CH.len())),
        10..=34 => Op::Publish(n(g), g.next(CH.len())),
        35..=52 => Op::Net(NetOp::Step(1 + g.next(20))),
        53..=60 => Op::Net(NetOp::Tick),
        61..=66 => Op::Net(NetOp::Cut(n(g), n(g))),
        67..=72 => Op::Net(NetOp::Heal(n(g), n(g))),
        73..=74 => Op::Restart(n(g)),
        75 => Op::Drain(n(g)),
        76..=77 => Op::DeclareDead(n(g), n(g)),
        78..=87 => Op::Disconnect(g.next(8)),
        _ => Op::Reconnect(g.next(8), n(g)),
    }
}

/// One client: its connections in turn and what it saw.
struct Client {
    channel: usize,
    /// (node, node epoch, conn) of its current connection.
    conn: (usize, u64, ConnId),
    /// Frames of the current connection already read.
    read: usize,
    /// Its last position on the channel.
    position: Option<String>,
    /// Its first `subscription_succeeded` arrived.
    subscribed: bool,
    /// Every resubscribe so far said `recovered: true`.
    all_recovered: bool,
    reconnects: usize,
    recovered: usize,
    /// Event names received, in order, across its connections.
    got: Vec<String>,
    user: String,
}

impl Client {
    /// A client of `channel` that has seen nothing yet.
    fn new(channel: usize, conn: (usize, u64, ConnId), user: String) -> Self {
        Self {
            channel,
            conn,
            read: 0,
            position: None,
            subscribed: false,
            all_recovered: true,
            reconnects: 0,
            recovered: 0,
            got: Vec::new(),
            user,
        }
    }
}

fn is_open(net: &Net, c: &Client) -> bool {
    let (i, epoch, conn) = c.conn;
    net.nodes[i].epoch == epoch && net.nodes[i].conns.contains(&conn)
}

/// Reads the frames a client's connection got since last time.
fn read(net: &Net, c: &mut Client) {
    let (i, epoch, conn) = c.conn;
    if net.nodes[i].epoch != epoch {
        return;
    }
    let Some(frames) = net.nodes[i].inbox.get(&conn.0) else {
        return;
    };
    for f in &frames[c.read..] {
        if f["channel"] != CH[c.channel] {
            continue;
        }
        let event = f["event"].as_str().unwrap_or_default();
        if event == "pusher_internal:subscription_succeeded" {
            let d: Value =
                serde_json::from_str(f["data"].as_str().unwrap_or("{}")).unwrap_or(Value::Null);
            let recovered = d["recovered"].as_bool();
            if c.subscribed {
                c.reconnects += 1;
                if recovered == Some(true) {
                    c.recovered += 1;
                } else {
                    c.all_recovered = false;
                }
            }
            c.subscribed = true;
            if recovered != Some(true) {
                c.position = d["position"].as_str().map(str::to_owned);
            }
        } else if event.starts_with('e') {
            c.got.push(event.to_owned());
            if let Some(p) = f["position"].as_str() {
                c.position = Some(p.to_owned());
            }
        }
    }
    c.read = frames.len();
}

fn subscribe(net: &mut Net, c: &Client, i: usize, conn: ConnId) {
    let channel = CH[c.channel];
    let mut data = json!({ "channel": channel });
    if let Some(p) = &c.position {
        data["position"] = json!(p);
    }
    if channel.starts_with("presence-") {
        let cd = json!({ "user_id": c.user }).to_string();
        let sig = pushmesh_protocol::sign::sign(
            super::SECRET,
            &pushmesh_protocol::sign::presence_string(&Net::socket(i, conn), channel, &cd),
        );
        data["auth"] = json!(format!("{}:{sig}", super::KEY));
        data["channel_data"] = json!(cd);
    }
    net.frame(
        i,
        conn,
        json!({ "event": "pusher:subscribe", "data": data }),
    );
}

fn connect(net: &mut Net, c: &mut Client, i: usize) {
    let conn = net.open(i);
    c.conn = (i, net.nodes[i].epoch, conn);
    c.read = 0;
    subscribe(net, c, i, conn);
}

/// Runs one schedule: (reconnects, recovered) or the first violation.
fn run(seed: u64, nodes: usize, len: usize) -> Result<(usize, usize), SimFailure> {
    let mut net = faulty_net(nodes, seed);
    let mut g = Gen::new(seed);
    let mut clients: Vec<Client> = Vec::new();
    // Clients subscribed (confirmed) when each was acknowledged.
    let mut published: Vec<Published<usize>> = Vec::new();
    let mut crashed: BTreeSet<(usize, u64)> = BTreeSet::new();
    let mut log = Vec::new();
    let mut n = 0u64;
    for _ in 0..len {
        let op = draw(&mut g, nodes);
        log.push(format!("{op:?}"));
        match op {
            Op::NewClient(i, ch) => {
                let mut c = Client::new(ch, (i, 0, ConnId(0)), format!("u{}", clients.len()));
                connect(&mut net, &mut c, i);
                clients.push(c);
            }
            Op::Publish(i, ch) => {
                if !net.check_joined(i) {
                    continue;
                }
                n += 1;
                let event = format!("e{n}");
                if !net.publish_at(i, CH[ch], &event) {
                    continue;
                }
                for c in &mut clients {
                    read(&net, c);
                }
                let expected = (0..clients.len())
                    .filter(|k| clients[*k].channel == ch && clients[*k].subscribed)
                    .collect();
                net.pump(i);
                published.push(Published::new(&net, log.len(), i, ch, event, expected));
            }
            Op::Net(op) => net.apply(op),
            Op::Restart(i) => {
                crashed.insert((i, net.nodes[i].epoch));
                net.restart(i);
            }
            Op::Drain(i) => net.drain(i),
            Op::DeclareDead(j, i) => net.declare_dead_if_cut(j, i),
            Op::Disconnect(k) => {
                if let Some(c) = clients.get(k) {
                    if is_open(&net, c) {
                        let (i, _, conn) = c.conn;
                        net.nodes[i].conns.retain(|x| *x != conn);
                        let now = net.now;
                        net.nodes[i].core.disconnect(now, conn);
                        net.pump(i);
                    }
                }
            }
            Op::Reconnect(k, i) => {
                // A node that has not joined refuses new connections (503
                // `joining`): the balancer sends the client elsewhere later.
                if k < clients.len() && net.check_joined(i) {
                    read(&net, &mut clients[k]);
                    if !is_open(&net, &clients[k]) {
                        let mut c = std::mem::replace(&mut clients[k], placeholder());
                        connect(&mut net, &mut c, i);
                        clients[k] = c;
                    }
                }
            }
        }
        for c in &mut clients {
            read(&net, c);
        }
        if std::env::var("PUSHMESH_SIM_TRACE").is_ok() {
            eprintln!("op {op:?} (e{n})");
            for (k, c) in clients.iter().enumerate() {
                eprintln!(
                    "  client {k} {} conn {:?} open {} pos {:?} got {:?}",
                    CH[c.channel],
                    c.conn,
                    is_open(&net, c),
                    c.position,
                    c.got
                );
            }
        }
    }
    // Everyone back: every link, every client, time for waits to end.
    net.heal_all();
    for (k, c) in clients.iter_mut().enumerate() {
        read(&net, c);
        if !is_open(&net, c) {
            connect(&mut net, c, k % nodes);
        }
    }
    net.heal_all();
    for _ in 0..8 {
        net.tick();
    }
    net.heal_all();
    for c in &mut clients {
        read(&net, c);
    }
    let fail = |what: String| Err(SimFailure::new(seed, nodes, what, &log));
    let mut counts: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for (k, c) in clients.iter().enumerate() {
        for e in &c.got {
            *counts.entry((k, e.as_str())).or_default() += 1;
        }
    }
    let (mut reconnects, mut recovered) = (0, 0);
    for (k, c) in clients.iter().enumerate() {
        reconnects += c.reconnects;
        recovered += c.recovered;
        if !c.all_recovered {
            continue;
        }
        if let Some(((_, e), n)) = counts.iter().find(|((kk, _), n)| *kk == k && **n > 1) {
            return fail(format!("client {k} on {} got {e} {n} times", CH[c.channel]));
        }
        for p in published.iter().filter(|p| p.expected.contains(&k)) {
            let got = counts.get(&(k, p.event.as_str())).copied().unwrap_or(0);
            // Every copy can be gone only after two nodes were lost since.
            let lost = !held_anywhere(&net, p) && losses_after(&log, p.at_op) >= 2;
            if got == 0 && !lost && !crashed.contains(&(p.from, p.from_epoch)) {
                return fail(format!(
                    "client {k} on {} never got {} from node {} ({} reconnects, all recovered)",
                    CH[p.channel], p.event, p.from, c.reconnects
                ));
            }
        }
        // Order per publisher incarnation.
        if let Some((e, from)) = out_of_order(c.got.iter().map(String::as_str), &published) {
            return fail(format!(
                "client {k} got e{e} after a later event of node {from}"
            ));
        }
    }
    Ok((reconnects, recovered))
}

/// Whether some node still holds the event in its history.
fn held_anywhere(net: &Net, p: &Published<usize>) -> bool {
    let name = pushmesh_protocol::ChannelName::parse_with_limit(CH[p.channel], 200)
        .expect("valid channel");
    net.nodes.iter().any(|n| {
        n.core
            .history_page(AppIdx(0), &name, None, usize::MAX)
            .is_ok_and(|page| page.events.iter().any(|e| e.name == p.event))
    })
}

/// Restarts and drains (each loses a node's copy) after operation `at`.
fn losses_after(log: &[String], at: usize) -> usize {
    log[at.min(log.len())..]
        .iter()
        .filter(|op| op.starts_with("Restart") || op.starts_with("Drain"))
        .count()
}

fn placeholder() -> Client {
    Client::new(0, (0, u64::MAX, ConnId(0)), String::new())
}

#[test]
fn recovering_clients_get_every_acknowledged_event_once_in_order() {
    let schedules = env("PUSHMESH_SIM_SCHEDULES", 2_000);
    let first = env("PUSHMESH_SIM_SEED", 1);
    let ops = env("PUSHMESH_SIM_OPS", 80) as usize;
    let (mut reconnects, mut recovered) = (0, 0);
    for seed in first..first + schedules {
        let nodes = 2 + (seed % 4) as usize; // 2 to 5 nodes
        match run(seed, nodes, ops) {
            Ok((r, ok)) => {
                reconnects += r;
                recovered += ok;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("history sim: {recovered} of {reconnects} resubscribes recovered");
    assert!(
        recovered * 2 > reconnects,
        "most resubscribes must recover: {recovered} of {reconnects}"
    );
}
