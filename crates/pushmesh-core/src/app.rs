//! Apps and their configuration, shared read-only by every part of a node;
//! the checks of a publish that need nothing but the app's limits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pushmesh_protocol::{ChannelKind, ChannelName, CloseCode, Limits};

/// A connection, numbered by the driver; unique for the life of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Index of an app in the node's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppIdx(pub u32);

/// One application: credentials, switches and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// App id, used in the HTTP API path.
    pub id: String,
    /// Public key, used in the WebSocket path and in signatures.
    pub key: String,
    /// Secret for signatures.
    pub secret: String,
    /// The secret before the last rotation, still accepted by every check
    /// of a signature until its grace period ends (the driver removes it
    /// then).
    pub previous_secret: Option<String>,
    /// A disabled app refuses connections (4003) and API calls (403).
    pub enabled: bool,
    /// Whether clients may send `client-` events.
    pub client_events: bool,
    /// Whether connections must sign in (else closed with 4009).
    pub user_authentication_required: bool,
    /// Most connections of this app on this node (4004 beyond).
    pub max_connections: Option<usize>,
    /// Whether to send `pusher_internal:subscription_count`.
    pub subscription_count_events: bool,
    /// Protocol limits.
    pub limits: Limits,
    /// Whether to emit [`Output::Hook`] events (the app has webhooks).
    pub webhooks: bool,
    /// Name of the Pusher event a wsify `broadcast` becomes.
    pub wsify_event: String,
    /// Which channels keep history (`[apps.history]`), if any.
    pub history: Option<AppHistory>,
}

impl AppConfig {
    /// The secrets a signature may be made with: the current one, then the
    /// previous one during its grace period.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.secret.as_str()).chain(self.previous_secret.as_deref())
    }

    /// Runs a signature check with the current secret, then with the
    /// previous one; the first to pass passes, else the current one's error.
    pub fn verify_with<E>(&self, check: impl Fn(&str) -> Result<(), E>) -> Result<(), E> {
        let current = check(&self.secret);
        match (&current, &self.previous_secret) {
            (Err(_), Some(previous)) if check(previous).is_ok() => Ok(()),
            _ => current,
        }
    }
}

/// An app's history settings (`[apps.history]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppHistory {
    /// Channel name patterns: exact, or a prefix followed by `*`.
    pub channels: Vec<String>,
    /// Events kept per channel.
    pub max_events: usize,
    /// How long an event is kept.
    pub ttl: Duration,
}

impl AppHistory {
    /// Default `max_events`.
    pub const MAX_EVENTS: usize = 100;
    /// Default `ttl_secs`.
    pub const TTL_SECS: u64 = 300;

    /// Whether `channel` keeps history.
    pub fn matches(&self, channel: &str) -> bool {
        self.channels.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => channel == p,
        })
    }
}

/// Node-wide settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The apps served.
    pub apps: Vec<AppConfig>,
    /// `activity_timeout` announced to clients, in seconds.
    pub activity_timeout_secs: u64,
    /// Most connections on this node (4100 beyond).
    pub max_connections: Option<usize>,
    /// First part of every socket id of this node (`<prefix>.<conn>`).
    pub socket_prefix: u32,
    /// This node's id in the cluster.
    pub node_id: String,
    /// This node's incarnation (e.g. its start time in ms), higher on each restart.
    pub epoch: u64,
    /// Most bytes of history the node keeps (`history_max_bytes`).
    pub history_max_bytes: usize,
}

/// Why a connection is refused at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The app is disabled.
    #[error("app is disabled")]
    AppDisabled,
    /// The app is over its connection quota.
    #[error("app is over its connection quota")]
    AppOverQuota,
    /// The node is over capacity.
    #[error("node is over capacity")]
    NodeOverCapacity,
}

impl OpenError {
    /// The close code that goes with the error.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::AppDisabled => CloseCode::AppDisabled,
            Self::AppOverQuota => CloseCode::OverConnectionQuota,
            Self::NodeOverCapacity => CloseCode::OverCapacity,
        }
    }
}

