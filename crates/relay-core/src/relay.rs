//! The routing state machine: `handle_*` in, `poll_*` out, time and storage passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::mls::WireFormat;
use mimi_wire::proto::{
    Protocol, SubmitMessageResponse, SubmitMessageView, SubmitResponseCode, SubmitStatus,
    split_fanout_sequence,
};
use mimi_wire::uri::{ProviderDomain, RoomId};
use tracing::{debug, info, warn};

mod arena;
mod dead_letter;
mod dedupe;
mod follower;
mod forward;
mod hub;
mod hub_mls;
mod inbox;
mod lineage;
mod refusal;
mod services;
pub use dead_letter::DeadLetter;
pub use hub_mls::{MlsRoomError, RoomParticipant};
pub use inbox::InboxQuery;
pub use refusal::{Forbidden, Malformed, Refusal, UpdateNotAllowed};

use crate::config::RelayConfig;
use crate::rng::SplitMix64;
use crate::stats::{DeadCause, Histogram, PeerStats, RejectReason, RelayStats};
use crate::store::{InboxRecord, Snapshot, Store, StoreOp, SubmitSeen};
use crate::transport::{
    Lineage, Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use dedupe::{DedupeKey, SeenWindow};
use follower::Cursor;

/// The time an input happens at: a monotonic instant for timers, and the wall clock for the
/// hub's accepted timestamps (milliseconds since the UNIX epoch).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub unix_ms: u64,
}

/// Names one pending answer; chosen by the caller of `handle_request`/`handle_client_submit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyToken(pub u64);

/// What the core asks the node to do.
#[derive(Debug)]
pub enum Output {
    /// Hand this to the transport of `transmit.transport`.
    Transmit(Transmit),
    /// Check whether this peer is back.
    Probe(ProviderDomain),
    /// Answer a request or a local submission. The node sends it only after the store commit
    /// that follows the input which produced it.
    Reply {
        token: ReplyToken,
        response: Response,
    },
}

/// A room the core cannot create.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomError {
    #[error("room {room} is not hosted here: its hub is {hub}")]
    NotLocal { room: String, hub: String },
    #[error("no route to follower {0}: add it to the peers")]
    NoRoute(ProviderDomain),
    #[error("the hub {0} cannot be its own follower")]
    SelfFollower(ProviderDomain),
    #[error("room {0} is hosted here: a node follows only rooms hosted elsewhere")]
    HostedHere(String),
    #[error("the store is out of space: try again later")]
    StorageFull,
}

type QueueIdx = usize;
type PeerIdx = usize;
type RoomIdx = usize;

#[derive(Debug)]
enum Liveness {
    Up,
    Backoff { until: Instant },
    Down { next_probe: Instant, probing: bool },
}

#[derive(Debug)]
struct Peer {
    domain: ProviderDomain,
    kind: TransportKind,
    liveness: Liveness,
    failures: u32,
    queues: Vec<QueueIdx>,
    stats: PeerStats,
    /// Whether the peer answers `/notify` with `MIMI-Next-Seq` (`None`: it has not answered one
    /// yet). Unless it does, its queues run by the draft's rules alone: one event per request,
    /// one request in flight per room, no gap markers.
    seq_ext: Option<bool>,
    /// Dead letters ever written for this peer: numbers the next one, and picks its slot.
    dead_next: u64,
}

#[derive(Debug)]
struct Entry {
    fanout: Bytes,
    enqueued: Instant,
}

/// One ordered outbound queue per (room, destination).
#[derive(Debug)]
struct OutQueue {
    room: RoomId,
    dest: ProviderDomain,
    peer: PeerIdx,
    /// Unacknowledged entries; `entries[i].qseq == acked + 1 + i`.
    entries: VecDeque<Entry>,
    acked: u64,
    send_next: u64,
    /// Transmits of the current generation in flight.
    inflight: u32,
    /// Bumped on every rewind, so outcomes of transmits sent before it are not counted twice.
    generation: u64,
    in_ready: bool,
    /// Consecutive refusals by a peer that answered: backs off this queue alone, since the
    /// peer itself is alive.
    refusals: u32,
    held_until: Option<Instant>,
    /// Body bytes per transmit: the configured batch size, halved on each 413 from the peer.
    batch_bytes: usize,
    /// The follower must be told, before anything else, that events up to `acked` are gone
    /// for it (its backlog was dropped, or it lost what it had acknowledged): a gap marker,
    /// `/notify` with an empty body and `seq = acked + 1`.
    needs_skip: bool,
    /// Which hub start numbered which of the unacknowledged events.
    lineage: lineage::Ranges,
    /// Events up to this go one per transmit and one in flight: a batch (or a transmit behind
    /// others) was refused for good, and each event must get its own answer, so that only
    /// those the peer refuses become dead letters.
    isolate_until: u64,
    /// The event refused for good once already: a second refusal makes it a dead letter.
    refused_once: Option<u64>,
}

impl OutQueue {
    fn next_qseq(&self) -> u64 {
        self.acked + 1 + self.entries.len() as u64
    }
}

#[derive(Debug)]
struct HubRoom {
    id: RoomId,
    followers: Vec<(ProviderDomain, QueueIdx)>,
    next_seq: u64,
    last_ms: u64,
    seen: SeenWindow,
}

#[derive(Debug)]
enum InFlight {
    Notify {
        queue: QueueIdx,
        last: u64,
        /// FanoutMessages in the transmit.
        events: usize,
        generation: u64,
        deadline: Instant,
    },
    Forward {
        token: ReplyToken,
        deadline: Instant,
        /// A /keyMaterial claim the hub forwarded to this provider.
        key_material_of: Option<ProviderDomain>,
    },
    /// A local client's request forwarded to its room's hub through the room's ordered
    /// forward queue.
    RoomForward {
        token: ReplyToken,
        deadline: Instant,
        room: RoomId,
    },
}

/// Maps keyed by our own numbers (transmit ids) or by 128-bit content hashes, which need no
/// SipHash: a multiply spreads them well, at a fraction of the cost on the per-message path.
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MulHasher>>;

#[derive(Default)]
struct MulHasher(u64);

impl Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    // Strings (room and provider names) come here on every lookup: whole words, then the
    // tail in one more, with no copy per word.
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.write_u64(u64::from_le_bytes(b));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut b = [0u8; 8];
            b[..tail.len()].copy_from_slice(tail);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    // A string's terminator: one word, not the byte loop above.
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64 ^ (n >> 64) as u64);
    }
}

/// What an in-flight `/notify` carried.
#[derive(Debug, Clone, Copy)]
struct Sent {
    last: u64,
    events: usize,
    generation: u64,
}

/// The routing core of one relay node.
#[derive(Debug)]
pub struct Relay {
    cfg: RelayConfig,
    peers: Vec<Peer>,
    peer_by_domain: BTreeMap<ProviderDomain, PeerIdx>,
    /// The hub's side: rooms hosted here and their per-(room, destination) queues.
    hub: hub::HubState,
    inbox: inbox::Inbox,
    inflight: FastMap<TransmitId, InFlight>,
    deadlines: BTreeSet<(Instant, TransmitId)>,
    next_transmit: u64,
    outputs: VecDeque<Output>,
    /// Set by inputs that may have made queues ready; `poll_output` pumps.
    pump_due: Option<Now>,
    rng: SplitMix64,
    stats: RelayStats,
    latency: Histogram,
    mls: hub_mls::MlsState,
    services: services::Services,
    /// The follower's side: rooms followed, cursors, forwards to hubs.
    follower: follower::FollowerState,
    /// This start's incarnation: numbers the events queued from now on.
    incarnation: u64,
    /// Where accepted submissions' FanoutMessages are written.
    fanouts: arena::FanoutArena,
    /// What accepted submissions are remembered by.
    dedupe: DedupeKey,
}

/// Store record of a followed room: this byte, then the room id.
const REC_FOLLOW: u8 = 10;

/// FanoutMessage hashes a follower remembers per (hub, room); at most `u16::MAX + 1`, the
/// store's ring slots.
const RECENT_WINDOW: usize = 4096;
const _: () = assert!(RECENT_WINDOW <= 1 << 16);

