//! Incarnations: which run of a hub numbered which events of a (room, follower) queue.
//!
//! Sequence numbers alone cannot tell a hub that restarted from a backup (or from nothing) and
//! numbered new events again from an old point: the follower holds numbers with other events
//! behind them. Each hub start draws a random incarnation; a queue remembers from which number
//! on each incarnation numbered its events (a handful of ranges: one per start while events
//! wait), and a follower remembers the incarnation of the last event it took. Both sides keep
//! theirs in the store as keyed records, so they survive restarts and go with a backup.

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};

/// Store record of a queue's incarnation ranges: this byte, the room's length (u16), the
/// room, the destination. The value is `(from, incarnation)` pairs, u64 big-endian each.
pub(super) const REC_QUEUE_LINEAGE: u8 = 11;
/// Store record of a follower cursor's incarnation: this byte, the hub's length (u16), the
/// hub, the room. The value is a u64 big-endian.
pub(super) const REC_CURSOR_INC: u8 = 12;

/// Ranges kept per queue: one is added per hub start while the queue has events waiting, and
/// ranges wholly acknowledged are dropped. Past this, the oldest go; a number before what is
/// kept has an unknown incarnation and is handled as before incarnations (by content).
const MAX_RANGES: usize = 64;

/// A queue's incarnation ranges, oldest first: `(from, inc)` says the events numbered `from`
/// and on, up to the next range's `from`, were numbered by incarnation `inc`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// The incarnation that numbered `seq`, if known.
    pub(super) fn inc_at(&self, seq: u64) -> Option<u64> {
        let i = self.0.partition_point(|&(from, _)| from <= seq);
        (i > 0).then(|| self.0[i - 1].1)
    }

    /// The first number after the range of `inc` (`None`: `inc` is not here, or is the last).
    pub(super) fn end_of(&self, inc: u64) -> Option<Option<u64>> {
        let i = self.0.iter().rposition(|&(_, x)| x == inc)?;
        Some(self.0.get(i + 1).map(|&(from, _)| from))
    }

    /// The first number after `seq`'s range (`None`: `seq`'s is the last range).
    pub(super) fn next_start_after(&self, seq: u64) -> Option<u64> {
        let i = self.0.partition_point(|&(from, _)| from <= seq);
        self.0.get(i).map(|&(from, _)| from)
    }

    /// `seq` is numbered by `inc`: starts a range unless the last one is `inc`'s already.
    /// Returns whether anything changed.
    pub(super) fn note(&mut self, seq: u64, inc: u64) -> bool {
        if self.0.last().is_some_and(|&(_, x)| x == inc) {
            return false;
        }
        self.0.retain(|&(from, _)| from < seq);
        self.0.push((seq, inc));
        if self.0.len() > MAX_RANGES {
            self.0.remove(0);
        }
        true
    }

    /// Drops ranges that end at or before `acked`, keeping the one that holds `acked`.
    /// Returns whether anything changed.
    pub(super) fn trim(&mut self, acked: u64) -> bool {
        let keep_from = self.0.partition_point(|&(from, _)| from <= acked);
        if keep_from <= 1 {
            return false;
        }
        self.0.drain(..keep_from - 1);
        true
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.0.len() * 16);
        for &(from, inc) in &self.0 {
            v.extend_from_slice(&from.to_be_bytes());
            v.extend_from_slice(&inc.to_be_bytes());
        }
        v
    }

    /// `None` for a record we did not write (torn or foreign): the queue then goes by content.
    pub(super) fn decode(v: &[u8]) -> Option<Ranges> {
        if !v.len().is_multiple_of(16) {
            return None;
        }
        let mut out = Vec::with_capacity(v.len() / 16);
        for c in v.chunks_exact(16) {
            let from = u64::from_be_bytes(c[..8].try_into().ok()?);
            let inc = u64::from_be_bytes(c[8..].try_into().ok()?);
            if out.last().is_some_and(|&(f, _)| f >= from) {
                return None;
            }
            out.push((from, inc));
        }
        Some(Ranges(out))
    }
}

