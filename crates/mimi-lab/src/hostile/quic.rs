//! The QUIC flooder: quinn with relay-quic's stream framing (`relay_quic::framing`), as
//! relay-quic's hostile tests speak it: request frames pipelined on bidirectional streams,
//! answers read back in order.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use relay_quic::codes;
use relay_quic::framing::{Body, ChunkQueue, Decoder, Frame, encode_request};

use super::{
    DEPTH, FloodTarget, Lane, Mix, PARTIAL_OPEN, RECONNECT_PAUSE, Reply, Tally, run_lanes,
};
use crate::netlab;

/// Streams a valid lane keeps busy on its connection.
const STREAMS: usize = 4;

fn endpoint(t: &FloodTarget) -> anyhow::Result<quinn::Endpoint> {
    let socket = match &t.netns {
        None => std::net::UdpSocket::bind("127.0.0.1:0")?,
        Some(path) => netlab::in_namespace(path, || std::net::UdpSocket::bind("0.0.0.0:0"))?,
    };
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

fn client_config(t: &FloodTarget) -> anyhow::Result<quinn::ClientConfig> {
    let tls = relay_tls::client_config(&t.identity, &t.trust, vec![relay_quic::ALPN.to_vec()])?;
    Ok(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    )))
}

/// How a stream or connection ended, as a tally key.
fn ended(e: &ReadError) -> String {
    match e {
        ReadError::Reset(code) => format!("stream reset ({})", code_name(*code)),
        ReadError::ConnectionLost(c) => lost(c),
        other => format!("stream ended ({other})"),
    }
}

fn write_failed(e: &WriteError) -> String {
    match e {
        WriteError::Stopped(code) => format!("stream stopped ({})", code_name(*code)),
        WriteError::ConnectionLost(c) => lost(c),
        other => format!("stream write failed ({other})"),
    }
}

fn lost(c: &ConnectionError) -> String {
    match c {
        ConnectionError::ApplicationClosed(a) => {
            format!("connection closed ({})", code_name(a.error_code))
        }
        _ => "connection lost".to_owned(),
    }
}

fn code_name(code: VarInt) -> &'static str {
    match u32::try_from(code.into_inner()).unwrap_or(u32::MAX) {
        codes::FRAME_ERROR => "frame error",
        codes::FRAME_DEADLINE => "frame deadline",
        codes::TOO_MANY_CONNECTIONS => "connection cap",
        codes::UNTRUSTED_PEER => "untrusted peer",
        codes::SHUTDOWN => "shutdown",
        _ => "other code",
    }
}

async fn connect(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    t: &FloodTarget,
    tally: &Tally,
) -> Option<Connection> {
    let conn = match ep.connect_with(cfg.clone(), t.hub_addr, t.hub.as_str()) {
        Ok(c) => c,
        Err(_) => {
            tally.outcome("connect failed");
            return None;
        }
    };
    match tokio::time::timeout(super::CONNECT_TIMEOUT, conn).await {
        Ok(Ok(c)) => {
            tally.connected();
            Some(c)
        }
        Ok(Err(e)) => {
            tally.outcome(&lost(&e));
            None
        }
        Err(_) => {
            tally.outcome("connect timed out");
            None
        }
    }
}

/// Reads the next frame of `recv`.
async fn next_frame(
    recv: &mut RecvStream,
    q: &mut ChunkQueue,
    dec: &mut Decoder,
) -> Result<Frame, String> {
    loop {
        match dec.decode(q) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(format!("bad answer ({e})")),
        }
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => q.push(c.bytes),
            Ok(None) => return Err("stream finished".to_owned()),
            Err(e) => return Err(ended(&e)),
        }
    }
}

fn tally_frame(tally: &Tally, f: Frame, reply: Reply) {
    match f {
        Frame::Response {
            status,
            body: Body::Bytes(b),
            ..
        } => tally.status(status, reply, &b),
        Frame::Response { status, .. } => tally.status(status, None, b""),
        _ => tally.outcome("unexpected frame"),
    }
}

fn head(id: u64, endpoint: u8, target: &str, seq: Option<u64>, body_len: usize) -> BytesMut {
    let mut wire = BytesMut::new();
    // A target of a room URI is far under the framing's 64 KiB cap.
    let _ = encode_request(&mut wire, id, endpoint, target, seq, body_len);
    wire
}

/// Writes `frames`, then reads one answer for each; `Err` when the stream is gone.
async fn batch(
    send: &mut SendStream,
    recv: &mut RecvStream,
    q: &mut ChunkQueue,
    dec: &mut Decoder,
    frames: Vec<(BytesMut, Bytes, Reply)>,
    tally: &Tally,
) -> Result<(), ()> {
    let mut submits = VecDeque::new();
    for (h, body, reply) in frames {
        tally.sent(1);
        let written = match send.write_all(&h).await {
            Ok(()) => send.write_all(&body).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tally.outcome(&write_failed(&e));
            return Err(());
        }
        submits.push_back(reply);
    }
    while let Some(reply) = submits.pop_front() {
        match next_frame(recv, q, dec).await {
            Ok(f) => tally_frame(tally, f, reply),
            Err(why) => {
                tally.outcome(&why);
                return Err(());
            }
        }
    }
    Ok(())
}

