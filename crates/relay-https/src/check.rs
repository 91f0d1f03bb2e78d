//! What an operator's tool (`mimi-relay check-peers`) asks an HTTPS peer, with the node's own
//! rules: its directory read as the sending side reads it, the URL each endpoint goes to, and
//! whether it answers our sequence extension. One connection, every step bounded in time and
//! size. The TLS identity itself is checked by [`relay_tls::check::check_peer`] first; this
//! dials with the same trust and reports a refused handshake only as text.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, FROM, HOST};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mimi_wire::endpoint::{DIRECTORY_PATH, Endpoint};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_adapter::PeerAddr;
use relay_tls::{PeerTrust, TlsIdentity};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::directory::{self, MAX_DIRECTORY_BYTES, Route, RouteError};
use crate::server::header_u64;
use crate::{MIMI_NEXT_SEQ, MIMI_SEQ};

/// Most of an error answer's body kept for the report.
const MAX_REASON_BYTES: usize = 1024;

/// What an HTTPS peer answered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpsCheck {
    /// `2` or `1.1`, as picked by ALPN (no ALPN means HTTP/1.1).
    pub http: &'static str,
    /// From sending the directory request to its answer's head, on an open connection.
    pub rtt: Duration,
    pub directory: DirectoryFound,
    /// `None` when not asked (no room to probe).
    pub seq: Option<SeqSupport>,
}

/// The peer's directory, as the node's sending side would read it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirectoryFound {
    /// A directory: where each endpoint goes, or why it cannot be used.
    Served {
        endpoints: BTreeMap<Endpoint, Result<String, EndpointGap>>,
    },
    /// None (answered 404 or 410, or a 200 that is not a directory): the node uses the draft's
    /// `/v1/{endpoint}/{param}`.
    Fallback { status: u16, why: String },
}

/// Why the directory gives no URL for an endpoint; the node answers such requests as
/// unsupported by the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointGap {
    /// The directory does not list it.
    Missing,
    /// Listed, but not usable (another host, a template we cannot expand): the reason.
    Unusable(String),
}

/// Whether the peer answers `MIMI-Seq` with `MIMI-Next-Seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SeqSupport {
    /// It does: its cursor for the room.
    Speaks { next_seq: u64 },
    /// It took the request without the header, or refused it as malformed: the draft's rules
    /// alone (one /notify in flight per room, dedupe by body).
    DraftOnly { status: u16 },
    /// The answer does not tell (for example 404: the peer does not follow the room), or
    /// there was none (`status` 0; `reason` says why).
    Unknown { status: u16, reason: String },
}

/// Why the peer could not be asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsCheckError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tls handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The directory request got an answer that is neither a directory nor "none here".
    #[error("the directory request was answered {status}: {reason}")]
    DirectoryRefused { status: u16, reason: String },
    #[error("cannot build the TLS client")]
    Config(#[from] relay_tls::TlsError),
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        // An HTTP/1.1 connection takes a request only once the answer before was read to
        // its end by the connection task; sent before that, hyper cancels it.
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => s.send_request(req).await,
        }
    }

    fn request(&self, method: Method, authority: &str, path: &str) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = method;
        let uri = match self {
            Sender::H2(_) => format!("https://{authority}{path}").parse::<Uri>(),
            Sender::H1(_) => {
                if let Ok(host) = HeaderValue::from_str(authority) {
                    req.headers_mut().insert(HOST, host);
                }
                path.parse::<Uri>()
            }
        };
        *req.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
        req
    }
}

