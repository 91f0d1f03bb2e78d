//! What the core persists, behind a small trait, and an in-memory implementation for tests.
//!
//! The core calls [`Store::apply`] for every change while it handles an input; the node calls
//! [`Store::commit`] once per batch of inputs (group commit) and only then releases the answers
//! the core produced. So anything acknowledged to a sender is durable, and one fsync covers
//! many messages.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};

/// One durable change. Borrowed so the core does not allocate for it; stores copy what they keep.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum StoreOp<'a> {
    /// A room this relay hosts (as hub), with the providers that follow it.
    Room {
        room: &'a RoomId,
        followers: &'a [ProviderDomain],
    },
    /// The next per-room sequence number and the last accepted timestamp of a hosted room.
    RoomSeq {
        room: &'a RoomId,
        next_seq: u64,
        last_ms: u64,
    },
    /// An event waiting for delivery to `dest`, under its per-(room, destination) sequence.
    Enqueue {
        room: &'a RoomId,
        dest: &'a ProviderDomain,
        qseq: u64,
        fanout: &'a Bytes,
    },
    /// `dest` acknowledged everything of `room` up to and including `upto`.
    Ack {
        room: &'a RoomId,
        dest: &'a ProviderDomain,
        upto: u64,
    },
    /// A follower's next expected sequence number from `hub` for `room`.
    Cursor {
        hub: &'a ProviderDomain,
        room: &'a RoomId,
        next: u64,
    },
    /// A hash of a FanoutMessage a follower delivered from `hub` for `room`, so the same bytes
    /// are known for a duplicate after a restart. The follower keeps a window of them as a ring:
    /// `slot` replaces what the same slot held before, and `n` numbers the hashes in the order
    /// they were remembered.
    RecentHash {
        hub: &'a ProviderDomain,
        room: &'a RoomId,
        slot: u16,
        n: u64,
        hash: u128,
    },
    /// A delivered event, under its local inbox offset.
    Inbox {
        offset: u64,
        record: &'a InboxRecord,
    },
    /// The local reader consumed the inbox up to and including `upto`.
    InboxTrim { upto: u64 },
    /// The hub accepted a submission; remembered so a retried submission is answered, not
    /// fanned out again.
    SubmitSeen {
        room: &'a RoomId,
        seen: &'a SubmitSeen,
    },
    /// The oldest remembered submissions of `room` up to `upto_seq` fell out of the window.
    SubmitForget { room: &'a RoomId, upto_seq: u64 },
    /// A keyed state record (MLS room state, key material, directory, consent, abuse
    /// reports); `None` deletes it. The core names the keys (see `record_key`).
    Record {
        key: &'a [u8],
        value: Option<&'a [u8]>,
    },
}

/// A delivered event as the local clients read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRecord {
    pub room: RoomId,
    /// The provider the event came from (the hub, or this relay for its own hosted rooms).
    pub from: ProviderDomain,
    /// The hub's acceptance timestamp (ms since the UNIX epoch).
    pub accepted_ms: u64,
    /// The exact FanoutMessage bytes.
    pub fanout: Bytes,
}

/// A remembered accepted submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitSeen {
    /// 128-bit hash of the submitting provider and the exact body bytes.
    pub key: u128,
    pub room_seq: u64,
    pub accepted_ms: u64,
}

/// Everything the core needs to resume after a restart.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub rooms: BTreeMap<RoomId, RoomSnapshot>,
    /// Unacknowledged events per (room, destination), in sequence order.
    pub queues: BTreeMap<(RoomId, ProviderDomain), VecDeque<(u64, Bytes)>>,
    /// Highest acknowledged sequence per (room, destination), so numbering continues.
    pub acked: BTreeMap<(RoomId, ProviderDomain), u64>,
    pub cursors: BTreeMap<(ProviderDomain, RoomId), u64>,
    /// Each follower cursor's window of recent FanoutMessage hashes ([`StoreOp::RecentHash`]):
    /// by slot, `(n, hash)`.
    pub recent: BTreeMap<(ProviderDomain, RoomId), BTreeMap<u16, (u64, u128)>>,
    /// The inbox records not trimmed yet, summarised: the records themselves stay in the
    /// store and are read with [`Store::read_inbox`], so a start loads none of their bodies.
    pub inbox: InboxSummary,
    /// Highest trimmed inbox offset, so numbering continues.
    pub inbox_trimmed: u64,
    /// Keyed state records ([`StoreOp::Record`]).
    pub records: BTreeMap<Vec<u8>, Bytes>,
}

