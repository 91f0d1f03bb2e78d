//! The routing core under simulated time and links: several relays, loss, reordering,
//! delays and restarts, with no sockets. Every run is deterministic for its seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::rng::SplitMix64;
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response, Status, Store,
    Transmit, TransmitId, TransportError, TransportKind,
};

const UNIX_BASE_MS: u64 = 1_700_000_000_000;
const MAGIC: &[u8; 4] = b"SIM!";

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("test domain")
}

struct Rng(SplitMix64);
impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        self.0.unit() < p
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.0.below(hi - lo + 1)
    }
}

/// A syntactically valid SubmitMessageRequest whose ciphertext carries (sender, counter).
fn submit_body(sender: &str, client: u32, counter: u32) -> Bytes {
    let mut ct = Vec::with_capacity(1024);
    ct.extend_from_slice(MAGIC);
    ct.extend_from_slice(&client.to_be_bytes());
    ct.extend_from_slice(&counter.to_be_bytes());
    ct.resize(1024, 0xab);
    let mls = mimi_wire::mls::private_message(b"room-group", 1, &ct);
    let uri = format!("mimi://{sender}/u/client{client}");
    let mut body = vec![1u8]; // Protocol mls10
    body.extend_from_slice(&mls);
    assert!(uri.len() < 64, "one-byte varint length");
    body.push(uri.len() as u8);
    body.extend_from_slice(uri.as_bytes());
    Bytes::from(body)
}

/// Finds (client, counter) in a delivered FanoutMessage.
fn marker(fanout: &[u8]) -> (u32, u32) {
    let at = fanout
        .windows(4)
        .position(|w| w == MAGIC)
        .expect("marker in payload");
    let c = u32::from_be_bytes(fanout[at + 4..at + 8].try_into().expect("4 bytes"));
    let n = u32::from_be_bytes(fanout[at + 8..at + 12].try_into().expect("4 bytes"));
    (c, n)
}

