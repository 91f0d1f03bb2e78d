//! Mutual TLS for mimi-relay, shared by the HTTPS, QUIC, XMPP and Matrix adapters and the
//! binary.
//!
//! Contract:
//! - Every provider has one certificate chain (self-signed from [`generate`], or a CA-issued
//!   leaf followed by its intermediates) and the matching private key: its [`TlsIdentity`]. It
//!   presents the whole chain both as a server and as a client.
//! - A node trusts each peer in one of three ways ([`TrustMode`], see [`trust`]): a pinned
//!   end-entity certificate whoever issued it, a CA bundle (webpki chain validation and the
//!   provider domain among the certificate's DNS names, RFC 9525), or the system roots.
//!   Validity periods are always checked.
//! - [`client_config`] accepts a server only if its certificate is trusted for the server name
//!   we dialled (the peer's provider domain). [`server_config`] requires a client certificate
//!   and accepts one that names a configured peer (its pin, or its DNS names) and passes that
//!   peer's trust; the adapter then calls [`peer_domain`] on the presented chain to learn
//!   which provider the connection authenticates.
//! - Reload without restart: [`TlsIdentity`] and [`PeerTrust`] are shared handles.
//!   [`TlsIdentity::replace`] and [`PeerTrust::replace`] swap what every config built from
//!   them uses from the next handshake on.
//! - [`check::check_peer`] dials a peer and says what identity was verified and how, or why
//!   not ([`TrustFailure`]), for an operator's tools.
//! - Configs are built on the ring provider explicitly; nothing here depends on a process-wide
//!   default provider. No early data / 0-RTT is enabled.

pub mod check;
pub mod trust;
pub mod validity;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use mimi_wire::uri::ProviderDomain;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

pub use trust::{PeerTrust, TrustFailure, TrustMode};
pub use validity::Validity;

/// Errors from loading identities and trust, generating certificates and building configs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid PEM in {origin}")]
    Pem {
        origin: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {origin}")]
    NoCertificate { origin: String },
    #[error("no private key found in {origin}")]
    NoPrivateKey { origin: String },
    #[error("the private key for {domain} is unusable or does not match its certificate")]
    BadKey {
        domain: ProviderDomain,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot generate a certificate for {domain}")]
    Generate {
        domain: ProviderDomain,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer certificate is not trusted for any configured provider")]
    UntrustedPeer,
    #[error("the peer certificate does not name {expected}")]
    WrongPeer { expected: ProviderDomain },
    #[error("{origin} holds a certificate that cannot be a CA trust anchor: {reason}")]
    BadCa { origin: String, reason: String },
    #[error("no usable system root certificates were found ({reason})")]
    NoSystemRoots { reason: String },
    #[error(
        "the new certificate is for {new}, not {old}: the node's domain cannot change on reload"
    )]
    DomainChanged {
        old: ProviderDomain,
        new: ProviderDomain,
    },
    #[error("the peer certificate is pinned for more than one provider ({first} and {second})")]
    AmbiguousPeer {
        first: ProviderDomain,
        second: ProviderDomain,
    },
}

/// Where PEM text came from, for error messages.
fn origin(path: Option<&Path>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "PEM text".to_owned(),
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_certs(pem: &str, path: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            origin: origin(path),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            origin: origin(path),
        });
    }
    Ok(certs)
}

