//! The receiving side: accept peers, authenticate them by certificate, answer their requests
//! in order per stream.

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{Either, Ready, ready};
use futures::stream::{FuturesOrdered, StreamExt};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use relay_core::transport::{Inbound, Request, Response, Status, TransportKind};
use relay_tls::PeerTrust;
use rustls::pki_types::CertificateDer;

use crate::framing::{
    Body, Frame, FrameError, KIND_PONG, KIND_RESPONSE, encode_ping, encode_response,
};
use crate::stream::{FrameReader, ReadFail};
use crate::{MAX_OUTSTANDING_PER_STREAM, codes};

pub(crate) struct ServerCtx<I> {
    pub(crate) inbound: I,
    pub(crate) trust: PeerTrust,
    pub(crate) max_body: usize,
}

pub(crate) async fn accept_loop<I: Inbound>(endpoint: quinn::Endpoint, ctx: Arc<ServerCtx<I>>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, ctx.clone()));
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

async fn serve_connection<I: Inbound>(incoming: Incoming, ctx: Arc<ServerCtx<I>>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            tracing::warn!(%remote, %error, "inbound quic handshake failed");
            return;
        }
    };
    let from = match authenticate(&conn, &ctx.trust) {
        Ok(domain) => domain,
        Err(error) => {
            // The TLS verifier already refused unpinned certificates; this is the ambiguous
            // case (one certificate pinned for two providers).
            tracing::warn!(%remote, %error, "refusing inbound quic connection");
            conn.close(VarInt::from_u32(codes::UNTRUSTED_PEER), b"untrusted peer");
            return;
        }
    };
    tracing::info!(peer = %from, %remote, "inbound quic connection");
    let reason = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(send, recv, from.clone(), ctx.clone()));
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
    let (id, endpoint, target, seq, body) = match frame {
        Frame::Request {
            id,
            endpoint,
            target,
            seq,
            body,
        } => (id, endpoint, target, seq, body),
        Frame::Ping(nonce) => return Ok(Either::Right(ready(Reply::Pong(nonce)))),
        // A sender never receives requests on its own streams: the peer is confused.
        Frame::Response { .. } => return Err(FrameError::Unexpected(KIND_RESPONSE)),
        Frame::Pong(_) => return Err(FrameError::Unexpected(KIND_PONG)),
    };
    let Body::Bytes(body) = body else {
        return Ok(Either::Right(immediate(
            id,
            Status::TooLarge,
            "body over the limit",
        )));
    };
    let Ok(endpoint) = Endpoint::from_code(endpoint) else {
        return Ok(Either::Right(immediate(
            id,
            Status::NotFound,
            "unknown endpoint",
        )));
    };
    let Ok(target) = std::str::from_utf8(&target) else {
        return Ok(Either::Right(immediate(
            id,
            Status::BadRequest,
            "target is not utf-8",
        )));
    };
    let request = Request {
        from: from.clone(),
        transport: TransportKind::Quic,
        endpoint,
        target: target.to_owned(),
        seq,
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
                response.next_seq,
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

async fn serve_stream<I: Inbound>(
    mut send: SendStream,
    recv: RecvStream,
    from: ProviderDomain,
    ctx: Arc<ServerCtx<I>>,
) {
    let stream = send.id();
    let mut reader = FrameReader::new(recv, ctx.max_body);
    let mut pending = FuturesOrdered::new();
    let mut heads = BytesMut::new();
    let mut out: Vec<Bytes> = Vec::new();
    let mut eof = false;
    let fail = 'serve: loop {
        if eof && pending.is_empty() {
            break None;
        }
        tokio::select! {
            biased;
            Some(reply) = pending.next(), if !pending.is_empty() => {
                // Coalesce every answer that is ready into one write.
                encode_reply(reply, &mut heads, &mut out);
                while let Some(Some(reply)) = pending.next().now_or_never() {
                    encode_reply(reply, &mut heads, &mut out);
                }
                if !heads.is_empty() {
                    out.push(heads.split().freeze());
                }
                if let Err(error) = send.write_all_chunks(&mut out).await {
                    tracing::debug!(peer = %from, ?stream, %error, "writing responses failed");
                    return;
                }
                out.clear();
            }
            frame = reader.next(), if !eof && pending.len() < MAX_OUTSTANDING_PER_STREAM => {
                match frame {
                    Ok(Some(frame)) => match handle(&ctx, &from, frame) {
                        Ok(answer) => pending.push_back(answer),
                        Err(error) => break Some(error),
                    },
                    Ok(None) => eof = true,
                    Err(ReadFail::Frame(error)) => break Some(error),
                    Err(ReadFail::Read(error)) => {
                        tracing::debug!(peer = %from, ?stream, %error, "request stream ended");
                        return;
                    }
                }
                // Take every request that is already buffered before answering, so that
                // answers are written in batches.
                while !eof && pending.len() < MAX_OUTSTANDING_PER_STREAM {
                    match reader.try_next() {
                        Ok(Some(frame)) => match handle(&ctx, &from, frame) {
                            Ok(answer) => pending.push_back(answer),
                            Err(error) => break 'serve Some(error),
                        },
                        Ok(None) => break,
                        Err(error) => break 'serve Some(error),
                    }
                }
            }
        }
    };
    match fail {
        None => {
            let _ = send.finish();
        }
        Some(error) => {
            tracing::warn!(peer = %from, ?stream, %error, "malformed frame, resetting the stream");
            reader.stop(codes::FRAME_ERROR);
            let _ = send.reset(VarInt::from_u32(codes::FRAME_ERROR));
        }
    }
}