impl Relay {
    /// Builds the core from its configuration and what the store kept.
    pub fn new(cfg: RelayConfig, snapshot: Snapshot, now: Now) -> Relay {
        let mut relay = Relay {
            rng: SplitMix64::new(cfg.seed),
            peers: Vec::new(),
            peer_by_domain: BTreeMap::new(),
            hub: hub::HubState::default(),
            inbox: inbox::Inbox::restore(&snapshot, now.unix_ms),
            inflight: FastMap::default(),
            deadlines: BTreeSet::new(),
            next_transmit: 1,
            outputs: VecDeque::new(),
            pump_due: None,
            stats: RelayStats::default(),
            latency: Histogram::default(),
            mls: hub_mls::MlsState::default(),
            services: services::Services::default(),
            follower: follower::FollowerState::default(),
            incarnation: lineage::draw(cfg.seed, now.unix_ms),
            fanouts: arena::FanoutArena::default(),
            dedupe: DedupeKey::restore(&snapshot.records),
            cfg,
        };
        for room in &relay.cfg.follows {
            relay.follower.followed.insert(room.clone());
        }
        for k in snapshot.records.keys() {
            if let Some((&REC_FOLLOW, room)) = k.split_first()
                && let Ok(room) = std::str::from_utf8(room)
                && let Ok(room) = room.parse::<RoomId>()
            {
                relay.follower.followed.insert(room);
            }
        }
        for (_, room) in snapshot.cursors.keys() {
            relay.follower.followed.insert(room.clone());
        }
        relay.restore_key_packages(&snapshot.records);
        relay.restore_services(&snapshot.records);
        for (domain, kind) in relay.cfg.routes.clone() {
            relay.add_peer(domain, kind);
        }
        for (k, v) in &snapshot.records {
            let (peer, restored) = if let Some(d) = dead_letter::parse(k, v) {
                (d.peer, Err(d.n))
            } else if let Some((peer, seq_ext)) = dead_letter::parse_mode(k, v) {
                (peer, Ok(seq_ext))
            } else {
                continue;
            };
            let Some(&p) = relay.peer_by_domain.get(&peer) else {
                continue;
            };
            let p = &mut relay.peers[p];
            match restored {
                Err(n) => p.dead_next = p.dead_next.max(n + 1),
                Ok(seq_ext) => p.seq_ext = Some(seq_ext),
            }
        }
        for (room, snap) in snapshot.rooms {
            let idx = relay.ensure_room(room.clone(), &snap.followers);
            let r = &mut relay.hub.rooms[idx];
            r.next_seq = snap.next_seq.max(1);
            r.last_ms = snap.last_ms;
            // What the store kept is at most one window: the next rotation forgets it all.
            for seen in &snap.seen {
                r.seen.restore(seen);
            }
        }
        for ((room, dest), acked) in &snapshot.acked {
            if let Some(q) = relay.queue_for(room, dest) {
                let q = &mut relay.hub.queues[q];
                q.acked = q.acked.max(*acked);
                q.send_next = q.acked + 1;
            }
        }
        for ((room, dest), entries) in snapshot.queues {
            let Some(qi) = relay.queue_for(&room, &dest) else {
                warn!(room = %room, dest = %dest, pending = entries.len(),
                      "stored events for a destination with no route: kept, not sent");
                continue;
            };
            let q = &mut relay.hub.queues[qi];
            for (qseq, fanout) in entries {
                if qseq != q.next_qseq() {
                    warn!(room = %room, dest = %dest, qseq, expected = q.next_qseq(),
                          "stored queue has a gap; resuming from the stored entry");
                    q.acked = qseq - 1;
                    q.entries.clear();
                }
                q.entries.push_back(Entry {
                    fanout,
                    enqueued: now.mono,
                });
            }
            q.send_next = q.acked + 1;
            relay.mark_ready(qi);
        }
        for ((hub, room), next) in snapshot.cursors {
            relay
                .follower
                .cursors
                .insert((hub.clone(), room.clone()), Cursor::new(hub, room, next));
        }
        for (k, v) in &snapshot.records {
            if let Some((room, dest, ranges)) = lineage::parse_queue_record(k, v) {
                if let Some(qi) = relay.queue_for(&room, &dest) {
                    relay.hub.queues[qi].lineage = ranges;
                }
            } else if let Some((hub, room, inc)) = lineage::parse_cursor_record(k, v)
                && let Some(c) = relay.follower.cursors.get_mut(&(hub.clone(), room.clone()))
            {
                c.inc = inc;
            }
        }
        // A cursor fed only without sequence numbers has hashes but no stored `next`.
        for ((hub, room), slots) in snapshot.recent {
            let key = (hub.clone(), room.clone());
            let cursor = relay
                .follower
                .cursors
                .entry(key)
                .or_insert_with(|| Cursor::new(hub, room, 1));
            let mut hashes: Vec<(u64, u128)> = slots.into_values().collect();
            hashes.sort_unstable();
            for (n, h) in hashes {
                cursor.recent.insert(h, ());
                cursor.recent_order.push_back(h);
                cursor.recent_n = n + 1;
            }
        }
        relay.pump(now);
        relay
    }

    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    fn add_peer(&mut self, domain: ProviderDomain, kind: TransportKind) -> PeerIdx {
        if let Some(&i) = self.peer_by_domain.get(&domain) {
            return i;
        }
        let i = self.peers.len();
        self.peers.push(Peer {
            domain: domain.clone(),
            kind,
            liveness: Liveness::Up,
            failures: 0,
            queues: Vec::new(),
            stats: PeerStats::default(),
            seq_ext: None,
            dead_next: 0,
        });
        self.peer_by_domain.insert(domain, i);
        i
    }

    fn queue_for(&self, room: &RoomId, dest: &ProviderDomain) -> Option<QueueIdx> {
        self.hub.queue_for(room, dest)
    }

    fn ensure_queue(&mut self, room: &RoomId, dest: &ProviderDomain) -> Option<QueueIdx> {
        if let Some(q) = self.queue_for(room, dest) {
            return Some(q);
        }
        let peer = *self.peer_by_domain.get(dest)?;
        let qi = self.hub.queues.len();
        self.hub.queues.push(OutQueue {
            room: room.clone(),
            dest: dest.clone(),
            peer,
            entries: VecDeque::new(),
            acked: 0,
            send_next: 1,
            inflight: 0,
            generation: 0,
            in_ready: false,
            refusals: 0,
            held_until: None,
            batch_bytes: self.cfg.max_batch_bytes,
            needs_skip: false,
            lineage: lineage::Ranges::default(),
            isolate_until: 0,
            refused_once: None,
        });
        self.hub
            .queue_by_key
            .insert((room.clone(), dest.clone()), qi);
        self.peers[peer].queues.push(qi);
        Some(qi)
    }

    fn ensure_room(&mut self, room: RoomId, followers: &[ProviderDomain]) -> RoomIdx {
        let mut list = Vec::new();
        for f in followers {
            match self.ensure_queue(&room, f) {
                Some(q) => list.push((f.clone(), q)),
                None => warn!(room = %room, follower = %f, "follower has no route; skipped"),
            }
        }
        if let Some(&i) = self.hub.room_by_id.get(&room) {
            self.hub.rooms[i].followers = list;
            return i;
        }
        let i = self.hub.rooms.len();
        self.hub.room_by_id.insert(room.clone(), i);
        self.hub.rooms.push(HubRoom {
            id: room,
            followers: list,
            next_seq: 1,
            last_ms: 0,
            seen: SeenWindow::default(),
        });
        i
    }

    /// Hosts `room` here as its hub, fanning out to `followers`. Idempotent; a second call
    /// replaces the follower list (queues of dropped followers still drain).
    pub fn handle_create_room<S: Store>(
        &mut self,
        store: &mut S,
        room: RoomId,
        followers: Vec<ProviderDomain>,
    ) -> Result<(), RoomError> {
        if room.domain() != self.cfg.local.as_str() {
            return Err(RoomError::NotLocal {
                room: room.as_str().to_owned(),
                hub: room.domain().to_owned(),
            });
        }
        for f in &followers {
            if *f == self.cfg.local {
                return Err(RoomError::SelfFollower(f.clone()));
            }
            if !self.peer_by_domain.contains_key(f) {
                return Err(RoomError::NoRoute(f.clone()));
            }
        }
        if let Some(&i) = self.hub.room_by_id.get(&room)
            && self.hub.rooms[i]
                .followers
                .iter()
                .map(|(f, _)| f)
                .eq(&followers)
        {
            // Nothing to store: a node restarting on a full disk re-creates its configured
            // rooms without writing.
            return Ok(());
        }
        store.apply(StoreOp::Room {
            room: &room,
            followers: &followers,
        });
        info!(room = %room, followers = followers.len(), "hosting room");
        self.ensure_room(room, &followers);
        Ok(())
    }