/// Why a publish through the HTTP API is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No channel given.
    #[error("no channel given: set \"channel\" or \"channels\"")]
    NoChannels,
    /// Too many channels.
    #[error("too many channels: at most {0}")]
    TooManyChannels(usize),
    /// A bad channel name.
    #[error("invalid channel name {name:?}: {reason}")]
    InvalidChannel {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Event name too long or empty.
    #[error("event name must be 1 to {0} characters")]
    EventName(usize),
    /// Data too large.
    #[error("event data is larger than {0} bytes")]
    DataTooLarge(usize),
    /// An encrypted channel in a multi-channel trigger.
    #[error("encrypted channels cannot be triggered together with other channels")]
    EncryptedMulti,
    /// Too many events in a batch.
    #[error("too many events in batch: at most {0}")]
    BatchTooLarge(usize),
    /// A `socket_id` that is not `<digits>.<digits>`.
    #[error("invalid socket_id {0:?}")]
    InvalidSocketId(String),
    /// The node cannot deliver it now (HTTP 503): an interested peer's
    /// buffer is full, the node is joining or draining.
    #[error("cannot deliver now: {0}")]
    Unavailable(Refusal),
}

/// Why a publish is answered 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node has not joined its cluster yet.
    Joining = 0,
    /// The node is draining, past its wait.
    Draining = 1,
    /// An interested peer's buffer is full.
    PeerBufferFull = 2,
    /// A peer with subscribers did not acknowledge the event in time (it
    /// is delivered here and held for that peer, which may still get it).
    PeerUnacknowledged = 3,
}

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; 4] = [
        Self::Joining,
        Self::Draining,
        Self::PeerBufferFull,
        Self::PeerUnacknowledged,
    ];

    /// The `reason` of the JSON error and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Draining => "draining",
            Self::PeerBufferFull => "peer_buffer_full",
            Self::PeerUnacknowledged => "peer_unacknowledged",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `s` has the shape of a Pusher socket id, `^\d+\.\d+$`.
pub fn is_socket_id(s: &str) -> bool {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    s.split_once('.')
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

/// One publish (one event to one or more channels).
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    /// Event name.
    pub name: &'a str,
    /// Event data, sent as a JSON string.
    pub data: &'a str,
    /// Target channel names, unvalidated.
    pub channels: &'a [String],
    /// The socket to leave out.
    pub exclude_socket: Option<&'a str>,
}

/// The apps of a node, by index, id and key. A snapshot: a change makes a
/// new `Apps` ([`Apps::upsert`], [`Apps::remove`] on a clone) that the
/// driver hands to every part of the node. An app keeps its index for the
/// node's life: a changed app keeps its slot, a new one gets the next, and
/// a removed one leaves its slot behind (found by neither id nor key, left
/// out of [`Apps::iter`], disabled), so tables indexed by [`AppIdx`] only
/// ever grow ([`crate::PerApp::grow`]).
#[derive(Debug, Clone, Default)]
pub struct Apps {
    list: Vec<Arc<AppConfig>>,
    removed: Vec<bool>,
    by_id: HashMap<String, AppIdx>,
    by_key: HashMap<String, AppIdx>,
}

impl Apps {
    /// The apps of `configs`, indexed in order.
    pub fn new(configs: Vec<AppConfig>) -> Self {
        let mut apps = Self::default();
        for cfg in configs {
            apps.upsert(cfg);
        }
        apps
    }

    /// Adds an app, or replaces the one with the same id in its slot.
    pub fn upsert(&mut self, cfg: AppConfig) -> AppIdx {
        if let Some(idx) = self.by_id(&cfg.id) {
            let old = &self.list[idx.0 as usize];
            if old.key != cfg.key {
                self.by_key.remove(&old.key);
            }
            self.by_key.insert(cfg.key.clone(), idx);
            self.list[idx.0 as usize] = Arc::new(cfg);
            return idx;
        }
        let idx = AppIdx(self.list.len() as u32);
        self.by_id.insert(cfg.id.clone(), idx);
        self.by_key.insert(cfg.key.clone(), idx);
        self.list.push(Arc::new(cfg));
        self.removed.push(false);
        idx
    }

    /// Removes the app with this id; its slot stays, disabled.
    pub fn remove(&mut self, id: &str) -> Option<AppIdx> {
        let idx = self.by_id.remove(id)?;
        let i = idx.0 as usize;
        self.by_key.remove(&self.list[i].key);
        let mut gone = (*self.list[i]).clone();
        gone.enabled = false;
        self.list[i] = Arc::new(gone);
        self.removed[i] = true;
        Some(idx)
    }

