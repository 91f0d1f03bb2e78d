//! The Matrix flooder: X-Matrix-signed `PUT /_matrix/federation/v1/send/{txnId}` as
//! relay-matrix's tests build them (its `sign_request`, its EDU encoding), over HTTP/2 so
//! that many transactions are in flight. The signing key is the flooding provider's own,
//! derived from its TLS key as every relay derives it, so the hub verifies it against the
//! keys the flooding follower's node serves.

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::BodyExt;
use relay_matrix::SigningKey;
use relay_matrix::client::sign_request;
use relay_matrix::wire::{EDU_REQUEST, MAX_TXN_BODY, SendResponse, fragments};
use ruma::OwnedServerName;
use serde_json::{Value, json};

use super::https::{ANSWER_WAIT, Body, H2, connect, full, never_ending};
use super::{
    DEPTH, FloodTarget, Lane, Mix, PARTIAL_OPEN, RECONNECT_PAUSE, Reply, Shot, Tally, run_lanes,
};

const SEND: &str = "/_matrix/federation/v1/send/";

/// Shots per transaction of the valid lane (a large one becomes several EDUs).
const PER_TXN: usize = 8;

struct Signer {
    origin: OwnedServerName,
    destination: OwnedServerName,
    key: SigningKey,
}

impl Signer {
    fn new(t: &FloodTarget) -> Option<Signer> {
        Some(Signer {
            origin: OwnedServerName::try_from(t.me().to_string()).ok()?,
            destination: OwnedServerName::try_from(t.hub.to_string()).ok()?,
            key: SigningKey::derive(&t.identity.key).ok()?,
        })
    }

    /// A signed PUT of `body` to `path`; the signature covers `signed` (the body unless the
    /// flooder means it to be wrong).
    fn put(&self, t: &FloodTarget, path: &str, body: Body, signed: &[u8]) -> hyper::Request<Body> {
        let mut b = hyper::Request::builder()
            .method("PUT")
            .uri(format!("https://{}{path}", t.hub))
            .header("host", t.hub.as_str())
            .header("content-type", "application/json");
        if let Ok(auth) = sign_request(&self.origin, &self.destination, &self.key, path, signed) {
            b = b.header("authorization", auth);
        }
        b.body(body)
            .unwrap_or_else(|_| hyper::Request::new(full(Bytes::new())))
    }
}

fn txn_body(origin: &str, edus: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "origin": origin,
        "origin_server_ts": relay_matrix::keys::now_ms(),
        "pdus": [],
        "edus": edus,
    }))
    .unwrap_or_default()
}

fn edus_of(id: &str, s: &Shot) -> Vec<Value> {
    fragments(
        id,
        s.endpoint,
        &s.target,
        s.seq,
        std::slice::from_ref(&s.body),
    )
    .into_iter()
    .map(|c| json!({"edu_type": EDU_REQUEST, "content": c}))
    .collect()
}

/// Sends one transaction carrying `ids` (request id, is a submission) and tallies an answer
/// per request: the one in the `/send` response, or the transaction's refusal for each.
async fn exchange(
    mut h2: H2,
    req: hyper::Request<Body>,
    ids: Vec<(String, Reply)>,
    tally: &Tally,
) -> bool {
    tally.sent(ids.len().max(1) as u64);
    let answer = async {
        let resp = h2.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(Ok((200, body))) if !ids.is_empty() => {
            let answers = serde_json::from_slice::<SendResponse>(&body)
                .map(|r| r.responses)
                .unwrap_or_default();
            for (id, reply) in ids {
                match answers.get(&id).and_then(|a| a.to_response()) {
                    Some(r) => tally.status(r.status.http_code(), reply, &r.body),
                    None => tally.outcome("200 without an answer"),
                }
            }
            true
        }
        Ok(Ok((status, _))) => {
            for _ in 0..ids.len().max(1) {
                tally.status(status, None, b"");
            }
            true
        }
        Ok(Err(e)) => tally.h2_failure(Some(&e), h2.is_closed()),
        Err(_) => tally.h2_failure(None, h2.is_closed()),
    }
}

