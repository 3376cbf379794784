//! Frames between nodes: the replicated state (`Delta`, `Snapshot`, sent
//! in bounded `SyncChunk`s) and the channel messages (`Event`,
//! `CacheSet`, `Terminate`), versioned and bincode-encoded.
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version byte in front of every encoded peer frame. A frame of another
/// version is refused whole ([`PeerFrameError::Version`]): nodes of two
/// versions exchange no frames at all (docs/operations.md, "Rolling upgrade
/// across the peer-frame format change").
///
/// 4: one event frame, [`PeerFrame::Event`], with optional tags and history
/// position (3 had `Publish`, `TaggedPublish` and `HistoryPublish`).
///
/// 5: the admin API's apps (`Apps`) and their counters (`AppStatsAsk`,
/// `AppStatsReply`).
///
/// 6: `AppStatsAsk` asks for one app or every app, `AppStatsReply` answers
/// with a list (the status page's cluster-wide figures).
pub const FRAME_VERSION: u8 = 6;

/// A node of the cluster.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub Arc<str>);

impl NodeId {
    /// A node id from a string.
    pub fn new(s: &str) -> Self {
        Self(Arc::from(s))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a peer frame carries, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Channel messages.
    Data,
    /// Interest, presence, users, counts, sync.
    Control,
}

impl FrameKind {
    /// `data` or `control`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Control => "control",
        }
    }
}

/// A change of a node's own state, replicated to every peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    /// The node's interest in a channel (local subscribers > 0).
    Interest {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Gained (true) or lost.
        add: bool,
    },
    /// A user is (or is no longer) a presence member on the node.
    Member {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// User.
        user: String,
        /// `user_info` JSON.
        info: Option<String>,
        /// Joined (true) or left.
        add: bool,
    },
    /// A user is (or is no longer) signed in on the node.
    User {
        /// App id.
        app: String,
        /// User.
        user: String,
        /// Online (true) or offline.
        online: bool,
    },
    /// The node's subscriber count of a channel.
    Count {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Local subscribers.
        count: usize,
    },
    /// What the node's subscribers on a channel can receive (issue #13):
    /// a filter (canonical JSON) some of them use, or `None`: some of them
    /// take events that no advertised filter matches. A node that
    /// advertises no filter for a channel it is interested in gets every
    /// event of it.
    Filter {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// The filter, or `None` for "every event".
        filter: Option<String>,
        /// Gained (true) or lost.
        add: bool,
    },
}

/// The whole replicated state of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// (app, channel) with local interest.
    pub interest: Vec<(String, String)>,
    /// (app, channel, user, info) presence members.
    pub members: Vec<(String, String, String, Option<String>)>,
    /// (app, user) signed in.
    pub users: Vec<(String, String)>,
    /// (app, channel, count) subscriber counts.
    pub counts: Vec<(String, String, usize)>,
    /// (app, channel, filter) advertised filters (see [`Delta::Filter`]).
    pub filters: Vec<(String, String, Option<String>)>,
}

