//! Exactly one outcome per transmit, for adapters whose sending tasks report outcomes
//! themselves (QUIC, XMPP).
//!
//! [`Outcomes::issue`] turns a transmit into a [`Ticket`], or reports at once why it cannot be
//! sent (`Closed`, `NoRoute`, `Busy`). Whoever finishes a ticket first reports its outcome; a
//! ticket dropped unfinished (its stream, queue or task died) reports `ConnectionLost`, or
//! `Closed` once the adapter is shutting down; the deadline task reports `Timeout`. The deadline
//! task holds only weak references, so dropping the last owner reports at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_core::transport::{Response, Transmit, TransmitId, TransportError};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Inbound;

/// Where outcomes go: the node's [`Inbound`] without its request side, so that the sending
/// half of an adapter needs no type parameter.
pub trait OutcomeSink: Send + Sync + 'static {
    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>);
    fn probe_outcome(&self, peer: ProviderDomain, alive: bool);
}

impl<I: Inbound> OutcomeSink for I {
    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        Inbound::outcome(self, id, outcome);
    }

    fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
        Inbound::probe_outcome(self, peer, alive);
    }
}

/// How a ticket's transmit is getting on. A transmit whose path keeps being answered is on a
/// slow link, not a dead one: its deadline moves to `timeout` after the last progress.
pub trait Progress {
    /// When the path this transmit waits on last moved, if it did.
    fn last_progress(&self) -> Option<Instant> {
        None
    }
}

impl Progress for () {}

/// One peer's unanswered transmits, shared by `send` and the peer's tasks.
pub struct PeerOutcomes {
    sink: Arc<dyn OutcomeSink>,
    in_flight: AtomicUsize,
    max_in_flight: usize,
    closed: Arc<AtomicBool>,
}

impl PeerOutcomes {
    /// Transmits issued and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn sink(&self) -> &Arc<dyn OutcomeSink> {
        &self.sink
    }
}

impl std::fmt::Debug for PeerOutcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerOutcomes")
            .field("in_flight", &self.in_flight())
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// One transmit's right to exactly one outcome. `extra` is what the adapter keeps with it
/// (QUIC: the room stream it was routed to).
pub struct Ticket<X = ()> {
    id: TransmitId,
    done: AtomicBool,
    peer: Arc<PeerOutcomes>,
    extra: X,
}

impl<X> Ticket<X> {
    /// A ticket for a new transmit, or `None` if the peer has `max_in_flight` unanswered.
    pub fn issue(peer: &Arc<PeerOutcomes>, id: TransmitId, extra: X) -> Option<Arc<Self>> {
        if peer.in_flight.fetch_add(1, Ordering::AcqRel) >= peer.max_in_flight {
            peer.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Arc::new(Ticket {
            id,
            done: AtomicBool::new(false),
            peer: peer.clone(),
            extra,
        }))
    }

    pub fn id(&self) -> TransmitId {
        self.id
    }

    /// Reports `outcome` unless the ticket was already finished.
    pub fn finish(&self, outcome: Result<Response, TransportError>) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.peer.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.peer.sink.outcome(self.id, outcome);
        }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub fn extra(&self) -> &X {
        &self.extra
    }
}

impl<X> Drop for Ticket<X> {
    fn drop(&mut self) {
        if !self.is_done() {
            let error = if self.peer.closed.load(Ordering::Acquire) {
                TransportError::Closed
            } else {
                TransportError::ConnectionLost
            };
            self.finish(Err(error));
        }
    }
}

impl<X> std::fmt::Debug for Ticket<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("done", &self.is_done())
            .finish_non_exhaustive()
    }
}

type Deadline<X> = (Instant, Weak<Ticket<X>>);

/// Issues the tickets of one adapter and registers each with the deadline task.
pub struct Outcomes<X = ()> {
    sink: Arc<dyn OutcomeSink>,
    closed: Arc<AtomicBool>,
    deadlines: mpsc::UnboundedSender<Deadline<X>>,
    timeout: Duration,
}

