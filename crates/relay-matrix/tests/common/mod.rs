//! Two Matrix adapters on loopback with generated certificates, and a recording inbound.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::Inbound;
use relay_core::transport::{Request, Response, Status, TransmitId, TransportError};
use relay_matrix::{MatrixConfig, MatrixPeer, MatrixTransport, ReceivedEdu, SigningKey};
use relay_tls::{PeerTrust, TlsIdentity};
use tokio::sync::mpsc;

pub type Outcomes = Arc<Mutex<Vec<(TransmitId, Result<Response, TransportError>)>>>;

/// Records what arrives; answers `/notify` 201 with `next_seq = seq + 1`, others 200 echoing
/// the body's length.
#[derive(Clone, Default)]
pub struct Recorder {
    pub requests: Arc<Mutex<Vec<Request>>>,
    pub outcomes: Outcomes,
    pub probes: Arc<Mutex<Vec<(ProviderDomain, bool)>>>,
}

impl Inbound for Recorder {
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send {
        let reply = match request.seq {
            Some(s) => {
                let mut r = Response::new(Status::Created, Bytes::new());
                r.next_seq = Some(s + 1);
                r
            }
            None => Response::new(Status::Ok, Bytes::from(request.body.len().to_string())),
        };
        self.requests.lock().unwrap().push(request);
        async move { reply }
    }
    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        self.outcomes.lock().unwrap().push((id, outcome));
    }
    fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
        self.probes.lock().unwrap().push((peer, alive));
    }
}

pub struct Side {
    pub domain: ProviderDomain,
    pub transport: MatrixTransport,
    pub addr: SocketAddr,
    pub rec: Recorder,
    pub key_seed: [u8; 32],
    pub cert_pem: String,
    pub key_pem: String,
    pub edus: mpsc::UnboundedReceiver<ReceivedEdu>,
}

pub fn domain(s: &str) -> ProviderDomain {
    s.parse().unwrap()
}

pub fn identity(d: &ProviderDomain, g: &relay_tls::GeneratedCert) -> TlsIdentity {
    TlsIdentity::from_pem(d.clone(), &g.cert_pem, &g.key_pem).unwrap()
}

/// Starts `a.example` and `b.example`, each the other's peer.
pub async fn pair() -> (Side, Side) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (da, db) = (domain("a.example"), domain("b.example"));
    let (ga, gb) = (
        relay_tls::generate(&da).unwrap(),
        relay_tls::generate(&db).unwrap(),
    );
    // Reserve ports first so each side can name the other's address.
    let la = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lb = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    drop((la, lb));
    let a = start(&da, &ga, aa, &db, &gb, ab, [1; 32]).await;
    let b = start(&db, &gb, ab, &da, &ga, aa, [2; 32]).await;
    (a, b)
}

pub async fn start(
    d: &ProviderDomain,
    g: &relay_tls::GeneratedCert,
    listen: SocketAddr,
    peer: &ProviderDomain,
    pg: &relay_tls::GeneratedCert,
    peer_addr: SocketAddr,
    seed: [u8; 32],
) -> Side {
    start_with(
        d,
        g,
        listen,
        &[(peer, pg, peer_addr)],
        seed,
        Default::default(),
    )
    .await
}

/// Starts `d` with several peers and the given budgets.
pub async fn start_with(
    d: &ProviderDomain,
    g: &relay_tls::GeneratedCert,
    listen: SocketAddr,
    peers: &[(&ProviderDomain, &relay_tls::GeneratedCert, SocketAddr)],
    seed: [u8; 32],
    adapter: relay_adapter::AdapterContext,
) -> Side {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut trust = PeerTrust::new();
    for (peer, pg, _) in peers {
        trust.add_pem((*peer).clone(), &pg.cert_pem).unwrap();
    }
    let (sink, edus) = mpsc::unbounded_channel();
    let rec = Recorder::default();
    let cfg = MatrixConfig {
        identity: identity(d, g),
        trust,
        signing_key: SigningKey::from_seed(seed).unwrap(),
        server_name: d.to_string(),
        listen,
        peers: peers
            .iter()
            .map(|(peer, _, addr)| {
                (
                    (*peer).clone(),
                    MatrixPeer {
                        server_name: peer.to_string(),
                        addr: (*addr).into(),
                    },
                )
            })
            .collect(),
        request_timeout: Duration::from_secs(5),
        edu_sink: Some(sink),
        adapter,
    };
    let (transport, addr) = MatrixTransport::start(cfg, rec.clone()).await.unwrap();
    Side {
        domain: d.clone(),
        transport,
        addr,
        rec,
        key_seed: seed,
        cert_pem: g.cert_pem.clone(),
        key_pem: g.key_pem.clone(),
        edus,
    }
}

/// Waits until `f` holds, or panics after 10 s.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