/// What the store holds of the inbox, without the records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InboxSummary {
    /// The highest offset of a record not trimmed yet; 0 when there is none.
    pub last: u64,
    /// Records not trimmed yet, by the provider they came from ([`InboxRecord::from`]).
    pub by_from: BTreeMap<ProviderDomain, u64>,
}

impl InboxSummary {
    /// Records not trimmed yet.
    pub fn len(&self) -> u64 {
        self.by_from.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_from.is_empty()
    }

    fn count(&mut self, from: &ProviderDomain, add: bool) {
        if add {
            *self.by_from.entry(from.clone()).or_default() += 1;
        } else if let Some(n) = self.by_from.get_mut(from) {
            *n -= 1;
            if *n == 0 {
                self.by_from.remove(from);
            }
        }
    }
}

/// Limits of one inbox read ([`Store::read_inbox`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxRange {
    /// Records with an offset above this...
    pub after: u64,
    /// ...and at most this.
    pub upto: u64,
    /// At most this many records...
    pub max: usize,
    /// ...and none after the one whose fanout bytes bring the total to this (the first
    /// record is always taken, however large).
    pub max_bytes: usize,
}

impl InboxRange {
    /// Everything after `after`.
    pub fn after(after: u64) -> InboxRange {
        InboxRange {
            after,
            upto: u64::MAX,
            max: usize::MAX,
            max_bytes: usize::MAX,
        }
    }

    /// Whether `records` reached the count or byte limit (so more may follow).
    pub fn filled(&self, records: usize, bytes: usize) -> bool {
        records >= self.max || (records > 0 && bytes >= self.max_bytes)
    }
}

#[derive(Debug, Default, Clone)]
pub struct RoomSnapshot {
    pub followers: Vec<ProviderDomain>,
    pub next_seq: u64,
    pub last_ms: u64,
    /// Remembered submissions, oldest first.
    pub seen: VecDeque<SubmitSeen>,
}

/// A storage failure. Nothing in a batch whose commit failed is acknowledged. The node stops
/// on one, unless it says the storage is full ([`StoreError::is_storage_full`]): then it
/// refuses new work and writes the same batch again once there is space.
#[derive(Debug, thiserror::Error)]
#[error("store {op} failed")]
pub struct StoreError {
    pub op: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
    full: bool,
}

impl StoreError {
    pub fn new(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            op,
            source: source.into(),
            full: false,
        }
    }

    /// The storage has no space left (a full disk, a quota): nothing was written, and the
    /// same write may succeed once space is freed.
    pub fn storage_full(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            full: true,
            ..StoreError::new(op, source)
        }
    }

    pub fn is_storage_full(&self) -> bool {
        self.full
    }
}

/// The write of a sealed batch of changes; it may run on another thread. After an error that
/// says the storage is full it may be called again, and writes the same batch.
pub type SealedCommit = Box<dyn FnMut() -> Result<(), StoreError> + Send>;

