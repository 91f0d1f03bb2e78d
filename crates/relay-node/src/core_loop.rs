//! The thread that owns the routing core and the store.
//!
//! One thread, so the core needs no locks: every input arrives as an [`Event`] on one channel.
//! Each turn drains what is waiting, commits the store once (group commit), and only then
//! releases the replies and transmits the core produced.
//!
//! A commit that fails for lack of space puts the node in a disk-full state instead of
//! stopping it: the same batch is written again with backoff; meanwhile new work (submissions,
//! notifies, updates, creations) is refused with 503 and a Retry-After, while inbox reads,
//! metrics, read-only requests and acknowledgements go on. Nothing of the failed batch was
//! answered, so nothing accepted is lost and nothing is acknowledged before it is durable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_adapter::Transport;
use relay_core::store::InboxRecord;
use relay_core::{
    Now, Output, Relay, RelayStats, ReplyToken, Response, RoomError, SealedCommit, Status, Store,
    StoreError, TransmitId, TransportError, TransportKind,
};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::metrics::Stage;

/// Requests taken from the fair queue per wake-up of the core thread.
const INGRESS_BATCH: usize = 256;

/// Fanout bytes per inbox read (at least one record goes, however large): bounds what one read
/// copies from the store and holds until its answer is sent.
const INBOX_READ_BYTES: usize = 16 << 20;

/// Backoff of the write of a batch that failed for lack of space.
const FULL_RETRY_FIRST: Duration = Duration::from_millis(100);
const FULL_RETRY_MAX: Duration = Duration::from_secs(2);

