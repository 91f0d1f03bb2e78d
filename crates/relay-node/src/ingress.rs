//! Requests from peers on their way to the core thread: one queue per peer, served by deficit
//! round robin (Shreedhar and Varghese, 1995), so a peer that floods the node waits behind its
//! own requests, not in front of everyone else's.
//!
//! Each peer may hold `per_peer` bytes of weight waiting (its share), and all peers together
//! `total`; past either, a request is answered 503 with Retry-After at once and never queued.
//! The adapters push; the core thread pops a turn's worth at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use mimi_wire::uri::ProviderDomain;
use relay_core::{Request, Response};
use tokio::sync::oneshot;

/// Bytes of weight a peer may take per round before the next peer's turn.
const QUANTUM: usize = 64 << 10;

/// A request waiting for the core, with where its answer goes.
pub(crate) type Waiting = (Request, oneshot::Sender<Response>);

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// This peer already has its share waiting.
    PeerShare,
    /// The node as a whole has all it will hold waiting.
    Total,
}

#[derive(Debug, Default)]
struct PeerQueue {
    /// (weight, when queued, the request).
    items: VecDeque<(usize, Instant, Waiting)>,
    weight: usize,
    deficit: usize,
}

#[derive(Debug, Default)]
struct State {
    peers: HashMap<ProviderDomain, PeerQueue>,
    /// Peers with requests waiting, in round-robin order.
    active: VecDeque<ProviderDomain>,
    total: usize,
    /// The head of `active` was cut off by a batch's end with its quantum not used up: it goes
    /// on with what is left, without a new quantum.
    resume: bool,
    /// A wake-up is on its way to the core thread (so one is sent per batch, not per request).
    wake_sent: bool,
    refused_share: u64,
    refused_total: u64,
}

/// The per-peer fair queue in front of the core thread.
#[derive(Debug)]
pub(crate) struct Ingress {
    per_peer: usize,
    total: usize,
    state: Mutex<State>,
}