fn parse_key(pem: &str, path: Option<&Path>) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            origin: origin(path),
        },
        source => TlsError::Pem {
            origin: origin(path),
            source,
        },
    })
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This provider's own certificate chain and private key. Clones share what handshakes
/// present, which [`TlsIdentity::replace`] swaps.
pub struct TlsIdentity {
    pub domain: ProviderDomain,
    /// End-entity certificate first, as loaded; after a [`TlsIdentity::replace`] handshakes
    /// present [`TlsIdentity::current_chain`].
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The key as loaded (see `cert_chain`).
    pub key: PrivateKeyDer<'static>,
    live: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl TlsIdentity {
    /// Loads the identity from a PEM certificate chain file and a PEM private key file
    /// (PKCS#8, SEC1 or PKCS#1).
    pub fn load(
        domain: ProviderDomain,
        cert_pem_path: impl AsRef<Path>,
        key_pem_path: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (cert_pem_path.as_ref(), key_pem_path.as_ref());
        let cert_chain = parse_certs(&read(cert_path)?, Some(cert_path))?;
        let key = parse_key(&read(key_path)?, Some(key_path))?;
        Self::checked(domain, cert_chain, key)
    }

    /// Builds the identity from PEM text.
    pub fn from_pem(
        domain: ProviderDomain,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, TlsError> {
        let cert_chain = parse_certs(cert_pem, None)?;
        let key = parse_key(key_pem, None)?;
        Self::checked(domain, cert_chain, key)
    }

    /// Fails early, at load time, on a key the provider cannot use or that does not belong to
    /// the certificate, instead of at the first handshake.
    fn checked(
        domain: ProviderDomain,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let certified =
            match CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider()) {
                Ok(c) => c,
                Err(source) => return Err(TlsError::BadKey { domain, source }),
            };
        Ok(TlsIdentity {
            domain,
            cert_chain,
            key,
            live: Arc::new(RwLock::new(Arc::new(certified))),
        })
    }

    /// The end-entity certificate as loaded, which peers pin.
    pub fn cert(&self) -> Option<&CertificateDer<'static>> {
        self.cert_chain.first()
    }

    fn certified(&self) -> Arc<CertifiedKey> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The chain handshakes present now (end-entity first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.certified().cert.clone()
    }

