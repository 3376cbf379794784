//! One channel's history on one node: its events in the order this node
//! got them, and per origin what is held (`base` < seq ≤ `head`).
//!
//! Invariant: for every origin `o`, the log holds exactly the events of `o`
//! with `base[o] < seq ≤ head[o]`, in seq order. Eviction, expiry and gaps
//! raise `base`; appends raise `head`.

use std::collections::VecDeque;
use std::time::Instant;

use super::position::{Origin, Position};

/// One event as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Who published it.
    pub origin: Origin,
    /// Its number among the origin's events on the channel, from 1.
    pub seq: u64,
    /// Store-wide id (for memory eviction in arrival order).
    pub id: u64,
    /// When this node got it (for `ttl_secs`).
    pub at: Instant,
    /// When it was published, Unix ms (the origin's clock).
    pub at_ms: u64,
    /// Event name.
    pub event: Box<str>,
    /// Data.
    pub data: Box<str>,
    /// `user_id` of a presence client event.
    pub user_id: Option<Box<str>>,
    /// Its tags (subscription filters apply on replay too).
    pub tags: crate::filter::Tags,
}

impl Stored {
    /// What it costs in memory, roughly.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.event.len()
            + self.data.len()
            + self.user_id.as_ref().map_or(0, |u| u.len())
            + self
                .tags
                .iter()
                .map(|(k, v)| k.len() + v.len() + 32)
                .sum::<usize>()
    }
}

/// Whether a position can be continued here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Every event after it is held: replay them.
    Continuous,
    /// It is ahead of this node for a live origin: its events are on their
    /// way here (wait, bounded).
    Ahead,
    /// Events after it are gone (evicted, expired, never received) or it
    /// names events this node will never get: `recovered: false`.
    Lost,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored; `gap` when earlier events of its origin were missing (and
    /// the ones held before the gap were dropped, `dropped` of them).
    Stored {
        /// Whether events of the origin before it never arrived.
        gap: bool,
    },
    /// Held already (same origin and seq): not stored, not to deliver.
    Duplicate,
}

/// One channel's history.
#[derive(Debug, Default)]
pub struct ChannelLog {
    events: VecDeque<Stored>,
    base: Position,
    head: Position,
    bytes: usize,
}

impl ChannelLog {
    /// Events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The position after every event this node got on the channel.
    pub fn head(&self) -> &Position {
        &self.head
    }

    /// The oldest event held.
    pub fn front(&self) -> Option<&Stored> {
        self.events.front()
    }

    /// Every event held, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &Stored> {
        self.events.iter()
    }

    /// Whether nothing of any origin was ever lost here (every origin's
    /// events are held from its first).
    pub fn complete(&self) -> bool {
        self.base.entries().next().is_none()
    }

    /// Everything ≤ `base[o]` is gone for each origin `o`.
    pub fn base(&self) -> &Position {
        &self.base
    }

    /// The next sequence number of `o` (for this node's own publishes).
    pub fn next_seq(&self, o: Origin) -> u64 {
        self.head.get(o) + 1
    }

    /// Appends an event this node got (its own or a peer's).
    pub fn append(&mut self, e: Stored) -> (Appended, Vec<Stored>) {
        let head = self.head.get(e.origin);
        if e.seq <= head {
            return (Appended::Duplicate, Vec::new());
        }
        let mut dropped = Vec::new();
        let gap = e.seq != head + 1;
        if gap {
            // Events of this origin before the gap cannot continue any
            // position past them: drop them.
            let o = e.origin;
            if self.events.iter().any(|x| x.origin == o) {
                let (keep, drop): (VecDeque<Stored>, VecDeque<Stored>) =
                    std::mem::take(&mut self.events)
                        .into_iter()
                        .partition(|x| x.origin != o);
                self.events = keep;
                for x in drop {
                    self.bytes -= x.bytes();
                    dropped.push(x);
                }
            }
            self.base.raise(o, e.seq - 1);
        }
        self.head.raise(e.origin, e.seq);
        self.bytes += e.bytes();
        self.events.push_back(e);
        (Appended::Stored { gap }, dropped)
    }

    /// Gives every event a fresh id, in log order.
    pub fn renumber(&mut self, next_id: &mut u64) {
        for e in &mut self.events {
            *next_id += 1;
            e.id = *next_id;
        }
    }

    /// Removes the oldest event (evicted or expired): its origin's events
    /// up to it are gone.
    pub fn pop_front(&mut self) -> Option<Stored> {
        let e = self.events.pop_front()?;
        self.bytes -= e.bytes();
        self.base.raise(e.origin, e.seq);
        Some(e)
    }

    /// Whether the events after `p` can be replayed from here; `live`
    /// tells whether an origin may still send events to this node.
    pub fn check(&self, p: &Position, live: impl Fn(Origin) -> bool) -> Check {
        if self.base.entries().any(|(o, b)| p.get(o) < b) {
            return Check::Lost;
        }
        let mut ahead = false;
        for (o, s) in p.entries() {
            if s > self.head.get(o) {
                if !live(o) {
                    return Check::Lost;
                }
                ahead = true;
            }
        }
        if ahead {
            Check::Ahead
        } else {
            Check::Continuous
        }
    }

    /// The events after `p`, in this node's order, each with the position
    /// a client has after it (`p` raised by what came before and by it).
    pub fn after<'a>(&'a self, p: &Position) -> impl Iterator<Item = (&'a Stored, Position)> + 'a {
        let mut at = p.clone();
        let from = p.clone();
        self.events
            .iter()
            .filter(move |e| e.seq > from.get(e.origin))
            .map(move |e| {
                at.raise(e.origin, e.seq);
                (e, at.clone())
            })
    }

    /// Merges a peer's copy of this channel's history (`events` in its
    /// order, `peer_base` its base). Takes, per origin, the older events
    /// that continue this log's held range downwards (put in front); with
    /// `extend` (nobody here has been given a position on the channel: no
    /// local subscriber), also the newer ones that continue it upwards, or
    /// all of an origin this node never had (put behind). Returns how many
    /// events it took.
    pub fn merge(&mut self, events: Vec<Stored>, peer_base: &Position, extend: bool) -> usize {
        let mut peer_head = Position::default();
        for e in &events {
            peer_head.raise(e.origin, e.seq);
        }
        let (mut front, mut back) = (Vec::new(), Vec::new());
        for e in events {
            let o = e.origin;
            let (lb, lh) = (self.base.get(o), self.head.get(o));
            let (pb, ph) = (peer_base.get(o), peer_head.get(o));
            if lh == 0 {
                if extend {
                    back.push(e);
                }
            } else if e.seq <= lb && pb < lb && ph >= lb {
                front.push(e);
            } else if extend && e.seq > lh && pb <= lh {
                back.push(e);
            }
        }
        for e in &front {
            self.base.set(e.origin, peer_base.get(e.origin));
        }
        for e in &back {
            if self.head.get(e.origin) == 0 {
                self.base.set(e.origin, peer_base.get(e.origin));
            }
        }
        for e in &back {
            self.head.raise(e.origin, e.seq);
        }
        let n = front.len() + back.len();
        self.bytes += front.iter().chain(&back).map(Stored::bytes).sum::<usize>();
        let mut events = VecDeque::with_capacity(self.events.len() + n);
        events.extend(front);
        events.append(&mut self.events);
        events.extend(back);
        self.events = events;
        n
    }
}
