//! The loopback HTTP API: the local clients' submit and inbox, room creation, `/metrics` and
//! `/healthz`. Plain HTTP on loopback only (the config refuses anything else).
//!
//! Inbox records travel in a small binary form so a reader can keep up with the relay:
//! per record `offset u64, accepted_ms u64, from u16-len string, room u16-len string,
//! fanout u32-len bytes`, all big-endian.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use bytes::{BufMut, BytesMut};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::store::InboxRecord;
use relay_core::{Response, TransportKind};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};

use crate::client::MAX_BATCH;
use crate::core_loop::Event;
use crate::metrics;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub tx: Sender<Event>,
    /// The offset below which inbox records are durable: readers wait for it to move.
    pub inbox_durable: watch::Receiver<u64>,
    pub max_body: usize,
    /// Each transport adapter's refusal counters, for /metrics.
    pub adapter_stats: Arc<BTreeMap<TransportKind, Arc<relay_adapter::AdapterStats>>>,
    /// The per-peer fair queue in front of the core, for its refusal counts.
    pub ingress: Arc<crate::ingress::Ingress>,
    /// The live TLS identity and trust, for the certificates' days left.
    pub tls: TlsHandles,
    /// Refusals counted against peers, and requests that waited for them.
    pub pacer: Arc<relay_adapter::Pacer>,
}

#[derive(Clone)]
pub(crate) struct TlsHandles {
    pub identity: relay_tls::TlsIdentity,
    pub trust: relay_tls::PeerTrust,
}

pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_page))
        .route("/v1/client/submit/{room}", post(submit))
        .route("/v1/client/submitBatch", post(submit_batch))
        .route("/v1/client/inbox", get(inbox))
        .route("/v1/client/rooms", post(create_room))
        .route("/v1/client/follow/{room}", post(follow_room))
        .route("/v1/client/update/{room}", post(update))
        .route("/v1/client/keyMaterial", post(key_material))
        .route("/v1/client/keyPackages", post(publish_key_packages))
        .route("/v1/client/mlsRooms/{room}", post(create_mls_room))
        .route("/v1/client/directory", post(directory_entry))
        .route(
            "/v1/client/identifierQuery/{domain}",
            post(identifier_query),
        )
        .route("/v1/client/requestConsent", post(request_consent))
        .route("/v1/client/updateConsent", post(update_consent))
        .route("/v1/client/reportAbuse/{room}", post(report_abuse))
        .route("/v1/client/groupInfo/{room}", post(group_info))
        .route("/v1/client/hubKey", get(hub_key))
        .layer(axum::extract::DefaultBodyLimit::max(state.max_body))
        .with_state(state)
}

async fn ask<T>(tx: &Sender<Event>, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).ok()?;
    rx.await.ok()
}

fn unavailable() -> HttpResponse {
    (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n").into_response()
}

/// A write refused while the store is out of space: 503, as the core answers peers.
fn storage_full() -> HttpResponse {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from(5))],
        format!("{}\n", crate::core_loop::STORAGE_FULL),
    )
        .into_response()
}

pub(crate) fn to_http(r: Response) -> HttpResponse {
    let status =
        StatusCode::from_u16(r.status.http_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    if let Some(ra) = r.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(ra.as_secs().max(1)));
    }
    (status, headers, r.body).into_response()
}

async fn submit(State(s): State<ApiState>, Path(room): Path<String>, body: Bytes) -> HttpResponse {
    let queued = std::time::Instant::now();
    match ask(&s.tx, |reply| Event::Submit {
        room,
        body,
        reply,
        queued,
    })
    .await
    {
        Some(r) => to_http(r),
        None => unavailable(),
    }
}