/// Fetches `peer`'s directory over a new connection to `addr` (as `identity`, trusting by
/// `trust`) and, when `probe_room` is given, asks whether it speaks our sequence extension
/// with a gap marker at 1 for that room: an empty `/notify` with `MIMI-Seq: 1`, which says
/// "nothing before event 1 is missing" and so changes nothing on a receiver that speaks the
/// extension; one that does not sees an empty /notify and refuses or ignores it. Each step is
/// bounded by `timeout`.
pub async fn check(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    peer: &ProviderDomain,
    addr: &PeerAddr,
    probe_room: Option<&RoomId>,
    timeout: Duration,
) -> Result<HttpsCheck, HttpsCheckError> {
    let (mut sender, http) = bounded(timeout, connect(identity, trust, peer, addr)).await?;
    let from = HeaderValue::try_from(format!("mimi@{}", identity.domain))
        .unwrap_or_else(|_| HeaderValue::from_static("mimi@invalid"));

    let mut req = sender.request(Method::GET, peer.as_str(), DIRECTORY_PATH);
    req.headers_mut().insert(FROM, from.clone());
    let started = Instant::now();
    let (status, rtt, body) = bounded(timeout, async {
        let resp = sender
            .send(req)
            .await
            .map_err(|e| HttpsCheckError::Http(e.to_string()))?;
        let rtt = started.elapsed();
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_DIRECTORY_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| HttpsCheckError::Http(format!("reading the directory: {e}")))?;
        Ok((status, rtt, body))
    })
    .await?;

    let (directory, notify) = match status {
        200 => match directory::parse(&body, peer) {
            Some(d) => {
                let endpoints = Endpoint::ALL
                    .into_iter()
                    .map(|e| {
                        let found = d.route(e).map(|r| r.template()).map_err(|g| match g {
                            RouteError::Missing => EndpointGap::Missing,
                            other => EndpointGap::Unusable(other.to_string()),
                        });
                        (e, found)
                    })
                    .collect();
                (
                    DirectoryFound::Served { endpoints },
                    d.route(Endpoint::Notify).ok(),
                )
            }
            None => (
                DirectoryFound::Fallback {
                    status,
                    why: "the answer is not a directory (a JSON object naming endpoints)"
                        .to_owned(),
                },
                Some(Route::fallback(peer, Endpoint::Notify)),
            ),
        },
        404 | 410 => (
            DirectoryFound::Fallback {
                status,
                why: format!("answered {status}"),
            },
            Some(Route::fallback(peer, Endpoint::Notify)),
        ),
        status => {
            return Err(HttpsCheckError::DirectoryRefused {
                status,
                reason: reason(&body),
            });
        }
    };

    let seq = match (probe_room, notify) {
        (None, _) => None,
        (Some(_), None) => Some(SeqSupport::Unknown {
            status: 0,
            reason: "the directory gives no usable notify endpoint".to_owned(),
        }),
        (Some(room), Some(route)) => {
            let mut req =
                sender.request(Method::POST, route.authority(), &route.path(room.as_str()));
            let h = req.headers_mut();
            h.insert(FROM, from);
            h.insert(CONTENT_LENGTH, HeaderValue::from(0));
            h.insert(MIMI_SEQ, HeaderValue::from(1));
            Some(
                bounded(timeout, async {
                    let resp = sender
                        .send(req)
                        .await
                        .map_err(|e| HttpsCheckError::Http(e.to_string()))?;
                    let status = resp.status().as_u16();
                    let next = header_u64(resp.headers(), MIMI_NEXT_SEQ).ok().flatten();
                    let body = Limited::new(resp.into_body(), MAX_REASON_BYTES)
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    Ok(seq_support(status, next, &body))
                })
                .await
                // The directory is worth reporting even if this fails.
                .unwrap_or_else(|e| SeqSupport::Unknown {
                    status: 0,
                    reason: e.to_string(),
                }),
            )
        }
    };
    Ok(HttpsCheck {
        http,
        rtt,
        directory,
        seq,
    })
}

async fn bounded<T>(
    timeout: Duration,
    f: impl Future<Output = Result<T, HttpsCheckError>>,
) -> Result<T, HttpsCheckError> {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or(Err(HttpsCheckError::Timeout(timeout)))
}

fn seq_support(status: u16, next: Option<u64>, body: &[u8]) -> SeqSupport {
    match (status, next) {
        (_, Some(next_seq)) => SeqSupport::Speaks { next_seq },
        (200..=299 | 400, None) => SeqSupport::DraftOnly { status },
        (status, None) => SeqSupport::Unknown {
            status,
            reason: reason(body),
        },
    }
}

/// An error answer's body as one short line.
fn reason(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    line.trim().to_owned()
}

async fn connect(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    peer: &ProviderDomain,
    addr: &PeerAddr,
) -> Result<(Sender, &'static str), HttpsCheckError> {
    let tcp = addr
        .connect_tcp()
        .await
        .map_err(|source| HttpsCheckError::Connect {
            address: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let config =
        relay_tls::client_config(identity, trust, vec![b"h2".to_vec(), b"http/1.1".to_vec()])?;
    let name = ServerName::try_from(peer.as_str().to_owned())
        .map_err(|e| HttpsCheckError::Http(e.to_string()))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(HttpsCheckError::Tls)?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let http_err = |e: hyper::Error| HttpsCheckError::Http(e.to_string());
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(http_err)?;
        tokio::spawn(conn);
        Ok((Sender::H2(sender), "2"))
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(http_err)?;
        tokio::spawn(conn);
        Ok((Sender::H1(sender), "1.1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_seq_or_its_absence_tells() {
        assert_eq!(
            seq_support(201, Some(7), b""),
            SeqSupport::Speaks { next_seq: 7 }
        );
        assert_eq!(
            seq_support(409, Some(3), b""),
            SeqSupport::Speaks { next_seq: 3 }
        );
        assert_eq!(
            seq_support(204, None, b""),
            SeqSupport::DraftOnly { status: 204 }
        );
        assert_eq!(
            seq_support(400, None, b"empty body"),
            SeqSupport::DraftOnly { status: 400 }
        );
        assert_eq!(
            seq_support(404, None, b"room not\nfollowed"),
            SeqSupport::Unknown {
                status: 404,
                reason: "room not followed".to_owned()
            }
        );
    }
}
