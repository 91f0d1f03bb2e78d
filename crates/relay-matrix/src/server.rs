//! The listening side: key and version endpoints, and `/send` with X-Matrix verification,
//! idempotent transactions and ordered delivery of the MIMI requests they carry.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use relay_core::transport::{Inbound, Request, Response, Status, TransportKind};
use ruma::api::federation::authentication::XMatrix;
use ruma::signatures::PublicKeyMap;
use ruma::{OwnedServerName, ServerName};
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::client::Dial;
use crate::keys::{ServerKeys, SigningKey, now_ms};
use crate::wire::{
    EDU_REQUEST, IncomingTxn, MAX_EDUS, MAX_EVENT_BYTES, MAX_PDUS, MAX_TXN_BODY, MatrixError,
    Reassembler, RequestContent, ResponseContent, SendResponse,
};
use crate::{MatrixStats, ReceivedEdu};

/// Finished transactions remembered (per node) to answer retries with the stored answer.
pub const TXN_MEMORY: usize = 4096;
/// A peer's keys are fetched again at most this often when an unknown key id shows up.
const REFETCH_AFTER: Duration = Duration::from_secs(5);
/// Keys are re-fetched after this long even if their document says they are valid longer.
const KEY_CACHE_TTL: Duration = Duration::from_secs(3600);

type HttpResponse = http::Response<Full<Bytes>>;

/// What every connection shares.
pub(crate) struct ServerCtx<I> {
    pub(crate) inbound: I,
    pub(crate) server_name: OwnedServerName,
    pub(crate) key: Arc<SigningKey>,
    /// Peers by Matrix server name.
    pub(crate) peers: BTreeMap<OwnedServerName, Dial>,
    pub(crate) keys: KeyCache,
    pub(crate) txns: TxnCache,
    pub(crate) edu_sink: Option<tokio::sync::mpsc::UnboundedSender<ReceivedEdu>>,
    pub(crate) request_timeout: Duration,
    pub(crate) stats: Arc<MatrixStats>,
}

/// Accepts until shutdown, then lets open connections finish (bounded by the request timeout).
pub(crate) async fn accept_loop<I: Inbound>(
    ctx: Arc<ServerCtx<I>>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    conns.spawn(serve_conn(ctx.clone(), acceptor.clone(), tcp, remote, shutdown.clone()));
                }
                Err(error) => {
                    warn!(%error, "matrix accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(ctx.request_timeout, drain)
        .await
        .is_err()
    {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    info!(server = %ctx.server_name, "matrix listener stopped");
}

async fn serve_conn<I: Inbound>(
    ctx: Arc<ServerCtx<I>>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    // No client certificate: Matrix authenticates every request by its X-Matrix signature.
    let tls = match tokio::time::timeout(ctx.request_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            debug!(%remote, %error, "matrix tls handshake refused");
            return;
        }
        Err(_) => return,
    };
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(handle(ctx, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(error) = r { debug!(%remote, %error, "matrix connection ended"); },
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(ctx.request_timeout, conn).await;
        }
    }
}

/// An error answer with a Matrix error code.
pub(crate) fn matrix_error(status: u16, errcode: &str, error: &str) -> HttpResponse {
    let body = serde_json::to_vec(&MatrixError {
        errcode: errcode.to_owned(),
        error: error.to_owned(),
        retry_after_ms: None,
    })
    .unwrap_or_default();
    json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Bytes::from(body),
    )
}

fn json(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut r = http::Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

const SEND_PREFIX: &str = "/_matrix/federation/v1/send/";

async fn handle<I: Inbound>(ctx: Arc<ServerCtx<I>>, req: http::Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/_matrix/key/v2/server") => json(
            StatusCode::OK,
            Bytes::from(ctx.key.key_document(ctx.server_name.as_str())),
        ),
        (&Method::GET, "/_matrix/federation/v1/version") => json(
            StatusCode::OK,
            Bytes::from_static(br#"{"server":{"name":"mimi-relay","version":"0.1.0"}}"#),
        ),
        (&Method::PUT, p) if p.starts_with(SEND_PREFIX) => {
            let txn_id = p[SEND_PREFIX.len()..].to_owned();
            match send(&ctx, req, txn_id).await {
                Ok(r) | Err(r) => r,
            }
        }
        (_, "/_matrix/key/v2/server" | "/_matrix/federation/v1/version") => {
            matrix_error(405, "M_UNRECOGNIZED", "method not allowed")
        }
        (_, p) if p.starts_with(SEND_PREFIX) => {
            matrix_error(405, "M_UNRECOGNIZED", "method not allowed")
        }
        _ => matrix_error(404, "M_UNRECOGNIZED", "unrecognized request"),
    }
}