/// `POST /v1/client/submitBatch`: SubmitMessageRequests for any rooms, for a provider front end
/// that hands the relay what it has in one call. Each item is `room u16-len string, request
/// u32-len bytes`, big-endian. They reach the core in order, back to back, so the hub fans
/// each room's out in one transmit per follower. The answer lists each one's outcome in the
/// same order: `status u16, body u32-len` (what `/submit` would have answered). Each is
/// accepted or refused on its own; a retried batch is answered from the dedupe window, never
/// fanned out twice.
async fn submit_batch(State(s): State<ApiState>, body: Bytes) -> HttpResponse {
    let items = match split_batch(body) {
        Ok(items) => items,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    let mut answers = Vec::with_capacity(items.len());
    for (room, body) in items {
        let (reply, answer) = oneshot::channel();
        let queued = std::time::Instant::now();
        let submit = Event::Submit {
            room,
            body,
            reply,
            queued,
        };
        if s.tx.send(submit).is_err() {
            return unavailable();
        }
        answers.push(answer);
    }
    let mut out = BytesMut::new();
    for answer in answers {
        let Ok(r) = answer.await else {
            return unavailable();
        };
        out.put_u16(r.status.http_code());
        out.put_u32(r.body.len() as u32);
        out.put_slice(&r.body);
    }
    (StatusCode::OK, out.freeze()).into_response()
}

/// Splits a `submitBatch` body into (room, request) items.
fn split_batch(mut b: Bytes) -> Result<Vec<(String, Bytes)>, String> {
    let mut items = Vec::new();
    while !b.is_empty() {
        if items.len() == MAX_BATCH {
            return Err(format!("more than {MAX_BATCH} submissions in one batch\n"));
        }
        let room = take_field(&mut b, false).ok_or("truncated room\n")?;
        let room = String::from_utf8(room.to_vec()).map_err(|_| "room is not UTF-8\n")?;
        let body = take_field(&mut b, true).ok_or("truncated submission\n")?;
        items.push((room, body));
    }
    if items.is_empty() {
        return Err("empty batch\n".into());
    }
    Ok(items)
}

/// `POST /v1/client/update/{room}`: an UpdateRequest (protocol-06 §5.3) for the room's hub.
async fn update(State(s): State<ApiState>, Path(room): Path<String>, body: Bytes) -> HttpResponse {
    client_request(&s, mimi_wire::endpoint::Endpoint::Update, room, body).await
}

/// `POST /v1/client/keyMaterial`: a KeyMaterialRequest (§5.2); the target is its targetUser.
async fn key_material(State(s): State<ApiState>, body: Bytes) -> HttpResponse {
    let target = match mimi_wire::proto::KeyMaterialRequest::decode(&body) {
        Ok(r) => r.target_user.as_str().to_owned(),
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    client_request(&s, mimi_wire::endpoint::Endpoint::KeyMaterial, target, body).await
}

async fn client_request(
    s: &ApiState,
    endpoint: mimi_wire::endpoint::Endpoint,
    target: String,
    body: Bytes,
) -> HttpResponse {
    match ask(&s.tx, |reply| Event::ClientRequest {
        endpoint,
        target,
        body,
        reply,
    })
    .await
    {
        Some(r) => to_http(r),
        None => unavailable(),
    }
}

/// `POST /v1/client/identifierQuery/{domain}`: an IdentifierRequest (§5.8), sent straight to
/// that provider.
async fn identifier_query(
    State(s): State<ApiState>,
    Path(domain): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let e = mimi_wire::endpoint::Endpoint::IdentifierQuery;
    client_request(&s, e, domain, body).await
}

/// `POST /v1/client/requestConsent`: a ConsentEntry (§5.7) for the target's provider.
async fn request_consent(State(s): State<ApiState>, body: Bytes) -> HttpResponse {
    let e = mimi_wire::endpoint::Endpoint::RequestConsent;
    client_request(&s, e, String::new(), body).await
}

/// `POST /v1/client/updateConsent`: a ConsentEntry (§5.7) for the requester's provider.
async fn update_consent(State(s): State<ApiState>, body: Bytes) -> HttpResponse {
    let e = mimi_wire::endpoint::Endpoint::UpdateConsent;
    client_request(&s, e, String::new(), body).await
}

/// `POST /v1/client/reportAbuse/{room}`: an AbuseReport (§5.9) for the room's hub.
async fn report_abuse(
    State(s): State<ApiState>,
    Path(room): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let e = mimi_wire::endpoint::Endpoint::ReportAbuse;
    client_request(&s, e, room, body).await
}

/// `POST /v1/client/groupInfo/{room}`: a GroupInfoRequest (§5.6) for the room's hub.
async fn group_info(
    State(s): State<ApiState>,
    Path(room): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let e = mimi_wire::endpoint::Endpoint::GroupInfo;
    client_request(&s, e, room, body).await
}

/// `GET /v1/client/hubKey`: this node's hub signature key as a TLS-encoded
/// `FrankingAgentData` (protocol-06 §5.4.1: `SignaturePublicKey`, then the basic credential
/// `mimi://<domain>`). Clients verify GroupInfoResponses with it and put it in a room's
/// franking_agent component. 404 when the node has no hub keys.
async fn hub_key(State(s): State<ApiState>) -> HttpResponse {
    match ask(&s.tx, |reply| Event::HubKey { reply }).await {
        Some(Some(data)) => (StatusCode::OK, data).into_response(),
        Some(None) => (StatusCode::NOT_FOUND, "no hub keys\n").into_response(),
        None => unavailable(),
    }
}

/// `POST /v1/client/directory`: search type (u8: handle 1, nick 2, email 3, phone 4), the
/// exact value and the user URI (u16-length strings).
async fn directory_entry(State(s): State<ApiState>, mut body: Bytes) -> HttpResponse {
    use bytes::Buf;
    let parsed = (|| {
        let t = (body.remaining() >= 1).then(|| body.get_u8())?;
        let search_type = mimi_wire::proto::SearchIdentifierType::from_u8(t).ok()?;
        let value = String::from_utf8(take_field(&mut body, false)?.to_vec()).ok()?;
        let user = String::from_utf8(take_field(&mut body, false)?.to_vec()).ok()?;
        body.is_empty().then_some((search_type, value, user))
    })();
    let Some((search_type, value, user)) = parsed else {
        return (StatusCode::BAD_REQUEST, "malformed directory entry\n").into_response();
    };
    match ask(&s.tx, |reply| Event::DirectoryEntry {
        search_type,
        value,
        user,
        reply,
    })
    .await
    {
        Some(Ok(())) => (StatusCode::CREATED, "listed\n").into_response(),
        Some(Err(crate::core_loop::STORAGE_FULL)) => storage_full(),
        Some(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")).into_response(),
        None => unavailable(),
    }
}

/// Reads a u16-length string or a u32-length byte string off the front of `b`.
fn take_field(b: &mut Bytes, wide: bool) -> Option<Bytes> {
    use bytes::Buf;
    let n = if wide {
        (b.remaining() >= 4).then(|| b.get_u32() as usize)?
    } else {
        (b.remaining() >= 2).then(|| usize::from(b.get_u16()))?
    };
    (b.remaining() >= n).then(|| b.split_to(n))
}

/// `POST /v1/client/keyPackages`: `user` and `client` (u16-length strings), then KeyPackages
/// (bare structs, each u32-length). Each is handed out once to a /keyMaterial claim.
async fn publish_key_packages(State(s): State<ApiState>, mut body: Bytes) -> HttpResponse {
    let parsed = (|| {
        let user = String::from_utf8(take_field(&mut body, false)?.to_vec()).ok()?;
        let client = String::from_utf8(take_field(&mut body, false)?.to_vec()).ok()?;
        let mut kps = Vec::new();
        while !body.is_empty() {
            kps.push(take_field(&mut body, true)?);
        }
        Some((user, client, kps))
    })();
    let Some((user, client, key_packages)) = parsed else {
        return (StatusCode::BAD_REQUEST, "malformed key package list\n").into_response();
    };
    match ask(&s.tx, |reply| Event::PublishKeyPackages {
        user,
        client,
        key_packages,
        reply,
    })
    .await
    {
        Some(Ok(n)) => (StatusCode::CREATED, format!("{n}\n")).into_response(),
        Some(Err(crate::core_loop::STORAGE_FULL)) => storage_full(),
        Some(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")).into_response(),
        None => unavailable(),
    }
}

/// `POST /v1/client/mlsRooms/{room}`: hosts an MLS room here from its creator's GroupInfo
/// (an MLSMessage, u32-length) followed by the exported ratchet tree.
async fn create_mls_room(
    State(s): State<ApiState>,
    Path(room): Path<String>,
    mut body: Bytes,
) -> HttpResponse {
    let room: RoomId = match room.parse() {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("room: {e}\n")).into_response(),
    };
    let Some(group_info) = take_field(&mut body, true) else {
        return (StatusCode::BAD_REQUEST, "malformed body\n").into_response();
    };
    match ask(&s.tx, |reply| Event::CreateMlsRoom {
        room,
        group_info,
        ratchet_tree: body,
        reply,
    })
    .await
    {
        Some(Ok(())) => (StatusCode::CREATED, "created\n").into_response(),
        Some(Err(relay_core::MlsRoomError::StorageFull)) => storage_full(),
        Some(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")).into_response(),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct InboxQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_max")]
    max: usize,
    #[serde(default)]
    wait_ms: u64,
}

fn default_max() -> usize {
    1024
}

/// Returns records after `after` (and lets the node forget those up to it); waits up to
/// `wait_ms` for the first one to arrive.
async fn inbox(State(mut s): State<ApiState>, Query(q): Query<InboxQuery>) -> HttpResponse {
    let max = q.max.clamp(1, 65_536);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(30_000));
    loop {
        s.inbox_durable.borrow_and_update();
        let items = match ask(&s.tx, |reply| Event::Inbox {
            after: q.after,
            max,
            reply,
        })
        .await
        {
            Some(Ok(items)) => items,
            Some(Err(())) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::RETRY_AFTER, HeaderValue::from(1))],
                    "cannot read the inbox from the store\n",
                )
                    .into_response();
            }
            None => return unavailable(),
        };
        if !items.is_empty() || tokio::time::Instant::now() >= deadline {
            let n = records_within(&items, INBOX_ANSWER_BYTES);
            return (StatusCode::OK, encode_inbox(&items[..n])).into_response();
        }
        // Wake when more records are durable; a commit between the read and here marked the
        // watch changed already, so nothing is missed.
        if tokio::time::timeout_at(deadline, s.inbox_durable.changed())
            .await
            .is_err()
        {
            return (StatusCode::OK, Bytes::new()).into_response();
        }
    }
}

