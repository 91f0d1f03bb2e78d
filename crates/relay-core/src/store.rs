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
    pub inbox: VecDeque<(u64, InboxRecord)>,
    /// Highest trimmed inbox offset, so numbering continues.
    pub inbox_trimmed: u64,
    /// Keyed state records ([`StoreOp::Record`]).
    pub records: BTreeMap<Vec<u8>, Bytes>,
}

#[derive(Debug, Default, Clone)]
pub struct RoomSnapshot {
    pub followers: Vec<ProviderDomain>,
    pub next_seq: u64,
    pub last_ms: u64,
    /// Remembered submissions, oldest first.
    pub seen: VecDeque<SubmitSeen>,
}

/// A storage failure. The node treats it as fatal for the batch: nothing in it is acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("store {op} failed")]
pub struct StoreError {
    pub op: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    pub fn new(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            op,
            source: source.into(),
        }
    }
}

/// The write of a sealed batch of changes; it may run on another thread.
pub type SealedCommit = Box<dyn FnOnce() -> Result<(), StoreError> + Send>;

/// Durable state behind the core.
pub trait Store {
    /// Reads everything back after a restart.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Records one change; durable only after the next successful [`Store::commit`].
    fn apply(&mut self, op: StoreOp<'_>);
    /// Makes every change applied so far durable, atomically.
    fn commit(&mut self) -> Result<(), StoreError>;
    /// Takes every change applied so far as one batch whose write the caller runs, possibly on
    /// another thread while the core goes on (pipelined group commit). Batches must be written
    /// in the order they were sealed, one at a time. `None`: everything applied is durable
    /// already. The default commits here and now.
    fn seal(&mut self) -> Result<Option<SealedCommit>, StoreError> {
        self.commit().map(|()| None)
    }
}

/// Applies ops to a [`Snapshot`]: the in-memory store, and the reference durable stores are
/// checked against.
impl Snapshot {
    pub fn apply(&mut self, op: StoreOp<'_>) {
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
                self.queues
                    .entry(key)
                    .or_default()
                    .push_back((qseq, fanout.clone()));
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
            StoreOp::Inbox { offset, record } => self.inbox.push_back((offset, record.clone())),
            StoreOp::InboxTrim { upto } => {
                while self.inbox.front().is_some_and(|(o, _)| *o <= upto) {
                    self.inbox.pop_front();
                }
                self.inbox_trimmed = self.inbox_trimmed.max(upto);
            }
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
    committed: Snapshot,
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
        &self.committed
    }
}

impl Store for MemStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(self.committed.clone())
    }

    fn apply(&mut self, op: StoreOp<'_>) {
        if !self.discard {
            self.pending.push(OwnedOp::from(op));
        }
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        for op in self.pending.drain(..) {
            self.committed.apply(op.as_op());
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
