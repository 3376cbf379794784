//! Positions in a channel's history: one sequence number per origin (a node
//! incarnation that published on the channel), as a vector.
//!
//! `P[o] = k` means "the holder has every event `o` published on this
//! channel up to its `k`-th" (or knows they are gone). Vectors are merged
//! component-wise; an event `(o, s)` is after `P` iff `s > P[o]`. The text
//! form is opaque to clients: `<origin hex>.<seq>` entries, sorted, joined
//! by `-`, or `0` for the empty vector (URL-safe, so it fits `after=`).

use std::fmt::{self, Write as _};

/// A node incarnation that publishes: a stable 64-bit hash of its node id
/// and epoch (ids may be long; epochs alone may collide across nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin(pub u64);

impl Origin {
    /// The origin of node `node` in incarnation `epoch` (FNV-1a, stable
    /// across builds and platforms: every node must compute the same).
    pub fn of(node: &str, epoch: u64) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.bytes().chain([0xff]).chain(epoch.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(h)
    }
}

/// Most entries a position may have (one per origin with history on the
/// channel); a longer one from a client is refused as invalid.
pub const MAX_ENTRIES: usize = 256;

/// A position: `(origin, seq)` sorted by origin, no zero seq.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(Vec<(Origin, u64)>);

/// A position string that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {0:?}")]
pub struct BadPosition(pub String);

impl Position {
    /// The sequence number of `o` (0: nothing of it).
    pub fn get(&self, o: Origin) -> u64 {
        match self.0.binary_search_by_key(&o, |e| e.0) {
            Ok(i) => self.0[i].1,
            Err(_) => 0,
        }
    }

    /// Raises `o` to at least `seq`.
    pub fn raise(&mut self, o: Origin, seq: u64) {
        if seq == 0 {
            return;
        }
        match self.0.binary_search_by_key(&o, |e| e.0) {
            Ok(i) => self.0[i].1 = self.0[i].1.max(seq),
            Err(i) => self.0.insert(i, (o, seq)),
        }
    }

    /// Sets `o` to `seq` (0 removes it).
    pub fn set(&mut self, o: Origin, seq: u64) {
        match self.0.binary_search_by_key(&o, |e| e.0) {
            Ok(i) if seq == 0 => {
                self.0.remove(i);
            }
            Ok(i) => self.0[i].1 = seq,
            Err(i) if seq > 0 => self.0.insert(i, (o, seq)),
            Err(_) => {}
        }
    }

    /// Every `(origin, seq)` entry.
    pub fn entries(&self) -> impl Iterator<Item = (Origin, u64)> + '_ {
        self.0.iter().copied()
    }

    /// Parses the text form (bounded: at most [`MAX_ENTRIES`] entries).
    pub fn parse(s: &str) -> Result<Self, BadPosition> {
        let bad = || BadPosition(s.chars().take(64).collect());
        if s == "0" {
            return Ok(Self::default());
        }
        if s.is_empty() || s.len() > MAX_ENTRIES * 40 {
            return Err(bad());
        }
        let mut v = Vec::new();
        for part in s.split('-') {
            let (o, n) = part.split_once('.').ok_or_else(bad)?;
            if o.is_empty() || o.len() > 16 || n.is_empty() || n.len() > 20 {
                return Err(bad());
            }
            let o = u64::from_str_radix(o, 16).map_err(|_| bad())?;
            let n: u64 = n.parse().map_err(|_| bad())?;
            if n == 0 || v.len() >= MAX_ENTRIES {
                return Err(bad());
            }
            v.push((Origin(o), n));
        }
        v.sort_unstable_by_key(|e| e.0);
        if v.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(bad());
        }
        Ok(Self(v))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_char('0');
        }
        for (i, (o, n)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char('-')?;
            }
            write!(f, "{:x}.{n}", o.0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_is_sorted() {
        let mut p = Position::default();
        assert_eq!(p.to_string(), "0");
        assert_eq!(Position::parse("0").expect("valid"), p);
        p.raise(Origin(0xbeef), 3);
        p.raise(Origin(0x12), 7);
        p.raise(Origin(0xbeef), 2);
        assert_eq!(p.to_string(), "12.7-beef.3");
        assert_eq!(Position::parse("beef.3-12.7").expect("valid"), p);
        assert_eq!(p.get(Origin(0x12)), 7);
        assert_eq!(p.get(Origin(1)), 0);
    }

    #[test]
    fn bad_text_is_refused() {
        for s in [
            "",
            "x",
            "1",
            "1.",
            ".1",
            "g.1",
            "1.0",
            "1.1-1.2",
            "1.-1",
            "1.1-",
            "12345678901234567.1",
        ] {
            assert!(Position::parse(s).is_err(), "{s:?}");
        }
        let long = (1..=MAX_ENTRIES as u64 + 1)
            .map(|i| format!("{i:x}.1"))
            .collect::<Vec<_>>()
            .join("-");
        assert!(Position::parse(&long).is_err());
    }

    #[test]
    fn origins_differ_by_node_and_epoch() {
        let a = Origin::of("n1", 5);
        assert_eq!(a, Origin::of("n1", 5));
        assert_ne!(a, Origin::of("n1", 6));
        assert_ne!(a, Origin::of("n2", 5));
        assert_ne!(Origin::of("n1", 0x31), Origin::of("n11", 0));
    }
}
