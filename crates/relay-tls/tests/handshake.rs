//! Mutual-TLS handshakes between generated identities over an in-memory pipe.

use std::sync::Arc;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_tls::{
    PeerTrust, TlsError, TlsIdentity, client_config, generate, peer_domain, server_config,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ALPN: &[u8] = b"test/1";

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("valid test domain")
}

fn identity(name: &str) -> TlsIdentity {
    let d = domain(name);
    let g = generate(&d).expect("generate");
    TlsIdentity::from_pem(d, &g.cert_pem, &g.key_pem).expect("identity")
}

fn leaf(id: &TlsIdentity) -> CertificateDer<'static> {
    id.cert().expect("has a certificate").clone()
}

/// Runs one handshake; returns (server side result with the client's chain, client result).
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    dial: &str,
) -> (
    Result<Vec<CertificateDer<'static>>, std::io::Error>,
    Result<(), std::io::Error>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(dial.to_owned()).expect("server name");
    let srv = async move {
        let mut tls = TlsAcceptor::from(server).accept(a).await?;
        let chain = tls.get_ref().1.peer_certificates().unwrap_or(&[]).to_vec();
        // One application round trip, so the client learns about a late rejection.
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok(chain)
    };
    let cli = async move {
        let mut tls = TlsConnector::from(client).connect(name, b).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN));
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(srv, cli) })
        .await
        .expect("handshake did not hang")
}

#[tokio::test]
async fn mutual_handshake_succeeds_and_names_the_client() {
    let a = identity("a.example");
    let b = identity("b.example");
    let mut a_trust = PeerTrust::new();
    a_trust.add(domain("b.example"), leaf(&b));
    let mut b_trust = PeerTrust::new();
    b_trust.add(domain("a.example"), leaf(&a));

    let server = server_config(&a, &a_trust, vec![ALPN.to_vec()]).expect("server config");
    let client = client_config(&b, &b_trust, vec![ALPN.to_vec()]).expect("client config");
    let (srv, cli) = handshake(server, client, "a.example").await;
    cli.expect("client side ok");
    let chain = srv.expect("server side ok");
    assert_eq!(
        peer_domain(&a_trust, &chain).expect("known peer"),
        domain("b.example")
    );
}

#[tokio::test]
async fn untrusted_client_certificate_is_refused() {
    let a = identity("a.example");
    let b = identity("b.example");
    let mallory = identity("b.example"); // claims b's name with another key
    let mut a_trust = PeerTrust::new();
    a_trust.add(domain("b.example"), leaf(&b));
    let mut m_trust = PeerTrust::new();
    m_trust.add(domain("a.example"), leaf(&a));

    let server = server_config(&a, &a_trust, vec![ALPN.to_vec()]).expect("server config");
    let client = client_config(&mallory, &m_trust, vec![ALPN.to_vec()]).expect("client config");
    let (srv, cli) = handshake(server, client, "a.example").await;
    let err = srv.expect_err("server must refuse the client");
    assert!(
        err.to_string().contains("ApplicationVerificationFailure"),
        "{err}"
    );
    assert!(cli.is_err(), "client must see the refusal");
}

#[tokio::test]
async fn server_certificate_pinned_for_another_domain_is_refused() {
    let a = identity("a.example");
    let c = identity("c.example");
    let b = identity("b.example");
    let mut a_trust = PeerTrust::new();
    a_trust.add(domain("b.example"), leaf(&b));
    // b pins a's certificate for c.example only, and c's for a.example.
    let mut b_trust = PeerTrust::new();
    b_trust.add(domain("c.example"), leaf(&a));
    b_trust.add(domain("a.example"), leaf(&c));

    let server = server_config(&a, &a_trust, vec![ALPN.to_vec()]).expect("server config");
    let client = client_config(&b, &b_trust, vec![ALPN.to_vec()]).expect("client config");
    let (srv, cli) = handshake(server, client, "a.example").await;
    let err = cli.expect_err("client must refuse the server");
    assert!(
        err.to_string().contains("ApplicationVerificationFailure"),
        "{err}"
    );
    assert!(srv.is_err());
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let a = identity("a.example");
    let d = domain("b.example");
    let mut params = rcgen::CertificateParams::new(vec![d.as_str().to_owned()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let old =
        TlsIdentity::from_pem(d.clone(), &cert.pem(), &key.serialize_pem()).expect("identity");

    let mut a_trust = PeerTrust::new();
    a_trust.add(d, leaf(&old));
    let mut old_trust = PeerTrust::new();
    old_trust.add(domain("a.example"), leaf(&a));
    let server = server_config(&a, &a_trust, vec![ALPN.to_vec()]).expect("server config");
    let client = client_config(&old, &old_trust, vec![ALPN.to_vec()]).expect("client config");
    let (srv, _) = handshake(server, client, "a.example").await;
    let err = srv.expect_err("expired client certificate");
    assert!(err.to_string().contains("Expired"), "{err}");
}

#[test]
fn peer_domain_cases() {
    let a = identity("a.example");
    let b = identity("b.example");
    let mut trust = PeerTrust::new();
    trust.add(domain("a.example"), leaf(&a));
    trust.add(domain("b.example"), leaf(&b));
    assert_eq!(
        peer_domain(&trust, &[leaf(&a)]).expect("a"),
        domain("a.example")
    );
    assert_eq!(
        peer_domain(&trust, &[leaf(&b)]).expect("b"),
        domain("b.example")
    );
    assert!(matches!(
        peer_domain(&trust, &[]),
        Err(TlsError::NoPeerCertificate)
    ));
    let c = identity("c.example");
    assert!(matches!(
        peer_domain(&trust, &[leaf(&c)]),
        Err(TlsError::UntrustedPeer)
    ));
    trust.add(domain("z.example"), leaf(&a));
    assert!(matches!(
        peer_domain(&trust, &[leaf(&a)]),
        Err(TlsError::AmbiguousPeer { .. })
    ));
}

#[test]
fn load_from_files_and_name_the_path_on_errors() {
    let d = domain("files.example");
    let g = generate(&d).expect("generate");
    let dir = std::env::temp_dir().join(format!("relay-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &g.cert_pem).expect("write cert");
    std::fs::write(&key, &g.key_pem).expect("write key");

    let id = TlsIdentity::load(d.clone(), &cert, &key).expect("load");
    let mut trust = PeerTrust::new();
    trust.load_pem(d.clone(), &cert).expect("load pin");
    assert_eq!(trust.pinned(&d), &id.cert_chain[..1]);

    let missing = dir.join("missing.pem");
    let err = TlsIdentity::load(d.clone(), &missing, &key).expect_err("missing file");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // A key file given as the certificate: no certificate in it.
    let err = TlsIdentity::load(d.clone(), &key, &key).expect_err("no cert");
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("key.pem"), "{err}");
    let err = trust.load_pem(d.clone(), &key).expect_err("no cert");
    assert!(err.to_string().contains("key.pem"), "{err}");

    // Another identity's key does not match the certificate.
    let other = generate(&d).expect("generate");
    let err = TlsIdentity::from_pem(d, &g.cert_pem, &other.key_pem).expect_err("mismatch");
    assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
