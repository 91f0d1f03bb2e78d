//! Dial a peer over TCP + TLS and report what was verified, or in plain words why not: the
//! base of `mimi-relay check-peers`. QUIC peers are dialled with a
//! [`recording_client_config`], which says why a server was refused, and checked with
//! [`PeerTrust::verify_server`](crate::PeerTrust::verify_server) on the chain of the QUIC
//! handshake.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mimi_wire::uri::ProviderDomain;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::{PeerTrust, TlsError, TlsIdentity, TrustFailure, TrustMode, Validity};

/// A peer that passed the check.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PeerCheck {
    /// The provider whose identity was verified (the name dialled).
    pub domain: ProviderDomain,
    /// How it was verified.
    pub mode: TrustMode,
    /// The address the TCP connection reached.
    pub addr: SocketAddr,
    /// The protocol the peer chose by ALPN, if any.
    pub alpn: Option<Vec<u8>>,
    /// Whole days until its end-entity certificate expires.
    pub days_left: Option<i64>,
    /// The chain it presented, end-entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// How long the TCP connect took: one network round trip.
    pub connect_time: Duration,
}

/// Why a peer failed the check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// We refused the peer's certificate; the reason says which check failed.
    #[error("{0}")]
    Untrusted(TrustFailure),
    /// The peer refused ours (the TLS alert it sent).
    #[error("the peer refused our certificate ({alert})")]
    RefusedByPeer { alert: String },
    #[error("tls handshake with {address} failed: {source}")]
    Handshake {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {address} within {after:?}")]
    Timeout { address: String, after: Duration },
    #[error("cannot build the TLS client")]
    Tls(#[from] TlsError),
}

/// The rustls error inside an I/O error from tokio-rustls.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Dials `host:port`, handshakes as `identity` expecting `domain` by `trust`, and waits a
/// moment for the peer to refuse our certificate (with TLS 1.3 a server does that after the
/// client's handshake is done). `timeout` bounds each step.
pub async fn check_peer(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    domain: &ProviderDomain,
    host: &str,
    port: u16,
    alpn: Vec<Vec<u8>>,
    timeout: Duration,
) -> Result<PeerCheck, CheckError> {
    let address = format!("{host}:{port}");
    let timed_out = || CheckError::Timeout {
        address: address.clone(),
        after: timeout,
    };
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(source)) => {
                return Err(CheckError::Resolve {
                    address: address.clone(),
                    source,
                });
            }
            Ok(Ok(a)) => a.collect(),
        };
    let mut last = None;
    let mut tcp = None;
    let mut connect_time = Duration::ZERO;
    for addr in addrs {
        let started = Instant::now();
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                connect_time = started.elapsed();
                tcp = Some((s, addr));
                break;
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
        }
    }
    let Some((tcp, addr)) = tcp else {
        return Err(CheckError::Connect {
            address,
            source: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
        });
    };

    let slot = Arc::new(Mutex::new(None));
    let config = crate::client_config_with(identity, trust, alpn, Some(slot.clone()))?;
    let name = ServerName::try_from(domain.as_str().to_owned()).map_err(|_| {
        CheckError::Untrusted(TrustFailure::NotConfigured {
            domain: domain.clone(),
        })
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => return Err(timed_out()),
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => {
            if let Some(failure) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                return Err(CheckError::Untrusted(failure));
            }
            if let Some(rustls::Error::AlertReceived(alert)) = rustls_error(&source) {
                return Err(CheckError::RefusedByPeer {
                    alert: format!("{alert:?}"),
                });
            }
            return Err(CheckError::Handshake { address, source });
        }
    };
    // A refusal of our certificate arrives as an alert right after our Finished; silence or
    // application data means it was accepted.
    let settle = (timeout / 4).min(Duration::from_secs(1));
    let mut buf = [0u8; 1];
    if let Ok(Err(e)) = tokio::time::timeout(settle, tls.read(&mut buf)).await
        && let Some(rustls::Error::AlertReceived(alert)) = rustls_error(&e)
    {
        return Err(CheckError::RefusedByPeer {
            alert: format!("{alert:?}"),
        });
    }
    let conn = tls.get_ref().1;
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    // The handshake passed the same checks; this names how.
    let mode = trust
        .verify_server(domain, &chain, UnixTime::now())
        .map_err(CheckError::Untrusted)?;
    let now = UnixTime::now().as_secs() as i64;
    let days_left = chain
        .first()
        .and_then(|c| Validity::of(c))
        .map(|v| v.days_left(now));
    Ok(PeerCheck {
        domain: domain.clone(),
        mode,
        addr,
        alpn,
        days_left,
        chain,
        connect_time,
    })
}

/// Records why a client config built by [`recording_client_config`] refused a server.
#[derive(Clone, Debug, Default)]
pub struct RefusalRecord(crate::FailureSlot);

impl RefusalRecord {
    /// The last refusal since the previous call, if any.
    pub fn take(&self) -> Option<TrustFailure> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// [`crate::client_config`], whose verifier also records why it refused a server: for
/// transports whose handshake errors carry only the TLS alert (QUIC), so a tool can still say
/// which check failed.
pub fn recording_client_config(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    alpn: Vec<Vec<u8>>,
) -> Result<(Arc<rustls::ClientConfig>, RefusalRecord), TlsError> {
    let record = RefusalRecord::default();
    let config = crate::client_config_with(identity, trust, alpn, Some(record.0.clone()))?;
    Ok((config, record))
}
