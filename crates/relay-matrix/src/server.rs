//! The listening side: key and version endpoints, and `/send` with X-Matrix verification,
//! idempotent transactions and ordered delivery of the MIMI requests they carry.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::Inbound;
use relay_adapter::http::{BodyLimits, BodyRefusal, read_body};
use relay_adapter::{
    AdapterStats, Budget, ByteBudget, Gate, HandshakePermit, LogLimiter, OverBudget, Pacer,
    PeerPermit,
};
use relay_core::transport::{Request, Response, Status, TransportKind};
use ruma::api::federation::authentication::XMatrix;
use ruma::signatures::PublicKeyMap;
use ruma::{OwnedServerName, ServerName};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

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
/// A failed key fetch is not repeated for this long: requests meanwhile are refused at once.
pub const FAILED_FETCH_TTL: Duration = Duration::from_secs(10);
/// Longest `Authorization` header read; an X-Matrix header is about 300 bytes.
pub const MAX_AUTH_HEADER: usize = 2048;
/// Most `,`-separated parameters in it (X-Matrix has four).
pub const MAX_AUTH_PARAMS: usize = 8;
/// Deepest JSON nesting accepted in a transaction, below serde_json's own limit of 128, so
/// everything accepted also parses where the signature is checked.
pub const MAX_JSON_DEPTH: usize = 100;
/// How long a peer over one of its budgets is asked to wait.
const RETRY_AFTER_MS: u64 = 1000;

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
    /// A body must arrive in full within this.
    pub(crate) body_deadline: Duration,
    /// Handshakes and not yet authenticated connections node-wide, then connections per peer.
    pub(crate) gate: Arc<Gate>,
    /// Body bytes of each peer on connections it has authenticated, until delivered.
    pub(crate) budget: Arc<ByteBudget>,
    /// Body bytes on connections not yet authenticated, by the origin they claim: someone
    /// who claims to be a peer can exhaust only this, never the peer's own share.
    pub(crate) preauth: Arc<ByteBudget>,
    pub(crate) adapter_stats: Arc<AdapterStats>,
    /// Peers' refusal budgets (shared with the node and the other transports): a connection
    /// bound to a peer counts its refusals against that peer and waits while it is in debt.
    pub(crate) pacer: Arc<Pacer>,
    pub(crate) handshake_log: LogLimiter,
    /// HTTP/2 streams one connection may have open.
    pub(crate) h2_streams: u32,
    /// Per peer, the right to run the CPU-heavy checks of one transaction at a time: on
    /// connections bound to the peer, and (apart) on those only claiming it.
    pub(crate) cpu: BTreeMap<OwnedServerName, [Arc<tokio::sync::Semaphore>; 2]>,
}

/// Why a transaction failed the checks run on the blocking pool.
enum Checked {
    NotJson,
    NotObject,
    TooDeep,
    BadRequestLine,
    BadSignature,
}

/// Whom a connection belongs to. Matrix authenticates requests, not connections: a
/// connection holds a handshake slot until its first verified request names its peer, then
/// counts against that peer's connection cap.
pub(crate) struct ConnAuth {
    state: Mutex<ConnState>,
    /// The connection's source address: penalized when the connection is refused at its
    /// peer's cap or fails to authenticate (relay_adapter::Gate::admit).
    source: IpAddr,
    /// Told when a request was refused at the connection cap: the connection is closed, so
    /// its peer cannot keep it open for refusals.
    over_cap: Notify,
}

enum ConnState {
    Pending(#[allow(dead_code)] HandshakePermit),
    Bound(PeerPermit),
}

impl ConnAuth {
    fn bound_to(&self) -> Option<ProviderDomain> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            ConnState::Pending(_) => None,
            ConnState::Bound(p) => Some(p.peer().clone()),
        }
    }

    /// Binds a pending connection to `peer`; a bound one stays with its first peer.
    fn bind(&self, gate: &Arc<Gate>, peer: &ProviderDomain) -> Result<(), OverBudget> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let ConnState::Pending(_) = &*state {
            *state = ConnState::Bound(gate.peer(peer)?);
        }
        Ok(())
    }
}

