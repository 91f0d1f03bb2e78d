//! A node's TLS from its files: CA-issued identity, pinned peers, reload (what SIGHUP calls)
//! and the days-left metric.

use std::path::Path;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_node::{Node, NodeConfig};
use relay_tls::check::{CheckError, check_peer};
use relay_tls::{LocalCa, PeerTrust, TlsIdentity, TrustFailure, TrustMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("domain")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

fn config(dir: &Path) -> NodeConfig {
    let text = r#"
[node]
domain = "a.example"
data_dir = "data"
admin = "127.0.0.1:0"
store = "memory"
[tls]
cert = "a.crt"
key = "a.key"
[listen]
https = "127.0.0.1:0"
[[peers]]
domain = "b.example"
transport = "https"
address = "localhost:9"
cert = "b.crt"
"#;
    NodeConfig::parse(&dir.join("a.toml"), text).expect("config")
}

fn trusting_ca(ca: &LocalCa) -> PeerTrust {
    let mut t = PeerTrust::new();
    t.add_ca_pem(domain("a.example"), &ca.cert_pem).expect("ca");
    t
}

fn self_signed(d: &str) -> (relay_tls::GeneratedCert, TlsIdentity) {
    let g = relay_tls::generate(&domain(d)).expect("generate");
    let id = TlsIdentity::from_pem(domain(d), &g.cert_pem, &g.key_pem).expect("identity");
    (g, id)
}

async fn dial(
    b: &TlsIdentity,
    trust: &PeerTrust,
    port: u16,
) -> Result<relay_tls::check::PeerCheck, CheckError> {
    check_peer(
        b,
        trust,
        &domain("a.example"),
        "127.0.0.1",
        port,
        vec![b"h2".to_vec()],
        Duration::from_secs(5),
    )
    .await
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("response");
    text
}

#[tokio::test]
async fn reload_switches_certificates_and_keeps_them_on_a_bad_file() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca1 = LocalCa::generate("First CA").expect("ca");
    let ca2 = LocalCa::generate("Second CA").expect("ca");
    let a1 = ca1.issue(&domain("a.example")).expect("issue");
    write(dir.path(), "a.crt", &a1.cert_pem);
    write(dir.path(), "a.key", &a1.key_pem);
    let (b_old, b_old_id) = self_signed("b.example");
    write(dir.path(), "b.crt", &b_old.cert_pem);

    let node = Node::start(config(dir.path())).await.expect("node starts");
    let port = node.listening[&relay_core::TransportKind::Https].port();

    let ok = dial(&b_old_id, &trusting_ca(&ca1), port)
        .await
        .expect("CA-issued identity verified by its CA");
    assert_eq!(ok.mode, TrustMode::Ca);

    // Our certificate is replaced by one from another CA: new handshakes present it.
    let a2 = ca2.issue(&domain("a.example")).expect("issue");
    write(dir.path(), "a.crt", &a2.cert_pem);
    write(dir.path(), "a.key", &a2.key_pem);
    node.reload_tls().expect("reload");
    match dial(&b_old_id, &trusting_ca(&ca1), port).await {
        Err(CheckError::Untrusted(TrustFailure::UnknownIssuer { .. })) => {}
        other => panic!("the old CA must no longer verify us: {other:?}"),
    }
    dial(&b_old_id, &trusting_ca(&ca2), port)
        .await
        .expect("the new certificate is presented");

    // A broken file: the reload fails, names the file, and the node keeps what it had.
    write(dir.path(), "a.crt", "not a certificate");
    let err = node.reload_tls().expect_err("bad file");
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("a.crt"), "{text}");
    dial(&b_old_id, &trusting_ca(&ca2), port)
        .await
        .expect("still the certificate from before the bad reload");
    write(dir.path(), "a.crt", &a2.cert_pem);

    // The peer's pinned certificate changes: its old one is refused, the new one accepted.
    let (b_new, b_new_id) = self_signed("b.example");
    write(dir.path(), "b.crt", &b_new.cert_pem);
    node.reload_tls().expect("reload");
    match dial(&b_old_id, &trusting_ca(&ca2), port).await {
        Err(CheckError::RefusedByPeer { .. }) => {}
        other => panic!("the old pin must be gone: {other:?}"),
    }
    dial(&b_new_id, &trusting_ca(&ca2), port)
        .await
        .expect("the new pin is accepted");

    let text = metrics(node.admin).await;
    let own = text
        .lines()
        .find(|l| l.starts_with("mimi_relay_tls_cert_days_left{cert=\"own\",domain=\"a.example\"}"))
        .unwrap_or_else(|| panic!("own certificate gauge missing:\n{text}"));
    let days: i64 = own
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number of days");
    let expected = relay_tls::Validity::of(
        TlsIdentity::from_pem(domain("a.example"), &a2.cert_pem, &a2.key_pem)
            .expect("id")
            .cert()
            .expect("cert"),
    )
    .expect("validity")
    .days_left(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64,
    );
    assert!((days - expected).abs() <= 1, "{days} vs {expected}");
    assert!(
        text.contains("mimi_relay_tls_cert_days_left{cert=\"pinned\",domain=\"b.example\"}"),
        "{text}"
    );
    node.shutdown().await.expect("shutdown");
}
