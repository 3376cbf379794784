//! The WebSocket wire, without I/O.
//!
//! * [`frame`]: outbound frames, framed once into shared bytes ([`Outbound`]):
//!   server frames are unmasked, so one message is the same bytes on every
//!   socket; its permessage-deflate form is built once too, on first use.
//! * [`deflate`]: raw-deflate compression of one message (no context kept)
//!   and a bounded inflater for what clients send.
//! * [`negotiate`]: the `Sec-WebSocket-Extensions` offer parser and the
//!   server's answer (RFC 7692 §5 and §7).
//! * [`reader`]: frames in, messages out (unmasking, fragments, control
//!   frames, inflation, size limits), mapped to close codes on error.
//!
//! The frame header itself is tungstenite's ([`tungstenite::protocol::frame::FrameHeader`]),
//! which parses and formats RSV1.

pub mod deflate;
pub mod frame;
pub mod negotiate;
pub mod reader;

pub use deflate::{deflate_message, InflateError, Inflater};
pub use frame::{Compression, Outbound};
pub use negotiate::{negotiate, Agreed};
pub use reader::{Event, FrameReader, ReadError, Role};
