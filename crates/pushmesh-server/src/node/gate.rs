//! Whether the node takes publishes (joining, open, closed by a drain) and
//! why it refuses one (the `reason` of the 503 and its metric label).

use std::sync::atomic::{AtomicU8, Ordering};

/// Why a publish is answered 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node has not joined its cluster yet.
    Joining = 0,
    /// The node is draining, past its wait.
    Draining = 1,
    /// An interested peer's buffer is full.
    PeerBufferFull = 2,
}

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; 3] = [Self::Joining, Self::Draining, Self::PeerBufferFull];

    /// The `reason` of the JSON error and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Draining => "draining",
            Self::PeerBufferFull => "peer_buffer_full",
        }
    }
}

/// Whether the node takes publishes: joining → open → closed (drain).
pub struct PublishGate(pub(super) AtomicU8);

impl PublishGate {
    pub(super) const JOINING: u8 = 0;
    pub(super) const OPEN: u8 = 1;
    const CLOSED: u8 = 2;

    /// Publishes are taken (the node joined, or has no cluster).
    pub fn open(&self) {
        let _ = self.0.compare_exchange(
            Self::JOINING,
            Self::OPEN,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Publishes are refused from now on (drain, past the wait).
    pub fn close(&self) {
        self.0.store(Self::CLOSED, Ordering::Release);
    }

    /// Whether the node has joined (opened at least once).
    pub fn joined(&self) -> bool {
        self.0.load(Ordering::Acquire) != Self::JOINING
    }

    pub(super) fn check(&self) -> Result<(), Refusal> {
        match self.0.load(Ordering::Acquire) {
            Self::OPEN => Ok(()),
            Self::JOINING => Err(Refusal::Joining),
            _ => Err(Refusal::Draining),
        }
    }
}
