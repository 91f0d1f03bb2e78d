//! What the hub remembers of accepted submissions, to answer a retry instead of fanning it
//! out twice: a window of keys per room, and the key itself.
//!
//! The key is a hash of the exact body under a secret of this node, drawn at random once and
//! kept in the store (so keys remembered before a restart still match after it). A peer that
//! does not know the secret cannot make two distinct bodies share a key on purpose; with a
//! public hash it could make its next message pass for a retry of an earlier one. The body
//! names the sender (the sending URI must be in the submitting provider's domain), so the
//! provider needs no separate place in the key.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use bytes::Bytes;

use crate::store::{Store, StoreOp, SubmitSeen};

/// The dedupe secret (one record, key `[16]`).
const REC_DEDUPE_SECRET: u8 = 16;
/// xxh3's secret size: the hash mixes each 64-byte stripe of the body with it.
const SECRET_LEN: usize = 192;

/// The secret submission keys are made with.
#[derive(Debug)]
pub(super) struct DedupeKey {
    secret: Box<[u8; SECRET_LEN]>,
    /// Whether the store holds `secret` already.
    saved: bool,
}

impl DedupeKey {
    /// The secret the store kept, or a fresh random one (saved with the first submission
    /// remembered under it).
    pub(super) fn restore(records: &BTreeMap<Vec<u8>, Bytes>) -> DedupeKey {
        if let Some(kept) = records.get(&[REC_DEDUPE_SECRET][..])
            && let Ok(secret) = <[u8; SECRET_LEN]>::try_from(&kept[..])
        {
            return DedupeKey {
                secret: Box::new(secret),
                saved: true,
            };
        }
        // The process's random SipHash keys, as a keyed generator: no RNG dependency in the
        // core, and nothing a peer can predict.
        let keys = std::collections::hash_map::RandomState::new();
        let mut secret = Box::new([0u8; SECRET_LEN]);
        for (i, chunk) in secret.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&keys.hash_one(i).to_le_bytes());
        }
        DedupeKey {
            secret,
            saved: false,
        }
    }

    /// The key of a submission with this exact body.
    pub(super) fn of(&self, body: &[u8]) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_secret(body, &self.secret[..])
    }

    /// Writes the secret before the first key made with it is stored.
    pub(super) fn save<S: Store>(&mut self, store: &mut S) {
        if !self.saved {
            store.apply(StoreOp::Record {
                key: &[REC_DEDUPE_SECRET],
                value: Some(&self.secret[..]),
            });
            self.saved = true;
        }
    }
}

/// Accepted submissions a room remembers, in two generations: new ones go into `current`;
/// when it holds half the window, `previous` is dropped whole and `current` takes its place.
/// So the room remembers at least the last `window / 2` and at most `window` submissions,
/// and no submission pays for a random removal.
///
/// A window is tens of thousands of entries that every submission probes, far larger than the
/// caches: its misses were the largest cost of a submission. So each generation is a table of
/// its own making ([`Generation`]), where the lookup of a new key reads the very line its
/// insert then writes, and the lookups in both generations are independent reads that the
/// CPU overlaps.
#[derive(Debug, Default)]
pub(super) struct SeenWindow {
    current: Generation,
    previous: Generation,
    /// The highest room sequence in `previous`.
    previous_upto: u64,
}

impl SeenWindow {
    pub(super) fn get(&self, key: &u128) -> Option<SubmitSeen> {
        let s = self
            .current
            .find(*key)
            .or_else(|| self.previous.find(*key))?;
        Some(SubmitSeen {
            key: *key,
            room_seq: s.room_seq,
            accepted_ms: s.accepted_ms,
        })
    }

    /// Reads the index slots where `key`'s lookups start, in both generations, and returns
    /// nothing: called as soon as the key is known, so that their cache misses (the largest
    /// cost of a lookup, the window being far larger than the caches) overlap the work done
    /// before [`SeenWindow::get`], instead of stalling it. A plain read: no `unsafe` prefetch.
    pub(super) fn touch(&self, key: u128) {
        std::hint::black_box(self.current.first_slot(key) ^ self.previous.first_slot(key));
    }

    /// Puts back what the store kept (at most one window, oldest first) as the previous
    /// generation: the next rotation forgets it all.
    pub(super) fn restore(&mut self, seen: &SubmitSeen) {
        self.previous.insert(seen);
        self.previous_upto = seen.room_seq;
    }

