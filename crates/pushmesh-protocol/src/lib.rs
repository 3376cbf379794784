//! Wire formats of pushmesh, with no I/O and no runtime.
//!
//! * [`channel`]: channel names that can only hold a valid name, and their kinds.
//! * [`client`]: frames a Pusher client sends, parsed into an enum.
//! * [`server`]: frames the server sends, encoded once into shared bytes.
//! * [`sign`]: HMAC-SHA256 signatures (channel auth, sign-in, webhooks, HTTP API).
//! * [`api`]: bodies of the Pusher HTTP API.
//! * [`codes`]: Pusher close and error codes.
//! * [`limits`]: the per-app limits of the protocol, with their defaults.
//! * [`wire`]: WebSocket frames built once for many sockets, permessage-deflate
//!   (RFC 7692) negotiation and compression, and the sans-I/O frame reader.

pub mod api;
pub mod channel;
pub mod client;
pub mod codes;
pub mod limits;
pub mod server;
pub mod sign;
pub mod sse;
pub mod webhook;
pub mod wire;
pub mod wsify;

pub use channel::{ChannelKind, ChannelName, ChannelNameError};
pub use codes::CloseCode;
pub use limits::Limits;
