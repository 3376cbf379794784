//! Frames in, messages out, without I/O: the caller reads bytes into
//! [`FrameReader::buffer_mut`] and takes events from [`FrameReader::next_event`]
//! until it returns `None` (more bytes needed). Being sans-I/O, it is
//! cancel-safe under `select!` and testable without sockets.
//!
//! Headers are parsed by tungstenite; this adds what the connection needs:
//! masking rules per role, fragments, permessage-deflate (RSV1) with a
//! bounded inflater, UTF-8 of text messages, and size limits that hold
//! before a payload is buffered.

use std::io::Cursor;

use bytes::{Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::deflate::{InflateError, Inflater};

/// Which side reads: a server reads masked frames, a client unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads what clients send (masked).
    Server,
    /// Reads what servers send (unmasked).
    Client,
}

/// A message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A text message (valid UTF-8).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping and its payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame: code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Why the stream cannot go on; [`ReadError::close_code`] is the answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    /// A protocol violation (1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A message over the size limit, inflated or not (1009).
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    /// A text message that is not UTF-8, or compressed data that does not
    /// inflate (1007).
    #[error("invalid message data: {0}")]
    BadData(&'static str),
}

impl ReadError {
    /// The WebSocket close code that answers it.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Protocol(_) => 1002,
            Self::TooBig(_) => 1009,
            Self::BadData(_) => 1007,
        }
    }
}

/// A message being received in fragments.
struct Partial {
    text: bool,
    /// Plain fragments so far.
    data: Vec<u8>,
    /// For a compressed message: its inflater (dropped with the message:
    /// no context is kept between messages, `client_no_context_takeover`).
    inflater: Option<Inflater>,
    /// Wire bytes so far (bounds the work a compressed message can ask).
    wire: usize,
}

/// The read side of one WebSocket.
pub struct FrameReader {
    buf: BytesMut,
    role: Role,
    max_message: usize,
    deflate: bool,
    partial: Option<Partial>,
    /// Payload bytes still to discard (a frame refused or drained unread).
    skip: u64,
    /// Closing: data frames are discarded unread, only control frames count.
    draining: bool,
}

/// Most wire bytes a compressed message may take, for `max` inflated: an
/// incompressible message grows a little; anything more is not a message.
fn wire_cap(max: usize) -> usize {
    max.saturating_mul(4).max(4096)
}

impl FrameReader {
    /// A reader for `role`, messages up to `max_message` bytes (inflated);
    /// `deflate`: permessage-deflate was negotiated.
    pub fn new(role: Role, max_message: usize, deflate: bool) -> Self {
        Self {
            buf: BytesMut::new(),
            role,
            max_message,
            deflate,
            partial: None,
            skip: 0,
            draining: false,
        }
    }

