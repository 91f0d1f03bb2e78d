//! The listening side: TLS accept, peer authentication, routing and the answer's headers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, FROM, HOST, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mimi_wire::endpoint::{DIRECTORY_PATH, Endpoint};
use mimi_wire::uri::ProviderDomain;
use relay_adapter::http::{BodyLimits, BodyRefusal, read_body};
use relay_adapter::{AdapterStats, ByteBudget, Gate, HandshakePermit, Inbound, LogLimiter, Pacer};
use relay_core::transport::{Lineage, Request, Response, TransportKind};
use relay_tls::PeerTrust;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::path::{DecodeError, decode_target};
use crate::{
    CONTENT_TYPE_BODY, CONTENT_TYPE_REASON, MIMI_NEXT_SEQ, MIMI_NEXT_SEQ_INCARNATION, MIMI_SEQ,
    MIMI_SEQ_INCARNATION, MIMI_SEQ_PREV_INCARNATION,
};

/// Why the adapter itself refused a request before the node saw it. The body of the answer
/// is [`Rejection::as_str`], so a peer can tell the cases apart without parsing prose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// 400: neither `Host` nor `:authority` was sent.
    MissingHost,
    /// 421: `Host` names another provider; this connection cannot answer for it.
    WrongHost,
    /// 403: no `From` header (draft §4.1 makes it mandatory).
    MissingFrom,
    /// 403: `From` is not `mimi@<domain>`.
    MalformedFrom,
    /// 403: `From` names a provider other than the one the client certificate authenticates.
    FromMismatch,
    /// 404: not `/v1/{endpoint}/{target}` with a known endpoint, nor the directory.
    NotFound,
    /// 405: the endpoint exists but not with this method.
    MethodNotAllowed,
    /// 400: the path parameter is not valid percent-encoded UTF-8.
    BadEncoding,
    /// 400: `MIMI-Seq` is not a decimal u64.
    BadSeq,
    /// 413: the body is over the configured limit.
    TooLarge,
    /// 408: the body did not arrive within the request timeout.
    BodyTimeout,
    /// 400: the body stream broke off.
    BodyAborted,
    /// 503 with `Retry-After`: the peer already holds its share of bytes in this adapter.
    OverBudget,
}

impl Rejection {
    /// The stable token sent as the answer's body.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::MissingHost => "missing-host",
            Rejection::WrongHost => "wrong-host",
            Rejection::MissingFrom => "missing-from",
            Rejection::MalformedFrom => "malformed-from",
            Rejection::FromMismatch => "from-mismatch",
            Rejection::NotFound => "not-found",
            Rejection::MethodNotAllowed => "method-not-allowed",
            Rejection::BadEncoding => "bad-encoding",
            Rejection::BadSeq => "bad-seq",
            Rejection::TooLarge => "too-large",
            Rejection::BodyTimeout => "body-timeout",
            Rejection::BodyAborted => "body-aborted",
            Rejection::OverBudget => "over-budget",
        }
    }

    /// The HTTP status answered.
    pub fn http_code(self) -> u16 {
        match self {
            Rejection::MissingHost
            | Rejection::BadEncoding
            | Rejection::BadSeq
            | Rejection::BodyAborted => 400,
            Rejection::MissingFrom | Rejection::MalformedFrom | Rejection::FromMismatch => 403,
            Rejection::NotFound => 404,
            Rejection::MethodNotAllowed => 405,
            Rejection::BodyTimeout => 408,
            Rejection::TooLarge => 413,
            Rejection::WrongHost => 421,
            Rejection::OverBudget => 503,
        }
    }
}

type HttpResponse = http::Response<Full<Bytes>>;