/// Bytes of records one inbox answer carries, at most (a single larger record still goes
/// alone; the client asks again after the last one it got). A reader that fell behind takes
/// its backlog in pieces of this size, not in answers of megabytes that are each fresh memory
/// for the node and its client: at a node's start, touching that memory for the first time
/// cost more than the work and held both back (issue 17).
pub const INBOX_ANSWER_BYTES: usize = 256 * 1024;

/// How many of `items`, from the first, fit in an answer of `max_bytes` (at least one).
fn records_within(items: &[(u64, InboxRecord)], max_bytes: usize) -> usize {
    let mut bytes = 0;
    items
        .iter()
        .take_while(|(_, r)| {
            bytes += 24 + r.from.as_str().len() + r.room.as_str().len() + r.fanout.len();
            bytes <= max_bytes
        })
        .count()
        .max(1)
        .min(items.len())
}

pub fn encode_inbox(items: &[(u64, InboxRecord)]) -> Bytes {
    let len: usize = items.iter().map(|(_, r)| 24 + r.fanout.len() + 64).sum();
    let mut b = BytesMut::with_capacity(len);
    for (offset, r) in items {
        b.put_u64(*offset);
        b.put_u64(r.accepted_ms);
        put_str(&mut b, r.from.as_str());
        put_str(&mut b, r.room.as_str());
        b.put_u32(r.fanout.len() as u32);
        b.put_slice(&r.fanout);
    }
    b.freeze()
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16(s.len() as u16);
    b.put_slice(s.as_bytes());
}