fn hash64(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

struct Node {
    domain: ProviderDomain,
    cfg: RelayConfig,
    relay: Relay,
    store: MemStore,
    up: bool,
    /// Incarnation, so events addressed to a crashed incarnation are dropped.
    life: u32,
    next_token: u64,
    /// Tokens of requests from peers: where to send the answer.
    peer_tokens: HashMap<ReplyToken, (usize, TransmitId)>,
    /// Tokens of local client submissions.
    client_tokens: HashMap<ReplyToken, usize>,
    read_upto: u64,
    /// The local reader does not read before this virtual time (ms).
    reader_away_until: u64,
}

impl Node {
    /// Every inbox record after `after`, from memory or the store.
    fn inbox(&self, after: u64) -> Vec<(u64, relay_core::store::InboxRecord)> {
        self.relay
            .read_inbox(&self.store, relay_core::InboxQuery::after(after))
            .expect("inbox read")
    }
}

enum Ev {
    Request {
        to: usize,
        to_life: u32,
        from: usize,
        from_life: u32,
        t: Transmit,
    },
    Outcome {
        to: usize,
        life: u32,
        id: TransmitId,
        outcome: Result<Response, TransportError>,
    },
    Probe {
        to: usize,
        life: u32,
        peer: usize,
    },
    ClientSubmit {
        client: usize,
    },
    Restart {
        node: usize,
    },
    Crash {
        node: usize,
    },
}

struct Client {
    node: usize,
    /// 0: a's clubhouse; 1: b's second room. Also encoded in the id (>= 1000 for room 1).
    room: usize,
    id: u32,
    next: u32,
    total: u32,
    waiting: bool,
}

struct Link {
    loss: f64,
    min_delay_ms: u64,
    max_delay_ms: u64,
    /// Whether a lost exchange is reported as a connection error (else only the deadline fires).
    report_loss: bool,
}

struct Sim {
    now_ms: u64,
    base: Instant,
    rng: Rng,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    payloads: HashMap<usize, Ev>,
    seq: u64,
    link: Link,
    /// Per receiving node: delivered (client, counter, accepted_ms) in inbox order.
    received: Vec<Vec<(u32, u32, u64)>>,
    /// Nodes behind a proxy that strips our sequence extension both ways (`seq` and its
    /// incarnations from requests, `next_seq` from answers): to their hubs they are followers
    /// that speak only the draft.
    strip: Vec<bool>,
    /// For /notify to stripped nodes: the hash of the first body each FanoutMessage came in.
    first_body: HashMap<u64, u64>,
    /// FanoutMessages that came to a stripped node again in another body: a follower that
    /// dedupes by the whole body's bytes (the draft's rule) would deliver them twice.
    body_clashes: usize,
}

impl Sim {
    fn new(seed: u64, link: Link, clients_per_node: u32, msgs: u32) -> Sim {
        let names = ["a.example", "b.example", "c.example"];
        let base = Instant::now();
        let mut nodes = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let mut cfg = RelayConfig::new(domain(n));
            for (j, m) in names.iter().enumerate() {
                if i != j {
                    cfg = cfg.with_route(domain(m), TransportKind::Quic);
                }
            }
            cfg.transmit_timeout = Duration::from_millis(500);
            cfg.seed = seed ^ i as u64;
            cfg.max_batch = 8;
            // The followers' configs name the room they follow (as an operator's would), so a
            // follower that lost its store still takes its hub's events.
            if i != 0 {
                cfg.follows = vec![room()];
            }
            let mut store = MemStore::new();
            let now = Now {
                mono: base,
                unix_ms: UNIX_BASE_MS,
            };
            let snapshot = store.load().expect("mem load");
            let mut relay = Relay::new(cfg.clone(), snapshot, now);
            if i == 0 {
                relay
                    .handle_create_room(
                        &mut store,
                        room(),
                        vec![domain(names[1]), domain(names[2])],
                    )
                    .expect("room");
                store.commit().expect("commit");
            }
            nodes.push(Node {
                domain: domain(n),
                cfg,
                relay,
                store,
                up: true,
                life: 0,
                next_token: 1,
                peer_tokens: HashMap::new(),
                client_tokens: HashMap::new(),
                read_upto: 0,
                reader_away_until: 0,
            });
        }
        let mut clients = Vec::new();
        for node in 0..3 {
            for k in 0..clients_per_node {
                clients.push(Client {
                    node,
                    room: 0,
                    id: node as u32 * 100 + k,
                    next: 0,
                    total: msgs,
                    waiting: false,
                });
            }
        }
        let mut sim = Sim {
            now_ms: 0,
            base,
            rng: Rng(SplitMix64::new(seed)),
            nodes,
            clients,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            seq: 0,
            link,
            received: vec![Vec::new(); 3],
            strip: vec![false; 3],
            first_body: HashMap::new(),
            body_clashes: 0,
        };
        for c in 0..sim.clients.len() {
            let at = sim.rng.range(0, 5);
            sim.schedule(at, Ev::ClientSubmit { client: c });
        }
        sim
    }

    fn now(&self) -> Now {
        Now {
            mono: self.base + Duration::from_millis(self.now_ms),
            unix_ms: UNIX_BASE_MS + self.now_ms,
        }
    }

    fn schedule(&mut self, delay_ms: u64, ev: Ev) {
        self.seq += 1;
        let key = self.seq as usize;
        self.payloads.insert(key, ev);
        self.events
            .push(Reverse((self.now_ms + delay_ms, self.seq, key)));
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .range(self.link.min_delay_ms, self.link.max_delay_ms)
    }

    /// Runs one node's batch epilogue: commit, then release outputs.
    fn flush(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        self.nodes[n].store.commit().expect("mem commit");
        // Everything delivered so far is durable: older inbox records may leave memory.
        let next = self.nodes[n].relay.inbox_next();
        self.nodes[n].relay.handle_inbox_durable(next);
        let life = self.nodes[n].life;
        while let Some(out) = self.nodes[n].relay.poll_output() {
            match out {
                Output::Transmit(t) => {
                    let to = self.index(&t.dest);
                    let lost = self.rng.chance(self.link.loss);
                    if lost || !self.nodes[to].up {
                        if self.link.report_loss || !self.nodes[to].up {
                            let d = self.delay();
                            self.schedule(
                                d,
                                Ev::Outcome {
                                    to: n,
                                    life,
                                    id: t.id,
                                    outcome: Err(TransportError::ConnectionLost),
                                },
                            );
                        }
                        continue;
                    }
                    let d = self.delay();
                    let to_life = self.nodes[to].life;
                    self.schedule(
                        d,
                        Ev::Request {
                            to,
                            to_life,
                            from: n,
                            from_life: life,
                            t,
                        },
                    );
                }
                Output::Probe(peer) => {
                    let p = self.index(&peer);
                    let d = self.delay() * 2;
                    self.schedule(
                        d,
                        Ev::Probe {
                            to: n,
                            life,
                            peer: p,
                        },
                    );
                }
                Output::Reply {
                    token,
                    mut response,
                } => {
                    if self.strip[n] {
                        (response.next_seq, response.next_inc) = (None, None);
                    }
                    if let Some((peer, id)) = self.nodes[n].peer_tokens.remove(&token) {
                        let peer_life = self.nodes[peer].life;
                        let lost = self.rng.chance(self.link.loss);
                        let outcome = if lost {
                            if !self.link.report_loss {
                                continue;
                            }
                            Err(TransportError::ConnectionLost)
                        } else {
                            Ok(response)
                        };
                        let d = self.delay();
                        self.schedule(
                            d,
                            Ev::Outcome {
                                to: peer,
                                life: peer_life,
                                id,
                                outcome,
                            },
                        );
                    } else if let Some(c) = self.nodes[n].client_tokens.remove(&token) {
                        self.client_answer(c, response);
                    }
                }
            }
        }
        self.read_inbox(n);
    }

    fn read_inbox(&mut self, n: usize) {
        if self.now_ms < self.nodes[n].reader_away_until {
            return;
        }
        let node = &mut self.nodes[n];
        let mut last = node.read_upto;
        for (offset, rec) in node.inbox(node.read_upto) {
            let (c, k) = marker(&rec.fanout);
            self.received[n].push((c, k, rec.accepted_ms));
            last = offset;
        }
        if last != node.read_upto {
            node.read_upto = last;
            node.relay
                .handle_inbox_read(&mut node.store, last)
                .expect("trim");
        }
    }

    fn client_answer(&mut self, c: usize, response: Response) {
        let ok = response.status == Status::Ok
            && mimi_wire::proto::SubmitMessageResponse::decode(&response.body)
                .map(|r| matches!(r.status, mimi_wire::proto::SubmitStatus::Accepted { .. }))
                .unwrap_or(false);
        let client = &mut self.clients[c];
        client.waiting = false;
        if ok {
            client.next += 1;
        }
        if client.next < client.total {
            let d = if ok {
                self.rng.range(0, 2)
            } else {
                self.rng.range(20, 60)
            };
            self.schedule(d, Ev::ClientSubmit { client: c });
        }
    }

    fn index(&self, d: &ProviderDomain) -> usize {
        self.nodes
            .iter()
            .position(|n| &n.domain == d)
            .expect("known node")
    }

    fn crash(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.up = false;
        node.life += 1;
        node.store.crash();
        // Clients waiting on this node see their connection drop and will retry.
        let waiting: Vec<usize> = node.client_tokens.drain().map(|(_, c)| c).collect();
        node.peer_tokens.clear();
        for c in waiting {
            self.clients[c].waiting = false;
            let d = self.rng.range(50, 100);
            self.schedule(d, Ev::ClientSubmit { client: c });
        }
    }

    fn restart(&mut self, n: usize) {
        let now = self.now();
        let node = &mut self.nodes[n];
        let snapshot = node.store.load().expect("mem load");
        node.relay = Relay::new(node.cfg.clone(), snapshot, now);
        node.up = true;
        // The local reader keeps its own position, as a real client would.
        self.flush(n);
    }

    fn step(&mut self) -> bool {
        let Some(Reverse((at, _, key))) = self.events.pop() else {
            return false;
        };
        self.now_ms = self.now_ms.max(at);
        let ev = self.payloads.remove(&key).expect("payload");
        let now = self.now();
        match ev {
            Ev::Request {
                to,
                to_life,
                from,
                from_life,
                t,
            } => {
                if !self.nodes[to].up || self.nodes[to].life != to_life {
                    let d = self.delay();
                    let outcome = Err(TransportError::ConnectionLost);
                    self.schedule(
                        d,
                        Ev::Outcome {
                            to: from,
                            life: from_life,
                            id: t.id,
                            outcome,
                        },
                    );
                    return true;
                }
                let node = &mut self.nodes[to];
                let token = ReplyToken(node.next_token);
                node.next_token += 1;
                node.peer_tokens.insert(token, (from, t.id));
                let body: Vec<u8> = t.body.iter().flat_map(|b| b.iter().copied()).collect();
                let (mut seq, mut lineage) = (t.seq, t.lineage);
                if self.strip[to] {
                    (seq, lineage) = (None, None);
                    if t.endpoint == Endpoint::Notify {
                        let body_hash = hash64(&body);
                        for f in &t.body {
                            if *self.first_body.entry(hash64(f)).or_insert(body_hash) != body_hash {
                                self.body_clashes += 1;
                            }
                        }
                    }
                }
                let req = Request {
                    from: self.nodes[from].domain.clone(),
                    transport: t.transport,
                    endpoint: t.endpoint,
                    target: t.target,
                    seq,
                    lineage,
                    body: Bytes::from(body),
                };
                let node = &mut self.nodes[to];
                node.relay.handle_request(now, &mut node.store, token, req);
                self.flush(to);
            }
            Ev::Outcome {
                to,
                life,
                id,
                outcome,
            } => {
                let node = &mut self.nodes[to];
                if node.up && node.life == life {
                    node.relay.handle_outcome(now, &mut node.store, id, outcome);
                    self.flush(to);
                }
            }
            Ev::Probe { to, life, peer } => {
                let alive = self.nodes[peer].up;
                let peer_domain = self.nodes[peer].domain.clone();
                let node = &mut self.nodes[to];
                if node.up && node.life == life {
                    node.relay.handle_probe_outcome(now, &peer_domain, alive);
                    self.flush(to);
                }
            }
            Ev::ClientSubmit { client } => {
                let c = &self.clients[client];
                if c.waiting || c.next >= c.total {
                    return true;
                }
                let n = c.node;
                if !self.nodes[n].up {
                    self.schedule(50, Ev::ClientSubmit { client });
                    return true;
                }
                let body = submit_body(self.nodes[n].domain.as_str(), c.id, c.next);
                self.clients[client].waiting = true;
                let node = &mut self.nodes[n];
                let token = ReplyToken(node.next_token);
                node.next_token += 1;
                node.client_tokens.insert(token, client);
                let room = if self.clients[client].room == 0 {
                    room()
                } else {
                    room2()
                };
                node.relay
                    .handle_client_submit(now, &mut node.store, token, room.as_str(), body);
                self.flush(n);
            }
            Ev::Crash { node } => self.crash(node),
            Ev::Restart { node } => self.restart(node),
        }
        true
    }

    /// Processes the next event or timer, whichever is first. False when nothing is left.
    fn advance(&mut self) -> bool {
        let next_event = self.events.peek().map(|Reverse((at, _, _))| *at);
        let next_timer = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.up)
            .filter_map(|(i, n)| {
                n.relay
                    .poll_timeout()
                    .map(|t| (t.saturating_duration_since(self.base).as_millis() as u64, i))
            })
            .min();
        match (next_event, next_timer) {
            (None, None) => false,
            (Some(e), Some((t, i))) if t < e => {
                self.fire_timer(t, i);
                true
            }
            (None, Some((t, i))) => {
                self.fire_timer(t, i);
                true
            }
            _ => self.step(),
        }
    }

    /// Runs until every message is delivered everywhere, firing timers as virtual time passes.
    fn run(&mut self, limit_ms: u64) {
        while !self.done() && self.advance() {
            assert!(
                self.now_ms < limit_ms,
                "simulation did not settle by {limit_ms} ms"
            );
        }
    }

    /// Runs until virtual time reaches `t_ms`.
    fn run_until(&mut self, t_ms: u64) {
        while self.now_ms < t_ms && !self.done() && self.advance() {}
    }

    fn fire_timer(&mut self, t_ms: u64, i: usize) {
        // Timers round down to ms; step at least one ms so a sub-ms deadline still fires.
        self.now_ms = self.now_ms.max(t_ms + 1);
        let now = self.now();
        let node = &mut self.nodes[i];
        node.relay.handle_timeout(now, &mut node.store);
        self.flush(i);
    }

    fn done(&self) -> bool {
        // §5.5: every message reaches all three providers, its sender's included.
        let expected: usize = self.clients.iter().map(|c| c.total as usize).sum::<usize>() * 3;
        let got: usize = self.received.iter().map(Vec::len).sum();
        self.clients.iter().all(|c| c.next >= c.total) && got >= expected
    }

    /// Every message delivered exactly once to every provider, its sender's included, in each
    /// sender's order, with the hub's timestamps never going back.
    fn check(&self) {
        for (n, got) in self.received.iter().enumerate() {
            let mut seen: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            let mut last_per_client: HashMap<u32, u32> = HashMap::new();
            let mut last_ms = [0u64; 2];
            for &(c, k, ms) in got {
                *seen.entry((c, k)).or_default() += 1;
                if let Some(prev) = last_per_client.insert(c, k) {
                    assert!(k > prev, "node {n}: client {c} message {k} after {prev}");
                }
                let r = (c / 1000) as usize;
                assert!(
                    ms >= last_ms[r],
                    "node {n}: room {r}'s hub timestamps went back"
                );
                last_ms[r] = ms;
            }
            for c in &self.clients {
                for k in 0..c.total {
                    let count = seen.get(&(c.id, k)).copied().unwrap_or(0);
                    assert_eq!(
                        count, 1,
                        "node {n}: client {} message {k} delivered {count}x",
                        c.id
                    );
                }
            }
            let own: u32 = self
                .clients
                .iter()
                .filter(|c| c.node == n)
                .map(|c| c.total)
                .sum();
            let own_got = got
                .iter()
                .filter(|(c, _, _)| (c % 1000) / 100 == n as u32)
                .count();
            assert_eq!(
                own_got, own as usize,
                "node {n}: its own clients' messages come back once each, in hub order"
            );
        }
        // Every provider, the hub's included, sees each room's whole sequence in the one
        // hub order (everyone's messages, its own among them).
        let room_seq = |n: usize, room: u32| -> Vec<(u32, u32)> {
            self.received[n]
                .iter()
                .filter(|(c, _, _)| c / 1000 == room)
                .map(|(c, k, _)| (*c, *k))
                .collect()
        };
        for room in 0..2 {
            assert_eq!(
                room_seq(0, room),
                room_seq(1, room),
                "a and b disagree on room {room}'s order"
            );
            assert_eq!(
                room_seq(0, room),
                room_seq(2, room),
                "a and c disagree on room {room}'s order"
            );
        }
    }

    /// b also hosts a room, followed by a and c; every provider gets senders in it too.
    fn with_second_room(mut self, clients_per_node: u32, msgs: u32) -> Sim {
        let b = &mut self.nodes[1];
        b.relay
            .handle_create_room(
                &mut b.store,
                room2(),
                vec![domain("a.example"), domain("c.example")],
            )
            .expect("room");
        b.store.commit().expect("commit");
        for n in [0, 2] {
            let node = &mut self.nodes[n];
            node.cfg.follows.push(room2());
            node.relay
                .handle_follow_room(&mut node.store, &room2())
                .expect("follow");
            node.store.commit().expect("commit");
        }
        for node in 0..3 {
            for k in 0..clients_per_node {
                self.clients.push(Client {
                    node,
                    room: 1,
                    id: 1000 + node as u32 * 100 + k,
                    next: 0,
                    total: msgs,
                    waiting: false,
                });
                let c = self.clients.len() - 1;
                let at = self.rng.range(0, 5);
                self.schedule(at, Ev::ClientSubmit { client: c });
            }
        }
        self
    }
}

