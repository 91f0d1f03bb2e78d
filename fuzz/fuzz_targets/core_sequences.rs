//! relay-core's `Relay` driven by arbitrary sequences: requests from several peers (any
//! endpoint, target, sequence number and body, well-formed or not), arbitrary outcomes for
//! the transmits it produced, probe results, local submissions, inbox reads, time passing
//! and restarts from its store. After every step it checks what must always hold: no panic;
//! no event (a room's submission by one provider, or a hub's FanoutMessage bytes) delivered
//! twice into the inbox; no (room, destination) queue over `max_queue`; a full inbox takes
//! nothing more from peers; inbox offsets never reused; every reply token answered once.
#![no_main]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::{SubmitMessageResponse, encode_fanout_application};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::{
    InboxQuery, Lineage, MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response,
    Status, Store, Transmit, TransportError, TransportKind,
};

const UNIX_BASE_MS: u64 = 1_700_000_000_000;
const LOCAL: &str = "a.example";
/// Peers and the transport each is routed over; the last one has no route.
const PEERS: [(&str, Option<TransportKind>); 5] = [
    ("b.example", Some(TransportKind::Https)),
    ("c.example", Some(TransportKind::Quic)),
    ("d.example", Some(TransportKind::Xmpp)),
    ("e.example", Some(TransportKind::Matrix)),
    ("z.example", None),
];
/// The room hosted here and its followers (indexes into PEERS).
const HOSTED: &str = "mimi://a.example/r/club";
const FOLLOWERS: [usize; 3] = [0, 1, 2];
const ENDPOINTS: [Endpoint; 10] = [
    Endpoint::Notify,
    Endpoint::SubmitMessage,
    Endpoint::Update,
    Endpoint::KeyMaterial,
    Endpoint::GroupInfo,
    Endpoint::RequestConsent,
    Endpoint::UpdateConsent,
    Endpoint::IdentifierQuery,
    Endpoint::ReportAbuse,
    Endpoint::ProxyDownload,
];
const STATUSES: [Status; 15] = [
    Status::Ok,
    Status::Created,
    Status::BadRequest,
    Status::Forbidden,
    Status::NotFound,
    Status::OutOfOrder,
    Status::TooLarge,
    Status::Internal,
    Status::NotImplemented,
    Status::BadGateway,
    Status::Unavailable,
    Status::Other(405),
    Status::Other(408),
    Status::Other(421),
    Status::Other(429),
];

