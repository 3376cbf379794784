//! Outbound frames, built once and shared by every socket they go to.
//!
//! Server frames are never masked (RFC 6455 §5.1), so a message is the
//! same bytes (header and payload) on every connection: [`Outbound`] holds
//! them in one [`Bytes`], and the connection tasks write those bytes as
//! they are. Its permessage-deflate form (RSV1 set, compressed without
//! context) is the same for every compressing connection too: it is built
//! on first demand and kept, so compression costs once per message.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Longest unmasked server header: 2 bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// The node's compression settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Negotiate permessage-deflate when a client offers it.
    pub enabled: bool,
    /// Shorter messages go uncompressed.
    pub min_bytes: usize,
    /// Deflate level, 1 to 9.
    pub level: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            enabled: true,
            min_bytes: 256,
            level: 1,
        }
    }
}

/// One frame: header written before `payload`.
fn build(opcode: OpCode, rsv1: bool, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        is_final: true,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    let mut out = BytesMut::with_capacity(MAX_HEADER + payload.len()).writer();
    // Writing into memory cannot fail.
    let _ = header.format(payload.len() as u64, &mut out);
    let mut out = out.into_inner();
    out.put_slice(payload);
    out.freeze()
}

/// A text frame.
pub fn text(payload: &[u8]) -> Bytes {
    build(OpCode::Data(Data::Text), false, payload)
}

/// A ping with `payload` (at most 125 bytes are sent).
pub fn ping(payload: &[u8]) -> Bytes {
    build(
        OpCode::Control(Control::Ping),
        false,
        &payload[..payload.len().min(125)],
    )
}

/// The pong answering a ping with `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    build(
        OpCode::Control(Control::Pong),
        false,
        &payload[..payload.len().min(125)],
    )
}

/// A close frame; the reason is cut to 123 bytes on a character boundary.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    build(OpCode::Control(Control::Close), false, &payload)
}

/// A close frame without a code (the echo of one without a code).
pub fn close_empty() -> Bytes {
    build(OpCode::Control(Control::Close), false, &[])
}

struct Inner {
    /// Header and payload.
    plain: Bytes,
    /// Where the payload starts in `plain`.
    header_len: u8,
    /// The compressed frame, once some connection needed it; `None` if the
    /// message goes uncompressed (shorter than `min_bytes`).
    compressed: OnceLock<Option<Bytes>>,
}

/// A text message framed once, shared (cheaply cloned) by every connection
/// it is queued for.
#[derive(Clone)]
pub struct Outbound(Arc<Inner>);

/// The bytes to write for one connection, with what compression did.
pub struct Wire<'a> {
    /// The frame.
    pub frame: &'a Bytes,
    /// For a compressed frame: the message's plain and compressed sizes.
    pub compressed: Option<(usize, usize)>,
}

impl Outbound {
    /// Frames a text message (the caller checked it is UTF-8).
    pub fn text(payload: &[u8]) -> Self {
        let plain = text(payload);
        Self(Arc::new(Inner {
            header_len: (plain.len() - payload.len()) as u8,
            plain,
            compressed: OnceLock::new(),
        }))
    }

    /// The message's payload.
    pub fn payload(&self) -> &[u8] {
        &self.0.plain[self.0.header_len as usize..]
    }

    /// The uncompressed frame.
    pub fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// The frame for a connection that negotiated compression or not. The
    /// compressed frame is built by the first connection that needs it.
    pub fn wire(&self, compress: Option<&Compression>) -> Wire<'_> {
        let Some(c) = compress else {
            return Wire {
                frame: &self.0.plain,
                compressed: None,
            };
        };
        let z = self.0.compressed.get_or_init(|| {
            let payload = self.payload();
            if payload.len() < c.min_bytes {
                return None;
            }
            let z = super::deflate_message(payload, c.level)?;
            Some(build(OpCode::Data(Data::Text), true, &z))
        });
        match z {
            Some(f) => Wire {
                frame: f,
                compressed: Some((self.payload().len(), f.len() - header_len(f.len()))),
            },
            None => Wire {
                frame: &self.0.plain,
                compressed: None,
            },
        }
    }

    /// Whether two handles share one frame (tests).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The header length of an unmasked frame of `total` bytes.
fn header_len(total: usize) -> usize {
    match total {
        t if t < 126 + 2 => 2,
        t if t < 65536 + 4 => 4,
        _ => 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Event, FrameReader, Role};

    fn read_all(bytes: &[u8], deflate: bool) -> Vec<Event> {
        let mut r = FrameReader::new(Role::Client, 1 << 20, deflate);
        r.buffer_mut().extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(e) = r.next_event().expect("ok") {
            out.push(e);
        }
        out
    }

    #[test]
    fn headers_by_length() {
        for n in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let f = text(&vec![b'x'; n]);
            assert_eq!(f.len() - n, header_len(f.len()), "{n}");
            assert_eq!(f[0], 0x81);
            match read_all(&f, false).as_slice() {
                [Event::Text(t)] => assert_eq!(t.len(), n),
                other => panic!("{n}: {} events", other.len()),
            }
        }
    }

    #[test]
    fn control_frames() {
        let c = close(4100, &"é".repeat(100));
        assert!(c.len() <= 2 + 125);
        match read_all(&c, false).as_slice() {
            [Event::Close(Some((code, reason)))] => {
                assert_eq!(*code, 4100);
                assert_eq!(reason.len(), 122);
            }
            _ => panic!("not a close"),
        }
        assert!(
            matches!(read_all(&ping(b"hi"), false).as_slice(), [Event::Ping(p)] if &p[..] == b"hi")
        );
        assert!(
            matches!(read_all(&pong(b"hi"), false).as_slice(), [Event::Pong(p)] if &p[..] == b"hi")
        );
    }

    #[test]
    fn compressed_once_and_shared() {
        let c = Compression::default();
        let msg = br#"{"event":"order","data":{"line":"item item item"}}"#.repeat(20);
        let o = Outbound::text(&msg);
        let copy = o.clone();
        assert!(o.ptr_eq(&copy));
        let a = o.wire(Some(&c));
        let b = copy.wire(Some(&c));
        assert!(std::ptr::eq(a.frame, b.frame), "one compressed frame");
        assert_eq!(a.frame[0], 0xc1, "FIN, RSV1, text");
        let (plain, z) = a.compressed.expect("ok");
        assert_eq!(plain, msg.len());
        assert!(z < plain / 4);
        assert_eq!(o.wire(None).frame, o.plain());
        match read_all(a.frame, true).as_slice() {
            [Event::Text(t)] => assert_eq!(&t[..], &msg[..]),
            _ => panic!("one text message"),
        }
    }

    #[test]
    fn short_messages_stay_plain() {
        let c = Compression::default();
        let o = Outbound::text(&[b'a'; 255]);
        let w = o.wire(Some(&c));
        assert!(w.compressed.is_none());
        assert_eq!(w.frame[0], 0x81, "RSV1 clear");
    }
}