    /// Where the caller puts the bytes it read, with room reserved.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 256 {
            self.buf.reserve(512);
        }
        &mut self.buf
    }

    /// From now on data frames are discarded unread (closing: only the
    /// client's close frame is awaited).
    pub fn drain(&mut self) {
        self.draining = true;
        self.partial = None;
    }

    fn check(&self, h: &FrameHeader) -> Result<(), ReadError> {
        if h.rsv2 || h.rsv3 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        if h.rsv1 && !self.deflate {
            return Err(ReadError::Protocol("RSV1 set without permessage-deflate"));
        }
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => {
                return Err(ReadError::Protocol("client frames must be masked"))
            }
            (Role::Client, true) => {
                return Err(ReadError::Protocol("server frames must not be masked"))
            }
            _ => {}
        }
        match h.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(ReadError::Protocol("reserved opcode"))
            }
            OpCode::Control(_) if h.rsv1 => Err(ReadError::Protocol("RSV1 on a control frame")),
            OpCode::Control(_) if !h.is_final => {
                Err(ReadError::Protocol("fragmented control frame"))
            }
            OpCode::Data(Data::Continue) if h.rsv1 => {
                Err(ReadError::Protocol("RSV1 on a continuation frame"))
            }
            OpCode::Data(Data::Continue) if self.partial.is_none() && !self.draining => {
                Err(ReadError::Protocol("continuation without a message"))
            }
            OpCode::Data(Data::Text | Data::Binary) if self.partial.is_some() => {
                Err(ReadError::Protocol("new message inside a fragmented one"))
            }
            _ => Ok(()),
        }
    }

    /// The next event, `Ok(None)` if more bytes are needed. After an error
    /// the stream is over (except [`FrameReader::drain`] to await a close).
    pub fn next_event(&mut self) -> Result<Option<Event>, ReadError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.buf.len() as u64);
                let _ = self.buf.split_to(n as usize);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            let mut cursor = Cursor::new(&self.buf[..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor)
                .map_err(|_| ReadError::Protocol("invalid frame header"))?
            else {
                return Ok(None);
            };
            let header_len = cursor.position() as usize;
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && len > 125 {
                return Err(ReadError::Protocol("control frame over 125 bytes"));
            }
            if let Err(e) = self.check(&header) {
                if !self.draining {
                    return Err(e);
                }
            }
            if self.draining && !is_control {
                let _ = self.buf.split_to(header_len);
                self.skip = len;
                continue;
            }
            // Refused before the payload is buffered.
            if !is_control {
                let compressed =
                    header.rsv1 || self.partial.as_ref().is_some_and(|p| p.inflater.is_some());
                let so_far = self
                    .partial
                    .as_ref()
                    .map_or(0, |p| p.data.len().max(p.wire));
                let cap = if compressed {
                    wire_cap(self.max_message)
                } else {
                    self.max_message
                };
                if so_far as u64 + len > cap as u64 {
                    let _ = self.buf.split_to(header_len);
                    self.skip = len;
                    self.partial = None;
                    return Err(ReadError::TooBig(self.max_message));
                }
            }
            let total = header_len + len as usize;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            let mut frame = self.buf.split_to(total);
            let mut payload = frame.split_off(header_len);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            if let Some(e) = self.frame(header, payload.freeze())? {
                return Ok(Some(e));
            }
        }
    }

    /// One whole frame: an event, or `None` for a fragment.
    fn frame(&mut self, h: FrameHeader, payload: Bytes) -> Result<Option<Event>, ReadError> {
        match h.opcode {
            OpCode::Control(Control::Ping) => Ok(Some(Event::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(Some(Event::Pong(payload))),
            OpCode::Control(Control::Close) => close_frame(&payload).map(|c| Some(Event::Close(c))),
            OpCode::Data(d) => {
                let mut p = match self.partial.take() {
                    Some(p) => p,
                    None => Partial {
                        text: d == Data::Text,
                        data: Vec::new(),
                        inflater: h.rsv1.then(|| Inflater::new(self.max_message)),
                        wire: 0,
                    },
                };
                p.wire += payload.len();
                match &mut p.inflater {
                    Some(i) => i.push(&payload).map_err(inflate_error)?,
                    // One frame, one message: no copy.
                    None if h.is_final && p.data.is_empty() => {
                        return self.message(p.text, payload).map(Some)
                    }
                    None => p.data.extend_from_slice(&payload),
                }
                if !h.is_final {
                    self.partial = Some(p);
                    return Ok(None);
                }
                let data = match p.inflater {
                    Some(i) => i.finish().map_err(inflate_error)?,
                    None => p.data,
                };
                self.message(p.text, Bytes::from(data)).map(Some)
            }
            OpCode::Control(Control::Reserved(_)) => Err(ReadError::Protocol("reserved opcode")),
        }
    }

    fn message(&self, text: bool, data: Bytes) -> Result<Event, ReadError> {
        if !text {
            return Ok(Event::Binary(data));
        }
        if std::str::from_utf8(&data).is_err() {
            return Err(ReadError::BadData("text message is not UTF-8"));
        }
        Ok(Event::Text(data))
    }
}

fn inflate_error(e: InflateError) -> ReadError {
    match e {
        InflateError::TooBig(n) => ReadError::TooBig(n),
        InflateError::Corrupt => ReadError::BadData("compressed data does not inflate"),
    }
}

fn close_frame(payload: &[u8]) -> Result<Option<(u16, String)>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !CloseCode::from(code).is_allowed() {
                return Err(ReadError::Protocol("close code not allowed"));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| ReadError::BadData("close reason is not UTF-8"))?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Removes the client's mask (RFC 6455 §5.3).
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;
