//! Which shard holds a channel, and which node owns a channel's webhooks.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use sha2::{Digest, Sha256};

use crate::app::AppIdx;
use crate::peer_frame::NodeId;

/// The shard of a channel among `shards`: a fixed hash of (app, name), the
/// same for every part of one node (a node's own choice, never on the wire).
pub fn shard_of(app: AppIdx, channel: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one((app.0, channel));
    (h % shards as u64) as usize
}

/// A stable 64-bit hash of length-prefixed parts, the same on every node.
pub fn hash64(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// Whether `node` owns `(app_id, channel)` among itself and `peers`, by
/// rendezvous hashing: every node computes the same owner from the same view.
pub fn is_owner(node: &NodeId, peers: &BTreeSet<NodeId>, app_id: &str, channel: &str) -> bool {
    if peers.is_empty() {
        return true;
    }
    let mine = hash64(&[node.as_str(), app_id, channel]);
    peers
        .iter()
        .all(|p| (hash64(&[p.as_str(), app_id, channel]), p) < (mine, node))
}
