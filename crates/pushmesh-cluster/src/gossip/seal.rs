//! The sealed gossip datagram, without I/O: [`Sealer`] turns a serialized
//! chitchat envelope into a datagram, [`Opener`] checks and opens one.
//!
//! ```text
//! version u8 (2) · sender u64 · timestamp_ms u64 · counter u64 · nonce [12]
//!   · ChaCha20-Poly1305(envelope) with the 37-byte header as associated data
//! ```
//!
//! `sender` is chosen at random when a node opens its gossip socket and
//! `counter` counts that socket's datagrams. An opened datagram must be
//! authentic, its timestamp within [`MAX_SKEW_MS`] of the receiver's clock,
//! and its counter new for its sender (a sliding window of
//! [`REPLAY_WINDOW`] counters, as in IPsec and WireGuard). A sender's window
//! is forgotten once its newest timestamp is too old to be accepted again,
//! so a replay can never outlive the state that detects it.

use std::collections::HashMap;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};

/// Format version, the first byte of every datagram.
pub const VERSION: u8 = 2;
/// Nonce length.
pub const NONCE_LEN: usize = 12;
/// Header length: version, sender, timestamp, counter, nonce.
pub const HEADER_LEN: usize = 1 + 8 + 8 + 8 + NONCE_LEN;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Bytes sealing adds to an envelope.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest UDP payload over IPv4 (65,535 − 8 − 20).
pub const MAX_DATAGRAM: usize = 65_507;
/// Largest envelope that can be sealed into one datagram.
pub const MAX_PLAINTEXT: usize = MAX_DATAGRAM - OVERHEAD;
/// How far a datagram's timestamp may be from the receiver's clock, either way.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Counters remembered per sender below its highest one.
pub const REPLAY_WINDOW: u64 = 128;
/// Senders tracked at once; beyond, datagrams from new senders are refused.
pub const MAX_SENDERS: usize = 4096;

// chitchat never builds an envelope over its (patched) datagram budget, and
// that budget plus our sealing still fits in one UDP datagram.
const _: () = assert!(OVERHEAD <= chitchat::TRANSPORT_OVERHEAD);
const _: () = assert!(chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE + OVERHEAD <= MAX_DATAGRAM);

/// Why an envelope cannot be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The sealed datagram would not fit in one UDP datagram.
    #[error("sealed gossip datagram would be {len} bytes, over the {MAX_DATAGRAM}-byte UDP limit")]
    TooLarge {
        /// Its size.
        len: usize,
    },
}

/// Why a datagram is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than a header and a tag.
    #[error("datagram too short")]
    Short,
    /// Another format version.
    #[error("unknown gossip format version {0}")]
    Version(u8),
    /// Wrong key, tampered or forged.
    #[error("authentication failed")]
    Auth,
    /// Authentic but older than [`MAX_SKEW_MS`].
    #[error("timestamp {age_ms} ms old (clocks apart?)")]
    TooOld {
        /// How old.
        age_ms: u64,
    },
    /// Authentic but ahead of the receiver's clock by more than [`MAX_SKEW_MS`].
    #[error("timestamp {ahead_ms} ms in the future (clocks apart?)")]
    TooNew {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// Authentic but already received (or older than the replay window).
    #[error("replayed datagram")]
    Replay,
    /// Too many senders tracked.
    #[error("too many gossip senders tracked")]
    TooManySenders,
}

/// The parsed header of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Random id of the sending socket.
    pub sender: u64,
    /// Sender's clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Datagram number of this sender.
    pub counter: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Seals envelopes of one sender.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    sender: u64,
    counter: u64,
}

impl Sealer {
    /// A sealer for `key`, identified by `sender` (random per socket).
    pub fn new(key: &[u8; 32], sender: u64) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            sender,
            counter: 0,
        }
    }

    /// Seals `plaintext` at time `now_ms` with a fresh random nonce.
    pub fn seal(&mut self, now_ms: u64, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_with_nonce(now_ms, plaintext, rand::random())
    }

    /// Seals with the given nonce (tests, fuzzing); never reuse one.
    pub fn seal_with_nonce(
        &mut self,
        now_ms: u64,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>, SealError> {
        let len = plaintext.len() + OVERHEAD;
        if len > MAX_DATAGRAM {
            return Err(SealError::TooLarge { len });
        }
        self.counter += 1;
        let mut out = Vec::with_capacity(len);
        out.push(VERSION);
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        // Encryption fails only past ChaCha20's 256 GiB message limit.
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), header, body)
            .map_err(|_| SealError::TooLarge { len })?;
        out.extend_from_slice(&tag);
        Ok(out)
    }
}

/// Counters seen from one sender.
#[derive(Debug, Clone, Copy)]
struct Window {
    highest: u64,
    /// Bit i: counter `highest - i` seen.
    seen: u128,
    newest_ms: u64,
}

impl Window {
    fn is_new(&self, c: u64) -> bool {
        if c > self.highest {
            return true;
        }
        let back = self.highest - c;
        back < REPLAY_WINDOW && self.seen & (1u128 << back) == 0
    }

    fn mark(&mut self, c: u64, ts: u64) {
        if c > self.highest {
            let shift = c - self.highest;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = c;
        } else {
            self.seen |= 1u128 << (self.highest - c);
        }
        self.newest_ms = self.newest_ms.max(ts);
    }
}

/// Opens datagrams sealed under one key, refusing replays.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    windows: HashMap<u64, Window>,
}

impl Opener {
    /// An opener for `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            windows: HashMap::new(),
        }
    }

    /// Senders currently tracked.
    pub fn senders(&self) -> usize {
        self.windows.len()
    }

    /// Checks and opens `datagram` received at `now_ms`; returns the envelope bytes.
    pub fn open(&mut self, now_ms: u64, datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
        let h = parse_header(datagram)?;
        let (header, rest) = datagram.split_at(HEADER_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plain = body.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&header[HEADER_LEN - NONCE_LEN..]),
                header,
                &mut plain,
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::Auth)?;
        if h.timestamp_ms.saturating_add(MAX_SKEW_MS) < now_ms {
            return Err(OpenError::TooOld {
                age_ms: now_ms - h.timestamp_ms,
            });
        }
        if h.timestamp_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(OpenError::TooNew {
                ahead_ms: h.timestamp_ms - now_ms,
            });
        }
        match self.windows.get_mut(&h.sender) {
            Some(w) if !w.is_new(h.counter) => return Err(OpenError::Replay),
            Some(w) => w.mark(h.counter, h.timestamp_ms),
            None => {
                // A window whose newest datagram is too old to pass the
                // timestamp check is no longer needed.
                self.windows
                    .retain(|_, w| w.newest_ms.saturating_add(MAX_SKEW_MS) >= now_ms);
                if self.windows.len() >= MAX_SENDERS {
                    return Err(OpenError::TooManySenders);
                }
                self.windows.insert(
                    h.sender,
                    Window {
                        highest: h.counter,
                        seen: 1,
                        newest_ms: h.timestamp_ms,
                    },
                );
            }
        }
        Ok(plain)
    }
}

/// Parses the header of a datagram long enough to hold a header and a tag.
pub fn parse_header(datagram: &[u8]) -> Result<Header, OpenError> {
    if datagram.len() < OVERHEAD {
        return Err(OpenError::Short);
    }
    if datagram[0] != VERSION {
        return Err(OpenError::Version(datagram[0]));
    }
    Ok(Header {
        sender: u64_at(datagram, 1),
        timestamp_ms: u64_at(datagram, 9),
        counter: u64_at(datagram, 17),
    })
}

#[cfg(test)]
mod tests;
