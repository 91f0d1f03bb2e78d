//! The local inbox: delivered events waiting for this provider's clients.
//!
//! Every record goes to the store. Memory keeps only the newest records, up to
//! `max_inbox_memory` bytes: a reader that keeps up reads from memory, one that fell behind
//! reads the older records back from the store. Only records the node said are durable
//! ([`Relay::handle_inbox_durable`]) leave memory, so whatever the core does not hold, the
//! store has committed.

use std::collections::VecDeque;

use mimi_wire::uri::ProviderDomain;

use super::refusal::Refusal;
use super::{FastMap, Relay};
use crate::store::{InboxRange, InboxRecord, Snapshot, Store, StoreError, StoreOp};
use crate::transport::Response;

/// Memory a resident record costs beside its fanout bytes and ids (offset, handles, the
/// deque slot), for the byte bound.
const RECORD_OVERHEAD: usize = 96;

/// A read of the inbox by local clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxQuery {
    /// Records with an offset above this.
    pub after: u64,
    /// At most this many records.
    pub max: usize,
    /// No more records after the one that brings their fanout bytes to this (the first
    /// is always taken).
    pub max_bytes: usize,
    /// Only records the node said are durable ([`Relay::handle_inbox_durable`]), so the
    /// answer can go out before the next commit.
    pub durable_only: bool,
}

