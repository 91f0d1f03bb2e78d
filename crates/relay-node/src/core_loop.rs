//! The thread that owns the routing core and the store.
//!
//! One thread, so the core needs no locks: every input arrives as an [`Event`] on one channel.
//! Each turn drains what is waiting, commits the store once (group commit), and only then
//! releases the replies and transmits the core produced.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::store::InboxRecord;
use relay_core::{
    Now, Output, Relay, RelayStats, ReplyToken, Request, Response, RoomError, Status, Store,
    StoreError, TransmitId, Transport, TransportError, TransportKind,
};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

/// Inputs of the core thread.
#[derive(Debug)]
pub(crate) enum Event {
    Request {
        req: Request,
        reply: oneshot::Sender<Response>,
    },
    Outcome {
        id: TransmitId,
        outcome: Result<Response, TransportError>,
    },
    Probe {
        peer: ProviderDomain,
        alive: bool,
    },
    Submit {
        room: String,
        body: Bytes,
        reply: oneshot::Sender<Response>,
    },
    CreateRoom {
        room: RoomId,
        followers: Vec<ProviderDomain>,
        reply: oneshot::Sender<Result<(), RoomError>>,
    },
    Inbox {
        after: u64,
        max: usize,
        reply: oneshot::Sender<Vec<(u64, InboxRecord)>>,
    },
    Stats {
        reply: oneshot::Sender<RelayStats>,
    },
    Shutdown,
}

/// The transports this node runs, by kind: a closed set, so a match rather than dynamic dispatch.
#[derive(Default)]
pub(crate) struct Transports {
    pub https: Option<Arc<relay_https::HttpsTransport>>,
    pub quic: Option<Arc<relay_quic::QuicTransport>>,
}

impl Transports {
    fn get(&self, kind: TransportKind) -> Option<&dyn Transport> {
        match kind {
            TransportKind::Https => self.https.as_deref().map(|t| t as &dyn Transport),
            TransportKind::Quic => self.quic.as_deref().map(|t| t as &dyn Transport),
            _ => None,
        }
    }
}

pub(crate) fn now() -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Now {
        mono: Instant::now(),
        unix_ms,
    }
}

/// Requests waiting in the channel, for backpressure towards peers.
pub(crate) static PENDING_REQUESTS: AtomicUsize = AtomicUsize::new(0);

pub(crate) struct CoreLoop<S: Store> {
    pub relay: Relay,
    pub store: S,
    pub rx: Receiver<Event>,
    /// To feed outcomes back into ourselves (a transport missing for a route).
    pub tx: Sender<Event>,
    pub transports: Arc<Transports>,
    pub inbox_next: watch::Sender<u64>,
}

impl<S: Store> CoreLoop<S> {
    /// Runs until `Shutdown` or until every sender is gone. A store failure stops the node:
    /// what the core holds in memory is then ahead of the disk, and must not be acknowledged.
    pub fn run(mut self) -> Result<(), StoreError> {
        let mut replies: HashMap<ReplyToken, oneshot::Sender<Response>> = HashMap::new();
        let mut next_token = 0u64;
        let mut stopping = false;
        while !stopping {
            let wait = self
                .relay
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| {
                    t.saturating_duration_since(Instant::now())
                });
            let first = match self.rx.recv_timeout(wait) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut next = first;
            let mut handled = 0;
            while let Some(ev) = next.take() {
                handled += 1;
                if let Event::Shutdown = ev {
                    stopping = true;
                } else {
                    self.handle(ev, &mut replies, &mut next_token);
                }
                if handled < 4096 {
                    next = self.rx.try_recv().ok();
                }
            }
            self.relay.handle_timeout(now(), &mut self.store);
            if let Err(e) = self.store.commit() {
                error!(error = %e, source = ?std::error::Error::source(&e), "store commit failed; stopping");
                for (_, r) in replies.drain() {
                    let _ = r.send(Response::error(Status::Internal, "storage failure"));
                }
                return Err(e);
            }
            self.release(&mut replies);
            self.inbox_next.send_if_modified(|v| {
                let n = self.relay.inbox_next();
                let changed = *v != n;
                *v = n;
                changed
            });
        }
        info!("core loop stopped");
        Ok(())
    }

    fn handle(
        &mut self,
        ev: Event,
        replies: &mut HashMap<ReplyToken, oneshot::Sender<Response>>,
        next_token: &mut u64,
    ) {
        let now = now();
        let mut token = |reply| {
            *next_token += 1;
            let t = ReplyToken(*next_token);
            replies.insert(t, reply);
            t
        };
        match ev {
            Event::Request { req, reply } => {
                PENDING_REQUESTS.fetch_sub(1, Ordering::Relaxed);
                let t = token(reply);
                self.relay.handle_request(now, &mut self.store, t, req);
            }
            Event::Outcome { id, outcome } => {
                self.relay.handle_outcome(now, &mut self.store, id, outcome);
            }
            Event::Probe { peer, alive } => self.relay.handle_probe_outcome(now, &peer, alive),
            Event::Submit { room, body, reply } => {
                let t = token(reply);
                self.relay
                    .handle_client_submit(now, &mut self.store, t, &room, body);
            }
            Event::CreateRoom {
                room,
                followers,
                reply,
            } => {
                let r = self
                    .relay
                    .handle_create_room(&mut self.store, room, followers);
                let _ = reply.send(r);
            }
            Event::Inbox { after, max, reply } => {
                self.relay.handle_inbox_read(&mut self.store, after);
                let items = self.relay.inbox_after(after).take(max).cloned().collect();
                let _ = reply.send(items);
            }
            Event::Stats { reply } => {
                let _ = reply.send(self.relay.stats());
            }
            Event::Shutdown => {}
        }
    }

    /// Hands out everything the core produced, after the commit that made it durable.
    fn release(&mut self, replies: &mut HashMap<ReplyToken, oneshot::Sender<Response>>) {
        let transports = Some(&*self.transports);
        while let Some(out) = self.relay.poll_output() {
            match out {
                Output::Reply { token, response } => {
                    if let Some(r) = replies.remove(&token) {
                        // The asker may have gone (connection closed); nothing to do then.
                        let _ = r.send(response);
                    }
                }
                Output::Transmit(t) => match transports.and_then(|ts| ts.get(t.transport)) {
                    Some(tr) => tr.send(t),
                    None => {
                        warn!(dest = %t.dest, transport = %t.transport, "no such transport running");
                        let _ = self.tx.send(Event::Outcome {
                            id: t.id,
                            outcome: Err(TransportError::NoRoute(t.dest)),
                        });
                    }
                },
                Output::Probe(peer) => {
                    let kind = self.relay.config().routes.get(&peer).copied();
                    match kind.and_then(|k| transports.and_then(|ts| ts.get(k))) {
                        Some(tr) => tr.probe(&peer),
                        None => {
                            let _ = self.tx.send(Event::Probe { peer, alive: false });
                        }
                    }
                }
            }
        }
    }
}