fn pair_key(tag: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + a.len() + b.len());
    k.push(tag);
    // Room ids and domains are far below 64 KiB; a longer one would only shorten the prefix.
    k.extend_from_slice(&(a.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(a.as_bytes());
    k.extend_from_slice(b.as_bytes());
    k
}

fn split_pair_key(k: &[u8]) -> Option<(&str, &str)> {
    let len = u16::from_be_bytes(k.get(..2)?.try_into().ok()?) as usize;
    let a = std::str::from_utf8(k.get(2..2 + len)?).ok()?;
    let b = std::str::from_utf8(k.get(2 + len..)?).ok()?;
    Some((a, b))
}

pub(super) fn queue_key(room: &RoomId, dest: &ProviderDomain) -> Vec<u8> {
    pair_key(REC_QUEUE_LINEAGE, room.as_str(), dest.as_str())
}

pub(super) fn cursor_key(hub: &ProviderDomain, room: &RoomId) -> Vec<u8> {
    pair_key(REC_CURSOR_INC, hub.as_str(), room.as_str())
}

/// A stored queue lineage record: `(room, dest, ranges)`.
pub(super) fn parse_queue_record(k: &[u8], v: &Bytes) -> Option<(RoomId, ProviderDomain, Ranges)> {
    let (&tag, rest) = k.split_first()?;
    if tag != REC_QUEUE_LINEAGE {
        return None;
    }
    let (room, dest) = split_pair_key(rest)?;
    Some((room.parse().ok()?, dest.parse().ok()?, Ranges::decode(v)?))
}

/// A stored cursor incarnation record: `(hub, room, inc)`.
pub(super) fn parse_cursor_record(k: &[u8], v: &Bytes) -> Option<(ProviderDomain, RoomId, u64)> {
    let (&tag, rest) = k.split_first()?;
    if tag != REC_CURSOR_INC {
        return None;
    }
    let (hub, room) = split_pair_key(rest)?;
    let inc = u64::from_be_bytes(v.as_ref().try_into().ok()?);
    Some((hub.parse().ok()?, room.parse().ok()?, inc))
}

/// A fresh incarnation for this start: never 0, which means "not known" on the wire.
pub(super) fn draw(seed: u64, unix_ms: u64) -> u64 {
    let mut rng = crate::rng::SplitMix64::new(seed ^ unix_ms.rotate_left(29));
    loop {
        let x = rng.next_u64();
        if x != 0 {
            return x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_answer_which_start_numbered_what() {
        let mut r = Ranges::default();
        assert_eq!(r.inc_at(5), None);
        assert!(r.note(10, 7));
        assert!(!r.note(11, 7));
        assert!(r.note(20, 9));
        assert_eq!(r.inc_at(9), None);
        assert_eq!(r.inc_at(10), Some(7));
        assert_eq!(r.inc_at(19), Some(7));
        assert_eq!(r.inc_at(20), Some(9));
        assert_eq!(r.inc_at(1000), Some(9));
        assert_eq!(r.end_of(7), Some(Some(20)));
        assert_eq!(r.end_of(9), Some(None));
        assert_eq!(r.end_of(8), None);
        assert_eq!(r.next_start_after(12), Some(20));
        assert_eq!(r.next_start_after(20), None);
        // Acknowledged through 19: the range of 7 still holds 19.
        assert!(!r.trim(19));
        assert!(r.trim(20));
        assert_eq!(r.inc_at(19), None);
        assert_eq!(r.inc_at(20), Some(9));
        assert_eq!(Ranges::decode(&r.encode()), Some(r.clone()));
    }

    #[test]
    fn a_torn_or_disordered_record_is_not_taken() {
        assert_eq!(Ranges::decode(&[0; 15]), None);
        let mut v = Ranges(vec![(5, 1)]).encode();
        v.extend_from_slice(&Ranges(vec![(5, 2)]).encode());
        assert_eq!(Ranges::decode(&v), None);
    }

    #[test]
    fn keys_round_trip() {
        let room: RoomId = "mimi://a.example/r/x".parse().expect("room");
        let dest: ProviderDomain = "b.example".parse().expect("domain");
        let k = queue_key(&room, &dest);
        let v = Bytes::from(Ranges(vec![(1, 42)]).encode());
        let (r, d, ranges) = parse_queue_record(&k, &v).expect("parses");
        assert_eq!(
            (r, d, ranges.inc_at(3)),
            (room.clone(), dest.clone(), Some(42))
        );
        let k = cursor_key(&dest, &room);
        let (h, r, inc) =
            parse_cursor_record(&k, &Bytes::copy_from_slice(&42u64.to_be_bytes())).expect("parses");
        assert_eq!((h, r, inc), (dest, room, 42));
    }
}