/// One TCP connection: TLS (no client certificate), then HTTP until shutdown, or until the
/// request timeout if no request has authenticated it by then.
pub(crate) async fn serve_conn<I: Inbound>(
    ctx: Arc<ServerCtx<I>>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    handshake: HandshakePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    // No client certificate: Matrix authenticates every request by its X-Matrix signature.
    let tls = match tokio::time::timeout(ctx.request_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            ctx.gate.handshake_failed(remote.ip());
            let s = &ctx.adapter_stats;
            return relay_adapter::failed_handshake(
                s,
                &ctx.handshake_log,
                "matrix",
                &remote,
                &error,
            );
        }
        Err(_) => {
            ctx.gate.handshake_failed(remote.ip());
            let (s, why) = (&ctx.adapter_stats, &"tls handshake timed out");
            return relay_adapter::failed_handshake(s, &ctx.handshake_log, "matrix", &remote, why);
        }
    };
    let auth = Arc::new(ConnAuth {
        state: Mutex::new(ConnState::Pending(handshake)),
        source: remote.ip(),
        over_cap: Notify::new(),
    });
    let service = {
        let ctx = ctx.clone();
        let auth = auth.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let auth = auth.clone();
            async move { Ok::<_, Infallible>(handle(ctx, &auth, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(ctx.h2_streams);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // A connection that has not authenticated a request by then gives its slot back.
    let unbound = tokio::time::sleep(ctx.request_timeout);
    tokio::pin!(unbound);
    let mut checked = false;
    let mut draining = false;
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(error) = r {
                    debug!(%remote, %error, "matrix connection ended");
                }
                break;
            }
            _ = &mut unbound, if !checked => {
                checked = true;
                if auth.bound_to().is_none() && !draining {
                    debug!(%remote, "matrix connection closed: no authenticated request");
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                    drain.as_mut().reset(tokio::time::Instant::now() + ctx.request_timeout);
                }
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
                drain.as_mut().reset(tokio::time::Instant::now() + ctx.request_timeout);
            }
            () = auth.over_cap.notified(), if !draining => {
                // The 429 goes out; then the connection ends (GOAWAY on HTTP/2).
                debug!(%remote, "matrix connection closed: over its peer's connection cap");
                draining = true;
                conn.as_mut().graceful_shutdown();
                drain.as_mut().reset(tokio::time::Instant::now() + ctx.request_timeout);
            }
            _ = &mut drain, if draining => break,
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

/// A request on a connection over its peer's cap: 429, the connection closed after it, and
/// its source penalized, so that the peer's retries are refused before TLS for a while.
fn over_cap<I>(ctx: &ServerCtx<I>, auth: &ConnAuth) -> HttpResponse {
    ctx.gate.penalize(auth.source);
    auth.over_cap.notify_one();
    limit_exceeded("too many connections")
}

/// 429 `M_LIMIT_EXCEEDED` with `retry_after_ms` and `Retry-After`: Matrix's own backpressure,
/// for a peer over one of its budgets.
fn limit_exceeded(why: &str) -> HttpResponse {
    let body = serde_json::to_vec(&MatrixError {
        errcode: "M_LIMIT_EXCEEDED".to_owned(),
        error: why.to_owned(),
        retry_after_ms: Some(RETRY_AFTER_MS),
    })
    .unwrap_or_default();
    let mut r = json(StatusCode::TOO_MANY_REQUESTS, Bytes::from(body));
    r.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER_MS.div_ceil(1000)),
    );
    r
}

fn json(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut r = http::Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

const SEND_PREFIX: &str = "/_matrix/federation/v1/send/";

async fn handle<I: Inbound>(
    ctx: Arc<ServerCtx<I>>,
    auth: &ConnAuth,
    req: http::Request<Incoming>,
) -> HttpResponse {
    // A connection some request authenticated is its peer's: the peer's refusal budget
    // applies to everything on it. (A claimed origin alone is never charged.)
    if let Some(peer) = auth.bound_to() {
        ctx.pacer.pace(&peer).await;
    }
    let r = route(&ctx, auth, req).await;
    let status = r.status();
    if (status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS)
        && let Some(peer) = auth.bound_to()
    {
        ctx.pacer.refused(&peer);
    }
    r
}

/// The answer to one request; the core's refusals come inside a 200 (and the node counts
/// them), so a 4xx here is this adapter's own.
async fn route<I: Inbound>(
    ctx: &Arc<ServerCtx<I>>,
    auth: &ConnAuth,
    req: http::Request<Incoming>,
) -> HttpResponse {
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
            match send(ctx, auth, req, txn_id).await {
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

/// `PUT /_matrix/federation/v1/send/{txnId}`. Cheap checks first: the `Authorization` header
/// (bounded) must name a configured peer as origin and us as destination before a byte of the
/// body is read; then the body within its size, deadline and the peer's byte budget; then
/// JSON (bounded depth), the origin's keys, the signature, and the transaction's contents.
/// Every refusal happens before anything is delivered.
async fn send<I: Inbound>(
    ctx: &Arc<ServerCtx<I>>,
    auth: &ConnAuth,
    req: http::Request<Incoming>,
    txn_id: String,
) -> Result<HttpResponse, HttpResponse> {
    let stats = &ctx.stats;
    if txn_id.is_empty() || txn_id.contains('/') {
        return Err(matrix_error(404, "M_UNRECOGNIZED", "unrecognized request"));
    }
    let reject = |status: u16, code: &str, why: &str| {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        matrix_error(status, code, why)
    };
    let unauthenticated = |why: &str| {
        ctx.adapter_stats.refused(Budget::Unauthenticated);
        // On a connection no request has authenticated yet, this is its failed handshake.
        if auth.bound_to().is_none() {
            ctx.gate.handshake_failed(auth.source);
        }
        reject(401, "M_UNAUTHORIZED", why)
    };
    let (parts, body) = req.into_parts();

    let xm = x_matrix(&parts.headers)
        .ok_or_else(|| unauthenticated("missing or malformed authorization"))?;
    if xm
        .destination
        .as_deref()
        .is_some_and(|d| d != &*ctx.server_name)
    {
        return Err(unauthenticated("wrong destination"));
    }
    let Some(dial) = ctx.peers.get(&xm.origin) else {
        return Err(unauthenticated("unknown origin server"));
    };
    let peer = &dial.domain;
    let bound = auth.bound_to();
    if bound.is_none() && ctx.gate.peer_conns(peer) >= ctx.gate.limits().max_conns_per_peer {
        ctx.adapter_stats.refused(Budget::ConnsPerPeer);
        return Err(over_cap(ctx, auth));
    }

    // Announced oversize or over-budget bodies are refused unread; the rest are capped and
    // counted while streaming.
    let budget = if bound.as_ref() == Some(peer) {
        &ctx.budget
    } else {
        &ctx.preauth
    };
    let limits = BodyLimits {
        max: MAX_TXN_BODY,
        deadline: ctx.body_deadline,
    };
    let (body, held) = match read_body(&parts.headers, body, peer, budget, limits).await {
        Ok(read) => read,
        Err(BodyRefusal::TooLarge) => {
            return Err(reject(413, "M_TOO_LARGE", "transaction too large"));
        }
        Err(BodyRefusal::OverBudget) => return Err(limit_exceeded("over the byte budget")),
        Err(BodyRefusal::Timeout) => return Err(reject(408, "M_UNKNOWN", "body timed out")),
        Err(_) => return Err(reject(400, "M_UNKNOWN", "body broke off")),
    };

    // The checks below cost CPU in proportion to the body: one transaction at a time per
    // origin (a claimed origin queues apart from the verified one, so a claim cannot delay the
    // peer), on the blocking pool, so a peer's large transactions take its own turns and not
    // the runtime workers every peer's connections share.
    let slots = ctx
        .cpu
        .get(&xm.origin)
        .map(|s| s[usize::from(bound.as_ref() != Some(peer))].clone());
    let turn = match slots {
        Some(slot) => match tokio::time::timeout(ctx.request_timeout, slot.acquire_owned()).await {
            Ok(Ok(turn)) => Some(turn),
            _ => return Err(limit_exceeded("busy with this origin's transactions")),
        },
        None => None,
    };
    let checked = |c: Checked| match c {
        Checked::NotJson => reject(400, "M_NOT_JSON", "content not json"),
        Checked::NotObject => reject(400, "M_BAD_JSON", "content must be a json object"),
        Checked::TooDeep => reject(400, "M_BAD_JSON", "json nested too deeply"),
        Checked::BadRequestLine => reject(400, "M_UNRECOGNIZED", "bad request line"),
        Checked::BadSignature => unauthenticated("invalid signature"),
    };
    let blocking_failed = || reject(500, "M_UNKNOWN", "check did not finish");

    // Well-formed JSON and an object; nested no deeper than anything downstream parses.
    let json_body = body.clone();
    tokio::task::spawn_blocking(move || {
        let raw: &RawValue = serde_json::from_slice(&json_body).map_err(|_| Checked::NotJson)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(Checked::NotObject);
        }
        if !json_depth_within(&json_body, MAX_JSON_DEPTH) {
            return Err(Checked::TooDeep);
        }
        Ok(())
    })
    .await
    .map_err(|_| blocking_failed())?
    .map_err(checked)?;

    let keys = match ctx
        .keys
        .keys_for(dial, xm.key.as_str(), ctx.request_timeout)
        .await
    {
        Ok(keys) => keys,
        Err(KeyRefusal::Busy) => {
            return Err(reject(503, "M_UNKNOWN", "origin keys not available yet"));
        }
        Err(e) => return Err(unauthenticated(e.as_str())),
    };
    let map = PublicKeyMap::from([(xm.origin.to_string(), keys.keys)]);
    let (method, uri, server_name) = (
        parts.method.clone(),
        parts.uri.clone(),
        ctx.server_name.clone(),
    );
    let (signed, signed_body, vstats) = (xm.clone(), body.clone(), stats.clone());
    tokio::task::spawn_blocking(move || {
        let check = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(&signed_body[..])
            .map_err(|_| Checked::BadRequestLine)?;
        let started = Instant::now();
        // A sender that sends its body as canonical JSON (as this relay does) signed exactly
        // the request object with the body spliced in: verify that first, with no JSON tree.
        // Anything else gets the full check, which canonicalizes the body first.
        let verified = if verify_canonical_put(&signed, &check, &server_name, &map) {
            Ok(())
        } else {
            signed.verify_http_request(&check, &server_name, &map)
        };
        vstats
            .verify_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        verified.map_err(|e| {
            debug!(origin = %signed.origin, error = %e, "x-matrix signature refused");
            Checked::BadSignature
        })
    })
    .await
    .map_err(|_| blocking_failed())?
    .map_err(checked)?;
    // Verified: the connection is this peer's from now on (if it is under its cap).
    if auth.bind(&ctx.gate, peer).is_err() {
        return Err(over_cap(ctx, auth));
    }

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

    // The CPU-heavy part is over; waiting for the node's answers does not hold the turn.
    drop(turn);

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
    let txn_key = key.clone();
    let task = tokio::spawn(async move {
        // The body's bytes count until every request in it has been answered.
        let _held = held;
        let futures: Vec<_> = requests
            .iter()
            .map(|r| {
                inbound.request(Request {
                    from: from.clone(),
                    transport: TransportKind::Matrix,
                    endpoint: r.endpoint,
                    target: r.target.clone(),
                    seq: r.seq,
                    lineage: r.lineage,
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
            ctx.txns.abandon(&txn_key);
            Err(matrix_error(500, "M_UNKNOWN", "internal error"))
        }
    }
}

/// Whether `x`'s signature is valid over the X-Matrix request object of `req` built around
/// its body as it is (the body must already have been found to be one JSON object, so the
/// signed bytes parse as that request object and nothing else). The origin signed exactly
/// these bytes, so a request that passes is one it made; one whose body is not in canonical
/// form fails here and is left to the full check.
pub(crate) fn verify_canonical_put(
    x: &XMatrix,
    req: &http::Request<&[u8]>,
    destination: &ServerName,
    keys: &PublicKeyMap,
) -> bool {
    if x.destination.as_deref().is_some_and(|d| d != destination) {
        return false;
    }
    let Some(uri) = req.uri().path_and_query() else {
        return false;
    };
    let Some(key) = keys
        .get(x.origin.as_str())
        .and_then(|set| set.get(x.key.as_str()))
    else {
        return false;
    };
    if !x.key.as_str().starts_with("ed25519:") {
        return false;
    }
    let signed = crate::wire::x_matrix_signed_bytes(
        req.body(),
        destination.as_str(),
        req.method().as_str(),
        x.origin.as_str(),
        uri.as_str(),
    );
    ruma::signatures::verify_canonical_json_bytes(
        &ruma::signatures::SigningKeyAlgorithm::Ed25519,
        key.as_bytes(),
        x.sig.as_bytes(),
        &signed,
    )
    .is_ok()
}

/// The `Authorization: X-Matrix` header, parsed only if it is short and has few parameters.
pub(crate) fn x_matrix(headers: &HeaderMap) -> Option<XMatrix> {
    let value = headers.get(AUTHORIZATION)?;
    let bytes = value.as_bytes();
    if bytes.len() > MAX_AUTH_HEADER
        || bytes.iter().filter(|&&b| b == b',').count() >= MAX_AUTH_PARAMS
    {
        return None;
    }
    XMatrix::extract_from_http_headers(headers).ok()
}

/// Whether JSON text nests no deeper than `max`, by one linear scan (no recursion). String
/// contents (mostly long base64 bodies) are skipped eight bytes at a time.
pub(crate) fn json_depth_within(text: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        i += 1;
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => i += string_run(&text[i..]),
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// How many bytes at the start of `s` are neither `"` nor `\`.
fn string_run(s: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Nonzero exactly when some byte of `x` equals `b` (the classic zero-byte test).
    let has = |x: u64, b: u8| {
        let y = x ^ (ONES * u64::from(b));
        y.wrapping_sub(ONES) & !y & HIGH
    };
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        if has(x, b'"') | has(x, b'\\') != 0 {
            break;
        }
        i += 8;
    }
    i + s[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .unwrap_or(s.len() - i)
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

/// Why the origin's keys cannot verify a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRefusal {
    /// The origin's current keys do not include the key id.
    UnknownKey,
    /// Fetching the keys failed, now or within [`FAILED_FETCH_TTL`].
    FetchFailed,
    /// A fetch for this origin is in flight and did not finish in time.
    Busy,
}

impl KeyRefusal {
    fn as_str(self) -> &'static str {
        match self {
            KeyRefusal::UnknownKey => "unknown key",
            KeyRefusal::FetchFailed => "cannot fetch the origin's keys",
            KeyRefusal::Busy => "origin keys not available yet",
        }
    }
}

/// Verified peer keys, fetched from the peer's key endpoint on first use. One fetch in flight
/// per origin (others wait for it); a failed fetch is remembered for [`FAILED_FETCH_TTL`].
/// Entries exist only for configured peers.
#[derive(Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<OwnedServerName, KeyEntry>>,
}

#[derive(Default)]
struct KeyEntry {
    keys: Option<(ServerKeys, Instant)>,
    failed_at: Option<Instant>,
    /// Set while a fetch is in flight; its sender is dropped when the fetch ends, however.
    fetching: Option<watch::Receiver<()>>,
}

enum Step {
    Done(Result<ServerKeys, KeyRefusal>),
    Wait(watch::Receiver<()>),
    Fetch(watch::Sender<()>),
}

impl KeyCache {
    fn step(&self, server: &ServerName, key_id: &str) -> Step {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.entry(server.to_owned()).or_default();
        if let Some((k, at)) = &e.keys
            && k.valid_until_ms > now_ms()
            && at.elapsed() < KEY_CACHE_TTL
        {
            if k.keys.contains_key(key_id) {
                return Step::Done(Ok(k.clone()));
            }
            // An unknown key id refetches, but not more often than this.
            if at.elapsed() < REFETCH_AFTER {
                return Step::Done(Err(KeyRefusal::UnknownKey));
            }
        }
        if e.failed_at.is_some_and(|t| t.elapsed() < FAILED_FETCH_TTL) {
            return Step::Done(Err(KeyRefusal::FetchFailed));
        }
        if let Some(rx) = &e.fetching
            && rx.has_changed().is_ok()
        {
            return Step::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        e.fetching = Some(rx);
        Step::Fetch(tx)
    }

    /// The keys of `dial`'s server, if they include `key_id`; waits up to `wait` for a fetch
    /// another request started.
    pub(crate) async fn keys_for(
        &self,
        dial: &Dial,
        key_id: &str,
        wait: Duration,
    ) -> Result<ServerKeys, KeyRefusal> {
        // Twice at most: a fetch we waited for was either finished or abandoned.
        for _ in 0..2 {
            match self.step(&dial.server_name, key_id) {
                Step::Done(result) => return result,
                Step::Wait(mut rx) => {
                    // Returns when the fetcher drops its sender, whatever the outcome.
                    if tokio::time::timeout(wait, rx.changed()).await.is_err() {
                        return Err(KeyRefusal::Busy);
                    }
                }
                Step::Fetch(done) => {
                    let fetched = dial.fetch_keys().await;
                    let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                    let e = entries.entry(dial.server_name.clone()).or_default();
                    e.fetching = None;
                    drop(done);
                    return match fetched {
                        Ok(keys) => {
                            e.keys = Some((keys.clone(), Instant::now()));
                            e.failed_at = None;
                            if keys.keys.contains_key(key_id) {
                                Ok(keys)
                            } else {
                                Err(KeyRefusal::UnknownKey)
                            }
                        }
                        Err(error) => {
                            warn!(server = %dial.server_name, %error, "cannot fetch server keys");
                            e.failed_at = Some(Instant::now());
                            Err(KeyRefusal::FetchFailed)
                        }
                    };
                }
            }
        }
        Err(KeyRefusal::Busy)
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
    fn json_depth_counts_brackets_outside_strings_only() {
        assert!(json_depth_within(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(!json_depth_within(br#"{"a":[1,{"b":2}]}"#, 2));
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(json_depth_within(br#"{"a":"[[[\"{{{"}"#, 1));
        let deep = "[".repeat(150_000);
        assert!(!json_depth_within(deep.as_bytes(), MAX_JSON_DEPTH));
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(json_depth_within(ok.as_bytes(), MAX_JSON_DEPTH));
        // Long strings, with quotes, escapes and brackets at every offset, agree with a
        // byte-at-a-time scan.
        let naive = |text: &[u8]| {
            let (mut depth, mut deepest, mut in_string, mut escaped) = (0i32, 0, false, false);
            for &b in text {
                if in_string {
                    match b {
                        _ if escaped => escaped = false,
                        b'\\' => escaped = true,
                        b'"' => in_string = false,
                        _ => {}
                    }
                } else if b == b'"' {
                    in_string = true;
                } else if b == b'[' || b == b'{' {
                    depth += 1;
                    deepest = deepest.max(depth);
                } else if b == b']' || b == b'}' {
                    depth = (depth - 1).max(0);
                }
            }
            deepest as usize
        };
        for at in 0..40 {
            for special in [r#"\""#, r#"\\"#, "[", "\"", "]"] {
                let mut inner = "a".repeat(at);
                inner.push_str(special);
                inner.push_str(&"b".repeat(17));
                let text = format!(r#"[["{inner}"],[["x"]],"{inner}"]"#);
                let want = naive(text.as_bytes());
                assert!(json_depth_within(text.as_bytes(), want), "{text}");
                assert!(!json_depth_within(text.as_bytes(), want - 1), "{text}");
            }
        }
    }

    #[test]
    fn canonical_put_verifies_only_the_signed_request() {
        let key = SigningKey::from_seed([5; 32]).expect("key");
        let name = |s: &str| OwnedServerName::try_from(s.to_owned()).expect("server name");
        let (a, b) = (name("a.example"), name("b.example"));
        let path = "/_matrix/federation/v1/send/m1.1";
        let body = crate::wire::txn_body("a.example", 5, br#"{"content":{},"edu_type":"x"}"#);
        let auth = crate::client::sign_request(&a, &b, &key, path, &body).expect("signs");
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let xm = x_matrix(&headers).expect("x-matrix header");
        let keys = crate::keys::verify_key_document("a.example", &key.key_document("a.example"))
            .expect("key document");
        let map = PublicKeyMap::from([("a.example".to_owned(), keys.keys)]);
        let req = |method: &str, uri: &str, body: &'static [u8]| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .body(body)
                .expect("request")
        };
        let body: &'static [u8] = Box::leak(body.into_boxed_slice());
        assert!(verify_canonical_put(&xm, &req("PUT", path, body), &b, &map));
        // The full check agrees.
        assert!(
            xm.verify_http_request(&req("PUT", path, body), &b, &map)
                .is_ok()
        );
        // Another path, method, destination or body, or the same body with a space: refused.
        assert!(!verify_canonical_put(
            &xm,
            &req("PUT", "/_matrix/federation/v1/send/m1.2", body),
            &b,
            &map
        ));
        assert!(!verify_canonical_put(
            &xm,
            &req("POST", path, body),
            &b,
            &map
        ));
        assert!(!verify_canonical_put(
            &xm,
            &req("PUT", path, body),
            &name("c.example"),
            &map
        ));
        let mut tampered = body.to_vec();
        let at = tampered
            .iter()
            .position(|&c| c == b'5')
            .expect("the timestamp");
        tampered[at] = b'6';
        let tampered: &'static [u8] = Box::leak(tampered.into_boxed_slice());
        assert!(!verify_canonical_put(
            &xm,
            &req("PUT", path, tampered),
            &b,
            &map
        ));
        let spaced: &'static [u8] = Box::leak(
            format!(" {}", String::from_utf8_lossy(body))
                .into_bytes()
                .into_boxed_slice(),
        );
        assert!(!verify_canonical_put(
            &xm,
            &req("PUT", path, spaced),
            &b,
            &map
        ));
        // A non-canonical body still passes the full check, which the server falls back to.
        assert!(
            xm.verify_http_request(&req("PUT", path, spaced), &b, &map)
                .is_ok()
        );
        // Another key under the same key id does not verify it.
        let other = SigningKey::from_seed([6; 32]).expect("key");
        let forged = ruma::signatures::PublicKeySet::from([(
            key.id().to_owned(),
            ruma::serde::Base64::new(other.public_key().to_vec()),
        )]);
        let wrong = PublicKeyMap::from([("a.example".to_owned(), forged)]);
        assert!(!verify_canonical_put(
            &xm,
            &req("PUT", path, body),
            &b,
            &wrong
        ));
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
