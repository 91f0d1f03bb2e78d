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
//!   Before either, [`Gate::admit`] refuses a source address under penalty: one whose
//!   connection was refused at its peer's cap, or that failed handshakes repeatedly, is
//!   turned away before any TLS work for a short window that grows with each further strike.
//! - [`ByteBudget`] bounds the bytes one peer holds in an adapter (partial frames, bodies in
//!   assembly, requests queued for the core). One peer over budget is refused; no peer can take
//!   another's share.
//! - [`Pacer`] slows a peer whose requests keep being refused: past a budget of refusals per
//!   second its next requests wait, so a flood of requests the node only turns away costs the
//!   node what that budget allows, not what the peer can send.
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
use std::net::IpAddr;
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
    /// The first penalty window of a source address (see [`Gate::admit`]); it doubles with
    /// each further strike, up to 32 times this. Zero turns penalties off.
    pub source_penalty: Duration,
    /// Refused requests per second a peer may cause before its next requests wait (see
    /// [`Pacer`]); it may cause [`REFUSAL_BURST_SECS`] times as many at once. Zero turns
    /// pacing off.
    pub max_refusals_per_s: u32,
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
            source_penalty: Duration::from_millis(250),
            max_refusals_per_s: 50,
        }
    }
}

/// What the node hands each adapter: the budgets, and where to count refusals.
#[derive(Clone, Debug, Default)]
pub struct AdapterContext {
    pub limits: Limits,
    pub stats: Arc<AdapterStats>,
    /// Peers' refusals, shared by every transport of a node (and by the node, which counts
    /// the core's refusals): an adapter paces a peer in debt before reading its next request
    /// and counts the refusals it answers itself.
    pub pacer: Arc<Pacer>,
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
    /// A connection refused before TLS: its source address is under penalty.
    SourcePenalty,
}

impl Budget {
    pub const ALL: [Budget; 11] = [
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
        Budget::SourcePenalty,
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
            Budget::SourcePenalty => "source_penalty",
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
    strikes: AtomicU64,
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

    /// Penalties given to source addresses (each strike starts or lengthens one).
    pub fn source_strikes(&self) -> u64 {
        self.strikes.load(Ordering::Relaxed)
    }
}

/// Admits connections: source addresses under penalty are refused first, then a node-wide
/// cap on unauthenticated connections, then a cap per peer.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    stats: Arc<AdapterStats>,
    handshakes: AtomicUsize,
    per_peer: Mutex<HashMap<ProviderDomain, usize>>,
    penalties: Mutex<Penalties>,
}

