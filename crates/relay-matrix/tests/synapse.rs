//! Federation with a real Synapse on loopback, both directions. Started by
//! `interop/run.sh synapse`, which runs Synapse and passes it here through the environment:
//! `MIMI_SYNAPSE_CLIENT` (client API base, plain HTTP), `MIMI_SYNAPSE_FEDERATION` (federation
//! listener address), `MIMI_SYNAPSE_SERVER_NAME`, `MIMI_SYNAPSE_CERT` (its TLS certificate, PEM).
//! Without Synapse the test is ignored, and says why; `interop/run.sh synapse` runs it with
//! `--ignored`, and then a missing variable is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Method};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use relay_matrix::{MatrixConfig, MatrixPeer, MatrixTransport, SigningKey};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MIMI_TYPE: &str = "org.mimi-relay.message";

struct Env {
    client: SocketAddr,
    federation: SocketAddr,
    server_name: String,
    cert: String,
}

fn env() -> Option<Env> {
    let var = |k: &str| std::env::var(k).ok();
    Some(Env {
        client: var("MIMI_SYNAPSE_CLIENT")?.parse().ok()?,
        federation: var("MIMI_SYNAPSE_FEDERATION")?.parse().ok()?,
        server_name: var("MIMI_SYNAPSE_SERVER_NAME")?,
        cert: std::fs::read_to_string(var("MIMI_SYNAPSE_CERT")?).ok()?,
    })
}

/// One plain HTTP/1.1 request to Synapse's client API.
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(driver);
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(serde_json::to_vec(&body).unwrap())
    };
    let mut req = http::Request::new(Full::new(bytes));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().unwrap();
    let h = req.headers_mut();
    h.insert(
        http::header::HOST,
        HeaderValue::from_str(&addr.to_string()).unwrap(),
    );
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(t) = token {
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
    }
    let resp = conn.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a running Synapse: `interop/run.sh synapse` installs, starts and runs it"]
async fn synapse_federates_with_the_relay_both_ways() {
    let env = env().expect(
        "MIMI_SYNAPSE_CLIENT, MIMI_SYNAPSE_FEDERATION, MIMI_SYNAPSE_SERVER_NAME and MIMI_SYNAPSE_CERT must be set",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();

    // The relay: a Matrix server named by its loopback address, so Synapse needs no DNS.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = listener.local_addr().unwrap();
    drop(listener);
    let relay_name = format!("127.0.0.1:{}", listen.port());
    let ours = domain("relay.test");
    let theirs = domain("synapse.test");
    let g = relay_tls::generate(&ours).unwrap();
    let mut trust = relay_tls::PeerTrust::new();
    trust.add_pem(theirs.clone(), &env.cert).unwrap();
    let (sink, mut edus) = mpsc::unbounded_channel();
    let rec = Recorder::default();
    let (relay, _) = MatrixTransport::start(
        MatrixConfig {
            identity: identity(&ours, &g),
            trust,
            signing_key: SigningKey::from_seed([42; 32]).unwrap(),
            server_name: relay_name.clone(),
            listen,
            peers: BTreeMap::from([(
                theirs.clone(),
                MatrixPeer {
                    server_name: env.server_name.clone(),
                    addr: env.federation.into(),
                },
            )]),
            request_timeout: Duration::from_secs(10),
            edu_sink: Some(sink),
            adapter: Default::default(),
        },
        rec.clone(),
    )
    .await
    .unwrap();

    // A Synapse user.
    let user = format!("alice{}", std::process::id());
    let (s, reg) = call(
        env.client,
        Method::POST,
        "/_matrix/client/v3/register",
        None,
        json!({"username": user, "password": "interop-pass-1", "auth": {"type": "m.login.dummy"}}),
    )
    .await;
    assert_eq!(s, 200, "register: {reg}");
    let token = reg["access_token"].as_str().unwrap().to_owned();
    let alice = reg["user_id"].as_str().unwrap().to_owned();

    // (a) Synapse -> relay: a to-device message of a MIMI type to a user at the relay.
    let bob = format!("@bob:{relay_name}");
    let (s, v) = call(
        env.client,
        Method::PUT,
        &format!("/_matrix/client/v3/sendToDevice/{MIMI_TYPE}/t1"),
        Some(&token),
        json!({"messages": {bob.clone(): {"*": {"mimi": "to the relay"}}}}),
    )
    .await;
    assert_eq!(s, 200, "sendToDevice: {v}");
    let edu = tokio::time::timeout(Duration::from_secs(20), edus.recv())
        .await
        .expect("synapse's transaction did not arrive within 20 s")
        .unwrap();
    assert_eq!(edu.edu_type, "m.direct_to_device");
    assert_eq!(edu.origin, env.server_name);
    let c: Value = serde_json::from_str(edu.content.get()).unwrap();
    assert_eq!(c["type"], MIMI_TYPE);
    assert_eq!(c["sender"], alice.as_str());
    assert_eq!(c["messages"][&bob]["*"]["mimi"], "to the relay");
    let stats = relay.stats();
    assert!(stats.txns_received.load(Ordering::Relaxed) >= 1);
    assert!(
        stats.verify_ns.load(Ordering::Relaxed) > 0,
        "the signature was checked"
    );
    println!("(a) synapse -> relay: verified /send with {MIMI_TYPE} from {alice}");

    // (b) relay -> Synapse: a to-device EDU from bob to alice shows up in alice's /sync.
    let (s, first) = call(
        env.client,
        Method::GET,
        "/_matrix/client/v3/sync?timeout=0",
        Some(&token),
        Value::Null,
    )
    .await;
    assert_eq!(s, 200, "sync: {first}");
    let mut since = first["next_batch"].as_str().unwrap_or_default().to_owned();
    let content = serde_json::value::to_raw_value(&json!({
        "sender": bob,
        "type": MIMI_TYPE,
        "message_id": format!("relay-{}", std::process::id()),
        "messages": {alice.clone(): {"*": {"mimi": "from the relay"}}},
    }))
    .unwrap();
    let done = relay.send_edu(&theirs, "m.direct_to_device", content);
    let sent = tokio::time::timeout(Duration::from_secs(20), done).await;
    assert!(
        matches!(sent, Ok(Ok(Ok(())))),
        "synapse did not accept the transaction: {sent:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let (s, v) = call(
            env.client,
            Method::GET,
            &format!("/_matrix/client/v3/sync?timeout=2000&since={since}"),
            Some(&token),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "sync: {v}");
        let events = v["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(e) = events.into_iter().find(|e| e["type"] == MIMI_TYPE) {
            break e;
        }
        since = v["next_batch"].as_str().unwrap_or_default().to_owned();
        assert!(
            Instant::now() < deadline,
            "the relay's to-device message never reached /sync"
        );
    };
    assert_eq!(found["sender"], bob.as_str());
    assert_eq!(found["content"]["mimi"], "from the relay");
    println!("(b) relay -> synapse: {MIMI_TYPE} from {bob} in {alice}'s /sync");
    relay.shutdown().await;
}