/// `PUT /_matrix/federation/v1/send/{txnId}`, checked in the order Synapse checks: size, JSON,
/// signature, then the transaction's contents. Every refusal happens before anything is
/// delivered.
async fn send<I: Inbound>(
    ctx: &Arc<ServerCtx<I>>,
    req: http::Request<Incoming>,
    txn_id: String,
) -> Result<HttpResponse, HttpResponse> {
    let stats = &ctx.stats;
    if txn_id.is_empty() || txn_id.contains('/') {
        return Err(matrix_error(404, "M_UNRECOGNIZED", "unrecognized request"));
    }
    let (parts, body) = req.into_parts();
    let body = tokio::time::timeout(
        ctx.request_timeout,
        Limited::new(body, MAX_TXN_BODY).collect(),
    )
    .await
    .map_err(|_| matrix_error(408, "M_UNKNOWN", "body timed out"))?
    .map_err(|_| {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        matrix_error(413, "M_TOO_LARGE", "transaction too large")
    })?
    .to_bytes();

    let reject = |status: u16, code: &str, why: &str| {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        matrix_error(status, code, why)
    };
    // Well-formed JSON and an object, before anything else (Synapse's order).
    let raw: &RawValue =
        serde_json::from_slice(&body).map_err(|_| reject(400, "M_NOT_JSON", "content not json"))?;
    if !raw.get().trim_start().starts_with('{') {
        return Err(reject(400, "M_BAD_JSON", "content must be a json object"));
    }

    let xm = XMatrix::extract_from_http_headers(&parts.headers)
        .map_err(|_| reject(401, "M_UNAUTHORIZED", "missing or malformed authorization"))?;
    if xm
        .destination
        .as_deref()
        .is_some_and(|d| d != &*ctx.server_name)
    {
        return Err(reject(401, "M_UNAUTHORIZED", "wrong destination"));
    }
    let Some(dial) = ctx.peers.get(&xm.origin) else {
        return Err(reject(401, "M_UNAUTHORIZED", "unknown origin server"));
    };
    let keys = ctx
        .keys
        .keys_for(dial, xm.key.as_str())
        .await
        .map_err(|why| reject(401, "M_UNAUTHORIZED", &why))?;
    let check = http::Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .body(&body[..])
        .map_err(|_| reject(400, "M_UNRECOGNIZED", "bad request line"))?;
    let map = PublicKeyMap::from([(xm.origin.to_string(), keys.keys)]);
    let started = Instant::now();
    let verified = xm.verify_http_request(&check, &ctx.server_name, &map);
    stats
        .verify_ns
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    verified.map_err(|e| {
        debug!(origin = %xm.origin, error = %e, "x-matrix signature refused");
        reject(401, "M_UNAUTHORIZED", "invalid signature")
    })?;

    let txn: IncomingTxn<'_> = serde_json::from_slice(&body)
        .map_err(|_| reject(400, "M_BAD_JSON", "not a transaction"))?;
    if txn.origin != xm.origin.as_str() {
        return Err(reject(
            403,
            "M_FORBIDDEN",
            "transaction origin is not the signer",
        ));
    }
    if txn.pdus.len() > MAX_PDUS || txn.edus.len() > MAX_EDUS {
        return Err(reject(400, "M_BAD_JSON", "too many pdus or edus"));
    }
    for pdu in &txn.pdus {
        if pdu.get().len() > MAX_EVENT_BYTES {
            return Err(reject(413, "M_TOO_LARGE", "event too large"));
        }
    }
    let mut reassembler = Reassembler::default();
    let mut others = Vec::new();
    for edu in &txn.edus {
        // The EDU's own JSON: the content plus its two keys.
        if edu.content.get().len() + edu.edu_type.len() + 30 > MAX_EVENT_BYTES {
            return Err(reject(413, "M_TOO_LARGE", "event too large"));
        }
        if edu.edu_type == EDU_REQUEST {
            let c: RequestContent = serde_json::from_str(edu.content.get())
                .map_err(|_| reject(400, "M_BAD_JSON", "malformed mimi request"))?;
            reassembler
                .push(c)
                .map_err(|e| reject(400, "M_BAD_JSON", &e.to_string()))?;
        } else {
            others.push((edu.edu_type.clone(), edu.content.to_owned()));
        }
    }
    let requests = reassembler
        .finish()
        .map_err(|e| reject(400, "M_BAD_JSON", &e.to_string()))?;

    // Verified and well-formed: from here on the transaction id decides.
    let key = (xm.origin.to_string(), txn_id);
    let tx = match ctx.txns.begin(&key) {
        Begin::Replay(answer) => {
            stats.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(json(StatusCode::OK, answer));
        }
        Begin::Wait(mut rx) => {
            stats.replayed.fetch_add(1, Ordering::Relaxed);
            // Bounded: a first attempt that died leaves nothing to wait for.
            let answer = tokio::time::timeout(ctx.request_timeout, rx.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|r| r.ok().and_then(|a| a.clone()));
            return match answer {
                Some(a) => Ok(json(StatusCode::OK, a)),
                None => Err(matrix_error(503, "M_UNKNOWN", "try again")),
            };
        }
        Begin::Run(tx) => tx,
    };
    stats.txns_received.fetch_add(1, Ordering::Relaxed);
    stats
        .edus_received
        .fetch_add(txn.edus.len() as u64, Ordering::Relaxed);
    for (edu_type, content) in others {
        if let Some(sink) = &ctx.edu_sink {
            let _ = sink.send(ReceivedEdu {
                origin: xm.origin.to_string(),
                edu_type,
                content,
            });
        }
    }
    // Delivery runs in its own task, so a peer that hangs up cannot leave a transaction half
    // answered: a retry waits for this answer.
    let from = dial.domain.clone();
    let inbound = ctx.inbound.clone();
    let txns = ctx.txns.clone();
    let held = key.clone();
    let task = tokio::spawn(async move {
        let futures: Vec<_> = requests
            .iter()
            .map(|r| {
                inbound.request(Request {
                    from: from.clone(),
                    transport: TransportKind::Matrix,
                    endpoint: r.endpoint,
                    target: r.target.clone(),
                    seq: r.seq,
                    body: r.body.clone(),
                })
            })
            .collect();
        let answers = join_in_order(futures).await;
        let mut out = SendResponse::default();
        for (r, a) in requests.iter().zip(answers) {
            out.responses
                .insert(r.id.clone(), ResponseContent::from_response(&a));
        }
        let answer = Bytes::from(serde_json::to_vec(&out).unwrap_or_default());
        txns.finish(key, tx, answer.clone());
        answer
    });
    match task.await {
        Ok(answer) => Ok(json(StatusCode::OK, answer)),
        Err(_) => {
            // Our bug (a panic) or shutdown: forget the id so a retry runs again.
            ctx.txns.abandon(&held);
            Err(matrix_error(500, "M_UNKNOWN", "internal error"))
        }
    }
}