/// What a local client's write is refused with while the store is out of space.
pub(crate) const STORAGE_FULL: &str = "storage full: try again later";

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
        /// When the API handed it over (for the `client_queue` stage).
        queued: Instant,
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
    /// A local client asks for the hub's published key: the encoded `FrankingAgentData`
    /// (signature key, credential `mimi://<domain>`); `None` without hub keys.
    HubKey {
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    /// A local client creates an MLS room hosted here.
    CreateMlsRoom {
        room: RoomId,
        group_info: Bytes,
        ratchet_tree: Bytes,
        reply: oneshot::Sender<Result<(), relay_core::MlsRoomError>>,
    },
    /// A local client reads the inbox after `after` (and so consumed everything up to it).
    /// Only durable records are shown: one shown and then lost in a crash would be delivered
    /// again.
    Inbox {
        after: u64,
        max: usize,
        /// `Err`: the store could not be read (logged); the reader tries again.
        reply: oneshot::Sender<Result<Vec<(u64, InboxRecord)>, ()>>,
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
    /// From the committer thread: batch `id` could not be written for lack of space; it will
    /// be tried again.
    StorageFull {
        id: u64,
        error: StoreError,
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
    /// A commit failed for lack of space and is being tried again: new work is refused.
    pub disk_full: bool,
    /// Where a message's time goes on this node (timed by the same thread).
    pub stages: crate::metrics::StageStats,
}

pub(crate) struct CoreLoop<S: Store> {
    pub relay: Relay,
    pub store: S,
    pub rx: Receiver<Event>,
    /// To feed outcomes back into ourselves (a transport missing for a route), and for the
    /// committer thread to report.
    pub tx: Sender<Event>,
    pub transports: Arc<Transports>,
    /// The offset below which inbox records are durable, for readers waiting on new ones.
    pub inbox_durable: watch::Sender<u64>,
    pub store_stats: StoreStats,
    /// Requests from peers, queued per peer (see `NodeInbound`).
    pub ingress: Arc<crate::ingress::Ingress>,
}

/// Something to hand out once the commit it depends on is durable.
enum Held {
    /// With the end of the turn that produced it (for the `commit` stage).
    Output(Output, Instant),
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
    /// The batch being written, with the inputs it covers and the inbox offset below which it
    /// makes every record durable.
    writing: Option<(u64, u64, u64)>,
    held: VecDeque<(u64, Held)>,
    inputs_in_open: u64,
    /// Stage timing: when each submission or peer request of this turn was taken.
    taken: Vec<Instant>,
    /// Stage timing: transmits handed to a transport and not answered yet (bounded).
    sent_at: HashMap<TransmitId, Instant>,
    /// Stage timing: (durable inbox offset, when readers were told), oldest first (bounded);
    /// records below `durable_floor` became durable before what is kept.
    durable_at: VecDeque<(u64, Instant)>,
    durable_floor: u64,
}

/// Transmits timed at once; past this, new ones go untimed (outcomes that never came must
/// not grow the map).
const TIMED_TRANSMITS: usize = 1 << 16;
/// Durable marks kept for timing inbox reads.
const TIMED_MARKS: usize = 4096;

impl Pipeline {
    /// The inbox's durable offset moved to `mark` now.
    fn durable_moved(&mut self, mark: u64, at: Instant) {
        if self.durable_at.len() == TIMED_MARKS
            && let Some((m, _)) = self.durable_at.pop_front()
        {
            self.durable_floor = m;
        }
        self.durable_at.push_back((mark, at));
    }

    /// A reader that consumed everything up to `after` no longer needs older marks.
    fn inbox_consumed(&mut self, after: u64) {
        while self.durable_at.front().is_some_and(|(m, _)| *m <= after) {
            if let Some((m, _)) = self.durable_at.pop_front() {
                self.durable_floor = m;
            }
        }
    }

    /// When the record at `offset` became durable, if still known.
    fn durable_since(&self, offset: u64) -> Option<Instant> {
        if offset < self.durable_floor {
            return None;
        }
        let i = self.durable_at.partition_point(|(m, _)| *m <= offset);
        self.durable_at.get(i).map(|(_, at)| *at)
    }
}

impl<S: Store> CoreLoop<S> {
    /// Runs until `Shutdown` or until every sender is gone. A store failure stops the node
    /// (what the core holds in memory is then ahead of the disk, and must not be
    /// acknowledged), unless it is for lack of space: see the module doc.
    pub fn run(mut self) -> Result<(), StoreError> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<(u64, SealedCommit)>();
        let report = self.tx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_committer = stop.clone();
        let committer = std::thread::Builder::new()
            .name("relay-commit".into())
            .spawn(move || commit_batches(job_rx, report, stop_committer))
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
            taken: Vec::new(),
            sent_at: HashMap::new(),
            durable_at: VecDeque::new(),
            durable_floor: self.relay.inbox_durable(),
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
                        let (inputs, inbox_mark) =
                            p.writing.take().map_or((0, 0), |(_, n, mark)| (n, mark));
                        match result {
                            Ok(()) => {
                                p.durable = id;
                                self.relay.handle_inbox_durable(inbox_mark);
                                self.store_stats.commits += 1;
                                self.store_stats.events += inputs;
                                self.store_stats.commit_time.record(took);
                                if self.store_stats.disk_full {
                                    self.store_stats.disk_full = false;
                                    warn!(
                                        batch = id,
                                        "store has space again: the pending \
                                        commit is written; taking new work"
                                    );
                                }
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    Event::StorageFull { id, error } => {
                        if !self.store_stats.disk_full {
                            self.store_stats.disk_full = true;
                            warn!(batch = id, error = %error,
                                source = %std::error::Error::source(&error)
                                    .map_or(String::new(), |s| s.to_string()),
                                "store out of space: new work is refused until a commit \
                                 succeeds (retrying with backoff); reads and \
                                 acknowledgements go on");
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
            let turn_end = Instant::now();
            while let Some(out) = self.relay.poll_output() {
                p.held.push_back((p.open, Held::Output(out, turn_end)));
            }
            for taken in p.taken.drain(..) {
                let d = turn_end.saturating_duration_since(taken);
                self.store_stats.stages.record(Stage::Core, d);
            }
            if p.writing.is_none() {
                match self.store.seal() {
                    Ok(Some(write)) => {
                        let inputs = std::mem::take(&mut p.inputs_in_open);
                        p.writing = Some((p.open, inputs, self.relay.inbox_next()));
                        if jobs.send((p.open, write)).is_err() {
                            break Err(StoreError::new("commit", CommitterGone));
                        }
                    }
                    // Nothing to write: everything applied so far is durable.
                    Ok(None) => {
                        p.durable = p.open;
                        let mark = self.relay.inbox_next();
                        self.relay.handle_inbox_durable(mark);
                    }
                    Err(e) => break Err(e),
                }
                p.open += 1;
            }
            self.release(&mut replies, &mut p);
            let durable = self.relay.inbox_durable();
            if self.inbox_durable.send_if_modified(|v| {
                let changed = *v != durable;
                *v = durable;
                changed
            }) {
                p.durable_moved(durable, Instant::now());
            }
            if stopping && p.writing.is_none() && p.held.is_empty() {
                break Ok(());
            }
            if stopping && self.store_stats.disk_full {
                // Waiting for space could take forever. What is not written was answered to
                // nobody: its senders try again.
                warn!(
                    unanswered = p.held.len(),
                    "stopping with the disk full: inputs since \
                    the last successful commit are dropped unanswered"
                );
                break Ok(());
            }
        };
        stop.store(true, Ordering::Release);
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
                let (mut batch, mut queued) = (Vec::new(), Vec::new());
                // A bounded helping per wake-up, so outcomes and local clients interleave.
                if self
                    .ingress
                    .pop_batch_timed(INGRESS_BATCH, &mut batch, &mut queued)
                {
                    let _ = self.tx.send(Event::Ingress);
                }
                for at in queued {
                    let d = now.mono.saturating_duration_since(at);
                    self.store_stats.stages.record(Stage::PeerQueue, d);
                    p.taken.push(now.mono);
                }
                for (req, reply) in batch {
                    if self.store_stats.disk_full
                        && let Some(refused) = self.relay.storage_full_refusal(req.endpoint)
                    {
                        let _ = reply.send(refused);
                        continue;
                    }
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
                if let Some(at) = p.sent_at.remove(&id) {
                    let d = now.mono.saturating_duration_since(at);
                    self.store_stats.stages.record(Stage::Transmit, d);
                }
                self.relay.handle_outcome(now, &mut self.store, id, outcome);
            }
            Event::Probe { peer, alive } => self.relay.handle_probe_outcome(now, &peer, alive),
            Event::Submit { reply, .. } if self.store_stats.disk_full => {
                let refused = self.relay.storage_full_refusal(Endpoint::SubmitMessage);
                let _ = reply.send(refused.unwrap_or_else(storage_full_response));
            }
            Event::Submit {
                room,
                body,
                reply,
                queued,
            } => {
                let d = now.mono.saturating_duration_since(queued);
                self.store_stats.stages.record(Stage::ClientQueue, d);
                p.taken.push(now.mono);
                let t = token(reply);
                self.relay
                    .handle_client_submit(now, &mut self.store, t, &room, body);
            }
            Event::CreateRoom { reply, .. } | Event::FollowRoom { reply, .. }
                if self.store_stats.disk_full =>
            {
                let _ = reply.send(Err(RoomError::StorageFull));
            }
            Event::CreateMlsRoom { reply, .. } if self.store_stats.disk_full => {
                let _ = reply.send(Err(relay_core::MlsRoomError::StorageFull));
            }
            Event::PublishKeyPackages { reply, .. } if self.store_stats.disk_full => {
                let _ = reply.send(Err(STORAGE_FULL));
            }
            Event::DirectoryEntry { reply, .. } if self.store_stats.disk_full => {
                let _ = reply.send(Err(STORAGE_FULL));
            }
            Event::ClientRequest {
                endpoint, reply, ..
            } if self.store_stats.disk_full
                && self.relay.storage_full_refusal(endpoint).is_some() =>
            {
                let _ = reply.send(storage_full_response());
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
                    now,
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
            Event::HubKey { reply } => {
                // Read only, nothing to make durable first.
                let local = format!("mimi://{}", self.relay.config().local);
                let data = self
                    .relay
                    .hub_signature_public_key()
                    .and_then(|pk| relay_mls::frank::franking_agent_data(&pk, &local));
                let _ = reply.send(data);
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
                // Only durable records, so the answer goes out now, disk full or not.
                let q = relay_core::InboxQuery {
                    after,
                    max,
                    max_bytes: INBOX_READ_BYTES,
                    durable_only: true,
                };
                let read = self
                    .relay
                    .handle_inbox_read(&mut self.store, after)
                    .and_then(|()| self.relay.read_inbox(&self.store, q));
                match read {
                    Ok(items) => {
                        p.inbox_consumed(after);
                        for (offset, _) in &items {
                            if let Some(at) = p.durable_since(*offset) {
                                let d = now.mono.saturating_duration_since(at);
                                self.store_stats.stages.record(Stage::Inbox, d);
                            }
                        }
                        let _ = reply.send(Ok(items));
                    }
                    Err(e) => {
                        error!(error = %e, source = ?std::error::Error::source(&e),
                            "cannot read the inbox from the store");
                        let _ = reply.send(Err(()));
                    }
                }
            }
            Event::Stats { reply } => {
                let _ = reply.send((self.relay.stats(), self.store_stats.clone()));
            }
            Event::Shutdown | Event::Committed { .. } | Event::StorageFull { .. } => {}
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
                Held::Room(reply, r) => {
                    let _ = reply.send(r);
                    continue;
                }
                Held::Send(f) => {
                    f();
                    continue;
                }
                Held::Output(out, made) => {
                    if !matches!(out, Output::Probe(_)) {
                        let d = made.elapsed();
                        self.store_stats.stages.record(Stage::Commit, d);
                    }
                    out
                }
            };
            match out {
                Output::Reply { token, response } => {
                    if let Some(r) = replies.remove(&token) {
                        // The asker may have gone (connection closed); nothing to do then.
                        let _ = r.send(response);
                    }
                }
                Output::Transmit(t) => match transports.and_then(|ts| ts.get(t.transport)) {
                    Some(tr) => {
                        if p.sent_at.len() < TIMED_TRANSMITS {
                            p.sent_at.insert(t.id, Instant::now());
                        }
                        tr.send(t)
                    }
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

/// The committer thread: writes sealed batches in order, each until it is written or fails
/// for another reason than a lack of space (or the node stops).
fn commit_batches(
    jobs: Receiver<(u64, SealedCommit)>,
    report: Sender<Event>,
    stop: Arc<AtomicBool>,
) {
    for (id, mut write) in jobs {
        let mut delay = FULL_RETRY_FIRST;
        loop {
            let started = Instant::now();
            let result = write();
            let took = started.elapsed();
            match result {
                Err(error) if error.is_storage_full() && !stop.load(Ordering::Acquire) => {
                    if report.send(Event::StorageFull { id, error }).is_err() {
                        return;
                    }
                    // Sleeps in slices, so a stopping node is not held up by the backoff.
                    let until = Instant::now() + delay;
                    while Instant::now() < until && !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    delay = (delay * 2).min(FULL_RETRY_MAX);
                }
                result => {
                    if report.send(Event::Committed { id, result, took }).is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// A local client's submission or request refused while the store is out of space.
fn storage_full_response() -> Response {
    let mut r = Response::error(Status::Unavailable, STORAGE_FULL);
    r.retry_after = Some(Duration::from_secs(5));
    r
}

/// The committer thread is gone (it only stops when the core loop drops its job queue).
#[derive(Debug, thiserror::Error)]
#[error("the committer thread stopped")]
struct CommitterGone;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use mimi_wire::uri::RoomId;
    use relay_core::store::{InboxRange, OwnedOp};
    use relay_core::{MemStore, RelayConfig, Request, Snapshot};

    use super::*;

    const ROOM: &str = "mimi://hub.example/r/lobby";

    /// A store whose commits fail as on a full disk while `full` is set; otherwise a
    /// [`MemStore`] (shared, so the test sees what was committed).
    struct FillableStore {
        committed: Arc<Mutex<MemStore>>,
        pending: Vec<OwnedOp>,
        full: Arc<AtomicBool>,
    }

    impl Store for FillableStore {
        fn load(&mut self) -> Result<Snapshot, StoreError> {
            self.committed.lock().expect("lock").load()
        }

        fn read_inbox(&self, range: InboxRange) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
            self.committed.lock().expect("lock").read_inbox(range)
        }

        fn count_inbox(
            &self,
            after: u64,
            upto: u64,
        ) -> Result<BTreeMap<ProviderDomain, u64>, StoreError> {
            self.committed
                .lock()
                .expect("lock")
                .count_inbox(after, upto)
        }

        fn apply(&mut self, op: relay_core::StoreOp<'_>) {
            self.pending.push(OwnedOp::from(op));
        }

        fn commit(&mut self) -> Result<(), StoreError> {
            match self.seal()? {
                Some(mut write) => write(),
                None => Ok(()),
            }
        }

        fn seal(&mut self) -> Result<Option<SealedCommit>, StoreError> {
            if self.pending.is_empty() {
                return Ok(None);
            }
            let batch = std::mem::take(&mut self.pending);
            let (committed, full) = (self.committed.clone(), self.full.clone());
            Ok(Some(Box::new(move || {
                if full.load(Ordering::Acquire) {
                    let enospc = std::io::Error::from(std::io::ErrorKind::StorageFull);
                    return Err(StoreError::storage_full("commit", enospc));
                }
                let mut m = committed.lock().expect("lock");
                for op in &batch {
                    m.apply(op.as_op());
                }
                m.commit()
            })))
        }
    }

    struct Harness {
        tx: Sender<Event>,
        ingress: Arc<crate::ingress::Ingress>,
        full: Arc<AtomicBool>,
        committed: Arc<Mutex<MemStore>>,
        core: std::thread::JoinHandle<Result<(), StoreError>>,
    }

    fn hub() -> ProviderDomain {
        "hub.example".parse().expect("domain")
    }

    /// A transport that answers every transmit at once with 201.
    struct Echo(Mutex<Sender<Event>>);

    impl relay_adapter::Transport for Echo {
        fn kind(&self) -> TransportKind {
            TransportKind::Quic
        }
        fn send(&self, t: relay_core::Transmit) {
            let outcome = Ok(Response::new(Status::Created, Bytes::new()));
            let _ = self
                .0
                .lock()
                .expect("lock")
                .send(Event::Outcome { id: t.id, outcome });
        }
        fn probe(&self, _: &ProviderDomain) {}
        fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
            Box::pin(async {})
        }
    }

    fn start() -> Harness {
        start_with(false)
    }

    fn start_with(echo: bool) -> Harness {
        let mut cfg = RelayConfig::new("me.example".parse().expect("domain"))
            .with_route(hub(), TransportKind::Quic);
        cfg.follows = vec![RoomId::parse(ROOM).expect("room")];
        let committed = Arc::new(Mutex::new(MemStore::new()));
        let full = Arc::new(AtomicBool::new(false));
        let store = FillableStore {
            committed: committed.clone(),
            pending: Vec::new(),
            full: full.clone(),
        };
        let relay = Relay::new(cfg, Snapshot::default(), now());
        let (tx, rx) = std::sync::mpsc::channel();
        let ingress = Arc::new(crate::ingress::Ingress::new(1 << 20, 1 << 24));
        let mut transports = Transports::default();
        if echo {
            let t: Arc<dyn relay_adapter::Transport> = Arc::new(Echo(Mutex::new(tx.clone())));
            transports.0.insert(TransportKind::Quic, t);
        }
        let core = CoreLoop {
            relay,
            store,
            rx,
            tx: tx.clone(),
            transports: Arc::new(transports),
            inbox_durable: watch::channel(0).0,
            store_stats: StoreStats::default(),
            ingress: ingress.clone(),
        };
        let core = std::thread::spawn(move || core.run());
        Harness {
            tx,
            ingress,
            full,
            committed,
            core,
        }
    }

    /// A FanoutMessage whose ciphertext is `n` repeated.
    fn fanout(n: u8) -> Bytes {
        let mut f = Vec::new();
        let mls = mimi_wire::mls::private_message(b"g", 1, &[n; 64]);
        mimi_wire::proto::encode_fanout_application(1_700_000_000_000, &mls, &mut f);
        Bytes::from(f)
    }

    impl Harness {
        fn notify(&self, seq: u64, n: u8) -> oneshot::Receiver<Response> {
            let (reply, rx) = oneshot::channel();
            let req = Request {
                from: hub(),
                transport: TransportKind::Quic,
                endpoint: Endpoint::Notify,
                target: ROOM.to_owned(),
                seq: Some(seq),
                lineage: None,
                body: fanout(n),
            };
            if self
                .ingress
                .push(2048, (req, reply))
                .map_err(|_| ())
                .expect("queued")
            {
                self.tx.send(Event::Ingress).expect("core running");
            }
            rx
        }

        fn stats(&self) -> (RelayStats, StoreStats) {
            let (reply, rx) = oneshot::channel();
            self.tx.send(Event::Stats { reply }).expect("core running");
            rx.blocking_recv().expect("stats")
        }

        /// The inbox as a reader gets it now: its records' ciphertext bytes.
        fn inbox(&self) -> Vec<u8> {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Event::Inbox {
                    after: 0,
                    max: 100,
                    reply,
                })
                .expect("core running");
            let items = rx.blocking_recv().expect("answer").expect("read");
            items
                .iter()
                .map(|(_, r)| r.fanout[r.fanout.len() - 2])
                .collect()
        }

        fn wait_disk_full(&self, want: bool) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.stats().1.disk_full != want {
                assert!(Instant::now() < deadline, "disk_full never became {want}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn a_full_store_refuses_new_work_serves_reads_and_recovers_losing_nothing() {
        // Before: the first commit that failed stopped the node.
        let h = start();
        let r = h.notify(1, 1).blocking_recv().expect("answer");
        assert_eq!(r.status, Status::Created);

        h.full.store(true, Ordering::Release);
        let mut held = h.notify(2, 2);
        h.wait_disk_full(true);
        // Not written, so not answered.
        assert!(matches!(
            held.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        // New work is refused at once, with a time to come back.
        let r = h.notify(3, 3).blocking_recv().expect("answer");
        assert_eq!(r.status, Status::Unavailable);
        assert!(r.retry_after.is_some());
        let (reply, rx) = oneshot::channel();
        h.tx.send(Event::Submit {
            room: ROOM.to_owned(),
            body: Bytes::from_static(b"x"),
            reply,
            queued: Instant::now(),
        })
        .expect("core running");
        assert_eq!(
            rx.blocking_recv().expect("answer").status,
            Status::Unavailable
        );
        // Reads go on, showing only what is durable; metrics say why.
        let fanout_tail = fanout(1)[fanout(1).len() - 2];
        assert_eq!(h.inbox(), [fanout_tail]);
        let (stats, store) = h.stats();
        let text = crate::metrics::render(&stats, &store);
        assert!(text.contains("\nmimi_relay_disk_full 1\n"), "{text}");
        assert!(text.contains("mimi_relay_rejects_total{reason=\"storage_full\"} 2"));

        // Space again: the same batch is written, then answered.
        h.full.store(false, Ordering::Release);
        let r = held.blocking_recv().expect("answered once written");
        assert_eq!((r.status, r.next_seq), (Status::Created, Some(3)));
        h.wait_disk_full(false);
        let r = h.notify(3, 3).blocking_recv().expect("answer");
        assert_eq!(r.status, Status::Created);
        assert_eq!(h.inbox().len(), 3);
        let committed = h.committed.lock().expect("lock").committed_inbox().len();
        assert_eq!(committed, 3, "each delivered once");

        h.tx.send(Event::Shutdown).expect("core running");
        h.core.join().expect("core thread").expect("clean stop");
    }

    #[test]
    fn the_stage_histograms_count_each_stage_of_a_message() {
        let h = start_with(true);
        let count = |h: &Harness, stage: Stage| h.stats().1.stages.of(stage).count;
        // A peer's /notify: queued, handled, its answer held for the commit.
        let r = h.notify(1, 1).blocking_recv().expect("answer");
        assert_eq!(r.status, Status::Created);
        assert_eq!(count(&h, Stage::PeerQueue), 1);
        assert_eq!(count(&h, Stage::Core), 1);
        assert!(count(&h, Stage::Commit) >= 1);
        assert_eq!(count(&h, Stage::Inbox), 0);
        // Its record, read once by a local client.
        assert_eq!(h.inbox().len(), 1);
        assert_eq!(count(&h, Stage::Inbox), 1);
        // A local client's submission: forwarded to the hub, whose answer times the transmit.
        let (reply, rx) = oneshot::channel();
        h.tx.send(Event::Submit {
            room: ROOM.to_owned(),
            body: Bytes::from_static(b"x"),
            reply,
            queued: Instant::now() - Duration::from_millis(30),
        })
        .expect("core running");
        rx.blocking_recv().expect("answer");
        let (_, store) = h.stats();
        let queue = store.stages.of(Stage::ClientQueue);
        assert_eq!(queue.count, 1);
        // Stamped 30 ms before it was sent: the wait counts from the stamp.
        assert!(queue.sum_ns >= 30_000_000, "{queue:?}");
        assert_eq!(store.stages.of(Stage::Core).count, 2);
        assert_eq!(store.stages.of(Stage::Transmit).count, 1);
        let text = crate::metrics::render(&RelayStats::default(), &store);
        assert!(
            text.contains("mimi_relay_stage_seconds_count{stage=\"transmit\"} 1\n"),
            "{text}"
        );
        h.tx.send(Event::Shutdown).expect("core running");
        h.core.join().expect("core thread").expect("clean stop");
    }

    #[test]
    fn a_node_stops_while_its_store_is_full() {
        let h = start();
        h.full.store(true, Ordering::Release);
        let held = h.notify(1, 1);
        h.wait_disk_full(true);
        h.tx.send(Event::Shutdown).expect("core running");
        h.core.join().expect("core thread").expect("clean stop");
        // Dropped unanswered: its sender retries; nothing of it was written.
        assert!(held.blocking_recv().is_err());
        assert!(
            h.committed
                .lock()
                .expect("lock")
                .committed_inbox()
                .is_empty()
        );
    }
}
