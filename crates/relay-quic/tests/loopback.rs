//! The QUIC adapter over loopback with generated certificates.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{
    Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_quic::framing::{Body, ChunkQueue, Decoder, Frame, encode_request};
use relay_quic::{ALPN, Congestion, QuicConfig, QuicTransport, codes};
use relay_tls::{PeerTrust, TlsIdentity};

mod common;
use common::{identity, trusting};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

type Outcome = (TransmitId, Result<Response, TransportError>);

/// The node side of the adapter: records everything, answers `201` echoing the body with
/// `next_seq = seq + 1`, optionally only once the gate lets it.
#[derive(Clone)]
struct Fake {
    requests: mpsc::UnboundedSender<Request>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    probes: mpsc::UnboundedSender<(ProviderDomain, bool)>,
    gate: Option<Arc<Semaphore>>,
}

struct FakeRx {
    requests: mpsc::UnboundedReceiver<Request>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    probes: mpsc::UnboundedReceiver<(ProviderDomain, bool)>,
}

fn fake(gate: Option<Arc<Semaphore>>) -> (Fake, FakeRx) {
    let (requests, rq) = mpsc::unbounded_channel();
    let (outcomes, oc) = mpsc::unbounded_channel();
    let (probes, pr) = mpsc::unbounded_channel();
    (
        Fake {
            requests,
            outcomes,
            probes,
            gate,
        },
        FakeRx {
            requests: rq,
            outcomes: oc,
            probes: pr,
        },
    )
}

impl Inbound for Fake {
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send {
        let this = self.clone();
        async move {
            let _ = this.requests.send(request.clone());
            if let Some(gate) = &this.gate {
                let _ = gate.acquire().await.map(|p| p.forget());
            }
            Response {
                status: Status::Created,
                body: request.body,
                next_seq: request.seq.map(|s| s + 1),
                next_inc: None,
                retry_after: None,
            }
        }
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.outcomes.send((id, outcome));
    }

    fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
        let _ = self.probes.send((peer, alive));
    }
}

impl FakeRx {
    async fn outcome(&mut self) -> Outcome {
        timeout(WAIT, self.outcomes.recv())
            .await
            .expect("an outcome in time")
            .expect("open")
    }

    async fn request(&mut self) -> Request {
        timeout(WAIT, self.requests.recv())
            .await
            .expect("a request in time")
            .expect("open")
    }

    async fn probe(&mut self) -> (ProviderDomain, bool) {
        timeout(WAIT, self.probes.recv())
            .await
            .expect("a probe outcome in time")
            .expect("open")
    }

    /// Nothing more arrives for a while: every transmit got exactly one outcome.
    async fn no_more_outcomes(&mut self) {
        let extra = timeout(Duration::from_millis(300), self.outcomes.recv()).await;
        assert!(extra.is_err(), "unexpected extra outcome: {extra:?}");
    }
}

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("valid test domain")
}

fn config(me: &TlsIdentity, trust: PeerTrust, peers: &[(&TlsIdentity, SocketAddr)]) -> QuicConfig {
    QuicConfig {
        identity: me.clone(),
        trust,
        listen: "127.0.0.1:0".parse().expect("addr"),
        peers: peers
            .iter()
            .map(|(id, addr)| (id.domain.clone(), (*addr).into()))
            .collect(),
        max_body: 64 * 1024,
        request_timeout: Duration::from_secs(10),
        congestion: Congestion::default(),
        adapter: Default::default(),
    }
}

fn transmit(id: u64, dest: &ProviderDomain, target: &str, seq: u64, body: Vec<Bytes>) -> Transmit {
    Transmit {
        id: TransmitId(id),
        dest: dest.clone(),
        transport: TransportKind::Quic,
        endpoint: Endpoint::Notify,
        target: target.to_owned(),
        seq: Some(seq),
        lineage: None,
        body,
    }
}

struct Pair {
    a: QuicTransport,
    a_rx: FakeRx,
    b: QuicTransport,
    b_rx: FakeRx,
    b_addr: SocketAddr,
    a_id: TlsIdentity,
    b_id: TlsIdentity,
}