fn room() -> RoomId {
    "mimi://a.example/r/clubhouse".parse().expect("room id")
}

fn room2() -> RoomId {
    "mimi://b.example/r/annex".parse().expect("room id")
}

fn perfect() -> Link {
    Link {
        loss: 0.0,
        min_delay_ms: 1,
        max_delay_ms: 1,
        report_loss: true,
    }
}

#[test]
fn perfect_links_deliver_everything_once_in_order() {
    let mut sim = Sim::new(1, perfect(), 2, 50);
    sim.run(60_000);
    sim.check();
    let stats = sim.nodes[0].relay.stats();
    assert_eq!(stats.accepted, 300);
    assert_eq!(stats.retries, 0);
}

#[test]
fn lossy_reordering_links_lose_and_duplicate_nothing() {
    for seed in 1..=8 {
        let link = Link {
            loss: 0.1,
            min_delay_ms: 1,
            max_delay_ms: 30,
            report_loss: seed % 2 == 0,
        };
        let mut sim = Sim::new(seed, link, 3, 40);
        sim.run(600_000);
        sim.check();
        let s = sim.nodes[0].relay.stats();
        assert!(s.retries > 0, "seed {seed}: 10% loss must cause retries");
    }
}

#[test]
fn follower_restarts_lose_and_duplicate_nothing() {
    let link = Link {
        loss: 0.02,
        min_delay_ms: 1,
        max_delay_ms: 10,
        report_loss: true,
    };
    let mut sim = Sim::new(7, link, 2, 200);
    sim.schedule(150, Ev::Crash { node: 1 });
    sim.schedule(900, Ev::Restart { node: 1 });
    sim.schedule(1500, Ev::Crash { node: 2 });
    sim.schedule(1600, Ev::Restart { node: 2 });
    sim.schedule(2500, Ev::Crash { node: 1 });
    sim.schedule(2520, Ev::Restart { node: 1 });
    sim.run(600_000);
    sim.check();
}

#[test]
fn hub_restart_loses_and_duplicates_nothing() {
    let link = Link {
        loss: 0.0,
        min_delay_ms: 1,
        max_delay_ms: 5,
        report_loss: true,
    };
    let mut sim = Sim::new(11, link, 2, 150);
    sim.schedule(200, Ev::Crash { node: 0 });
    sim.schedule(700, Ev::Restart { node: 0 });
    sim.run(600_000);
    sim.check();
}

#[test]
fn delivery_resumes_within_two_seconds_of_a_peer_coming_back() {
    let mut sim = Sim::new(5, perfect(), 1, 400);
    sim.schedule(100, Ev::Crash { node: 2 });
    // Down for 10 s: long enough for the backoff to reach its cap.
    sim.schedule(10_100, Ev::Restart { node: 2 });
    sim.run_until(10_100);
    let at_restart = sim.received[2].len();
    assert!(at_restart < 800, "c must have missed messages while down");
    while sim.received[2].len() == at_restart && sim.now_ms < 20_000 && sim.advance() {}
    assert!(
        sim.received[2].len() > at_restart,
        "nothing delivered after the restart"
    );
    assert!(
        sim.now_ms <= 12_100,
        "delivery resumed only at {} ms (restart at 10100)",
        sim.now_ms
    );
    sim.run(600_000);
    sim.check();
}

/// Delivery at node `n` where some events may be missing, but only as gaps its hub reported:
/// nothing twice, each sender in order, and delivered + reported gap events = what was sent.
fn check_with_gaps(sim: &Sim, n: usize) -> (usize, u64) {
    let mut seen: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut last_per_client: HashMap<u32, u32> = HashMap::new();
    for &(c, k, _) in &sim.received[n] {
        *seen.entry((c, k)).or_default() += 1;
        if let Some(prev) = last_per_client.insert(c, k) {
            assert!(k > prev, "node {n}: client {c} message {k} after {prev}");
        }
    }
    assert!(
        seen.values().all(|&v| v == 1),
        "node {n}: something delivered twice"
    );
    let expected: u64 = sim.clients.iter().map(|c| c.total as u64).sum();
    let gap_events = sim.nodes[n].relay.stats().gap_events;
    assert_eq!(
        seen.len() as u64 + gap_events,
        expected,
        "node {n}: every event is delivered or inside a gap its hub reported"
    );
    (seen.len(), gap_events)
}

#[test]
fn a_stalled_follower_lags_and_the_room_goes_on() {
    // Before: a full queue to c refused every submission in the room until c came back.
    let mut sim = Sim::new(3, perfect(), 1, 60);
    for n in &mut sim.nodes {
        n.cfg.max_queue = 10;
    }
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    hub.relay = Relay::new(hub.cfg.clone(), hub.store.load().expect("load"), now);
    sim.schedule(0, Ev::Crash { node: 2 });
    // While c is down, a and b get through everything they send: no refusal in the room.
    sim.run_until(2_000);
    let s = sim.nodes[0].relay.stats();
    assert_eq!(s.rejects[relay_core::RejectReason::QueueFull as usize], 0);
    assert!(
        sim.clients[0].next >= 60 && sim.clients[1].next >= 60,
        "a and b sent {} and {} of 60 while c was down",
        sim.clients[0].next,
        sim.clients[1].next
    );
    assert!(s.lagging > 0 && s.lag_dropped > 0);
    sim.schedule(1_000, Ev::Restart { node: 2 });
    sim.run(600_000);
    // b saw everything once and in order (c's 60 it sent while down included).
    let (b_got, b_gaps) = check_with_gaps(&sim, 1);
    assert_eq!((b_got, b_gaps), (180, 0));
    // c saw everything that was not dropped, and was told of every dropped event.
    let (_, c_gaps) = check_with_gaps(&sim, 2);
    let hub = sim.nodes[0].relay.stats();
    assert_eq!(c_gaps, hub.lag_dropped);
    assert!(sim.nodes[2].relay.stats().gaps > 0);
}

#[test]
fn a_hub_that_lost_its_store_is_not_taken_for_a_duplicate() {
    // Before: the new hub numbered from 1, followers answered 201 as for duplicates, and the
    // hub deleted the events. Silent loss.
    let mut sim = Sim::new(41, perfect(), 1, 30);
    sim.run(60_000);
    sim.check();
    sim.crash(0);
    sim.nodes[0].store = MemStore::new();
    sim.restart(0);
    // The hub's config recreates the room at start.
    let n = &mut sim.nodes[0];
    n.relay
        .handle_create_room(
            &mut n.store,
            room(),
            vec![domain("b.example"), domain("c.example")],
        )
        .expect("room");
    for c in 0..3 {
        sim.clients[c].total += 20;
        sim.schedule(20, Ev::ClientSubmit { client: c });
    }
    sim.run(600_000);
    sim.check();
    assert!(sim.nodes[0].relay.stats().resyncs > 0);
}