    /// Follows `room`, hosted elsewhere: its hub's `/notify`s are taken from now on. A
    /// provider front end calls this when one of its users joins a room by other means than
    /// this node sees (the node itself follows on a client's submission or a key claim).
    pub fn handle_follow_room<S: Store>(
        &mut self,
        store: &mut S,
        room: &RoomId,
    ) -> Result<(), RoomError> {
        if room.domain() == self.cfg.local.as_str() {
            return Err(RoomError::HostedHere(room.as_str().to_owned()));
        }
        self.follow(store, room);
        Ok(())
    }

    /// Marks `room` followed (a no-op for rooms hosted here and for ones followed already).
    pub(super) fn follow<S: Store>(&mut self, store: &mut S, room: &RoomId) {
        if self.follower.followed.contains(room) || self.hub.room_by_id.contains_key(room) {
            return;
        }
        if room.domain() == self.cfg.local.as_str() {
            return;
        }
        let mut key = vec![REC_FOLLOW];
        key.extend_from_slice(room.as_str().as_bytes());
        store.apply(StoreOp::Record {
            key: &key,
            value: Some(b""),
        });
        info!(room = room.as_str(), "following room");
        self.follower.followed.insert(room.clone());
    }

    /// Rooms followed here (hosted elsewhere), sorted.
    pub fn followed_rooms(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .follower
            .followed
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect();
        v.sort();
        v
    }

