//! What the routing core exchanges with the transport adapters: [`Transmit`]s out, [`Request`]s
//! in, [`Response`]s and [`TransportError`]s as outcomes. The traits through which the node
//! drives the adapters (`Transport`, `Inbound`) live in `relay-adapter`: the core never calls
//! them.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;

/// The closed set of transports a peer can be reached over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TransportKind {
    /// The draft's own binding: HTTPS with mutual TLS.
    Https,
    /// QUIC with mutual TLS and one stream per room.
    Quic,
    /// XMPP: relay-to-relay XML streams, or a component of an XMPP server.
    Xmpp,
    /// Matrix federation: signed transactions between servers.
    Matrix,
}

impl TransportKind {
    /// Every transport this build carries.
    pub const ALL: [TransportKind; 4] = [
        TransportKind::Https,
        TransportKind::Quic,
        TransportKind::Xmpp,
        TransportKind::Matrix,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Https => "https",
            TransportKind::Quic => "quic",
            TransportKind::Xmpp => "xmpp",
            TransportKind::Matrix => "matrix",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = UnknownTransport;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "https" => Ok(TransportKind::Https),
            "quic" => Ok(TransportKind::Quic),
            "xmpp" => Ok(TransportKind::Xmpp),
            "matrix" => Ok(TransportKind::Matrix),
            _ => Err(UnknownTransport(s.to_owned())),
        }
    }
}

/// A transport name that this build does not know.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown transport {0:?} (expected one of: https, quic, xmpp, matrix)")]
pub struct UnknownTransport(pub String);

/// Identifies one outbound transmit so that its outcome can be matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransmitId(pub u64);

/// Which runs of the hub numbered a `/notify` batch: `batch` numbered all of its events, `prev`
/// the event just before its first (0: none, or not known). Each hub start draws a fresh random
/// incarnation, so a follower can tell the numbering it holds from a hub that restarted from
/// nothing or from a backup, and which events are the same (ARCHITECTURE.md, "A follower that
/// stops, a hub that forgets").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lineage {
    pub batch: u64,
    pub prev: u64,
}

/// One request from this relay to a peer provider.
///
/// `body` is a list of segments sent back to back without copying: for `/notify` each segment
/// is one FanoutMessage, exactly as the hub stored it.
#[derive(Clone, Debug)]
pub struct Transmit {
    pub id: TransmitId,
    pub dest: ProviderDomain,
    pub transport: TransportKind,
    pub endpoint: Endpoint,
    /// The path parameter of the endpoint (a room URI for `/notify` and `/submitMessage`).
    pub target: String,
    /// The per-(room, destination) sequence number of the first segment, for `/notify`.
    pub seq: Option<u64>,
    /// With `seq`: the incarnations behind the numbers.
    pub lineage: Option<Lineage>,
    pub body: Vec<Bytes>,
}

impl Transmit {
    pub fn body_len(&self) -> usize {
        self.body.iter().map(Bytes::len).sum()
    }
}

/// One request from an authenticated peer to this relay.
#[derive(Clone, Debug)]
pub struct Request {
    /// The peer's provider domain, as authenticated by the transport (certificate identity).
    pub from: ProviderDomain,
    pub transport: TransportKind,
    pub endpoint: Endpoint,
    pub target: String,
    pub seq: Option<u64>,
    pub lineage: Option<Lineage>,
    /// The exact bytes received. The relay never re-encodes them.
    pub body: Bytes,
}

/// The answer's class, with the HTTP status each transport maps it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Status {
    /// 200: a response body follows (for example a SubmitMessageResponse).
    Ok,
    /// 201: the draft's answer to an accepted /notify.
    Created,
    /// 400: the body or path could not be decoded.
    BadRequest,
    /// 403: the authenticated peer may not make this request.
    Forbidden,
    /// 404: unknown room or endpoint.
    NotFound,
    /// 409: a /notify sequence gap; `next_seq` says where to resume.
    OutOfOrder,
    /// 413: the body is over the configured limit.
    TooLarge,
    /// 500: our own bug or a storage failure.
    Internal,
    /// 501: an endpoint this relay does not serve yet.
    NotImplemented,
    /// 502: the hub could not be reached for a forwarded request.
    BadGateway,
    /// 503: a full queue or a node shutting down; retry later.
    Unavailable,
    /// 429: the peer is over its request rate for this endpoint; retry after `retry_after`.
    TooManyRequests,
    /// Any other 4xx or 5xx a peer answered with (401, 405, 408, 410, 422, 504, ...): the
    /// code itself says whether sending again can help (see [`Status::is_final_refusal`]).
    Other(u16),
}

