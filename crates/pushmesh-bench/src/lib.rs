//! Load generator for Pusher-protocol servers, and the ideal reference server.
//!
//! Works against any Pusher-compatible server given host, port and app
//! credentials: subscribers are real WebSocket clients speaking protocol 7;
//! events are published through the signed HTTP API and carry their send
//! time, so publish→receive latency comes from the timestamps inside them.

pub mod client;
pub mod ideal;
pub mod load;
pub mod procstat;
pub mod report;
