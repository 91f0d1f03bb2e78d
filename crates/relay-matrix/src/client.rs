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
use ruma::OwnedServerName;
use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::keys::{ServerKeys, SigningKey, now_ms, verify_key_document};
use crate::wire::{self, EDU_REQUEST, MAX_EDUS, MatrixError, SendResponse};

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

#[derive(Serialize)]
struct OutEdu<'a> {
    edu_type: &'a str,
    content: &'a RawValue,
}

#[derive(Serialize)]
struct OutTxn<'a> {
    origin: &'a str,
    origin_server_ts: u64,
    pdus: [(); 0],
    edus: Vec<OutEdu<'a>>,
}

/// A job placed in the transaction being built.
enum Slot {
    Transmit(Transmit),
    Edu(oneshot::Sender<Result<(), TransportError>>),
}

/// Runs until the queue is closed and drained.
pub(crate) async fn run_peer<I: Inbound>(
    ctx: PeerCtx<I>,
    mut rx: mpsc::Receiver<Job>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<Conn> = None;
    // A job taken from the queue that did not fit into the last transaction.
    let mut carry: Option<Job> = None;
    let mut closing = false;
    loop {
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
        // Build one transaction from the backlog: up to MAX_EDUS EDUs.
        let mut edus: Vec<(String, Box<RawValue>)> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Probe => {
                    // Answered after this transaction, in queue order.
                    carry = Some(Job::Probe);
                    break;
                }
                Job::Edu {
                    edu_type,
                    content,
                    done,
                } => {
                    if edus.len() + 1 > MAX_EDUS {
                        carry = Some(Job::Edu {
                            edu_type,
                            content,
                            done,
                        });
                        break;
                    }
                    edus.push((edu_type, content));
                    slots.push(Slot::Edu(done));
                }
                Job::Transmit(t) => {
                    if t.target.len() > wire::MAX_TARGET {
                        ctx.inbound.outcome(
                            t.id,
                            Ok(Response::error(Status::BadRequest, "target too long")),
                        );
                    } else {
                        let mut frags = wire::fragments(
                            &t.id.0.to_string(),
                            t.endpoint,
                            &t.target,
                            t.seq,
                            &t.body,
                        );
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
                        } else if edus.len() + frags.len() > MAX_EDUS {
                            carry = Some(Job::Transmit(t));
                            break;
                        } else {
                            for f in &frags {
                                let raw = serde_json::value::to_raw_value(f);
                                match raw {
                                    Ok(raw) => edus.push((EDU_REQUEST.to_owned(), raw)),
                                    Err(_) => continue,
                                }
                            }
                            slots.push(Slot::Transmit(t));
                        }
                    }
                }
            }
            if edus.len() < MAX_EDUS {
                next = rx.try_recv().ok();
            }
        }
        if slots.is_empty() {
            continue;
        }
        send_txn(&ctx, &mut conn, edus, slots).await;
    }
    debug!(peer = %ctx.dial.domain, "matrix peer task stopped");
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

/// Signs and sends one transaction, then reports every job in it exactly once.
async fn send_txn<I: Inbound>(
    ctx: &PeerCtx<I>,
    conn: &mut Option<Conn>,
    edus: Vec<(String, Box<RawValue>)>,
    slots: Vec<Slot>,
) {
    let txn_id = next_txn_id();
    let body = OutTxn {
        origin: ctx.origin.as_str(),
        origin_server_ts: now_ms(),
        pdus: [],
        edus: edus
            .iter()
            .map(|(t, c)| OutEdu {
                edu_type: t,
                content: c,
            })
            .collect(),
    };
    let body = match serde_json::to_vec(&body) {
        Ok(b) => Bytes::from(b),
        Err(e) => return report_all(ctx, slots, Err(TransportError::BadResponse(e.to_string()))),
    };
    let path = format!("/_matrix/federation/v1/send/{txn_id}");
    let mut req = ctx.dial.request(Method::PUT, &path, Bytes::new());
    let auth = match sign_request(&ctx.origin, &ctx.dial.server_name, &ctx.key, &path, &body) {
        Ok(a) => a,
        Err(e) => return report_all(ctx, slots, Err(TransportError::BadResponse(e))),
    };
    *req.body_mut() = Full::new(body);
    req.headers_mut().insert(AUTHORIZATION, auth);
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));

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
        .fetch_add(edus.len() as u64, Ordering::Relaxed);
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