#[test]
fn a_hub_restored_from_a_backup_reuses_no_number_silently() {
    let mut sim = Sim::new(43, perfect(), 1, 20);
    sim.run(60_000);
    sim.check();
    let backup = sim.nodes[0].store.clone();
    for c in 0..3 {
        sim.clients[c].total += 20;
        sim.schedule(0, Ev::ClientSubmit { client: c });
    }
    sim.run(600_000);
    sim.check();
    // The hub comes back from the older copy, and the room carries on.
    sim.crash(0);
    sim.nodes[0].store = backup;
    sim.restart(0);
    for c in 0..3 {
        sim.clients[c].total += 20;
        sim.schedule(20, Ev::ClientSubmit { client: c });
    }
    sim.run(600_000);
    sim.check();
    let reused: u64 = (1..3).map(|n| sim.nodes[n].relay.stats().reused_seq).sum();
    let resyncs = sim.nodes[0].relay.stats().resyncs;
    assert!(reused + resyncs > 0, "the reuse was noticed");
}

#[test]
fn a_hub_restored_from_a_backup_while_its_followers_were_away_loses_nothing() {
    // The restored hub numbers new events from the backup's point while its followers are
    // away, past the window of one transmit round. Without incarnations, the first answer's
    // cursor (beyond those numbers) acknowledged new events never sent: silent loss.
    let mut sim = Sim::new(47, perfect(), 1, 10);
    sim.run(60_000);
    sim.check();
    let backup = sim.nodes[0].store.clone();
    for c in 0..3 {
        sim.clients[c].total += 60;
        sim.schedule(0, Ev::ClientSubmit { client: c });
    }
    sim.run(600_000);
    sim.check();
    sim.crash(1);
    sim.crash(2);
    sim.crash(0);
    sim.nodes[0].store = backup;
    // One transmit at a time (as over HTTPS): most of the new events wait unsent.
    sim.nodes[0].cfg.pipeline.insert(TransportKind::Quic, 1);
    sim.restart(0);
    // Only the hub's own client can submit while its followers are away.
    sim.clients[0].total += 200;
    sim.schedule(20, Ev::ClientSubmit { client: 0 });
    let t = sim.now_ms + 30_000;
    sim.run_until(t);
    assert_eq!(
        sim.clients[0].next, sim.clients[0].total,
        "the hub took all"
    );
    sim.restart(1);
    sim.restart(2);
    sim.run(1_200_000);
    sim.check();
    // The other incarnation is caught by the hub from the followers' cursors (since every
    // provider gets its own messages too, the cursors run past the restored numbering before
    // the hub's first transmit reaches them), and the hub renumbers.
    assert!(
        sim.nodes[0].relay.stats().resyncs > 0,
        "the hub saw its followers follow another incarnation"
    );
}

#[test]
fn a_hub_restart_keeps_its_numbering_without_resyncs() {
    // An ordinary restart draws a new incarnation; the followers' cursors follow the old one,
    // and the hub's ranges say so: nothing is renumbered.
    let mut sim = Sim::new(53, perfect(), 1, 30);
    sim.run(60_000);
    sim.check();
    sim.crash(0);
    sim.restart(0);
    for c in 0..3 {
        sim.clients[c].total += 30;
        sim.schedule(20, Ev::ClientSubmit { client: c });
    }
    sim.run(600_000);
    sim.check();
    assert_eq!(sim.nodes[0].relay.stats().resyncs, 0);
    let mismatches: u64 = (1..3)
        .map(|n| sim.nodes[n].relay.stats().lineage_mismatches)
        .sum();
    assert_eq!(mismatches, 0);
}

#[test]
fn bad_requests_get_typed_answers_and_change_nothing() {
    let mut sim = Sim::new(9, perfect(), 0, 0);
    let now = sim.now();
    let b = domain("b.example");
    let c = domain("c.example");
    let cases: Vec<(Request, Status)> = vec![
        // malformed TLS-PL
        (
            req(
                &b,
                Endpoint::SubmitMessage,
                room().as_str(),
                None,
                vec![1, 2, 3],
            ),
            Status::BadRequest,
        ),
        // unknown room
        (
            req(
                &b,
                Endpoint::SubmitMessage,
                "mimi://a.example/r/nowhere",
                None,
                submit_body("b.example", 1, 0).to_vec(),
            ),
            Status::NotFound,
        ),
        // sendingUri of another provider than the authenticated one
        (
            req(
                &b,
                Endpoint::SubmitMessage,
                room().as_str(),
                None,
                submit_body("c.example", 1, 0).to_vec(),
            ),
            Status::Forbidden,
        ),
        // oversize body
        (
            req(
                &c,
                Endpoint::SubmitMessage,
                room().as_str(),
                None,
                vec![0; 2 << 20],
            ),
            Status::TooLarge,
        ),
        // a notify for a room whose hub is not the sender
        (
            req(
                &c,
                Endpoint::Notify,
                "mimi://b.example/r/x",
                Some(1),
                vec![0; 16],
            ),
            Status::Forbidden,
        ),
        // a notify for a room nobody here follows: no state kept for it
        (
            req(
                &b,
                Endpoint::Notify,
                "mimi://b.example/r/x",
                Some(1),
                vec![0; 3],
            ),
            Status::NotFound,
        ),
    ];
    for (i, (r, want)) in cases.into_iter().enumerate() {
        let hub = &mut sim.nodes[0];
        hub.relay
            .handle_request(now, &mut hub.store, ReplyToken(i as u64), r);
        match hub.relay.poll_output() {
            Some(Output::Reply { response, .. }) => assert_eq!(response.status, want, "case {i}"),
            other => panic!("case {i}: expected a reply, got {other:?}"),
        }
        assert!(hub.relay.poll_output().is_none());
    }
    assert_eq!(sim.nodes[0].relay.stats().accepted, 0);
    assert_eq!(sim.nodes[0].inbox(0).len(), 0);
}

#[test]
fn a_follower_takes_notify_only_for_rooms_it_follows() {
    // Before: any room under the hub's domain was taken, and a cursor kept for each.
    let mut sim = Sim::new(5, perfect(), 0, 0);
    let now = sim.now();
    let a = domain("a.example");
    let unjoined: RoomId = "mimi://a.example/r/unjoined".parse().expect("room");
    let mut fanout = 1_700_000_000_000u64.to_be_bytes().to_vec();
    fanout.extend_from_slice(&mimi_wire::mls::private_message(
        b"g",
        1,
        b"SIM!\0\0\0\x01\0\0\0\x02",
    ));
    fanout.push(0);
    let ask = |sim: &mut Sim, i: u64| {
        let b = &mut sim.nodes[1];
        let r = req(
            &a,
            Endpoint::Notify,
            unjoined.as_str(),
            Some(1),
            fanout.clone(),
        );
        b.relay.handle_request(now, &mut b.store, ReplyToken(i), r);
        match b.relay.poll_output() {
            Some(Output::Reply { response, .. }) => response.status,
            other => panic!("expected a reply, got {other:?}"),
        }
    };
    assert_eq!(ask(&mut sim, 1), Status::NotFound);
    assert_eq!(sim.nodes[1].inbox(0).len(), 0);
    assert_eq!(
        sim.nodes[1].relay.followed_rooms(),
        vec![room().as_str().to_owned()]
    );
    // A local client sends into the room: from then on its hub's events are taken.
    let b = &mut sim.nodes[1];
    b.relay.handle_client_submit(
        now,
        &mut b.store,
        ReplyToken(2),
        unjoined.as_str(),
        submit_body("b.example", 7, 0),
    );
    while b.relay.poll_output().is_some() {}
    b.store.commit().expect("commit");
    assert_eq!(ask(&mut sim, 3), Status::Created);
    assert_eq!(sim.nodes[1].inbox(0).len(), 1);
    // And the follow outlives a restart.
    sim.crash(1);
    sim.restart(1);
    assert!(
        sim.nodes[1]
            .relay
            .followed_rooms()
            .contains(&unjoined.as_str().to_owned())
    );
    // A room hosted here cannot be followed.
    let b = &mut sim.nodes[1];
    assert!(b.relay.handle_follow_room(&mut b.store, &room2()).is_err());
}

#[test]
fn replayed_submission_is_answered_and_fanned_out_once() {
    let mut sim = Sim::new(4, perfect(), 0, 0);
    let now = sim.now();
    let b = domain("b.example");
    let body = submit_body("b.example", 1, 0).to_vec();
    let mut answers = Vec::new();
    for i in 0..3 {
        let hub = &mut sim.nodes[0];
        let r = req(
            &b,
            Endpoint::SubmitMessage,
            room().as_str(),
            None,
            body.clone(),
        );
        hub.relay
            .handle_request(now, &mut hub.store, ReplyToken(i), r);
        while let Some(out) = hub.relay.poll_output() {
            if let Output::Reply { response, .. } = out {
                answers.push(response);
            }
        }
    }
    assert_eq!(answers.len(), 3);
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "same answer, same timestamp"
    );
    let s = sim.nodes[0].relay.stats();
    assert_eq!((s.accepted, s.dedupe_hits), (1, 2));
    assert_eq!(sim.nodes[0].inbox(0).len(), 1);
}

