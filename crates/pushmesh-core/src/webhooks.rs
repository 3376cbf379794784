//! Sans-IO scheduling of webhook events before delivery.
//!
//! `channel_vacated` and `member_removed` wait `delay` (Pusher: ~3 s): if the
//! channel is occupied again, or the member added again, in that time, both
//! the pending event and its undo are dropped, so the app never hears of a
//! blip. Everything else is ready at once, in the order it was pushed.
//!
//! Every scheduled event gets a stable id, `<node>:<epoch>:<n>` once
//! [`WebhookScheduler::set_origin`] named the node (`<n>` alone before),
//! which travels with it to a backup node (`hook_backup.rs`) and into the
//! webhook body. Ids of events dropped by a cancellation are kept for
//! [`WebhookScheduler::take_cancelled`], so a backup can forget them too.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use pushmesh_protocol::webhook::WebhookEvent;

use crate::AppIdx;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Channel(AppIdx, String),
    Member(AppIdx, String, String),
}

/// A webhook event ready for delivery, with its stable id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledHook {
    /// Stable id (the same on a backup node).
    pub id: String,
    /// The app.
    pub app: AppIdx,
    /// The event.
    pub event: WebhookEvent,
}

/// Delays and cancels webhook events; see the module docs.
#[derive(Debug)]
pub struct WebhookScheduler {
    delay: Duration,
    /// Delayed events in due order (the delay is constant, so push order is due order).
    delayed: VecDeque<(Instant, u64, AppIdx, WebhookEvent)>,
    /// Live delayed events by what would cancel them, with their id.
    pending: HashMap<Key, u64>,
    ready: VecDeque<ScheduledHook>,
    next_id: u64,
    cancelled: u64,
    origin: String,
    cancelled_ids: Vec<String>,
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
            origin: String::new(),
            cancelled_ids: Vec::new(),
        }
    }

    /// Names the node and incarnation in the ids of later events.
    pub fn set_origin(&mut self, node: &str, epoch: u64) {
        self.origin = format!("{node}:{epoch}:");
    }

    fn id(&self, n: u64) -> String {
        format!("{}{n}", self.origin)
    }

    /// An event released by a backup: ready at once, with its original id.
    pub fn push_held(&mut self, id: String, app: AppIdx, event: WebhookEvent) {
        self.ready.push_back(ScheduledHook { id, app, event });
    }

    /// Ids of events dropped by cancellations since the last call.
    pub fn take_cancelled(&mut self) -> Vec<String> {
        std::mem::take(&mut self.cancelled_ids)
    }

    /// An event from the core; its id, unless it cancelled out at once.
    pub fn push(&mut self, now: Instant, app: AppIdx, event: WebhookEvent) -> Option<String> {
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
            if let Some(id) = self.pending.remove(&k) {
                // The pending removal and this addition cancel out.
                self.cancelled += 2;
                let id = self.id(id);
                self.cancelled_ids.push(id);
                return None;
            }
        }
        let n = self.next_id;
        self.next_id += 1;
        match delay_key {
            Some(k) => {
                if let Some(old) = self.pending.insert(k, n) {
                    // Superseded: the older one will never be delivered.
                    let old = self.id(old);
                    self.cancelled_ids.push(old);
                }
                self.delayed.push_back((now + self.delay, n, app, event));
            }
            None => self.ready.push_back(ScheduledHook {
                id: self.id(n),
                app,
                event,
            }),
        }
        Some(self.id(n))
    }

    fn promote(&mut self, id: u64, app: AppIdx, event: WebhookEvent) {
        let key = match &event {
            WebhookEvent::ChannelVacated { channel } => Key::Channel(app, channel.clone()),
            WebhookEvent::MemberRemoved { channel, user_id } => {
                Key::Member(app, channel.clone(), user_id.clone())
            }
            _ => {
                let id = self.id(id);
                self.ready.push_back(ScheduledHook { id, app, event });
                return;
            }
        };
        // Only if still live (not cancelled, not superseded).
        if self.pending.get(&key) == Some(&id) {
            self.pending.remove(&key);
            let id = self.id(id);
            self.ready.push_back(ScheduledHook { id, app, event });
        }
    }

    /// Advances to `now` and takes every event ready for delivery.
    pub fn poll(&mut self, now: Instant) -> Vec<ScheduledHook> {
        while self.delayed.front().is_some_and(|(due, ..)| *due <= now) {
            if let Some((_, id, app, event)) = self.delayed.pop_front() {
                self.promote(id, app, event);
            }
        }
        self.ready.drain(..).collect()
    }

    /// On shutdown: everything still delayed becomes ready now.
    pub fn flush(&mut self) -> Vec<ScheduledHook> {
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

    fn events(v: Vec<ScheduledHook>) -> Vec<(AppIdx, WebhookEvent)> {
        v.into_iter().map(|h| (h.app, h.event)).collect()
    }

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
        assert_eq!(events(s.poll(t0)), vec![(app, occupied("a"))]);
        s.push(t0, app, vacated("a"));
        assert!(events(s.poll(t0 + Duration::from_secs(1))).is_empty());
        s.push(t0 + Duration::from_secs(2), app, occupied("a"));
        assert!(
            events(s.poll(t0 + Duration::from_secs(10))).is_empty(),
            "neither vacated nor occupied"
        );
        assert_eq!(s.cancelled(), 2);
        s.push(t0 + Duration::from_secs(11), app, vacated("a"));
        assert!(events(s.poll(t0 + Duration::from_secs(13))).is_empty());
        assert_eq!(
            events(s.poll(t0 + Duration::from_secs(14))),
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
        assert_eq!(
            events(s.poll(t0 + Duration::from_secs(5))),
            vec![(app, other)]
        );
        s.push(t0, app, removed.clone());
        assert_eq!(
            events(s.flush()),
            vec![(app, removed)],
            "flush releases delayed events"
        );
    }

    #[test]
    fn ids_are_stable_and_cancelled_ones_are_reported() {
        let t0 = Instant::now();
        let mut s = WebhookScheduler::new(Duration::from_secs(3));
        s.set_origin("n1", 7);
        let app = AppIdx(0);
        assert_eq!(s.push(t0, app, occupied("a")).as_deref(), Some("n1:7:0"));
        assert_eq!(s.push(t0, app, vacated("a")).as_deref(), Some("n1:7:1"));
        // Re-occupied within the delay: both dropped, the vacate's id reported.
        assert_eq!(s.push(t0, app, occupied("a")), None);
        assert_eq!(s.take_cancelled(), vec!["n1:7:1".to_string()]);
        assert!(s.take_cancelled().is_empty());
        let ready = s.poll(t0 + Duration::from_secs(5));
        assert_eq!(
            ready.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            ["n1:7:0"]
        );
        // A held event released by a backup keeps its id.
        s.push_held("n2:3:9".into(), app, vacated("b"));
        assert_eq!(
            s.poll(t0 + Duration::from_secs(5)),
            vec![ScheduledHook {
                id: "n2:3:9".into(),
                app,
                event: vacated("b")
            }]
        );
    }
}
