//! A client of a node's loopback API, for the demo, the load harness and tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
pub use hyper::StatusCode;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use mimi_wire::uri::RoomId;

/// Why a call to the local API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http")]
    Http(#[from] hyper::Error),
    #[error("cannot build the request")]
    Build(#[from] hyper::http::Error),
    #[error("malformed answer (inbox record or batch answer)")]
    Malformed,
    #[error("a room URI of {0} bytes (at most 65535)")]
    RoomTooLong(usize),
    #[error("status {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

/// One delivered event as read from a node's inbox.
#[derive(Debug, Clone)]
pub struct InboxItem {
    pub offset: u64,
    pub accepted_ms: u64,
    pub from: String,
    pub room: String,
    pub fanout: Bytes,
}

/// Most submissions one `submitBatch` call may carry.
pub const MAX_BATCH: usize = 4096;

/// How long one call may take beyond the wait it asked for (an inbox long poll).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a blocking TCP connection to the API's address: for a caller that must open its
/// sockets elsewhere than in its own network namespace (the transport lab).
pub type Connector = Arc<dyn Fn(SocketAddr) -> std::io::Result<std::net::TcpStream> + Send + Sync>;

/// One keep-alive HTTP/1.1 connection to a node's API; reconnects after a failure.
pub struct LocalClient {
    addr: SocketAddr,
    conn: Option<SendRequest<Full<Bytes>>>,
    timeout: Duration,
    connector: Option<Connector>,
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("addr", &self.addr)
            .field("connected", &self.conn.is_some())
            .field("timeout", &self.timeout)
            .field("connector", &self.connector.is_some())
            .finish()
    }
}

impl LocalClient {
    pub fn new(addr: SocketAddr) -> Self {
        LocalClient {
            addr,
            conn: None,
            timeout: DEFAULT_CALL_TIMEOUT,
            connector: None,
        }
    }

    /// Connects through `connector` (run on a blocking thread) instead of from here.
    pub fn with_connector(mut self, connector: Connector) -> Self {
        self.connector = Some(connector);
        self
    }

    /// Bounds every call (connect, request and whole answer) by `timeout`, beyond any wait
    /// the call itself asks the node for.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn call(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.call_waiting(req, Duration::ZERO).await
    }

    /// A call that the node may hold for `wait` before answering (a long poll).
    async fn call_waiting(
        &mut self,
        req: Request<Full<Bytes>>,
        wait: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let after = self.timeout + wait;
        let result = match tokio::time::timeout(after, self.try_call(req)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                addr: self.addr,
                after,
            }),
        };
        if result.is_err() {
            self.conn = None; // a fresh connection next time
        }
        result
    }

    async fn try_call(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            let addr = self.addr;
            let connect_failed = |source| ClientError::Connect { addr, source };
            let stream = match &self.connector {
                None => tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(connect_failed)?,
                Some(c) => {
                    let c = c.clone();
                    let opened = tokio::task::spawn_blocking(move || c(addr))
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r)
                        .and_then(|s| s.set_nonblocking(true).map(|()| s))
                        .map_err(connect_failed)?;
                    tokio::net::TcpStream::from_std(opened).map_err(connect_failed)?
                }
            };
            let _ = stream.set_nodelay(true);
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some(send);
        }
        let Some(send) = self.conn.as_mut() else {
            return Err(ClientError::Malformed);
        };
        send.ready().await?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        Ok(Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Full::new(body))?)
    }

    /// Submits a SubmitMessageRequest for `room`; returns the HTTP status and the body
    /// (a SubmitMessageResponse when the status is 200).
    pub async fn submit(
        &mut self,
        room: &RoomId,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let path = format!("/v1/client/submit/{}", room.to_path_segment());
        let req = self.request(Method::POST, &path, body)?;
        self.call(req).await
    }

    /// Submits (room URI, SubmitMessageRequest) items in one call (`submitBatch`); returns
    /// each one's HTTP status and body, in order.
    pub async fn submit_batch(
        &mut self,
        items: &[(&str, Bytes)],
    ) -> Result<Vec<(StatusCode, Bytes)>, ClientError> {
        let size = items.iter().map(|(r, x)| r.len() + x.len() + 6).sum();
        let mut b = BytesMut::with_capacity(size);
        for (room, body) in items {
            let Ok(n) = u16::try_from(room.len()) else {
                return Err(ClientError::RoomTooLong(room.len()));
            };
            b.put_u16(n);
            b.put_slice(room.as_bytes());
            b.put_u32(body.len() as u32);
            b.put_slice(body);
        }
        let req = self.request(Method::POST, "/v1/client/submitBatch", b.freeze())?;
        let (status, body) = self.call(req).await?;
        if status != StatusCode::OK {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        let answers = decode_batch_answer(body)?;
        if answers.len() != items.len() {
            return Err(ClientError::Malformed);
        }
        Ok(answers)
    }

    /// Reads records after `after`, waiting up to `wait_ms` for the first one.
    pub async fn inbox(
        &mut self,
        after: u64,
        max: usize,
        wait_ms: u64,
    ) -> Result<Vec<InboxItem>, ClientError> {
        decode_inbox(self.inbox_raw(after, max, wait_ms).await?)
    }

    /// Like [`LocalClient::inbox`] but returns the answer undecoded, for a reader that walks
    /// it with [`inbox_records`] and allocates nothing per record (the load lab's).
    pub async fn inbox_raw(
        &mut self,
        after: u64,
        max: usize,
        wait_ms: u64,
    ) -> Result<Bytes, ClientError> {
        let path = format!("/v1/client/inbox?after={after}&max={max}&wait_ms={wait_ms}");
        let req = self.request(Method::GET, &path, Bytes::new())?;
        let (status, body) = self
            .call_waiting(req, Duration::from_millis(wait_ms))
            .await?;
        if status != StatusCode::OK {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        Ok(body)
    }

    pub async fn create_room(
        &mut self,
        room: &RoomId,
        followers: &[&str],
    ) -> Result<(), ClientError> {
        let json = serde_json::json!({ "id": room.as_str(), "followers": followers }).to_string();
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/client/rooms")
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))?;
        let (status, body) = self.call(req).await?;
        if status != StatusCode::CREATED {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        Ok(())
    }

    /// Tells the node that its users take part in `room`, hosted elsewhere.
    pub async fn follow_room(&mut self, room: &RoomId) -> Result<(), ClientError> {
        let path = format!("/v1/client/follow/{}", room.to_path_segment());
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Full::new(Bytes::new()))?;
        let (status, body) = self.call(req).await?;
        if status != StatusCode::CREATED {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        Ok(())
    }

    /// Posts `body` to `path` and returns the status and the answer.
    pub async fn post(
        &mut self,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let req = self.request(Method::POST, path, body)?;
        self.call(req).await
    }

    /// Sends an UpdateRequest for `room` (to its hub, through this node).
    pub async fn update(
        &mut self,
        room: &RoomId,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.post(
            &format!("/v1/client/update/{}", room.to_path_segment()),
            body,
        )
        .await
    }

    /// This node's hub key: the encoded `FrankingAgentData` (signature key and credential
    /// `mimi://<domain>`), from `GET /v1/client/hubKey`.
    pub async fn hub_key(&mut self) -> Result<Bytes, ClientError> {
        let req = self.request(Method::GET, "/v1/client/hubKey", Bytes::new())?;
        let (status, body) = self.call(req).await?;
        if status != StatusCode::OK {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        Ok(body)
    }

    /// Sends a GroupInfoRequest for `room` (through this node to the room's hub).
    pub async fn group_info(
        &mut self,
        room: &RoomId,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.post(
            &format!("/v1/client/groupInfo/{}", room.to_path_segment()),
            body,
        )
        .await
    }

    /// Sends an AbuseReport about messages of `room` (through this node to the room's hub).
    pub async fn report_abuse(
        &mut self,
        room: &RoomId,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.post(
            &format!("/v1/client/reportAbuse/{}", room.to_path_segment()),
            body,
        )
        .await
    }

    /// Sends a KeyMaterialRequest (through this node and the room's hub).
    pub async fn key_material(&mut self, body: Bytes) -> Result<(StatusCode, Bytes), ClientError> {
        self.post("/v1/client/keyMaterial", body).await
    }

    /// Publishes KeyPackages (bare structs) of `client` of local `user`.
    pub async fn publish_key_packages(
        &mut self,
        user: &str,
        client: &str,
        key_packages: &[Vec<u8>],
    ) -> Result<(), ClientError> {
        let mut b = Vec::new();
        for s in [user, client] {
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        for kp in key_packages {
            b.extend_from_slice(&(kp.len() as u32).to_be_bytes());
            b.extend_from_slice(kp);
        }
        expect_created(self.post("/v1/client/keyPackages", Bytes::from(b)).await?)
    }

    /// Hosts an MLS room at this node from its creator's GroupInfo and ratchet tree.
    pub async fn create_mls_room(
        &mut self,
        room: &RoomId,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<(), ClientError> {
        let mut b = (group_info.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(group_info);
        b.extend_from_slice(ratchet_tree);
        let path = format!("/v1/client/mlsRooms/{}", room.to_path_segment());
        expect_created(self.post(&path, Bytes::from(b)).await?)
    }

    /// Lists local `user` under an exact identifier (search type code, value).
    pub async fn list_in_directory(
        &mut self,
        search_type: u8,
        value: &str,
        user: &str,
    ) -> Result<(), ClientError> {
        let mut b = vec![search_type];
        for s in [value, user] {
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        expect_created(self.post("/v1/client/directory", Bytes::from(b)).await?)
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        let req = self.request(Method::GET, path, Bytes::new())?;
        self.call(req).await
    }
}

fn expect_created((status, body): (StatusCode, Bytes)) -> Result<(), ClientError> {
    if status == StatusCode::CREATED {
        Ok(())
    } else {
        Err(ClientError::Status {
            status,
            body: String::from_utf8_lossy(&body).into(),
        })
    }
}

/// Decodes the API's binary inbox form (see the `api` module); the fanouts share `b`.
pub fn decode_inbox(b: Bytes) -> Result<Vec<InboxItem>, ClientError> {
    let text = |s: &[u8]| {
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| ClientError::Malformed)
    };
    inbox_records(&b)
        .map(|r| {
            let r = r?;
            Ok(InboxItem {
                offset: r.offset,
                accepted_ms: r.accepted_ms,
                from: text(r.from)?,
                room: text(r.room)?,
                fanout: b.slice_ref(r.fanout),
            })
        })
        .collect()
}

/// One record of an inbox answer, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxRecord<'a> {
    pub offset: u64,
    pub accepted_ms: u64,
    pub from: &'a [u8],
    pub room: &'a [u8],
    pub fanout: &'a [u8],
}

/// The records of an inbox answer (the API's binary form), in order, without copying; a
/// malformed record yields one error and ends the walk.
pub fn inbox_records(body: &[u8]) -> InboxRecords<'_> {
    InboxRecords { rest: body }
}

/// See [`inbox_records`].
#[derive(Debug, Clone)]
pub struct InboxRecords<'a> {
    rest: &'a [u8],
}

impl<'a> InboxRecords<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClientError> {
        if self.rest.len() < n {
            return Err(ClientError::Malformed);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn next_record(&mut self) -> Result<InboxRecord<'a>, ClientError> {
        let mut fixed = self.take(16)?;
        let offset = fixed.get_u64();
        let accepted_ms = fixed.get_u64();
        let n = self.take(2)?.get_u16() as usize;
        let from = self.take(n)?;
        let n = self.take(2)?.get_u16() as usize;
        let room = self.take(n)?;
        let n = self.take(4)?.get_u32() as usize;
        let fanout = self.take(n)?;
        Ok(InboxRecord {
            offset,
            accepted_ms,
            from,
            room,
            fanout,
        })
    }
}