    /// Remembers `seen`; returns the sequence up to which submissions were forgotten, if any.
    pub(super) fn insert(&mut self, seen: SubmitSeen, window: usize) -> Option<u64> {
        self.current.insert(&seen);
        if self.current.len() < (window / 2).max(1) {
            return None;
        }
        let forgotten = (self.previous.len() > 0).then_some(self.previous_upto);
        // The dropped generation's table becomes the new current one: no regrowth.
        self.previous.clear();
        std::mem::swap(&mut self.current, &mut self.previous);
        self.previous_upto = seen.room_seq;
        forgotten
    }
}

/// One generation: the remembered submissions in the order they came, and an index over
/// them. Only the index is probed at random, so it is kept small: a slot is 8 bytes (32 bits
/// of the key as a tag, 32 for the position), half of them free, so a window of 64 Ki
/// submissions probes 1 MiB instead of the 4 MiB of a table of whole entries; the entries
/// themselves are appended in order and read only on a tag match. Keys are keyed hashes
/// ([`DedupeKey`]), so their low bits serve as the index as they are, and no peer can aim
/// its submissions at one run of slots.
#[derive(Debug, Default)]
struct Generation {
    /// Open addressing with linear probing: `tag << 32 | (position + 1)`, 0 when free. A
    /// power of two long, at most half full (or empty: nothing allocated yet).
    index: Vec<u64>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u128,
    room_seq: u64,
    accepted_ms: u64,
}

/// Where `key`'s probe starts, and its tag: from different bits, so that keys that share a
/// start rarely share a tag.
fn split(key: u128) -> (usize, u32) {
    (key as usize, (key >> 64) as u32)
}

impl Generation {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn find(&self, key: u128) -> Option<&Entry> {
        self.slot_of(key).and_then(|i| {
            let pos = (self.index[i] as u32).checked_sub(1)?;
            self.entries.get(pos as usize)
        })
    }

    /// The value of the slot where `key`'s probe starts (0 when there is no index).
    fn first_slot(&self, key: u128) -> u64 {
        let mask = self.index.len().wrapping_sub(1);
        self.index.get(split(key).0 & mask).copied().unwrap_or(0)
    }

