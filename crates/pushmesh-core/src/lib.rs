//! The sans-IO brain of pushmesh.
//!
//! [`Core`] holds every connection, channel, presence member and signed-in
//! user of a node. It performs no I/O and never reads the clock: drivers feed
//! it inputs (`open`, `handle_frame`, `publish`, `tick`, …, each with `now`)
//! and drain what it wants done with [`Core::poll_output`]. Each event is
//! encoded once; every recipient's [`Output::Send`] shares the same bytes.

pub mod cluster;
mod core;
mod keepalive;
pub mod webhooks;

pub use crate::core::{
    AppConfig, AppIdx, ChannelInfo, ConnId, Core, CoreConfig, OpenError, Output, PublishError,
    PublishRequest, PublishedChannel, QueryError,
};
pub use cluster::{FrameKind, NodeId, PeerFrame, PeerFrameError};
pub use keepalive::{Keepalive, KeepaliveAction};
pub use webhooks::WebhookScheduler;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