pub(super) async fn flood(t: &FloodTarget, tally: &Tally) {
    let (ep, cfg) = match (endpoint(t), client_config(t)) {
        (Ok(ep), Ok(cfg)) => (ep, cfg),
        _ => {
            tally.outcome("flooder could not start");
            return;
        }
    };
    let (ep, cfg) = (&ep, &cfg);
    run_lanes(t, |lane, i| async move {
        loop {
            let Some(conn) = connect(ep, cfg, t, tally).await else {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            };
            match lane {
                Lane::Valid => {
                    let streams = (0..STREAMS)
                        .map(|s| valid_stream(&conn, t, tally, (i * STREAMS + s) as u64));
                    futures::future::join_all(streams).await;
                }
                Lane::Oversize => oversize(&conn, t, tally).await,
                Lane::Partial => partial(&conn, t, tally).await,
                Lane::Malformed => malformed(&conn, t, tally).await,
            }
            conn.close(VarInt::from_u32(0), b"flood lane restarts");
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    })
    .await;
}

/// Batches of DEPTH requests from the mix on one stream until the connection goes.
async fn valid_stream(conn: &Connection, t: &FloodTarget, tally: &Tally, seed: u64) {
    let mut mix = Mix::new(0x5155_4943 + seed);
    let mut id = 0u64;
    while conn.close_reason().is_none() {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return;
        };
        let (mut q, mut dec) = (ChunkQueue::new(), Decoder::new(1 << 20));
        loop {
            let frames = (0..DEPTH)
                .map(|_| {
                    id += 1;
                    let s = mix.next(t);
                    let h = head(id, s.endpoint.code(), &s.target, s.seq, s.body.len());
                    let reply = s.reply();
                    (h, s.body, reply)
                })
                .collect();
            if batch(&mut send, &mut recv, &mut q, &mut dec, frames, tally)
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// Bodies one byte over max_body: answered 413, the bytes skipped, the stream kept.
async fn oversize(conn: &Connection, t: &FloodTarget, tally: &Tally) {
    let big = Bytes::from(vec![0x42u8; t.limits.max_body + 1]);
    let code = mimi_wire::endpoint::Endpoint::SubmitMessage.code();
    let mut id = 0u64;
    while conn.close_reason().is_none() {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return;
        };
        let (mut q, mut dec) = (ChunkQueue::new(), Decoder::new(1 << 20));
        loop {
            let frames = (0..4)
                .map(|_| {
                    id += 1;
                    (
                        head(id, code, &t.member_room, None, big.len()),
                        big.clone(),
                        None,
                    )
                })
                .collect();
            if batch(&mut send, &mut recv, &mut q, &mut dec, frames, tally)
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// Streams with a started frame that never completes, until the hub resets them.
async fn partial(conn: &Connection, t: &FloodTarget, tally: &Tally) {
    let code = mimi_wire::endpoint::Endpoint::SubmitMessage.code();
    while conn.close_reason().is_none() {
        let opened = (0..PARTIAL_OPEN).map(|k| async move {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return;
            };
            let mut h = head(k as u64, code, &t.victim_room, None, 64 << 10);
            h.extend_from_slice(&[0u8; 1024]);
            tally.sent(1);
            if let Err(e) = send.write_all(&h).await {
                tally.outcome(&write_failed(&e));
                return;
            }
            let (mut q, mut dec) = (ChunkQueue::new(), Decoder::new(1 << 20));
            match tokio::time::timeout(
                super::https::ANSWER_WAIT,
                next_frame(&mut recv, &mut q, &mut dec),
            )
            .await
            {
                Ok(Ok(f)) => tally_frame(tally, f, None),
                Ok(Err(why)) => tally.outcome(&why),
                Err(_) => tally.outcome("no answer"),
            }
            drop(send);
        });
        futures::future::join_all(opened).await;
    }
}

/// Frames the receiver's parser must refuse: an unknown endpoint (404), a target that is not
/// UTF-8 (400), an unknown frame kind and a response frame sent as a request (the stream is
/// reset).
async fn malformed(conn: &Connection, t: &FloodTarget, tally: &Tally) {
    let mut k = 0u64;
    while conn.close_reason().is_none() {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return;
        };
        let (mut q, mut dec) = (ChunkQueue::new(), Decoder::new(1 << 20));
        // Refusals that keep the stream: a batch of them.
        let frames = (0..DEPTH as u64)
            .map(|j| {
                k += 1;
                let body = Bytes::from_static(b"x");
                match j % 2 {
                    0 => (head(k, 250, &t.victim_room, None, 1), body, None),
                    _ => {
                        let submit = mimi_wire::endpoint::Endpoint::SubmitMessage.code();
                        let mut h = head(k, submit, "\u{0}\u{0}\u{0}\u{0}", None, 1);
                        // The 4-byte target becomes bytes that are not UTF-8.
                        let at = 4 + 1 + 8 + 1 + 2;
                        h[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
                        (h, body, None)
                    }
                }
            })
            .collect();
        if batch(&mut send, &mut recv, &mut q, &mut dec, frames, tally)
            .await
            .is_err()
        {
            continue;
        }
        // Then what resets it: an unknown frame kind, or a response where requests go.
        let mut bad = BytesMut::new();
        if k.is_multiple_of(2) {
            bad.extend_from_slice(&[0, 0, 0, 9, 9, 0, 0, 0, 0, 0, 0, 0, 1]);
        } else {
            let _ = relay_quic::framing::encode_response(&mut bad, 1, 200, None, None, 0);
        }
        tally.sent(1);
        if let Err(e) = send.write_all(&bad).await {
            tally.outcome(&write_failed(&e));
            continue;
        }
        match tokio::time::timeout(
            super::https::ANSWER_WAIT,
            next_frame(&mut recv, &mut q, &mut dec),
        )
        .await
        {
            Ok(Ok(f)) => tally_frame(tally, f, None),
            Ok(Err(why)) => tally.outcome(&why),
            Err(_) => tally.outcome("no answer"),
        }
    }
}