#[derive(Deserialize)]
struct NewRoom {
    id: String,
    followers: Vec<String>,
}

async fn create_room(
    State(s): State<ApiState>,
    axum::Json(r): axum::Json<NewRoom>,
) -> HttpResponse {
    let room: RoomId = match r.id.parse() {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("id: {e}\n")).into_response(),
    };
    let mut followers = Vec::new();
    for f in &r.followers {
        match f.parse::<ProviderDomain>() {
            Ok(d) => followers.push(d),
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("followers: {f:?}: {e}\n"))
                    .into_response();
            }
        }
    }
    match ask(&s.tx, |reply| Event::CreateRoom {
        room,
        followers,
        reply,
    })
    .await
    {
        Some(Ok(())) => (StatusCode::CREATED, "created\n").into_response(),
        Some(Err(relay_core::RoomError::StorageFull)) => storage_full(),
        Some(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")).into_response(),
        None => unavailable(),
    }
}

/// A provider front end says its users take part in `room` (hosted elsewhere): the node takes
/// the room's `/notify`s from now on.
async fn follow_room(State(s): State<ApiState>, Path(room): Path<String>) -> HttpResponse {
    let room: RoomId = match room.parse() {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("room: {e}\n")).into_response(),
    };
    match ask(&s.tx, |reply| Event::FollowRoom { room, reply }).await {
        Some(Ok(())) => (StatusCode::CREATED, "following\n").into_response(),
        Some(Err(relay_core::RoomError::StorageFull)) => storage_full(),
        Some(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")).into_response(),
        None => unavailable(),
    }
}