    /// Presents `new`'s chain and key from the next handshake on, in every config built from
    /// this identity or a clone of it. The domain cannot change.
    pub fn replace(&self, new: &TlsIdentity) -> Result<(), TlsError> {
        if new.domain != self.domain {
            return Err(TlsError::DomainChanged {
                old: self.domain.clone(),
                new: new.domain.clone(),
            });
        }
        let certified = new.certified();
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = certified;
        Ok(())
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            domain: self.domain.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            live: self.live.clone(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("domain", &self.domain)
            .field("cert_chain_len", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

/// A freshly generated self-signed certificate and its key, both PEM.
#[derive(Clone)]
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for GeneratedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Generates a self-signed ECDSA P-256 certificate for `domain` (SAN dNSName = domain, not a
/// CA, rcgen's default validity).
pub fn generate(domain: &ProviderDomain) -> Result<GeneratedCert, TlsError> {
    leaf(domain, |params, key| params.self_signed(key))
}

/// An end-entity certificate for `domain` (SAN dNSName = domain, CN = domain, not a CA) with
/// a fresh P-256 key, completed and signed by `sign`.
fn leaf(
    domain: &ProviderDomain,
    sign: impl FnOnce(
        rcgen::CertificateParams,
        &rcgen::KeyPair,
    ) -> Result<rcgen::Certificate, rcgen::Error>,
) -> Result<GeneratedCert, TlsError> {
    let err = |source| TlsError::Generate {
        domain: domain.clone(),
        source,
    };
    let mut params =
        rcgen::CertificateParams::new(vec![domain.as_str().to_owned()]).map_err(err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, domain.as_str());
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let cert = sign(params, &key).map_err(err)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A local certificate authority, for setups that want to try `ca` trust without a public CA.
pub struct LocalCa {
    /// The CA certificate peers configure as `ca`.
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

impl LocalCa {
    /// A new CA named `name` (ECDSA P-256; it may sign end-entity certificates only).
    pub fn generate(name: &str) -> Result<LocalCa, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(LocalCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// Issues a certificate for `domain` (SAN dNSName = domain, for TLS server and client
    /// use). Its PEM holds the end-entity certificate only: the CA is what peers configure.
    pub fn issue(&self, domain: &ProviderDomain) -> Result<GeneratedCert, TlsError> {
        leaf(domain, |mut params, key| {
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.signed_by(key, &self.issuer)
        })
    }
}

/// Which provider a peer's certificate chain authenticates, once the handshake's verifier
/// accepted it: the peer it is pinned for, or the one configured peer trusted by CA or system
/// roots whose domain is among its DNS names.
pub fn peer_domain(
    trust: &PeerTrust,
    presented: &[CertificateDer<'_>],
) -> Result<ProviderDomain, TlsError> {
    let end_entity = presented.first().ok_or(TlsError::NoPeerCertificate)?;
    trust.snapshot().peer_domain(end_entity)
}

/// That a server's chain, once the handshake's verifier accepted it, names the peer we
/// dialled: its pin, or (CA and system roots) its DNS names. A certificate valid for several
/// peers is fine here, unlike in [`peer_domain`]: we know whom we dialled.
pub fn server_is(
    trust: &PeerTrust,
    expected: &ProviderDomain,
    presented: &[CertificateDer<'_>],
) -> Result<(), TlsError> {
    let end_entity = presented.first().ok_or(TlsError::NoPeerCertificate)?;
    if trust.snapshot().names(expected, end_entity) {
        Ok(())
    } else {
        Err(TlsError::WrongPeer {
            expected: expected.clone(),
        })
    }
}

/// Presents the identity current at each handshake.
#[derive(Debug)]
struct LiveCert(Arc<RwLock<Arc<CertifiedKey>>>);

impl LiveCert {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for LiveCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side of the same rule as the client's `Resumption::disabled` (see `client_config_with`).
fn no_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// A server configuration presenting `identity` and requiring a client certificate trusted
/// for some peer in `trust`.
pub fn server_config(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PeerClientVerifier {
        trust: trust.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(LiveCert(identity.live.clone())));
    no_resumption(&mut config);
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A server configuration presenting `identity` without asking for a client certificate
/// (Matrix federation authenticates requests by signature instead).
pub fn server_config_without_client_auth(
    identity: &TlsIdentity,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(LiveCert(identity.live.clone())));
    no_resumption(&mut config);
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A client configuration presenting `identity` and accepting a server only if its certificate
/// is trusted for the server name dialled.
pub fn client_config(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(identity, trust, alpn, None)
}

/// Where a verifier leaves its last refusal, for [`check::check_peer`].
pub(crate) type FailureSlot = Arc<std::sync::Mutex<Option<TrustFailure>>>;

pub(crate) fn client_config_with(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    alpn: Vec<Vec<u8>>,
    failures: Option<FailureSlot>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PeerServerVerifier {
        trust: trust.clone(),
        algs: provider.signature_verification_algorithms,
        failures,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(LiveCert(identity.live.clone())));
    // A resumed session skips certificate verification: after a reload that drops a pin or
    // a CA, the old trust would go on admitting the peer. Peers hold long-lived connections,
    // so a full handshake each time costs little.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// Client side: the server's certificate must be trusted for the name we dialled.
#[derive(Debug)]
struct PeerServerVerifier {
    trust: PeerTrust,
    algs: WebPkiSupportedAlgorithms,
    failures: Option<FailureSlot>,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(domain) = trust::domain_of(server_name) else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        };
        let verdict = self.trust.snapshot().verify_server(
            &domain,
            end_entity,
            intermediates,
            now,
            &self.algs,
        );
        match verdict {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(failure) => {
                tracing::warn!(peer = %domain, %failure, "server certificate refused");
                let e = failure.to_rustls();
                if let Some(slot) = &self.failures {
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(failure);
                }
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: the client's certificate must name a configured peer and pass its trust;
/// which peer is read again after the handshake by [`peer_domain`].
#[derive(Debug)]
struct PeerClientVerifier {
    trust: PeerTrust,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA names to hint: clients present their single chain regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .trust
            .snapshot()
            .verify_client(end_entity, intermediates, now, &self.algs)
        {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(failure) => {
                tracing::warn!(%failure, "client certificate refused");
                Err(failure.to_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
