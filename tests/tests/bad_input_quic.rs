//! Bad input from an authenticated peer over QUIC, against a running node: each gets a typed
//! error or the draft's answer on the same room stream, which stays usable, and nothing
//! accepted is lost or delivered twice. The peer is this project's own QUIC adapter.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use mimi_relay_tests::{ROOM, fanout, start_hub, submit_body};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::{SubmitMessageResponse, SubmitStatus};
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{Inbound, Transport};
use relay_core::{Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind};
use relay_node::client::LocalClient;
use relay_quic::{QuicConfig, QuicTransport};
use relay_tls::{PeerTrust, TlsIdentity};
use tokio::sync::mpsc;

#[derive(Clone)]
struct Outcomes(mpsc::UnboundedSender<(TransmitId, Result<Response, TransportError>)>);

impl Inbound for Outcomes {
    async fn request(&self, _: Request) -> Response {
        Response::error(Status::NotFound, "this test peer serves nothing")
    }
    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.0.send((id, outcome));
    }
    fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
}

struct Peer {
    quic: QuicTransport,
    rx: mpsc::UnboundedReceiver<(TransmitId, Result<Response, TransportError>)>,
    next: u64,
}

impl Peer {
    async fn send(
        &mut self,
        endpoint: Endpoint,
        target: &str,
        seq: Option<u64>,
        body: Bytes,
    ) -> Response {
        self.next += 1;
        let id = TransmitId(self.next);
        self.quic.send(Transmit {
            id,
            dest: "a.example".parse().expect("domain"),
            transport: TransportKind::Quic,
            endpoint,
            target: target.to_owned(),
            seq,
            lineage: None,
            body: vec![body],
        });
        let (got, outcome) = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("an outcome in time")
            .expect("outcome channel open");
        assert_eq!(got, id);
        outcome.expect("an answer, not a transport failure")
    }
}

#[tokio::test]
async fn bad_input_over_quic_gets_typed_answers_and_the_stream_survives() {
    let (dir, node) = start_hub("quic").await;

    let p = dir.path();
    let identity = TlsIdentity::load(
        "b.example".parse().expect("domain"),
        p.join("b.example.crt"),
        p.join("b.example.key"),
    )
    .expect("identity");
    let mut trust = PeerTrust::new();
    trust
        .load_pem(
            "a.example".parse().expect("domain"),
            p.join("a.example.crt"),
        )
        .expect("trust");
    let (tx, rx) = mpsc::unbounded_channel();
    let cfg = QuicConfig {
        identity,
        trust,
        listen: "127.0.0.1:0".parse().expect("addr"),
        peers: BTreeMap::from([(
            "a.example".parse().expect("domain"),
            node.listening[&relay_core::TransportKind::Quic].into(),
        )]),
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(5),
        congestion: Default::default(),
        adapter: Default::default(),
    };
    let (quic, _) = QuicTransport::start(cfg, Outcomes(tx))
        .await
        .expect("peer transport");
    let mut b = Peer { quic, rx, next: 0 };

    // All on the room's one stream: each answer typed, the stream still serving the next.
    let r = b
        .send(
            Endpoint::SubmitMessage,
            ROOM,
            None,
            Bytes::from_static(&[1, 0xff, 0xff]),
        )
        .await;
    assert_eq!(r.status, Status::BadRequest, "malformed TLS-PL");
    let r = b
        .send(
            Endpoint::SubmitMessage,
            ROOM,
            None,
            Bytes::from(vec![0; 100_000]),
        )
        .await;
    assert_eq!(r.status, Status::TooLarge, "oversize body");
    let r = b
        .send(
            Endpoint::SubmitMessage,
            ROOM,
            None,
            submit_body("c.example", 1),
        )
        .await;
    assert_eq!(
        r.status,
        Status::Forbidden,
        "a user of another provider than the certificate's"
    );
    let r = b
        .send(
            Endpoint::SubmitMessage,
            "mimi://a.example/r/nowhere",
            None,
            submit_body("b.example", 1),
        )
        .await;
    assert_eq!(r.status, Status::NotFound, "unknown room");
    let first = b
        .send(
            Endpoint::SubmitMessage,
            ROOM,
            None,
            submit_body("b.example", 9),
        )
        .await;
    let replay = b
        .send(
            Endpoint::SubmitMessage,
            ROOM,
            None,
            submit_body("b.example", 9),
        )
        .await;
    assert_eq!(first.status, Status::Ok);
    assert_eq!(first, replay, "a replay gets the original answer");
    let resp = SubmitMessageResponse::decode(&first.body).expect("a SubmitMessageResponse");
    assert!(matches!(resp.status, SubmitStatus::Accepted { .. }));

    // /notify for a room b hosts, replayed: 201 both times, delivered once.
    let event = fanout(1_700_000_000_000, b"hello from b");
    for _ in 0..2 {
        let r = b
            .send(
                Endpoint::Notify,
                "mimi://b.example/r/x",
                Some(1),
                Bytes::from(event.clone()),
            )
            .await;
        assert_eq!((r.status, r.next_seq), (Status::Created, Some(2)));
    }
    // A gap is refused with where to resume.
    let r = b
        .send(
            Endpoint::Notify,
            "mimi://b.example/r/x",
            Some(5),
            Bytes::from(event.clone()),
        )
        .await;
    assert_eq!((r.status, r.next_seq), (Status::OutOfOrder, Some(2)));

    let items = LocalClient::new(node.admin)
        .inbox(0, 100, 0)
        .await
        .expect("inbox");
    assert_eq!(
        items.len(),
        2,
        "the accepted submission and the notify, once each"
    );
    assert_eq!(&items[1].fanout[..], &event[..], "exact bytes");

    b.quic.shutdown().await;
    node.shutdown().await.expect("clean shutdown");
}