#[test]
fn replayed_notify_without_sequence_is_delivered_once() {
    let mut sim = Sim::new(4, perfect(), 0, 0);
    let now = sim.now();
    let a = domain("a.example");
    let mut fanout = 1_700_000_000_000u64.to_be_bytes().to_vec();
    fanout.extend_from_slice(&mimi_wire::mls::private_message(
        b"g",
        1,
        b"SIM!\0\0\0\x01\0\0\0\x02",
    ));
    fanout.push(0);
    for i in 0..2 {
        let b = &mut sim.nodes[1];
        let r = req(&a, Endpoint::Notify, room().as_str(), None, fanout.clone());
        b.relay.handle_request(now, &mut b.store, ReplyToken(i), r);
        match b.relay.poll_output() {
            Some(Output::Reply { response, .. }) => assert_eq!(response.status, Status::Created),
            other => panic!("expected 201, got {other:?}"),
        }
    }
    assert_eq!(sim.nodes[1].inbox(0).len(), 1);
    assert_eq!(sim.nodes[1].relay.stats().dedupe_hits, 1);
    let (_, rec) = sim.nodes[1].inbox(0).pop().expect("one event");
    assert_eq!(
        &rec.fanout[..],
        &fanout[..],
        "delivered bytes are exactly the received ones"
    );
}

#[test]
fn a_follower_restart_forgets_no_delivered_bytes() {
    // Before: the window of recent hashes lived in memory only, so after a restart the same
    // FanoutMessage bytes from the hub were delivered again, without a sequence number or
    // under a new one.
    let mut sim = Sim::new(4, perfect(), 0, 0);
    let a = domain("a.example");
    let fanout = |n: u8| {
        let mut f = 1_700_000_000_000u64.to_be_bytes().to_vec();
        let ct = [b'S', b'I', b'M', b'!', 0, 0, 0, 9, 0, 0, 0, n];
        f.extend_from_slice(&mimi_wire::mls::private_message(b"g", 1, &ct));
        f.push(0);
        f
    };
    let notify = |sim: &mut Sim, token: u64, seq: Option<u64>, body: Vec<u8>| {
        let now = sim.now();
        let b = &mut sim.nodes[1];
        let r = req(&a, Endpoint::Notify, room().as_str(), seq, body);
        b.relay
            .handle_request(now, &mut b.store, ReplyToken(token), r);
        b.store.commit().expect("commit");
        let status = match b.relay.poll_output() {
            Some(Output::Reply { response, .. }) => response.status,
            other => panic!("expected a reply, got {other:?}"),
        };
        sim.read_inbox(1);
        status
    };
    let delivered = |sim: &Sim| sim.received[1].len();
    assert_eq!(notify(&mut sim, 1, None, fanout(1)), Status::Created);
    assert_eq!(notify(&mut sim, 2, Some(1), fanout(2)), Status::Created);
    assert_eq!(delivered(&sim), 2);
    sim.crash(1);
    sim.restart(1);
    // The same bytes again, without a number, and under the next number.
    assert_eq!(notify(&mut sim, 3, None, fanout(1)), Status::Created);
    assert_eq!(notify(&mut sim, 4, Some(2), fanout(2)), Status::Created);
    assert_eq!(notify(&mut sim, 5, None, fanout(2)), Status::Created);
    assert_eq!(delivered(&sim), 2, "delivered again after a restart");
    assert_eq!(sim.nodes[1].relay.stats().dedupe_hits, 3);
    // New bytes still go through, and the window stays bounded in the store.
    assert_eq!(notify(&mut sim, 6, Some(3), fanout(3)), Status::Created);
    assert_eq!(delivered(&sim), 3);
    let recent = &sim.nodes[1].store.committed().recent;
    assert_eq!(recent.values().map(|w| w.len()).sum::<usize>(), 3);
}

fn req(
    from: &ProviderDomain,
    endpoint: Endpoint,
    target: &str,
    seq: Option<u64>,
    body: Vec<u8>,
) -> Request {
    Request {
        from: from.clone(),
        transport: TransportKind::Quic,
        endpoint,
        target: target.to_owned(),
        seq,
        lineage: None,
        body: Bytes::from(body),
    }
}

#[test]
fn a_follower_that_lost_its_store_is_told_the_gap_and_gets_new_events() {
    // Before: the hub retried forever with backoff and b got nothing more.
    let mut sim = Sim::new(12, perfect(), 1, 50);
    sim.run(60_000);
    sim.check();
    // b loses everything, as if its data directory were deleted, then a client at a sends more.
    sim.nodes[1].store = MemStore::new();
    sim.schedule(0, Ev::Crash { node: 1 });
    sim.schedule(10, Ev::Restart { node: 1 });
    sim.clients[0].total += 20;
    sim.schedule(20, Ev::ClientSubmit { client: 0 });
    let start = sim.now_ms;
    let before = sim.nodes[0].relay.stats().peers[&domain("b.example")].transmits;
    while sim.now_ms < start + 10_000 && sim.advance() {}
    let after = sim.nodes[0].relay.stats().peers[&domain("b.example")].transmits;
    assert!(
        after - before < 100,
        "{} transmits to b in 10 s",
        after - before
    );
    let hub = sim.nodes[0].relay.stats();
    assert!(hub.resyncs > 0);
    // b was told of the gap (what a sent before the loss) and got the 20 new messages once,
    // though its reader kept its old position: the new store's offsets are past it.
    let b = sim.nodes[1].relay.stats();
    assert_eq!(b.gaps, 1);
    assert_eq!(b.gap_events, 150, "a's 50, c's 50 and b's own 50");
    let from_a: Vec<u32> = sim.received[1]
        .iter()
        .filter(|(c, _, _)| *c == 0)
        .map(|(_, k, _)| *k)
        .collect();
    assert_eq!(from_a, (0..70).collect::<Vec<_>>());
    // c, which kept its state, got the new messages.
    assert_eq!(
        sim.received[2].iter().filter(|(c, _, _)| *c == 0).count(),
        70
    );
}

#[test]
fn a_full_inbox_pushes_back_on_the_hub_and_loses_nothing() {
    let mut sim = Sim::new(21, perfect(), 1, 40);
    for i in 0..3 {
        sim.nodes[i].cfg.max_inbox = 5;
        let now = sim.now();
        let n = &mut sim.nodes[i];
        n.relay = Relay::new(n.cfg.clone(), n.store.load().expect("load"), now);
    }
    // c's local reader is away for 3 s: c's inbox fills up at 5 and the hub must hold the rest.
    sim.nodes[2].reader_away_until = 3_000;
    sim.run(600_000);
    sim.check();
    let full = sim.nodes[2].relay.stats().rejects[relay_core::RejectReason::QueueFull as usize];
    assert!(
        full > 0,
        "c must have refused notifies while its inbox was full"
    );
}

#[test]
fn an_inbox_over_its_memory_bound_is_read_back_once_in_order() {
    // Before: every undelivered record stayed in memory, and a start loaded them all.
    let mut sim = Sim::new(23, perfect(), 2, 40).with_second_room(1, 20);
    let bound = 8 * 1024;
    for i in 0..3 {
        sim.nodes[i].cfg.max_inbox_memory = bound;
        let now = sim.now();
        let n = &mut sim.nodes[i];
        n.relay = Relay::new(n.cfg.clone(), n.store.load().expect("load"), now);
    }
    // c's reader is away while both hubs deliver to it, and c restarts meanwhile: what it
    // holds then is in the store only.
    sim.nodes[2].reader_away_until = 4_000;
    sim.schedule(1_000, Ev::Crash { node: 2 });
    sim.schedule(1_100, Ev::Restart { node: 2 });
    let mut deepest = 0;
    while sim.now_ms < 3_900 && sim.advance() {
        let s = sim.nodes[2].relay.stats();
        assert!(
            s.inbox_resident_bytes <= bound as u64,
            "{} bytes resident, bound {bound}",
            s.inbox_resident_bytes
        );
        deepest = deepest.max(s.inbox_depth);
    }
    // Each record is over 1 KiB: far more were waiting than memory holds.
    assert!(
        deepest > 4 * (bound as u64 / 1024),
        "only {deepest} records waited"
    );
    // The reader is back.
    sim.run_until(4_000);
    sim.now_ms = sim.now_ms.max(4_000);
    sim.read_inbox(2);
    sim.run(600_000);
    sim.check();
}