impl<X: Progress + Send + Sync + 'static> Outcomes<X> {
    /// The issuer, and the deadline task the adapter must spawn: it reports `Timeout` for a
    /// ticket still unfinished `timeout` after it was issued (or after its last progress). It
    /// ends once the issuer is dropped.
    pub fn new(
        sink: Arc<dyn OutcomeSink>,
        timeout: Duration,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (deadlines, rx) = mpsc::unbounded_channel();
        let outcomes = Outcomes {
            sink,
            closed: Arc::new(AtomicBool::new(false)),
            deadlines,
            timeout,
        };
        (outcomes, deadline_task(rx, timeout))
    }
}

impl<X> Outcomes<X> {
    /// The outcome counter of one peer, which may have `max_in_flight` transmits unanswered.
    pub fn peer(&self, max_in_flight: usize) -> Arc<PeerOutcomes> {
        Arc::new(PeerOutcomes {
            sink: self.sink.clone(),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            closed: self.closed.clone(),
        })
    }

    pub fn sink(&self) -> &Arc<dyn OutcomeSink> {
        &self.sink
    }

    /// From now on new transmits are refused with `Closed`, and tickets dropped unfinished
    /// report `Closed` instead of `ConnectionLost`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The ticket of `transmit` to `peer` (`None` if no route), with its deadline registered;
    /// or `None` with the outcome already reported: `Closed`, `NoRoute` or `Busy`.
    pub fn issue(
        &self,
        transmit: &Transmit,
        peer: Option<&Arc<PeerOutcomes>>,
        extra: X,
    ) -> Option<Arc<Ticket<X>>> {
        if self.is_closed() {
            self.sink.outcome(transmit.id, Err(TransportError::Closed));
            return None;
        }
        let Some(peer) = peer else {
            let dest = transmit.dest.clone();
            self.sink
                .outcome(transmit.id, Err(TransportError::NoRoute(dest)));
            return None;
        };
        let Some(ticket) = Ticket::issue(peer, transmit.id, extra) else {
            self.sink.outcome(transmit.id, Err(TransportError::Busy));
            return None;
        };
        // If the deadline task is gone we are shutting down; the ticket still reports on drop.
        let _ = self
            .deadlines
            .send((Instant::now() + self.timeout, Arc::downgrade(&ticket)));
        Some(ticket)
    }
}

impl<X> std::fmt::Debug for Outcomes<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcomes")
            .field("closed", &self.is_closed())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Reports `Timeout` for every ticket still unfinished at its deadline: `timeout` after it was
