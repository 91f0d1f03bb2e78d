//! The thread that owns the routing core and the store.
//!
//! One thread, so the core needs no locks: every input arrives as an [`Event`] on one channel.
//! Each turn drains what is waiting, commits the store once (group commit), and only then
//! releases the replies and transmits the core produced.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_adapter::Transport;
use relay_core::store::InboxRecord;
use relay_core::{
    Now, Output, Relay, RelayStats, ReplyToken, Response, RoomError, SealedCommit, Status, Store,
    StoreError, TransmitId, TransportError, TransportKind,
};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

/// Requests taken from the fair queue per wake-up of the core thread.
const INGRESS_BATCH: usize = 256;

/// Inputs of the core thread.
#[derive(Debug)]
pub(crate) enum Event {
    /// Requests from peers are waiting in the fair queue.
    Ingress,
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
    /// A provider front end says its users take part in a room hosted elsewhere.
    FollowRoom {
        room: RoomId,
        reply: oneshot::Sender<Result<(), RoomError>>,
    },
    /// A local client's request for another endpoint than /submitMessage (/update,
    /// /keyMaterial): answered here or forwarded.
    ClientRequest {
        endpoint: mimi_wire::endpoint::Endpoint,
        target: String,
        body: Bytes,
        reply: oneshot::Sender<Response>,
    },
    /// A local client publishes KeyPackages.
    PublishKeyPackages {
        user: String,
        client: String,
        key_packages: Vec<Bytes>,
        reply: oneshot::Sender<Result<usize, &'static str>>,
    },
    /// Lists a local user in the identifier directory.
    DirectoryEntry {
        search_type: mimi_wire::proto::SearchIdentifierType,
        value: String,
        user: String,
        reply: oneshot::Sender<Result<(), &'static str>>,
    },
    /// A local client creates an MLS room hosted here.
    CreateMlsRoom {
        room: RoomId,
        group_info: Bytes,
        ratchet_tree: Bytes,
        reply: oneshot::Sender<Result<(), relay_core::MlsRoomError>>,
    },
    Inbox {
        after: u64,
        max: usize,
        reply: oneshot::Sender<Vec<(u64, InboxRecord)>>,
    },
    Stats {
        reply: oneshot::Sender<(RelayStats, StoreStats)>,
    },
    /// From the committer thread: batch `id` is written (or failed).
    Committed {
        id: u64,
        result: Result<(), StoreError>,
        took: Duration,
    },
    Shutdown,
}

/// The transports this node runs, by kind.
#[derive(Default)]
pub(crate) struct Transports(pub BTreeMap<TransportKind, Arc<dyn Transport>>);

