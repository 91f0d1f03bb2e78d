//! A follower forwards its local clients' requests to a room's hub in the order the clients
//! made them: over a transport that does not keep a room's requests in order (HTTPS, whose
//! HTTP/2 streams the hub serves concurrently) one at a time, over one that does (QUIC)
//! pipelined; and each client gets the hub's answer to its own request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::{SubmitMessageResponse, SubmitStatus};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response, Status, Store,
    Transmit, TransportError, TransportKind,
};

const UNIX_BASE_MS: u64 = 1_700_000_000_000;
const MAGIC: &[u8; 4] = b"FWD!";

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("test domain")
}

fn room() -> RoomId {
    "mimi://a.example/r/clubhouse".parse().expect("room id")
}

/// A valid SubmitMessageRequest from b's user whose ciphertext carries `n`.
fn submit_body(n: u32) -> Bytes {
    let mut ct = Vec::with_capacity(256);
    ct.extend_from_slice(MAGIC);
    ct.extend_from_slice(&n.to_be_bytes());
    ct.resize(256, 0xab);
    let mls = mimi_wire::mls::private_message(b"room-group", 1, &ct);
    let uri = "mimi://b.example/u/alice";
    let mut body = vec![1u8]; // Protocol mls10
    body.extend_from_slice(&mls);
    body.push(uri.len() as u8);
    body.extend_from_slice(uri.as_bytes());
    Bytes::from(body)
}

/// The `n` of `submit_body(n)` inside a FanoutMessage or a forwarded body.
fn marker(bytes: &[u8]) -> u32 {
    let at = bytes
        .windows(4)
        .position(|w| w == MAGIC)
        .expect("marker in payload");
    u32::from_be_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"))
}

/// Hub a hosting `room()`, and its follower b, both reaching the other over `kind`.
struct Pair {
    base: Instant,
    ms: u64,
    a: Relay,
    a_store: MemStore,
    b: Relay,
    b_store: MemStore,
}

impl Pair {
    fn new(kind: TransportKind) -> Pair {
        let base = Instant::now();
        let now = Now {
            mono: base,
            unix_ms: UNIX_BASE_MS,
        };
        let cfg_a = RelayConfig::new(domain("a.example")).with_route(domain("b.example"), kind);
        let mut a_store = MemStore::new();
        let mut a = Relay::new(cfg_a, a_store.load().expect("load"), now);
        a.handle_create_room(&mut a_store, room(), vec![domain("b.example")])
            .expect("room");
        a_store.commit().expect("commit");
        let cfg_b = RelayConfig::new(domain("b.example")).with_route(domain("a.example"), kind);
        let mut b_store = MemStore::new();
        let b = Relay::new(cfg_b, b_store.load().expect("load"), now);
        b_store.commit().expect("commit");
        Pair {
            base,
            ms: 0,
            a,
            a_store,
            b,
            b_store,
        }
    }

    /// Each input one millisecond after the last, so that the hub's answers differ.
    fn now(&mut self) -> Now {
        self.ms += 1;
        Now {
            mono: self.base + Duration::from_millis(self.ms),
            unix_ms: UNIX_BASE_MS + self.ms,
        }
    }

    /// b's transmits to the hub and its replies to local clients, as they are now.
    fn drain_b(&mut self) -> (Vec<Transmit>, Vec<(ReplyToken, Response)>) {
        self.b_store.commit().expect("commit");
        let (mut sent, mut replies) = (Vec::new(), Vec::new());
        while let Some(o) = self.b.poll_output() {
            match o {
                Output::Transmit(t) if t.endpoint != Endpoint::Notify => sent.push(t),
                Output::Reply { token, response } => replies.push((token, response)),
                _ => {}
            }
        }
        (sent, replies)
    }