/// What every connection of the listener shares.
pub(crate) struct ServerCtx<I> {
    pub(crate) inbound: I,
    pub(crate) domain: ProviderDomain,
    pub(crate) trust: Arc<PeerTrust>,
    /// The directory document, serialised once.
    pub(crate) directory: Bytes,
    pub(crate) max_body: usize,
    /// Bounds the TLS handshake, the body upload and the graceful drain.
    pub(crate) request_timeout: Duration,
    /// A body must arrive in full within this (the shorter of `request_timeout` and the
    /// limits' `frame_deadline`).
    pub(crate) body_deadline: Duration,
    /// Handshakes node-wide, then connections per peer.
    pub(crate) gate: Arc<Gate>,
    /// Body bytes each peer holds, from the first byte until the node answered.
    pub(crate) budget: Arc<ByteBudget>,
    pub(crate) stats: Arc<AdapterStats>,
    /// Peers' refusal budgets (shared with the node and the other transports).
    pub(crate) pacer: Arc<Pacer>,
    pub(crate) handshake_log: LogLimiter,
    /// HTTP/2 streams one connection may have open.
    pub(crate) h2_streams: u32,
}

/// Retry-After (seconds) of an over-budget refusal: the peer's bytes free up as the node
/// answers its other requests.
const OVER_BUDGET_RETRY_SECS: u64 = 1;

