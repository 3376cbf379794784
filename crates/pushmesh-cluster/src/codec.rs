//! The framing of a link's control stream: `u32 len · u8 kind · payload`,
//! where kind says what the payload is. Shared by the link loops and the
//! send path.

use bytes::{Bytes, BytesMut};

/// Control stream: a control peer frame.
pub(crate) const K_CONTROL: u8 = 1;
/// Control stream: the cumulative ack of data frames (u64).
pub(crate) const K_ACK: u8 = 2;
/// Control stream: the id of the sender's data stream (u64), first frame.
pub(crate) const K_STREAM: u8 = 3;

/// A control frame with its header, ready for the control stream.
pub(crate) fn control_frame(f: &[u8]) -> Bytes {
    tagged(K_CONTROL, f)
}

/// A frame of `kind` with its header.
pub(crate) fn tagged(kind: u8, f: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + f.len());
    b.extend_from_slice(&((f.len() + 1) as u32).to_be_bytes());
    b.extend_from_slice(&[kind]);
    b.extend_from_slice(f);
    b.freeze()
}