/// Durable state behind the core.
pub trait Store {
    /// Reads everything back after a restart (the inbox only summarised: see
    /// [`Store::read_inbox`]).
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Committed inbox records within `range`, oldest first. The core reads here what it
    /// does not keep in memory; it asks only for records it knows are committed.
    fn read_inbox(&self, range: InboxRange) -> Result<Vec<(u64, InboxRecord)>, StoreError>;
    /// How many committed inbox records with `after < offset <= upto` came from each provider
    /// ([`InboxRecord::from`]).
    fn count_inbox(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<BTreeMap<ProviderDomain, u64>, StoreError>;
    /// Records one change; durable only after the next successful [`Store::commit`].
    fn apply(&mut self, op: StoreOp<'_>);
    /// Makes every change applied so far durable, atomically. On an error nothing is written,
    /// and the changes stay applied for the next commit.
    fn commit(&mut self) -> Result<(), StoreError>;
    /// Takes every change applied so far as one batch whose write the caller runs, possibly on
    /// another thread while the core goes on (pipelined group commit). Batches must be written
    /// in the order they were sealed, one at a time. `None`: everything applied is durable
    /// already. The default commits here and now.
    fn seal(&mut self) -> Result<Option<SealedCommit>, StoreError> {
        self.commit().map(|()| None)
    }
}

/// What [`MemStore`] holds: the reference durable stores are checked against.
#[derive(Debug, Default, Clone)]
struct MemState {
    snapshot: Snapshot,
    inbox: BTreeMap<u64, InboxRecord>,
}

impl MemState {
    fn apply(&mut self, op: StoreOp<'_>) {
        let snap = &mut self.snapshot;
        match op {
            StoreOp::Inbox { offset, record } => {
                if let Some(old) = self.inbox.insert(offset, record.clone()) {
                    snap.inbox.count(&old.from, false);
                }
                snap.inbox.count(&record.from, true);
                snap.inbox.last = self.inbox.last_key_value().map_or(0, |(o, _)| *o);
            }
            StoreOp::InboxTrim { upto } => {
                let kept = match upto.checked_add(1) {
                    Some(from) => self.inbox.split_off(&from),
                    None => BTreeMap::new(),
                };
                for record in std::mem::replace(&mut self.inbox, kept).values() {
                    snap.inbox.count(&record.from, false);
                }
                snap.inbox.last = self.inbox.last_key_value().map_or(0, |(o, _)| *o);
                snap.inbox_trimmed = snap.inbox_trimmed.max(upto);
            }
            op => snap.apply(op),
        }
    }
}

impl MemState {
    /// [`MemState::apply`] for an op this store buffered: the per-message ops take their keys
    /// from it instead of cloning them, and look up before they insert (a clone and a drop
    /// of a shared name are two atomic operations; the maps are searched once).
    fn apply_owned(&mut self, op: OwnedOp) {
        let snap = &mut self.snapshot;
        match op {
            OwnedOp::RoomSeq {
                room,
                next_seq,
                last_ms,
            } => {
                let r = match snap.rooms.get_mut(&room) {
                    Some(r) => r,
                    None => snap.rooms.entry(room).or_default(),
                };
                r.next_seq = next_seq;
                r.last_ms = last_ms;
            }
            OwnedOp::SubmitSeen { room, seen } => {
                let r = match snap.rooms.get_mut(&room) {
                    Some(r) => r,
                    None => snap.rooms.entry(room).or_default(),
                };
                r.seen.push_back(seen);
            }
            OwnedOp::Enqueue {
                room,
                dest,
                qseq,
                fanout,
            } => {
                let q = snap.queues.entry((room, dest)).or_default();
                while q.back().is_some_and(|(s, _)| *s >= qseq) {
                    q.pop_back();
                }
                q.push_back((qseq, fanout));
            }
            OwnedOp::Ack { room, dest, upto } => {
                let key = (room, dest);
                if let Some(q) = snap.queues.get_mut(&key) {
                    while q.front().is_some_and(|(s, _)| *s <= upto) {
                        q.pop_front();
                    }
                }
                let acked = match snap.acked.get_mut(&key) {
                    Some(a) => a,
                    None => snap.acked.entry(key).or_default(),
                };
                *acked = (*acked).max(upto);
            }
            OwnedOp::Inbox { offset, record } => {
                if let Some(n) = snap.inbox.by_from.get_mut(&record.from) {
                    *n += 1;
                } else {
                    snap.inbox.count(&record.from, true);
                }
                if let Some(old) = self.inbox.insert(offset, record) {
                    snap.inbox.count(&old.from, false);
                }
                snap.inbox.last = self.inbox.last_key_value().map_or(0, |(o, _)| *o);
            }
            op => self.apply(op.as_op()),
        }
    }
}

impl Snapshot {
    /// Applies every op but the inbox's ([`MemState`] keeps the records).
    fn apply(&mut self, op: StoreOp<'_>) {
        match op {
            StoreOp::Room { room, followers } => {
                self.rooms.entry(room.clone()).or_default().followers = followers.to_vec();
            }
            StoreOp::RoomSeq {
                room,
                next_seq,
                last_ms,
            } => {
                let r = self.rooms.entry(room.clone()).or_default();
                r.next_seq = next_seq;
                r.last_ms = last_ms;
            }
            StoreOp::Enqueue {
                room,
                dest,
                qseq,
                fanout,
            } => {
                let key = (room.clone(), dest.clone());
                let q = self.queues.entry(key).or_default();
                // A number written again (a renumbered queue) replaces what it held, as in a
                // keyed store.
                while q.back().is_some_and(|(s, _)| *s >= qseq) {
                    q.pop_back();
                }
                q.push_back((qseq, fanout.clone()));
            }
            StoreOp::Ack { room, dest, upto } => {
                let key = (room.clone(), dest.clone());
                if let Some(q) = self.queues.get_mut(&key) {
                    while q.front().is_some_and(|(s, _)| *s <= upto) {
                        q.pop_front();
                    }
                }
                let acked = self.acked.entry(key).or_default();
                *acked = (*acked).max(upto);
            }
            StoreOp::Cursor { hub, room, next } => {
                self.cursors.insert((hub.clone(), room.clone()), next);
            }
            StoreOp::RecentHash {
                hub,
                room,
                slot,
                n,
                hash,
            } => {
                self.recent
                    .entry((hub.clone(), room.clone()))
                    .or_default()
                    .insert(slot, (n, hash));
            }
            StoreOp::Inbox { .. } | StoreOp::InboxTrim { .. } => {}
            StoreOp::SubmitSeen { room, seen } => {
                self.rooms
                    .entry(room.clone())
                    .or_default()
                    .seen
                    .push_back(*seen);
            }
            StoreOp::SubmitForget { room, upto_seq } => {
                if let Some(r) = self.rooms.get_mut(room) {
                    while r.seen.front().is_some_and(|s| s.room_seq <= upto_seq) {
                        r.seen.pop_front();
                    }
                }
            }
            StoreOp::Record { key, value } => match value {
                Some(v) => {
                    self.records.insert(key.to_vec(), Bytes::copy_from_slice(v));
                }
                None => {
                    self.records.remove(key);
                }
            },
        }
    }
}

/// A store that keeps everything in memory: for tests and the in-memory benchmark.
/// `commit` moves pending ops into the committed snapshot, so a simulated crash
/// (dropping uncommitted ops) behaves like a real one.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    committed: MemState,
    pending: Vec<OwnedOp>,
    /// When false, ops are dropped instead of kept: a store for benchmarks of the routing alone.
    discard: bool,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that remembers nothing; for measuring the routing core alone.
    pub fn discarding() -> Self {
        MemStore {
            discard: true,
            ..Self::default()
        }
    }

    /// Forgets everything not yet committed, as a crash would.
    pub fn crash(&mut self) {
        self.pending.clear();
    }

    pub fn committed(&self) -> &Snapshot {
        &self.committed.snapshot
    }

    /// The committed inbox records.
    pub fn committed_inbox(&self) -> &BTreeMap<u64, InboxRecord> {
        &self.committed.inbox
    }
}

impl Store for MemStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(self.committed.snapshot.clone())
    }

    fn read_inbox(&self, range: InboxRange) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let Some(from) = range.after.checked_add(1) else {
            return Ok(out);
        };
        if from > range.upto {
            return Ok(out);
        }
        for (offset, record) in self.committed.inbox.range(from..=range.upto) {
            if range.filled(out.len(), bytes) {
                break;
            }
            bytes = bytes.saturating_add(record.fanout.len());
            out.push((*offset, record.clone()));
        }
        Ok(out)
    }

    fn count_inbox(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<BTreeMap<ProviderDomain, u64>, StoreError> {
        let mut out = BTreeMap::new();
        if let Some(from) = after.checked_add(1)
            && from <= upto
        {
            for record in self.committed.inbox.range(from..=upto).map(|(_, r)| r) {
                *out.entry(record.from.clone()).or_default() += 1;
            }
        }
        Ok(out)
    }

    fn apply(&mut self, op: StoreOp<'_>) {
        if !self.discard {
            self.pending.push(OwnedOp::from(op));
        }
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        for op in self.pending.drain(..) {
            self.committed.apply_owned(op);
        }
        Ok(())
    }
}