    /// Hands `t` to the hub and returns its answer.
    fn serve_at_hub(&mut self, t: &Transmit) -> Response {
        let now = self.now();
        let req = Request {
            from: domain("b.example"),
            transport: t.transport,
            endpoint: t.endpoint,
            target: t.target.clone(),
            seq: None,
            lineage: None,
            body: t.body[0].clone(),
        };
        self.a
            .handle_request(now, &mut self.a_store, ReplyToken(t.id.0), req);
        self.a_store.commit().expect("commit");
        let mut answer = None;
        while let Some(o) = self.a.poll_output() {
            if let Output::Reply { response, .. } = o {
                answer = Some(response);
            }
        }
        answer.expect("the hub answers")
    }

    /// The markers of the hub's own inbox, in the hub's order.
    fn hub_order(&self) -> Vec<u32> {
        self.a
            .read_inbox(&self.a_store, relay_core::InboxQuery::after(0))
            .expect("inbox")
            .iter()
            .map(|(_, r)| marker(&r.fanout))
            .collect()
    }
}

fn accepted_ms(r: &Response) -> u64 {
    assert_eq!(r.status, Status::Ok, "{r:?}");
    match SubmitMessageResponse::decode(&r.body)
        .expect("a SubmitMessageResponse")
        .status
    {
        SubmitStatus::Accepted {
            accepted_timestamp, ..
        } => accepted_timestamp,
        other => panic!("not accepted: {other:?}"),
    }
}

#[test]
fn forwards_reach_the_hub_in_the_clients_order_over_a_transport_that_reorders() {
    // Before: b sent both at once, and a hub serving them in parallel took 2 before 1.
    let mut p = Pair::new(TransportKind::Https);
    let now = p.now();
    for n in 1..=3 {
        p.b.handle_client_submit(
            now,
            &mut p.b_store,
            ReplyToken(u64::from(n)),
            room().as_str(),
            submit_body(n),
        );
    }
    let mut sent_order = Vec::new();
    let mut answers: HashMap<ReplyToken, Response> = HashMap::new();
    let mut accepted_at: HashMap<u32, u64> = HashMap::new();
    let mut most_in_flight = 0;
    for _ in 0..10 {
        let (sent, replies) = p.drain_b();
        answers.extend(replies);
        if sent.is_empty() {
            break;
        }
        most_in_flight = most_in_flight.max(sent.len());
        // The transport completes what is in flight in reverse order (the worst it may do).
        for t in sent.iter().rev() {
            sent_order.push(marker(&t.body[0]));
            let answer = p.serve_at_hub(t);
            accepted_at.insert(marker(&t.body[0]), accepted_ms(&answer));
            let now = p.now();
            p.b.handle_outcome(now, &mut p.b_store, t.id, Ok(answer));
        }
    }
    assert_eq!(
        p.hub_order(),
        [1, 2, 3],
        "the hub ordered them as the clients sent them"
    );
    assert_eq!(sent_order, [1, 2, 3]);
    assert_eq!(
        most_in_flight, 1,
        "one forward in flight per room over HTTPS"
    );
    for n in 1..=3u32 {
        let answer = answers
            .get(&ReplyToken(u64::from(n)))
            .expect("every client is answered");
        assert_eq!(
            accepted_ms(answer),
            accepted_at[&n],
            "client {n} gets the hub's answer to its own submission"
        );
    }
}

#[test]
fn forwards_are_pipelined_over_a_transport_that_keeps_a_rooms_order() {
    let mut p = Pair::new(TransportKind::Quic);
    let now = p.now();
    for n in 1..=3 {
        p.b.handle_client_submit(
            now,
            &mut p.b_store,
            ReplyToken(u64::from(n)),
            room().as_str(),
            submit_body(n),
        );
    }
    let (sent, _) = p.drain_b();
    let order: Vec<u32> = sent.iter().map(|t| marker(&t.body[0])).collect();
    assert_eq!(order, [1, 2, 3], "all in flight at once, in order");
    for t in &sent {
        let answer = p.serve_at_hub(t);
        let now = p.now();
        p.b.handle_outcome(now, &mut p.b_store, t.id, Ok(answer));
    }
    let (more, replies) = p.drain_b();
    assert!(more.is_empty());
    assert_eq!(replies.len(), 3);
    assert_eq!(p.hub_order(), [1, 2, 3]);
}