    /// A request from an authenticated peer.
    pub fn handle_request<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        token: ReplyToken,
        req: Request,
    ) {
        if let Some(&p) = self.peer_by_domain.get(&req.from) {
            self.peers[p].stats.requests_in += 1;
        }
        let response = if req.body.len() > self.cfg.limits.max_body {
            self.refuse(Refusal::TooLarge)
        } else {
            match req.endpoint {
                Endpoint::Notify => self.notify(now, store, &req),
                // A room's endpoints: the room id is parsed here, once.
                Endpoint::SubmitMessage | Endpoint::Update => match req.target.parse::<RoomId>() {
                    Err(_) => self.refuse(Refusal::Malformed(Malformed::NotARoomUri)),
                    Ok(room) if req.endpoint == Endpoint::SubmitMessage => {
                        let from = req.from.clone();
                        self.submit(now, store, &from, &room, &req.body)
                    }
                    Ok(room) => {
                        let from = req.from.clone();
                        self.update(now, store, &from, room.as_str(), &req.body)
                    }
                },
                Endpoint::KeyMaterial => {
                    let from = req.from.clone();
                    match self.key_material(now, store, token, &from, &req.target, &req.body) {
                        Some(r) => r,
                        None => {
                            // Forwarded: answered when the provider answers.
                            self.pump(now);
                            return;
                        }
                    }
                }
                endpoint => {
                    let from = req.from.clone();
                    match self.service_request(now, store, &from, endpoint, &req.target, &req.body)
                    {
                        Some(r) => r,
                        None => self.refuse(Refusal::EndpointNotServed),
                    }
                }
            }
        };
        self.outputs.push_back(Output::Reply { token, response });
        self.pump(now);
    }

    /// A submission from one of this provider's own clients: accepted here when we host the
    /// room, else forwarded to the room's hub and answered with the hub's answer.
    pub fn handle_client_submit<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        token: ReplyToken,
        room: &str,
        body: Bytes,
    ) {
        // A room hosted here is found by its text: no parse, no allocation per message.
        if let Some(ri) = self.hub.hosted(room) {
            let response = self.submit_in(now, store, None, ri, &body);
            self.outputs.push_back(Output::Reply { token, response });
            self.pump(now);
            return;
        }
        let Ok(room) = room.parse::<RoomId>() else {
            let response = self.refuse(Refusal::Malformed(Malformed::NotARoomUri));
            self.outputs.push_back(Output::Reply { token, response });
            return;
        };
        if self.hub.room_by_id.contains_key(&room) {
            let local = self.cfg.local.clone();
            let response = self.submit(now, store, &local, &room, &body);
            self.outputs.push_back(Output::Reply { token, response });
            self.pump(now);
            return;
        }
        let peer = room
            .domain()
            .parse::<ProviderDomain>()
            .ok()
            .and_then(|d| self.peer_by_domain.get(&d));
        let Some(&peer) = peer else {
            let response = if room.domain() == self.cfg.local.as_str() {
                self.refuse(Refusal::UnknownRoom)
            } else {
                self.refuse(Refusal::NoRouteToHub)
            };
            self.outputs.push_back(Output::Reply { token, response });
            return;
        };
        // A local client sends into the room: its events are wanted here.
        self.follow(store, &room);
        if let Some(response) =
            self.forward_in_room(now, token, peer, Endpoint::SubmitMessage, &room, body)
        {
            self.outputs.push_back(Output::Reply { token, response });
        }
    }

    fn next_id(&mut self) -> TransmitId {
        let id = TransmitId(self.next_transmit);
        self.next_transmit += 1;
        id
    }

    /// The answer to a request while the store is out of space, if it is one that would
    /// store something new (a submission, a `/notify`, an update, a key claim, consent, an
    /// abuse report): 503 with a Retry-After, nothing taken. `None` for a request that only
    /// reads (`/groupInfo`, `/identifierQuery`, a download), which is served as usual.
    /// Acknowledgements of our own transmits and inbox reads are not requests: they go on.
    pub fn storage_full_refusal(&mut self, endpoint: Endpoint) -> Option<Response> {
        match endpoint {
            Endpoint::GroupInfo | Endpoint::IdentifierQuery | Endpoint::ProxyDownload => None,
            _ => Some(self.refuse(Refusal::StorageFull)),
        }
    }

    /// The hub's side of /submitMessage (from a follower, or from a local client).
    fn submit<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        sender: &ProviderDomain,
        room: &RoomId,
        body: &Bytes,
    ) -> Response {
        let Some(&ri) = self.hub.room_by_id.get(room) else {
            return self.refuse(Refusal::UnknownRoom);
        };
        let sender = (*sender != self.cfg.local).then_some(sender);
        self.submit_in(now, store, sender, ri, body)
    }

    /// [`Self::submit`] to hosted room `ri`, from `sender` (`None`: this provider, for one
    /// of its own clients; no clone of its name per message).
    fn submit_in<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        sender: Option<&ProviderDomain>,
        ri: RoomIdx,
        body: &Bytes,
    ) -> Response {
        // The key first, and the window's lines asked for at once: their misses overlap the
        // parse and checks below instead of stalling the lookup after them.
        let key = self.dedupe.of(body);
        self.hub.rooms[ri].seen.touch(key);
        let view = match SubmitMessageView::parse(body) {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "malformed SubmitMessageRequest");
                return self.refuse(Refusal::Malformed(Malformed::SubmitMessageRequest));
            }
        };
        // The sending user must belong to the provider that authenticated the request.
        if !uri_in_domain(view.sending_uri, sender.unwrap_or(&self.cfg.local).as_str()) {
            return self.refuse(Refusal::Forbidden(Forbidden::SenderNotOfProvider));
        }
        let r = &self.hub.rooms[ri];
        let is_member = sender.is_none_or(|s| r.followers.iter().any(|(f, _)| f == s));
        if !is_member || view.app_message.wire_format != WireFormat::PrivateMessage {
            return self.refuse(Refusal::SubmitNotAllowed);
        }
        if !self.mls.rooms.is_empty()
            && let room = self.hub.rooms[ri].id.clone()
            && let Some(refused) =
                self.check_mls_submit(room.as_str(), view.sending_uri, view.app_message.epoch)
        {
            return refused;
        }
        let r = &self.hub.rooms[ri];
        if let Some(seen) = r.seen.get(&key) {
            self.stats.dedupe_hits += 1;
            debug!(msg = %MsgId::of(view.app_message.bytes), room = %r.id, seq = seen.room_seq, "duplicate submission");
            // Franks are deterministic: the same one again.
            let frank = self.frank_submission(r.id.as_str(), &view, seen.accepted_ms);
            return submit_answer(&SubmitMessageResponse::accepted_franked(
                seen.accepted_ms,
                frank,
            ));
        }
        // A follower whose queue is full lags: its backlog is dropped for a gap marker, and the
        // room goes on for everyone else (one stalled follower must not halt a room).
        self.drop_lagging(now, store, ri);
        // Every accepted message reaches the hub's own inbox too (§5.5: all local clients
        // that are members, the sender's other clients among them).
        if let Some(refused) = self.inbox_refusal(self.inbox.count(&self.cfg.local)) {
            return refused;
        }

        let accepted_ms = now.unix_ms.max(self.hub.rooms[ri].last_ms);
        // §5.4.1.2: franked beside the MLS bytes, which stay as the sender made them.
        let frank = self.frank_submission(self.hub.rooms[ri].id.as_str(), &view, accepted_ms);
        if frank.is_some() {
            self.stats.franks_issued += 1;
        }
        let r = &mut self.hub.rooms[ri];
        let room_seq = r.next_seq;
        r.next_seq += 1;
        r.last_ms = accepted_ms;
        let fanout =
            self.fanouts
                .application(ri, accepted_ms, view.app_message.bytes, frank.as_ref());
        let seen = SubmitSeen {
            key,
            room_seq,
            accepted_ms,
        };
        let forgotten = r.seen.insert(seen, self.cfg.submit_window);
        self.dedupe.save(store);
        store.apply(StoreOp::RoomSeq {
            room: &r.id,
            next_seq: r.next_seq,
            last_ms: accepted_ms,
        });
        store.apply(StoreOp::SubmitSeen {
            room: &r.id,
            seen: &seen,
        });
        if let Some(upto_seq) = forgotten {
            store.apply(StoreOp::SubmitForget {
                room: &r.id,
                upto_seq,
            });
        }
        debug!(msg = %MsgId::of(view.app_message.bytes), room = %r.id, seq = room_seq,
            from = %sender.unwrap_or(&self.cfg.local), "accepted");
        self.stats.accepted += 1;

        // §5.5: to every participating provider, the submitter's included (its other
        // clients, and the sender itself, learn the hub's order from it).
        for i in 0..self.hub.rooms[ri].followers.len() {
            let (_, qi) = self.hub.rooms[ri].followers[i];
            let q = &mut self.hub.queues[qi];
            let qseq = q.next_qseq();
            store.apply(StoreOp::Enqueue {
                room: &q.room,
                dest: &q.dest,
                qseq,
                fanout: &fanout,
            });
            if q.lineage.note(qseq, self.incarnation) {
                save_lineage(store, q);
            }
            q.entries.push_back(Entry {
                fanout: fanout.clone(),
                enqueued: now.mono,
            });
            self.mark_ready(qi);
        }
        let record = InboxRecord {
            room: self.hub.rooms[ri].id.clone(),
            from: self.cfg.local.clone(),
            accepted_ms,
            fanout,
        };
        self.deliver_local(store, record);
        submit_answer(&SubmitMessageResponse::accepted_franked(accepted_ms, frank))
    }

    /// Drops the backlog of every follower of room `ri` whose queue holds `max_queue` events:
    /// it is marked lagging and will be sent a gap marker before new events.
    pub(super) fn drop_lagging<S: Store>(&mut self, now: Now, store: &mut S, ri: RoomIdx) {
        let max_queue = self.cfg.max_queue;
        for i in 0..self.hub.rooms[ri].followers.len() {
            let qi = self.hub.rooms[ri].followers[i].1;
            if self.hub.queues[qi].entries.len() < max_queue {
                continue;
            }
            let q = &mut self.hub.queues[qi];
            let dropped = q.entries.len() as u64;
            let upto = q.next_qseq() - 1;
            q.entries.clear();
            q.acked = upto;
            q.send_next = upto + 1;
            q.inflight = 0;
            q.generation += 1;
            q.needs_skip = true;
            store.apply(StoreOp::Ack {
                room: &q.room,
                dest: &q.dest,
                upto,
            });
            tracing::error!(room = %q.room, peer = %q.dest, dropped, max_queue,
                "follower lagging: its queue is full; backlog dropped, it will be sent a gap \
                 marker and must resynchronise its clients");
            self.stats.lagging += 1;
            self.stats.lag_dropped += dropped;
            self.mark_ready(qi);
        }
        self.pump(now);
    }

    /// The follower's side of /notify.
    fn notify<S: Store>(&mut self, _now: Now, store: &mut S, req: &Request) -> Response {
        let room = match req.target.parse::<RoomId>() {
            Ok(r) => r,
            Err(_) => {
                return self.refuse(Refusal::Malformed(Malformed::NotARoomUri));
            }
        };
        // Only a room's hub orders and fans out its events.
        if room.domain() != req.from.as_str() {
            return self.refuse(Refusal::Forbidden(Forbidden::NotTheHub));
        }
        // Nor does a hub get to make us keep state for rooms nobody here takes part in.
        if !self.follower.followed.contains(&room) {
            return self.refuse(Refusal::RoomNotFollowed);
        }
        if req.body.is_empty()
            && let Some(seq) = req.seq
        {
            return self.skip_marker(store, &room, req, seq);
        }
        if let Some(refused) = self.inbox_refusal(self.inbox.count(&req.from)) {
            return refused;
        }
        let fanouts = match split_fanout_sequence(&req.body, &self.cfg.limits) {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "malformed /notify body");
                return self.refuse(Refusal::Malformed(Malformed::FanoutSequence));
            }
        };
        if fanouts.is_empty() {
            return self.refuse(Refusal::Malformed(Malformed::EmptyNotify));
        }
        let key = (req.from.clone(), room.clone());
        let cursor = self
            .follower
            .cursors
            .entry(key)
            .or_insert_with(|| Cursor::new(req.from.clone(), room.clone(), 1));
        let base = req.body.as_ptr() as usize;
        let mut fresh = Vec::with_capacity(fanouts.len());
        let mut duplicates = 0u64;
        match req.seq {
            Some(first) => {
                if first > cursor.next {
                    let (next, inc) = (cursor.next, cursor.inc);
                    return self.refuse(Refusal::SequenceGap { next, inc });
                }
                // With incarnations on both sides the numbers are exact: a batch under the
                // incarnation of our last event repeats what we hold below `next`, and one that
                // starts at `next` must follow that event. Anything else is a hub whose
                // numbering is not ours (it restarted from nothing or from a backup): our
                // cursor goes back to it, and it renumbers.
                let known = req.lineage.filter(|l| l.batch != 0 && cursor.inc != 0);
                if let Some(l) = known {
                    let follows = if first == cursor.next {
                        l.prev == cursor.inc || l.batch == cursor.inc
                    } else {
                        l.batch == cursor.inc
                    };
                    if !follows {
                        let (next, inc) = (cursor.next, cursor.inc);
                        debug!(room = %room, hub = %req.from, first, next,
                            "numbering from another hub incarnation: answering our cursor");
                        self.stats.lineage_mismatches += 1;
                        return self.refuse(Refusal::OtherIncarnation { next, inc });
                    }
                }
                // Numbers already seen are duplicates, unless the bytes say otherwise: a number
                // within the window of recent hashes whose bytes are not among them was reused
                // by a hub that lost or restored its store, so it is a new event.
                let recent_from = if known.is_some() {
                    cursor.next
                } else {
                    cursor.next.saturating_sub(cursor.recent_order.len() as u64)
                };
                let mut reused = 0u64;
                for (i, f) in fanouts.iter().enumerate() {
                    let seq = first + i as u64;
                    let h = xxh3_128(f.bytes);
                    if cursor.recent.contains_key(&h) || (seq < cursor.next && seq < recent_from) {
                        duplicates += 1;
                        continue;
                    }
                    if seq < cursor.next {
                        reused += 1;
                    }
                    cursor.remember(store, h);
                    debug!(msg = %MsgId::of(f.message.bytes), room = %room, "delivered");
                    fresh.push((f.bytes.as_ptr() as usize - base, f.bytes.len(), f.timestamp));
                }
                if reused > 0 {
                    warn!(room = %room, hub = %req.from, reused, first,
                        "hub reused sequence numbers with other bytes (restored from a backup?): \
                         delivered by content");
                    self.stats.reused_seq += reused;
                }
                let end = first + fanouts.len() as u64;
                if end > cursor.next {
                    cursor.next = end;
                    let inc = req.lineage.map_or(0, |l| l.batch);
                    if inc != cursor.inc {
                        cursor.inc = inc;
                        save_cursor_inc(store, cursor);
                    }
                }
            }
            None => {
                // The draft's rule without our sequence header: the same bytes from the same
                // hub are a duplicate.
                for f in &fanouts {
                    let h = xxh3_128(f.bytes);
                    if cursor.recent.contains_key(&h) {
                        duplicates += 1;
                        continue;
                    }
                    cursor.remember(store, h);
                    debug!(msg = %MsgId::of(f.message.bytes), room = %room, "delivered");
                    fresh.push((f.bytes.as_ptr() as usize - base, f.bytes.len(), f.timestamp));
                }
            }
        }
        let (next, next_inc) = (cursor.next, cursor.inc);
        if req.seq.is_some() {
            store.apply(StoreOp::Cursor {
                hub: &cursor.hub,
                room: &cursor.room,
                next,
            });
        }
        self.stats.dedupe_hits += duplicates;
        if let Some(&p) = self.peer_by_domain.get(&req.from) {
            self.peers[p].stats.msgs_in += fresh.len() as u64;
        }
        for (start, len, ts) in fresh {
            let record = InboxRecord {
                room: room.clone(),
                from: req.from.clone(),
                accepted_ms: ts,
                fanout: req.body.slice(start..start + len),
            };
            self.deliver_local(store, record);
        }
        let mut response = Response::new(Status::Created, Bytes::new());
        if req.seq.is_some() {
            response.next_seq = Some(next);
            response.next_inc = Some(next_inc);
        }
        response
    }

    /// A gap marker from the room's hub: every event before `seq` is gone for us (we lagged
    /// and the hub dropped our backlog, or we lost our store). Move on and say so loudly: our
    /// clients must resynchronise the room (an external join).
    fn skip_marker<S: Store>(
        &mut self,
        store: &mut S,
        room: &RoomId,
        req: &Request,
        seq: u64,
    ) -> Response {
        let key = (req.from.clone(), room.clone());
        let cursor = self
            .follower
            .cursors
            .entry(key)
            .or_insert_with(|| Cursor::new(req.from.clone(), room.clone(), 1));
        if seq > cursor.next {
            let missed = seq - cursor.next;
            tracing::error!(room = %room, hub = %req.from, missed, from = cursor.next,
                "hub reports a gap: events it could not deliver to us; the room's clients here \
                 must resynchronise");
            cursor.next = seq;
            self.stats.gaps += 1;
            self.stats.gap_events += missed;
            store.apply(StoreOp::Cursor {
                hub: &cursor.hub,
                room: &cursor.room,
                next: seq,
            });
            // The hub vouches for the numbering before the gap.
            let inc = req.lineage.map_or(0, |l| l.prev);
            if inc != cursor.inc {
                cursor.inc = inc;
                save_cursor_inc(store, cursor);
            }
        }
        let mut response = Response::new(Status::Created, Bytes::new());
        response.next_seq = Some(cursor.next);
        response.next_inc = Some(cursor.inc);
        response
    }

    /// The outcome of a transmit, as reported by its transport.
    pub fn handle_outcome<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        id: TransmitId,
        outcome: Result<Response, TransportError>,
    ) {
        let Some(flight) = self.inflight.remove(&id) else {
            debug!(id = id.0, "outcome for a transmit that already timed out");
            return;
        };
        match flight {
            InFlight::Forward {
                token,
                deadline,
                key_material_of,
            } => {
                self.deadlines.remove(&(deadline, id));
                if let (Some(p), Ok(r)) = (&key_material_of, &outcome) {
                    self.remember_key_material(store, p, r);
                }
                let response = forward_answer(outcome);
                self.outputs.push_back(Output::Reply { token, response });
            }
            InFlight::RoomForward {
                token,
                deadline,
                room,
            } => {
                self.deadlines.remove(&(deadline, id));
                let response = forward_answer(outcome);
                self.outputs.push_back(Output::Reply { token, response });
                self.forward_done(now, &room);
            }
            InFlight::Notify {
                queue,
                last,
                events,
                generation,
                deadline,
            } => {
                self.deadlines.remove(&(deadline, id));
                let sent = Sent {
                    last,
                    events,
                    generation,
                };
                self.notify_outcome(now, store, queue, sent, outcome);
            }
        }
        self.pump(now);
    }

    fn notify_outcome<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        qi: QueueIdx,
        sent: Sent,
        outcome: Result<Response, TransportError>,
    ) {
        let Sent {
            last,
            events,
            generation,
        } = sent;
        let current = self.hub.queues[qi].generation == generation;
        if current {
            self.hub.queues[qi].inflight = self.hub.queues[qi].inflight.saturating_sub(1);
        }
        // Every /notify carries our sequence number: a peer that takes events without answering
        // one does not speak the extension, and one that answers with it does.
        let peer = self.hub.queues[qi].peer;
        if let Ok(resp) = &outcome {
            if resp.next_seq.is_some() {
                self.set_seq_ext(store, peer, true);
            } else if resp.status.is_success() && events > 0 {
                self.set_seq_ext(store, peer, false);
            }
        }
        let draft = self.peers[peer].seq_ext == Some(false);
        let final_refusal = match &outcome {
            Ok(r) if r.status == Status::TooLarge => events <= 1,
            // Without the extension a 409 cannot mean a sequence gap, and nothing in the
            // draft says what else: the peer will answer the same again.
            Ok(r) if r.status == Status::OutOfOrder => draft && r.next_seq.is_none(),
            Ok(r) => r.status.is_final_refusal(),
            Err(TransportError::Unsupported { .. }) => true,
            Err(_) => false,
        };
        let diverged = match &outcome {
            Ok(resp) if resp.status.is_success() || resp.status == Status::OutOfOrder => resp
                .next_seq
                .and_then(|next| self.diverged(qi, next, resp.next_inc)),
            _ => None,
        };
        match outcome {
            _ if final_refusal => {
                let cause = match &outcome {
                    Ok(r) => DeadCause::Status(r.status.http_code()),
                    Err(_) => DeadCause::Unsupported,
                };
                let reason = match &outcome {
                    Ok(r) => String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned(),
                    Err(e) => e.to_string(),
                };
                if current {
                    self.refused_for_good(now, store, qi, sent, cause, &reason);
                }
            }
            Ok(resp) if diverged.is_some() => {
                // The follower's numbers below `next` are not this hub's: keep what both hold,
                // and number the rest after the follower's cursor.
                let keep_upto = diverged.unwrap_or(0);
                let next = resp.next_seq.unwrap_or(1);
                self.hub.queues[qi].refusals = 0;
                self.ack(now, store, qi, keep_upto);
                self.renumber_from(store, qi, next, resp.next_inc.unwrap_or(0));
                self.peer_alive(self.hub.queues[qi].peer, now);
            }
            Ok(resp)
                if resp.status.is_success()
                    && resp
                        .next_seq
                        .is_some_and(|n| n > self.hub.queues[qi].next_qseq()) =>
            {
                // Never acknowledge what was not assigned: that would drop pending events.
                let next = resp.next_seq.unwrap_or(1);
                self.hub.queues[qi].refusals = 0;
                self.renumber_from(store, qi, next, resp.next_inc.unwrap_or(0));
                self.peer_alive(self.hub.queues[qi].peer, now);
            }
            Ok(resp) if resp.status.is_success() => {
                let upto = resp.next_seq.map_or(last, |n| n.saturating_sub(1));
                self.hub.queues[qi].refusals = 0;
                if events == 0 && current {
                    self.hub.queues[qi].needs_skip = false;
                    self.mark_ready(qi);
                }
                self.ack(now, store, qi, upto);
                self.peer_alive(self.hub.queues[qi].peer, now);
            }
            Ok(resp)
                if resp.status == Status::OutOfOrder
                    && resp.next_seq.is_some_and(|n| n > self.hub.queues[qi].acked) =>
            {
                let next = resp.next_seq.unwrap_or(1);
                self.ack(now, store, qi, next.saturating_sub(1));
                if current {
                    self.rewind(qi, next);
                }
            }
            Ok(resp) if resp.status == Status::OutOfOrder => {
                // The follower expects events we no longer hold: it lost its store, or we
                // dropped its backlog while it lagged. Tell it the gap and go on from here.
                let q = &mut self.hub.queues[qi];
                if !q.needs_skip {
                    tracing::error!(room = %q.room, peer = %q.dest, expected = ?resp.next_seq,
                        acknowledged = q.acked,
                        "follower expects events this hub no longer holds (it lost its store?); \
                         sending it a gap marker");
                    self.stats.resyncs += 1;
                }
                self.stats.rejects[RejectReason::OutOfOrder as usize] += 1;
                if current {
                    self.hub.queues[qi].needs_skip = true;
                    let from = self.hub.queues[qi].acked + 1;
                    self.rewind(qi, from);
                }
            }
            Ok(resp) if resp.status == Status::TooLarge && events > 1 => {
                // The follower's body limit is below our batch size: halve the batches to it
                // and go on at once. (One event over its limit is refused like any other.)
                let q = &mut self.hub.queues[qi];
                q.batch_bytes = (q.batch_bytes / 2).max(1);
                debug!(room = %q.room, dest = %q.dest, batch_bytes = q.batch_bytes, "batch too large for the follower; smaller batches");
                if current {
                    let from = self.hub.queues[qi].acked + 1;
                    self.rewind(qi, from);
                }
            }
            Ok(resp) if resp.status != Status::Unavailable => {
                let q = &self.hub.queues[qi];
                warn!(room = %q.room, dest = %q.dest, status = resp.status.http_code(),
                    reason = %String::from_utf8_lossy(&resp.body), "notify refused; will retry");
                if current {
                    self.refused(qi, now);
                }
            }
            other => {
                if let Err(e) = &other {
                    let q = &self.hub.queues[qi];
                    debug!(room = %q.room, dest = %q.dest, error = %e, "notify failed");
                }
                if current {
                    let from = self.hub.queues[qi].acked + 1;
                    self.rewind(qi, from);
                    self.peer_failed(self.hub.queues[qi].peer, now);
                    // A busy peer's Retry-After: this queue waits at least that long, whatever
                    // the peer's backoff or a probe says.
                    if let Some(after) = other.ok().and_then(|r| r.retry_after) {
                        self.hold(qi, now.mono + after);
                    }
                }
            }
        }
    }

    /// The peer refused a transmit for good. A single event at the head of the queue refused
    /// twice in a row becomes a dead letter and the queue moves on past it (telling a follower
    /// that speaks our extension of the gap); anything else (a batch, or a transmit behind
    /// others still unanswered) is sent again one event at a time, so that each gets its own
    /// answer. The second try, after the refusal backoff, is for a refusal that came from a
    /// stale directory (the HTTPS adapter reads it again after a 404) or a peer mid-restart.
    fn refused_for_good<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        qi: QueueIdx,
        sent: Sent,
        cause: DeadCause,
        reason: &str,
    ) {
        let q = &mut self.hub.queues[qi];
        q.refusals = 0;
        if sent.events == 0 {
            // A gap marker the peer will not take: it keeps its cursor; nothing else to do.
            warn!(room = %q.room, peer = %q.dest, status = %cause.label(), reason,
                "peer refused a gap marker; going on without it");
            q.needs_skip = false;
            self.mark_ready(qi);
            return;
        }
        let first = sent.last + 1 - sent.events as u64;
        if sent.events > 1 || first != q.acked + 1 {
            q.isolate_until = q.isolate_until.max(sent.last);
            let from = q.acked + 1;
            self.rewind(qi, from);
            return;
        }
        if q.refused_once != Some(first) {
            q.refused_once = Some(first);
            self.refused(qi, now);
            return;
        }
        q.refused_once = None;
        let Some(entry) = q.entries.pop_front() else {
            return;
        };
        q.acked = first;
        q.send_next = q.send_next.max(first + 1);
        store.apply(StoreOp::Ack {
            room: &q.room,
            dest: &q.dest,
            upto: first,
        });
        if q.lineage.trim(first) {
            save_lineage(store, q);
        }
        let peer = &mut self.peers[q.peer];
        let max = self.cfg.max_dead_letters_per_peer.max(1) as u64;
        let n = peer.dead_next;
        peer.dead_next += 1;
        if n >= max {
            peer.stats.dead_letters_dropped += 1;
        }
        *peer.stats.dead_letters.entry(cause).or_default() += 1;
        store.apply(StoreOp::Record {
            key: &dead_letter::key(&q.dest, (n % max) as u32),
            value: Some(&dead_letter::value(
                n,
                cause,
                now.unix_ms,
                &q.room,
                &entry.fanout,
            )),
        });
        warn!(room = %q.room, peer = %q.dest, status = %cause.label(), reason, qseq = first,
            "peer refused an event for good: moved to the dead letters, the queue goes on");
        // A follower with a cursor must be told to move past it, or it would wait for it.
        if peer.seq_ext != Some(false) && cause != DeadCause::Unsupported {
            q.needs_skip = true;
        }
        let from = q.acked + 1;
        self.rewind(qi, from);
    }

    /// Records whether `p` speaks our sequence extension, logging each change once. Kept in
    /// the store, so that after a restart a draft-mode peer is sent the same bodies as before.
    fn set_seq_ext<S: Store>(&mut self, store: &mut S, p: PeerIdx, seq_ext: bool) {
        let peer = &mut self.peers[p];
        let was = peer.seq_ext.replace(seq_ext);
        if was == Some(seq_ext) {
            return;
        }
        store.apply(StoreOp::Record {
            key: &dead_letter::mode_key(&peer.domain),
            value: Some(&[dead_letter::mode_value(seq_ext)]),
        });
        match (was, seq_ext) {
            (_, false) => warn!(peer = %peer.domain,
                "peer answers /notify without MIMI-Next-Seq: draft mode (one event per /notify, \
                 one in flight per room, no gap markers)"),
            (Some(false), true) => info!(peer = %peer.domain,
                "peer answers with MIMI-Next-Seq again: sequence mode"),
            (_, true) => debug!(peer = %peer.domain, "peer speaks the sequence extension"),
        }
    }

    /// A peer that answered refused this queue's events: rewind and hold the queue alone.
    fn refused(&mut self, qi: QueueIdx, now: Now) {
        let from = self.hub.queues[qi].acked + 1;
        self.rewind(qi, from);
        let jitter = self.rng.unit();
        let policy = &self.cfg.retry;
        let q = &mut self.hub.queues[qi];
        q.refusals += 1;
        let delay = policy
            .backoff(q.refusals)
            .mul_f64(1.0 - policy.jitter / 2.0 + policy.jitter * jitter);
        self.hold(qi, now.mono + delay);
    }

    /// Sends nothing more from this queue before `until` (a later hold already set stands).
    fn hold(&mut self, qi: QueueIdx, until: Instant) {
        self.hub.hold(qi, until);
    }

    fn ack<S: Store>(&mut self, now: Now, store: &mut S, qi: QueueIdx, upto: u64) {
        let q = &mut self.hub.queues[qi];
        let upto = upto.min(q.next_qseq() - 1);
        if upto <= q.acked {
            return;
        }
        let n = (upto - q.acked) as usize;
        // Events enqueued by one input share their instant: one histogram entry per run.
        let mut run: Option<(Instant, u64)> = None;
        for e in q.entries.drain(..n) {
            match &mut run {
                Some((at, k)) if *at == e.enqueued => *k += 1,
                _ => {
                    if let Some((at, k)) = run.replace((e.enqueued, 1)) {
                        self.latency
                            .record_n(now.mono.saturating_duration_since(at), k);
                    }
                }
            }
        }
        if let Some((at, k)) = run {
            self.latency
                .record_n(now.mono.saturating_duration_since(at), k);
        }
        q.acked = upto;
        q.send_next = q.send_next.max(upto + 1);
        store.apply(StoreOp::Ack {
            room: &q.room,
            dest: &q.dest,
            upto,
        });
        if q.lineage.trim(upto) {
            save_lineage(store, q);
        }
        self.peers[q.peer].stats.msgs_out += n as u64;
        self.mark_ready(qi);
    }

    fn rewind(&mut self, qi: QueueIdx, from: u64) {
        let q = &mut self.hub.queues[qi];
        // Never before the first unacknowledged event, never past the last queued one.
        let from = from.max(q.acked + 1).min(q.next_qseq());
        if from < q.send_next {
            self.stats.retries += q.send_next - from;
        }
        q.send_next = from;
        q.inflight = 0;
        q.generation += 1;
        self.mark_ready(qi);
    }

    fn peer_alive(&mut self, p: PeerIdx, now: Now) {
        let peer = &mut self.peers[p];
        peer.failures = 0;
        if !matches!(peer.liveness, Liveness::Up) {
            info!(peer = %peer.domain, "peer reachable again");
            peer.liveness = Liveness::Up;
            for i in 0..self.peers[p].queues.len() {
                let q = self.peers[p].queues[i];
                self.mark_ready(q);
            }
            self.pump(now);
        }
    }

    fn peer_failed(&mut self, p: PeerIdx, now: Now) {
        if !matches!(self.peers[p].liveness, Liveness::Up) {
            return; // already backing off: one incident counts once
        }
        let jitter = self.rng.unit();
        let policy = &self.cfg.retry;
        let peer = &mut self.peers[p];
        peer.failures += 1;
        peer.stats.failures += 1;
        if peer.failures >= policy.down_after {
            let delay = policy
                .probe_interval
                .mul_f64(1.0 - policy.jitter / 2.0 + policy.jitter * jitter);
            warn!(peer = %peer.domain, failures = peer.failures, "peer down; probing");
            peer.liveness = Liveness::Down {
                next_probe: now.mono + delay,
                probing: false,
            };
        } else {
            let base = policy.backoff(peer.failures);
            let delay = base.mul_f64(1.0 - policy.jitter / 2.0 + policy.jitter * jitter);
            peer.liveness = Liveness::Backoff {
                until: now.mono + delay,
            };
        }
    }

    /// The outcome of a probe of `peer`.
    pub fn handle_probe_outcome(&mut self, now: Now, peer: &ProviderDomain, alive: bool) {
        let Some(&p) = self.peer_by_domain.get(peer) else {
            return;
        };
        if alive {
            self.peer_alive(p, now);
        } else if let Liveness::Down {
            probing,
            next_probe,
        } = &mut self.peers[p].liveness
        {
            *probing = false;
            let policy = &self.cfg.retry;
            let j = self.rng.unit();
            *next_probe = now.mono
                + policy
                    .probe_interval
                    .mul_f64(1.0 - policy.jitter / 2.0 + policy.jitter * j);
        }
    }

    /// Fires due timers: transmit deadlines, backoff ends and probes.
    pub fn handle_timeout<S: Store>(&mut self, now: Now, store: &mut S) {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now.mono {
                break;
            }
            if self.inflight.contains_key(&id) {
                // The normal path, so a timeout is just another failure; it removes the deadline.
                self.handle_outcome(now, store, id, Err(TransportError::Timeout));
            } else {
                self.deadlines.remove(&(at, id));
            }
        }
        while let Some(&(at, qi)) = self.hub.held.first() {
            if at > now.mono {
                break;
            }
            self.hub.held.pop_first();
            if self.hub.queues[qi].held_until == Some(at) {
                self.hub.queues[qi].held_until = None;
                self.mark_ready(qi);
            }
        }
        for p in 0..self.peers.len() {
            match self.peers[p].liveness {
                Liveness::Backoff { until } if until <= now.mono => {
                    self.peers[p].liveness = Liveness::Up;
                    for i in 0..self.peers[p].queues.len() {
                        let q = self.peers[p].queues[i];
                        self.mark_ready(q);
                    }
                }
                Liveness::Down {
                    next_probe,
                    probing: false,
                } if next_probe <= now.mono => {
                    self.peers[p].liveness = Liveness::Down {
                        next_probe,
                        probing: true,
                    };
                    self.stats.probes += 1;
                    self.outputs
                        .push_back(Output::Probe(self.peers[p].domain.clone()));
                }
                _ => {}
            }
        }
        self.pump(now);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(now) = self.pump_due.take() {
            self.pump_now(now);
        }
        self.outputs.pop_front()
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some(due) = self.pump_due {
            return Some(due.mono);
        }
        let mut t = self.deadlines.first().map(|(at, _)| *at);
        if let Some(&(at, _)) = self.hub.held.first() {
            t = Some(t.map_or(at, |t| t.min(at)));
        }
        for p in &self.peers {
            let at = match p.liveness {
                Liveness::Backoff { until } => until,
                Liveness::Down {
                    next_probe,
                    probing: false,
                } => next_probe,
                _ => continue,
            };
            t = Some(t.map_or(at, |t| t.min(at)));
        }
        t
    }

    /// The dead letters a store holds (events peers refused for good), by peer and in the
    /// order they were written; for the operator's tools.
    pub fn dead_letters(snapshot: &Snapshot) -> Vec<DeadLetter> {
        let mut v: Vec<DeadLetter> = snapshot
            .records
            .iter()
            .filter_map(|(k, val)| dead_letter::parse(k, val))
            .collect();
        v.sort_by(|a, b| (&a.peer, a.n).cmp(&(&b.peer, b.n)));
        v
    }

    pub fn stats(&self) -> RelayStats {
        let mut s = self.stats.clone();
        s.latency = self.latency.clone();
        for p in &self.peers {
            let mut ps = p.stats.clone();
            ps.transport = Some(p.kind);
            ps.up = matches!(p.liveness, Liveness::Up);
            ps.draft_mode = p.seq_ext == Some(false);
            ps.seq_extension = p.seq_ext;
            ps.queue_depth = p
                .queues
                .iter()
                .map(|q| self.hub.queues[*q].entries.len() as u64)
                .sum();
            s.peers.insert(p.domain.clone(), ps);
        }
        s.inbox_depth = self.inbox.len();
        s.inbox_resident_bytes = self.inbox.resident_bytes() as u64;
        s.mls_panics = self.mls.panics.load(std::sync::atomic::Ordering::Relaxed);
        s
    }

    fn mark_ready(&mut self, qi: QueueIdx) {
        self.hub.mark_ready(qi);
    }

    /// Asks for ready queues to become transmits at the next `poll_output`: a burst of inputs
    /// handled together then leaves as one transmit per queue, not one per input.
    fn pump(&mut self, now: Now) {
        self.pump_due = Some(now);
    }

    /// Turns ready queues into transmits, within each queue's pipeline window.
    fn pump_now(&mut self, now: Now) {
        while let Some(qi) = self.hub.ready.pop_front() {
            self.hub.queues[qi].in_ready = false;
            let peer = self.hub.queues[qi].peer;
            if !matches!(self.peers[peer].liveness, Liveness::Up) {
                continue; // re-readied when the peer comes back
            }
            if self.hub.queues[qi].held_until.is_some_and(|t| t > now.mono) {
                continue; // re-readied when its hold ends
            }
            let kind = self.peers[peer].kind;
            let seq_ext = self.peers[peer].seq_ext;
            if seq_ext == Some(false) && self.hub.queues[qi].needs_skip {
                // A peer without our extension has no cursor to move: nothing to tell it.
                self.hub.queues[qi].needs_skip = false;
            }
            if self.hub.queues[qi].needs_skip {
                // The marker goes alone, and nothing follows it until it is acknowledged.
                if self.hub.queues[qi].inflight == 0 {
                    self.send_skip(now, qi, peer, kind);
                }
                continue;
            }
            // The draft's rules alone (also while the peer has not shown it speaks our
            // extension): the follower dedupes by the whole body's bytes, so every resend must
            // be the same body, even after our restart: one event per request; and one request
            // in flight, since nothing else keeps them in order.
            let isolating = self.hub.queues[qi].send_next <= self.hub.queues[qi].isolate_until;
            let single = seq_ext != Some(true) || isolating;
            let window = if single {
                1
            } else {
                self.cfg.pipeline_for(kind)
            };
            while self.hub.queues[qi].inflight < window
                && self.hub.queues[qi].send_next < self.hub.queues[qi].next_qseq()
            {
                let id = self.next_id();
                let q = &mut self.hub.queues[qi];
                let start = (q.send_next - q.acked - 1) as usize;
                let max_batch = if single { 1 } else { self.cfg.max_batch };
                // A batch is numbered by one incarnation: it ends where the next one starts.
                let max_batch = q
                    .lineage
                    .next_start_after(q.send_next)
                    .map_or(max_batch, |end| max_batch.min((end - q.send_next) as usize));
                let mut body = Vec::with_capacity(max_batch.min(q.entries.len() - start));
                let mut bytes = 0usize;
                for e in q.entries.range(start..) {
                    if body.len() >= max_batch
                        || (!body.is_empty() && bytes + e.fanout.len() > q.batch_bytes)
                    {
                        break;
                    }
                    bytes += e.fanout.len();
                    body.push(e.fanout.clone());
                }
                let first = q.send_next;
                let last = first + body.len() as u64 - 1;
                let lineage = q.lineage.inc_at(first).map(|batch| Lineage {
                    batch,
                    prev: q.lineage.inc_at(first - 1).unwrap_or(0),
                });
                q.send_next = last + 1;
                q.inflight += 1;
                let deadline = now.mono + self.cfg.transmit_timeout;
                self.inflight.insert(
                    id,
                    InFlight::Notify {
                        queue: qi,
                        last,
                        events: body.len(),
                        generation: q.generation,
                        deadline,
                    },
                );
                self.deadlines.insert((deadline, id));
                let ps = &mut self.peers[peer].stats;
                ps.transmits += 1;
                ps.bytes_out += bytes as u64;
                self.outputs.push_back(Output::Transmit(Transmit {
                    id,
                    dest: q.dest.clone(),
                    transport: kind,
                    endpoint: Endpoint::Notify,
                    target: q.room.as_str().to_owned(),
                    seq: Some(first),
                    lineage,
                    body,
                }));
            }
            // What is left waits for an outcome (window full), which re-readies the queue.
        }
    }
}

