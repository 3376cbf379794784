//! The sans-IO brain of pushmesh: state machines that take `now`, perform no
//! I/O and never spawn.
//!
//! - [`Session`]: one connection's protocol (parsing, authorization, rate
//!   limits, sign-in), owned by its connection task.
//! - [`Shard`]: a part of the router: the channels that hash to it, their
//!   subscribers, presence members, cached event and peers' interest.
//! - [`Users`]: signed-in users, watchlists, `terminate_connections`.
//! - [`Replicator`]: numbers this node's state changes for its peers and
//!   turns theirs into per-channel changes.
//! - [`ShardMachine`]: a shard with typed inputs, the order of a publish
//!   and the end of a batch ([`Batch`]): the one composition of a shard,
//!   run by the server's shard tasks and by [`Core`].
//! - [`Core`]: the node's machines driven synchronously, for tests and the
//!   simulation.
//!
//! Effects go to a [`Sink`] as they happen; each event is encoded once and
//! every recipient gets the same `Bytes`.

pub mod app;
pub mod app_registry;
pub mod filter;
pub mod history;
pub mod hook_backup;
mod keepalive;
pub mod machine;
mod node;
pub mod peer_buffer;
pub mod peer_frame;
pub mod per_app;
pub mod replication;
pub mod router;
pub mod routing;
pub mod session;
pub mod sink;
#[doc(hidden)]
pub mod testing;
pub mod users;
pub mod webhooks;

pub use app::{
    AppConfig, AppIdx, Apps, ConnId, CoreConfig, OpenError, PublishError, PublishRequest, Refusal,
};
pub use filter::{Filter, FilterError, Selector, Tags, TagsError, Target};
pub use hook_backup::HookBackup;
pub use keepalive::{Keepalive, KeepaliveAction};
pub use machine::{Barrier, Batch, ShardInput, ShardMachine, ShardPublish, ShardSink};
pub use node::{Core, Output, PublishedChannel};
pub use peer_frame::{
    Delta, FrameKind, HistoryStamp, NodeId, PeerEvent, PeerFrame, PeerFrameError, Snapshot,
};
pub use per_app::PerApp;
pub use replication::{Effects, PeerLink, Replicator};
pub use router::{
    ChannelInfo, ClientEvent, Event, HistoryError, HistoryItem, HistoryPage, Publish,
    PublishRefused, QueryError, Shard, Subscribe, CACHE_TTL,
};
pub use routing::shard_of;
pub use session::{PresenceJoin, Proto, Request, Session, SessionOutput};
pub use sink::{AckFor, Handle, Sink};
pub use users::Users;
pub use webhooks::{ScheduledHook, WebhookScheduler};

/// The old name of the peer-frame module.
pub use peer_frame as cluster;

#[cfg(test)]
mod shard_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