/// Node a sends to node b.
async fn pair(b_gate: Option<Arc<Semaphore>>, tweak: impl Fn(&mut QuicConfig)) -> Pair {
    let a_id = identity("a.example");
    let b_id = identity("b.example");
    let (b_fake, b_rx) = fake(b_gate);
    let mut b_cfg = config(&b_id, trusting(&[&a_id]), &[]);
    tweak(&mut b_cfg);
    let (b, b_addr) = QuicTransport::start(b_cfg, b_fake).await.expect("start b");
    let (a_fake, a_rx) = fake(None);
    let mut a_cfg = config(&a_id, trusting(&[&b_id]), &[(&b_id, b_addr)]);
    tweak(&mut a_cfg);
    let (a, _) = QuicTransport::start(a_cfg, a_fake).await.expect("start a");
    Pair {
        a,
        a_rx,
        b,
        b_rx,
        b_addr,
        a_id,
        b_id,
    }
}

#[tokio::test]
async fn request_response_round_trip() {
    let mut p = pair(None, |_| {}).await;
    let b = p.b_id.domain.clone();
    let body = vec![
        Bytes::from_static(b"fanout-1|"),
        Bytes::from_static(b"fanout-2"),
    ];
    p.a.send(transmit(1, &b, "mimi://b.example/r/room", 5, body));

    let request = p.b_rx.request().await;
    assert_eq!(request.from, p.a_id.domain);
    assert_eq!(request.transport, TransportKind::Quic);
    assert_eq!(request.endpoint, Endpoint::Notify);
    assert_eq!(request.target, "mimi://b.example/r/room");
    assert_eq!(request.seq, Some(5));
    assert_eq!(request.body, Bytes::from_static(b"fanout-1|fanout-2"));

    let (id, outcome) = p.a_rx.outcome().await;
    assert_eq!(id, TransmitId(1));
    let response = outcome.expect("answered");
    assert_eq!(response.status, Status::Created);
    assert_eq!(response.next_seq, Some(6));
    assert_eq!(response.body, Bytes::from_static(b"fanout-1|fanout-2"));
    p.a_rx.no_more_outcomes().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_pipelined_requests_keep_order_and_get_one_outcome_each() {
    pipelined(Congestion::default()).await;
}

#[tokio::test]
async fn every_congestion_controller_carries_the_pipeline() {
    for cc in [Congestion::NewReno, Congestion::Cubic] {
        pipelined(cc).await;
    }
}

async fn pipelined(congestion: Congestion) {
    const N: u64 = 10_000;
    let mut p = pair(None, |c| c.congestion = congestion).await;
    let b = p.b_id.domain.clone();
    for i in 0..N {
        let body = vec![Bytes::from(format!("message {i}").into_bytes())];
        p.a.send(transmit(i, &b, "mimi://b.example/r/busy", i, body));
    }
    for i in 0..N {
        let request = p.b_rx.request().await;
        assert_eq!(request.seq, Some(i), "requests arrive in order");
    }
    let mut seen = HashSet::new();
    for _ in 0..N {
        let (id, outcome) = p.a_rx.outcome().await;
        let response = outcome.expect("answered");
        assert_eq!(response.next_seq, Some(id.0 + 1));
        assert!(seen.insert(id), "one outcome per transmit");
    }
    p.a_rx.no_more_outcomes().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test]
async fn interleaved_rooms_keep_per_room_order() {
    const N: u64 = 2_000;
    let mut p = pair(None, |_| {}).await;
    let b = p.b_id.domain.clone();
    let rooms = [
        "mimi://b.example/r/one",
        "mimi://b.example/r/two",
        "mimi://b.example/r/three",
    ];
    for i in 0..N {
        for (r, room) in rooms.iter().enumerate() {
            p.a.send(transmit(
                i * 3 + r as u64,
                &b,
                room,
                i,
                vec![Bytes::from_static(b"x")],
            ));
        }
    }
    let mut next: HashMap<String, u64> = HashMap::new();
    for _ in 0..N * 3 {
        let request = p.b_rx.request().await;
        let expected = next.entry(request.target.clone()).or_default();
        assert_eq!(
            request.seq,
            Some(*expected),
            "order within {}",
            request.target
        );
        *expected += 1;
    }
    for _ in 0..N * 3 {
        p.a_rx.outcome().await.1.expect("answered");
    }
    p.a_rx.no_more_outcomes().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test]
async fn untrusted_client_certificate_is_refused() {
    let mut p = pair(None, |_| {}).await;
    // Mallory claims a.example, pins b correctly, but b does not pin Mallory's certificate.
    let mallory = identity("a.example");
    let (m_fake, mut m_rx) = fake(None);
    let cfg = config(&mallory, trusting(&[&p.b_id]), &[(&p.b_id, p.b_addr)]);
    let (m, _) = QuicTransport::start(cfg, m_fake)
        .await
        .expect("start mallory");
    let b = p.b_id.domain.clone();
    m.send(transmit(
        1,
        &b,
        "mimi://b.example/r/room",
        0,
        vec![Bytes::from_static(b"evil")],
    ));
    let (_, outcome) = m_rx.outcome().await;
    assert!(
        matches!(
            outcome,
            Err(TransportError::Unreachable(_) | TransportError::ConnectionLost)
        ),
        "{outcome:?}"
    );
    m.probe(&b);
    assert_eq!(m_rx.probe().await, (b, false));
    assert!(
        timeout(Duration::from_millis(300), p.b_rx.requests.recv())
            .await
            .is_err(),
        "no request from an untrusted peer reaches the node"
    );
    m.shutdown().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test]
async fn oversize_body_gets_413_and_the_stream_stays_usable() {
    let mut p = pair(None, |c| c.max_body = 1024).await;
    let b = p.b_id.domain.clone();
    let room = "mimi://b.example/r/room";
    let big = vec![Bytes::from(vec![7u8; 1500]), Bytes::from(vec![8u8; 1500])];
    p.a.send(transmit(1, &b, room, 0, big));
    p.a.send(transmit(2, &b, room, 1, vec![Bytes::from_static(b"small")]));
    let (id, outcome) = p.a_rx.outcome().await;
    assert_eq!(id, TransmitId(1));
    assert_eq!(outcome.expect("answered").status, Status::TooLarge);
    let (id, outcome) = p.a_rx.outcome().await;
    assert_eq!(id, TransmitId(2));
    assert_eq!(outcome.expect("answered").status, Status::Created);
    let request = p.b_rx.request().await;
    assert_eq!(
        request.body,
        Bytes::from_static(b"small"),
        "the oversize body never reached the node"
    );
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test]
async fn unanswered_requests_time_out() {
    let gate = Arc::new(Semaphore::new(0));
    let mut p = pair(Some(gate.clone()), |c| {
        c.request_timeout = Duration::from_millis(500)
    })
    .await;
    let b = p.b_id.domain.clone();
    p.a.send(transmit(
        1,
        &b,
        "mimi://b.example/r/room",
        0,
        vec![Bytes::from_static(b"x")],
    ));
    let (id, outcome) = p.a_rx.outcome().await;
    assert_eq!((id, outcome), (TransmitId(1), Err(TransportError::Timeout)));
    // The late answer is dropped, not reported a second time.
    gate.add_permits(1);
    p.a_rx.no_more_outcomes().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
}

/// A slow but answering stream is not a dead one: requests queued behind others are not
/// timed out (the core would only send them again on the same path) while answers keep
/// coming; once answers stop, what is left times out.
#[tokio::test]
async fn a_stream_that_keeps_answering_does_not_time_out_its_queue() {
    const N: u64 = 12;
    let gate = Arc::new(Semaphore::new(0));
    let mut p = pair(Some(gate.clone()), |c| {
        c.request_timeout = Duration::from_millis(400)
    })
    .await;
    let b = p.b_id.domain.clone();
    for i in 0..N {
        let body = vec![Bytes::from(format!("m{i}").into_bytes())];
        p.a.send(transmit(i, &b, "mimi://b.example/r/slow", i, body));
    }
    // One answer every 100 ms: the last of the first ten is answered ~1 s after its send,
    // well past the 400 ms timeout counted from `send`.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.add_permits(1);
    }
    let mut answered = 0;
    for _ in 0..10 {
        let (id, outcome) = p.a_rx.outcome().await;
        assert!(outcome.is_ok(), "transmit {id:?} got {outcome:?}");
        answered += 1;
    }
    assert_eq!(answered, 10);
    // No more answers: the last two time out, 400 ms after the last answer.
    for _ in 10..N {
        let (id, outcome) = p.a_rx.outcome().await;
        assert!(id.0 >= 10);
        assert_eq!(outcome, Err(TransportError::Timeout));
    }
    p.a_rx.no_more_outcomes().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test]