async fn metrics_page(State(s): State<ApiState>) -> HttpResponse {
    match ask(&s.tx, |reply| Event::Stats { reply }).await {
        Some((stats, store)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            {
                let mut text = metrics::render(&stats, &store);
                metrics::render_adapters(&mut text, &s.adapter_stats);
                metrics::render_ingress(&mut text, s.ingress.refusals());
                let held = metrics::tls_days_left(&s.tls.identity, &s.tls.trust);
                metrics::render_tls(&mut text, &held);
                metrics::render_pacer(&mut text, &s.pacer);
                text
            },
        )
            .into_response(),
        None => unavailable(),
    }
}

/// Entry points for the `cargo fuzz` targets in `fuzz/` (outside the workspace); not an API.
#[doc(hidden)]
pub mod fuzz {
    /// The `submitBatch` body parser.
    pub fn split_batch(body: bytes::Bytes) -> Result<Vec<(String, bytes::Bytes)>, String> {
        super::split_batch(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fanout_len: usize) -> (u64, InboxRecord) {
        (
            1,
            InboxRecord {
                room: "mimi://a.example/r/room0".parse().expect("room id"),
                from: "a.example".parse().expect("domain"),
                accepted_ms: 0,
                fanout: Bytes::from(vec![7u8; fanout_len]),
            },
        )
    }

    #[test]
    fn an_inbox_answer_stops_at_its_byte_limit() {
        let items: Vec<_> = (0..10).map(|_| record(1000)).collect();
        let one = encode_inbox(&items[..1]).len();
        // Exactly three records' worth: three go, the fourth waits for the next read.
        assert_eq!(records_within(&items, 3 * one), 3);
        assert_eq!(encode_inbox(&items[..3]).len(), 3 * one);
        assert_eq!(records_within(&items, 3 * one - 1), 2);
        assert_eq!(records_within(&items, usize::MAX), 10);
    }

    #[test]
    fn a_record_larger_than_the_limit_still_goes_alone() {
        let items = vec![record(INBOX_ANSWER_BYTES * 2), record(10)];
        assert_eq!(records_within(&items, INBOX_ANSWER_BYTES), 1);
        assert_eq!(records_within(&[], INBOX_ANSWER_BYTES), 0);
    }
}
