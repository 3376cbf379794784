//! Subscriber counts at each tick: this node's changed counts replicated to
//! the peers, `subscription_count` webhooks, and `subscription_count`
//! events to the channels' Pusher subscribers.
//!
//! A count is state, superseded by the next one: a connection whose queue
//! has no room for it ([`Sink::send_state`], e.g. after a burst of its own
//! subscribes, which changes thousands of counts at once) is not a slow
//! consumer. It is remembered per channel and sent the count then current
//! at the next tick, until it has room, so every subscriber ends with the
//! latest count.

use std::collections::HashSet;

use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::{server, ChannelKind, ChannelName};

use super::{Channel, Shard};
use crate::app::{AppConfig, AppIdx, ConnId};
use crate::peer_frame::Delta;
use crate::sink::{Handle, Sink};

impl<H: Handle> Shard<H> {
    /// One app's counts at a tick.
    pub(super) fn count_tick(&mut self, app: AppIdx, cfg: &AppConfig, sink: &mut impl Sink<H>) {
        let t = &mut self.tables[app];
        let local = std::mem::take(&mut t.dirty_counts);
        let mut remote = std::mem::take(&mut t.dirty_events);
        let mut deferred = std::mem::take(&mut t.deferred_counts);
        for name in &local {
            let count = t.channels.get(name).map_or(0, Channel::count);
            sink.replicate(Delta::Count {
                app: cfg.id.clone(),
                channel: name.to_string(),
                count,
            });
            remote.swap_remove(name);
        }
        for name in local.iter().chain(remote.iter()) {
            // Every subscriber gets this tick's count: earlier misses are moot.
            deferred.remove(name);
            // Presence channels count members, not subscriptions (as Pusher).
            if name.kind() == ChannelKind::Presence {
                continue;
            }
            let total = self.subscription_count(app, name);
            let event = WebhookEvent::SubscriptionCount {
                channel: name.to_string(),
                subscription_count: total,
            };
            self.hook(app, name.as_str(), event, sink);
            if cfg.subscription_count_events {
                self.send_count(app, name, total, None, sink);
            }
        }
        if !cfg.subscription_count_events {
            return;
        }
        for (name, conns) in deferred {
            let total = self.subscription_count(app, &name);
            self.send_count(app, &name, total, Some(&conns), sink);
        }
    }

    /// Sends a channel's count to its Pusher subscribers (`only` those, if
    /// given); those without room are deferred to the next tick.
    fn send_count(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        total: usize,
        only: Option<&HashSet<ConnId>>,
        sink: &mut impl Sink<H>,
    ) {
        let t = &mut self.tables[app];
        let Some(ch) = t.channels.get(name) else {
            return;
        };
        let f = server::subscription_count(name.as_str(), total);
        let mut full = HashSet::new();
        for (id, h) in ch.pusher() {
            if only.is_some_and(|o| !o.contains(id)) {
                continue;
            }
            if !sink.send_state(h, &f) {
                full.insert(*id);
            }
        }
        if !full.is_empty() {
            t.deferred_counts.insert(name.clone(), full);
        }
    }
}
