//! Counters the core keeps for the node's metrics endpoint. Plain numbers: no metrics crate here.

use std::collections::BTreeMap;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;

use crate::transport::TransportKind;

/// Why a request or submission was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum RejectReason {
    Malformed,
    TooLarge,
    UnknownRoom,
    Forbidden,
    NotAllowed,
    QueueFull,
    OutOfOrder,
    NotImplemented,
    NoRoute,
    /// The peer is over one of its own budgets (stored abuse reports, consent records).
    PeerBudget,
    /// The sender's share of the local inbox is full.
    InboxShare,
    /// The store is out of space: nothing new is taken until it has some again.
    StorageFull,
    /// The peer is over its request rate (key material claims, identifier queries).
    RateLimited,
    /// An abuse report whose frank is not one this hub made (protocol-06 §5.4.1, §5.9).
    BadFrank,
}

impl RejectReason {
    pub const ALL: [RejectReason; 14] = [
        RejectReason::Malformed,
        RejectReason::TooLarge,
        RejectReason::UnknownRoom,
        RejectReason::Forbidden,
        RejectReason::NotAllowed,
        RejectReason::QueueFull,
        RejectReason::OutOfOrder,
        RejectReason::NotImplemented,
        RejectReason::NoRoute,
        RejectReason::PeerBudget,
        RejectReason::InboxShare,
        RejectReason::StorageFull,
        RejectReason::RateLimited,
        RejectReason::BadFrank,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::TooLarge => "too_large",
            RejectReason::UnknownRoom => "unknown_room",
            RejectReason::Forbidden => "forbidden",
            RejectReason::NotAllowed => "not_allowed",
            RejectReason::QueueFull => "queue_full",
            RejectReason::OutOfOrder => "out_of_order",
            RejectReason::NotImplemented => "not_implemented",
            RejectReason::NoRoute => "no_route",
            RejectReason::PeerBudget => "peer_budget",
            RejectReason::InboxShare => "inbox_share",
            RejectReason::StorageFull => "storage_full",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::BadFrank => "bad_frank",
        }
    }
}

/// Why a peer's refusal of an event was final (the `status` label of the dead-letter metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DeadCause {
    /// The peer answered with this HTTP status code (a 4xx, or 501).
    Status(u16),
    /// The peer serves no URL for the endpoint (not in its directory).
    Unsupported,
}

impl DeadCause {
    /// The code as decimal, or `unsupported`.
    pub fn label(self) -> String {
        match self {
            DeadCause::Status(code) => code.to_string(),
            DeadCause::Unsupported => "unsupported".to_owned(),
        }
    }
}

/// Per-peer counters.
#[derive(Clone, Debug, Default)]
pub struct PeerStats {
    pub transport: Option<TransportKind>,
    pub up: bool,
    /// Requests received from this peer.
    pub requests_in: u64,
    /// Events received from this peer and delivered.
    pub msgs_in: u64,
    /// Events acknowledged by this peer.
    pub msgs_out: u64,
    pub bytes_out: u64,
    pub transmits: u64,
    pub failures: u64,
    /// Events waiting for this peer, over all rooms.
    pub queue_depth: u64,
    /// Events this peer refused for good, moved to dead-letter records, by cause.
    pub dead_letters: BTreeMap<DeadCause, u64>,
    /// Dead-letter records of this peer overwritten by newer ones (the store keeps a bounded
    /// number per peer).
    pub dead_letters_dropped: u64,
    /// Whether this peer answers `/notify` without our sequence extension, so its queues run by
    /// the draft's rules alone (one event per `/notify`, one in flight per room).
    pub draft_mode: bool,
    /// Whether this peer answers `/notify` with `MIMI-Next-Seq`; `None` until it has answered
    /// one (its queues then run by the draft's rules too, to be safe).
    pub seq_extension: Option<bool>,
}