impl<'a> Iterator for InboxRecords<'a> {
    type Item = Result<InboxRecord<'a>, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let r = self.next_record();
        if r.is_err() {
            self.rest = &[]; // nothing after a malformed record can be trusted
        }
        Some(r)
    }
}

/// Decodes a `submitBatch` answer: `status u16, length u32, body` per submission.
fn decode_batch_answer(mut b: Bytes) -> Result<Vec<(StatusCode, Bytes)>, ClientError> {
    let mut answers = Vec::new();
    while b.has_remaining() {
        if b.remaining() < 6 {
            return Err(ClientError::Malformed);
        }
        let status = StatusCode::from_u16(b.get_u16()).map_err(|_| ClientError::Malformed)?;
        let n = b.get_u32() as usize;
        if b.remaining() < n {
            return Err(ClientError::Malformed);
        }
        answers.push((status, b.split_to(n)));
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::store::InboxRecord as Stored;

    fn answer() -> Bytes {
        let rec = |room: &str, fanout: &'static [u8]| Stored {
            room: room.parse().expect("room id"),
            from: "a.example".parse().expect("domain"),
            accepted_ms: 7,
            fanout: Bytes::from_static(fanout),
        };
        crate::api::encode_inbox(&[
            (3, rec("mimi://a.example/r/one", b"first")),
            (9, rec("mimi://a.example/r/two", b"second fanout")),
        ])
    }

    #[test]
    fn borrowed_inbox_records_match_the_decoded_ones() {
        let body = answer();
        let walked: Vec<_> = inbox_records(&body)
            .collect::<Result<_, _>>()
            .expect("well formed");
        let decoded = decode_inbox(body.clone()).expect("well formed");
        assert_eq!(walked.len(), 2);
        for (w, d) in walked.iter().zip(&decoded) {
            assert_eq!(w.offset, d.offset);
            assert_eq!(w.accepted_ms, d.accepted_ms);
            assert_eq!(w.from, d.from.as_bytes());
            assert_eq!(w.room, d.room.as_bytes());
            assert_eq!(w.fanout, &d.fanout[..]);
        }
        assert_eq!(walked[1].offset, 9);
        assert_eq!(walked[1].fanout, b"second fanout");
    }

    #[test]
    fn a_truncated_inbox_answer_ends_in_one_error() {
        let body = answer();
        let cut = &body[..body.len() - 3];
        let mut it = inbox_records(cut);
        assert_eq!(it.next().map(|r| r.map(|r| r.offset).ok()), Some(Some(3)));
        assert!(matches!(it.next(), Some(Err(ClientError::Malformed))));
        assert!(it.next().is_none());
    }
}