    /// The index slot holding `key`, if any.
    fn slot_of(&self, key: u128) -> Option<usize> {
        let mask = self.index.len().checked_sub(1)?;
        let (start, tag) = split(key);
        let mut i = start & mask;
        loop {
            let v = self.index[i];
            if v == 0 {
                return None;
            }
            if (v >> 32) as u32 == tag
                && let Some(e) = self.entries.get((v as u32 as usize).wrapping_sub(1))
                && e.key == key
            {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, seen: &SubmitSeen) {
        let entry = Entry {
            key: seen.key,
            room_seq: seen.room_seq,
            accepted_ms: seen.accepted_ms,
        };
        if let Some(i) = self.slot_of(seen.key) {
            let pos = (self.index[i] as u32 as usize).wrapping_sub(1);
            if let Some(e) = self.entries.get_mut(pos) {
                *e = entry;
            }
            return;
        }
        // Positions are 32 bits: a window beyond them remembers no more (not reached by any
        // configuration that fits in memory).
        let Ok(pos) = u32::try_from(self.entries.len() + 1) else {
            return;
        };
        if (self.entries.len() + 1) * 2 > self.index.len() {
            self.grow();
        }
        self.entries.push(entry);
        self.place(seen.key, pos);
    }

    /// Puts `key`, at entry position `pos - 1`, into the first free slot of its run. There
    /// is always one: the index is at most half full.
    fn place(&mut self, key: u128, pos: u32) {
        let mask = self.index.len() - 1;
        let (start, tag) = split(key);
        let mut i = start & mask;
        while self.index[i] != 0 {
            i = (i + 1) & mask;
        }
        self.index[i] = u64::from(tag) << 32 | u64::from(pos);
    }

    fn grow(&mut self) {
        let size = (self.index.len() * 2).max(16);
        self.index = vec![0; size];
        for n in 0..self.entries.len() {
            // Fits: `insert` admits only 32-bit positions.
            let pos = (n + 1) as u32;
            self.place(self.entries[n].key, pos);
        }
    }

    fn clear(&mut self) {
        self.index.fill(0);
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn seen_window_keeps_between_half_and_all_of_the_window() {
        let mut w = SeenWindow::default();
        let seen = |n: u64| SubmitSeen {
            key: u128::from(n) * 7919,
            room_seq: n,
            accepted_ms: n,
        };
        let mut forgotten = Vec::new();
        for n in 1..=10 {
            forgotten.extend(w.insert(seen(n), 4));
            let remembered: Vec<u64> = (1..=n)
                .filter(|k| w.get(&(u128::from(*k) * 7919)).is_some())
                .collect();
            assert!(
                remembered.len() >= 2.min(n as usize) && remembered.len() <= 4,
                "{remembered:?}"
            );
            assert_eq!(
                remembered.last(),
                Some(&n),
                "the newest is always remembered"
            );
        }
        // Generations of two: forgotten up to 2 when 5..6 filled, up to 4 when 7..8, ...
        assert_eq!(forgotten, [2, 4, 6, 8]);
    }

    #[test]
    fn the_window_answers_as_a_map_of_its_last_generations() {
        // Keys that share where their probes start (so probes run past each other) or share
        // their tags (so a tag match is not taken for the key), in tables that grow and
        // rotate many times.
        let shared_start = |n: u64| u128::from(n / 3) | (u128::from(n) << 64);
        let shared_tag = |n: u64| u128::from(n) | (u128::from(n % 5) << 64);
        let keys: [&dyn Fn(u64) -> u128; 2] = [&shared_start, &shared_tag];
        for (window, key) in [2usize, 16, 1000]
            .into_iter()
            .flat_map(|w| keys.map(|k| (w, k)))
        {
            let mut w = SeenWindow::default();
            let mut forgotten_upto = 0;
            for n in 1..=5_000u64 {
                let seen = SubmitSeen {
                    key: key(n),
                    room_seq: n,
                    accepted_ms: n * 10,
                };
                assert!(w.get(&seen.key).is_none(), "{n} is new");
                if let Some(upto) = w.insert(seen, window) {
                    assert!(upto > forgotten_upto);
                    forgotten_upto = upto;
                }
                // Everything after the forgotten generation is remembered, exactly.
                let from = if n % 97 == 0 {
                    forgotten_upto + 1
                } else {
                    n.saturating_sub(20).max(forgotten_upto + 1)
                };
                for k in from..=n {
                    let got = w.get(&key(k)).expect("remembered");
                    assert_eq!((got.room_seq, got.accepted_ms), (k, k * 10));
                }
                for k in (forgotten_upto.saturating_sub(50) + 1)..=forgotten_upto {
                    assert!(w.get(&key(k)).is_none(), "{k} was forgotten");
                }
                assert!(n - forgotten_upto <= window as u64);
            }
        }
    }

    #[test]
    fn restored_submissions_are_found_until_the_next_rotation() {
        let mut w = SeenWindow::default();
        let seen = |n: u64| SubmitSeen {
            key: u128::from(n) * 0x9e37_79b9,
            room_seq: n,
            accepted_ms: n,
        };
        for n in 1..=3 {
            w.restore(&seen(n));
        }
        assert_eq!(w.get(&seen(2).key), Some(seen(2)));
        assert_eq!(w.insert(seen(4), 4), None);
        assert_eq!(
            w.insert(seen(5), 4),
            Some(3),
            "the restored generation goes whole"
        );
        assert_eq!(w.get(&seen(3).key), None);
        assert_eq!(w.get(&seen(4).key), Some(seen(4)));
    }

    #[test]
    fn keys_depend_on_the_secret_and_the_secret_survives_a_restart() {
        let none = BTreeMap::new();
        let mut a = DedupeKey::restore(&none);
        let b = DedupeKey::restore(&none);
        let body = b"the same body";
        assert_ne!(a.of(body), b.of(body), "two nodes draw two secrets");
        assert_ne!(a.of(body), a.of(b"the same bodz"));

        let mut store = MemStore::new();
        a.save(&mut store);
        store.commit().expect("commit");
        let kept = DedupeKey::restore(&store.committed().records);
        assert!(kept.saved, "nothing to write again");
        assert_eq!(
            kept.of(body),
            a.of(body),
            "keys stored before a restart match"
        );
    }
}
