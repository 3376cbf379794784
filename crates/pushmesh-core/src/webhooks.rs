//! Sans-IO scheduling of webhook events before delivery.
//!
//! `channel_vacated` and `member_removed` wait `delay` (Pusher: ~3 s): if the
//! channel is occupied again, or the member added again, in that time, both
//! the pending event and its undo are dropped, so the app never hears of a
//! blip. Everything else is ready at once, in the order it was pushed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use pushmesh_protocol::webhook::WebhookEvent;

use crate::AppIdx;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Channel(AppIdx, String),
    Member(AppIdx, String, String),
}

/// Delays and cancels webhook events; see the module docs.
#[derive(Debug)]
pub struct WebhookScheduler {
    delay: Duration,
    /// Delayed events in due order (the delay is constant, so push order is due order).
    delayed: VecDeque<(Instant, u64, AppIdx, WebhookEvent)>,
    /// Live delayed events by what would cancel them, with their id.
    pending: HashMap<Key, u64>,
    ready: VecDeque<(AppIdx, WebhookEvent)>,
    next_id: u64,
    cancelled: u64,
}

impl WebhookScheduler {
    /// A scheduler delaying vacate / member-removed events by `delay`.
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            delayed: VecDeque::new(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            next_id: 0,
            cancelled: 0,
        }
    }

    /// An event from the core.
    pub fn push(&mut self, now: Instant, app: AppIdx, event: WebhookEvent) {
        let (delay_key, undo_key) = match &event {
            WebhookEvent::ChannelVacated { channel } => {
                (Some(Key::Channel(app, channel.clone())), None)
            }
            WebhookEvent::ChannelOccupied { channel } => {
                (None, Some(Key::Channel(app, channel.clone())))
            }
            WebhookEvent::MemberRemoved { channel, user_id } => (
                Some(Key::Member(app, channel.clone(), user_id.clone())),
                None,
            ),
            WebhookEvent::MemberAdded { channel, user_id } => (
                None,
                Some(Key::Member(app, channel.clone(), user_id.clone())),
            ),
            _ => (None, None),
        };
        if let Some(k) = undo_key {
            if self.pending.remove(&k).is_some() {
                // The pending removal and this addition cancel out.
                self.cancelled += 2;
                return;
            }
        }
        match delay_key {
            Some(k) => {
                let id = self.next_id;
                self.next_id += 1;
                self.pending.insert(k, id);
                self.delayed.push_back((now + self.delay, id, app, event));
            }
            None => self.ready.push_back((app, event)),
        }
    }

    fn promote(&mut self, id: u64, app: AppIdx, event: WebhookEvent) {
        let key = match &event {
            WebhookEvent::ChannelVacated { channel } => Key::Channel(app, channel.clone()),
            WebhookEvent::MemberRemoved { channel, user_id } => {
                Key::Member(app, channel.clone(), user_id.clone())
            }
            _ => {
                self.ready.push_back((app, event));
                return;
            }
        };
        // Only if still live (not cancelled, not superseded).
        if self.pending.get(&key) == Some(&id) {
            self.pending.remove(&key);
            self.ready.push_back((app, event));
        }
    }

    /// Advances to `now` and takes every event ready for delivery.
    pub fn poll(&mut self, now: Instant) -> Vec<(AppIdx, WebhookEvent)> {
        while self.delayed.front().is_some_and(|(due, ..)| *due <= now) {
            if let Some((_, id, app, event)) = self.delayed.pop_front() {
                self.promote(id, app, event);
            }
        }
        self.ready.drain(..).collect()
    }

    /// On shutdown: everything still delayed becomes ready now.
    pub fn flush(&mut self) -> Vec<(AppIdx, WebhookEvent)> {
        while let Some((_, id, app, event)) = self.delayed.pop_front() {
            self.promote(id, app, event);
        }
        self.ready.drain(..).collect()
    }

    /// When the next delayed event is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.front().map(|(due, ..)| *due)
    }

    /// Events dropped because they cancelled out.
    pub fn cancelled(&self) -> u64 {
        self.cancelled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vacated(c: &str) -> WebhookEvent {
        WebhookEvent::ChannelVacated { channel: c.into() }
    }
    fn occupied(c: &str) -> WebhookEvent {
        WebhookEvent::ChannelOccupied { channel: c.into() }
    }

    #[test]
    fn quick_reoccupy_cancels_both() {
        let t0 = Instant::now();
        let d = Duration::from_secs(3);
        let mut s = WebhookScheduler::new(d);
        let app = AppIdx(0);
        s.push(t0, app, occupied("a"));
        assert_eq!(s.poll(t0), vec![(app, occupied("a"))]);
        s.push(t0, app, vacated("a"));
        assert!(s.poll(t0 + Duration::from_secs(1)).is_empty());
        s.push(t0 + Duration::from_secs(2), app, occupied("a"));
        assert!(
            s.poll(t0 + Duration::from_secs(10)).is_empty(),
            "neither vacated nor occupied"
        );
        assert_eq!(s.cancelled(), 2);
        s.push(t0 + Duration::from_secs(11), app, vacated("a"));
        assert!(s.poll(t0 + Duration::from_secs(13)).is_empty());
        assert_eq!(
            s.poll(t0 + Duration::from_secs(14)),
            vec![(app, vacated("a"))]
        );
    }

    #[test]
    fn member_removed_then_added_cancels() {
        let t0 = Instant::now();
        let mut s = WebhookScheduler::new(Duration::from_secs(3));
        let app = AppIdx(1);
        let removed = WebhookEvent::MemberRemoved {
            channel: "presence-a".into(),
            user_id: "1".into(),
        };
        let added = WebhookEvent::MemberAdded {
            channel: "presence-a".into(),
            user_id: "1".into(),
        };
        let other = WebhookEvent::MemberAdded {
            channel: "presence-a".into(),
            user_id: "2".into(),
        };
        s.push(t0, app, removed.clone());
        s.push(t0, app, other.clone());
        s.push(t0, app, added);
        assert_eq!(s.poll(t0 + Duration::from_secs(5)), vec![(app, other)]);
        s.push(t0, app, removed.clone());
        assert_eq!(
            s.flush(),
            vec![(app, removed)],
            "flush releases delayed events"
        );
    }
}
