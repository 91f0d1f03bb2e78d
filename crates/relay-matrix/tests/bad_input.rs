//! Hand-made federation requests: each bad input gets the error code a homeserver would give
//! (Matrix server-server API, "Request Authentication" and "Transactions"), and nothing is
//! delivered twice.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use relay_matrix::SigningKey;
use relay_matrix::client::sign_request;
use relay_matrix::wire::{EDU_REQUEST, RequestContent, fragments};
use ruma::OwnedServerName;
use serde_json::{Value, json};

struct Raw {
    conn: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Raw {
    /// A TLS connection to `b` as `a` would open it (b's certificate pinned).
    async fn connect(a: &Side, b: &Side) -> Raw {
        let id = identity(
            &a.domain,
            &relay_tls::GeneratedCert {
                cert_pem: a.cert_pem.clone(),
                key_pem: a.key_pem.clone(),
            },
        );
        let mut trust = relay_tls::PeerTrust::new();
        trust.add_pem(b.domain.clone(), &b.cert_pem).unwrap();
        let cfg = relay_tls::client_config(&id, &trust, vec![b"http/1.1".to_vec()]).unwrap();
        let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(b.domain.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(driver);
        Raw { conn }
    }

    async fn put(
        &mut self,
        path: &str,
        auth: Option<HeaderValue>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = http::Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::PUT;
        *req.uri_mut() = path.parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("b.example"));
        if let Some(a) = auth {
            req.headers_mut().insert(http::header::AUTHORIZATION, a);
        }
        self.conn.ready().await.unwrap();
        let resp = self.conn.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

fn name(s: &str) -> OwnedServerName {
    OwnedServerName::try_from(s.to_owned()).unwrap()
}

fn txn(origin: &str, edus: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "origin": origin, "origin_server_ts": 1, "pdus": [], "edus": edus
    }))
    .unwrap()
}

fn mimi_edu(id: &str, seq: u64, body: &[u8]) -> Value {
    let f: Vec<RequestContent> = fragments(
        id,
        mimi_wire::endpoint::Endpoint::Notify,
        "mimi://a.example/r/room",
        Some(seq),
        &[Bytes::copy_from_slice(body)],
    );
    json!({"edu_type": EDU_REQUEST, "content": f[0]})
}