/// Keeps `depth` transactions from `next` in flight, reconnecting as needed.
async fn pipeline<N>(t: &FloodTarget, tally: &Tally, depth: usize, mut next: N)
where
    N: FnMut() -> (hyper::Request<Body>, Vec<(String, Reply)>),
{
    loop {
        let Some(h2) = connect(t, tally).await else {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        let mut inflight = FuturesUnordered::new();
        let mut alive = true;
        while alive {
            while inflight.len() < depth && !h2.is_closed() {
                let (req, ids) = next();
                inflight.push(exchange(h2.clone(), req, ids, tally));
            }
            match inflight.next().await {
                Some(ok) => alive = ok && !h2.is_closed(),
                None => alive = false,
            }
        }
        while inflight.next().await.is_some() {}
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

pub(super) async fn flood(t: &FloodTarget, tally: &Tally) {
    let Some(signer) = Signer::new(t) else {
        tally.outcome("flooder could not start");
        return;
    };
    let signer = &signer;
    let me = t.me().to_string();
    let me = me.as_str();
    run_lanes(t, |lane, i| async move {
        let mut n = 0u64;
        let mut txn = move || {
            n += 1;
            format!("{SEND}flood{i}x{n}")
        };
        match lane {
            Lane::Valid => {
                let mut mix = Mix::new(0x4d41_5452 + i as u64);
                pipeline(t, tally, DEPTH / 4, || {
                    let mut edus = Vec::new();
                    let mut ids = Vec::new();
                    for k in 0..PER_TXN {
                        let s = mix.next(t);
                        let id = k.to_string();
                        edus.extend(edus_of(&id, &s));
                        ids.push((id, s.reply()));
                    }
                    let body = txn_body(me, edus);
                    let req = signer.put(t, &txn(), full(Bytes::from(body.clone())), &body);
                    (req, ids)
                })
                .await;
            }
            Lane::Oversize => {
                // Alternately: a body announced over the transaction cap (refused unread), and
                // a signed transaction whose one EDU is over Matrix's 64 KiB event limit.
                let big = Shot {
                    endpoint: mimi_wire::endpoint::Endpoint::SubmitMessage,
                    target: t.member_room.clone(),
                    seq: None,
                    body: Bytes::from(vec![0x42u8; 50_000]),
                };
                let content = json!({
                    "id": "0", "endpoint": "submitMessage", "target": big.target,
                    "part": 0, "parts": 1,
                    "body": relay_matrix::wire::encode_b64(&big.body),
                });
                let event = txn_body(me, vec![json!({"edu_type": EDU_REQUEST, "content": content})]);
                let mut k = 0u64;
                pipeline(t, tally, 4, || {
                    k += 1;
                    if k.is_multiple_of(2) {
                        let req = signer.put(t, &txn(), full(Bytes::from(event.clone())), &event);
                        return (req, vec![("0".to_owned(), None)]);
                    }
                    let stub = txn_body(me, Vec::new());
                    let mut req = signer.put(t, &txn(), never_ending(Bytes::from_static(b"{")), &stub);
                    if let Ok(v) = hyper::header::HeaderValue::from_str(&(MAX_TXN_BODY + 1).to_string()) {
                        req.headers_mut().insert(hyper::header::CONTENT_LENGTH, v);
                    }
                    (req, Vec::new())
                })
                .await;
            }
            Lane::Partial => {
                // 64 KiB announced, 1 KiB sent, the rest never.
                let stub = txn_body(me, Vec::new());
                pipeline(t, tally, PARTIAL_OPEN, || {
                    let mut req =
                        signer.put(t, &txn(), never_ending(Bytes::from(vec![b' '; 1024])), &stub);
                    req.headers_mut().insert(
                        hyper::header::CONTENT_LENGTH,
                        hyper::header::HeaderValue::from_static("65536"),
                    );
                    (req, Vec::new())
                })
                .await;
            }
            Lane::Malformed => {
                let mut k = 0u64;
                let good = txn_body(me, Vec::new());
                pipeline(t, tally, DEPTH, || {
                    k += 1;
                    let path = txn();
                    let req = match k % 7 {
                        // Not JSON (signed over something else: JSON is parsed first).
                        0 => signer.put(t, &path, full(Bytes::from_static(b"{\"origin\": nope")), &good),
                        // JSON, but the signature is over another body.
                        1 => {
                            let other = txn_body(me, vec![json!({"edu_type": "m.typing", "content": {}})]);
                            signer.put(t, &path, full(Bytes::from(other)), &good)
                        }
                        // No Authorization header at all.
                        2 => {
                            let mut r = signer.put(t, &path, full(Bytes::from(good.clone())), &good);
                            r.headers_mut().remove("authorization");
                            r
                        }
                        // A MIMI EDU naming an endpoint that does not exist.
                        3 => {
                            let c = json!({"id": "0", "endpoint": "frobnicate", "target": t.victim_room,
                                "part": 0, "parts": 1, "body": "eA"});
                            let b = txn_body(me, vec![json!({"edu_type": EDU_REQUEST, "content": c})]);
                            signer.put(t, &path, full(Bytes::from(b.clone())), &b)
                        }
                        // The transaction claims another origin than its signer.
                        4 => {
                            let b = txn_body("b.example", Vec::new());
                            signer.put(t, &path, full(Bytes::from(b.clone())), &b)
                        }
                        // JSON nested past the depth bound.
                        5 => {
                            let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
                            let b = format!("{{\"origin\":\"{me}\",\"origin_server_ts\":1,\"edus\":{deep}}}");
                            signer.put(t, &path, full(Bytes::from(b)), &good)
                        }
                        // Wrong method, and a path that is not served.
                        _ => {
                            let mut r = signer.put(t, "/_matrix/federation/v1/frobnicate", full(Bytes::from(good.clone())), &good);
                            if k.is_multiple_of(2) {
                                *r.method_mut() = hyper::Method::POST;
                            }
                            r
                        }
                    };
                    (req, Vec::new())
                })
                .await;
            }
        }
    })
    .await;
}