#[derive(Arbitrary, Debug)]
enum Target {
    Hosted,
    /// A room hosted by peer `n`.
    PeerRoom(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Body {
    /// A SubmitMessageRequest of user `client` at provider `domain` (index into PEERS, or
    /// the local provider past the end).
    Submit {
        domain: u8,
        client: u8,
        counter: u16,
    },
    /// FanoutMessages (client, counter, timestamp offset) as a hub sends them.
    Notify(Vec<(u8, u16, u16)>),
    Raw(Vec<u8>),
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Answer {
    /// What a correct peer answers.
    Exact,
    Status {
        status: u8,
        next_seq: Option<u16>,
        /// A few values, so incarnations collide and differ both.
        next_inc: Option<u8>,
        retry_after_s: Option<u8>,
    },
    Error(u8),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Request {
        peer: u8,
        endpoint: u8,
        target: Target,
        seq: Option<u16>,
        lineage: Option<(u8, u8)>,
        body: Body,
    },
    /// A hub's `/notify` for its own room: a request as a hub sends it.
    Notify {
        hub: u8,
        seq: Option<u16>,
        lineage: Option<(u8, u8)>,
        events: Vec<(u8, u16, u16)>,
    },
    Outcome {
        pick: u16,
        answer: Answer,
    },
    Probe {
        peer: u8,
        alive: bool,
    },
    ClientSubmit {
        target: Target,
        body: Body,
    },
    ReadInbox(u8),
    Advance {
        ms: u16,
        long: bool,
    },
    Restart,
}

#[derive(Arbitrary, Debug)]
struct Input {
    max_queue: u8,
    max_inbox: u8,
    max_inbox_per_peer: u8,
    /// In units of 256 bytes: small, so records leave memory and are read back.
    max_inbox_memory: u8,
    max_batch: u8,
    ops: Vec<Op>,
}

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("test domain")
}

fn peer_room(n: u8) -> String {
    format!("mimi://{}/r/room", PEERS[usize::from(n) % PEERS.len()].0)
}

fn target(t: &Target) -> String {
    match t {
        Target::Hosted => HOSTED.to_owned(),
        Target::PeerRoom(n) => peer_room(*n),
        Target::Raw(s) => s.clone(),
    }
}

fn app_message(client: u8, counter: u16) -> Vec<u8> {
    let mut ct = b"FUZZ".to_vec();
    ct.push(client);
    ct.extend_from_slice(&counter.to_be_bytes());
    ct.resize(32, 0xab);
    mimi_wire::mls::private_message(b"room-group", 1, &ct)
}

fn body(b: &Body) -> Bytes {
    match b {
        Body::Submit {
            domain,
            client,
            counter,
        } => {
            let d = PEERS.get(usize::from(*domain)).map_or(LOCAL, |p| p.0);
            let uri = format!("mimi://{d}/u/c{client}");
            let mut v = vec![1u8]; // Protocol mls10
            v.extend_from_slice(&app_message(*client, *counter));
            v.push(uri.len() as u8); // under 64: a one-byte varint
            v.extend_from_slice(uri.as_bytes());
            Bytes::from(v)
        }
        Body::Notify(events) => {
            let mut v = Vec::new();
            for (client, counter, ts) in events.iter().take(16) {
                let m = app_message(*client, *counter);
                encode_fanout_application(UNIX_BASE_MS + u64::from(*ts), &m, &mut v);
            }
            Bytes::from(v)
        }
        Body::Raw(v) => Bytes::copy_from_slice(v),
        Body::Empty => Bytes::new(),
    }
}

struct Harness {
    cfg: RelayConfig,
    relay: Relay,
    store: MemStore,
    base: Instant,
    now_ms: u64,
    next_token: u64,
    /// Tokens waiting for their one reply.
    open_tokens: HashSet<ReplyToken>,
    transmits: Vec<Transmit>,
    /// Inbox offsets checked so far, and what each delivered event was.
    seen_upto: u64,
    delivered: HashSet<(String, String, Vec<u8>)>,
    read_upto: u64,
}

impl Harness {
    fn now(&self) -> Now {
        Now {
            mono: self.base + Duration::from_millis(self.now_ms),
            unix_ms: UNIX_BASE_MS + self.now_ms,
        }
    }

    fn token(&mut self) -> ReplyToken {
        self.next_token += 1;
        let t = ReplyToken(self.next_token);
        self.open_tokens.insert(t);
        t
    }

    /// The node's batch epilogue: commit, then release the outputs; then the checks.
    /// `source`: the submitter and body of a `/submitMessage`.
    fn flush(&mut self, source: Option<(&str, &[u8])>, inbox_was_full: bool) {
        self.store.commit().expect("mem commit");
        // Everything is durable now: older inbox records leave memory, to be read back.
        let next = self.relay.inbox_next();
        self.relay.handle_inbox_durable(next);
        while let Some(out) = self.relay.poll_output() {
            match out {
                Output::Transmit(t) => {
                    if self.transmits.len() < 4096 {
                        self.transmits.push(t);
                    }
                }
                Output::Probe(_) => {}
                Output::Reply { token, .. } => {
                    assert!(
                        self.open_tokens.remove(&token),
                        "a second reply for {token:?}"
                    );
                }
            }
        }
        // Delivered events: each at most once.
        let mut last = self.seen_upto;
        let mut fresh = 0usize;
        let fresh_records = self
            .relay
            .read_inbox(&self.store, InboxQuery::after(self.seen_upto))
            .expect("inbox read");
        for (offset, rec) in &fresh_records {
            fresh += 1;
            let what = match source {
                // A hosted room's events are who submitted which bytes; the fanout carries
                // the hub's timestamp, which differs between two acceptances.
                Some((submitter, b)) if rec.from.as_str() == LOCAL => {
                    let mut k = submitter.as_bytes().to_vec();
                    k.push(0);
                    k.extend_from_slice(b);
                    k
                }
                _ => rec.fanout.to_vec(),
            };
            let key = (
                rec.room.as_str().to_owned(),
                rec.from.as_str().to_owned(),
                what,
            );
            assert!(
                !self.delivered.contains(&key),
                "delivered twice: offset {offset} in {} from {}",
                rec.room,
                rec.from
            );
            self.delivered.insert(key);
            last = *offset;
        }
        assert!(
            !(inbox_was_full && fresh > 0),
            "a full inbox took {fresh} more events"
        );
        self.seen_upto = last;
        let stats = self.relay.stats();
        assert!(
            stats.inbox_resident_bytes <= self.cfg.max_inbox_memory as u64,
            "{} inbox bytes in memory, max_inbox_memory is {}",
            stats.inbox_resident_bytes,
            self.cfg.max_inbox_memory
        );
        // Queues within max_queue, in the core and in what it stored.
        for (peer, s) in &stats.peers {
            assert!(
                s.queue_depth <= self.cfg.max_queue as u64,
                "queue of {peer} holds {} events, max_queue is {}",
                s.queue_depth,
                self.cfg.max_queue
            );
        }
        for ((room, dest), q) in &self.store.committed().queues {
            assert!(
                q.len() <= self.cfg.max_queue,
                "stored queue ({room}, {dest}) holds {}",
                q.len()
            );
        }
    }

    fn inbox_full(&self) -> bool {
        self.relay.stats().inbox_depth >= self.cfg.max_inbox as u64
    }

    fn step(&mut self, op: &Op) {
        let now = self.now();
        match op {
            Op::Request {
                peer,
                endpoint,
                target: t,
                seq,
                lineage,
                body: b,
            } => {
                let (name, kind) = PEERS[usize::from(*peer) % PEERS.len()];
                let endpoint = ENDPOINTS[usize::from(*endpoint) % ENDPOINTS.len()];
                let b = body(b);
                let full = self.inbox_full();
                let token = self.token();
                let req = Request {
                    from: domain(name),
                    transport: kind.unwrap_or(TransportKind::Https),
                    endpoint,
                    target: target(t),
                    seq: seq.map(u64::from),
                    lineage: lineage.map(|(batch, prev)| Lineage {
                        batch: u64::from(batch),
                        prev: u64::from(prev),
                    }),
                    body: b.clone(),
                };
                self.relay.handle_request(now, &mut self.store, token, req);
                let source = (endpoint == Endpoint::SubmitMessage).then_some((name, &b[..]));
                self.flush(source, full);
            }
            Op::Notify {
                hub,
                seq,
                lineage,
                events,
            } => {
                self.step(&Op::Request {
                    peer: *hub,
                    endpoint: 0,
                    target: Target::PeerRoom(*hub),
                    seq: *seq,
                    lineage: *lineage,
                    body: Body::Notify(events.clone()),
                });
            }
            Op::Outcome { pick, answer } => {
                if self.transmits.is_empty() {
                    return;
                }
                let t = self
                    .transmits
                    .swap_remove(usize::from(*pick) % self.transmits.len());
                let events = t.body.len() as u64;
                let outcome = match answer {
                    Answer::Exact => Ok(match t.endpoint {
                        Endpoint::Notify => Response {
                            status: Status::Created,
                            body: Bytes::new(),
                            next_seq: t.seq.map(|s| s + events),
                            next_inc: t.lineage.map(|l| l.batch),
                            retry_after: None,
                        },
                        Endpoint::SubmitMessage => Response::new(
                            Status::Ok,
                            SubmitMessageResponse::accepted(now.unix_ms)
                                .encode()
                                .expect("encode"),
                        ),
                        _ => Response::new(Status::Ok, Bytes::new()),
                    }),
                    Answer::Status {
                        status,
                        next_seq,
                        next_inc,
                        retry_after_s,
                    } => Ok(Response {
                        status: STATUSES[usize::from(*status) % STATUSES.len()],
                        body: Bytes::new(),
                        next_seq: next_seq.map(u64::from),
                        next_inc: next_inc.map(u64::from),
                        retry_after: retry_after_s.map(|s| Duration::from_secs(u64::from(s))),
                    }),
                    Answer::Error(e) => Err(match e % 7 {
                        0 => TransportError::NoRoute(t.dest.clone()),
                        1 => TransportError::Unreachable("fuzz".into()),
                        2 => TransportError::ConnectionLost,
                        3 => TransportError::Timeout,
                        4 => TransportError::Busy,
                        5 => TransportError::BadResponse("fuzz".into()),
                        _ => TransportError::Closed,
                    }),
                };
                self.relay
                    .handle_outcome(now, &mut self.store, t.id, outcome);
                self.flush(None, false);
            }
            Op::Probe { peer, alive } => {
                let d = domain(PEERS[usize::from(*peer) % PEERS.len()].0);
                self.relay.handle_probe_outcome(now, &d, *alive);
                self.flush(None, false);
            }
            Op::ClientSubmit { target: t, body: b } => {
                let token = self.token();
                let room = target(t);
                self.relay
                    .handle_client_submit(now, &mut self.store, token, &room, body(b));
                self.flush(None, false);
            }
            Op::ReadInbox(n) => {
                let q = InboxQuery {
                    max: usize::from(*n),
                    ..InboxQuery::after(self.read_upto)
                };
                let read = self.relay.read_inbox(&self.store, q).expect("inbox read");
                if let Some(&(upto, _)) = read.last() {
                    self.read_upto = upto;
                    self.relay
                        .handle_inbox_read(&mut self.store, upto)
                        .expect("inbox trim");
                }
                self.flush(None, false);
            }
            Op::Advance { ms, long } => {
                let ms = u64::from(*ms) * if *long { 1000 } else { 1 };
                self.now_ms += ms;
                let now = self.now();
                self.relay.handle_timeout(now, &mut self.store);
                self.flush(None, false);
            }
            Op::Restart => {
                let snapshot = self.store.load().expect("mem load");
                self.relay = Relay::new(self.cfg.clone(), snapshot, now);
                // The old process's transmits and pending answers died with it.
                self.transmits.clear();
                self.open_tokens.clear();
                assert!(
                    self.relay.inbox_next() > self.seen_upto,
                    "inbox offsets restart at {} after {} was used",
                    self.relay.inbox_next(),
                    self.seen_upto
                );
                self.flush(None, false);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let mut cfg = RelayConfig::new(domain(LOCAL));
    for (name, kind) in PEERS {
        if let Some(kind) = kind {
            cfg = cfg.with_route(domain(name), kind);
        }
    }
    cfg.max_queue = 1 + usize::from(input.max_queue % 8);
    cfg.max_inbox = 1 + usize::from(input.max_inbox % 16);
    cfg.max_inbox_per_peer = 1 + usize::from(input.max_inbox_per_peer % 16);
    cfg.max_inbox_memory = 256 * usize::from(input.max_inbox_memory);
    cfg.max_batch = 1 + usize::from(input.max_batch % 8);
    cfg.transmit_timeout = Duration::from_millis(500);
    let base = Instant::now();
    let mut store = MemStore::new();
    let now = Now {
        mono: base,
        unix_ms: UNIX_BASE_MS,
    };
    let snapshot = store.load().expect("mem load");
    let mut relay = Relay::new(cfg.clone(), snapshot, now);
    let room: RoomId = HOSTED.parse().expect("room");
    let followers = FOLLOWERS.iter().map(|&i| domain(PEERS[i].0)).collect();
    relay
        .handle_create_room(&mut store, room, followers)
        .expect("room");
    store.commit().expect("commit");
    let mut h = Harness {
        cfg,
        relay,
        store,
        base,
        now_ms: 0,
        next_token: 0,
        open_tokens: HashSet::new(),
        transmits: Vec::new(),
        seen_upto: 0,
        delivered: HashSet::new(),
        read_upto: 0,
    };
    // Local users take part in rooms of b, c and d (so the node follows them).
    for hub in 0..3u8 {
        h.step(&Op::ClientSubmit {
            target: Target::PeerRoom(hub),
            body: Body::Submit {
                domain: u8::MAX,
                client: hub,
                counter: 0,
            },
        });
    }
    for op in input.ops.iter().take(256) {
        h.step(op);
    }
});