impl Status {
    pub fn http_code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::Created => 201,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::OutOfOrder => 409,
            Status::TooLarge => 413,
            Status::Internal => 500,
            Status::NotImplemented => 501,
            Status::BadGateway => 502,
            Status::Unavailable => 503,
            Status::TooManyRequests => 429,
            Status::Other(code) => code,
        }
    }

    pub fn from_http_code(code: u16) -> Option<Status> {
        Some(match code {
            200 => Status::Ok,
            201 => Status::Created,
            400 => Status::BadRequest,
            403 => Status::Forbidden,
            404 => Status::NotFound,
            409 => Status::OutOfOrder,
            413 => Status::TooLarge,
            500 => Status::Internal,
            501 => Status::NotImplemented,
            502 => Status::BadGateway,
            503 => Status::Unavailable,
            429 => Status::TooManyRequests,
            _ if (400..600).contains(&code) => Status::Other(code),
            _ => return None,
        })
    }

    pub fn is_success(self) -> bool {
        matches!(self, Status::Ok | Status::Created)
    }

    /// Whether a peer that answered this to a `/notify` will answer the same to the same
    /// bytes: a 4xx other than 408 (timeout), 409 (our sequence logic), 421 (sent to the wrong
    /// place: the directory is read again), 425 and 429 (later), and 501 (the peer does not
    /// implement the endpoint). 413 is final for one event only; the core halves larger
    /// batches first. 5xx other than 501 are retried.
    pub fn is_final_refusal(self) -> bool {
        match self.http_code() {
            408 | 409 | 421 | 425 | 429 => false,
            501 => true,
            code => (400..500).contains(&code),
        }
    }
}

/// An answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    /// For 200, the endpoint's response body; for errors, a short UTF-8 reason.
    pub body: Bytes,
    /// For `/notify`: the receiver's next expected sequence number for this (hub, room), which
    /// acknowledges everything below it.
    pub next_seq: Option<u64>,
    /// With `next_seq`: the hub incarnation that numbered the receiver's event `next_seq - 1`
    /// (0 or absent: not known).
    pub next_inc: Option<u64>,
    pub retry_after: Option<Duration>,
}

impl Response {
    pub fn new(status: Status, body: impl Into<Bytes>) -> Self {
        Response {
            status,
            body: body.into(),
            next_seq: None,
            next_inc: None,
            retry_after: None,
        }
    }

    pub fn error(status: Status, reason: &'static str) -> Self {
        Response::new(status, Bytes::from_static(reason.as_bytes()))
    }
}

/// Why a transmit did not get an answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    #[error("no route to {0}")]
    NoRoute(ProviderDomain),
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("connection lost before the answer")]
    ConnectionLost,
    #[error("timed out waiting for the answer")]
    Timeout,
    #[error("the adapter's send queue is full")]
    Busy,
    #[error("peer answered with something that is not a valid response: {0}")]
    BadResponse(String),
    #[error("transport shut down")]
    Closed,
    /// The peer serves no usable URL for this endpoint (its directory does not list it, or
    /// points it to another host). Sending again changes nothing until the peer does.
    #[error("{endpoint} is not supported by the peer: {reason}")]
    Unsupported { endpoint: Endpoint, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_4xx_and_5xx_is_an_answer_and_says_whether_it_is_final() {
        assert_eq!(Status::from_http_code(405), Some(Status::Other(405)));
        assert_eq!(Status::from_http_code(409), Some(Status::OutOfOrder));
        assert_eq!(Status::from_http_code(302), None);
        assert_eq!(Status::from_http_code(600), None);
        for code in [400, 401, 403, 404, 405, 410, 413, 422, 501] {
            let s = Status::from_http_code(code).expect("an answer");
            assert!(s.is_final_refusal(), "{code}");
            assert_eq!(s.http_code(), code);
        }
        for code in [408, 409, 421, 425, 429, 500, 502, 503, 504] {
            let s = Status::from_http_code(code).expect("an answer");
            assert!(!s.is_final_refusal(), "{code}");
        }
        assert!(!Status::Created.is_final_refusal());
    }
}