impl InboxQuery {
    /// Every record after `after`, durable or not.
    pub fn after(after: u64) -> InboxQuery {
        InboxQuery {
            after,
            max: usize::MAX,
            max_bytes: usize::MAX,
            durable_only: false,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Inbox {
    /// The newest records, oldest first: every record above `spilled_upto`.
    resident: VecDeque<(u64, InboxRecord)>,
    resident_bytes: usize,
    /// Records with `trimmed < offset <= spilled_upto` are in the store only.
    spilled_upto: u64,
    /// The reader consumed every record up to this.
    trimmed: u64,
    /// Records not trimmed yet, in memory or not, by the provider they came from (peers
    /// authenticated by their certificates, so a few keys: no SipHash on every delivery).
    by_from: FastMap<ProviderDomain, u64>,
    len: u64,
    /// The offset of the next record.
    pub(super) next: u64,
    /// Records below this offset are durable: they may leave memory.
    durable_below: u64,
}

fn cost(r: &InboxRecord) -> usize {
    r.fanout.len() + r.room.as_str().len() + r.from.as_str().len() + RECORD_OVERHEAD
}

impl Inbox {
    /// The inbox the store kept: all of it in the store only, nothing in memory.
    pub(super) fn restore(snapshot: &Snapshot, unix_ms: u64) -> Inbox {
        let s = &snapshot.inbox;
        // Offsets go on from the wall clock (ms x 1024) at every start, so a local reader
        // that kept its position is never past the new offsets, even when the store was lost
        // or restored from a backup (unless more than 1024 events a millisecond were
        // delivered).
        let next = (snapshot.inbox_trimmed + 1)
            .max(s.last + 1)
            .max(unix_ms << 10);
        Inbox {
            resident: VecDeque::new(),
            resident_bytes: 0,
            spilled_upto: s.last,
            trimmed: snapshot.inbox_trimmed,
            by_from: s.by_from.iter().map(|(d, n)| (d.clone(), *n)).collect(),
            len: s.len(),
            next,
            durable_below: next,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// Records not trimmed yet that came from `from`.
    pub(super) fn count(&self, from: &ProviderDomain) -> u64 {
        self.by_from.get(from).copied().unwrap_or(0)
    }

    fn uncount(&mut self, from: &ProviderDomain, n: u64) {
        if let Some(c) = self.by_from.get_mut(from) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.by_from.remove(from);
            }
        }
        self.len = self.len.saturating_sub(n);
    }

    /// Drops the bodies of the oldest durable records while memory is over `max_bytes`.
    fn evict(&mut self, max_bytes: usize) {
        while self.resident_bytes > max_bytes
            && self
                .resident
                .front()
                .is_some_and(|(o, _)| *o < self.durable_below)
        {
            if let Some((offset, r)) = self.resident.pop_front() {
                self.resident_bytes -= cost(&r);
                self.spilled_upto = offset;
            }
        }
    }
}

impl Relay {
    pub(super) fn deliver_local<S: Store>(&mut self, store: &mut S, record: InboxRecord) {
        let ib = &mut self.inbox;
        let offset = ib.next;
        ib.next += 1;
        store.apply(StoreOp::Inbox {
            offset,
            record: &record,
        });
        match ib.by_from.get_mut(&record.from) {
            Some(n) => *n += 1,
            None => {
                ib.by_from.insert(record.from.clone(), 1);
            }
        }
        ib.len += 1;
        ib.resident_bytes += cost(&record);
        ib.resident.push_back((offset, record));
        ib.evict(self.cfg.max_inbox_memory);
        self.stats.delivered += 1;
    }

    /// The refusal of an event for the inbox from a provider (a hub, or this relay for the
    /// rooms it hosts) that has `from_count` records waiting, when the inbox or that
    /// provider's share of it is full: the sender keeps the event and retries, so this is
    /// backpressure, not loss.
    pub(super) fn inbox_refusal(&mut self, from_count: u64) -> Option<Response> {
        if self.inbox.len() >= self.cfg.max_inbox as u64 {
            return Some(self.refuse(Refusal::InboxFull));
        }
        if from_count >= self.cfg.max_inbox_per_peer as u64 {
            return Some(self.refuse(Refusal::InboxShareFull));
        }
        None
    }

    /// Records below offset `below` are durable (the node committed the batch that holds
    /// them): their bodies may now leave memory, to be read back from the store.
    pub fn handle_inbox_durable(&mut self, below: u64) {
        let ib = &mut self.inbox;
        ib.durable_below = ib.durable_below.max(below);
        ib.evict(self.cfg.max_inbox_memory);
    }

    /// The local reader consumed the inbox up to and including `upto`. Fails only when the
    /// store cannot say whose records it is trimming; nothing is trimmed then.
    pub fn handle_inbox_read<S: Store>(
        &mut self,
        store: &mut S,
        upto: u64,
    ) -> Result<(), StoreError> {
        let ib = &mut self.inbox;
        // Never past what was delivered: records to come must not be trimmed ahead.
        let upto = upto.min(ib.next - 1);
        if upto <= ib.trimmed {
            return Ok(());
        }
        let mut removed = 0u64;
        if ib.trimmed < ib.spilled_upto {
            // In the store only, and committed: ask it whose they are.
            let counts = store.count_inbox(ib.trimmed, upto.min(ib.spilled_upto))?;
            for (from, n) in counts {
                ib.uncount(&from, n);
                removed += n;
            }
        }
        // Uncounted a run of records from one provider at a time: one lookup per run, not
        // one per record.
        let mut run: Option<(ProviderDomain, u64)> = None;
        while ib.resident.front().is_some_and(|(o, _)| *o <= upto) {
            if let Some((_, r)) = ib.resident.pop_front() {
                ib.resident_bytes -= cost(&r);
                removed += 1;
                match &mut run {
                    Some((from, n)) if *from == r.from => *n += 1,
                    _ => {
                        if let Some((from, n)) = run.replace((r.from, 1)) {
                            ib.uncount(&from, n);
                        }
                    }
                }
            }
        }
        if let Some((from, n)) = run {
            ib.uncount(&from, n);
        }
        if removed > 0 {
            ib.trimmed = upto;
            store.apply(StoreOp::InboxTrim { upto });
        }
        Ok(())
    }

    /// Delivered events after `q.after`, oldest first: from the store what memory no longer
    /// holds, then from memory.
    pub fn read_inbox<S: Store>(
        &self,
        store: &S,
        q: InboxQuery,
    ) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        let ib = &self.inbox;
        let mut after = q.after;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if after < ib.spilled_upto && ib.trimmed < ib.spilled_upto {
            // Records the reader trimmed may still be in the store until the trim commits.
            let range = InboxRange {
                after: after.max(ib.trimmed),
                upto: ib.spilled_upto,
                max: q.max,
                max_bytes: q.max_bytes,
            };
            out = store.read_inbox(range)?;
            bytes = out.iter().map(|(_, r)| r.fanout.len()).sum();
            if range.filled(out.len(), bytes) {
                return Ok(out);
            }
            after = ib.spilled_upto;
        }
        let range = InboxRange {
            after,
            upto: u64::MAX,
            max: q.max,
            max_bytes: q.max_bytes,
        };
        let skip = ib.resident.partition_point(|(o, _)| *o <= after);
        for (offset, r) in ib.resident.range(skip..) {
            if range.filled(out.len(), bytes) || (q.durable_only && *offset >= ib.durable_below) {
                break;
            }
            bytes = bytes.saturating_add(r.fanout.len());
            out.push((*offset, r.clone()));
        }
        Ok(out)
    }

    /// The offset the next delivered event will get.
    pub fn inbox_next(&self) -> u64 {
        self.inbox.next
    }

    /// Records below this offset are durable, as far as the node said
    /// ([`Relay::handle_inbox_durable`]): what an [`InboxQuery::durable_only`] read returns.
    pub fn inbox_durable(&self) -> u64 {
        self.inbox.durable_below
    }
}
