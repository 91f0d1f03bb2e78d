//! The receiving side: accept peers, authenticate them by certificate, answer their requests
//! in order per stream.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{Either, Ready, ready};
use futures::stream::{FuturesOrdered, StreamExt};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use relay_adapter::Inbound;
use relay_adapter::{AdapterContext, Budget, ByteBudget, Gate, HandshakePermit, LogLimiter};
use relay_core::transport::{Lineage, Request, Response, Status, TransportKind};
use relay_tls::PeerTrust;
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;

use crate::framing::{
    Body, Frame, FrameError, KIND_PONG, KIND_RESPONSE, NextHead, encode_ping, encode_response,
};
use crate::stream::{FrameReader, Ledger, ReadFail};
use crate::{MAX_OUTSTANDING_PER_STREAM, codes};

/// At most one WARN line per this interval for failed handshakes; the rest are counted.
const FAILED_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) struct ServerCtx<I> {
    inbound: I,
    trust: PeerTrust,
    max_body: usize,
    adapter: AdapterContext,
    gate: Arc<Gate>,
    budget: Arc<ByteBudget>,
    failed_log: LogLimiter,
    /// Wakes the streams of a peer waiting for its byte budget; shared by its connections.
    wakers: Mutex<HashMap<ProviderDomain, Weak<Notify>>>,
}

impl<I> ServerCtx<I> {
    pub(crate) fn new(
        inbound: I,
        trust: PeerTrust,
        max_body: usize,
        adapter: AdapterContext,
        gate: Arc<Gate>,
        budget: Arc<ByteBudget>,
    ) -> Self {
        ServerCtx {
            inbound,
            trust,
            max_body,
            adapter,
            gate,
            budget,
            failed_log: LogLimiter::new(FAILED_LOG_INTERVAL),
            wakers: Mutex::new(HashMap::new()),
        }
    }

    fn waker(&self, peer: &ProviderDomain) -> Arc<Notify> {
        let mut map = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(wake) = map.get(peer).and_then(Weak::upgrade) {
            return wake;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let wake = Arc::new(Notify::new());
        map.insert(peer.clone(), Arc::downgrade(&wake));
        wake
    }
}

pub(crate) async fn accept_loop<I: Inbound>(endpoint: quinn::Endpoint, ctx: Arc<ServerCtx<I>>) {
    let retry_from = ctx.gate.limits().max_handshakes / 2;
    while let Some(mut incoming) = endpoint.accept().await {
        // A source under penalty is refused before anything else: one small packet, no TLS.
        // (Only proven addresses are struck, so a spoofer cannot get a real peer refused.)
        let source = incoming.remote_address().ip();
        if ctx.gate.under_penalty(source) {
            tracing::debug!(remote = %incoming.remote_address(), "quic source under penalty, refusing");
            incoming.refuse();
            continue;
        }
        // Under handshake load an address must first prove it receives what we send (RFC 9000
        // section 8.1.2): a spoofed flood then costs us one small packet each, no TLS work.
        if !incoming.remote_address_validated() && ctx.gate.handshakes_in_progress() >= retry_from {
            match incoming.retry() {
                Ok(()) => {
                    ctx.adapter.stats.retry_sent();
                    continue;
                }
                Err(e) => incoming = e.into_incoming(),
            }
        }
        let Some(permit) = ctx.gate.handshake() else {
            tracing::debug!(remote = %incoming.remote_address(), "too many quic handshakes, refusing");
            incoming.refuse();
            continue;
        };
        tokio::spawn(serve_connection(incoming, permit, ctx.clone()));
    }
}

fn authenticate(
    conn: &Connection,
    trust: &PeerTrust,
) -> Result<ProviderDomain, relay_tls::TlsError> {
    let chain = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(relay_tls::TlsError::NoPeerCertificate)?;
    relay_tls::peer_domain(trust, &chain)
}

async fn serve_connection<I: Inbound>(
    incoming: Incoming,
    handshake: HandshakePermit,
    ctx: Arc<ServerCtx<I>>,
) {
    let remote = incoming.remote_address();
    let failed = |error: &dyn std::fmt::Display| {
        relay_adapter::failed_handshake(&ctx.adapter.stats, &ctx.failed_log, "quic", &remote, error)
    };
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            // A timeout may be a spoofed Initial; any other failure came from an address that
            // received our first flight.
            if !matches!(error, quinn::ConnectionError::TimedOut) {
                ctx.gate.handshake_failed(remote.ip());
            }
            return failed(&error);
        }
    };
    let from = match authenticate(&conn, &ctx.trust) {
        Ok(domain) => domain,
        Err(error) => {
            // The TLS verifier already refused unpinned certificates; this is the ambiguous
            // case (one certificate pinned for two providers).
            ctx.gate.handshake_failed(remote.ip());
            failed(&error);
            conn.close(VarInt::from_u32(codes::UNTRUSTED_PEER), b"untrusted peer");
            return;
        }
    };
    drop(handshake);
    let Ok(_permit) = ctx.gate.peer(&from) else {
        // Its retries are refused before any TLS work for a while.
        ctx.gate.penalize(remote.ip());
        tracing::debug!(peer = %from, %remote, "refusing a quic connection over the peer's cap");
        conn.close(
            VarInt::from_u32(codes::TOO_MANY_CONNECTIONS),
            b"too many connections from this peer",
        );
        return;
    };
    tracing::info!(peer = %from, %remote, "inbound quic connection");
    let wake = ctx.waker(&from);
    let reason = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let ledger = Ledger::new(
                    ctx.budget.clone(),
                    from.clone(),
                    wake.clone(),
                    ctx.adapter.stats.clone(),
                );
                tokio::spawn(serve_stream(send, recv, from.clone(), ledger, ctx.clone()));
            }
            Err(reason) => break reason,
        }
    };
    tracing::info!(peer = %from, %remote, %reason, "inbound quic connection closed");
}

