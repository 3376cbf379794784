//! Who may hold a connection: counts per client address (open connections,
//! pending handshakes) and the [`Ticket`] a connection carries while it is
//! pending, then for as long as it lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// Connections per client address, at most `max` (0: unlimited).
pub struct IpCounts {
    max: usize,
    map: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its client address; released on drop.
pub struct IpSlot {
    counts: Arc<IpCounts>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.counts.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The address already has as many as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl IpCounts {
    /// Counts of at most `max` per address; 0: unlimited.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            map: Mutex::new(HashMap::new()),
        })
    }

    /// How many `ip` holds now (0 when there is no limit).
    pub fn count(&self, ip: IpAddr) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    /// A slot for `ip`; `Ok(None)` when there is no limit.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Option<IpSlot>, Full> {
        if self.max == 0 {
            return Ok(None);
        }
        let ip = ip.to_canonical();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= self.max {
            return Err(Full);
        }
        *n += 1;
        Ok(Some(IpSlot {
            counts: self.clone(),
            ip,
        }))
    }
}

/// What a pending connection holds until it is established: one of the
/// node's `max_pending_handshakes` slots and one of its address's
/// `max_pending_handshakes_per_ip`.
#[derive(Default)]
pub struct PendingSlots {
    /// The node-wide slot.
    pub node: Option<OwnedSemaphorePermit>,
    /// The per-address slot.
    pub ip: Option<IpSlot>,
}

/// The state of one connection, handed to the WebSocket handlers as a
/// request extension: they call [`Ticket::established`] once the upgrade is
/// done and keep the ticket (its open-connection slot) as long as the
/// WebSocket lives.
#[derive(Clone)]
pub struct Ticket(Arc<TicketState>);

struct TicketState {
    pending: AtomicBool,
    slots: Mutex<PendingSlots>,
    ip: Mutex<Option<IpSlot>>,
}

impl Ticket {
    /// A pending connection holding `slots` and, when the address is
    /// limited, its open-connection slot `ip`.
    pub fn new(slots: PendingSlots, ip: Option<IpSlot>) -> Self {
        Self(Arc::new(TicketState {
            pending: AtomicBool::new(true),
            slots: Mutex::new(slots),
            ip: Mutex::new(ip),
        }))
    }

    /// The connection is established: its pending slots are released and
    /// the handshake deadline no longer applies.
    pub fn established(&self) {
        self.0.pending.store(false, Ordering::Release);
        let slots = std::mem::take(&mut *self.0.slots.lock().unwrap_or_else(|p| p.into_inner()));
        drop(slots);
    }

    /// Whether the connection is still pending.
    pub fn is_pending(&self) -> bool {
        self.0.pending.load(Ordering::Acquire)
    }

    /// The open-connection slot of the client address, if it is limited.
    pub fn ip_slot(&self) -> std::sync::MutexGuard<'_, Option<IpSlot>> {
        self.0.ip.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
        let counts = IpCounts::new(2);
        let a = counts.take(ip("127.0.0.1"));
        let b = counts.take(ip("::ffff:127.0.0.1"));
        assert!(a.as_ref().is_ok_and(Option::is_some) && b.is_ok());
        assert_eq!(
            counts.take(ip("127.0.0.1")).err(),
            Some(Full),
            "mapped v4 is the same address"
        );
        assert!(counts.take(ip("127.0.0.2")).is_ok(), "others unaffected");
        drop(a);
        assert!(counts.take(ip("127.0.0.1")).is_ok(), "a slot back");
        assert!(IpCounts::new(0)
            .take(ip("127.0.0.1"))
            .is_ok_and(|s| s.is_none()));
    }
}
