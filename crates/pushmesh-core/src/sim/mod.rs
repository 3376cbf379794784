//! Deterministic N-node simulation of the cluster protocol in virtual time:
//! nodes exchange peer frames over links of two streams, control (ordered,
//! as a QUIC stream) and data (numbered frames from each sender's
//! `Outbound` buffer, with drops, duplicates and reordering injected);
//! deliveries across links interleave in random order; links are cut
//! (in-flight frames lost) and healed; nodes restart with a new epoch or are
//! declared dead by a peer; time advances in ticks (barrier timeouts,
//! retransmissions). The continuity property is in `continuity.rs`.

mod continuity;
mod filters;
mod history;
mod scale;
mod scenarios;
mod schedule;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use pushmesh_protocol::sign;
use serde_json::Value;

use crate::cluster::PeerFrame;
use crate::filter::Tags;
use crate::peer_buffer::{stream_id, Continuity, Inbound, Outbound};
use crate::{
    AppConfig, AppIdx, ConnId, Core, CoreConfig, FrameKind, NodeId, Output, PublishError,
    PublishRequest, PublishedChannel,
};

use crate::testing::{self, KEY, SECRET};
const NODES: usize = 3;
const CHANNELS: [&str; 3] = ["news", "cache-c", "private-p"];
const PRESENCE: [&str; 2] = ["presence-a", "presence-b"];

fn app() -> AppConfig {
    AppConfig {
        webhooks: true,
        // `history.rs` uses these; the continuity channels keep none.
        history: Some(crate::history::AppHistory {
            channels: vec!["h-*".into(), "presence-h*".into()],
            max_events: 10_000,
            ttl: std::time::Duration::from_secs(3600),
        }),
        ..testing::app()
    }
}

/// A schedule that broke a property: which, and how to replay it.
#[derive(Debug, thiserror::Error)]
#[error("seed {seed} ({nodes} nodes): {what}\nops: {ops}")]
struct SimFailure {
    /// The schedule's seed (`PUSHMESH_SIM_SEED` replays it).
    seed: u64,
    /// Nodes in the schedule.
    nodes: usize,
    /// The violation.
    what: String,
    /// The operations that led to it.
    ops: String,
}

impl SimFailure {
    fn new(seed: u64, nodes: usize, what: String, log: &[String]) -> Self {
        Self {
            seed,
            nodes,
            what,
            ops: log.join(", "),
        }
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
    /// Whether it joined since its start (linked and synced with every
    /// other node): until then it refuses publishes, as the server does.
    joined: bool,
}

fn new_core(i: usize, epoch: u64) -> Core {
    Core::new(
        std::time::Instant::now(),
        CoreConfig {
            epoch,
            ..testing::config(vec![app()], &node_name(i).to_string(), 100 + i as u32)
        },
    )
}

fn new_node(i: usize, epoch: u64) -> SimNode {
    SimNode {
        core: new_core(i, epoch),
        epoch,
        inbox: BTreeMap::new(),
        conns: Vec::new(),
        next_conn: 1,
        joined: false,
    }
}

/// Faults injected on data streams (control streams are ordered and
/// reliable while a link is up, as QUIC streams are; cuts lose them).
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    /// Out of 1000 deliveries: dropped, duplicated, swapped with the next.
    drop: u32,
    dup: u32,
    swap: u32,
    /// Data frames a link's buffer holds before publishes to that peer are
    /// refused (0: no practical limit). Small, a cut link fills it and
    /// refusals are exercised (the buffer takes more, up to its slack, for
    /// copies).
    buffer_frames: usize,
}

/// One direction of a link that is up.
#[derive(Default)]
struct Wire {
    control: VecDeque<Bytes>,
    data: VecDeque<(u64, Bytes)>,
}

struct Net {
    nodes: Vec<SimNode>,
    /// Directed links that are up.
    links: BTreeMap<(usize, usize), Wire>,
    /// (from, to): the sender's buffer of data frames for that peer.
    outs: BTreeMap<(usize, usize), Outbound>,
    /// (from, to): what `to` received of `from`'s data frames.
    ins: BTreeMap<(usize, usize), Inbound>,
    /// Buffers made per sender incarnation (their stream numbers).
    streams: BTreeMap<usize, u64>,
    now: Instant,
    /// Data frames delivered to a node with no local subscriber (must stay 0).
    misrouted: usize,
    data_frames: usize,
    faults: Faults,
    /// Nodes whose clients were closed because a peer forgot them, or
    /// because they had forgotten a peer that was alive.
    broken: BTreeSet<usize>,
    /// (a, b, epoch of b): `a` declared that incarnation of `b` dead.
    forgotten: BTreeSet<(usize, usize, u64)>,
    rng: u64,
}

