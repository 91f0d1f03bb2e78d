//! The sending side: one task per destination, one HTTP/1.1 connection, one transaction in
//! flight. The backlog that builds up while a transaction is out drains into full transactions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::Inbound;
use relay_adapter::peers::PeerJob;
use relay_core::transport::{Response, Status, Transmit, TransportError};
use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use ruma::serde::Base64;
use ruma::signatures::KeyPair;
use ruma::{OwnedServerName, OwnedServerSigningKeyId};
use rustls::pki_types::ServerName;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::keys::{ServerKeys, SigningKey, now_ms, verify_key_document};
use crate::wire::{self, MAX_EDUS, MatrixError, SendResponse};

/// Largest answer body read from a peer.
const MAX_ANSWER: usize = 4 << 20;

/// Work for a destination task.
#[derive(Debug)]
pub(crate) enum Job {
    Transmit(Transmit),
    /// An EDU of any type (for example `m.direct_to_device`), reported through `done`.
    Edu {
        edu_type: String,
        content: Box<RawValue>,
        done: oneshot::Sender<Result<(), TransportError>>,
    },
    Probe,
}

impl PeerJob for Job {
    fn transmit(transmit: Transmit) -> Self {
        Job::Transmit(transmit)
    }

    fn probe() -> Self {
        Job::Probe
    }
}

/// One HTTP/1.1 connection to a peer.
pub(crate) type Conn = http1::SendRequest<Full<Bytes>>;

/// Where and how to reach one peer.
#[derive(Clone)]
pub(crate) struct Dial {
    pub(crate) domain: ProviderDomain,
    /// Resolved again at every connection attempt.
    pub(crate) addr: relay_adapter::PeerAddr,
    pub(crate) server_name: OwnedServerName,
    pub(crate) connector: TlsConnector,
    pub(crate) timeout: Duration,
}

impl Dial {
    pub(crate) async fn connect(&self) -> Result<Conn, String> {
        let fut = async {
            let tcp = self
                .addr
                .connect_tcp()
                .await
                .map_err(|e| format!("tcp to {}: {e}", self.addr))?;
            let _ = tcp.set_nodelay(true);
            let name =
                ServerName::try_from(self.domain.as_str().to_owned()).map_err(|e| e.to_string())?;
            // The verifier accepts only a certificate trusted for `domain`.
            let tls = self
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            let (sender, conn) = http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("http: {e}"))?;
            let peer = self.domain.clone();
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    debug!(%peer, %error, "matrix connection closed");
                }
            });
            Ok(sender)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_owned()))
    }

    fn request(&self, method: Method, path: &str, body: Bytes) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        if let Ok(host) = HeaderValue::from_str(self.server_name.as_str()) {
            req.headers_mut().insert(HOST, host);
        }
        req
    }

    /// Fetches and checks the peer's key document on a connection of its own.
    pub(crate) async fn fetch_keys(&self) -> Result<ServerKeys, String> {
        let mut conn = self.connect().await?;
        let req = self.request(Method::GET, "/_matrix/key/v2/server", Bytes::new());
        let (status, body) = exchange(&mut conn, req, self.timeout).await?;
        if status != StatusCode::OK {
            return Err(format!("key server answered {status}"));
        }
        verify_key_document(self.server_name.as_str(), &body).map_err(|e| e.to_string())
    }
}