fn errcode(v: &Value) -> &str {
    v.get("errcode").and_then(Value::as_str).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_homeserver_error_codes_and_nothing_is_delivered_twice() {
    let (a, b) = pair().await;
    let key = SigningKey::from_seed(a.key_seed).unwrap();
    let (oa, ob) = (name("a.example"), name("b.example"));
    let mut raw = Raw::connect(&a, &b).await;
    let path = |id: &str| format!("/_matrix/federation/v1/send/{id}");
    let signed = |path: &str, body: &[u8]| Some(sign_request(&oa, &ob, &key, path, body).unwrap());

    // A good transaction is delivered once; its retry gets the stored answer.
    let body = txn("a.example", vec![mimi_edu("1", 0, b"hello")]);
    let (s1, v1) = raw
        .put(&path("t1"), signed(&path("t1"), &body), body.clone())
        .await;
    assert_eq!(s1, StatusCode::OK, "{v1}");
    assert_eq!(v1["org.mimi-relay.responses"]["1"]["status"], 201);
    let (s2, v2) = raw
        .put(&path("t1"), signed(&path("t1"), &body), body.clone())
        .await;
    assert_eq!((s2, &v2), (StatusCode::OK, &v1));
    assert_eq!(b.rec.requests.lock().unwrap().len(), 1);
    assert_eq!(b.transport.stats().replayed.load(Ordering::Relaxed), 1);

    // Bad signature: signed over other content.
    let other = txn("a.example", vec![mimi_edu("1", 1, b"tampered")]);
    let (s, v) = raw
        .put(&path("t2"), signed(&path("t2"), &body), other)
        .await;
    assert_eq!((s.as_u16(), errcode(&v)), (401, "M_UNAUTHORIZED"), "{v}");

    // Unknown key: a key a.example never published.
    let stranger = SigningKey::from_seed([99; 32]).unwrap();
    let auth = sign_request(&oa, &ob, &stranger, &path("t3"), &body).unwrap();
    let (s, v) = raw.put(&path("t3"), Some(auth), body.clone()).await;
    assert_eq!((s.as_u16(), errcode(&v)), (401, "M_UNAUTHORIZED"), "{v}");

    // Wrong destination.
    let auth = sign_request(&oa, &name("c.example"), &key, &path("t4"), &body).unwrap();
    let (s, v) = raw.put(&path("t4"), Some(auth), body.clone()).await;
    assert_eq!((s.as_u16(), errcode(&v)), (401, "M_UNAUTHORIZED"), "{v}");

    // Unknown origin, and no authorization at all.
    let auth = sign_request(&name("z.example"), &ob, &key, &path("t5"), &body).unwrap();
    let (s, v) = raw.put(&path("t5"), Some(auth), body.clone()).await;
    assert_eq!((s.as_u16(), errcode(&v)), (401, "M_UNAUTHORIZED"), "{v}");
    let (s, v) = raw.put(&path("t5"), None, body.clone()).await;
    assert_eq!((s.as_u16(), errcode(&v)), (401, "M_UNAUTHORIZED"), "{v}");

    // An event over 65,536 bytes, correctly signed.
    let big = txn(
        "a.example",
        vec![json!({"edu_type": "m.typing", "content": {"pad": "x".repeat(70_000)}})],
    );
    let (s, v) = raw.put(&path("t6"), signed(&path("t6"), &big), big).await;
    assert_eq!((s.as_u16(), errcode(&v)), (413, "M_TOO_LARGE"), "{v}");

    // Malformed JSON, and JSON that is not an object.
    let (s, v) = raw
        .put(
            &path("t7"),
            signed(&path("t7"), b"{}"),
            b"{\"origin\": ".to_vec(),
        )
        .await;
    assert_eq!((s.as_u16(), errcode(&v)), (400, "M_NOT_JSON"), "{v}");
    let (s, v) = raw
        .put(&path("t7"), signed(&path("t7"), b"{}"), b"[1]".to_vec())
        .await;
    assert_eq!((s.as_u16(), errcode(&v)), (400, "M_BAD_JSON"), "{v}");

    // Signed, well-formed JSON, but a MIMI EDU missing its fields / not a transaction.
    let bad = txn(
        "a.example",
        vec![json!({"edu_type": EDU_REQUEST, "content": {"id": "1"}})],
    );
    let (s, v) = raw.put(&path("t8"), signed(&path("t8"), &bad), bad).await;
    assert_eq!((s.as_u16(), errcode(&v)), (400, "M_BAD_JSON"), "{v}");
    let bad = serde_json::to_vec(&json!({"edus": 5})).unwrap();
    let (s, v) = raw.put(&path("t9"), signed(&path("t9"), &bad), bad).await;
    assert_eq!((s.as_u16(), errcode(&v)), (400, "M_BAD_JSON"), "{v}");

    // Over 100 EDUs.
    let many = txn(
        "a.example",
        (0..101)
            .map(|i| mimi_edu(&i.to_string(), i, b"x"))
            .collect(),
    );
    let (s, v) = raw
        .put(&path("t10"), signed(&path("t10"), &many), many)
        .await;
    assert_eq!((s.as_u16(), errcode(&v)), (400, "M_BAD_JSON"), "{v}");

    // The transaction's origin is not the signer.
    let body_c = txn("c.example", vec![mimi_edu("1", 1, b"x")]);
    let (s, v) = raw
        .put(&path("t11"), signed(&path("t11"), &body_c), body_c)
        .await;
    assert_eq!((s.as_u16(), errcode(&v)), (403, "M_FORBIDDEN"), "{v}");

    // Unknown paths and methods.
    let (s, v) = raw
        .put("/_matrix/federation/v1/nothing", None, Vec::new())
        .await;
    assert_eq!((s.as_u16(), errcode(&v)), (404, "M_UNRECOGNIZED"), "{v}");

    // Only the first good transaction was ever delivered.
    assert_eq!(b.rec.requests.lock().unwrap().len(), 1);
    assert_eq!(b.transport.stats().txns_received.load(Ordering::Relaxed), 1);
    assert!(b.transport.stats().rejected.load(Ordering::Relaxed) >= 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_first_is_running_waits_for_its_answer() {
    let (a, b) = pair().await;
    let key = SigningKey::from_seed(a.key_seed).unwrap();
    let (oa, ob) = (name("a.example"), name("b.example"));
    let path = "/_matrix/federation/v1/send/same";
    let body = txn(
        "a.example",
        (0..50).map(|i| mimi_edu(&i.to_string(), i, b"y")).collect(),
    );
    let auth = sign_request(&oa, &ob, &key, path, &body).unwrap();
    let mut r1 = Raw::connect(&a, &b).await;
    let mut r2 = Raw::connect(&a, &b).await;
    let (x, y) = tokio::join!(
        r1.put(path, Some(auth.clone()), body.clone()),
        r2.put(path, Some(auth.clone()), body.clone())
    );
    assert_eq!(x.0, StatusCode::OK);
    assert_eq!(x, y);
    assert_eq!(b.rec.requests.lock().unwrap().len(), 50);
}
