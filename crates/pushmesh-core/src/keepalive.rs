//! Per-connection keepalive: ping an idle client, close it when no pong comes.

use std::time::{Duration, Instant};

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveAction {
    /// Nothing to do before [`Keepalive::deadline`].
    Wait,
    /// Send `pusher:ping`.
    SendPing,
    /// No pong came in time: close with 4201.
    Close,
}

/// Keepalive state of one connection, driven with `now`.
#[derive(Debug, Clone)]
pub struct Keepalive {
    idle: Duration,
    pong_timeout: Duration,
    last_activity: Instant,
    ping_sent: Option<Instant>,
}

impl Keepalive {
    /// Pings after `idle` without traffic; closes `pong_timeout` after an unanswered ping.
    pub fn new(now: Instant, idle: Duration, pong_timeout: Duration) -> Self {
        Self {
            idle,
            pong_timeout,
            last_activity: now,
            ping_sent: None,
        }
    }

    /// Any frame from the client counts as activity.
    pub fn on_activity(&mut self, now: Instant) {
        self.last_activity = now;
        self.ping_sent = None;
    }

    /// When [`Keepalive::poll`] has something to do next.
    pub fn deadline(&self) -> Instant {
        match self.ping_sent {
            Some(at) => at + self.pong_timeout,
            None => self.last_activity + self.idle,
        }
    }

    /// Advances to `now`.
    pub fn poll(&mut self, now: Instant) -> KeepaliveAction {
        if now < self.deadline() {
            return KeepaliveAction::Wait;
        }
        match self.ping_sent {
            Some(_) => KeepaliveAction::Close,
            None => {
                self.ping_sent = Some(now);
                KeepaliveAction::SendPing
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_then_closes() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(t0, 120 * s, 30 * s);
        assert_eq!(k.poll(t0 + 119 * s), KeepaliveAction::Wait);
        assert_eq!(k.poll(t0 + 120 * s), KeepaliveAction::SendPing);
        assert_eq!(k.deadline(), t0 + 150 * s);
        assert_eq!(k.poll(t0 + 149 * s), KeepaliveAction::Wait);
        assert_eq!(k.poll(t0 + 150 * s), KeepaliveAction::Close);
    }

    #[test]
    fn activity_resets() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(t0, 10 * s, 5 * s);
        assert_eq!(k.poll(t0 + 10 * s), KeepaliveAction::SendPing);
        k.on_activity(t0 + 12 * s);
        assert_eq!(k.poll(t0 + 16 * s), KeepaliveAction::Wait);
        assert_eq!(k.deadline(), t0 + 22 * s);
    }
}
