//! What every transport adapter of mimi-relay shares, so that a peer meets the same bounds
//! whichever transport it uses.
//!
//! Contract:
//! - [`Transport`] (node to adapter) and [`Inbound`] (adapter to node) are the whole interface
//!   between the node and an adapter; the data they carry is relay-core's.
//! - [`Limits`] holds every per-peer budget an adapter enforces, each a `[limits]` key of the
//!   node's config with a safe default.
//! - [`Gate`] admits connections: a node-wide cap on connections that have not yet
//!   authenticated (a handshake flood cannot take every socket) and, once a connection knows
//!   its provider, a cap per peer. A permit is an RAII guard: dropping it frees the slot.
//! - [`ByteBudget`] bounds the bytes one peer holds in an adapter (partial frames, bodies in
//!   assembly, requests queued for the core). One peer over budget is refused; no peer can take
//!   another's share.
//! - [`LogLimiter`] keeps failed-handshake warnings from becoming a log flood: it counts every
//!   event and lets a line through at most once per interval, with the number suppressed.
//! - [`AdapterStats`] counts refusals by cause, failed handshakes and QUIC Retries; the node
//!   exports them as metrics.
//! - [`PeerAddr`] is where a peer is dialled: a host name resolved at every connection
//!   attempt, or an IP address.
//! - [`outcome`] gives every transmit exactly one outcome (QUIC, XMPP); [`peers`] is the frame
//!   of an adapter with one task per peer behind a bounded queue and its listener (HTTPS,
//!   Matrix); `http` (feature `http`) reads a request body within its bounds.
//!
//! The budgets do no I/O: adapters hold them in `Arc`s and call them from their tasks. What
//! needs a timer or a task (the outcome deadlines) runs on tokio, as every adapter does.

pub mod addr;
#[cfg(feature = "http")]
pub mod http;
pub mod outcome;
pub mod peers;
pub mod transport;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mimi_wire::uri::ProviderDomain;

pub use addr::PeerAddr;
pub use transport::{Inbound, Transport};

/// Per-peer and per-node budgets of an adapter. Defaults are safe for a node with a few dozen
/// peers on a small machine; every field is a `[limits]` key of the node's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections (or XMPP streams) one authenticated peer may hold open at once.
    pub max_conns_per_peer: usize,
    /// Connections that have not finished authenticating, node-wide, per transport.
    pub max_handshakes: usize,
    /// Concurrent streams one connection may open (QUIC streams, HTTP/2 streams).
    pub max_streams_per_conn: u32,
    /// Bytes one peer may hold in the adapter: frames and bodies in assembly plus requests
    /// waiting for the core's answer.
    pub max_peer_bytes: usize,
    /// How long a started frame or body may take to arrive in full.
    pub frame_deadline: Duration,
    /// Detached (resumable) XMPP sessions one peer may leave behind.
    pub max_parked_per_peer: usize,
    /// Unacknowledged stanzas (or answers) kept for one XMPP session.
    pub max_unacked: usize,
    /// How deep XML may nest inside one stanza.
    pub max_xml_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_conns_per_peer: 8,
            max_handshakes: 256,
            max_streams_per_conn: 1024,
            max_peer_bytes: 64 << 20,
            frame_deadline: Duration::from_secs(30),
            max_parked_per_peer: 4,
            max_unacked: 4096,
            max_xml_depth: 32,
        }
    }
}

/// What the node hands each adapter: the budgets, and where to count refusals.
#[derive(Clone, Debug, Default)]
pub struct AdapterContext {
    pub limits: Limits,
    pub stats: Arc<AdapterStats>,
}

/// Which budget refused a peer (the label of the `mimi_relay_budget_refusals_total` metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Budget {
    Handshakes,
    ConnsPerPeer,
    Streams,
    PeerBytes,
    FrameDeadline,
    Parked,
    Unacked,
    XmlDepth,
    BodySize,
    Unauthenticated,
}

impl Budget {
    pub const ALL: [Budget; 10] = [
        Budget::Handshakes,
        Budget::ConnsPerPeer,
        Budget::Streams,
        Budget::PeerBytes,
        Budget::FrameDeadline,
        Budget::Parked,
        Budget::Unacked,
        Budget::XmlDepth,
        Budget::BodySize,
        Budget::Unauthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Handshakes => "handshakes",
            Budget::ConnsPerPeer => "conns_per_peer",
            Budget::Streams => "streams",
            Budget::PeerBytes => "peer_bytes",
            Budget::FrameDeadline => "frame_deadline",
            Budget::Parked => "parked",
            Budget::Unacked => "unacked",
            Budget::XmlDepth => "xml_depth",
            Budget::BodySize => "body_size",
            Budget::Unauthenticated => "unauthenticated",
        }
    }

    fn index(self) -> usize {
        Budget::ALL.iter().position(|b| *b == self).unwrap_or(0)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A peer went over one of its budgets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("over the {budget} budget")]