/// An owned copy of a [`StoreOp`], for stores that buffer ops until commit.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum OwnedOp {
    Room {
        room: RoomId,
        followers: Vec<ProviderDomain>,
    },
    RoomSeq {
        room: RoomId,
        next_seq: u64,
        last_ms: u64,
    },
    Enqueue {
        room: RoomId,
        dest: ProviderDomain,
        qseq: u64,
        fanout: Bytes,
    },
    Ack {
        room: RoomId,
        dest: ProviderDomain,
        upto: u64,
    },
    Cursor {
        hub: ProviderDomain,
        room: RoomId,
        next: u64,
    },
    RecentHash {
        hub: ProviderDomain,
        room: RoomId,
        slot: u16,
        n: u64,
        hash: u128,
    },
    Inbox {
        offset: u64,
        record: InboxRecord,
    },
    InboxTrim {
        upto: u64,
    },
    SubmitSeen {
        room: RoomId,
        seen: SubmitSeen,
    },
    SubmitForget {
        room: RoomId,
        upto_seq: u64,
    },
    Record {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
}

impl From<StoreOp<'_>> for OwnedOp {
    fn from(op: StoreOp<'_>) -> Self {
        match op {
            StoreOp::Room { room, followers } => OwnedOp::Room {
                room: room.clone(),
                followers: followers.to_vec(),
            },
            StoreOp::RoomSeq {
                room,
                next_seq,
                last_ms,
            } => OwnedOp::RoomSeq {
                room: room.clone(),
                next_seq,
                last_ms,
            },
            StoreOp::Enqueue {
                room,
                dest,
                qseq,
                fanout,
            } => OwnedOp::Enqueue {
                room: room.clone(),
                dest: dest.clone(),
                qseq,
                fanout: fanout.clone(),
            },
            StoreOp::Ack { room, dest, upto } => OwnedOp::Ack {
                room: room.clone(),
                dest: dest.clone(),
                upto,
            },
            StoreOp::Cursor { hub, room, next } => OwnedOp::Cursor {
                hub: hub.clone(),
                room: room.clone(),
                next,
            },
            StoreOp::RecentHash {
                hub,
                room,
                slot,
                n,
                hash,
            } => OwnedOp::RecentHash {
                hub: hub.clone(),
                room: room.clone(),
                slot,
                n,
                hash,
            },
            StoreOp::Inbox { offset, record } => OwnedOp::Inbox {
                offset,
                record: record.clone(),
            },
            StoreOp::InboxTrim { upto } => OwnedOp::InboxTrim { upto },
            StoreOp::SubmitSeen { room, seen } => OwnedOp::SubmitSeen {
                room: room.clone(),
                seen: *seen,
            },
            StoreOp::SubmitForget { room, upto_seq } => OwnedOp::SubmitForget {
                room: room.clone(),
                upto_seq,
            },
            StoreOp::Record { key, value } => OwnedOp::Record {
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            },
        }
    }
}