impl Relay {
    /// A gap marker: `/notify` with no FanoutMessages and `seq = acked + 1`, telling the
    /// follower that every event before it is gone for it.
    fn send_skip(&mut self, now: Now, qi: QueueIdx, peer: PeerIdx, kind: TransportKind) {
        let id = self.next_id();
        let q = &mut self.hub.queues[qi];
        q.inflight += 1;
        let deadline = now.mono + self.cfg.transmit_timeout;
        self.inflight.insert(
            id,
            InFlight::Notify {
                queue: qi,
                last: q.acked,
                events: 0,
                generation: q.generation,
                deadline,
            },
        );
        self.deadlines.insert((deadline, id));
        self.peers[peer].stats.transmits += 1;
        self.outputs.push_back(Output::Transmit(Transmit {
            id,
            dest: q.dest.clone(),
            transport: kind,
            endpoint: Endpoint::Notify,
            target: q.room.as_str().to_owned(),
            seq: Some(q.acked + 1),
            // The follower takes `prev` as the incarnation before the gap.
            lineage: Some(Lineage {
                batch: q.lineage.inc_at(q.acked + 1).unwrap_or(self.incarnation),
                prev: q.lineage.inc_at(q.acked).unwrap_or(0),
            }),
            body: Vec::new(),
        }));
    }