/// A latency histogram with fixed bucket bounds, in the shape Prometheus expects.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// Cumulative-ready counts per upper bound (the last bucket is +Inf).
    pub counts: [u64; Histogram::BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; Histogram::BOUNDS_US.len() + 1],
            sum_us: 0,
            count: 0,
        }
    }
}

impl Histogram {
    /// Upper bounds in microseconds, roughly x2.5 apart from 100 us to 10 s.
    pub const BOUNDS_US: [u64; 16] = [
        100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000,
    ];

    pub fn record(&mut self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `n` samples of `d` at once.
    pub fn record_n(&mut self, d: Duration, n: u64) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = Self::BOUNDS_US.partition_point(|b| *b < us);
        self.counts[i] += n;
        self.sum_us = self.sum_us.saturating_add(us.saturating_mul(n));
        self.count += n;
    }
}

/// A snapshot of the core's counters.
#[derive(Clone, Debug, Default)]
pub struct RelayStats {
    /// Submissions the hub accepted (each fanned out once).
    pub accepted: u64,
    /// Events delivered to this provider's inbox.
    pub delivered: u64,
    /// Duplicates answered as success and not delivered again.
    pub dedupe_hits: u64,
    /// Events sent again after a failure or a gap.
    pub retries: u64,
    pub probes: u64,
    pub rejects: [u64; RejectReason::ALL.len()],
    pub peers: BTreeMap<ProviderDomain, PeerStats>,
    /// Delivered events not trimmed yet, in memory or in the store only.
    pub inbox_depth: u64,
    /// Bytes the inbox records kept in memory take (bounded by `max_inbox_memory`).
    pub inbox_resident_bytes: u64,
    /// Hub: times a follower's queue reached `max_queue` and its backlog was dropped.
    pub lagging: u64,
    /// Hub: events dropped from lagging followers' queues (they get a gap marker instead).
    pub lag_dropped: u64,
    /// Hub: queues renumbered because a follower was ahead of them (this hub lost or restored
    /// its store) or behind what we kept (the follower lost its store).
    pub resyncs: u64,
    /// Follower: `/notify` batches numbered by a hub incarnation our cursor does not follow
    /// (answered with our cursor, so the hub renumbers).
    pub lineage_mismatches: u64,
    /// Follower: gaps a hub told us of (events it could not deliver), and the events in them.
    pub gaps: u64,
    pub gap_events: u64,
    /// Follower: events whose sequence number we had seen with other bytes (a hub that reused
    /// numbers after a restore), delivered by their content.
    pub reused_seq: u64,
    /// Calls into the MLS validator that panicked (refused, the node went on).
    pub mls_panics: u64,
    /// Hub: handshakes and submissions the room policy refused (also counted as
    /// `not_allowed` rejects).
    pub policy_rejections: u64,
    /// Target provider: /keyMaterial claims answered with at least one KeyPackage.
    pub key_claims: u64,
    /// Target provider: /keyMaterial claims refused for want of the target's consent
    /// (noConsent, noConsentForThisRoom).
    pub consent_denials: u64,
    /// Hub: application messages franked (protocol-06 §5.4.1.2).
    pub franks_issued: u64,
    /// Hub: abuse reports whose franks it verified as its own (§5.9).
    pub franks_verified: u64,
    /// Hub: abuse reports refused because a frank was not its own.
    pub franks_refused: u64,
    /// Time from the hub's acceptance to the follower's acknowledgement.
    pub latency: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_n_at_once_is_recording_n_times() {
        let (mut one, mut many) = (Histogram::default(), Histogram::default());
        for (us, n) in [(50u64, 3u64), (100, 1), (101, 7), (20_000_000, 2)] {
            let d = Duration::from_micros(us);
            for _ in 0..n {
                one.record(d);
            }
            many.record_n(d, n);
        }
        assert_eq!(one.counts, many.counts);
        assert_eq!((one.sum_us, one.count), (many.sum_us, many.count));
        assert_eq!(many.count, 13);
    }
}
