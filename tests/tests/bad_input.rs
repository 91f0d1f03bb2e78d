//! Bad input from an authenticated peer over the draft's HTTPS binding, against a running node:
//! each gets a typed error or the draft's answer, the connection stays usable, and nothing
//! accepted is lost or delivered twice.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mimi_relay_tests::{ROOM, fanout, start_hub, submit_body};
use mimi_wire::proto::{SubmitMessageResponse, SubmitStatus};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_node::client::LocalClient;
use relay_tls::{PeerTrust, TlsIdentity};

struct Peer {
    send: SendRequest<Full<Bytes>>,
}

impl Peer {
    /// Connects to `addr` as `me` over HTTP/2 with mutual TLS.
    async fn connect(dir: &std::path::Path, me: &str, addr: SocketAddr) -> Peer {
        let domain: ProviderDomain = me.parse().expect("domain");
        let id = TlsIdentity::load(
            domain,
            dir.join(format!("{me}.crt")),
            dir.join(format!("{me}.key")),
        )
        .expect("identity");
        let mut trust = PeerTrust::new();
        trust
            .load_pem(
                "a.example".parse().expect("domain"),
                dir.join("a.example.crt"),
            )
            .expect("trust");
        let tls =
            relay_tls::client_config(&id, &trust, vec![b"h2".to_vec()]).expect("client config");
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("a.example").expect("name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .expect("tls");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        Peer { send }
    }

    async fn post(
        &mut self,
        from: &str,
        endpoint: &str,
        target: &str,
        seq: Option<u64>,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let seg = RoomId::parse(target)
            .map(|r| r.to_path_segment())
            .unwrap_or_else(|_| target.to_owned());
        let mut req = Request::post(format!("https://a.example/v1/{endpoint}/{seg}"))
            .header("from", format!("mimi@{from}"));
        if let Some(s) = seq {
            req = req.header("mimi-seq", s.to_string());
        }
        let req = req.body(Full::new(body.into())).expect("request");
        self.send.ready().await.expect("connection still usable");
        let resp = self
            .send
            .send_request(req)
            .await
            .expect("an answer, not a dead connection");
        let status = resp.status();
        (
            status,
            resp.into_body().collect().await.expect("body").to_bytes(),
        )
    }
}

#[tokio::test]
async fn bad_input_gets_typed_answers_and_the_connection_survives() {
    let (dir, node) = start_hub("https").await;
    let addr = node.listening[&relay_core::TransportKind::Https];
    let mut b = Peer::connect(dir.path(), "b.example", addr).await;

    // Malformed TLS-PL.
    let (s, reason) = b
        .post(
            "b.example",
            "submitMessage",
            ROOM,
            None,
            vec![1, 0xff, 0xff],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{reason:?}");
    // Oversize body (the node's limit is 64 KiB).
    let (s, _) = b
        .post("b.example", "submitMessage", ROOM, None, vec![0; 100_000])
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // Unknown room.
    let (s, _) = b
        .post(
            "b.example",
            "submitMessage",
            "mimi://a.example/r/nowhere",
            None,
            submit_body("b.example", 1),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The source domain (From) does not match the certificate.
    let (s, _) = b
        .post(
            "c.example",
            "submitMessage",
            ROOM,
            None,
            submit_body("c.example", 1),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The sending user belongs to another provider than the authenticated one.
    let (s, _) = b
        .post(
            "b.example",
            "submitMessage",
            ROOM,
            None,
            submit_body("c.example", 1),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // A valid submission, then the same body replayed: the same answer, accepted once.
    let (s1, r1) = b
        .post(
            "b.example",
            "submitMessage",
            ROOM,
            None,
            submit_body("b.example", 7),
        )
        .await;
    let (s2, r2) = b
        .post(
            "b.example",
            "submitMessage",
            ROOM,
            None,
            submit_body("b.example", 7),
        )
        .await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(
        r1, r2,
        "a replay gets the original answer, timestamp included"
    );
    let resp = SubmitMessageResponse::decode(&r1).expect("a SubmitMessageResponse");
    assert!(matches!(resp.status, SubmitStatus::Accepted { .. }));

    // /notify for a room b hosts: replayed with and without our sequence header.
    let event = fanout(1_700_000_000_000, b"hello from b");
    for _ in 0..2 {
        let (s, _) = b
            .post(
                "b.example",
                "notify",
                "mimi://b.example/r/x",
                Some(1),
                event.clone(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let mut other = event.clone();
    other[7] ^= 1; // another timestamp: another event
    for _ in 0..2 {
        let (s, _) = b
            .post(
                "b.example",
                "notify",
                "mimi://b.example/r/y",
                None,
                other.clone(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    // A notify for a room whose hub is not the sender.
    let (s, _) = b
        .post(
            "b.example",
            "notify",
            "mimi://c.example/r/z",
            Some(1),
            event.clone(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // What reached the local inbox: the submission once, each notify once, bytes unchanged.
    let mut api = LocalClient::new(node.admin);
    let items = api.inbox(0, 100, 0).await.expect("inbox");
    assert_eq!(
        items.len(),
        3,
        "one accepted submission and two distinct notifies"
    );
    assert!(
        items[0].fanout.ends_with(
            &mimi_wire::mls::private_message(b"g", 1, &[7; 300])
                .iter()
                .copied()
                .chain([0])
                .collect::<Vec<_>>()
        )
    );
    assert_eq!(&items[1].fanout[..], &event[..]);
    assert_eq!(&items[2].fanout[..], &other[..]);

    let (_, metrics) = api.get("/metrics").await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "mimi_relay_accepted_total 1",
        "mimi_relay_dedupe_hits_total 3",
        "mimi_relay_rejects_total{reason=\"malformed\"} 1",
        "mimi_relay_rejects_total{reason=\"unknown_room\"} 1",
        "mimi_relay_rejects_total{reason=\"forbidden\"} 2",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    node.shutdown().await.expect("clean shutdown");
}
