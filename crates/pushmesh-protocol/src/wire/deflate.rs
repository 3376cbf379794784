//! permessage-deflate payloads (RFC 7692 §7.2): raw deflate, one message
//! at a time (no context kept), and a bounded inflater.

use std::cell::RefCell;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// The four bytes a sync flush ends with; removed from a sent message and
/// appended to a received one (§7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    /// One compressor per thread and level, reset for each message: the
    /// deflate state (hundreds of KiB) is not allocated per publish.
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// Compresses one message on its own (`server_no_context_takeover`) at
/// `level` (1 to 9): the payload of a frame with RSV1 set. `None` only if
/// the compressor fails (not expected of raw deflate into a growing buffer):
/// the message then goes uncompressed.
pub fn deflate_message(payload: &[u8], level: u32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        let c = match slot.as_mut() {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            _ => {
                let c = Compress::new(flate2::Compression::new(level), false);
                &mut slot.insert((level, c)).1
            }
        };
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let done = c.total_in() as usize;
            let input = payload.get(done..).unwrap_or_default();
            c.compress_vec(input, &mut out, FlushCompress::Sync).ok()?;
            if c.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        Some(out)
    })
}

/// Why a compressed message could not be inflated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    #[error("inflated message larger than {0} bytes")]
    TooBig(usize),
    /// Not a valid deflate stream.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates one message, frame by frame, stopping as soon as the output
/// passes `max` bytes: memory is bounded by `max` (plus the window) and
/// CPU by the bytes produced, whatever the input claims.
pub struct Inflater {
    d: Decompress,
    out: Vec<u8>,
    max: usize,
    ended: bool,
}

impl Inflater {
    /// An inflater for one message of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            d: Decompress::new(false),
            out: Vec::new(),
            max,
            ended: false,
        }
    }

    /// Inflates the payload of one frame of the message.
    pub fn push(&mut self, input: &[u8]) -> Result<(), InflateError> {
        let mut used = 0usize;
        while !self.ended {
            if self.out.len() == self.out.capacity() {
                if self.out.len() > self.max {
                    return Err(InflateError::TooBig(self.max));
                }
                // Grow in steps, never past max + 1 (one byte over tells).
                let room = (self.max + 1 - self.out.len()).min(self.out.len().max(4096));
                self.out.reserve_exact(room);
            }
            let before_in = self.d.total_in();
            let before_out = self.out.len();
            let status = self
                .d
                .decompress_vec(&input[used..], &mut self.out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            used += (self.d.total_in() - before_in) as usize;
            if self.out.len() > self.max {
                return Err(InflateError::TooBig(self.max));
            }
            let progressed = self.d.total_in() != before_in || self.out.len() != before_out;
            match status {
                Status::StreamEnd => self.ended = true,
                _ if used == input.len() && self.out.len() < self.out.capacity() => break,
                _ if !progressed && self.out.len() < self.out.capacity() => {
                    return Err(InflateError::Corrupt)
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Ends the message: its inflated bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, InflateError> {
        self.push(&TAIL)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        let mut i = Inflater::new(max);
        i.push(data)?;
        i.finish()
    }

    #[test]
    fn round_trip() {
        let msg = br#"{"event":"order","data":"{\"items\":[1,2,3,1,2,3,1,2,3]}"}"#.repeat(20);
        let z = deflate_message(&msg, 1).expect("ok");
        assert!(z.len() < msg.len() / 4, "{} of {}", z.len(), msg.len());
        assert!(!z.ends_with(&TAIL));
        assert_eq!(inflate(&z, 1 << 20).expect("ok"), msg);
        // Every level, and the empty message.
        for level in 1..=9 {
            assert_eq!(
                inflate(&deflate_message(&msg, level).expect("ok"), 1 << 20).expect("ok"),
                msg
            );
        }
        assert_eq!(
            inflate(&deflate_message(b"", 1).expect("ok"), 16).expect("ok"),
            b""
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = deflate_message(&vec![b'a'; 8 << 20], 9).expect("ok");
        assert!(bomb.len() < 16 << 10);
        assert_eq!(
            inflate(&bomb, 64 << 10),
            Err(InflateError::TooBig(64 << 10))
        );
        // Exactly at the limit is fine.
        let msg = vec![b'b'; 4096];
        assert_eq!(
            inflate(&deflate_message(&msg, 1).expect("ok"), 4096).expect("ok"),
            msg
        );
        assert!(inflate(&deflate_message(&msg, 1).expect("ok"), 4095).is_err());
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1024),
            Err(InflateError::Corrupt)
        );
    }

    proptest! {
        /// Whatever is split over frames inflates to the message, and no
        /// limit is ever passed.
        #[test]
        fn fragments_and_limits(msg in proptest::collection::vec(0u8..4, 0..5000), cut in 0usize..5000, max in 0usize..6000) {
            let z = deflate_message(&msg, 6).expect("ok");
            let cut = cut.min(z.len());
            let mut i = Inflater::new(max);
            let r = i.push(&z[..cut]).and_then(|()| i.push(&z[cut..])).and_then(|()| i.finish());
            if msg.len() <= max {
                prop_assert_eq!(r.expect("ok"), msg);
            } else {
                prop_assert_eq!(r, Err(InflateError::TooBig(max)));
            }
        }

        /// Random input never panics nor inflates past the limit.
        #[test]
        fn random_input(data in proptest::collection::vec(any::<u8>(), 0..2000), max in 0usize..4096) {
            if let Ok(out) = inflate(&data, max) {
                prop_assert!(out.len() <= max);
            }
        }
    }
}
