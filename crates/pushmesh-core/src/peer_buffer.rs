//! Exactly-once data frames between two node incarnations, across link loss.
//!
//! Every data frame a node sends to a peer gets a sequence number and stays
//! in that peer's [`Outbound`] buffer until the peer acknowledges it
//! (cumulatively). When a link comes back to the **same incarnation** (epoch)
//! of the peer, everything unacknowledged is sent again and the peer's
//! [`Inbound`] drops what it already had; a frame lost or reordered on the
//! way is sent again after a retransmission timeout. A peer that restarted
//! (new epoch) has new connections: its buffer is discarded and numbering
//! starts over.
//!
//! The buffer is bounded: [`Outbound::has_room`] is asked before a publish
//! is delivered anywhere, so a publish that cannot be held for every
//! interested peer is refused whole (the HTTP API answers 503), never
//! delivered to some and lost for others. A small slack above the limit
//! absorbs publishes that passed the check at the same moment on other
//! shards.
//!
//! Each buffer numbers its frames in a **stream**: `epoch << 20 | n`, where
//! `epoch` is the sender's incarnation and `n` counts the buffers it made
//! for that peer. The stream is announced when a link comes up. A receiver
//! that sees a new stream from the same incarnation of a sender knows the
//! sender forgot it for a while (declared it dead during a long
//! partition): messages may have been lost for its subscribers, and it
//! must say so to them ([`Inbound::link_up`] returns [`Continuity::Broken`]).
//!
//! Sans-IO: the link driver asks for frames to write ([`Outbound::take`]),
//! reports acks and link changes, and passes `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Frames accepted above the soft limit (publishes racing on other shards).
const SLACK: usize = 1024;

/// How long an unacknowledged frame waits before it is sent again on the
/// same link (acks normally arrive within a round trip).
pub const RETRANSMIT_AFTER: Duration = Duration::from_secs(2);

/// The buffer of one peer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer buffer full")]
pub struct BufferFull;

/// Counters of an [`Outbound`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutboundStats {
    /// Frames sent again (link back to the same incarnation, or retransmission).
    pub replayed: u64,
    /// Frames discarded unacknowledged because the peer restarted.
    pub discarded: u64,
}

/// A stream id: the sender's epoch and a counter of its buffers for a peer.
pub fn stream_id(epoch: u64, n: u64) -> u64 {
    (epoch << 20) | (n & 0xF_FFFF)
}

/// What a peer has not yet acknowledged, for one incarnation of it.
#[derive(Debug)]
pub struct Outbound {
    stream: u64,
    peer_epoch: Option<u64>,
    /// Sequence number of `frames[0]`.
    base: u64,
    frames: VecDeque<(Bytes, Option<Instant>)>,
    /// Sequence number of the next frame to hand to the link.
    cursor: u64,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    link_up: bool,
    stats: OutboundStats,
}

impl Outbound {
    /// A buffer numbering in `stream` (see [`stream_id`]), holding at most
    /// `max_frames` frames and `max_bytes` bytes.
    pub fn new(stream: u64, max_frames: usize, max_bytes: usize) -> Self {
        Self {
            stream,
            peer_epoch: None,
            base: 1,
            frames: VecDeque::new(),
            cursor: 1,
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes: max_bytes.max(1),
            link_up: false,
            stats: OutboundStats::default(),
        }
    }

    /// Whether a new frame may be accepted now (below the soft limits).
    pub fn has_room(&self) -> bool {
        self.frames.len() < self.max_frames && self.bytes < self.max_bytes
    }

    /// Holds a frame; returns its sequence number. Refused only above the
    /// soft limit plus a small slack.
    pub fn push(&mut self, frame: Bytes) -> Result<u64, BufferFull> {
        if self.frames.len() >= self.max_frames + SLACK
            || self.bytes >= self.max_bytes.saturating_add(SLACK * 1024)
        {
            return Err(BufferFull);
        }
        self.bytes += frame.len();
        self.frames.push_back((frame, None));
        Ok(self.base + self.frames.len() as u64 - 1)
    }