/// Polls the futures in index order on every wake, so each is first polled (and, for the
/// node's inbound, enqueued) in the transaction's order; returns their outputs in that order.
async fn join_in_order<F: Future<Output = Response>>(futures: Vec<F>) -> Vec<Response> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<Response>> = vec![None; futures.len()];
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(r) => *slot = Some(r),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Response::error(Status::Internal, "lost answer")))
        .collect()
}

/// Verified peer keys, fetched from the peer's key endpoint on first use.
#[derive(Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<OwnedServerName, (ServerKeys, Instant)>>,
    /// One fetch at a time per node keeps a flood of bad key ids from becoming a flood of
    /// fetches.
    fetch: tokio::sync::Mutex<()>,
}

impl KeyCache {
    fn cached(&self, server: &ServerName) -> Option<(ServerKeys, Instant)> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(server)
            .cloned()
    }

    /// The keys of `dial`'s server, if they include `key_id`.
    pub(crate) async fn keys_for(&self, dial: &Dial, key_id: &str) -> Result<ServerKeys, String> {
        let fresh = |k: &ServerKeys, at: Instant| {
            k.valid_until_ms > now_ms() && at.elapsed() < KEY_CACHE_TTL
        };
        if let Some((k, at)) = self.cached(&dial.server_name)
            && fresh(&k, at)
            && (k.keys.contains_key(key_id) || at.elapsed() < REFETCH_AFTER)
        {
            return if k.keys.contains_key(key_id) {
                Ok(k)
            } else {
                Err("unknown key".to_owned())
            };
        }
        let _one = self.fetch.lock().await;
        // Another request may have fetched while we waited.
        if let Some((k, at)) = self.cached(&dial.server_name)
            && fresh(&k, at)
            && at.elapsed() < REFETCH_AFTER
        {
            return if k.keys.contains_key(key_id) {
                Ok(k)
            } else {
                Err("unknown key".to_owned())
            };
        }
        let keys = dial.fetch_keys().await.map_err(|e| {
            warn!(server = %dial.server_name, error = %e, "cannot fetch server keys");
            format!("cannot fetch the origin's keys: {e}")
        })?;
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dial.server_name.clone(), (keys.clone(), Instant::now()));
        if keys.keys.contains_key(key_id) {
            Ok(keys)
        } else {
            Err("unknown key".to_owned())
        }
    }
}