#[test]
fn one_hub_filling_its_inbox_share_does_not_stop_another() {
    // Before: a full inbox answered 503 to every hub, so one hub flooding it while the local
    // reader was away stopped all the others.
    let mut sim = Sim::new(24, perfect(), 0, 0).with_second_room(0, 0);
    let c = &mut sim.nodes[2];
    c.cfg.max_inbox = 8;
    c.cfg.max_inbox_per_peer = 4;
    // Every durable record leaves memory: the share is counted back from the store too.
    c.cfg.max_inbox_memory = 1;
    let now = sim.now();
    let c = &mut sim.nodes[2];
    c.relay = Relay::new(c.cfg.clone(), c.store.load().expect("load"), now);
    let mut token = 0;
    let mut notify = |sim: &mut Sim, hub: &str, room: &RoomId, n: u8| {
        token += 1;
        let now = sim.now();
        let mut f = 1_700_000_000_000u64.to_be_bytes().to_vec();
        let ct = [b'S', b'I', b'M', b'!', 0, 0, 0, 9, 0, 0, 0, n];
        f.extend_from_slice(&mimi_wire::mls::private_message(b"g", 1, &ct));
        f.push(0);
        let c = &mut sim.nodes[2];
        let r = req(&domain(hub), Endpoint::Notify, room.as_str(), None, f);
        c.relay
            .handle_request(now, &mut c.store, ReplyToken(token), r);
        c.store.commit().expect("commit");
        let next = c.relay.inbox_next();
        c.relay.handle_inbox_durable(next);
        match c.relay.poll_output() {
            Some(Output::Reply { response, .. }) => response,
            other => panic!("expected a reply, got {other:?}"),
        }
    };
    let mut accepted = 0;
    for n in 0..10 {
        let r = notify(&mut sim, "a.example", &room(), n);
        if r.status == Status::Created {
            accepted += 1;
        } else {
            assert_eq!(r.status, Status::Unavailable);
            assert!(r.retry_after.is_some(), "busy answers say when to retry");
        }
    }
    assert_eq!(accepted, 4, "a takes its share and no more");
    let s = sim.nodes[2].relay.stats();
    assert_eq!(s.rejects[relay_core::RejectReason::InboxShare as usize], 6);
    assert_eq!(s.inbox_resident_bytes, 0, "all of it in the store only");
    // b's events still get in.
    assert_eq!(
        notify(&mut sim, "b.example", &room2(), 0).status,
        Status::Created
    );
    // The reader takes two of a's (read back from the store): a has room for two more.
    let c = &mut sim.nodes[2];
    let read = c.inbox(0);
    assert_eq!(read.len(), 5);
    c.relay
        .handle_inbox_read(&mut c.store, read[1].0)
        .expect("trim");
    let statuses: Vec<Status> = (20..23)
        .map(|n| notify(&mut sim, "a.example", &room(), n).status)
        .collect();
    assert_eq!(
        statuses,
        [Status::Created, Status::Created, Status::Unavailable]
    );
    assert_eq!(sim.nodes[2].relay.stats().inbox_depth, 5);
}

#[test]
fn reading_the_inbox_frees_each_hubs_share_by_its_own_records() {
    // Records held in memory, from two hubs interleaved: a trim gives each hub back exactly
    // the records of its own that were read.
    let mut sim = Sim::new(25, perfect(), 0, 0).with_second_room(0, 0);
    let c = &mut sim.nodes[2];
    c.cfg.max_inbox_per_peer = 3;
    let now = sim.now();
    let c = &mut sim.nodes[2];
    c.relay = Relay::new(c.cfg.clone(), c.store.load().expect("load"), now);
    let mut token = 0;
    let mut notify = |sim: &mut Sim, hub: &str, room: &RoomId, n: u8| {
        token += 1;
        let now = sim.now();
        let mut f = 1_700_000_000_000u64.to_be_bytes().to_vec();
        let ct = [b'S', b'I', b'M', b'!', 0, 0, 0, 9, 0, 0, 0, n];
        f.extend_from_slice(&mimi_wire::mls::private_message(b"g", 1, &ct));
        f.push(0);
        let c = &mut sim.nodes[2];
        let r = req(&domain(hub), Endpoint::Notify, room.as_str(), None, f);
        c.relay
            .handle_request(now, &mut c.store, ReplyToken(token), r);
        c.store.commit().expect("commit");
        match c.relay.poll_output() {
            Some(Output::Reply { response, .. }) => response.status,
            other => panic!("expected a reply, got {other:?}"),
        }
    };
    // a, a, b, a, b, b: both shares full.
    let order = [("a.example", 1), ("a.example", 2), ("b.example", 1)];
    let order = order
        .iter()
        .chain(&[("a.example", 3), ("b.example", 2), ("b.example", 3)]);
    for &(hub, n) in order {
        let room = if hub == "a.example" { room() } else { room2() };
        assert_eq!(notify(&mut sim, hub, &room, n), Status::Created);
    }
    assert_eq!(
        notify(&mut sim, "a.example", &room(), 9),
        Status::Unavailable
    );
    assert_eq!(
        notify(&mut sim, "b.example", &room2(), 9),
        Status::Unavailable
    );
    // Read a, a, b: two of a's and one of b's.
    let c = &mut sim.nodes[2];
    let read = c.inbox(0);
    assert_eq!(read.len(), 6);
    c.relay
        .handle_inbox_read(&mut c.store, read[2].0)
        .expect("trim");
    assert_eq!(sim.nodes[2].relay.stats().inbox_depth, 3);
    let a: Vec<Status> = (10..13)
        .map(|n| notify(&mut sim, "a.example", &room(), n))
        .collect();
    assert_eq!(a, [Status::Created, Status::Created, Status::Unavailable]);
    let b: Vec<Status> = (10..12)
        .map(|n| notify(&mut sim, "b.example", &room2(), n))
        .collect();
    assert_eq!(b, [Status::Created, Status::Unavailable]);
}

#[test]
fn batches_shrink_to_a_follower_with_a_small_body_limit() {
    let mut sim = Sim::new(33, perfect(), 2, 60);
    // c accepts bodies of at most 3 KiB: two ~1.1 KiB FanoutMessages, not the hub's 8.
    sim.nodes[2].cfg.limits.max_body = 3 * 1024;
    // One transmit in flight per queue (as over HTTPS), so that events wait and batch up.
    sim.nodes[0].cfg.pipeline.insert(TransportKind::Quic, 1);
    let now = sim.now();
    for n in [0, 2] {
        let node = &mut sim.nodes[n];
        node.relay = Relay::new(node.cfg.clone(), node.store.load().expect("load"), now);
    }
    sim.run(600_000);
    sim.check();
    let c_stats = sim.nodes[2].relay.stats();
    assert!(c_stats.rejects[relay_core::RejectReason::TooLarge as usize] > 0);
}

#[test]
fn a_node_is_hub_of_one_room_and_follower_of_another_through_loss_and_restarts() {
    let link = Link {
        loss: 0.05,
        min_delay_ms: 1,
        max_delay_ms: 20,
        report_loss: true,
    };
    let mut sim = Sim::new(44, link, 2, 40).with_second_room(2, 40);
    sim.schedule(300, Ev::Crash { node: 1 });
    sim.schedule(800, Ev::Restart { node: 1 });
    sim.schedule(1500, Ev::Crash { node: 0 });
    sim.schedule(1700, Ev::Restart { node: 0 });
    sim.run(600_000);
    sim.check();
    // Every message reaches all three providers.
    assert_eq!(
        sim.received.iter().map(Vec::len).sum::<usize>(),
        3 * 12 * 40
    );
}

#[test]
fn a_small_dedupe_window_rotates_and_survives_hub_restarts() {
    for seed in 50..60 {
        small_dedupe_window(seed);
    }
}

fn small_dedupe_window(seed: u64) {
    // One sender per provider. The hub's own sender never loses an answer and submits about
    // once a millisecond, so a remote sender's retry (20-100 ms later) comes after up to ~100
    // newer submissions: a window that remembers at least 128 covers it, and 900 submissions
    // rotate it several times. Lost answers make senders retry, also across the hub's
    // restarts, where only the reloaded window can recognise them.
    let link = Link {
        loss: 0.1,
        min_delay_ms: 1,
        max_delay_ms: 10,
        report_loss: true,
    };
    let mut sim = Sim::new(seed, link, 1, 300);
    sim.nodes[0].cfg.submit_window = 256;
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    hub.relay = Relay::new(hub.cfg.clone(), hub.store.load().expect("load"), now);
    for at in [150, 450, 750, 1050] {
        sim.schedule(at, Ev::Crash { node: 0 });
        sim.schedule(at + 30, Ev::Restart { node: 0 });
    }
    sim.run(600_000);
    sim.check();
    let kept = sim.nodes[0]
        .store
        .committed()
        .rooms
        .values()
        .map(|r| r.seen.len())
        .sum::<usize>();
    assert!(
        kept <= 256,
        "the store keeps at most one window, kept {kept}"
    );
}

#[test]
fn a_burst_of_submissions_leaves_as_one_transmit_per_follower() {
    let mut sim = Sim::new(5, perfect(), 0, 0);
    meet_followers(&mut sim);
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    for k in 0..5 {
        let body = submit_body("a.example", 0, k);
        hub.relay.handle_client_submit(
            now,
            &mut hub.store,
            ReplyToken(u64::from(k)),
            room().as_str(),
            body,
        );
    }
    let mut replies = 0;
    let mut transmits = Vec::new();
    while let Some(out) = hub.relay.poll_output() {
        match out {
            Output::Reply { .. } => replies += 1,
            Output::Transmit(t) => transmits.push((t.dest, t.seq, t.body.len())),
            Output::Probe(_) => {}
        }
    }
    assert_eq!(replies, 5);
    transmits.sort();
    assert_eq!(
        transmits,
        vec![
            (domain("b.example"), Some(2), 5),
            (domain("c.example"), Some(2), 5)
        ],
        "each follower gets the five events in one /notify"
    );
}