/// A frame between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// One part of the sender's whole state; the parts of one sync share
    /// `epoch` and `seq` and are numbered from 0; the last says so.
    SyncChunk {
        /// Sender's epoch (incarnation).
        epoch: u64,
        /// Sequence number of the last delta included.
        seq: u64,
        /// Part number, from 0.
        index: u32,
        /// Whether this is the last part.
        last: bool,
        /// This part of the state.
        state: Snapshot,
    },
    /// "I have applied your state up to `seq` of your incarnation `epoch`."
    StateAck {
        /// The acknowledged node's epoch.
        epoch: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// One change of the sender's state.
    Delta {
        /// Sender's epoch.
        epoch: u64,
        /// Sequence number (one more than the previous delta's).
        seq: u64,
        /// The change.
        delta: Delta,
    },
    /// "Your state as I hold it is off: send me a Sync."
    ResyncRequest,
    /// A channel event to deliver locally (never forwarded again), with its
    /// tags and, on a history channel, its number.
    Event(PeerEvent),
    /// The last event of a cache channel, for nodes without interest.
    CacheSet {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Event name.
        event: String,
        /// Event data.
        data: String,
        /// How long ago it was published, in milliseconds (0: just now;
        /// more when a node sends its cache to a peer that joins).
        age_ms: u64,
    },
    /// Close every connection of a user.
    Terminate {
        /// App id.
        app: String,
        /// User.
        user: String,
    },
    /// "Hold this webhook event of mine; deliver it if I am gone" (to the
    /// channel's backup, see `hook_backup.rs`).
    HookHold {
        /// Sender's epoch.
        epoch: u64,
        /// The event's stable id.
        id: String,
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// The event, as JSON.
        event: String,
    },
    /// "These webhook events of mine were delivered (or cancelled): forget them."
    HookDone {
        /// Their ids.
        ids: Vec<String>,
    },
    /// "May this new member join?": to the channel's owner, which decides
    /// against the presence member limit (see `router/presence_limit.rs`).
    PresenceClaim {
        /// The asking node (the answer goes there).
        node: String,
        /// Request id, echoed in the answer.
        req: u64,
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// The joining user.
        user: String,
    },
    /// The owner's answer to a [`PeerFrame::PresenceClaim`].
    PresenceGrant {
        /// The claim's request id.
        req: u64,
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Admitted (true) or refused: the channel is full.
        granted: bool,
    },
    /// A node's copy of (part of) one channel's history, for a peer whose
    /// link came up: `events` in the sender's order, which holds for each
    /// origin every event with `base < seq` up to its last in `events`.
    HistorySync {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// `(origin, seq)`: everything up to `seq` is not in this part.
        base: Vec<(u64, u64)>,
        /// The events.
        events: Vec<HistoryEvent>,
    },
    /// One of the sender's shards has sent everything it sends a peer
    /// whose link came up (cached events, its history copy): part `shard`
    /// of `shards`. After the last part the receiver holds the sender's
    /// whole copy; a node joins only then (readiness, docs/cluster.md).
    CopyDone {
        /// Sender's epoch (incarnation).
        epoch: u64,
        /// Which of the sender's shards.
        shard: u32,
        /// How many shards the sender has.
        shards: u32,
    },
    /// Apps made through the admin API: each change as it is made, every
    /// record to a peer whose link came up (merged by last writer,
    /// `app_registry`).
    Apps(Vec<crate::app_registry::AppRecord>),
    /// Asks for apps' counters on the receiver (`ask` numbers the
    /// question), answered with [`PeerFrame::AppStatsReply`].
    AppStatsAsk {
        /// The asker's number for the question.
        ask: u64,
        /// App id; none: every app the receiver serves.
        app: Option<String>,
    },
    /// The counters asked for: the one app asked (zeros if the receiver
    /// lacks it), or every app with a non-zero counter.
    AppStatsReply {
        /// The question's number.
        ask: u64,
        /// The receiver's counters by app id.
        apps: Vec<(String, crate::app_registry::AppStats)>,
    },
}

/// The one event frame ([`PeerFrame::Event`]): every publish and client
/// event a peer delivers locally. Its optional parts say what else applies:
/// `tags` (issue #13: only the subscriptions whose filter matches take it)
/// and `position` (a history channel's event: the peer stores it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEvent {
    /// App id.
    pub app: String,
    /// Channel.
    pub channel: String,
    /// Event name.
    pub event: String,
    /// Event data.
    pub data: String,
    /// Socket id to leave out.
    pub exclude: Option<String>,
    /// `user_id` of a presence client event.
    pub user_id: Option<String>,
    /// The event's tags; `None`: untagged (every subscription without a
    /// filter takes it).
    pub tags: Option<Vec<(String, String)>>,
    /// Its number on a history channel; `None` on other channels.
    pub position: Option<HistoryStamp>,
}

/// A history event's number: which incarnation published it, its place
/// among that origin's events on the channel, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryStamp {
    /// The publishing node incarnation (`history::Origin`).
    pub origin: u64,
    /// Its number among the origin's events on the channel.
    pub seq: u64,
    /// When it was published, Unix ms.
    pub at_ms: u64,
}

/// One event of a [`PeerFrame::HistorySync`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Origin.
    pub origin: u64,
    /// Sequence number.
    pub seq: u64,
    /// Published at, Unix ms.
    pub at_ms: u64,
    /// How long the sender has held it, ms (for the ttl).
    pub age_ms: u64,
    /// Event name.
    pub event: String,
    /// Data.
    pub data: String,
    /// `user_id` of a presence client event.
    pub user_id: Option<String>,
    /// Its tags.
    pub tags: Vec<(String, String)>,
}

