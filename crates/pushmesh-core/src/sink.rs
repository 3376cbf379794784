//! How the state machines hand their effects to a driver without I/O.
//!
//! The router shards and the user registry call a [`Sink`] for every effect,
//! in order, as they work. A driver's sink does the effect at once (queues a
//! frame on a connection, a frame on a peer link); a test's sink records it.
//! Nothing is collected in between, so a fan-out to 10,000 subscribers costs
//! 10,000 calls and no intermediate list.

use bytes::Bytes;
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::CloseCode;

use crate::app::{AppIdx, ConnId};
use crate::peer_frame::{Delta, FrameKind, NodeId};

/// What a shard stores for a subscriber: enough for the driver to reach the
/// connection (in tests the [`ConnId`] itself).
pub trait Handle: Clone {
    /// The connection it reaches.
    fn conn(&self) -> ConnId;
}

impl Handle for ConnId {
    fn conn(&self) -> ConnId {
        *self
    }
}

/// Why a publish's answer waits for a peer's acknowledgement of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckFor {
    /// The peer has subscribers for the event: the answer waits until
    /// every such peer acknowledged it (then a later publish, through any
    /// node, reaches them after it: order through the balancer), or is 503.
    Order,
    /// A history copy for a peer without subscribers: the answer waits
    /// (bounded) until any one peer holds the event.
    Copy,
}

/// Receives the effects of the state machines, in order.
pub trait Sink<H> {
    /// Write a text frame to a connection.
    fn send(&mut self, to: &H, frame: &Bytes);
    /// Write a state frame (superseded by the next one, like a
    /// `subscription_count`) if the connection has room for it now;
    /// false: not sent, and the connection is not a slow consumer for it.
    fn send_state(&mut self, to: &H, frame: &Bytes) -> bool {
        self.send(to, frame);
        true
    }
    /// Close a connection with a Pusher code (its session sends the
    /// `pusher:error` first).
    fn close(&mut self, to: &H, code: CloseCode, reason: &str);
    /// A frame for a peer node.
    fn peer(&mut self, to: &NodeId, kind: FrameKind, frame: &Bytes);
    /// A data frame of a publish whose acknowledgement its answer waits
    /// for, and why ([`AckFor`]).
    fn peer_durable(&mut self, to: &NodeId, frame: &Bytes, why: AckFor) {
        let _ = why;
        self.peer(to, FrameKind::Data, frame);
    }
    /// Whether a data frame for `to` can be held now (its buffer is not
    /// full). Asked for every interested peer before a publish is delivered
    /// anywhere, so a publish is refused whole or delivered everywhere.
    fn peer_has_room(&mut self, _to: &NodeId) -> bool {
        true
    }
    /// The subscription barrier: frames for `to` from now on wait until
    /// every peer has acknowledged this node's state changes so far
    /// (bounded). Called just before `subscription_succeeded`.
    fn hold(&mut self, _to: &H) {}
    /// A webhook event of an app (only for apps with webhooks).
    fn hook(&mut self, app: AppIdx, event: WebhookEvent);
    /// A change of this node's own state, to replicate to every peer.
    fn replicate(&mut self, delta: Delta);
}