impl Transports {
    fn get(&self, kind: TransportKind) -> Option<&dyn Transport> {
        self.0.get(&kind).map(|t| &**t)
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

/// What the core thread measures of the store.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    /// Commits that wrote something.
    pub commits: u64,
    /// Events handled in turns that ended with such a commit.
    pub events: u64,
    /// Time spent in commits (write and fsync).
    pub commit_time: relay_core::stats::Histogram,
    /// Peer requests whose handling panicked (refused with 500; the node went on).
    pub panics: u64,
}

pub(crate) struct CoreLoop<S: Store> {
    pub relay: Relay,
    pub store: S,
    pub rx: Receiver<Event>,
    /// To feed outcomes back into ourselves (a transport missing for a route), and for the
    /// committer thread to report.
    pub tx: Sender<Event>,
    pub transports: Arc<Transports>,
    pub inbox_next: watch::Sender<u64>,
    pub store_stats: StoreStats,
    /// Requests from peers, queued per peer (see `NodeInbound`).
    pub ingress: Arc<crate::ingress::Ingress>,
}

/// Something to hand out once the commit it depends on is durable.
enum Held {
    Output(Output),
    Inbox(
        oneshot::Sender<Vec<(u64, InboxRecord)>>,
        Vec<(u64, InboxRecord)>,
    ),
    Room(
        oneshot::Sender<Result<(), RoomError>>,
        Result<(), RoomError>,
    ),
    /// Any other answer to a local client.
    Send(Box<dyn FnOnce() + Send>),
}

/// Pipelined group commit: while one batch is being written and synced on the committer
/// thread, the core goes on handling inputs into the next batch. Everything the core produces
/// is tagged with the batch that holds its changes and handed out only when that batch is
/// durable.
struct Pipeline {
    /// The batch now collecting changes.
    open: u64,
    /// The highest batch known durable.
    durable: u64,
    /// The batch being written, with the inputs it covers.
    writing: Option<(u64, u64)>,
    held: VecDeque<(u64, Held)>,
    inputs_in_open: u64,
}

impl<S: Store> CoreLoop<S> {
    /// Runs until `Shutdown` or until every sender is gone. A store failure stops the node:
    /// what the core holds in memory is then ahead of the disk, and must not be acknowledged.
    pub fn run(mut self) -> Result<(), StoreError> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<(u64, SealedCommit)>();
        let report = self.tx.clone();
        let committer = std::thread::Builder::new()
            .name("relay-commit".into())
            .spawn(move || {
                for (id, write) in job_rx {
                    let started = Instant::now();
                    let result = write();
                    let took = started.elapsed();
                    if report.send(Event::Committed { id, result, took }).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| StoreError::new("start committer", e))?;

        let mut replies: HashMap<ReplyToken, oneshot::Sender<Response>> = HashMap::new();
        let mut next_token = 0u64;
        let mut stopping = false;
        let mut p = Pipeline {
            open: 1,
            durable: 0,
            writing: None,
            held: VecDeque::new(),
            inputs_in_open: 0,
        };
        let result = loop {
            let wait = self
                .relay
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| {
                    t.saturating_duration_since(Instant::now())
                });
            let mut next = match self.rx.recv_timeout(wait) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            };
            let mut handled = 0u64;
            let mut failed = None;
            while let Some(ev) = next.take() {
                handled += 1;
                match ev {
                    Event::Shutdown => stopping = true,
                    Event::Committed { id, result, took } => {
                        let inputs = p.writing.take().map_or(0, |(_, n)| n);
                        match result {
                            Ok(()) => {
                                p.durable = id;
                                self.store_stats.commits += 1;
                                self.store_stats.events += inputs;
                                self.store_stats.commit_time.record(took);
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    ev => {
                        if matches!(ev, Event::Ingress) {
                            // A wake-up carries up to a batch of requests: count them, so a
                            // turn (and the commit that ends it) stays bounded.
                            handled += INGRESS_BATCH as u64 - 1;
                        }
                        p.inputs_in_open += 1;
                        self.handle(ev, &mut replies, &mut next_token, &mut p);
                    }
                }
                if handled < 4096 && failed.is_none() {
                    next = self.rx.try_recv().ok();
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            self.relay.handle_timeout(now(), &mut self.store);
            while let Some(out) = self.relay.poll_output() {
                p.held.push_back((p.open, Held::Output(out)));
            }
            if p.writing.is_none() {
                match self.store.seal() {
                    Ok(Some(write)) => {
                        p.writing = Some((p.open, std::mem::take(&mut p.inputs_in_open)));
                        if jobs.send((p.open, write)).is_err() {
                            break Err(StoreError::new("commit", CommitterGone));
                        }
                    }
                    // Nothing to write: everything applied so far is durable.
                    Ok(None) => p.durable = p.open,
                    Err(e) => break Err(e),
                }
                p.open += 1;
            }
            self.release(&mut replies, &mut p);
            self.inbox_next.send_if_modified(|v| {
                let n = self.relay.inbox_next();
                let changed = *v != n;
                *v = n;
                changed
            });
            if stopping && p.writing.is_none() && p.held.is_empty() {
                break Ok(());
            }
        };
        drop(jobs);
        let _ = committer.join();
        if let Err(e) = &result {
            error!(error = %e, source = ?std::error::Error::source(e), "store commit failed; stopping");
            for (_, r) in replies.drain() {
                let _ = r.send(Response::error(Status::Internal, "storage failure"));
            }
        }
        info!("core loop stopped");
        result
    }

    fn handle(
        &mut self,
        ev: Event,
        replies: &mut HashMap<ReplyToken, oneshot::Sender<Response>>,
        next_token: &mut u64,
        p: &mut Pipeline,
    ) {
        let now = now();
        let mut token = |reply| {
            *next_token += 1;
            let t = ReplyToken(*next_token);
            replies.insert(t, reply);
            t
        };
        match ev {
            Event::Ingress => {
                let mut batch = Vec::new();
                // A bounded helping per wake-up, so outcomes and local clients interleave.
                if self.ingress.pop_batch(INGRESS_BATCH, &mut batch) {
                    let _ = self.tx.send(Event::Ingress);
                }
                for (req, reply) in batch {
                    *next_token += 1;
                    let t = ReplyToken(*next_token);
                    replies.insert(t, reply);
                    // A decoder's bug reached by a peer's input refuses that request; it does
                    // not end the node for every other peer.
                    let (relay, store) = (&mut self.relay, &mut self.store);
                    let run =
                        std::panic::AssertUnwindSafe(|| relay.handle_request(now, store, t, req));
                    if std::panic::catch_unwind(run).is_err() {
                        self.store_stats.panics += 1;
                        error!("handling a peer's request panicked; refused with 500");
                        if let Some(r) = replies.remove(&t) {
                            let _ = r.send(Response::error(
                                Status::Internal,
                                "internal error handling this request",
                            ));
                        }
                    }
                }
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
                p.held.push_back((p.open, Held::Room(reply, r)));
            }
            Event::FollowRoom { room, reply } => {
                let r = self.relay.handle_follow_room(&mut self.store, &room);
                p.held.push_back((p.open, Held::Room(reply, r)));
            }
            Event::ClientRequest {
                endpoint,
                target,
                body,
                reply,
            } => {
                let t = token(reply);
                self.relay
                    .handle_client_request(now, &mut self.store, t, endpoint, &target, body);
            }
            Event::PublishKeyPackages {
                user,
                client,
                key_packages,
                reply,
            } => {
                let r = self.relay.handle_publish_key_packages(
                    &mut self.store,
                    &user,
                    &client,
                    key_packages,
                );
                p.held.push_back((
                    p.open,
                    Held::Send(Box::new(move || {
                        let _ = reply.send(r);
                    })),
                ));
            }
            Event::DirectoryEntry {
                search_type,
                value,
                user,
                reply,
            } => {
                let r =
                    self.relay
                        .handle_directory_entry(&mut self.store, search_type, &value, &user);
                p.held.push_back((
                    p.open,
                    Held::Send(Box::new(move || {
                        let _ = reply.send(r);
                    })),
                ));
            }
            Event::CreateMlsRoom {
                room,
                group_info,
                ratchet_tree,
                reply,
            } => {
                let r = self.relay.handle_create_mls_room(
                    &mut self.store,
                    room,
                    &group_info,
                    &ratchet_tree,
                );
                p.held.push_back((
                    p.open,
                    Held::Send(Box::new(move || {
                        let _ = reply.send(r);
                    })),
                ));
            }
            Event::Inbox { after, max, reply } => {
                self.relay.handle_inbox_read(&mut self.store, after);
                // Only what is durable may be shown: a record shown and then lost in a crash
                // would be delivered again.
                let items = self.relay.inbox_after(after).take(max).cloned().collect();
                p.held.push_back((p.open, Held::Inbox(reply, items)));
            }
            Event::Stats { reply } => {
                let _ = reply.send((self.relay.stats(), self.store_stats.clone()));
            }
            Event::Shutdown | Event::Committed { .. } => {}
        }
    }

    /// Hands out everything whose batch is durable.
    fn release(
        &mut self,
        replies: &mut HashMap<ReplyToken, oneshot::Sender<Response>>,
        p: &mut Pipeline,
    ) {
        let transports = Some(&*self.transports);
        while p.held.front().is_some_and(|(tag, _)| *tag <= p.durable) {
            let Some((_, held)) = p.held.pop_front() else {
                break;
            };
            let out = match held {
                Held::Inbox(reply, items) => {
                    let _ = reply.send(items);
                    continue;
                }
                Held::Room(reply, r) => {
                    let _ = reply.send(r);
                    continue;
                }
                Held::Send(f) => {
                    f();
                    continue;
                }
                Held::Output(out) => out,
            };
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

/// The committer thread is gone (it only stops when the core loop drops its job queue).
#[derive(Debug, thiserror::Error)]
#[error("the committer thread stopped")]
struct CommitterGone;