impl PeerFrame {
    /// The app id and channel of a frame that the channel's shard handles
    /// (channel messages, cache entries, history, presence claims); `None`
    /// for frames of the node as a whole.
    pub fn channel(&self) -> Option<(&str, &str)> {
        match self {
            Self::Event(PeerEvent { app, channel, .. })
            | Self::CacheSet { app, channel, .. }
            | Self::HistorySync { app, channel, .. }
            | Self::PresenceClaim { app, channel, .. }
            | Self::PresenceGrant { app, channel, .. } => Some((app, channel)),
            _ => None,
        }
    }

    /// Data or control.
    pub fn kind(&self) -> FrameKind {
        match self {
            // Channel messages and actions: sequenced, held and replayed
            // across link loss (peer_buffer), exactly once.
            Self::Event(_)
            | Self::CacheSet { .. }
            | Self::Terminate { .. }
            | Self::HistorySync { .. }
            | Self::CopyDone { .. } => FrameKind::Data,
            _ => FrameKind::Control,
        }
    }

    /// Version byte + bincode.
    pub fn encode(&self) -> Bytes {
        let mut v = vec![FRAME_VERSION];
        match bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            Ok(b) => v.extend_from_slice(&b),
            Err(e) => tracing::error!(error = %e, "cannot encode a peer frame"),
        }
        Bytes::from(v)
    }

    /// Decodes a frame made by [`PeerFrame::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, PeerFrameError> {
        match b.split_first() {
            Some((&FRAME_VERSION, rest)) => {
                // Bounded like the link's frames: a frame that declares a
                // huge string must not make bincode allocate it (found by fuzzing).
                bincode::serde::decode_from_slice(
                    rest,
                    bincode::config::standard().with_limit::<16_777_216>(),
                )
                .map(|(f, _)| f)
                .map_err(|e| PeerFrameError::Decode(e.to_string()))
            }
            Some((v, _)) => Err(PeerFrameError::Version(*v)),
            None => Err(PeerFrameError::Decode("empty frame".into())),
        }
    }
}

/// A frame from a peer that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerFrameError {
    /// Unknown version.
    #[error("unsupported peer frame version {0}")]
    Version(u8),
    /// Not a frame.
    #[error("undecodable peer frame: {0}")]
    Decode(String),
}

impl Delta {
    /// The app id the change belongs to.
    pub fn app(&self) -> &str {
        match self {
            Self::Interest { app, .. }
            | Self::Member { app, .. }
            | Self::User { app, .. }
            | Self::Count { app, .. }
            | Self::Filter { app, .. } => app,
        }
    }

    /// The channel the change belongs to (`None` for users).
    pub fn channel(&self) -> Option<&str> {
        match self {
            Self::Interest { channel, .. }
            | Self::Member { channel, .. }
            | Self::Count { channel, .. }
            | Self::Filter { channel, .. } => Some(channel),
            Self::User { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tags: Option<Vec<(String, String)>>, position: Option<HistoryStamp>) -> PeerFrame {
        PeerFrame::Event(PeerEvent {
            app: "a".into(),
            channel: "c".into(),
            event: "e".into(),
            data: "{}".into(),
            exclude: None,
            user_id: Some("u".into()),
            tags,
            position,
        })
    }

    #[test]
    fn every_kind_of_event_is_one_frame_and_round_trips() {
        let stamp = HistoryStamp {
            origin: 7,
            seq: 3,
            at_ms: 1_000,
        };
        let tags = Some(vec![("zone".to_owned(), "eu".to_owned())]);
        for f in [
            event(None, None),
            event(tags.clone(), None),
            event(tags, Some(stamp)),
        ] {
            assert_eq!(PeerFrame::decode(&f.encode()), Ok(f.clone()));
            assert_eq!(f.kind(), FrameKind::Data);
            assert_eq!(f.channel(), Some(("a", "c")));
        }
    }

    /// A node of the previous format (3) and one of this format refuse
    /// each other's frames with a typed error, whatever follows the byte.
    #[test]
    fn a_frame_of_another_version_is_refused_not_misread() {
        let mut old = event(None, None).encode().to_vec();
        old[0] = 3;
        assert_eq!(PeerFrame::decode(&old), Err(PeerFrameError::Version(3)));
        assert_eq!(
            PeerFrame::decode(&[]),
            Err(PeerFrameError::Decode("empty frame".into()))
        );
        assert!(matches!(
            PeerFrame::decode(&[FRAME_VERSION, 0xff, 0xff]),
            Err(PeerFrameError::Decode(_))
        ));
    }
}
