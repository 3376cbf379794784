//! What the seeded schedules of `continuity.rs` and `history.rs` share: the
//! generator, the faulty network they start with, the network operations
//! both draw, the `PUSHMESH_SIM_*` knobs and the order check per publisher.

use super::{Faults, Net};
use crate::PublishRequest;

/// A small deterministic generator (xorshift), so a failing seed replays.
pub(super) struct Gen(u64);

impl Gen {
    /// The generator of schedule `seed`.
    pub(super) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(super) fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// `nodes` nodes linked to each other whose data streams drop, duplicate
/// and swap 3 % of frames each.
pub(super) fn faulty_net(nodes: usize, seed: u64) -> Net {
    let faults = Faults {
        drop: 30,
        dup: 30,
        swap: 30,
        buffer_frames: 2,
    };
    Net::with(nodes, seed, faults)
}

/// A knob from the environment (`PUSHMESH_SIM_SCHEDULES`, `_SEED`, `_OPS`).
pub(super) fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Net {
    /// Up to `k` deliveries, fewer if nothing is in flight.
    pub(super) fn steps(&mut self, k: usize) {
        for _ in 0..k {
            if !self.step() {
                break;
            }
        }
    }

    /// `j` declares `i` dead, if they are two nodes and not linked.
    pub(super) fn declare_dead_if_cut(&mut self, j: usize, i: usize) {
        if i != j && !self.links.contains_key(&(i, j)) {
            self.declare_dead(j, i);
        }
    }

    /// Publishes `event` on `channel` at node `i`, not pumped yet; whether
    /// it was acknowledged.
    pub(super) fn publish_at(&mut self, i: usize, channel: &str, event: &str) -> bool {
        let channels = vec![channel.to_string()];
        let req = PublishRequest {
            name: event,
            data: "{}",
            channels: &channels,
            exclude_socket: None,
        };
        self.publish(i, &req, None).is_ok()
    }
}

/// The network operations both schedules draw.
#[derive(Debug, Clone, Copy)]
pub(super) enum NetOp {
    /// Up to this many deliveries.
    Step(usize),
    /// Virtual time advances one tick.
    Tick,
    Cut(usize, usize),
    Heal(usize, usize),
}

impl Net {
    pub(super) fn apply(&mut self, op: NetOp) {
        match op {
            NetOp::Step(k) => self.steps(k),
            NetOp::Tick => self.tick(),
            NetOp::Cut(i, j) => self.cut(i, j),
            NetOp::Heal(i, j) => self.connect(i, j),
        }
    }
}

/// One acknowledged publish `e<k>`, the `k`-th of its schedule.
pub(super) struct Published<E> {
    /// Index of the operation that published it.
    pub(super) at_op: usize,
    pub(super) from: usize,
    pub(super) from_epoch: u64,
    pub(super) channel: usize,
    pub(super) event: String,
    /// Who had a confirmed subscription to its channel when it was
    /// acknowledged.
    pub(super) expected: Vec<E>,
}

impl<E> Published<E> {
    /// Published by node `from` (its current incarnation) at operation
    /// `at_op`.
    pub(super) fn new(
        net: &Net,
        at_op: usize,
        from: usize,
        channel: usize,
        event: String,
        expected: Vec<E>,
    ) -> Self {
        let from_epoch = net.nodes[from].epoch;
        Self {
            at_op,
            from,
            from_epoch,
            channel,
            event,
            expected,
        }
    }
}

/// The first event `e<k>` (found in `published` by name) among `events` that
/// came after a later event of the same publisher incarnation, as (k,
/// publisher node). Other events are skipped.
pub(super) fn out_of_order<'a, E>(
    events: impl IntoIterator<Item = &'a str>,
    published: &[Published<E>],
) -> Option<(u64, usize)> {
    let mut last = std::collections::BTreeMap::new();
    for e in events {
        let Some(k) = e.strip_prefix('e').and_then(|x| x.parse::<u64>().ok()) else {
            continue;
        };
        // Refused publishes are not in `published`: found by name.
        let Some(p) = published.iter().find(|p| p.event == e) else {
            continue;
        };
        let key = (p.from, p.from_epoch);
        if last.get(&key).is_some_and(|l| *l >= k) {
            return Some((k, key.0));
        }
        last.insert(key, k);
    }
    None
}

#[test]
fn out_of_order_names_the_first_event_after_a_later_one_of_its_incarnation() {
    let net = Net::new();
    let published: Vec<Published<usize>> = [(0, "e1"), (1, "e2"), (0, "e3")]
        .into_iter()
        .map(|(from, e)| Published::new(&net, 0, from, 0, e.to_string(), Vec::new()))
        .collect();
    let check = |events: &[&str]| out_of_order(events.iter().copied(), &published);
    assert_eq!(check(&["e1", "e2", "e3", "x", "e9"]), None);
    // e2 is another node's: only e1 after e3 is out of order.
    assert_eq!(check(&["e2", "e3", "e1"]), Some((1, 0)));
    assert_eq!(check(&["e3", "e2", "e1"]), Some((1, 0)));
    assert_eq!(
        check(&["e1", "e1"]),
        Some((1, 0)),
        "a repeat is out of order"
    );
}