/// Runs the hub's timers at `at_ms`: answers its probes (the peer is up) and returns the
/// transmits it sends.
fn hub_step(sim: &mut Sim, at_ms: u64) -> Vec<Transmit> {
    sim.now_ms = at_ms;
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    hub.relay.handle_timeout(now, &mut hub.store);
    let mut out = Vec::new();
    while let Some(o) = hub.relay.poll_output() {
        match o {
            Output::Transmit(t) => out.push(t),
            Output::Probe(p) => hub.relay.handle_probe_outcome(now, &p, true),
            Output::Reply { .. } => {}
        }
    }
    out
}

#[test]
fn a_busy_followers_retry_after_holds_its_queue_that_long() {
    let mut sim = Sim::new(6, perfect(), 0, 0);
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    let body = submit_body("a.example", 0, 0);
    hub.relay
        .handle_client_submit(now, &mut hub.store, ReplyToken(1), room().as_str(), body);
    let first = hub_step(&mut sim, 0);
    let to_b = first
        .iter()
        .find(|t| t.dest == domain("b.example"))
        .expect("a notify to b");
    let retry_after = Duration::from_secs(10);
    let mut busy = Response::error(Status::Unavailable, "busy");
    busy.retry_after = Some(retry_after);
    let hub = &mut sim.nodes[0];
    hub.relay
        .handle_outcome(now, &mut hub.store, to_b.id, Ok(busy));
    // Far longer than the backoff (50 ms doubling to 5 s) and the probe interval (500 ms).
    let mut again = None;
    for ms in (100..=12_000).step_by(100) {
        if let Some(t) = hub_step(&mut sim, ms)
            .into_iter()
            .find(|t| t.dest == domain("b.example"))
        {
            again = Some((ms, t));
            break;
        }
    }
    let (ms, t) = again.expect("the notify goes again after Retry-After");
    assert!(
        Duration::from_millis(ms) >= retry_after,
        "sent again after {ms} ms, before the peer's Retry-After"
    );
    assert_eq!(t.seq, to_b.seq);
}

/// The hub (a) submits messages of its own client 0 (`events` are their counters), then runs
/// its timers every 10 ms up to `until_ms`. b answers each /notify with what `refuse` says, or
/// (`None`) takes it as a follower with a cursor would; c takes everything. Returns what the hub
/// sent b.
fn drive_to_b(
    sim: &mut Sim,
    events: std::ops::Range<u32>,
    until_ms: u64,
    mut refuse: impl FnMut(&Transmit) -> Option<Result<Response, TransportError>>,
) -> Vec<Transmit> {
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    for k in events {
        let body = submit_body("a.example", 0, k);
        hub.relay.handle_client_submit(
            now,
            &mut hub.store,
            ReplyToken(u64::from(k)),
            room().as_str(),
            body,
        );
    }
    let mut to_b = Vec::new();
    let mut cursor = 1u64;
    for ms in (sim.now_ms..=until_ms).step_by(10) {
        let sent = hub_step(sim, ms);
        let now = sim.now();
        let hub = &mut sim.nodes[0];
        for t in sent {
            let outcome = if t.dest != domain("b.example") {
                Ok(created(&t, true))
            } else if let Some(refused) = refuse(&t) {
                refused
            } else {
                let seq = t.seq.expect("seq");
                let mut r = if t.body.is_empty() {
                    // A gap marker: everything before `seq` is gone for us.
                    cursor = cursor.max(seq);
                    Response::new(Status::Created, Bytes::new())
                } else if seq > cursor {
                    Response::error(Status::OutOfOrder, "gap")
                } else {
                    cursor = cursor.max(seq + t.body.len() as u64);
                    Response::new(Status::Created, Bytes::new())
                };
                r.next_seq = Some(cursor);
                Ok(r)
            };
            hub.relay.handle_outcome(now, &mut hub.store, t.id, outcome);
            if t.dest == domain("b.example") {
                to_b.push(t);
            }
        }
        hub.store.commit().expect("commit");
    }
    to_b
}

/// One event (counter 999) to b and c, both answering with our sequence extension: from then on
/// the hub knows they speak it and batches (before, it sends them one event per /notify).
fn meet_followers(sim: &mut Sim) {
    let until = sim.now_ms + 100;
    drive_to_b(sim, 999..1000, until, |_| None);
    let stats = sim.nodes[0].relay.stats();
    assert_eq!(stats.peers[&domain("b.example")].seq_extension, Some(true));
    sim.now_ms += 10;
}

/// 201 to a /notify, with the cursor after it when the follower speaks our extension.
fn created(t: &Transmit, with_seq: bool) -> Response {
    let mut r = Response::new(Status::Created, Bytes::new());
    if with_seq {
        r.next_seq = t.seq.map(|s| s + t.body.len() as u64);
    }
    r
}

/// (seq, counters) of each /notify: what a failed assertion shows instead of the bodies.
fn shape(sent: &[Transmit]) -> Vec<(Option<u64>, Vec<u32>)> {
    sent.iter().map(|t| (t.seq, counters(t))).collect()
}

/// The counters of the events in a /notify.
fn counters(t: &Transmit) -> Vec<u32> {
    t.body.iter().map(|f| marker(f).1).collect()
}

#[test]
fn a_final_refusal_moves_the_event_to_the_dead_letters_and_the_queue_goes_on() {
    // Before: a 4xx held the queue and sent the same events again forever; 410 and 422 were
    // not even answers (the transports took unknown codes for a broken response).
    for code in [400u16, 403, 404, 410, 422, 501] {
        let status = Status::from_http_code(code).expect("a 4xx or 5xx");
        let mut sim = Sim::new(8, perfect(), 0, 0);
        meet_followers(&mut sim);
        // b refuses event 1 for good and takes everything else.
        let sent = drive_to_b(&mut sim, 0..3, 5_000, |t| {
            counters(t)
                .contains(&1)
                .then(|| Ok(Response::error(status, "refused")))
        });
        let stats = sim.nodes[0].relay.stats();
        let b = &stats.peers[&domain("b.example")];
        assert_eq!(b.queue_depth, 0, "{code}: the queue went on");
        assert_eq!(b.msgs_out, 3, "{code}: events 999, 0 and 2 acknowledged");
        assert_eq!(
            b.dead_letters.get(&relay_core::DeadCause::Status(code)),
            Some(&1),
            "{code}: one dead letter"
        );
        assert!(
            b.up && b.failures == 0,
            "{code}: the peer answers: not down"
        );
        let refused = sent.iter().filter(|t| counters(t).contains(&1)).count();
        assert_eq!(
            refused,
            3,
            "{code}: the batch, then event 1 alone, twice: {:?}",
            shape(&sent)
        );
        // The follower was told to move past it: a gap marker at its number.
        assert!(
            sent.iter().any(|t| t.body.is_empty() && t.seq == Some(4)),
            "{code}: gap marker for event 1"
        );
        let snapshot = sim.nodes[0].store.load().expect("load");
        let dead = Relay::dead_letters(&snapshot);
        assert_eq!(dead.len(), 1, "{code}");
        assert_eq!(
            (
                &dead[0].peer,
                &dead[0].room,
                dead[0].cause,
                marker(&dead[0].fanout).1
            ),
            (
                &domain("b.example"),
                &room(),
                relay_core::DeadCause::Status(code),
                1
            )
        );
    }
}

#[test]
fn transient_refusals_are_retried_not_dead_lettered() {
    // 408, 429 (Unavailable to the core), 5xx: b refuses event 1 twice, then takes it. Before,
    // 408 was no answer at all: the peer was counted failed and, after three, probed as down.
    for status in [
        Status::Other(408),
        Status::Unavailable,
        Status::Internal,
        Status::BadGateway,
        Status::Other(504),
    ] {
        let mut sim = Sim::new(9, perfect(), 0, 0);
        meet_followers(&mut sim);
        let mut refusals = 0;
        let sent = drive_to_b(&mut sim, 0..3, 20_000, |t| {
            if counters(t).contains(&1) && refusals < 2 {
                refusals += 1;
                Some(Ok(Response::error(status, "later")))
            } else {
                None
            }
        });
        let stats = sim.nodes[0].relay.stats();
        let b = &stats.peers[&domain("b.example")];
        assert_eq!(
            (b.queue_depth, b.msgs_out),
            (0, 4),
            "{status:?}: {:?}",
            shape(&sent)
        );
        assert!(b.dead_letters.is_empty(), "{status:?}");
        assert!(Relay::dead_letters(&sim.nodes[0].store.load().expect("load")).is_empty());
        if status == Status::Other(408) {
            assert_eq!(b.failures, 0, "408: the peer answered");
        }
    }
}

