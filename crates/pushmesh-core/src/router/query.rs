//! Read-only answers of a shard: channel info for the HTTP API, presence
//! users, and counters for `/metrics`.

use std::time::Instant;

use pushmesh_protocol::{ChannelKind, ChannelName};

use super::{Channel, Shard, CACHE_TTL};
use crate::app::AppIdx;
use crate::sink::Handle;

/// The state of one channel after a publish or on query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelInfo {
    /// Whether anyone is subscribed.
    pub occupied: bool,
    /// Distinct users (presence channels).
    pub user_count: Option<usize>,
    /// Subscribed connections.
    pub subscription_count: usize,
    /// Cached event name and data, with seconds left, for cache channels.
    pub cache: Option<(String, String, u64)>,
}

/// Why a channel query is refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A bad channel name.
    #[error("invalid channel name: {0}")]
    InvalidChannel(String),
    /// `user_count` or users asked of a non-presence channel.
    #[error("{0} is only available for presence channels")]
    PresenceOnly(&'static str),
}

/// Per channel kind: occupied channels and subscriptions on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Occupied channels.
    pub channels: usize,
    /// Subscriptions.
    pub subscriptions: usize,
}

/// The kinds in the order of [`Shard::stats`].
pub const KINDS: [&str; 5] = [
    "public",
    "private",
    "private_encrypted",
    "presence",
    "server_to_user",
];

pub(super) fn kind_index(k: ChannelKind) -> usize {
    match k {
        ChannelKind::Public => 0,
        ChannelKind::Private => 1,
        ChannelKind::PrivateEncrypted => 2,
        ChannelKind::Presence => 3,
        ChannelKind::ServerToUser => 4,
    }
}

impl<H: Handle> Shard<H> {
    /// Subscribers of a channel, cluster-wide.
    pub fn subscription_count(&self, app: AppIdx, name: &ChannelName) -> usize {
        let t = &self.tables[app];
        t.channels.get(name).map_or(0, Channel::count)
            + t.remote.get(name).map_or(0, |r| r.counts.values().sum())
    }

    /// A channel's state, cluster-wide as this node knows it.
    pub fn info(&self, now: Instant, app: AppIdx, name: &ChannelName) -> ChannelInfo {
        let t = &self.tables[app];
        let local = t.channels.get(name).is_some_and(|c| c.count() > 0);
        ChannelInfo {
            occupied: local || self.remote_interest(app, name),
            user_count: (name.kind() == ChannelKind::Presence)
                .then(|| self.member_count(app, name.as_str())),
            subscription_count: self.subscription_count(app, name),
            cache: t.cache.get(name).and_then(|c| {
                let age = now.saturating_duration_since(c.at);
                (age < CACHE_TTL)
                    .then(|| (c.event.clone(), c.data.clone(), (CACHE_TTL - age).as_secs()))
            }),
        }
    }

    /// This node's occupied channels and subscriptions in this shard, by
    /// app slot (the admin API's and the status page's per-app counters).
    pub fn occupancy(&self) -> Vec<(u64, u64)> {
        self.tables
            .iter()
            .map(|(_, t)| {
                let subs: usize = t.channels.values().map(|c| c.subs.len()).sum();
                (t.channels.len() as u64, subs as u64)
            })
            .collect()
    }

    /// Occupied channels of this shard (cluster-wide), optionally by prefix,
    /// appended to `out` unsorted. Server-to-user channels are never listed.
    pub fn occupied(
        &self,
        now: Instant,
        app: AppIdx,
        prefix: Option<&str>,
        out: &mut Vec<(ChannelName, ChannelInfo)>,
    ) {
        let t = &self.tables[app];
        let wanted = |n: &ChannelName| {
            n.kind() != ChannelKind::ServerToUser
                && prefix.is_none_or(|p| n.as_str().starts_with(p))
        };
        for (n, c) in &t.channels {
            if c.count() > 0 && wanted(n) {
                out.push((n.clone(), self.info(now, app, n)));
            }
        }
        for (n, r) in &t.remote {
            let local = t.channels.get(n).is_some_and(|c| c.count() > 0);
            if !local && !r.interested.is_empty() && wanted(n) {
                out.push((n.clone(), self.info(now, app, n)));
            }
        }
    }

    /// Presence members' ids of a channel, cluster-wide.
    pub fn users(&self, app: AppIdx, name: &ChannelName) -> Vec<String> {
        self.members_union(app, name.as_str())
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Subscribers of a channel on this node only.
    pub fn local_subscriber_count(&self, app: AppIdx, channel: &str) -> usize {
        self.local_count(app, channel)
    }

    /// Presence members whose connections are on this node.
    pub fn local_members(&self, app: AppIdx, channel: &str) -> Vec<String> {
        self.tables[app]
            .channels
            .get(channel)
            .map(|c| c.members().map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// Per kind (in [`KINDS`] order): occupied channels and subscriptions here.
    pub fn stats(&self) -> [KindStats; 5] {
        self.kinds
    }
}

/// Checks a `GET /channels` query.
pub fn check_channels_query(prefix: Option<&str>, user_count: bool) -> Result<(), QueryError> {
    if user_count && !prefix.is_some_and(|p| p.starts_with("presence-")) {
        return Err(QueryError::PresenceOnly("user_count"));
    }
    Ok(())
}

/// Checks a `GET /channels/{name}` query; the parsed name.
pub fn check_channel_query(name: &str, user_count: bool) -> Result<ChannelName, QueryError> {
    let name = ChannelName::parse_with_limit(name, usize::MAX)
        .map_err(|e| QueryError::InvalidChannel(e.to_string()))?;
    if user_count && name.kind() != ChannelKind::Presence {
        return Err(QueryError::PresenceOnly("user_count"));
    }
    Ok(name)
}

/// Checks a `GET /channels/{name}/users` query; the parsed name.
pub fn check_users_query(name: &str) -> Result<ChannelName, QueryError> {
    let name = ChannelName::parse_with_limit(name, usize::MAX)
        .map_err(|e| QueryError::InvalidChannel(e.to_string()))?;
    if name.kind() != ChannelKind::Presence {
        return Err(QueryError::PresenceOnly("users"));
    }
    Ok(name)
}
