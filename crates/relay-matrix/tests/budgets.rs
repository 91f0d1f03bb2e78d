//! Issue 14 over loopback: `/send` authenticates before it reads, key fetches are per origin
//! and remember failures, and bytes of a connection not yet bound to a peer come from a pool
//! of their own. The cases every transport shares (connection caps, ...) are in
//! relay-adapter's conformance suite.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mimi_wire::uri::ProviderDomain;
use relay_matrix::SigningKey;
use relay_matrix::client::sign_request;
use ruma::OwnedServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn name(s: &str) -> OwnedServerName {
    OwnedServerName::try_from(s.to_owned()).unwrap()
}

fn loopback() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn txn(origin: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "origin": origin, "origin_server_ts": 1, "pdus": [],
        "edus": [{"edu_type": "m.typing", "content": {"x": 1}}]
    }))
    .unwrap()
}

/// A TLS connection to `to` (its certificate pinned), as `me`.
async fn tls_to(
    me: &ProviderDomain,
    me_g: &relay_tls::GeneratedCert,
    to: &ProviderDomain,
    to_cert: &str,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut trust = relay_tls::PeerTrust::new();
    trust.add_pem(to.clone(), to_cert).unwrap();
    let cfg =
        relay_tls::client_config(&identity(me, me_g), &trust, vec![b"http/1.1".to_vec()]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let sni = rustls::pki_types::ServerName::try_from(to.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(sni, tcp)
        .await
        .unwrap()
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn http1(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Conn {
    let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(driver);
    conn
}

async fn put(conn: &mut Conn, path: &str, auth: HeaderValue, body: Vec<u8>) -> (u16, Value) {
    let mut req = http::Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::PUT;
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_static("b.example"));
    req.headers_mut().insert(http::header::AUTHORIZATION, auth);
    conn.ready().await.unwrap();
    let resp = conn.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn errcode(v: &Value) -> &str {
    v.get("errcode").and_then(Value::as_str).unwrap_or("")
}

/// A key server for `d` that counts requests and answers each after `delay` with `status`.
async fn fake_key_server(
    d: &ProviderDomain,
    g: &relay_tls::GeneratedCert,
    status: StatusCode,
    delay: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let id = identity(d, g);
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(id.cert_chain.clone(), id.key.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |_req| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut r = http::Response::new(Full::new(Bytes::from_static(b"{}")));
                        *r.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

/// Before the fix the body was read in full (here: until the 5 s request timeout, then 408)
/// before the Authorization header was looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_origin_is_refused_before_its_body_is_read() {
    let (a, b) = pair().await;
    let ga = relay_tls::GeneratedCert {
        cert_pem: a.cert_pem.clone(),
        key_pem: a.key_pem.clone(),
    };
    let path = "/_matrix/federation/v1/send/t1";
    let key = SigningKey::from_seed([9; 32]).unwrap();
    let auth = sign_request(&name("z.example"), &name("b.example"), &key, path, b"{}").unwrap();
    let mut tls = tls_to(&a.domain, &ga, &b.domain, &b.cert_pem, b.addr).await;
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: b.example\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: 6000000\r\n\r\n",
        auth.to_str().unwrap()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // 64 KiB of the announced 6 MB, and then nothing more, ever.
    tls.write_all(&vec![b' '; 64 * 1024]).await.unwrap();
    tls.flush().await.unwrap();

    let started = Instant::now();
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("M_UNAUTHORIZED") {
            let n = tls.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    };
    // Well inside the 5 s the old code spent waiting for the rest of the body.
    let _ = tokio::time::timeout(Duration::from_secs(3), read).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text:?}");
    assert!(text.contains("M_UNAUTHORIZED"), "{text:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(b.rec.requests.lock().unwrap().is_empty());
}

/// Before the fix every request from an origin whose key server fails fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_key_fetch_is_not_repeated_within_its_ttl() {
    let (da, db) = (domain("a.example"), domain("b.example"));
    let (ga, gb) = (
        relay_tls::generate(&da).unwrap(),
        relay_tls::generate(&db).unwrap(),
    );
    let (keys_at, fetches) =
        fake_key_server(&da, &ga, StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO).await;
    let b = start_with(
        &db,
        &gb,
        loopback(),
        &[(&da, &ga, keys_at)],
        [2; 32],
        Default::default(),
    )
    .await;
    let key = SigningKey::from_seed([1; 32]).unwrap();
    let mut conn = http1(tls_to(&da, &ga, &db, &gb.cert_pem, b.addr).await).await;
    for i in 0..3 {
        let path = format!("/_matrix/federation/v1/send/f{i}");
        let body = txn("a.example");
        let auth =
            sign_request(&name("a.example"), &name("b.example"), &key, &path, &body).unwrap();
        let (s, v) = put(&mut conn, &path, auth, body).await;
        assert_eq!((s, errcode(&v)), (401, "M_UNAUTHORIZED"), "{v}");
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert!(relay_matrix::server::FAILED_FETCH_TTL >= Duration::from_secs(5));
}

/// Before the fix one node-wide lock serialised key fetches: c.example waited for
/// a.example's hanging key server (the 5 s request timeout). The 2 s bound is generous for a
/// fetch over loopback and well below what the old lock took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_key_server_does_not_hold_up_another_origin() {
    let (da, db, dc) = (
        domain("a.example"),
        domain("b.example"),
        domain("c.example"),
    );
    let (ga, gb, gc) = (
        relay_tls::generate(&da).unwrap(),
        relay_tls::generate(&db).unwrap(),
        relay_tls::generate(&dc).unwrap(),
    );
    let (hanging, _) = fake_key_server(&da, &ga, StatusCode::OK, Duration::from_secs(60)).await;
    let (lb, lc) = (loopback(), loopback());
    let c = start(&dc, &gc, lc, &db, &gb, lb, [3; 32]).await;
    let b = start_with(
        &db,
        &gb,
        lb,
        &[(&da, &ga, hanging), (&dc, &gc, c.addr)],
        [2; 32],
        Default::default(),
    )
    .await;

    let ka = SigningKey::from_seed([1; 32]).unwrap();
    let mut conn_a = http1(tls_to(&da, &ga, &db, &gb.cert_pem, b.addr).await).await;
    let path = "/_matrix/federation/v1/send/h1";
    let body = txn("a.example");
    let auth = sign_request(&name("a.example"), &name("b.example"), &ka, path, &body).unwrap();
    let stuck = tokio::spawn(async move { put(&mut conn_a, path, auth, body).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let kc = SigningKey::from_seed([3; 32]).unwrap();
    let mut conn_c = http1(tls_to(&dc, &gc, &db, &gb.cert_pem, b.addr).await).await;
    let path = "/_matrix/federation/v1/send/c1";
    let body = txn("c.example");
    let auth = sign_request(&name("c.example"), &name("b.example"), &kc, path, &body).unwrap();
    let started = Instant::now();
    let (s, v) = put(&mut conn_c, path, auth, body).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "c.example waited {:?}",
        started.elapsed()
    );
    stuck.abort();
}

/// A request body fed by the test; it ends when the sender is dropped.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Fed {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

type H2Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn signed_put(origin: &str, seed: u8, id: &str, body: Vec<u8>) -> http::Request<H2Body> {
    let path = format!("/_matrix/federation/v1/send/{id}");
    let key = SigningKey::from_seed([seed; 32]).unwrap();
    let auth = sign_request(&name(origin), &name("b.example"), &key, &path, &body).unwrap();
    let mut req = http::Request::new(Full::new(Bytes::from(body)).boxed());
    *req.method_mut() = Method::PUT;
    *req.uri_mut() = format!("https://b.example{path}").parse().unwrap();
    req.headers_mut().insert(http::header::AUTHORIZATION, auth);
    req
}

/// Before the fix a peer's bodies in assembly were bounded only by streams times 6.6 MB.
/// Bytes on a connection not yet bound to a.example (an impostor's, say) come from another
/// pool and leave a.example's share alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_byte_budget_gets_429_while_another_peer_is_served() {
    let (da, db, dc) = (
        domain("a.example"),
        domain("b.example"),
        domain("c.example"),
    );
    let (ga, gb, gc) = (
        relay_tls::generate(&da).unwrap(),
        relay_tls::generate(&db).unwrap(),
        relay_tls::generate(&dc).unwrap(),
    );
    let (la, lb, lc) = (loopback(), loopback(), loopback());
    let a = start(&da, &ga, la, &db, &gb, lb, [1; 32]).await;
    let c = start(&dc, &gc, lc, &db, &gb, lb, [3; 32]).await;
    let adapter = relay_adapter::AdapterContext {
        limits: relay_adapter::Limits {
            max_peer_bytes: 64 * 1024,
            ..Default::default()
        },
        ..Default::default()
    };
    let b = start_with(
        &db,
        &gb,
        lb,
        &[(&da, &ga, a.addr), (&dc, &gc, c.addr)],
        [2; 32],
        adapter.clone(),
    )
    .await;

    // An h2 connection of a.example, bound by a first verified transaction.
    let mut trust = relay_tls::PeerTrust::new();
    trust.add_pem(db.clone(), &gb.cert_pem).unwrap();
    let cfg = relay_tls::client_config(&identity(&da, &ga), &trust, vec![b"h2".to_vec()]).unwrap();
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let sni = rustls::pki_types::ServerName::try_from("b.example".to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(sni, tcp)
        .await
        .unwrap();
    let (mut h2, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(driver);
    let small = || txn("a.example");
    let r = h2
        .send_request(signed_put("a.example", 1, "s0", small()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An impostor's stalled 60 KB, claiming a.example on a connection of its own.
    let mut impostor = tls_to(&dc, &gc, &db, &gb.cert_pem, b.addr).await;
    let key = SigningKey::from_seed([9; 32]).unwrap();
    let path = "/_matrix/federation/v1/send/imp";
    let auth = sign_request(&name("a.example"), &name("b.example"), &key, path, b"{}").unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: b.example\r\nauthorization: {}\r\n\
         content-length: 61440\r\n\r\n",
        auth.to_str().unwrap()
    );
    impostor.write_all(head.as_bytes()).await.unwrap();
    impostor.write_all(&vec![b' '; 60 * 1024]).await.unwrap();
    impostor.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = h2
        .send_request(signed_put("a.example", 1, "s1", small()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the impostor spent a.example's share");

    // a.example's own stream, almost 64 KiB in and stalled. (Set up again if a request of
    // the setup above still held a few bytes when it arrived and it was refused itself.)
    let mut stalled_stream = None;
    for attempt in 0..20 {
        let (feed, rx) = tokio::sync::mpsc::channel(2);
        let mut stalled = signed_put("a.example", 1, &format!("big{attempt}"), Vec::new());
        *stalled.body_mut() = Fed(rx).boxed();
        let mut h2b = h2.clone();
        let pending = tokio::spawn(async move { h2b.send_request(stalled).await });
        // Leaves less than a small transaction's worth of the 64 KiB.
        feed.send(Bytes::from(vec![b' '; 65_500])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !pending.is_finished() {
            stalled_stream = Some((feed, pending));
            break;
        }
    }
    let (feed, pending) = stalled_stream.expect("the stalled stream was never held");

    let mut refused = false;
    for i in 0..100 {
        let r = h2
            .send_request(signed_put("a.example", 1, &format!("t{i}"), small()))
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key(http::header::RETRY_AFTER));
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(errcode(&v), "M_LIMIT_EXCEEDED", "{v}");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a.example was never refused");
    assert!(adapter.stats.refusals(relay_adapter::Budget::PeerBytes) >= 1);

    // c.example is served meanwhile.
    let mut other = http1(tls_to(&dc, &gc, &db, &gb.cert_pem, b.addr).await).await;
    let path = "/_matrix/federation/v1/send/c1";
    let body = txn("c.example");
    let kc = SigningKey::from_seed([3; 32]).unwrap();
    let auth = sign_request(&name("c.example"), &name("b.example"), &kc, path, &body).unwrap();
    assert_eq!(put(&mut other, path, auth, body).await.0, 200);
    drop(feed);
    pending.abort();
}