enum Reply {
    Response(u64, Response),
    Pong(u64),
}

fn immediate(id: u64, status: Status, reason: &'static str) -> Ready<Reply> {
    ready(Reply::Response(id, Response::error(status, reason)))
}

/// Turns one received frame into the future of its answer.
fn handle<'a, I: Inbound>(
    ctx: &'a ServerCtx<I>,
    from: &ProviderDomain,
    frame: Frame,
) -> Result<Either<impl Future<Output = Reply> + Send + 'a, Ready<Reply>>, FrameError> {
    let (id, endpoint, target, seq, lineage, body) = match frame {
        Frame::Request {
            id,
            endpoint,
            target,
            seq,
            lineage,
            body,
        } => (id, endpoint, target, seq, lineage, body),
        Frame::Ping(nonce) => return Ok(Either::Right(ready(Reply::Pong(nonce)))),
        // A sender never receives requests on its own streams: the peer is confused.
        Frame::Response { .. } => return Err(FrameError::Unexpected(KIND_RESPONSE)),
        Frame::Pong(_) => return Err(FrameError::Unexpected(KIND_PONG)),
    };
    // Our own refusals count against the peer's refusal budget; the node counts the core's.
    let refuse = |status, why| {
        ctx.adapter.pacer.refused(from);
        Ok(Either::Right(immediate(id, status, why)))
    };
    let Body::Bytes(body) = body else {
        ctx.adapter.stats.refused(Budget::BodySize);
        ctx.adapter.pacer.refused(from);
        return Ok(Either::Right(immediate(
            id,
            Status::TooLarge,
            "body over the limit",
        )));
    };
    let Ok(endpoint) = Endpoint::from_code(endpoint) else {
        return refuse(Status::NotFound, "unknown endpoint");
    };
    let Ok(target) = std::str::from_utf8(&target) else {
        return refuse(Status::BadRequest, "target is not utf-8");
    };
    let request = Request {
        from: from.clone(),
        transport: TransportKind::Quic,
        endpoint,
        target: target.to_owned(),
        seq,
        lineage: lineage.map(|(batch, prev)| Lineage { batch, prev }),
        body,
    };
    Ok(Either::Left(async move {
        Reply::Response(id, ctx.inbound.request(request).await)
    }))
}

/// Appends one answer to the write batch: heads are packed into `heads`, bodies are queued as
/// their own segments so they are not copied.
fn encode_reply(reply: Reply, heads: &mut BytesMut, out: &mut Vec<Bytes>) {
    match reply {
        Reply::Pong(nonce) => encode_ping(heads, nonce, true),
        Reply::Response(id, response) => {
            let retry = response
                .retry_after
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let status = response.status.http_code();
            match encode_response(
                heads,
                id,
                status,
                NextHead {
                    next_seq: response.next_seq,
                    next_inc: response.next_inc,
                },
                retry,
                response.body.len(),
            ) {
                Ok(()) if response.body.is_empty() => {}
                Ok(()) => {
                    out.push(heads.split().freeze());
                    out.push(response.body);
                }
                Err(error) => {
                    // Only a body over 4 GiB gets here: our own bug.
                    tracing::error!(%error, "cannot frame a response");
                    let _ = encode_response(heads, id, Status::Internal.http_code(), None, None, 0);
                }
            }
        }
    }
}