#[test]
fn a_failed_forward_is_answered_before_the_next_one_leaves() {
    // Updates share the room's queue with submissions: a commit is never overtaken.
    let mut p = Pair::new(TransportKind::Https);
    let now = p.now();
    p.b.handle_client_submit(
        now,
        &mut p.b_store,
        ReplyToken(1),
        room().as_str(),
        submit_body(1),
    );
    p.b.handle_client_request(
        now,
        &mut p.b_store,
        ReplyToken(2),
        Endpoint::Update,
        room().as_str(),
        Bytes::from_static(b"an update"),
    );
    p.b.handle_client_submit(
        now,
        &mut p.b_store,
        ReplyToken(3),
        room().as_str(),
        submit_body(3),
    );
    let (sent, replies) = p.drain_b();
    assert!(replies.is_empty());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].endpoint, Endpoint::SubmitMessage);
    // The first is lost: its client is told to retry, and only then does the update leave.
    let now = p.now();
    p.b.handle_outcome(
        now,
        &mut p.b_store,
        sent[0].id,
        Err(TransportError::ConnectionLost),
    );
    let (sent, replies) = p.drain_b();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, ReplyToken(1));
    assert_eq!(replies[0].1.status, Status::BadGateway);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].endpoint, Endpoint::Update);
    // Its deadline passes: the timeout is its outcome, and the last submission leaves.
    let later = Now {
        mono: p.base + Duration::from_secs(60),
        unix_ms: UNIX_BASE_MS + 60_000,
    };
    p.b.handle_timeout(later, &mut p.b_store);
    let (sent, replies) = p.drain_b();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, ReplyToken(2));
    assert_eq!(sent.len(), 1);
    assert_eq!(marker(&sent[0].body[0]), 3);
    let answer = p.serve_at_hub(&sent[0]);
    let now = p.now();
    p.b.handle_outcome(now, &mut p.b_store, sent[0].id, Ok(answer));
    let (sent, replies) = p.drain_b();
    assert!(sent.is_empty());
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, ReplyToken(3));
    assert_eq!(p.hub_order(), [3]);
}

#[test]
fn a_malformed_room_id_is_refused_at_the_edge() {
    // Parsed once where it comes in: a peer's /submitMessage and /update, a local client's
    // submission; before, a peer's garbage target was looked up as a string and got 404.
    let mut p = Pair::new(TransportKind::Https);
    for endpoint in [Endpoint::SubmitMessage, Endpoint::Update] {
        let now = p.now();
        let req = Request {
            from: domain("b.example"),
            transport: TransportKind::Https,
            endpoint,
            target: "not a room".to_owned(),
            seq: None,
            lineage: None,
            body: submit_body(1),
        };
        p.a.handle_request(now, &mut p.a_store, ReplyToken(9), req);
        let Some(Output::Reply { response, .. }) = p.a.poll_output() else {
            panic!("an answer");
        };
        assert_eq!(response.status, Status::BadRequest, "{endpoint:?}");
        assert_eq!(&response.body[..], b"not a room URI");
    }
    let now = p.now();
    p.b.handle_client_submit(
        now,
        &mut p.b_store,
        ReplyToken(1),
        "mimi://a.example/u/not-a-room",
        submit_body(1),
    );
    let (sent, replies) = p.drain_b();
    assert!(sent.is_empty(), "nothing forwarded");
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].1.status, Status::BadRequest);
    let malformed = |r: &Relay| r.stats().rejects[relay_core::RejectReason::Malformed as usize];
    assert_eq!(malformed(&p.a), 2);
    assert_eq!(malformed(&p.b), 1);
    assert!(
        p.b.followed_rooms().is_empty(),
        "no state for a bad room id"
    );
}