/// issued, or after its last progress if that came later (failing transmits on a path that is
/// slow but answering would only make the core send them again on the same congested path).
async fn deadline_task<X: Progress>(
    mut rx: mpsc::UnboundedReceiver<Deadline<X>>,
    timeout: Duration,
) {
    // Earliest deadline first; `seq` keeps equal times apart, in arrival order.
    let mut deadlines: BTreeMap<(Instant, u64), Weak<Ticket<X>>> = BTreeMap::new();
    let mut seq = 0u64;
    let mut push = |deadlines: &mut BTreeMap<_, _>, at, ticket| {
        seq += 1;
        deadlines.insert((at, seq), ticket);
    };
    let mut sleep = pin!(tokio::time::sleep(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some((at, ticket)) => {
                    push(&mut deadlines, at, ticket);
                    while let Ok((at, ticket)) = rx.try_recv() {
                        push(&mut deadlines, at, ticket);
                    }
                }
                None => return,
            },
            () = &mut sleep, if !deadlines.is_empty() => {}
        }
        let now = Instant::now();
        while let Some(entry) = deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let weak = entry.remove();
            let Some(ticket) = weak.upgrade() else {
                continue;
            };
            if ticket.is_done() {
                continue;
            }
            match ticket.extra().last_progress().map(|t| t + timeout) {
                Some(later) if later > now => push(&mut deadlines, later, weak),
                _ => ticket.finish(Err(TransportError::Timeout)),
            }
        }
        if let Some(&(at, _)) = deadlines.keys().next()
            && sleep.deadline() != at
        {
            sleep.as_mut().reset(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use mimi_wire::endpoint::Endpoint;
    use relay_core::transport::{Status, TransportKind};

    use super::*;

    type Reported = Arc<Mutex<Vec<(TransmitId, Result<Response, TransportError>)>>>;

    #[derive(Default)]
    struct Log(Reported);

    impl OutcomeSink for Log {
        fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((id, outcome));
        }
        fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
    }

    fn taken(r: &Reported) -> Vec<(TransmitId, Result<Response, TransportError>)> {
        std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn transmit(id: u64, dest: &str) -> Transmit {
        Transmit {
            id: TransmitId(id),
            dest: dest.parse().expect("domain"),
            transport: TransportKind::Quic,
            endpoint: Endpoint::Notify,
            target: "mimi://b.example/r/x".into(),
            seq: Some(id),
            lineage: None,
            body: vec![Bytes::new()],
        }
    }

    fn issuer<X: Progress + Send + Sync + 'static>() -> (Outcomes<X>, Reported) {
        let log = Log::default();
        let reported = log.0.clone();
        let (outcomes, timer) = Outcomes::new(Arc::new(log), Duration::from_secs(5));
        tokio::spawn(timer);
        (outcomes, reported)
    }

    #[tokio::test(start_paused = true)]
    async fn one_outcome_per_ticket_whoever_finishes_first() {
        let (o, reported) = issuer::<()>();
        let peer = o.peer(2);
        let t = o
            .issue(&transmit(1, "b.example"), Some(&peer), ())
            .expect("issued");
        t.finish(Ok(Response::new(Status::Created, Bytes::new())));
        t.finish(Err(TransportError::Timeout));
        drop(t);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let r = taken(&reported);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1.as_ref().map(|r| r.status), Ok(Status::Created));
        assert_eq!(peer.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_reported_at_once() {
        let (o, reported) = issuer::<()>();
        let peer = o.peer(1);
        assert!(o.issue(&transmit(1, "x.example"), None, ()).is_none());
        let held = o.issue(&transmit(2, "b.example"), Some(&peer), ());
        assert!(held.is_some());
        assert!(
            o.issue(&transmit(3, "b.example"), Some(&peer), ())
                .is_none()
        );
        o.close();
        assert!(
            o.issue(&transmit(4, "b.example"), Some(&peer), ())
                .is_none()
        );
        let r: Vec<_> = taken(&reported)
            .into_iter()
            .map(|(i, o)| (i.0, o))
            .collect();
        assert_eq!(
            r,
            vec![
                (
                    1,
                    Err(TransportError::NoRoute("x.example".parse().expect("d")))
                ),
                (3, Err(TransportError::Busy)),
                (4, Err(TransportError::Closed)),
            ]
        );
        // Dropped unfinished after close: `Closed`, and the slot is free again.
        drop(held);
        assert_eq!(
            taken(&reported),
            vec![(TransmitId(2), Err(TransportError::Closed))]
        );
        assert_eq!(peer.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_ticket_reports_connection_lost() {
        let (o, reported) = issuer::<()>();
        let peer = o.peer(8);
        drop(o.issue(&transmit(1, "b.example"), Some(&peer), ()));
        assert_eq!(
            taken(&reported),
            vec![(TransmitId(1), Err(TransportError::ConnectionLost))]
        );
    }

    #[derive(Default)]
    struct Moving(Mutex<Option<Instant>>);

    impl Progress for Moving {
        fn last_progress(&self) -> Option<Instant> {
            *self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_time_out_unless_the_path_moves() {
        let (o, reported) = issuer::<Moving>();
        let peer = o.peer(8);
        let still = o.issue(&transmit(1, "b.example"), Some(&peer), Moving::default());
        let moving = o
            .issue(&transmit(2, "b.example"), Some(&peer), Moving::default())
            .expect("issued");
        tokio::time::sleep(Duration::from_secs(4)).await;
        *moving.extra().0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            taken(&reported),
            vec![(TransmitId(1), Err(TransportError::Timeout))]
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            taken(&reported),
            vec![(TransmitId(2), Err(TransportError::Timeout))]
        );
        drop((still, moving));
        assert!(
            taken(&reported).is_empty(),
            "finished tickets report nothing on drop"
        );
    }
}