/// An answer with the bytes its request holds until it is ready.
fn holding<F: Future<Output = Reply>>(
    answer: F,
    held: usize,
) -> impl Future<Output = (Reply, usize)> {
    answer.map(move |reply| (reply, held))
}

async fn serve_stream<I: Inbound>(
    mut send: SendStream,
    recv: RecvStream,
    from: ProviderDomain,
    ledger: Ledger,
    ctx: Arc<ServerCtx<I>>,
) {
    let stream = send.id();
    let limits = &ctx.adapter.limits;
    let mut reader = FrameReader::limited(recv, ctx.max_body, ledger, limits.frame_deadline);
    let mut pending = FuturesOrdered::new();
    let mut heads = BytesMut::new();
    let mut out: Vec<Bytes> = Vec::new();
    let mut eof = false;
    let pacer = &ctx.adapter.pacer;
    let fail = 'serve: loop {
        if eof && pending.is_empty() {
            break None;
        }
        // A peer over its refusal budget is not read until it has paid: flow control holds
        // its bytes at its end.
        let pause = pacer.debt(&from);
        tokio::select! {
            biased;
            Some((reply, held)) = pending.next(), if !pending.is_empty() => {
                // Coalesce every answer that is ready into one write.
                encode_reply(reply, &mut heads, &mut out);
                let mut answered = held;
                while let Some(Some((reply, held))) = pending.next().now_or_never() {
                    encode_reply(reply, &mut heads, &mut out);
                    answered += held;
                }
                // The requests are answered: their bytes leave the peer's budget.
                reader.release(answered);
                if !heads.is_empty() {
                    out.push(heads.split().freeze());
                }
                if let Err(error) = send.write_all_chunks(&mut out).await {
                    tracing::debug!(peer = %from, ?stream, %error, "writing responses failed");
                    return;
                }
                out.clear();
            }
            () = tokio::time::sleep(pause), if !pause.is_zero() => {}
            frame = reader.next_frame(), if !eof && pause.is_zero() && pending.len() < MAX_OUTSTANDING_PER_STREAM => {
                match frame {
                    Ok(Some((frame, held))) => match handle(&ctx, &from, frame) {
                        Ok(answer) => pending.push_back(holding(answer, held)),
                        Err(error) => break Some(ReadFail::Frame(error)),
                    },
                    Ok(None) => eof = true,
                    Err(ReadFail::Read(error)) => {
                        tracing::debug!(peer = %from, ?stream, %error, "request stream ended");
                        return;
                    }
                    Err(fail) => break Some(fail),
                }
                // Take every request that is already buffered before answering, so that
                // answers are written in batches.
                while !eof
                    && pending.len() < MAX_OUTSTANDING_PER_STREAM
                    && pacer.debt(&from).is_zero()
                {
                    match reader.try_next_frame() {
                        Ok(Some((frame, held))) => match handle(&ctx, &from, frame) {
                            Ok(answer) => pending.push_back(holding(answer, held)),
                            Err(error) => break 'serve Some(ReadFail::Frame(error)),
                        },
                        Ok(None) => break,
                        Err(error) => break 'serve Some(ReadFail::Frame(error)),
                    }
                }
            }
        }
    };
    if fail.is_some() {
        ctx.adapter.pacer.refused(&from);
    }
    let code = match fail {
        None => {
            let _ = send.finish();
            return;
        }
        Some(ReadFail::Deadline) => {
            ctx.adapter.stats.refused(Budget::FrameDeadline);
            tracing::debug!(peer = %from, ?stream, "frame past its deadline, resetting the stream");
            codes::FRAME_DEADLINE
        }
        Some(error) => {
            tracing::warn!(peer = %from, ?stream, %error, "malformed frame, resetting the stream");
            codes::FRAME_ERROR
        }
    };
    reader.stop(code);
    let _ = send.reset(VarInt::from_u32(code));
}
