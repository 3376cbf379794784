//! pushmesh's own WebSocket transport for `/app/{key}` and `/ws`.
//!
//! * [`upgrade`]: the HTTP/1.1 upgrade (RFC 6455 §4.2), answering
//!   `Sec-WebSocket-Extensions` (permessage-deflate, RFC 7692).
//! * [`socket`]: one upgraded connection: events read through
//!   [`pushmesh_protocol::wire::FrameReader`], pre-framed [`Outbound`]s
//!   written as they are with vectored writes.
//! * [`client`]: what the edge knows about an upgrade request.
//! * [`driver`]: the connection loop both endpoints run, with the
//!   protocol's part passed in as a [`driver::Protocol`].
//!
//! [`Outbound`]: pushmesh_protocol::wire::Outbound

pub mod client;
pub(crate) mod driver;
pub mod socket;
pub mod upgrade;

pub use client::Upgrading;
pub use socket::WsSocket;
pub use upgrade::WsUpgrade;
