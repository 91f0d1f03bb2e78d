//! The relay's BBR at a connection's first burst: quinn's BBR took its first ProbeRTT at the
//! first acknowledgement that was not application-limited, cutting the window to a few packets
//! for 200 ms just as load arrived (the relay's start-up latency tail).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{AdapterStats, Inbound, Limits};
use relay_core::transport::{Request, Response, Status, TransmitId, TransportError};
use relay_quic::framing::encode_request;
use relay_quic::{ALPN, Congestion, QuicConfig, QuicTransport};

mod common;
use common::{identity, trusting};

#[derive(Clone)]
struct Answer;

impl Inbound for Answer {
    async fn request(&self, request: Request) -> Response {
        Response {
            status: Status::Created,
            body: Bytes::new(),
            next_seq: request.seq.map(|s| s + 1),
            next_inc: None,
            retry_after: None,
        }
    }
    fn outcome(&self, _: TransmitId, _: Result<Response, TransportError>) {}
    fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_burst_keeps_bbrs_window() {
    let a = identity("a.example");
    let b = identity("b.example");
    let cfg = QuicConfig {
        identity: b.clone(),
        trust: trusting(&[&a]),
        listen: "127.0.0.1:0".parse().expect("addr"),
        peers: Default::default(),
        max_body: 64 * 1024,
        request_timeout: Duration::from_secs(5),
        congestion: Congestion::Bbr,
        adapter: relay_adapter::AdapterContext {
            limits: Limits::default(),
            stats: Arc::new(AdapterStats::default()),
            pacer: Default::default(),
        },
    };
    let (server, addr) = QuicTransport::start(cfg, Answer).await.expect("start");

    let tls = relay_tls::client_config(&a, &trusting(&[&b]), vec![ALPN.to_vec()]).expect("tls");
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
    ));
    let mut transport = quinn::TransportConfig::default();
    Congestion::Bbr.apply(&mut transport);
    client.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let conn = endpoint
        .connect_with(client, addr, "b.example")
        .expect("connect")
        .await
        .expect("handshake");
    let initial = conn.stats().path.cwnd;
    // Idle after the handshake, as a relay's connection is between its first message and load.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let reader =
        tokio::spawn(
            async move { while let Ok(Some(_)) = recv.read_chunk(usize::MAX, true).await {} },
        );
    let body = Bytes::from(vec![7u8; 1024]);
    let mut out = Vec::new();
    for id in 0..1024u64 {
        let mut head = BytesMut::new();
        encode_request(
            &mut head,
            id,
            Endpoint::Notify.code(),
            "mimi://b.example/r/room",
            Some(id + 1),
            body.len(),
        )
        .expect("encode");
        out.push(head.freeze());
        out.push(body.clone());
    }
    let t0 = Instant::now();
    let sampler = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while t0.elapsed() < Duration::from_millis(300) {
                samples.push((t0.elapsed().as_millis(), conn.stats().path.cwnd));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples
        })
    };
    send.write_all_chunks(&mut out).await.expect("write");
    let samples = sampler.await.expect("sampler");
    // Before the fix the window fell to the floor (10 packets) for about 200 ms at the
    // burst's first acknowledgements; BBR's Startup only ever grows it.
    let min = samples.iter().map(|s| s.1).min().expect("samples");
    assert!(
        min * 2 >= initial,
        "window fell from {initial} to {min} B under the first burst: {samples:?}"
    );
    reader.abort();
    server.shutdown().await;
}
