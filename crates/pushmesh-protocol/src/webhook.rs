//! Pusher webhook events (spec §8) and their signed body.

use serde::{Deserialize, Serialize};

/// One webhook event, serialized as Pusher sends it (`{"name": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A channel got its first subscriber.
    ChannelOccupied {
        /// Channel.
        channel: String,
    },
    /// A channel lost its last subscriber.
    ChannelVacated {
        /// Channel.
        channel: String,
    },
    /// A user joined a presence channel (first connection).
    MemberAdded {
        /// Channel.
        channel: String,
        /// User.
        user_id: String,
    },
    /// A user left a presence channel (last connection).
    MemberRemoved {
        /// Channel.
        channel: String,
        /// User.
        user_id: String,
    },
    /// A client event was sent.
    ClientEvent {
        /// Channel.
        channel: String,
        /// Event name.
        event: String,
        /// Event data as sent.
        data: String,
        /// Sender.
        socket_id: String,
        /// Sender's user on presence channels.
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
    },
    /// Someone subscribed to an empty cache channel.
    CacheMiss {
        /// Channel.
        channel: String,
    },
    /// A channel's subscription count changed.
    SubscriptionCount {
        /// Channel.
        channel: String,
        /// New count.
        subscription_count: usize,
    },
}

impl WebhookEvent {
    /// The event's name, as in config filters.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ChannelOccupied { .. } => "channel_occupied",
            Self::ChannelVacated { .. } => "channel_vacated",
            Self::MemberAdded { .. } => "member_added",
            Self::MemberRemoved { .. } => "member_removed",
            Self::ClientEvent { .. } => "client_event",
            Self::CacheMiss { .. } => "cache_miss",
            Self::SubscriptionCount { .. } => "subscription_count",
        }
    }

    /// The channel it concerns.
    pub fn channel(&self) -> &str {
        match self {
            Self::ChannelOccupied { channel }
            | Self::ChannelVacated { channel }
            | Self::MemberAdded { channel, .. }
            | Self::MemberRemoved { channel, .. }
            | Self::ClientEvent { channel, .. }
            | Self::CacheMiss { channel }
            | Self::SubscriptionCount { channel, .. } => channel,
        }
    }
}

/// Every event name a webhook filter may list.
pub const EVENT_NAMES: &[&str] = &[
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
];

/// A webhook event with its stable id: the same id for every copy of the
/// event, whichever node sends it (the channel's owner, or its backup after
/// the owner crashed), so a receiver can drop duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentifiedEvent {
    /// The event (its fields come first in the JSON object).
    #[serde(flatten)]
    pub event: WebhookEvent,
    /// Stable id, e.g. `node1:1764600000000:42` (owner node, epoch, counter).
    pub id: String,
}

/// The JSON body of a webhook request.
pub fn body(time_ms: u64, events: &[IdentifiedEvent]) -> Vec<u8> {
    #[derive(Serialize)]
    struct B<'a> {
        time_ms: u64,
        events: &'a [IdentifiedEvent],
    }
    serde_json::to_vec(&B { time_ms, events }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_like_pusher() {
        let events = [
            WebhookEvent::MemberAdded {
                channel: "presence-a".into(),
                user_id: "1".into(),
            },
            WebhookEvent::ClientEvent {
                channel: "private-a".into(),
                event: "client-x".into(),
                data: "{}".into(),
                socket_id: "1.2".into(),
                user_id: None,
            },
        ];
        let b = body(
            5,
            &events
                .iter()
                .enumerate()
                .map(|(i, e)| IdentifiedEvent {
                    event: e.clone(),
                    id: format!("n1:7:{i}"),
                })
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            String::from_utf8_lossy(&b),
            r#"{"time_ms":5,"events":[{"name":"member_added","channel":"presence-a","user_id":"1","id":"n1:7:0"},{"name":"client_event","channel":"private-a","event":"client-x","data":"{}","socket_id":"1.2","id":"n1:7:1"}]}"#
        );
        // Events travel between nodes as this JSON too.
        for e in events {
            let json = serde_json::to_string(&e).unwrap_or_default();
            assert_eq!(serde_json::from_str::<WebhookEvent>(&json).ok(), Some(e));
        }
    }
}
