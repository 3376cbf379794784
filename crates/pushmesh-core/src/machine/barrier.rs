//! The subscription barrier's waiting room: connections whose
//! `subscription_succeeded` waits until every peer has acknowledged this
//! node's state changes up to a number, or until a deadline.

use std::time::Instant;

/// Connections held by the subscription barrier.
#[derive(Debug)]
pub struct Barrier<C> {
    /// (change number waited for, deadline, connection).
    waiters: Vec<(u64, Instant, C)>,
}

impl<C> Default for Barrier<C> {
    fn default() -> Self {
        Self {
            waiters: Vec::new(),
        }
    }
}

/// A connection the barrier let go.
#[derive(Debug, PartialEq, Eq)]
pub struct Released<C> {
    /// The connection.
    pub conn: C,
    /// Whether it went because its deadline passed (not every peer
    /// acknowledged in time).
    pub timed_out: bool,
}

impl<C> Barrier<C> {
    /// Holds `conn` until every peer acknowledged change `seq`, at most
    /// until `deadline`.
    pub fn hold(&mut self, seq: u64, deadline: Instant, conn: C) {
        self.waiters.push((seq, deadline, conn));
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Lets go the connections whose change every peer acknowledged
    /// (`acked`: the lowest number all peers acknowledged) and those past
    /// their deadline, in the order they were held.
    pub fn release(&mut self, now: Instant, acked: u64, out: &mut Vec<Released<C>>) {
        if self.waiters.is_empty() {
            return;
        }
        for (seq, deadline, conn) in std::mem::take(&mut self.waiters) {
            if seq <= acked || deadline <= now {
                out.push(Released {
                    conn,
                    timed_out: seq > acked,
                });
            } else {
                self.waiters.push((seq, deadline, conn));
            }
        }
    }

    /// The earliest deadline of a held connection: when the barrier next
    /// needs time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.waiters.iter().map(|(_, d, _)| *d).min()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn releases_on_ack_or_deadline_in_hold_order() {
        let t0 = Instant::now();
        let mut b = Barrier::default();
        b.hold(3, t0 + Duration::from_secs(1), 'a');
        b.hold(1, t0 + Duration::from_secs(1), 'b');
        b.hold(5, t0 + Duration::from_secs(2), 'c');
        assert_eq!(b.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        let mut out = Vec::new();
        b.release(t0, 3, &mut out);
        assert_eq!(
            out,
            vec![
                Released {
                    conn: 'a',
                    timed_out: false
                },
                Released {
                    conn: 'b',
                    timed_out: false
                }
            ]
        );
        out.clear();
        b.release(t0 + Duration::from_millis(1999), 4, &mut out);
        assert!(out.is_empty());
        b.release(t0 + Duration::from_secs(2), 4, &mut out);
        assert_eq!(
            out,
            vec![Released {
                conn: 'c',
                timed_out: true
            }]
        );
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
    }
}