/// Transaction ids seen, with the stored answer of each finished one.
#[derive(Clone, Default)]
pub(crate) struct TxnCache(Arc<Mutex<TxnInner>>);

type TxnKey = (String, String);

#[derive(Default)]
struct TxnInner {
    map: HashMap<TxnKey, TxnState>,
    done: VecDeque<TxnKey>,
}

enum TxnState {
    Running(watch::Receiver<Option<Bytes>>),
    Done(Bytes),
}

pub(crate) enum Begin {
    Replay(Bytes),
    Wait(watch::Receiver<Option<Bytes>>),
    Run(watch::Sender<Option<Bytes>>),
}

impl TxnCache {
    fn begin(&self, key: &TxnKey) -> Begin {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match inner.map.get(key) {
            Some(TxnState::Done(a)) => Begin::Replay(a.clone()),
            Some(TxnState::Running(rx)) => Begin::Wait(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                inner.map.insert(key.clone(), TxnState::Running(rx));
                Begin::Run(tx)
            }
        }
    }

    fn abandon(&self, key: &TxnKey) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(inner.map.get(key), Some(TxnState::Running(_))) {
            inner.map.remove(key);
        }
    }

    fn finish(&self, key: TxnKey, tx: watch::Sender<Option<Bytes>>, answer: Bytes) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .map
            .insert(key.clone(), TxnState::Done(answer.clone()));
        inner.done.push_back(key);
        while inner.done.len() > TXN_MEMORY {
            if let Some(old) = inner.done.pop_front() {
                inner.map.remove(&old);
            }
        }
        tx.send_replace(Some(answer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn join_in_order_polls_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let futs: Vec<_> = (0..40)
            .map(|i| {
                let log = log.clone();
                async move {
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(i);
                    tokio::task::yield_now().await;
                    Response::new(Status::Created, Bytes::from(vec![i as u8]))
                }
            })
            .collect();
        let out = join_in_order(futs).await;
        let log = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(log, (0..40).collect::<Vec<_>>());
        assert!(out.iter().enumerate().all(|(i, r)| r.body[0] == i as u8));
    }

    #[test]
    fn txn_cache_replays_and_forgets_the_oldest() {
        let c = TxnCache::default();
        let k = |i: usize| ("o".to_owned(), i.to_string());
        let Begin::Run(tx) = c.begin(&k(0)) else {
            panic!("first begin must run")
        };
        assert!(matches!(c.begin(&k(0)), Begin::Wait(_)));
        c.finish(k(0), tx, Bytes::from_static(b"a"));
        assert!(matches!(c.begin(&k(0)), Begin::Replay(a) if &a[..] == b"a"));
        for i in 1..=TXN_MEMORY {
            let Begin::Run(tx) = c.begin(&k(i)) else {
                panic!("new id must run")
            };
            c.finish(k(i), tx, Bytes::new());
        }
        assert!(matches!(c.begin(&k(0)), Begin::Run(_)));
    }
}