impl Gate {
    pub fn new(limits: Limits, stats: Arc<AdapterStats>) -> Arc<Self> {
        let penalties = Mutex::new(Penalties::new(limits.source_penalty));
        Arc::new(Self {
            limits,
            stats,
            handshakes: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            penalties,
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

    /// [`Gate::handshake`] for a connection from `source`, refused at once (counted as
    /// [`Budget::SourcePenalty`]) while that address is under penalty. The peer is unknown
    /// until TLS is done, so the address is all there is to go by: this is what keeps a peer
    /// refused at its cap, or failing handshakes, from making the node do TLS work for every
    /// retry. A TCP source has answered the SYN-ACK; a QUIC one is only struck when it proved
    /// its address (see [`Gate::handshake_failed`]).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<HandshakePermit, OverBudget> {
        let budget = if self.under_penalty(source) {
            Budget::SourcePenalty
        } else {
            match self.handshake() {
                Some(permit) => return Ok(permit),
                None => Budget::Handshakes,
            }
        };
        Err(OverBudget { budget })
    }

    /// Whether `source` is under penalty now; if so, the refusal its connection gets is
    /// counted. For an adapter that admits in steps of its own (QUIC's Retry).
    pub fn under_penalty(&self, source: IpAddr) -> bool {
        let p = self
            .penalties
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let penalized = p.until(source, Instant::now()).is_some();
        if penalized {
            self.stats.refused(Budget::SourcePenalty);
        }
        penalized
    }

    /// A connection from `source` was refused at its peer's connection cap: the address is
    /// penalized (or its penalty lengthened).
    pub fn penalize(&self, source: IpAddr) {
        let mut p = self
            .penalties
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if p.strike(source, Instant::now()) {
            self.stats.strikes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A handshake from `source` failed; every [`FAILURES_PER_STRIKE`]th failure in a row
    /// penalizes the address. Only for an address that was proven (TCP, or a QUIC handshake
    /// that got past its first flight): a spoofed one must not get a real peer penalized.
    pub fn handshake_failed(&self, source: IpAddr) {
        let mut p = self
            .penalties
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if p.failure(source, Instant::now()) {
            self.stats.strikes.fetch_add(1, Ordering::Relaxed);
        }
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

/// Failed handshakes in a row from one address that make a strike.
pub const FAILURES_PER_STRIKE: u32 = 3;
/// A penalty window doubles with each strike, at most this many times.
const MAX_DOUBLINGS: u32 = 5;
/// An address with no strike or failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses tracked at once; past it, forgotten and expired ones make room, and a new one
/// that finds no room is not tracked (memory stays bounded; the other caps still hold).
const MAX_SOURCES: usize = 4096;

/// Per source address: strikes, failed handshakes in a row, and the end of its penalty.
#[derive(Debug)]
struct Penalties {
    base: Duration,
    sources: HashMap<IpAddr, Source>,
}

#[derive(Clone, Copy, Debug)]
struct Source {
    strikes: u32,
    failures: u32,
    last: Instant,
    until: Option<Instant>,
}

impl Penalties {
    fn new(base: Duration) -> Self {
        Self {
            base,
            sources: HashMap::new(),
        }
    }

    /// The address a penalty applies to: IPv4 as is, IPv6 by its /64 (one host usually has
    /// the whole prefix), an IPv4-mapped IPv6 address as IPv4.
    fn key(source: IpAddr) -> IpAddr {
        match source {
            IpAddr::V4(_) => source,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    /// When `source`'s penalty ends, if it is under one at `now`.
    fn until(&self, source: IpAddr, now: Instant) -> Option<Instant> {
        self.sources
            .get(&Self::key(source))
            .and_then(|s| s.until)
            .filter(|u| *u > now)
    }

    /// The entry of `source`, fresh if it was forgotten; `None` when the table is full.
    fn entry(&mut self, source: IpAddr, now: Instant) -> Option<&mut Source> {
        let key = Self::key(source);
        if !self.sources.contains_key(&key) && self.sources.len() >= MAX_SOURCES {
            self.sources.retain(|_, s| {
                now.saturating_duration_since(s.last) < FORGET_AFTER
                    || s.until.is_some_and(|u| u > now)
            });
            if self.sources.len() >= MAX_SOURCES {
                return None;
            }
        }
        let s = self.sources.entry(key).or_insert(Source {
            strikes: 0,
            failures: 0,
            last: now,
            until: None,
        });
        if now.saturating_duration_since(s.last) >= FORGET_AFTER && s.until.is_none_or(|u| u <= now)
        {
            *s = Source {
                strikes: 0,
                failures: 0,
                last: now,
                until: None,
            };
        }
        Some(s)
    }

    /// One strike against `source` at `now`: a penalty of `base` doubled for each strike
    /// before it. `false` if penalties are off or the address could not be tracked.
    fn strike(&mut self, source: IpAddr, now: Instant) -> bool {
        let base = self.base;
        if base.is_zero() {
            return false;
        }
        let Some(s) = self.entry(source, now) else {
            return false;
        };
        let window = base.saturating_mul(1 << s.strikes.min(MAX_DOUBLINGS));
        s.strikes = s.strikes.saturating_add(1);
        s.failures = 0;
        s.last = now;
        s.until = Some(now + window);
        true
    }

    /// One failed handshake from `source`; a strike at every [`FAILURES_PER_STRIKE`]th.
    fn failure(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.base.is_zero() {
            return false;
        }
        let Some(s) = self.entry(source, now) else {
            return false;
        };
        s.failures += 1;
        s.last = now;
        if s.failures >= FAILURES_PER_STRIKE {
            return self.strike(source, now);
        }
        false
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

/// How many seconds' worth of refusals a peer may cause at once, and the longest its debt (so
/// its wait) may grow.
pub const REFUSAL_BURST_SECS: u32 = 4;

/// Slows a peer whose requests keep being refused (malformed, forbidden, not a member, an
/// unknown room, over a size limit): each refusal takes a token from the peer's bucket, which
/// refills at `rate` per second up to [`REFUSAL_BURST_SECS`] seconds' worth. A peer in debt
/// waits, before its next request is handled, until the debt is paid. An honest peer is
/// rarely refused and never waits; a peer that floods with refused requests gets at most
/// `rate` of them handled per second, and, being made to wait for its answers, sends fewer.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    buckets: Mutex<HashMap<ProviderDomain, Bucket>>,
    paced: AtomicU64,
    refused: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Default for Pacer {
    /// At the default `max_refusals_per_s`.
    fn default() -> Self {
        Self::with_rate(Limits::default().max_refusals_per_s)
    }
}

impl Pacer {
    fn with_rate(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            buckets: Mutex::new(HashMap::new()),
            paced: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// `rate` refusals per second per peer; 0 turns pacing off.
    pub fn new(rate: u32) -> Arc<Self> {
        Arc::new(Self::with_rate(rate))
    }

    fn burst(&self) -> f64 {
        self.rate * f64::from(REFUSAL_BURST_SECS)
    }

    /// `peer`'s bucket refilled up to `now`.
    fn refill<'a>(
        &self,
        map: &'a mut HashMap<ProviderDomain, Bucket>,
        peer: &ProviderDomain,
        now: Instant,
    ) -> &'a mut Bucket {
        let burst = self.burst();
        let b = map.entry(peer.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * self.rate).min(burst);
        b.at = now;
        b
    }

    /// One of `peer`'s requests was refused at `now`.
    fn refused_at(&self, peer: &ProviderDomain, now: Instant) {
        if self.rate <= 0.0 {
            return;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        let burst = self.burst();
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = self.refill(&mut map, peer, now);
        // The debt is bounded, and so is any wait.
        b.tokens = (b.tokens - 1.0).max(-burst);
    }

    /// How long `peer`'s next request must wait at `now`.
    fn wait_at(&self, peer: &ProviderDomain, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = self.refill(&mut map, peer, now);
        if b.tokens >= 0.0 {
            if b.tokens >= self.burst() {
                // Nothing owed: forget the peer.
                map.remove(peer);
            }
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-b.tokens / self.rate)
    }

    /// One of `peer`'s requests was refused.
    pub fn refused(&self, peer: &ProviderDomain) {
        self.refused_at(peer, Instant::now());
    }

    /// How long `peer` must wait now before its next request is read (zero when it owes
    /// nothing): for an adapter that stops reading a connection rather than awaiting
    /// [`Pacer::pace`].
    pub fn debt(&self, peer: &ProviderDomain) -> Duration {
        self.wait_at(peer, Instant::now())
    }

    /// Waits until `peer` owes nothing; at once for a peer that is not in debt.
    pub async fn pace(&self, peer: &ProviderDomain) {
        let wait = self.wait_at(peer, Instant::now());
        if !wait.is_zero() {
            self.paced.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }

    /// Requests that had to wait.
    pub fn paced(&self) -> u64 {
        self.paced.load(Ordering::Relaxed)
    }

    /// Refusals counted against peers.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_penalty_is_per_source_and_grows_with_each_strike() {
        let base = Duration::from_millis(100);
        let mut p = Penalties::new(base);
        let t0 = Instant::now();
        let (a, b) = (ip("127.0.0.2"), ip("127.0.0.1"));
        assert_eq!(p.until(a, t0), None);
        assert!(p.strike(a, t0));
        assert_eq!(p.until(a, t0), Some(t0 + base));
        assert_eq!(p.until(b, t0), None, "another source is not touched");
        assert_eq!(p.until(a, t0 + base), None, "the window ends");
        let t1 = t0 + base;
        assert!(p.strike(a, t1));
        assert_eq!(p.until(a, t1), Some(t1 + 2 * base), "doubled");
        let t = t1;
        for _ in 0..10 {
            p.strike(a, t);
        }
        assert_eq!(p.until(a, t), Some(t + 32 * base), "capped");
        // Quiet for long enough, the address starts afresh.
        let later = t + FORGET_AFTER + 32 * base;
        assert!(p.strike(a, later));
        assert_eq!(p.until(a, later), Some(later + base));
    }

    #[test]
    fn repeated_failed_handshakes_make_a_strike() {
        let base = Duration::from_millis(100);
        let mut p = Penalties::new(base);
        let t0 = Instant::now();
        let a = ip("10.0.0.7");
        for i in 1..FAILURES_PER_STRIKE {
            assert!(!p.failure(a, t0), "failure {i} alone is no strike");
            assert_eq!(p.until(a, t0), None);
        }
        assert!(p.failure(a, t0));
        assert_eq!(p.until(a, t0), Some(t0 + base));
        // An IPv6 host is one /64; an IPv4-mapped address is its IPv4 one.
        assert!(p.strike(ip("2001:db8:1:2::1"), t0));
        assert!(p.until(ip("2001:db8:1:2:ffff::9"), t0).is_some());
        assert!(p.until(ip("2001:db8:1:3::1"), t0).is_none());
        assert!(p.until(ip("::ffff:10.0.0.7"), t0).is_some());
    }

    #[test]
    fn no_penalty_when_turned_off() {
        let mut p = Penalties::new(Duration::ZERO);
        let t0 = Instant::now();
        let a = ip("127.0.0.2");
        assert!(!p.strike(a, t0));
        for _ in 0..10 {
            assert!(!p.failure(a, t0));
        }
        assert_eq!(p.until(a, t0), None);
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let mut p = Penalties::new(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 + 10 {
            p.strike(IpAddr::V4(i.into()), t0);
        }
        assert_eq!(p.sources.len(), MAX_SOURCES);
        // Once the penalties are over and forgotten, new addresses find room.
        let later = t0 + FORGET_AFTER + Duration::from_secs(60);
        assert!(p.strike(ip("192.0.2.1"), later));
        assert_eq!(p.sources.len(), 1);
    }

    #[test]
    fn the_gate_refuses_a_penalized_source_before_its_handshake_and_no_other() {
        let stats = Arc::new(AdapterStats::default());
        let gate = Gate::new(
            Limits {
                source_penalty: Duration::from_secs(60),
                ..Limits::default()
            },
            stats.clone(),
        );
        let (a, b) = (ip("127.0.0.2"), ip("127.0.0.1"));
        assert!(gate.admit(a).is_ok());
        gate.penalize(a);
        assert_eq!(
            gate.admit(a).map(drop),
            Err(OverBudget {
                budget: Budget::SourcePenalty
            })
        );
        assert_eq!(stats.refusals(Budget::SourcePenalty), 1);
        assert_eq!(gate.handshakes_in_progress(), 0, "no slot taken");
        assert!(gate.admit(b).is_ok(), "another source is admitted");
        assert_eq!(stats.source_strikes(), 1);
    }

    #[test]
    fn a_peer_that_keeps_being_refused_waits_and_no_other_does() {
        let p = Pacer::new(10);
        let (b, c) = (dom("b.example"), dom("c.example"));
        let t0 = Instant::now();
        // The burst is free.
        for _ in 0..10 * REFUSAL_BURST_SECS {
            p.refused_at(&c, t0);
        }
        assert_eq!(p.wait_at(&c, t0), Duration::ZERO);
        // Five more: half a second of debt at 10 per second.
        for _ in 0..5 {
            p.refused_at(&c, t0);
        }
        assert_eq!(p.wait_at(&c, t0), Duration::from_millis(500));
        assert_eq!(p.wait_at(&b, t0), Duration::ZERO, "b owes nothing");
        assert_eq!(
            p.wait_at(&c, t0 + Duration::from_millis(500)),
            Duration::ZERO,
            "paid off by time"
        );
        // The debt, and so the wait, is bounded.
        for _ in 0..10_000 {
            p.refused_at(&c, t0);
        }
        assert_eq!(
            p.wait_at(&c, t0),
            Duration::from_secs(u64::from(REFUSAL_BURST_SECS))
        );
        assert_eq!(
            p.refusals(),
            10 * u64::from(REFUSAL_BURST_SECS) + 5 + 10_000
        );
    }

    #[test]
    fn pacing_off_never_waits() {
        let p = Pacer::new(0);
        let c = dom("c.example");
        let t0 = Instant::now();
        for _ in 0..1000 {
            p.refused_at(&c, t0);
        }
        assert_eq!(p.wait_at(&c, t0), Duration::ZERO);
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