impl OwnedOp {
    pub fn as_op(&self) -> StoreOp<'_> {
        match self {
            OwnedOp::Room { room, followers } => StoreOp::Room { room, followers },
            OwnedOp::RoomSeq {
                room,
                next_seq,
                last_ms,
            } => StoreOp::RoomSeq {
                room,
                next_seq: *next_seq,
                last_ms: *last_ms,
            },
            OwnedOp::Enqueue {
                room,
                dest,
                qseq,
                fanout,
            } => StoreOp::Enqueue {
                room,
                dest,
                qseq: *qseq,
                fanout,
            },
            OwnedOp::Ack { room, dest, upto } => StoreOp::Ack {
                room,
                dest,
                upto: *upto,
            },
            OwnedOp::Cursor { hub, room, next } => StoreOp::Cursor {
                hub,
                room,
                next: *next,
            },
            OwnedOp::RecentHash {
                hub,
                room,
                slot,
                n,
                hash,
            } => StoreOp::RecentHash {
                hub,
                room,
                slot: *slot,
                n: *n,
                hash: *hash,
            },
            OwnedOp::Inbox { offset, record } => StoreOp::Inbox {
                offset: *offset,
                record,
            },
            OwnedOp::InboxTrim { upto } => StoreOp::InboxTrim { upto: *upto },
            OwnedOp::SubmitSeen { room, seen } => StoreOp::SubmitSeen { room, seen },
            OwnedOp::SubmitForget { room, upto_seq } => StoreOp::SubmitForget {
                room,
                upto_seq: *upto_seq,
            },
            OwnedOp::Record { key, value } => StoreOp::Record {
                key,
                value: value.as_deref(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffered ops' own path ([`MemState::apply_owned`]) leaves the state the borrowed
    /// path leaves, op by op: replaced queue numbers and inbox offsets, acks, windows.
    #[test]
    fn owned_ops_apply_as_borrowed_ones() {
        let room = |n: u64| -> RoomId {
            format!("mimi://a.example/r/{}", n % 3)
                .parse()
                .expect("room")
        };
        let dest = |n: u64| -> ProviderDomain {
            ["b.example", "c.example"][(n % 2) as usize]
                .parse()
                .expect("domain")
        };
        let mut ops = Vec::new();
        for n in 0..400u64 {
            let fanout = Bytes::from(n.to_be_bytes().to_vec());
            ops.push(match n % 9 {
                0 => OwnedOp::Room {
                    room: room(n),
                    followers: vec![dest(n)],
                },
                1 => OwnedOp::RoomSeq {
                    room: room(n),
                    next_seq: n,
                    last_ms: n * 2,
                },
                2 => OwnedOp::SubmitSeen {
                    room: room(n),
                    seen: SubmitSeen {
                        key: u128::from(n),
                        room_seq: n,
                        accepted_ms: n,
                    },
                },
                // Numbers that go back now and then: a renumbered queue replaces its tail.
                3 | 4 => OwnedOp::Enqueue {
                    room: room(n),
                    dest: dest(n / 2),
                    qseq: (n / 3).saturating_sub(n % 4),
                    fanout,
                },
                5 => OwnedOp::Ack {
                    room: room(n),
                    dest: dest(n),
                    upto: n / 5,
                },
                // Offsets written twice, from another provider the second time.
                6 | 7 => OwnedOp::Inbox {
                    offset: n / 4,
                    record: InboxRecord {
                        room: room(n),
                        from: dest(n / 3),
                        accepted_ms: n,
                        fanout,
                    },
                },
                _ if n % 4 == 0 => OwnedOp::InboxTrim { upto: n / 6 },
                _ => OwnedOp::Cursor {
                    hub: dest(n),
                    room: room(n),
                    next: n,
                },
            });
        }
        let (mut borrowed, mut owned) = (MemState::default(), MemState::default());
        for (i, op) in ops.into_iter().enumerate() {
            borrowed.apply(op.as_op());
            owned.apply_owned(op);
            assert_eq!(borrowed.inbox, owned.inbox, "after op {i}");
            assert_eq!(
                format!("{:?}", borrowed.snapshot),
                format!("{:?}", owned.snapshot),
                "after op {i}"
            );
        }
        assert!(!owned.snapshot.queues.is_empty() && !owned.inbox.is_empty());
    }
}
