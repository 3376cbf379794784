//! The node-level glue both drivers share: where a peer's state changes
//! go (which shard, or the user registry), and the `CopyDone` parts the
//! shards end a copy to a new peer with.

use bytes::Bytes;

use crate::app::Apps;
use crate::peer_frame::{Delta, NodeId, PeerFrame};
use crate::routing::shard_of;

/// A peer's state changes by where they apply.
#[derive(Debug, Default)]
pub struct SplitApply {
    /// Per shard, in the order they came.
    pub shards: Vec<Vec<(NodeId, Delta)>>,
    /// Signed-in users' changes, for the user registry.
    pub users: Vec<(NodeId, Delta)>,
}

/// Splits the replicator's `apply` by shard (changes of unknown apps or
/// without a channel are dropped). Each must be applied before the
/// replicator's acknowledgements are sent.
pub fn split_apply(apps: &Apps, shards: usize, apply: Vec<(NodeId, Delta)>) -> SplitApply {
    let mut out = SplitApply {
        shards: vec![Vec::new(); shards],
        users: Vec::new(),
    };
    for (peer, d) in apply {
        if matches!(d, Delta::User { .. }) {
            out.users.push((peer, d));
        } else if let (Some(app), Some(ch)) = (apps.by_id(d.app()), d.channel()) {
            out.shards[shard_of(app, ch, shards)].push((peer, d));
        }
    }
    out
}

/// Each shard's encoded part of `CopyDone` (this node's incarnation `epoch`).
pub fn copy_done_frames(epoch: u64, shards: usize) -> Vec<Bytes> {
    let n = shards as u32;
    (0..n)
        .map(|shard| {
            PeerFrame::CopyDone {
                epoch,
                shard,
                shards: n,
            }
            .encode()
        })
        .collect()
}