#[test]
fn too_large_halves_a_batch_and_dead_letters_one_event() {
    // b takes at most 2 KiB: event 1 is made 4 KiB by the hub's own client... every event is
    // ~1.1 KiB, so b refuses any body holding event 1 and everything over 2 KiB.
    let mut sim = Sim::new(10, perfect(), 0, 0);
    meet_followers(&mut sim);
    let sent = drive_to_b(&mut sim, 0..4, 5_000, |t| {
        (counters(t).contains(&1) || t.body_len() > 2048)
            .then(|| Ok(Response::error(Status::TooLarge, "too large")))
    });
    let stats = sim.nodes[0].relay.stats();
    let b = &stats.peers[&domain("b.example")];
    assert_eq!((b.queue_depth, b.msgs_out), (0, 4), "{:?}", shape(&sent));
    assert_eq!(
        b.dead_letters.get(&relay_core::DeadCause::Status(413)),
        Some(&1)
    );
    assert!(
        sent.iter()
            .any(|t| t.body.len() > 1 && counters(t).contains(&1)),
        "a batch holding event 1 went first"
    );
}

#[test]
fn an_endpoint_the_follower_does_not_serve_is_dead_lettered_not_retried() {
    // Before: the queue was held and the event kept (and sent again) forever.
    let mut sim = Sim::new(7, perfect(), 0, 0);
    meet_followers(&mut sim);
    let sent = drive_to_b(&mut sim, 0..2, 5_000, |_| {
        Some(Err(TransportError::Unsupported {
            endpoint: Endpoint::Notify,
            reason: "not listed in the peer's directory".to_owned(),
        }))
    });
    let stats = sim.nodes[0].relay.stats();
    let b = &stats.peers[&domain("b.example")];
    assert!(b.up, "the peer answers: it is not down");
    assert_eq!(b.failures, 0, "not counted as a failed exchange");
    assert_eq!(b.queue_depth, 0, "the queue moved on");
    assert_eq!(
        b.dead_letters.get(&relay_core::DeadCause::Unsupported),
        Some(&2)
    );
    // The batch, then each event alone, twice; no gap marker to a peer without the endpoint.
    assert_eq!(sent.len(), 5, "{:?}", shape(&sent));
    assert!(sent.iter().all(|t| !t.body.is_empty()));
}

#[test]
fn dead_letters_are_bounded_per_peer_oldest_replaced() {
    let mut sim = Sim::new(12, perfect(), 0, 0);
    sim.nodes[0].cfg.max_dead_letters_per_peer = 3;
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    hub.relay = Relay::new(hub.cfg.clone(), hub.store.load().expect("load"), now);
    drive_to_b(&mut sim, 0..5, 5_000, |_| {
        Some(Ok(Response::error(Status::Forbidden, "no")))
    });
    let stats = sim.nodes[0].relay.stats();
    let b = &stats.peers[&domain("b.example")];
    assert_eq!(b.dead_letters_dropped, 2);
    let dead = Relay::dead_letters(&sim.nodes[0].store.load().expect("load"));
    let kept: Vec<u32> = dead.iter().map(|d| marker(&d.fanout).1).collect();
    assert_eq!(kept, [2, 3, 4], "the newest three");
    // A restart numbers on after them, still replacing the oldest.
    sim.crash(0);
    sim.restart(0);
    drive_to_b(&mut sim, 5..6, 10_000, |_| {
        Some(Ok(Response::error(Status::Forbidden, "no")))
    });
    let dead = Relay::dead_letters(&sim.nodes[0].store.load().expect("load"));
    let kept: Vec<(u64, u32)> = dead.iter().map(|d| (d.n, marker(&d.fanout).1)).collect();
    assert_eq!(kept, [(3, 3), (4, 4), (5, 5)]);
}

#[test]
fn a_forwarded_submission_refused_by_the_hub_is_answered_once() {
    // The client gets the hub's own answer (405 was no answer before: 502, retry).
    let mut sim = Sim::new(13, perfect(), 0, 0);
    let now = sim.now();
    for (outcome, code, retry) in [
        (Ok(Response::error(Status::Other(405), "no")), 405, false),
        (
            Err(TransportError::Unsupported {
                endpoint: Endpoint::SubmitMessage,
                reason: "not in the directory".to_owned(),
            }),
            501,
            false,
        ),
        (Err(TransportError::ConnectionLost), 502, true),
    ] {
        let b = &mut sim.nodes[1];
        b.relay.handle_client_submit(
            now,
            &mut b.store,
            ReplyToken(1),
            room().as_str(),
            submit_body("b.example", 1, 0),
        );
        let Some(Output::Transmit(t)) = b.relay.poll_output() else {
            panic!("a forward to the hub");
        };
        b.relay.handle_outcome(now, &mut b.store, t.id, outcome);
        let mut replies = Vec::new();
        while let Some(o) = b.relay.poll_output() {
            match o {
                Output::Reply { response, .. } => replies.push(response),
                Output::Transmit(t) => panic!("sent again: {t:?}"),
                Output::Probe(_) => {}
            }
        }
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].status.http_code(), code);
        assert_eq!(replies[0].retry_after.is_some(), retry, "{code}");
    }
}

#[test]
fn a_follower_without_the_sequence_extension_gets_everything_once_in_order() {
    // c sits behind a proxy that strips MIMI-Seq and MIMI-Next-Seq: its hub must run its queue
    // by the draft's rules alone, through loss, reordering and restarts of both. Before: the
    // hub kept 64 batches in flight and re-batched its resends, so c took events out of order,
    // and a follower deduping whole bodies would have taken resent ones twice.
    for seed in 1..=4 {
        let link = Link {
            loss: 0.05,
            min_delay_ms: 1,
            max_delay_ms: 20,
            report_loss: seed % 2 == 0,
        };
        let mut sim = Sim::new(seed, link, 2, 60);
        sim.strip[2] = true;
        sim.schedule(300, Ev::Crash { node: 2 });
        sim.schedule(600, Ev::Restart { node: 2 });
        sim.schedule(900, Ev::Crash { node: 0 });
        sim.schedule(1200, Ev::Restart { node: 0 });
        sim.run(600_000);
        sim.check();
        assert_eq!(sim.body_clashes, 0, "seed {seed}: a resend in another body");
        let s = sim.nodes[0].relay.stats();
        assert!(s.peers[&domain("c.example")].draft_mode, "seed {seed}");
        assert_eq!(
            s.peers[&domain("b.example")].seq_extension,
            Some(true),
            "seed {seed}: b speaks the extension"
        );
    }
}

#[test]
fn draft_mode_sends_one_event_at_a_time_survives_a_restart_and_ends_with_next_seq() {
    let mut sim = Sim::new(14, perfect(), 0, 0);
    // b answers 201 without next_seq, and a 409 to event 1: not a gap without the extension.
    let sent = drive_to_b(&mut sim, 0..4, 1_000, |t| {
        Some(Ok(if counters(t).contains(&1) {
            Response::error(Status::OutOfOrder, "conflict")
        } else {
            created(t, false)
        }))
    });
    assert_eq!(
        shape(&sent),
        [
            (Some(1), vec![0]),
            (Some(2), vec![1]),
            (Some(2), vec![1]),
            (Some(3), vec![2]),
            (Some(4), vec![3])
        ],
        "one event per /notify, in order, no gap marker"
    );
    let stats = sim.nodes[0].relay.stats();
    let b = &stats.peers[&domain("b.example")];
    assert!(b.draft_mode);
    assert_eq!(
        (
            b.queue_depth,
            b.msgs_out,
            b.dead_letters.get(&relay_core::DeadCause::Status(409))
        ),
        (0, 3, Some(&1))
    );
    // The mode is kept across a restart: the first transmit is one event, and one in flight.
    sim.crash(0);
    sim.restart(0);
    assert!(sim.nodes[0].relay.stats().peers[&domain("b.example")].draft_mode);
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    for k in 10..13 {
        hub.relay.handle_client_submit(
            now,
            &mut hub.store,
            ReplyToken(u64::from(k)),
            room().as_str(),
            submit_body("a.example", 0, k),
        );
    }
    let at = sim.now_ms + 10;
    let to_b: Vec<Transmit> = hub_step(&mut sim, at)
        .into_iter()
        .filter(|t| t.dest == domain("b.example"))
        .collect();
    assert_eq!(shape(&to_b), [(Some(5), vec![10])]);
    // b answers with next_seq again: sequence mode, and the rest goes as one batch.
    let now = sim.now();
    let hub = &mut sim.nodes[0];
    hub.relay
        .handle_outcome(now, &mut hub.store, to_b[0].id, Ok(created(&to_b[0], true)));
    let b = &hub.relay.stats().peers[&domain("b.example")].clone();
    assert!(!b.draft_mode);
    let at = sim.now_ms + 10;
    let to_b: Vec<Transmit> = hub_step(&mut sim, at)
        .into_iter()
        .filter(|t| t.dest == domain("b.example"))
        .collect();
    assert_eq!(shape(&to_b), [(Some(6), vec![11, 12])]);
}