pub struct OverBudget {
    pub budget: Budget,
}

/// Refusals and failed handshakes, counted for the node's metrics.
#[derive(Debug, Default)]
pub struct AdapterStats {
    refusals: [AtomicU64; Budget::ALL.len()],
    failed_handshakes: AtomicU64,
    retries: AtomicU64,
    unsupported: AtomicU64,
}

impl AdapterStats {
    pub fn refused(&self, budget: Budget) {
        self.refusals[budget.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusals(&self, budget: Budget) -> u64 {
        self.refusals[budget.index()].load(Ordering::Relaxed)
    }

    pub fn failed_handshakes(&self) -> u64 {
        self.failed_handshakes.load(Ordering::Relaxed)
    }

    /// A handshake answered with an address-validation Retry (QUIC, under handshake load).
    pub fn retry_sent(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retries_sent(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// A transmit for an endpoint the peer does not serve (HTTPS: not in its directory).
    pub fn unsupported_endpoint(&self) {
        self.unsupported.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unsupported_endpoints(&self) -> u64 {
        self.unsupported.load(Ordering::Relaxed)
    }
}

/// Admits connections: a node-wide cap on unauthenticated ones, then a cap per peer.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    stats: Arc<AdapterStats>,
    handshakes: AtomicUsize,
    per_peer: Mutex<HashMap<ProviderDomain, usize>>,
}

impl Gate {
    pub fn new(limits: Limits, stats: Arc<AdapterStats>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            stats,
            handshakes: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn stats(&self) -> &Arc<AdapterStats> {
        &self.stats
    }

    /// A slot for one connection until it authenticates; `None` when the node already has
    /// `max_handshakes` in progress (the adapter closes the socket at once, or asks QUIC for a
    /// Retry).
    pub fn handshake(self: &Arc<Self>) -> Option<HandshakePermit> {
        let prev = self.handshakes.fetch_add(1, Ordering::AcqRel);
        if prev >= self.limits.max_handshakes {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            self.stats.refused(Budget::Handshakes);
            return None;
        }
        Some(HandshakePermit {
            gate: Arc::clone(self),
        })
    }

    /// How many handshakes are in progress now.
    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.load(Ordering::Acquire)
    }

    /// A slot for one authenticated connection of `peer`.
    pub fn peer(self: &Arc<Self>, peer: &ProviderDomain) -> Result<PeerPermit, OverBudget> {
        let mut map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(peer.clone()).or_insert(0);
        if *n >= self.limits.max_conns_per_peer {
            self.stats.refused(Budget::ConnsPerPeer);
            return Err(OverBudget {
                budget: Budget::ConnsPerPeer,
            });
        }
        *n += 1;
        Ok(PeerPermit {
            gate: Arc::clone(self),
            peer: peer.clone(),
        })
    }

    /// Connections `peer` holds now.
    pub fn peer_conns(&self, peer: &ProviderDomain) -> usize {
        let map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(peer).copied().unwrap_or(0)
    }
}

/// A connection that has not authenticated yet; dropping it frees the slot.
#[derive(Debug)]
pub struct HandshakePermit {
    gate: Arc<Gate>,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.gate.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An authenticated connection of one peer; dropping it frees the slot.
#[derive(Debug)]
pub struct PeerPermit {
    gate: Arc<Gate>,
    peer: ProviderDomain,
}

impl PeerPermit {
    pub fn peer(&self) -> &ProviderDomain {
        &self.peer
    }
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        let mut map = self
            .gate
            .per_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// Bytes held per peer, shared by every connection of the peer on one transport.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    stats: Arc<AdapterStats>,
    held: Mutex<HashMap<ProviderDomain, usize>>,
}

impl ByteBudget {
    pub fn new(limit: usize, stats: Arc<AdapterStats>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            stats,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Reserves `n` bytes for `peer`, or refuses if that would take it over its budget.
    pub fn reserve(self: &Arc<Self>, peer: &ProviderDomain, n: usize) -> Result<Held, OverBudget> {
        let mut map = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let h = map.entry(peer.clone()).or_insert(0);
        if h.saturating_add(n) > self.limit {
            if *h == 0 {
                map.remove(peer);
            }
            self.stats.refused(Budget::PeerBytes);
            return Err(OverBudget {
                budget: Budget::PeerBytes,
            });
        }
        *h += n;
        Ok(Held {
            budget: Arc::clone(self),
            peer: peer.clone(),
            n,
        })
    }

    /// Bytes `peer` holds now.
    pub fn held(&self, peer: &ProviderDomain) -> usize {
        let map = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(peer).copied().unwrap_or(0)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Where this budget counts its refusals.
    pub fn stats(&self) -> &Arc<AdapterStats> {
        &self.stats
    }
}

/// Bytes reserved in a [`ByteBudget`]; dropping it gives them back.
#[derive(Debug)]
pub struct Held {
    budget: Arc<ByteBudget>,
    peer: ProviderDomain,
    n: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.n
    }

    /// Grows the reservation by `more` bytes, or refuses and leaves it as it was.
    pub fn grow(&mut self, more: usize) -> Result<(), OverBudget> {
        let mut map = self
            .budget
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let h = map.entry(self.peer.clone()).or_insert(0);
        if h.saturating_add(more) > self.budget.limit {
            self.budget.stats.refused(Budget::PeerBytes);
            return Err(OverBudget {
                budget: Budget::PeerBytes,
            });
        }
        *h += more;
        self.n += more;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut map = self
            .budget
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = map.get_mut(&self.peer) {
            *h = h.saturating_sub(self.n);
            if *h == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// Lets a repeated warning through at most once per interval; counts every occurrence.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Records one occurrence at `now`. `Some(suppressed)` means log it now, saying how many
    /// were left out since the last line; `None` means stay quiet.
    pub fn hit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match s.0 {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// A failed handshake: counted in `stats`, logged at WARN at most once per limiter interval.
pub fn failed_handshake(
    stats: &AdapterStats,
    limiter: &LogLimiter,
    transport: &str,
    remote: &dyn fmt::Display,
    error: &dyn fmt::Display,
) {
    stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
    match limiter.hit(Instant::now()) {
        Some(0) => tracing::warn!(transport, %remote, %error, "inbound handshake failed"),
        Some(suppressed) => tracing::warn!(
            transport,
            %remote,
            %error,
            suppressed,
            "inbound handshake failed ({suppressed} more since the last line)"
        ),
        None => tracing::debug!(transport, %remote, %error, "inbound handshake failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(s: &str) -> ProviderDomain {
        s.parse().expect("domain")
    }

    #[test]
    fn handshake_slots_are_capped_and_freed() {
        let stats = Arc::new(AdapterStats::default());
        let gate = Gate::new(
            Limits {
                max_handshakes: 2,
                ..Limits::default()
            },
            stats.clone(),
        );
        let a = gate.handshake().expect("first");
        let _b = gate.handshake().expect("second");
        assert!(gate.handshake().is_none());
        assert_eq!(stats.refusals(Budget::Handshakes), 1);
        drop(a);
        assert!(gate.handshake().is_some());
    }

    #[test]
    fn one_peer_at_its_cap_leaves_others_their_share() {
        let stats = Arc::new(AdapterStats::default());
        let gate = Gate::new(
            Limits {
                max_conns_per_peer: 1,
                ..Limits::default()
            },
            stats.clone(),
        );
        let b = dom("b.example");
        let c = dom("c.example");
        let p = gate.peer(&b).expect("b's first");
        assert_eq!(
            gate.peer(&b).map(drop),
            Err(OverBudget {
                budget: Budget::ConnsPerPeer
            })
        );
        let _q = gate.peer(&c).expect("c is not b");
        drop(p);
        assert_eq!(gate.peer_conns(&b), 0);
        assert!(gate.peer(&b).is_ok());
    }

    #[test]
    fn byte_budget_is_per_peer_and_returned_on_drop() {
        let stats = Arc::new(AdapterStats::default());
        let budget = ByteBudget::new(100, stats.clone());
        let b = dom("b.example");
        let c = dom("c.example");
        let mut h = budget.reserve(&b, 60).expect("fits");
        assert!(budget.reserve(&b, 41).is_err());
        assert!(h.grow(41).is_err());
        assert_eq!(h.bytes(), 60);
        h.grow(40).expect("exactly the limit");
        let _c = budget.reserve(&c, 100).expect("c has its own share");
        drop(h);
        assert_eq!(budget.held(&b), 0);
        assert_eq!(stats.refusals(Budget::PeerBytes), 2);
    }

    #[test]
    fn log_limiter_lets_one_line_through_per_interval() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.hit(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.hit(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(l.hit(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.hit(t0 + Duration::from_secs(11)), None);
    }
}