/// One TCP connection: TLS, the peer's certificate, its connection slot, then HTTP.
pub(crate) async fn serve_conn<I: Inbound>(
    ctx: Arc<ServerCtx<I>>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    handshake: HandshakePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let failed = |error: &dyn std::fmt::Display| {
        relay_adapter::failed_handshake(&ctx.stats, &ctx.handshake_log, "https", &remote, error);
        ctx.gate.handshake_failed(remote.ip());
    };
    let tls = match tokio::time::timeout(ctx.request_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => return failed(&error),
        Err(_) => return failed(&"tls handshake timed out"),
    };
    let peer = match tls.get_ref().1.peer_certificates() {
        Some(certs) => match relay_tls::peer_domain(&ctx.trust, certs) {
            Ok(peer) => peer,
            Err(error) => return failed(&error),
        },
        // Unreachable with a server config that requires client certificates.
        None => return failed(&"no client certificate"),
    };
    drop(handshake);
    let _permit = match ctx.gate.peer(&peer) {
        Ok(permit) => permit,
        Err(error) => {
            // Its retries are refused before TLS for a while (relay_adapter::Gate::admit).
            ctx.gate.penalize(remote.ip());
            debug!(%remote, %peer, %error, "https connection refused");
            return;
        }
    };
    info!(%remote, %peer, "https peer connected");

    let service = {
        let ctx = ctx.clone();
        let peer = peer.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(handle(&ctx, &peer, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    // The adaptive window lets h2 buffer at most its connection window (16 MiB at most) of
    // body bytes not yet read; what has been read is counted in the peer's budget.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(ctx.h2_streams)
        .adaptive_window(true);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let mut draining = *shutdown.borrow_and_update();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.changed(), if !draining => {
                // Finish in-flight requests, accept no new ones (GOAWAY on HTTP/2).
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    match result {
        Ok(()) => debug!(%remote, %peer, "https peer disconnected"),
        Err(error) => debug!(%remote, %peer, %error, "https connection ended with an error"),
    }
}

/// One request: authenticate, route, read the body within limits, ask the node.
async fn handle<I: Inbound>(
    ctx: &ServerCtx<I>,
    peer: &ProviderDomain,
    req: http::Request<Incoming>,
) -> HttpResponse {
    // A peer over its refusal budget waits before its request (and its body) is read.
    ctx.pacer.pace(peer).await;
    match route(ctx, peer, req).await {
        Ok(resp) => resp,
        Err(rejection) => {
            debug!(%peer, reason = rejection.as_str(), "https request rejected");
            // Our own refusals; the node counts the core's. Backpressure is no fault.
            if !matches!(rejection, Rejection::OverBudget) {
                ctx.pacer.refused(peer);
            }
            reject(rejection)
        }
    }
}

async fn route<I: Inbound>(
    ctx: &ServerCtx<I>,
    peer: &ProviderDomain,
    req: http::Request<Incoming>,
) -> Result<HttpResponse, Rejection> {
    check_host(&req, &ctx.domain)?;
    check_from(req.headers(), peer)?;

    let path = req.uri().path();
    if path == DIRECTORY_PATH {
        if req.method() != Method::GET {
            return Err(Rejection::MethodNotAllowed);
        }
        return Ok(answer(200, ctx.directory.clone(), Some("application/json")));
    }
    let rest = path.strip_prefix("/v1/").ok_or(Rejection::NotFound)?;
    let (name, raw_target) = rest.split_once('/').ok_or(Rejection::NotFound)?;
    let endpoint: Endpoint = name.parse().map_err(|_| Rejection::NotFound)?;
    if req.method().as_str() != endpoint.method() {
        let mut resp = reject(Rejection::MethodNotAllowed);
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(endpoint.method()));
        return Ok(resp);
    }
    if raw_target.is_empty() {
        return Err(Rejection::NotFound);
    }
    let target = decode_target(raw_target).map_err(|e| match e {
        DecodeError::BadEscape | DecodeError::NotUtf8 => Rejection::BadEncoding,
    })?;
    let seq = header_u64(req.headers(), MIMI_SEQ).map_err(|()| Rejection::BadSeq)?;
    let lineage = header_lineage(req.headers())?;

    // Announced oversize or over-budget bodies are refused unread; the rest are capped and
    // counted while streaming (a client may lie or send no length at all).
    let limits = BodyLimits {
        max: ctx.max_body,
        deadline: ctx.body_deadline,
    };
    let (parts, body) = req.into_parts();
    let (body, held) = read_body(&parts.headers, body, peer, &ctx.budget, limits)
        .await
        .map_err(|refusal| match refusal {
            BodyRefusal::TooLarge => Rejection::TooLarge,
            BodyRefusal::OverBudget => Rejection::OverBudget,
            BodyRefusal::Timeout => Rejection::BodyTimeout,
            _ => Rejection::BodyAborted,
        })?;

    let request = Request {
        from: peer.clone(),
        transport: TransportKind::Https,
        endpoint,
        target,
        seq,
        lineage,
        body,
    };
    let response = ctx.inbound.request(request).await;
    // The body's bytes count until the node has answered.
    drop(held);
    debug!(%peer, %endpoint, status = response.status.http_code(), "https request answered");
    Ok(to_http(response))
}

/// `Host` (HTTP/1.1) or `:authority` (HTTP/2) must name us; the port is ignored (§4.1).
pub(crate) fn check_host<B>(
    req: &http::Request<B>,
    ours: &ProviderDomain,
) -> Result<(), Rejection> {
    let header = req
        .headers()
        .get(HOST)
        .map(|v| v.to_str().map_err(|_| Rejection::WrongHost));
    let authority = req.uri().authority().map(|a| a.host());
    if header.is_none() && authority.is_none() {
        return Err(Rejection::MissingHost);
    }
    for host in header.into_iter().chain(authority.map(Ok)) {
        let host = host?;
        if !strip_port(host).eq_ignore_ascii_case(ours.as_str()) {
            return Err(Rejection::WrongHost);
        }
    }
    Ok(())
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `From: mimi@<domain>` must be present and name the certificate's provider (§4.1).
pub(crate) fn check_from(headers: &HeaderMap, peer: &ProviderDomain) -> Result<(), Rejection> {
    let value = headers.get(FROM).ok_or(Rejection::MissingFrom)?;
    let value = value.to_str().map_err(|_| Rejection::MalformedFrom)?.trim();
    let (local, domain) = value.split_once('@').ok_or(Rejection::MalformedFrom)?;
    if local != "mimi" {
        return Err(Rejection::MalformedFrom);
    }
    if !domain.eq_ignore_ascii_case(peer.as_str()) {
        return Err(Rejection::FromMismatch);
    }
    Ok(())
}

/// Reads an optional decimal u64 header; `Err` if present but malformed.
pub(crate) fn header_u64(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ()> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or(()),
    }
}

/// The incarnation headers that go with `MIMI-Seq` (absent: the sender has none); a malformed
/// one is refused like a malformed `MIMI-Seq`.
pub(crate) fn header_lineage(headers: &HeaderMap) -> Result<Option<Lineage>, Rejection> {
    let batch = header_u64(headers, MIMI_SEQ_INCARNATION).map_err(|()| Rejection::BadSeq)?;
    let prev = header_u64(headers, MIMI_SEQ_PREV_INCARNATION).map_err(|()| Rejection::BadSeq)?;
    Ok(batch.map(|batch| Lineage {
        batch,
        prev: prev.unwrap_or(0),
    }))
}

fn to_http(response: Response) -> HttpResponse {
    let content_type = if response.body.is_empty() {
        None
    } else if response.status.is_success() {
        Some(CONTENT_TYPE_BODY)
    } else {
        Some(CONTENT_TYPE_REASON)
    };
    let mut resp = answer(response.status.http_code(), response.body, content_type);
    let headers = resp.headers_mut();
    if let Some(next) = response.next_seq {
        headers.insert(MIMI_NEXT_SEQ, HeaderValue::from(next));
    }
    if let Some(inc) = response.next_inc {
        headers.insert(MIMI_NEXT_SEQ_INCARNATION, HeaderValue::from(inc));
    }
    if let Some(after) = response.retry_after {
        // Whole seconds, rounded up so that a client never retries early.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn reject(rejection: Rejection) -> HttpResponse {
    let mut resp = answer(
        rejection.http_code(),
        Bytes::from_static(rejection.as_str().as_bytes()),
        Some(CONTENT_TYPE_REASON),
    );
    if rejection == Rejection::OverBudget {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(OVER_BUDGET_RETRY_SECS));
    }
    resp
}

fn answer(code: u16, body: Bytes, content_type: Option<&'static str>) -> HttpResponse {
    let mut resp = http::Response::new(Full::new(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = content_type {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(s: &str) -> ProviderDomain {
        ProviderDomain::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn req(host: Option<&str>, uri: &str) -> http::Request<()> {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        b.body(()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn host_port_ignored_and_case_folded() {
        let ours = domain("b.example");
        assert_eq!(
            check_host(&req(Some("b.example:8443"), "/x"), &ours),
            Ok(())
        );
        assert_eq!(check_host(&req(Some("B.Example"), "/x"), &ours), Ok(()));
        assert_eq!(
            check_host(&req(None, "https://b.example:1/x"), &ours),
            Ok(())
        );
        assert_eq!(
            check_host(&req(Some("c.example"), "/x"), &ours),
            Err(Rejection::WrongHost)
        );
        assert_eq!(
            check_host(&req(Some("b.example"), "https://c.example/x"), &ours),
            Err(Rejection::WrongHost)
        );
        assert_eq!(
            check_host(&req(None, "/x"), &ours),
            Err(Rejection::MissingHost)
        );
    }

    #[test]
    fn from_must_match_certificate() {
        let peer = domain("a.example");
        let mut h = HeaderMap::new();
        assert_eq!(check_from(&h, &peer), Err(Rejection::MissingFrom));
        h.insert(FROM, HeaderValue::from_static("mimi@a.example"));
        assert_eq!(check_from(&h, &peer), Ok(()));
        h.insert(FROM, HeaderValue::from_static("mimi@c.example"));
        assert_eq!(check_from(&h, &peer), Err(Rejection::FromMismatch));
        h.insert(FROM, HeaderValue::from_static("alice@a.example"));
        assert_eq!(check_from(&h, &peer), Err(Rejection::MalformedFrom));
        h.insert(FROM, HeaderValue::from_static("a.example"));
        assert_eq!(check_from(&h, &peer), Err(Rejection::MalformedFrom));
    }

    #[test]
    fn retry_after_rounds_up() {
        let mut r = Response::new(relay_core::transport::Status::Unavailable, Bytes::new());
        r.retry_after = Some(Duration::from_millis(1500));
        r.next_seq = Some(7);
        let h = to_http(r);
        assert_eq!(h.status(), 503);
        assert_eq!(
            h.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()),
            Some("2")
        );
        assert_eq!(
            h.headers().get(MIMI_NEXT_SEQ).and_then(|v| v.to_str().ok()),
            Some("7")
        );
    }
}
