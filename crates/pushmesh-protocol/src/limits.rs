//! Per-app protocol limits (spec §5); the defaults are Pusher's.

use serde::{Deserialize, Serialize};

/// Limits applied per app. Every field has Pusher's default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest event name, in bytes.
    pub max_event_name_length: usize,
    /// Largest event `data`, in bytes.
    pub max_event_payload_bytes: usize,
    /// Most channels in one trigger.
    pub max_event_channels: usize,
    /// Most events in one batch trigger.
    pub max_batch_events: usize,
    /// Most members of a presence channel.
    pub max_presence_members: usize,
    /// Largest `user_info` of a presence member, in bytes.
    pub max_presence_user_info_bytes: usize,
    /// Longest user id.
    pub max_user_id_length: usize,
    /// Longest channel name.
    pub max_channel_name_length: usize,
    /// Client events allowed per connection per second.
    pub client_events_per_second: u32,
    /// Most user ids in a sign-in watchlist.
    pub max_watchlist_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_name_length: 200,
            max_event_payload_bytes: 10 * 1024,
            max_event_channels: 100,
            max_batch_events: 10,
            max_presence_members: 100,
            max_presence_user_info_bytes: 1024,
            max_user_id_length: 128,
            max_channel_name_length: 164,
            client_events_per_second: 10,
            max_watchlist_size: 100,
        }
    }
}