impl Ingress {
    pub(crate) fn new(per_peer: usize, total: usize) -> Self {
        Self {
            per_peer,
            total,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a request of `weight`; `Ok(true)` means the caller must wake the core thread.
    /// A refusal hands the request back (boxed: refusals are the cold path).
    pub(crate) fn push(
        &self,
        weight: usize,
        item: Waiting,
    ) -> Result<bool, Box<(Refused, Waiting)>> {
        let mut s = self.lock();
        if s.total + weight > self.total {
            s.refused_total += 1;
            return Err(Box::new((Refused::Total, item)));
        }
        let from = item.0.from.clone();
        let q = s.peers.entry(from.clone()).or_default();
        if q.weight + weight > self.per_peer {
            s.refused_share += 1;
            return Err(Box::new((Refused::PeerShare, item)));
        }
        let was_idle = q.items.is_empty();
        q.items.push_back((weight, Instant::now(), item));
        q.weight += weight;
        s.total += weight;
        if was_idle {
            s.active.push_back(from);
        }
        let wake = !s.wake_sent;
        s.wake_sent = true;
        Ok(wake)
    }

    /// Takes up to `max` requests in fair order. Afterwards `true` means more are waiting and
    /// the core thread must wake itself for another turn.
    #[cfg(test)]
    pub(crate) fn pop_batch(&self, max: usize, out: &mut Vec<Waiting>) -> bool {
        self.pop_batch_timed(max, out, &mut Vec::new())
    }

    /// [`Ingress::pop_batch`], also pushing to `queued` when each request taken was queued.
    pub(crate) fn pop_batch_timed(
        &self,
        max: usize,
        out: &mut Vec<Waiting>,
        queued: &mut Vec<Instant>,
    ) -> bool {
        let mut s = self.lock();
        let s = &mut *s;
        let mut taken = 0;
        'rounds: while taken < max {
            let Some(peer) = s.active.pop_front() else {
                break;
            };
            let Some(q) = s.peers.get_mut(&peer) else {
                continue;
            };
            if !std::mem::take(&mut s.resume) {
                q.deficit += QUANTUM;
            }
            while let Some((w, _, _)) = q.items.front() {
                let w = *w;
                if w > q.deficit {
                    break;
                }
                if taken >= max {
                    s.active.push_front(peer);
                    s.resume = true;
                    break 'rounds;
                }
                let Some((_, at, item)) = q.items.pop_front() else {
                    break;
                };
                queued.push(at);
                q.deficit -= w;
                q.weight -= w;
                s.total -= w;
                out.push(item);
                taken += 1;
            }
            if q.items.is_empty() {
                s.peers.remove(&peer);
            } else {
                s.active.push_back(peer);
            }
        }
        let more = !s.active.is_empty();
        s.wake_sent = more;
        more
    }

    /// Requests refused for a peer's share and for the node's total, so far.
    pub(crate) fn refusals(&self) -> (u64, u64) {
        let s = self.lock();
        (s.refused_share, s.refused_total)
    }

    /// Weight waiting now, in all and for `peer`.
    #[cfg(test)]
    fn weight(&self, peer: &ProviderDomain) -> (usize, usize) {
        let s = self.lock();
        (s.total, s.peers.get(peer).map_or(0, |q| q.weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mimi_wire::endpoint::Endpoint;
    use relay_core::TransportKind;

    fn req(from: &str, n: usize) -> Waiting {
        let (tx, _rx) = oneshot::channel();
        (
            Request {
                from: from.parse().expect("domain"),
                transport: TransportKind::Quic,
                endpoint: Endpoint::Notify,
                target: format!("{n}"),
                seq: None,
                lineage: None,
                body: Bytes::new(),
            },
            tx,
        )
    }

    #[test]
    fn a_flooding_peer_does_not_delay_another_peers_requests() {
        let ing = Ingress::new(usize::MAX / 4, usize::MAX / 2);
        for i in 0..10_000 {
            ing.push(1024, req("flood.example", i))
                .map_err(|e| e.0)
                .expect("queued");
        }
        for i in 0..10 {
            ing.push(1024, req("honest.example", i))
                .map_err(|e| e.0)
                .expect("queued");
        }
        let mut out: Vec<Waiting> = Vec::new();
        let mut pops = 0;
        while out
            .iter()
            .filter(|(r, _)| r.from.as_str() == "honest.example")
            .count()
            < 10
        {
            ing.pop_batch(16, &mut out);
            pops += 1;
            assert!(pops < 10_000, "honest requests never came out");
        }
        // First come first served would have put all 10,000 flood requests first; with DRR the
        // honest ones are out within the first two rounds (64 KiB = 64 requests per round).
        let last_honest = out
            .iter()
            .rposition(|(r, _)| r.from.as_str() == "honest.example")
            .expect("honest");
        assert!(
            last_honest < 2 * 64 + 10,
            "last honest request at {last_honest}"
        );
        // Each peer's own order is kept.
        let honest: Vec<&str> = out
            .iter()
            .filter(|(r, _)| r.from.as_str() == "honest.example")
            .map(|(r, _)| r.target.as_str())
            .collect();
        assert_eq!(
            honest,
            (0..10)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_peer_over_its_share_is_refused_and_others_are_not() {
        let ing = Ingress::new(10 * 1024, 100 * 1024);
        for i in 0..10 {
            ing.push(1024, req("flood.example", i))
                .map_err(|e| e.0)
                .expect("within share");
        }
        assert_eq!(
            ing.push(1024, req("flood.example", 10))
                .map(|_| ())
                .map_err(|e| e.0),
            Err(Refused::PeerShare)
        );
        ing.push(1024, req("honest.example", 0))
            .map_err(|e| e.0)
            .expect("own share");
        let flood: ProviderDomain = "flood.example".parse().expect("domain");
        assert_eq!(ing.weight(&flood), (11 * 1024, 10 * 1024));
        let mut out = Vec::new();
        while ing.pop_batch(100, &mut out) {}
        assert_eq!(out.len(), 11);
        assert_eq!(ing.weight(&flood), (0, 0));
        assert_eq!(ing.refusals(), (1, 0));
    }

    #[test]
    fn the_node_total_bounds_all_peers_together() {
        let ing = Ingress::new(10 * 1024, 15 * 1024);
        for i in 0..10 {
            ing.push(1024, req("b.example", i))
                .map_err(|e| e.0)
                .expect("queued");
        }
        for i in 0..5 {
            ing.push(1024, req("c.example", i))
                .map_err(|e| e.0)
                .expect("queued");
        }
        assert_eq!(
            ing.push(1024, req("d.example", 0))
                .map(|_| ())
                .map_err(|e| e.0),
            Err(Refused::Total)
        );
    }

    #[test]
    fn one_wake_per_batch() {
        let ing = Ingress::new(1 << 20, 1 << 20);
        assert_eq!(ing.push(1, req("b.example", 0)).map_err(|e| e.0), Ok(true));
        assert_eq!(ing.push(1, req("b.example", 1)).map_err(|e| e.0), Ok(false));
        let mut out = Vec::new();
        assert!(!ing.pop_batch(10, &mut out));
        assert_eq!(ing.push(1, req("b.example", 2)).map_err(|e| e.0), Ok(true));
    }
}