/// Sends one request and reads the whole answer, within `timeout`.
async fn exchange(
    conn: &mut Conn,
    req: http::Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let fut = async {
        conn.ready().await.map_err(|e| e.to_string())?;
        let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// Everything a destination task needs.
pub(crate) struct PeerCtx<I> {
    pub(crate) dial: Dial,
    pub(crate) origin: OwnedServerName,
    pub(crate) key: Arc<SigningKey>,
    pub(crate) inbound: I,
    pub(crate) stats: Arc<crate::MatrixStats>,
}

/// Transaction ids: the start time in ms and a counter, unique across restarts.
static TXN_COUNTER: AtomicU64 = AtomicU64::new(0);

fn next_txn_id() -> String {
    format!(
        "m{}.{}",
        now_ms(),
        TXN_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The EDUs of the transaction being built, already in canonical JSON and joined by commas.
#[derive(Default)]
struct EduList {
    json: Vec<u8>,
    count: usize,
}

impl EduList {
    /// Opens the next EDU's place in `json`.
    fn next(&mut self) -> &mut Vec<u8> {
        if self.count > 0 {
            self.json.push(b',');
        }
        self.count += 1;
        &mut self.json
    }
}

/// A job placed in the transaction being built.
enum Slot {
    Transmit(Transmit),
    Edu(oneshot::Sender<Result<(), TransportError>>),
}

/// A transaction signed and ready to go.
struct Prepared {
    txn_id: String,
    req: http::Request<Full<Bytes>>,
    edus: usize,
    slots: Vec<Slot>,
}

/// Runs until the queue is closed and drained. While a transaction is in flight (one at a
/// time, as the Matrix spec requires), the next one is built and signed from the jobs queued
/// meanwhile, so that signing overlaps the peer's work instead of following it.
pub(crate) async fn run_peer<I: Inbound>(
    ctx: PeerCtx<I>,
    mut rx: mpsc::Receiver<Job>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<Conn> = None;
    // A job taken from the queue that did not fit into the last transaction.
    let mut carry: Option<Job> = None;
    // The next transaction, signed while the previous one was in flight.
    let mut ready: Option<Prepared> = None;
    let mut closing = false;
    let mut drained = false;
    loop {
        let txn = match ready.take() {
            Some(t) => t,
            None => {
                let first = match carry.take() {
                    Some(j) => j,
                    None => tokio::select! {
                        job = rx.recv() => match job {
                            Some(j) => j,
                            None => break,
                        },
                        _ = shutdown.changed(), if !closing => {
                            closing = true;
                            rx.close();
                            continue;
                        }
                    },
                };
                if let Job::Probe = first {
                    let alive = probe(&ctx, &mut conn).await;
                    ctx.inbound.probe_outcome(ctx.dial.domain.clone(), alive);
                    continue;
                }
                match build_txn(&ctx, first, &mut rx, &mut carry) {
                    Some(t) => t,
                    None => continue,
                }
            }
        };
        let deliver = send_txn(&ctx, &mut conn, txn);
        tokio::pin!(deliver);
        loop {
            let carried = matches!(carry, Some(Job::Transmit(_) | Job::Edu { .. }));
            tokio::select! {
                // First, so the request is handed to the connection before anything else.
                biased;
                () = &mut deliver => break,
                () = std::future::ready(()), if ready.is_none() && carried => {
                    if let Some(first) = carry.take() {
                        ready = build_txn(&ctx, first, &mut rx, &mut carry);
                    }
                }
                job = rx.recv(), if ready.is_none() && carry.is_none() && !drained => match job {
                    // Answered after the transactions before it, in queue order.
                    Some(Job::Probe) => carry = Some(Job::Probe),
                    Some(j) => ready = build_txn(&ctx, j, &mut rx, &mut carry),
                    None => drained = true,
                },
            }
        }
    }
    debug!(peer = %ctx.dial.domain, "matrix peer task stopped");
}

/// Builds and signs one transaction from `first` and the backlog: up to [`MAX_EDUS`] EDUs.
/// A job that does not fit (or a probe) is left in `carry`. `None` if nothing in it remains
/// to send (every job was answered locally).
fn build_txn<I: Inbound>(
    ctx: &PeerCtx<I>,
    first: Job,
    rx: &mut mpsc::Receiver<Job>,
    carry: &mut Option<Job>,
) -> Option<Prepared> {
    // Build one transaction from the backlog: up to MAX_EDUS EDUs.
    let mut edus = EduList::default();
    let mut slots: Vec<Slot> = Vec::new();
    let mut next = Some(first);
    while let Some(job) = next.take() {
        match job {
            Job::Probe => {
                // Answered after this transaction, in queue order.
                *carry = Some(Job::Probe);
                break;
            }
            Job::Edu {
                edu_type,
                content,
                done,
            } => {
                if edus.count + 1 > MAX_EDUS {
                    *carry = Some(Job::Edu {
                        edu_type,
                        content,
                        done,
                    });
                    break;
                }
                let mark = (edus.json.len(), edus.count);
                if wire::write_other_edu(edus.next(), &edu_type, &content).is_some() {
                    slots.push(Slot::Edu(done));
                } else {
                    // No canonical form, so it cannot be signed: refused alone.
                    edus.json.truncate(mark.0);
                    edus.count = mark.1;
                    let why = "edu content has no canonical json form".to_owned();
                    let _ = done.send(Err(TransportError::BadResponse(why)));
                }
            }
            Job::Transmit(t) => {
                if t.target.len() > wire::MAX_TARGET {
                    ctx.inbound.outcome(
                        t.id,
                        Ok(Response::error(Status::BadRequest, "target too long")),
                    );
                } else {
                    let mut frags =
                        wire::fragments(&t.id.0.to_string(), t.endpoint, &t.target, t.seq, &t.body);
                    if let Some(l) = t.lineage {
                        for f in &mut frags {
                            (f.inc, f.prev_inc) = (Some(l.batch), Some(l.prev));
                        }
                    }
                    if frags.len() > MAX_EDUS {
                        // Larger than a whole transaction: the core halves its batches.
                        ctx.inbound.outcome(
                            t.id,
                            Ok(Response::error(
                                Status::TooLarge,
                                "larger than one matrix transaction",
                            )),
                        );
                    } else if edus.count + frags.len() > MAX_EDUS {
                        *carry = Some(Job::Transmit(t));
                        break;
                    } else {
                        for f in &frags {
                            wire::write_request_edu(edus.next(), f);
                        }
                        slots.push(Slot::Transmit(t));
                    }
                }
            }
        }
        if edus.count < MAX_EDUS {
            next = rx.try_recv().ok();
        }
    }
    if slots.is_empty() {
        return None;
    }
    prepare(ctx, edus, slots)
}

async fn ensure_conn<'a, I>(
    ctx: &PeerCtx<I>,
    conn: &'a mut Option<Conn>,
) -> Result<&'a mut Conn, String> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = None;
        let c = ctx.dial.connect().await?;
        info!(peer = %ctx.dial.domain, addr = %ctx.dial.addr, "matrix connected");
        *conn = Some(c);
    }
    conn.as_mut().ok_or_else(|| "no connection".to_owned())
}

async fn probe<I>(ctx: &PeerCtx<I>, conn: &mut Option<Conn>) -> bool {
    let Ok(c) = ensure_conn(ctx, conn).await else {
        return false;
    };
    let req = ctx
        .dial
        .request(Method::GET, "/_matrix/federation/v1/version", Bytes::new());
    match exchange(c, req, ctx.dial.timeout).await {
        Ok((status, _)) => status == StatusCode::OK,
        Err(_) => {
            *conn = None;
            false
        }
    }
}

/// Signs one transaction; on failure its jobs are answered and `None` returned.
fn prepare<I: Inbound>(ctx: &PeerCtx<I>, edus: EduList, slots: Vec<Slot>) -> Option<Prepared> {
    let txn_id = next_txn_id();
    let body = Bytes::from(wire::txn_body(ctx.origin.as_str(), now_ms(), &edus.json));
    let path = format!("/_matrix/federation/v1/send/{txn_id}");
    let mut req = ctx.dial.request(Method::PUT, &path, Bytes::new());
    let auth = match sign_canonical_put(&ctx.origin, &ctx.dial.server_name, &ctx.key, &path, &body)
    {
        Ok(a) => a,
        Err(e) => {
            report_all(ctx, slots, Err(TransportError::BadResponse(e)));
            return None;
        }
    };
    *req.body_mut() = Full::new(body);
    req.headers_mut().insert(AUTHORIZATION, auth);
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Some(Prepared {
        txn_id,
        req,
        edus: edus.count,
        slots,
    })
}

/// Sends one signed transaction, then reports every job in it exactly once.
async fn send_txn<I: Inbound>(ctx: &PeerCtx<I>, conn: &mut Option<Conn>, txn: Prepared) {
    let Prepared {
        txn_id,
        req,
        edus,
        slots,
    } = txn;
    let c = match ensure_conn(ctx, conn).await {
        Ok(c) => c,
        Err(reason) => {
            warn!(peer = %ctx.dial.domain, %reason, "matrix connect failed");
            return report_all(ctx, slots, Err(TransportError::Unreachable(reason)));
        }
    };
    ctx.stats.txns_sent.fetch_add(1, Ordering::Relaxed);
    ctx.stats
        .edus_sent
        .fetch_add(edus as u64, Ordering::Relaxed);
    let (status, answer) = match exchange(c, req, ctx.dial.timeout).await {
        Ok(x) => x,
        Err(reason) => {
            debug!(peer = %ctx.dial.domain, %reason, txn = %txn_id, "matrix transaction failed");
            // The connection's state is unknown now: the next transaction opens a new one.
            *conn = None;
            let e = if reason == "timed out" {
                TransportError::Timeout
            } else {
                TransportError::ConnectionLost
            };
            return report_all(ctx, slots, Err(e));
        }
    };
    if status != StatusCode::OK {
        let err: Option<MatrixError> = serde_json::from_slice(&answer).ok();
        let code = err.as_ref().map(|e| e.errcode.as_str()).unwrap_or("");
        warn!(peer = %ctx.dial.domain, %status, errcode = code, txn = %txn_id, "matrix transaction refused");
        let st = match status.as_u16() {
            401 | 403 => Status::Forbidden,
            413 => Status::TooLarge,
            429 => Status::Unavailable,
            code => match Status::from_http_code(code) {
                Some(s) => s,
                None => {
                    let e = TransportError::BadResponse(format!("status {status}"));
                    return report_all(ctx, slots, Err(e));
                }
            },
        };
        let mut r = Response::new(st, Bytes::from(code.to_owned()));
        r.retry_after = err
            .and_then(|e| e.retry_after_ms)
            .map(Duration::from_millis);
        return report_all(ctx, slots, Ok(r));
    }
    let parsed: SendResponse = match serde_json::from_slice(&answer) {
        Ok(p) => p,
        Err(e) => {
            return report_all(
                ctx,
                slots,
                Err(TransportError::BadResponse(format!("send answer: {e}"))),
            );
        }
    };
    for slot in slots {
        match slot {
            Slot::Edu(done) => {
                let _ = done.send(Ok(()));
            }
            Slot::Transmit(t) => {
                let outcome = parsed
                    .responses
                    .get(&t.id.0.to_string())
                    .and_then(|r| r.to_response())
                    .ok_or_else(|| {
                        TransportError::BadResponse("no valid answer for the request".into())
                    });
                ctx.inbound.outcome(t.id, outcome);
            }
        }
    }
}

fn report_all<I: Inbound>(
    ctx: &PeerCtx<I>,
    slots: Vec<Slot>,
    outcome: Result<Response, TransportError>,
) {
    for slot in slots {
        match slot {
            Slot::Edu(done) => {
                let _ = done.send(outcome.as_ref().map(|_| ()).map_err(Clone::clone));
            }
            Slot::Transmit(t) => ctx.inbound.outcome(t.id, outcome.clone()),
        }
    }
}

/// [`sign_request`] for a body that is already canonical JSON (as [`wire::txn_body`] writes
/// it): the signed bytes are built around the body as it is, with no parse into a JSON tree
/// and no re-serialization. The signature is the one [`sign_request`] gives (ed25519 is
/// deterministic), which a test checks.
pub fn sign_canonical_put(
    origin: &OwnedServerName,
    destination: &OwnedServerName,
    key: &SigningKey,
    path: &str,
    body: &[u8],
) -> Result<HeaderValue, String> {
    let signed =
        wire::x_matrix_signed_bytes(body, destination.as_str(), "PUT", origin.as_str(), path);
    let (key_id, sig) = key.pair().sign(&signed).into_parts();
    let key_id = OwnedServerSigningKeyId::try_from(key_id.as_str()).map_err(|e| e.to_string())?;
    let x = XMatrix::new(
        origin.clone(),
        destination.clone(),
        key_id,
        Base64::new(sig),
    );
    Ok(HeaderValue::from(&x))
}

/// The `Authorization: X-Matrix ...` value for `PUT {path}` with `body` from `origin` to
/// `destination`.
pub fn sign_request(
    origin: &OwnedServerName,
    destination: &OwnedServerName,
    key: &SigningKey,
    path: &str,
    body: &[u8],
) -> Result<HeaderValue, String> {
    let mut req = http::Request::new(body);
    *req.method_mut() = Method::PUT;
    *req.uri_mut() = path
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    XMatrix::sign_http_request(
        &req,
        XMatrixSigningInput::new(origin.clone(), destination.clone(), key.pair()),
    )
    .map(|x| HeaderValue::from(&x))
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimi_wire::endpoint::Endpoint;
    use ruma::CanonicalJsonValue;

    fn name(s: &str) -> OwnedServerName {
        OwnedServerName::try_from(s.to_owned()).expect("server name")
    }

    /// A body as `run_peer` builds it: request fragments (with and without seq and
    /// lineage, a target that needs escaping) and an EDU of another type.
    fn body() -> Vec<u8> {
        let mut edus = EduList::default();
        let payload = [Bytes::from(vec![0xa5u8; 70_000])];
        let mut frags = wire::fragments(
            "17",
            Endpoint::Notify,
            "mimi://a.example/r/\"é\n",
            Some(9),
            &payload,
        );
        for f in &mut frags {
            (f.inc, f.prev_inc) = (Some(u64::MAX), Some(3));
        }
        frags.extend(wire::fragments(
            "18",
            Endpoint::SubmitMessage,
            "t",
            None,
            &[],
        ));
        for f in &frags {
            wire::write_request_edu(edus.next(), f);
        }
        let other = RawValue::from_string(
            r#"{ "z": [1, {"b": "x", "a": null}], "a": "\u00e9" }"#.to_owned(),
        )
        .expect("raw json");
        wire::write_other_edu(edus.next(), "m.direct_to_device", &other).expect("canonical");
        assert_eq!(edus.count, 4);
        wire::txn_body("a.example", 1_700_000_000_000, &edus.json)
    }

    #[test]
    fn transaction_bodies_are_canonical_json() {
        let body = body();
        let parsed: CanonicalJsonValue = serde_json::from_slice(&body).expect("parses");
        assert_eq!(serde_json::to_vec(&parsed).expect("serializes"), body);
        // The request EDUs read back as they were written.
        let txn: wire::IncomingTxn<'_> = serde_json::from_slice(&body).expect("a transaction");
        let c: wire::RequestContent =
            serde_json::from_str(txn.edus[1].content.get()).expect("request content");
        assert_eq!(
            (c.id.as_str(), c.part, c.parts, c.seq),
            ("17", 1, 2, Some(9))
        );
        assert_eq!((c.inc, c.prev_inc), (Some(u64::MAX), Some(3)));
        assert_eq!(c.target, "mimi://a.example/r/\"é\n");
    }

    #[test]
    fn fast_signature_is_the_one_ruma_gives() {
        let key = SigningKey::from_seed([3; 32]).expect("key");
        let (a, b) = (name("a.example"), name("b.example:8448"));
        let path = "/_matrix/federation/v1/send/m1.2";
        let body = body();
        let fast = sign_canonical_put(&a, &b, &key, path, &body).expect("signs");
        let slow = sign_request(&a, &b, &key, path, &body).expect("signs");
        assert_eq!(fast, slow);
        // Another body gives another signature.
        let other = wire::txn_body("a.example", 1, b"");
        assert_ne!(
            sign_canonical_put(&a, &b, &key, path, &other).expect("signs"),
            fast
        );
    }

    #[test]
    fn edus_without_canonical_form_are_refused() {
        let mut out = Vec::new();
        let float = RawValue::from_string(r#"{"x":1.5}"#.to_owned()).expect("raw json");
        assert!(wire::write_other_edu(&mut out, "m.typing", &float).is_none());
        let big = RawValue::from_string(r#"{"x":18446744073709551615}"#.to_owned()).expect("raw");
        assert!(wire::write_other_edu(&mut out, "m.typing", &big).is_none());
    }
}
