//! The core's configuration: who we are, how peers are reached, and the delivery policy.

use std::collections::BTreeMap;
use std::time::Duration;

use mimi_wire::Limits;
use mimi_wire::uri::ProviderDomain;

use crate::transport::TransportKind;

/// Retry and liveness policy towards peers.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Delay after the first failure; doubles per consecutive failure.
    pub initial: Duration,
    /// Cap of the exponential backoff.
    pub max: Duration,
    /// Share of each delay that is randomised (0.0..=1.0), so peers do not retry in lockstep.
    pub jitter: f64,
    /// Consecutive failures after which the peer is considered down and only probed.
    pub down_after: u32,
    /// How often a down peer is probed. Delivery resumes at most this long (plus jitter and one
    /// round trip) after the peer comes back.
    pub probe_interval: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            jitter: 0.3,
            down_after: 3,
            probe_interval: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// The un-jittered delay after `failures` consecutive failures (`failures >= 1`).
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1u32 << shift).min(self.max)
    }
}

/// Everything the routing core needs to know about this node.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// This provider's domain.
    pub local: ProviderDomain,
    /// The routing table: each peer provider and the transport it is reached over.
    pub routes: BTreeMap<ProviderDomain, TransportKind>,
    pub limits: Limits,
    /// Events waiting per (room, destination) before submissions are refused.
    pub max_queue: usize,
    /// Delivered events waiting for local clients before peers and submitters get 503.
    pub max_inbox: usize,
    /// Delivered events from one provider (the hub that ordered them; this relay for the
    /// rooms it hosts) waiting for local clients before that provider gets 503: so one hub
    /// flooding the inbox while local clients are away cannot stop another's events.
    pub max_inbox_per_peer: usize,
    /// Bytes of inbox records kept in memory; older ones are read back from the store. Only
    /// durable records leave memory, so what the last group commits delivered may add to it.
    pub max_inbox_memory: usize,
    /// FanoutMessages per /notify transmit. Large, since HTTPS keeps one transmit in flight per
    /// queue.
    pub max_batch: usize,
    /// Body bytes per /notify transmit (a single larger event still goes alone).
    pub max_batch_bytes: usize,
    /// Transmits in flight per (room, destination), by transport. HTTPS requests on one h2
    /// connection may be reordered by the receiver, so it keeps one; QUIC streams are ordered,
    /// and a room's acknowledgements come back an RTT later: 64 keeps a 40 ms RTT link busy
    /// when each transmit carries one event (8 held the relay to 0.67x of bare quinn there).
    pub pipeline: BTreeMap<TransportKind, u32>,
    pub retry: RetryPolicy,
    /// A transmit with no outcome after this long counts as failed.
    pub transmit_timeout: Duration,
    /// Accepted submissions remembered per room to answer retries without fanning out twice:
    /// at least the last half of this many, at most this many.
    pub submit_window: usize,
    /// Rooms hosted elsewhere that this node follows from the start (besides those its
    /// clients join): a `/notify` for any other room is refused.
    pub follows: Vec<mimi_wire::uri::RoomId>,
    /// Abuse reports (§5.9) kept for the operator per reporting provider, and their bytes:
    /// past either, that provider's reports are refused (503) and no one else's.
    pub max_abuse_reports_per_peer: usize,
    pub max_abuse_bytes_per_peer: usize,
    /// Consent scopes (§5.7) stored per provider on the other side of them.
    pub max_consent_per_peer: usize,
    /// Dead-letter records kept per peer (events it refused for good); past this, each new one
    /// replaces the oldest.
    pub max_dead_letters_per_peer: usize,
    /// /keyMaterial claims one peer may make per minute (a token bucket that holds a
    /// minute's worth): past it, 429 with Retry-After. Local clients are not limited.
    pub key_claims_per_minute: u32,
    /// /identifierQuery requests one peer may make per minute, likewise.
    pub identifier_queries_per_minute: u32,
    /// Seed of the jitter generator (deterministic in simulation).
    pub seed: u64,
}

impl RelayConfig {
    pub fn new(local: ProviderDomain) -> Self {
        RelayConfig {
            local,
            routes: BTreeMap::new(),
            limits: Limits::default(),
            max_queue: 100_000,
            max_inbox: 1_000_000,
            max_inbox_per_peer: 250_000,
            max_inbox_memory: 64 << 20,
            max_batch: 256,
            max_batch_bytes: 256 * 1024,
            pipeline: BTreeMap::from([
                (TransportKind::Https, 1),
                (TransportKind::Quic, 64),
                (TransportKind::Xmpp, 8),
                (TransportKind::Matrix, 8),
            ]),
            retry: RetryPolicy::default(),
            transmit_timeout: Duration::from_secs(10),
            submit_window: 65_536,
            seed: 0x6d69_6d69,
            follows: Vec::new(),
            max_abuse_reports_per_peer: 1_000,
            max_abuse_bytes_per_peer: 16 << 20,
            max_consent_per_peer: 100_000,
            max_dead_letters_per_peer: 1_000,
            key_claims_per_minute: 600,
            identifier_queries_per_minute: 600,
        }
    }

    pub fn with_route(mut self, peer: ProviderDomain, transport: TransportKind) -> Self {
        self.routes.insert(peer, transport);
        self
    }

    pub(crate) fn pipeline_for(&self, kind: TransportKind) -> u32 {
        self.pipeline.get(&kind).copied().unwrap_or(1).max(1)
    }
}