    /// Whether the follower's cursor (`next`, and `inc`, the incarnation that numbered its
    /// event `next - 1`) shows that this hub numbered events after a point the follower holds
    /// other events under: then `Some(upto)`, what both hold (to acknowledge before renumbering
    /// the rest). `None` when the numbering agrees, or the incarnations are not known (then
    /// the numbers and the follower's recent hashes decide, as before incarnations).
    fn diverged(&self, qi: QueueIdx, next: u64, inc: Option<u64>) -> Option<u64> {
        let q = &self.hub.queues[qi];
        let inc = inc.filter(|&i| i != 0)?;
        // A follower behind what it acknowledged lost its store: a gap, not a renumbering.
        if next <= q.acked + 1 {
            return None;
        }
        let held = next - 1;
        let common = |end: Option<Option<u64>>| match end {
            Some(Some(e)) if e <= held => e - 1,
            _ => q.acked,
        };
        if held >= q.next_qseq() {
            // Ahead of everything assigned: renumber, keeping what the follower's incarnation
            // numbered here (the follower holds it).
            return Some(common(q.lineage.end_of(inc)).max(q.acked));
        }
        match q.lineage.inc_at(held) {
            Some(x) if x != inc => Some(common(q.lineage.end_of(inc)).max(q.acked)),
            _ => None,
        }
    }

