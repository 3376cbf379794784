//! Whether the node takes publishes (joining, open, closed by a drain) and
//! why it refuses one (the `reason` of the 503 and its metric label).

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

pub use pushmesh_core::Refusal;

/// Whether the node takes publishes: joining → open → closed (drain); and
/// how many taken publishes are still being handed to the peers (a drain
/// waits for them before it flushes the links).
pub struct PublishGate(pub(super) AtomicU8, pub(super) AtomicUsize);

/// A publish that passed the gate; dropped once it is answered.
pub struct Entered<'a>(&'a AtomicUsize);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

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
        self.0.store(Self::CLOSED, Ordering::SeqCst);
    }

    /// After [`PublishGate::close`]: waits (bounded) until every publish
    /// that passed the gate has been handed to the peers and answered.
    pub async fn wait_idle(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.1.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the node has joined (opened at least once).
    pub fn joined(&self) -> bool {
        self.0.load(Ordering::Acquire) != Self::JOINING
    }

    /// Passes the gate, or says why not. Counted before the state is read,
    /// so a drain that closes the gate and then waits for idle sees it.
    pub(super) fn enter(&self) -> Result<Entered<'_>, Refusal> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(&self.1);
        match self.0.load(Ordering::SeqCst) {
            Self::OPEN => Ok(entered),
            Self::JOINING => Err(Refusal::Joining),
            _ => Err(Refusal::Draining),
        }
    }
}