impl Net {
    fn new() -> Self {
        Self::with(NODES, 7, Faults::default())
    }

    fn with(n: usize, seed: u64, faults: Faults) -> Self {
        let nodes = (0..n).map(|i| new_node(i, 1)).collect();
        let mut net = Self {
            nodes,
            links: BTreeMap::new(),
            outs: BTreeMap::new(),
            ins: BTreeMap::new(),
            streams: BTreeMap::new(),
            now: Instant::now(),
            misrouted: 0,
            data_frames: 0,
            faults,
            broken: BTreeSet::new(),
            forgotten: BTreeSet::new(),
            rng: seed.max(1),
        };
        for i in 0..n {
            for j in (i + 1)..n {
                net.connect(i, j);
            }
        }
        net.settle();
        net
    }

    fn rand(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n.max(1) as u64) as usize
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && (self.rand(1000) as u32) < per_mille
    }

    fn index_of(id: &NodeId) -> usize {
        id.as_str()
            .trim_start_matches("node-")
            .parse()
            .unwrap_or(usize::MAX)
    }

    fn out(&mut self, i: usize, j: usize) -> &mut Outbound {
        if !self.outs.contains_key(&(i, j)) {
            let max_frames = match self.faults.buffer_frames {
                0 => 1 << 20,
                n => n,
            };
            let n = self.streams.entry(i).or_insert(0);
            *n += 1024;
            let stream = stream_id(self.nodes[i].epoch, *n);
            self.outs
                .insert((i, j), Outbound::new(stream, max_frames, 1 << 30));
        }
        self.outs.get_mut(&(i, j)).expect("just made")
    }

    /// Moves a sender's held data frames onto the wire, if the link is up.
    fn transmit(&mut self, i: usize, j: usize) {
        let now = self.now;
        let mut batch = Vec::new();
        if let Some(o) = self.outs.get_mut(&(i, j)) {
            o.take(now, usize::MAX, &mut batch);
        }
        if let Some(w) = self.links.get_mut(&(i, j)) {
            w.data.extend(batch);
        }
    }

    /// Tells node `i` which peers' data buffers have room (before a
    /// publish, as the server's shards ask the cluster layer).
    fn sync_room(&mut self, i: usize) {
        for j in 0..self.nodes.len() {
            if j != i {
                let room = self.outs.get(&(i, j)).is_none_or(Outbound::has_room);
                self.nodes[i].core.set_peer_room(&node_name(j), room);
            }
        }
    }

    fn pump(&mut self, i: usize) {
        let mut data_to = BTreeSet::new();
        while let Some(o) = self.nodes[i].core.poll_output() {
            match o {
                Output::Send { conn, frame } => {
                    let v: Value = serde_json::from_slice(&frame).unwrap_or(Value::Null);
                    self.nodes[i].inbox.entry(conn.0).or_default().push(v);
                }
                Output::Peer { to, kind, frame } => {
                    let j = Self::index_of(&to);
                    match kind {
                        FrameKind::Control => {
                            if let Some(w) = self.links.get_mut(&(i, j)) {
                                w.control.push_back(frame);
                            }
                        }
                        FrameKind::Data => {
                            let pushed = self.out(i, j).push(frame).is_ok();
                            assert!(pushed, "sim buffers are large");
                            data_to.insert(j);
                        }
                    }
                }
                Output::Close { .. } | Output::Hook { .. } | Output::HookReleased { .. } => {}
            }
        }
        for j in data_to {
            self.transmit(i, j);
        }
    }

    fn connect(&mut self, i: usize, j: usize) {
        if i == j || self.links.contains_key(&(i, j)) {
            return;
        }
        self.links.insert((i, j), Wire::default());
        self.links.insert((j, i), Wire::default());
        let (ei, ej) = (self.nodes[i].epoch, self.nodes[j].epoch);
        // Each side announces its stream; the receiver checks continuity.
        for (a, b, eb) in [(i, j, ej), (j, i, ei)] {
            let stream = {
                let o = self.out(a, b);
                o.link_up(eb);
                o.stream()
            };
            let mut c = self.ins.entry((a, b)).or_default().link_up(stream);
            // `b` had declared this incarnation of `a` dead: it confirmed
            // subscriptions without it meanwhile.
            let ea = self.nodes[a].epoch;
            if self.forgotten.remove(&(b, a, ea)) {
                c = Continuity::Broken;
            }
            if c == Continuity::Broken {
                // As the server does: the clients of `b` reconnect.
                self.broken.insert(b);
                let now = self.now;
                for conn in self.nodes[b].conns.clone() {
                    self.nodes[b].core.disconnect(now, conn);
                }
                self.nodes[b].conns.clear();
                self.pump(b);
            }
        }
        let now = self.now;
        self.nodes[i].core.peer_up(now, node_name(j), ej);
        self.nodes[j].core.peer_up(now, node_name(i), ei);
        self.pump(i);
        self.pump(j);
        self.transmit(i, j);
        self.transmit(j, i);
    }

    fn cut(&mut self, i: usize, j: usize) {
        if self.links.remove(&(i, j)).is_none() {
            return;
        }
        self.links.remove(&(j, i));
        for (a, b) in [(i, j), (j, i)] {
            if let Some(o) = self.outs.get_mut(&(a, b)) {
                o.link_down();
            }
        }
        let now = self.now;
        self.nodes[i].core.link_down(now, &node_name(j));
        self.nodes[j].core.link_down(now, &node_name(i));
    }

    /// `j` declares `i` dead (its link is cut): `j` forgets it.
    fn declare_dead(&mut self, j: usize, i: usize) {
        self.cut(i, j);
        self.forgotten.insert((j, i, self.nodes[i].epoch));
        let now = self.now;
        self.nodes[j].core.peer_down(now, &node_name(i));
        self.outs.remove(&(j, i));
        self.pump(j);
    }

    /// A graceful drain of node `i`, as the server does it: its clients are
    /// closed, everything it holds for its peers is delivered (its links
    /// heal first), it leaves (its peers forget it at once), and it starts
    /// again with a new epoch.
    fn drain(&mut self, i: usize) {
        let now = self.now;
        for c in std::mem::take(&mut self.nodes[i].conns) {
            self.nodes[i].core.disconnect(now, c);
        }
        self.pump(i);
        let n = self.nodes.len();
        for j in 0..n {
            self.connect(i, j);
        }
        self.flush(Some(i));
        for j in (0..n).filter(|j| *j != i) {
            self.cut(i, j);
            let now = self.now;
            self.nodes[j].core.peer_down(now, &node_name(i));
            self.outs.remove(&(j, i));
            self.pump(j);
        }
        self.restart(i);
    }

    /// A crash and a start with a new epoch (what it held is lost).
    fn restart(&mut self, i: usize) {
        let n = self.nodes.len();
        for j in 0..n {
            if j != i {
                self.cut(i, j);
            }
        }
        let epoch = self.nodes[i].epoch + 1;
        self.nodes[i] = new_node(i, epoch);
        self.outs.retain(|(a, _), _| *a != i);
        self.ins.retain(|(_, b), _| *b != i);
        self.streams.remove(&i);
        for j in 0..n {
            if j != i {
                self.connect(i, j);
            }
        }
    }

    /// Whether node `i` is joined: linked and synced with every other node,
    /// and their copies (cached events, history) applied, as the server's
    /// readiness has it.
    fn check_joined(&mut self, i: usize) -> bool {
        if !self.nodes[i].joined {
            let others = self.nodes.len() - 1;
            let synced = self.nodes[i]
                .core
                .peer_links()
                .iter()
                .filter(|l| l.reached() && l.copied)
                .count();
            self.nodes[i].joined = synced == others;
        }
        self.nodes[i].joined
    }

    /// Delivers one frame of a random busy link, with the data faults.
    fn step(&mut self) -> bool {
        let busy: Vec<((usize, usize), bool)> = self
            .links
            .iter()
            .flat_map(|(k, w)| {
                let c = (!w.control.is_empty()).then_some((*k, true));
                let d = (!w.data.is_empty()).then_some((*k, false));
                c.into_iter().chain(d)
            })
            .collect();
        if busy.is_empty() {
            return false;
        }
        let ((from, to), control) = busy[self.rand(busy.len())];
        let now = self.now;
        if control {
            let Some(frame) = self
                .links
                .get_mut(&(from, to))
                .and_then(|w| w.control.pop_front())
            else {
                return true;
            };
            let r = self.nodes[to]
                .core
                .handle_peer_frame(now, &node_name(from), &frame);
            assert!(r.is_ok());
            self.pump(to);
            return true;
        }
        let (drop, dup, swap) = (
            self.chance(self.faults.drop),
            self.chance(self.faults.dup),
            self.chance(self.faults.swap),
        );
        let Some(w) = self.links.get_mut(&(from, to)) else {
            return true;
        };
        if swap && w.data.len() >= 2 {
            w.data.swap(0, 1);
        }
        let Some((seq, frame)) = w.data.pop_front() else {
            return true;
        };
        if dup {
            w.data.push_front((seq, frame.clone()));
        }
        if drop {
            return true;
        }
        let fresh = self.ins.entry((from, to)).or_default().accept(seq);
        // The ack (cumulative) goes back at once; a lost ack only means
        // frames sent again, which `accept` drops.
        let acked = self.ins.get(&(from, to)).map_or(0, Inbound::acked);
        if let Some(o) = self.outs.get_mut(&(from, to)) {
            o.ack(acked);
        }
        if !fresh {
            return true;
        }
        if let Ok(PeerFrame::Event(crate::peer_frame::PeerEvent { channel, .. })) =
            PeerFrame::decode(&frame)
        {
            self.data_frames += 1;
            if self.nodes[to]
                .core
                .local_subscriber_count(AppIdx(0), &channel)
                == 0
            {
                self.misrouted += 1;
            }
        }
        let r = self.nodes[to]
            .core
            .handle_peer_frame(now, &node_name(from), &frame);
        assert!(r.is_ok());
        self.pump(to);
        true
    }

    /// Delivers every frame in flight, picking links at random.
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            if !self.step() {
                return;
            }
        }
        panic!("network did not settle");
    }

    /// Virtual time passes: ticks of every node, retransmissions.
    fn tick(&mut self) {
        self.now += std::time::Duration::from_millis(250);
        let now = self.now;
        for i in 0..self.nodes.len() {
            self.nodes[i].core.tick(now);
            self.pump(i);
        }
        let keys: Vec<(usize, usize)> = self.outs.keys().copied().collect();
        for (i, j) in keys {
            if let Some(o) = self.outs.get_mut(&(i, j)) {
                o.retransmit_due(now);
            }
            self.transmit(i, j);
        }
    }

    /// Heals every link and runs until nothing is held or in flight.
    fn heal_all(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            for j in (i + 1)..n {
                self.connect(i, j);
            }
        }
        self.flush(None);
    }

    /// Delivers and lets time pass until the buffers of node `from` (or of
    /// every node) are empty: everything they held was acknowledged.
    fn flush(&mut self, from: Option<usize>) {
        for _ in 0..200 {
            self.settle();
            if self
                .outs
                .iter()
                .filter(|((a, _), _)| from.is_none_or(|f| f == *a))
                .all(|(_, o)| o.is_empty())
            {
                return;
            }
            for _ in 0..8 {
                self.tick();
            }
        }
        panic!("buffers did not drain");
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

    /// Node `i` publishes now, with `tags` if any; not pumped yet.
    fn publish(
        &mut self,
        i: usize,
        req: &PublishRequest<'_>,
        tags: Option<&Tags>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let now = self.now;
        self.sync_room(i);
        self.nodes[i].core.publish_with(now, AppIdx(0), req, tags)
    }

    /// Node `i` publishes `name` (`data`) on `channel`, leaving out socket
    /// `exclude`; it must be acknowledged. Then the network settles.
    fn publish_settled(
        &mut self,
        i: usize,
        channel: &str,
        name: &str,
        data: &str,
        exclude: Option<&str>,
    ) {
        let channels = vec![channel.to_string()];
        let req = PublishRequest {
            name,
            data,
            channels: &channels,
            exclude_socket: exclude,
        };
        let r = self.publish(i, &req, None);
        assert!(r.is_ok(), "{r:?}");
        self.pump(i);
        self.settle();
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