    /// The follower holds events this hub numbered otherwise (it lost its store, or was
    /// restored from a backup) up to `next - 1`. Renumber what is pending from the follower's
    /// cursor, so none of it is taken for a duplicate; `inc` is the incarnation of the
    /// follower's last event, which the first renumbered batch follows.
    fn renumber_from<S: Store>(&mut self, store: &mut S, qi: QueueIdx, next: u64, inc: u64) {
        let q = &mut self.hub.queues[qi];
        let pending: Vec<Bytes> = q.entries.iter().map(|e| e.fanout.clone()).collect();
        tracing::error!(room = %q.room, peer = %q.dest, follower_next = next,
            assigned_upto = q.next_qseq() - 1, pending = pending.len(),
            "follower holds other events under this queue's numbers: this hub lost or restored \
             its store; pending events renumbered from the follower's cursor");
        let upto = next - 1;
        store.apply(StoreOp::Ack {
            room: &q.room,
            dest: &q.dest,
            upto,
        });
        for (i, fanout) in pending.iter().enumerate() {
            store.apply(StoreOp::Enqueue {
                room: &q.room,
                dest: &q.dest,
                qseq: next + i as u64,
                fanout,
            });
        }
        q.acked = upto;
        q.send_next = next;
        q.inflight = 0;
        q.generation += 1;
        q.lineage = lineage::Ranges::default();
        if inc != 0 && upto > 0 {
            q.lineage.note(upto, inc);
        }
        q.lineage.note(next, self.incarnation);
        save_lineage(store, q);
        self.stats.resyncs += 1;
        self.mark_ready(qi);
    }
}