    /// The app with this key.
    pub fn by_key(&self, key: &str) -> Option<AppIdx> {
        self.by_key.get(key).copied()
    }

    /// The app with this id.
    pub fn by_id(&self, id: &str) -> Option<AppIdx> {
        self.by_id.get(id).copied()
    }

    /// An app's configuration (a removed app's last one, disabled).
    pub fn get(&self, app: AppIdx) -> &Arc<AppConfig> {
        &self.list[app.0 as usize]
    }

    /// Why the app in this slot serves no connection, with the close code
    /// its open ones get: removed (4001), disabled (4003); `None` when it
    /// serves.
    pub fn unserved(&self, app: AppIdx) -> Option<(CloseCode, &'static str)> {
        if self.is_removed(app) {
            Some((CloseCode::AppNotFound, "app removed"))
        } else if !self.get(app).enabled {
            Some((CloseCode::AppDisabled, "app disabled"))
        } else {
            None
        }
    }

    /// Whether the app in this slot was removed.
    pub fn is_removed(&self, app: AppIdx) -> bool {
        self.removed.get(app.0 as usize).copied().unwrap_or(true)
    }

    /// How many slots (apps, removed ones included): the size of a table
    /// indexed by [`AppIdx`].
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every app (removed ones left out) with its index.
    pub fn iter(&self) -> impl Iterator<Item = (AppIdx, &Arc<AppConfig>)> {
        self.list
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.removed[*i])
            .map(|(i, a)| (AppIdx(i as u32), a))
    }

    /// Checks a publish against the app's limits without doing it.
    pub fn validate_publish(
        &self,
        app: AppIdx,
        req: &PublishRequest<'_>,
    ) -> Result<Vec<ChannelName>, PublishError> {
        let limits = &self.get(app).limits;
        if req.channels.is_empty() {
            return Err(PublishError::NoChannels);
        }
        if req.channels.len() > limits.max_event_channels {
            return Err(PublishError::TooManyChannels(limits.max_event_channels));
        }
        if req.name.is_empty() || req.name.len() > limits.max_event_name_length {
            return Err(PublishError::EventName(limits.max_event_name_length));
        }
        if req.data.len() > limits.max_event_payload_bytes {
            return Err(PublishError::DataTooLarge(limits.max_event_payload_bytes));
        }
        if let Some(s) = req.exclude_socket.filter(|s| !is_socket_id(s)) {
            return Err(PublishError::InvalidSocketId(s.to_owned()));
        }
        let names = req
            .channels
            .iter()
            .map(|c| {
                let max = if c.starts_with(pushmesh_protocol::channel::SERVER_TO_USER_PREFIX) {
                    usize::MAX
                } else {
                    limits.max_channel_name_length
                };
                ChannelName::parse_with_limit(c, max).map_err(|e| PublishError::InvalidChannel {
                    name: c.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if names.len() > 1
            && names
                .iter()
                .any(|n| n.kind() == ChannelKind::PrivateEncrypted)
        {
            return Err(PublishError::EncryptedMulti);
        }
        Ok(names)
    }

    /// Checks a wsify broadcast: public channels only, content within the limit.
    pub fn validate_wsify_broadcast(
        &self,
        app: AppIdx,
        channel: &str,
        content: &serde_json::value::RawValue,
    ) -> Result<ChannelName, PublishError> {
        let cfg = self.get(app);
        let invalid = |reason: String| PublishError::InvalidChannel {
            name: channel.to_owned(),
            reason,
        };
        let name = ChannelName::parse_with_limit(channel, cfg.limits.max_channel_name_length)
            .map_err(|e| invalid(e.to_string()))?;
        if name.kind() != ChannelKind::Public {
            return Err(invalid(
                "wsify broadcasts go to public channels only".into(),
            ));
        }
        if content.get().len() > cfg.limits.max_event_payload_bytes {
            return Err(PublishError::DataTooLarge(
                cfg.limits.max_event_payload_bytes,
            ));
        }
        Ok(name)
    }
}