    /// Frames held (sent and unacknowledged, or not yet sent).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> OutboundStats {
        self.stats
    }

    /// The stream its frames are numbered in (announced on each link).
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// Whether there is something to write on the current link.
    pub fn wants_write(&self) -> bool {
        self.link_up && self.cursor < self.base + self.frames.len() as u64
    }

    /// Appends up to `max` frames to write on the link, with their sequence
    /// numbers, and marks them sent at `now`.
    pub fn take(&mut self, now: Instant, max: usize, out: &mut Vec<(u64, Bytes)>) {
        if !self.link_up {
            return;
        }
        let end = self.base + self.frames.len() as u64;
        while self.cursor < end && out.len() < max {
            let i = (self.cursor - self.base) as usize;
            let (f, sent) = &mut self.frames[i];
            *sent = Some(now);
            out.push((self.cursor, f.clone()));
            self.cursor += 1;
        }
    }

    /// The highest sequence number the peer acknowledged.
    pub fn acked_through(&self) -> u64 {
        self.base - 1
    }

    /// The peer has everything up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.base <= seq {
            let Some((f, _)) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= f.len();
            self.base += 1;
        }
        self.cursor = self.cursor.max(self.base);
    }

    /// A link to the peer is up; `peer_epoch` is its incarnation. The same
    /// incarnation gets every unacknowledged frame again; a new one starts
    /// over with an empty buffer.
    pub fn link_up(&mut self, peer_epoch: u64) {
        if self.peer_epoch.is_some_and(|e| e != peer_epoch) {
            self.stats.discarded += self.frames.len() as u64;
            self.frames.clear();
            self.bytes = 0;
            self.base = 1;
            self.cursor = 1;
            self.stream = self.stream.wrapping_add(1);
        }
        self.peer_epoch = Some(peer_epoch);
        self.stats.replayed += self.cursor - self.base;
        self.cursor = self.base;
        self.link_up = true;
    }

    /// The link is gone; frames stay held for the next one.
    pub fn link_down(&mut self) {
        self.link_up = false;
    }

    /// Sends again what waited longer than [`RETRANSMIT_AFTER`] for its ack.
    /// Returns whether something is to be written again.
    pub fn retransmit_due(&mut self, now: Instant) -> bool {
        let oldest = self.frames.front().and_then(|(_, s)| *s);
        if self.link_up
            && oldest.is_some_and(|t| now.saturating_duration_since(t) >= RETRANSMIT_AFTER)
        {
            self.stats.replayed += self.cursor - self.base;
            self.cursor = self.base;
            return true;
        }
        false
    }
}

/// Whether a sender's data stream continues the one received before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The same stream, a first stream, or a restarted sender.
    Continues,
    /// The same incarnation of the sender started a new stream: it forgot
    /// this node for a while, and messages for its subscribers may be lost.
    Broken,
}

/// What one node has received of a peer's data frames.
#[derive(Debug, Default)]
pub struct Inbound {
    stream: Option<u64>,
    last: u64,
    duplicates: u64,
}

impl Inbound {
    /// A link from the sender is up and announces its stream.
    pub fn link_up(&mut self, stream: u64) -> Continuity {
        let old = self.stream.replace(stream);
        match old {
            Some(s) if s == stream => Continuity::Continues,
            Some(s) => {
                self.last = 0;
                if s >> 20 == stream >> 20 {
                    Continuity::Broken
                } else {
                    Continuity::Continues
                }
            }
            None => {
                self.last = 0;
                Continuity::Continues
            }
        }
    }

    /// A frame numbered `seq` of the current stream: whether to deliver it
    /// (exactly the next one). Duplicates and frames after a gap are
    /// dropped (the sender sends the missing ones again).
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq == self.last + 1 {
            self.last = seq;
            true
        } else {
            self.duplicates += 1;
            false
        }
    }

    /// The cumulative acknowledgement to send: everything up to this.
    pub fn acked(&self) -> u64 {
        self.last
    }

    /// Frames dropped as duplicates or out of order.
    pub fn dropped(&self) -> u64 {
        self.duplicates
    }
}

#[cfg(test)]
mod tests;
