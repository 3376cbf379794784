//! One upgraded WebSocket: reads events, writes pre-framed bytes.
//!
//! Writes go through `pending`, a queue of whole frames: a write that is
//! interrupted (a close request wins over a client that does not read)
//! leaves the rest there, so whatever is written next follows it and the
//! stream stays well framed. Frames are written as they are, several per
//! `writev(2)`, never copied or re-framed per connection.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use pushmesh_protocol::wire::{frame, Compression, Event, FrameReader, Outbound, ReadError, Role};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Slices handed to one `writev(2)`.
const IOV: usize = 64;
/// `pending` keeps at most this capacity once empty (memory per connection).
const PENDING_KEEP: usize = 16;

/// Size limits of a socket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message (inflated) a client may send.
    pub max_message: usize,
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// The connection ended (EOF or an I/O error).
    Gone,
    /// The client broke the protocol: answer with the error's close code.
    Invalid(ReadError),
}

/// Bytes written, for the node's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Message payload bytes (uncompressed).
    pub payload: u64,
    /// Compressed messages: their plain size.
    pub deflate_plain: u64,
    /// Compressed messages: their compressed size.
    pub deflate_compressed: u64,
}

/// One upgraded connection.
pub struct WsSocket {
    io: TokioIo<Upgraded>,
    reader: FrameReader,
    compression: Option<Compression>,
    pending: VecDeque<Bytes>,
}

impl WsSocket {
    pub(crate) fn new(
        io: TokioIo<Upgraded>,
        compression: Option<Compression>,
        limits: Limits,
    ) -> Self {
        Self {
            io,
            reader: FrameReader::new(Role::Server, limits.max_message, compression.is_some()),
            compression,
            pending: VecDeque::new(),
        }
    }

    /// Whether permessage-deflate was negotiated.
    pub fn compressing(&self) -> bool {
        self.compression.is_some()
    }

    /// The next event from the client. Cancel-safe (bytes read stay in the
    /// reader until a whole frame is there).
    pub async fn recv(&mut self) -> Result<Event, ReadEnd> {
        loop {
            match self.reader.next_event() {
                Ok(Some(e)) => return Ok(e),
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Invalid(e)),
            }
            match self.io.read_buf(self.reader.buffer_mut()).await {
                Ok(0) | Err(_) => return Err(ReadEnd::Gone),
                Ok(_) => {}
            }
        }
    }

    /// Queues one message for this connection (its compressed frame if
    /// negotiated), counting into `w`.
    pub fn queue(&mut self, msg: &Outbound, w: &mut Written) {
        let wire = msg.wire(self.compression.as_ref());
        w.payload += msg.payload().len() as u64;
        if let Some((plain, z)) = wire.compressed {
            w.deflate_plain += plain as u64;
            w.deflate_compressed += z as u64;
        }
        self.pending.push_back(wire.frame.clone());
    }

    /// Queues a frame built for this connection only (control frames).
    pub fn queue_frame(&mut self, f: Bytes) {
        self.pending.push_back(f);
    }

    /// Writes everything queued, several frames per system call.
    /// Cancel-safe: what is not written stays queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        let Self { io, pending, .. } = self;
        while !pending.is_empty() {
            // The slices live in the poll only, never in the future's state
            // (64 of them would add 1 KiB to every connection task).
            let mut written = std::future::poll_fn(|cx| {
                // One frame (the usual case at low rates): a plain write(2).
                if let [one] = pending.as_slices().0 {
                    if pending.len() == 1 {
                        return Pin::new(&mut *io).poll_write(cx, one);
                    }
                }
                let mut slices = [IoSlice::new(&[]); IOV];
                let mut n = 0;
                for (s, b) in slices.iter_mut().zip(pending.iter()) {
                    *s = IoSlice::new(b);
                    n += 1;
                }
                Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
            })
            .await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let Some(front) = pending.front_mut() else {
                    break;
                };
                if written >= front.len() {
                    written -= front.len();
                    pending.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        if pending.capacity() > PENDING_KEEP {
            *pending = VecDeque::new();
        }
        io.flush().await
    }

    /// Queues and writes one frame.
    pub async fn send_frame(&mut self, f: Bytes) -> io::Result<()> {
        self.queue_frame(f);
        self.flush().await
    }

    /// Sends a text message now (replies outside the outbound queue).
    pub async fn send_text(&mut self, text: &[u8]) -> io::Result<()> {
        let msg = Outbound::text(text);
        let mut w = Written::default();
        self.queue(&msg, &mut w);
        self.flush().await
    }

    /// Sends a close frame.
    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        self.send_frame(frame::close(code, reason)).await
    }

    /// Answers a client's ping.
    pub async fn pong(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send_frame(frame::pong(payload)).await
    }

    /// Waits for the client's close frame, discarding data frames unread.
    pub async fn await_close(&mut self) {
        self.reader.drain();
        loop {
            match self.recv().await {
                Ok(Event::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}