fn save_lineage<S: Store>(store: &mut S, q: &OutQueue) {
    let value = q.lineage.encode();
    store.apply(StoreOp::Record {
        key: &lineage::queue_key(&q.room, &q.dest),
        value: Some(&value),
    });
}

fn save_cursor_inc<S: Store>(store: &mut S, c: &Cursor) {
    store.apply(StoreOp::Record {
        key: &lineage::cursor_key(&c.hub, &c.room),
        value: Some(&c.inc.to_be_bytes()),
    });
}

/// What a local client is answered for a request forwarded to another provider: the
/// provider's own answer, or why there is none.
fn forward_answer(outcome: Result<Response, TransportError>) -> Response {
    match outcome {
        Ok(r) => r,
        Err(TransportError::Unsupported { endpoint, reason }) => {
            // Retrying will not help: the hub does not serve this endpoint.
            warn!(%endpoint, %reason, "the hub does not support this endpoint");
            Response::error(Status::NotImplemented, "not supported by the hub")
        }
        Err(e) => {
            debug!(error = %e, "forwarding a submission to the hub failed");
            let mut r = Response::error(Status::BadGateway, "hub unreachable");
            r.retry_after = Some(std::time::Duration::from_secs(1));
            r
        }
    }
}

/// A 200 carrying a SubmitMessageResponse.
fn submit_answer(resp: &SubmitMessageResponse) -> Response {
    if let SubmitStatus::Accepted {
        accepted_timestamp,
        frank: None,
    } = resp.status
    {
        return accepted_answer(resp.protocol, accepted_timestamp);
    }
    match resp.encode() {
        Ok(mut v) => {
            // A Vec with spare capacity becomes a `Bytes` through a second allocation (its
            // shared header); an exact one does not. The shrink stays in place.
            v.shrink_to_fit();
            Response::new(Status::Ok, v)
        }
        // Encoding our own small struct cannot fail; if it ever does, answer 500, not panic.
        Err(_) => Response::error(Status::Internal, "cannot encode SubmitMessageResponse"),
    }
}

/// The answer to nearly every submission, accepted without a frank, written in one exact
/// allocation (the generic encoding grows its buffer, then shrinks it): `protocol`,
/// `accepted(0)`, the timestamp, an absent `optional Frank`. The bytes of
/// [`SubmitMessageResponse::encode`], which a test holds it to.
fn accepted_answer(protocol: Protocol, accepted_ms: u64) -> Response {
    let mut v = Vec::with_capacity(11);
    v.push(protocol.as_u8());
    v.push(SubmitResponseCode::Accepted.as_u8());
    v.extend_from_slice(&accepted_ms.to_be_bytes());
    v.push(0);
    Response::new(Status::Ok, v)
}

/// Whether `uri` is `mimi://{domain}/...`.
fn uri_in_domain(uri: &str, domain: &str) -> bool {
    uri.strip_prefix("mimi://")
        .and_then(|rest| rest.strip_prefix(domain))
        .is_some_and(|rest| rest.starts_with('/'))
}

fn xxh3_128(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// The same at the hub and at every follower: a hash of the exact MLSMessage bytes. Field
/// values of `debug!` are computed only when debug logging is on.
struct MsgId(u64);

impl MsgId {
    fn of(mls: &[u8]) -> MsgId {
        MsgId(xxhash_rust::xxh3::xxh3_64(mls))
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_answer_is_the_generic_encoding() {
        for ts in [0, 1, 0x0102_0304_0506_0708, u64::MAX] {
            let fast = accepted_answer(Protocol::Mls10, ts);
            let generic = SubmitMessageResponse::accepted(ts)
                .encode()
                .expect("encodes");
            assert_eq!(&fast.body[..], &generic[..], "timestamp {ts}");
            assert_eq!(fast.status, Status::Ok);
            // And through the entry point every answer takes.
            let answer = submit_answer(&SubmitMessageResponse::accepted(ts));
            assert_eq!(&answer.body[..], &generic[..]);
        }
    }

    #[test]
    fn uri_domain_match_is_exact() {
        assert!(uri_in_domain("mimi://b.example/u/bob", "b.example"));
        assert!(!uri_in_domain("mimi://b.example.evil/u/bob", "b.example"));
        assert!(!uri_in_domain("mimi://xb.example/u/bob", "b.example"));
        assert!(!uri_in_domain("https://b.example/u/bob", "b.example"));
    }
}