async fn server_loss_fails_outstanding_and_a_restarted_server_is_reconnected() {
    let gate = Arc::new(Semaphore::new(0));
    let mut p = pair(Some(gate), |_| {}).await;
    let b = p.b_id.domain.clone();
    for i in 0..5 {
        p.a.send(transmit(
            i,
            &b,
            "mimi://b.example/r/room",
            i,
            vec![Bytes::from_static(b"x")],
        ));
    }
    for _ in 0..5 {
        p.b_rx.request().await; // all five are outstanding at b
    }
    p.b.shutdown().await;
    drop(p.b);
    let mut lost = HashSet::new();
    for _ in 0..5 {
        let (id, outcome) = p.a_rx.outcome().await;
        assert_eq!(outcome, Err(TransportError::ConnectionLost));
        assert!(lost.insert(id));
    }
    p.a_rx.no_more_outcomes().await;

    // A new b on the same address; the socket of the old one may take a moment to go.
    let (b_fake, mut b_rx) = fake(None);
    let mut cfg = config(&p.b_id, trusting(&[&p.a_id]), &[]);
    cfg.listen = p.b_addr;
    let mut restarted = None;
    for _ in 0..50 {
        match QuicTransport::start(cfg.clone(), b_fake.clone()).await {
            Ok((t, _)) => {
                restarted = Some(t);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let b2 = restarted.expect("rebind the same port");
    p.a.send(transmit(
        10,
        &b,
        "mimi://b.example/r/room",
        5,
        vec![Bytes::from_static(b"again")],
    ));
    assert_eq!(b_rx.request().await.body, Bytes::from_static(b"again"));
    let (id, outcome) = p.a_rx.outcome().await;
    assert_eq!(id, TransmitId(10));
    assert_eq!(
        outcome.expect("answered after reconnect").status,
        Status::Created
    );
    p.a.shutdown().await;
    b2.shutdown().await;
}

#[tokio::test]
async fn probes_report_liveness() {
    let mut p = pair(None, |c| c.request_timeout = Duration::from_secs(1)).await;
    let b = p.b_id.domain.clone();
    p.a.probe(&b);
    assert_eq!(p.a_rx.probe().await, (b.clone(), true));
    let unknown = domain("nowhere.example");
    p.a.probe(&unknown);
    assert_eq!(p.a_rx.probe().await, (unknown, false));

    p.b.shutdown().await;
    drop(p.b);
    p.a.probe(&b);
    assert_eq!(p.a_rx.probe().await, (b, false));
    p.a.shutdown().await;
}

#[tokio::test]
async fn unknown_destination_and_closed_transport() {
    let mut p = pair(None, |_| {}).await;
    let nowhere = domain("nowhere.example");
    p.a.send(transmit(1, &nowhere, "mimi://x.example/r/room", 0, vec![]));
    assert_eq!(
        p.a_rx.outcome().await,
        (TransmitId(1), Err(TransportError::NoRoute(nowhere)))
    );
    p.a.shutdown().await;
    let b = p.b_id.domain.clone();
    p.a.send(transmit(2, &b, "mimi://b.example/r/room", 0, vec![]));
    assert_eq!(
        p.a_rx.outcome().await,
        (TransmitId(2), Err(TransportError::Closed))
    );
    p.b.shutdown().await;
}

/// A raw client speaking to b: garbage on one stream resets that stream only.
#[tokio::test]
async fn malformed_frame_resets_only_its_stream() {
    let p = pair(None, |_| {}).await;
    let client_tls = relay_tls::client_config(&p.a_id, &trusting(&[&p.b_id]), vec![ALPN.to_vec()])
        .expect("client tls");
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic tls"),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let conn = endpoint
        .connect_with(client, p.b_addr, "b.example")
        .expect("connect")
        .await
        .expect("handshake");

    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&[0, 0, 0, 1, 0xEE])
        .await
        .expect("write garbage");
    let err = recv.read_to_end(1024).await.expect_err("stream reset");
    assert!(
        matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)) if code == quinn::VarInt::from_u32(codes::FRAME_ERROR)),
        "{err:?}"
    );

    // A huge declared body on a new stream: 413, and the stream carries on.
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut wire = BytesMut::new();
    encode_request(
        &mut wire,
        1,
        Endpoint::Notify.code(),
        "mimi://b.example/r/x",
        Some(0),
        u32::MAX as usize - 100,
    )
    .expect("encode");
    send.write_all(&wire).await.expect("write head");
    let mut queue = ChunkQueue::new();
    let mut decoder = Decoder::new(1024);
    let frame = loop {
        if let Some(frame) = decoder.decode(&mut queue).expect("valid frames") {
            break frame;
        }
        let chunk = recv
            .read_chunk(usize::MAX, true)
            .await
            .expect("read")
            .expect("not finished");
        queue.push(chunk.bytes);
    };
    assert!(
        matches!(
            frame,
            Frame::Response {
                id: 1,
                status: 413,
                body: Body::Bytes(_),
                ..
            }
        ),
        "{frame:?}"
    );
    assert!(conn.close_reason().is_none(), "the connection survives");
    drop(p.b_rx);
    conn.close(quinn::VarInt::from_u32(0), b"done");
    p.a.shutdown().await;
    p.b.shutdown().await;
}
