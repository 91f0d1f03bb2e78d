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

use super::FastMap;
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

/// Accepted submissions a room remembers, in two generations of one table: new ones are
/// counted into the current generation; when it holds half the window, every entry of the
/// previous one is dropped in one sequential sweep and the current one becomes the previous.
/// So the room remembers at least the last `window / 2` and at most `window` submissions, no
/// submission pays for a random removal, and a new submission costs one probe, not one per
/// generation.
#[derive(Debug, Default)]
pub(super) struct SeenWindow {
    table: FastMap<u128, Seen>,
    /// Submissions in the current generation.
    current_len: usize,
    /// The highest room sequence of the previous generation, if there is one.
    previous_upto: Option<u64>,
}

/// A [`SubmitSeen`] without its key, which the table holds already: a third smaller a slot,
/// for tables of tens of thousands that every submission probes.
#[derive(Debug, Clone, Copy)]
struct Seen {
    room_seq: u64,
    accepted_ms: u64,
}

impl Seen {
    fn of(s: &SubmitSeen) -> Seen {
        Seen {
            room_seq: s.room_seq,
            accepted_ms: s.accepted_ms,
        }
    }
}

impl SeenWindow {
    pub(super) fn get(&self, key: &u128) -> Option<SubmitSeen> {
        let s = self.table.get(key)?;
        Some(SubmitSeen {
            key: *key,
            room_seq: s.room_seq,
            accepted_ms: s.accepted_ms,
        })
    }

    /// Puts back what the store kept (at most one window, oldest first) as the previous
    /// generation: the next rotation forgets it all.
    pub(super) fn restore(&mut self, seen: &SubmitSeen) {
        self.table.insert(seen.key, Seen::of(seen));
        self.previous_upto = Some(seen.room_seq);
    }

    /// Remembers `seen`; returns the sequence up to which submissions were forgotten, if any.
    pub(super) fn insert(&mut self, seen: SubmitSeen, window: usize) -> Option<u64> {
        self.table.insert(seen.key, Seen::of(&seen));
        self.current_len += 1;
        if self.current_len < (window / 2).max(1) {
            return None;
        }
        let forgotten = self.previous_upto;
        if let Some(upto) = forgotten {
            // Sequences grow: the previous generation is everything up to its last.
            self.table.retain(|_, s| s.room_seq > upto);
        }
        self.previous_upto = Some(seen.room_seq);
        self.current_len = 0;
        forgotten
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
