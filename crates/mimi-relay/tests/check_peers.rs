//! `mimi-relay check-peers` against loopback peers, each broken in one way, and real nodes
//! (HTTPS and QUIC) started in-process as the healthy ones. Certificates come from rcgen.

use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::http;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mimi_relay::check_peers::{CheckOptions, FaultKind, Report, run};
use mimi_wire::uri::ProviderDomain;
use relay_core::TransportKind;
use relay_node::{Node, NodeConfig};
use relay_tls::{PeerTrust, TlsIdentity};

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("domain")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

/// A test CA and what signs with it.
struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("ca");
        Ca {
            cert,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// (cert PEM, key PEM) for `san`, valid from year `from` to year `to`.
    fn leaf(&self, san: &str, from: i32, to: i32) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec![san.to_owned()]).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, san);
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }
}

type Handler = fn(&http::Method, &str) -> (u16, &'static str);

/// A loopback HTTPS server (HTTP/1.1 and HTTP/2, mutual TLS trusting `client`'s pinned
/// certificate) presenting `leaf` as `as_domain`, answering every request with `handler`.
async fn serve(
    as_domain: &str,
    leaf: &(String, String),
    client_pem: &str,
    handler: Handler,
) -> u16 {
    let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    serve_with(alpn, as_domain, leaf, client_pem, handler).await
}

/// [`serve`], offering `alpn` (none: HTTP/1.1 only, as some hubs do).
async fn serve_with(
    alpn: Vec<Vec<u8>>,
    as_domain: &str,
    leaf: &(String, String),
    client_pem: &str,
    handler: Handler,
) -> u16 {
    let id = TlsIdentity::from_pem(domain(as_domain), &leaf.0, &leaf.1).expect("identity");
    let mut trust = PeerTrust::new();
    trust
        .add_pem(domain("a.example"), client_pem)
        .expect("pin the checker");
    let config = relay_tls::server_config(&id, &trust, alpn).expect("server config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (status, body) = handler(req.method(), req.uri().path());
                    async move {
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *resp.status_mut() =
                            http::StatusCode::from_u16(status).expect("status code");
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

fn not_found(_: &http::Method, _: &str) -> (u16, &'static str) {
    (404, "not found")
}

/// A draft-only hub with its own paths, no submitMessage, and no sequence extension: an empty
/// /notify is malformed to it.
fn partial(method: &http::Method, path: &str) -> (u16, &'static str) {
    match (method.as_str(), path) {
        ("GET", "/.well-known/mimi-protocol-directory") => (
            200,
            r#"{"notify":"https://partial.example/mimi/notify/{roomId}",
                "update":"/mimi/update/{roomId}",
                "groupInfo":"/mimi/groupInfo/{roomId}",
                "keyMaterial":"/mimi/keyMaterial/{targetUser}"}"#,
        ),
        ("POST", p) if p.starts_with("/mimi/notify/") => (400, "empty body"),
        _ => (404, "not found"),
    }
}

/// A port with nothing listening on it.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

/// A real node for `d`, listening on `transport`, trusting a.example by its pinned `a.crt`,
/// following a.example's room.
async fn node(dir: &Path, d: &str, transport: &str, cert: &(String, String)) -> Node {
    write(dir, &format!("{d}.crt"), &cert.0);
    write(dir, &format!("{d}.key"), &cert.1);
    let text = format!(
        r#"
[node]
domain = "{d}"
data_dir = "data-{d}"
admin = "127.0.0.1:0"
store = "memory"
follows = ["mimi://a.example/r/x"]
[tls]
cert = "{d}.crt"
key = "{d}.key"
[listen]
{transport} = "127.0.0.1:0"
[[peers]]
domain = "a.example"
transport = "{transport}"
address = "127.0.0.1:9"
cert = "a.crt"
"#
    );
    let cfg = NodeConfig::parse(&dir.join(format!("{d}.toml")), &text).expect("node config");
    Node::start(cfg).await.expect("node starts")
}

struct Setup {
    _dir: tempfile::TempDir,
    _nodes: Vec<Node>,
    /// a.example's config with every peer, and with the healthy ones only.
    all: std::path::PathBuf,
    healthy: std::path::PathBuf,
}

async fn setup() -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    let ca = Ca::new("Peers CA");
    let wrong = Ca::new("Some Other CA");
    write(p, "ca.crt", &ca.cert.pem());
    write(p, "wrong-ca.crt", &wrong.cert.pem());
    let a = relay_tls::generate(&domain("a.example")).expect("a");
    write(p, "a.crt", &a.cert_pem);
    write(p, "a.key", &a.key_pem);

    let wrongca = serve(
        "wrongca.example",
        &ca.leaf("wrongca.example", 2020, 2090),
        &a.cert_pem,
        not_found,
    )
    .await;
    let foreign = serve(
        "foreign.example",
        &ca.leaf("c.example", 2020, 2090),
        &a.cert_pem,
        not_found,
    )
    .await;
    let expired = serve(
        "expired.example",
        &ca.leaf("expired.example", 2000, 2001),
        &a.cert_pem,
        not_found,
    )
    .await;
    let nodir = serve(
        "nodir.example",
        &ca.leaf("nodir.example", 2020, 2090),
        &a.cert_pem,
        not_found,
    )
    .await;
    let part = serve_with(
        Vec::new(),
        "partial.example",
        &ca.leaf("partial.example", 2020, 2090),
        &a.cert_pem,
        partial,
    )
    .await;
    let down = closed_port().await;
    // Trusts someone else as a.example: refuses our client certificate.
    let stranger = relay_tls::generate(&domain("a.example")).expect("stranger");
    let refuses = serve(
        "refuses.example",
        &ca.leaf("refuses.example", 2020, 2090),
        &stranger.cert_pem,
        not_found,
    )
    .await;
    let qdown = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();

    let b = node(p, "b.example", "https", &ca.leaf("b.example", 2020, 2090)).await;
    let b_port = b.listening[&TransportKind::Https].port();
    let q = relay_tls::generate(&domain("q.example")).expect("q");
    let q_node = node(p, "q.example", "quic", &(q.cert_pem, q.key_pem)).await;
    let q_port = q_node.listening[&TransportKind::Quic].port();
    // A QUIC node whose certificate is not the one pinned for it.
    let qpin = relay_tls::generate(&domain("qpin.example")).expect("qpin");
    let qpin_node = node(p, "qpin.example", "quic", &(qpin.cert_pem, qpin.key_pem)).await;
    let qpin_port = qpin_node.listening[&TransportKind::Quic].port();
    let old = relay_tls::generate(&domain("qpin.example")).expect("old pin");
    write(p, "qpin-old.crt", &old.cert_pem);

    let head = r#"
[node]
domain = "a.example"
data_dir = "data-a"
admin = "127.0.0.1:0"
store = "memory"
[tls]
cert = "a.crt"
key = "a.key"
[listen]
https = "127.0.0.1:0"
quic = "127.0.0.1:0"
"#;
    let peer = |d: &str, t: &str, port: u16, trust: &str| {
        format!(
            "[[peers]]\ndomain = \"{d}\"\ntransport = \"{t}\"\naddress = \"localhost:{port}\"\n{trust}\n"
        )
    };
    let healthy = format!(
        "{head}{}{}[[rooms]]\nid = \"mimi://a.example/r/x\"\nfollowers = [\"b.example\"]\n",
        peer("b.example", "https", b_port, "ca = \"ca.crt\""),
        peer("q.example", "quic", q_port, "cert = \"q.example.crt\""),
    );
    let mut all = head.to_owned();
    for (d, port, trust) in [
        ("b.example", b_port, "ca = \"ca.crt\""),
        ("wrongca.example", wrongca, "ca = \"wrong-ca.crt\""),
        ("foreign.example", foreign, "ca = \"ca.crt\""),
        ("expired.example", expired, "ca = \"ca.crt\""),
        ("nodir.example", nodir, "ca = \"ca.crt\""),
        ("partial.example", part, "ca = \"ca.crt\""),
        ("down.example", down, "ca = \"ca.crt\""),
        ("refuses.example", refuses, "ca = \"ca.crt\""),
    ] {
        all.push_str(&peer(d, "https", port, trust));
    }
    for (d, port, trust) in [
        ("q.example", q_port, "cert = \"q.example.crt\""),
        ("qpin.example", qpin_port, "cert = \"qpin-old.crt\""),
        ("qdown.example", qdown, "cert = \"q.example.crt\""),
    ] {
        all.push_str(&peer(d, "quic", port, trust));
    }
    all.push_str(
        "[[rooms]]\nid = \"mimi://a.example/r/x\"\nfollowers = [\"b.example\", \"partial.example\"]\n",
    );
    write(p, "a.toml", &all);
    write(p, "a-healthy.toml", &healthy);
    Setup {
        all: p.join("a.toml"),
        healthy: p.join("a-healthy.toml"),
        _dir: dir,
        _nodes: vec![b, q_node, qpin_node],
    }
}

fn opts() -> CheckOptions {
    CheckOptions {
        timeout: Duration::from_secs(3),
    }
}

fn faults(r: &Report, d: &str) -> Vec<FaultKind> {
    r.peer(d)
        .unwrap_or_else(|| panic!("{d} in the report"))
        .faults
        .iter()
        .map(|f| f.kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_is_named_and_healthy_peers_pass() {
    let s = setup().await;
    let cfg = NodeConfig::load(&s.all).expect("config");
    let report = run(&cfg, opts()).await.expect("report");
    let text = report.render();

    assert_eq!(
        faults(&report, "wrongca.example"),
        [FaultKind::WrongCa],
        "{text}"
    );
    assert_eq!(
        faults(&report, "foreign.example"),
        [FaultKind::WrongName],
        "{text}"
    );
    assert_eq!(
        faults(&report, "expired.example"),
        [FaultKind::Expired],
        "{text}"
    );
    assert_eq!(
        faults(&report, "nodir.example"),
        [FaultKind::NoDirectory],
        "{text}"
    );
    assert_eq!(
        faults(&report, "partial.example"),
        [FaultKind::EndpointMissing],
        "{text}"
    );
    assert_eq!(
        faults(&report, "down.example"),
        [FaultKind::PeerDown],
        "{text}"
    );
    assert_eq!(
        faults(&report, "refuses.example"),
        [FaultKind::RefusedByPeer],
        "{text}"
    );
    // Over QUIC: a pin that is not the peer's certificate, and nobody answering.
    assert_eq!(
        faults(&report, "qpin.example"),
        [FaultKind::PinMismatch],
        "{text}"
    );
    assert_eq!(
        faults(&report, "qdown.example"),
        [FaultKind::PeerDown],
        "{text}"
    );
    // Nothing said over a connection that never was.
    assert_eq!(
        report.peer("qdown.example").map(|p| p.sequence.speaks),
        Some("unknown")
    );
    assert!(!report.is_ok());

    // The faults say what is wrong in words that point at the fix.
    let msg = |d: &str| report.peer(d).expect("peer").faults[0].message.clone();
    assert!(
        msg("wrongca.example").contains("wrong-ca.crt\" did not issue it"),
        "{text}"
    );
    assert!(
        msg("foreign.example").contains("is for c.example"),
        "{text}"
    );
    assert!(
        msg("expired.example").contains("expired on 2001-01-01"),
        "{text}"
    );
    assert!(msg("partial.example").contains("submitMessage"), "{text}");
    assert!(!msg("partial.example").contains("notify"), "{text}");

    // The directory with its own paths is read as the node reads it.
    let partial = report.peer("partial.example").expect("partial");
    // A hub offering no ALPN is read over HTTP/1.1.
    assert_eq!(partial.http.as_deref(), Some("1.1"), "{text}");
    assert_eq!(partial.identity.as_ref().and_then(|i| i.alpn.clone()), None);
    let dir = partial.directory.as_ref().expect("directory read");
    assert!(dir.served);
    assert_eq!(
        dir.endpoints.get("notify").map(String::as_str),
        Some("https://partial.example/mimi/notify/{param}")
    );
    assert!(dir.missing.contains(&"submitMessage".to_owned()));
    // Its empty /notify was refused without MIMI-Next-Seq: the draft's rules only.
    assert_eq!(partial.sequence.speaks, "no", "{text}");
    let nodir = report.peer("nodir.example").expect("nodir");
    assert!(!nodir.directory.as_ref().expect("reported").served);
    // No room hosted here has it as follower: nothing probed, and it says so.
    assert_eq!(nodir.sequence.speaks, "unknown");

    // A real node over HTTPS: verified by the CA, its directory complete, the extension
    // spoken.
    let b = report.peer("b.example").expect("b");
    assert!(b.is_ok(), "{text}");
    let id = b.identity.as_ref().expect("verified");
    assert_eq!(id.mode, "ca");
    assert_eq!(id.alpn.as_deref(), Some("h2"));
    assert!(id.days_left.is_some_and(|d| d > 365), "{text}");
    assert_eq!(b.http.as_deref(), Some("2"));
    let dir = b.directory.as_ref().expect("directory");
    assert!(
        dir.served && dir.missing.is_empty() && dir.unusable.is_empty(),
        "{text}"
    );
    assert_eq!(dir.endpoints.len(), 10);
    assert_eq!(b.sequence.speaks, "yes", "{text}");
    assert!(b.rtt_ms.is_some());

    // A real node over QUIC, pinned.
    let q = report.peer("q.example").expect("q");
    assert!(q.is_ok(), "{text}");
    let id = q.identity.as_ref().expect("verified");
    assert_eq!(id.mode, "pinned");
    assert_eq!(id.alpn.as_deref(), Some("mimi-relay/1"));
    assert!(q.rtt_ms.is_some());

    // The text form names each peer and each fault kind.
    for needle in [
        "[wrong_ca]",
        "[wrong_name]",
        "[expired]",
        "[no_directory]",
        "[endpoint_missing]",
        "[peer_down]",
        "9 with faults",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_non_zero_on_a_fault_and_prints_json() {
    let s = setup().await;
    let bin = env!("CARGO_BIN_EXE_mimi-relay");
    let out = tokio::process::Command::new(bin)
        .args(["check-peers", "--json", "--timeout-ms", "3000", "--config"])
        .arg(&s.all)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let kinds: Vec<String> = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .flat_map(|p| p["faults"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f["kind"].as_str().map(str::to_owned))
        .collect();
    for k in [
        "wrong_ca",
        "wrong_name",
        "expired",
        "no_directory",
        "endpoint_missing",
        "peer_down",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} not in {kinds:?}");
    }

    let out = tokio::process::Command::new(bin)
        .args(["check-peers", "--config"])
        .arg(&s.healthy)
        .output()
        .await
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("2 OK, 0 with faults"), "{text}");
}
