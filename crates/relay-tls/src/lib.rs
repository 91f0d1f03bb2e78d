//! Mutual TLS for mimi-relay, shared by the HTTPS and QUIC adapters and the binary.
//!
//! Contract:
//! - Every provider has one certificate (usually self-signed, see [`generate`]) and the matching
//!   private key: its [`TlsIdentity`]. It presents it both as a server and as a client.
//! - A node trusts peers by **pinning**: [`PeerTrust`] maps each peer provider domain to the exact
//!   end-entity certificate(s) it accepts for it. No CA, no chain building, no name matching:
//!   a certificate is accepted for a domain if and only if its DER bytes were configured for it.
//!   Beyond the pin, the certificate must be inside its validity period and correctly
//!   self-signed (checked with webpki, using the pinned certificate as its own trust anchor), and
//!   the handshake signature is verified with the ring provider's algorithms.
//! - [`client_config`] accepts a server only if its certificate is pinned for the server name we
//!   dialled (the peer's provider domain). [`server_config`] requires a client certificate and
//!   accepts any certificate pinned for some peer; the adapter then calls [`peer_domain`] on the
//!   presented chain to learn which provider the connection authenticates.
//! - Configs are built on the ring provider explicitly; nothing here depends on a process-wide
//!   default provider. No early data / 0-RTT is enabled.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use mimi_wire::uri::ProviderDomain;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

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
    #[error("the peer certificate is not pinned for any configured provider")]
    UntrustedPeer,
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This provider's own certificate chain and private key.
pub struct TlsIdentity {
    pub domain: ProviderDomain,
    /// End-entity certificate first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
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
        if let Err(source) =
            rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider())
        {
            return Err(TlsError::BadKey { domain, source });
        }
        Ok(TlsIdentity {
            domain,
            cert_chain,
            key,
        })
    }

    /// The end-entity certificate, which peers pin.
    pub fn cert(&self) -> Option<&CertificateDer<'static>> {
        self.cert_chain.first()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            domain: self.domain.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
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
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The pinned certificates of peer providers.
#[derive(Clone, Debug, Default)]
pub struct PeerTrust {
    pins: BTreeMap<ProviderDomain, Vec<CertificateDer<'static>>>,
}

impl PeerTrust {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `cert` (DER) as an end-entity certificate of `domain`. Several certificates may be
    /// pinned for one domain (for example during a key rollover).
    pub fn add(&mut self, domain: ProviderDomain, cert: impl Into<CertificateDer<'static>>) {
        let cert = cert.into();
        let pins = self.pins.entry(domain).or_default();
        if !pins.contains(&cert) {
            pins.push(cert);
        }
    }

    /// Trusts every certificate in `pem` for `domain`.
    pub fn add_pem(&mut self, domain: ProviderDomain, pem: &str) -> Result<(), TlsError> {
        for cert in parse_certs(pem, None)? {
            self.add(domain.clone(), cert);
        }
        Ok(())
    }

    /// Trusts every certificate in the PEM file at `path` for `domain`.
    pub fn load_pem(
        &mut self,
        domain: ProviderDomain,
        path: impl AsRef<Path>,
    ) -> Result<(), TlsError> {
        let path = path.as_ref();
        for cert in parse_certs(&read(path)?, Some(path))? {
            self.add(domain.clone(), cert);
        }
        Ok(())
    }

    /// The certificates pinned for `domain`.
    pub fn pinned(&self, domain: &ProviderDomain) -> &[CertificateDer<'static>] {
        self.pins.get(domain).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The domains with at least one pinned certificate.
    pub fn domains(&self) -> impl Iterator<Item = &ProviderDomain> {
        self.pins.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    fn is_pinned_anywhere(&self, cert: &CertificateDer<'_>) -> bool {
        self.pins
            .values()
            .flatten()
            .any(|c| c.as_ref() == cert.as_ref())
    }
}

/// Which provider a verified peer certificate chain authenticates.
pub fn peer_domain(
    trust: &PeerTrust,
    presented: &[CertificateDer<'_>],
) -> Result<ProviderDomain, TlsError> {
    let end_entity = presented.first().ok_or(TlsError::NoPeerCertificate)?;
    let mut found: Option<&ProviderDomain> = None;
    for (domain, pins) in &trust.pins {
        if pins.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            if let Some(first) = found {
                return Err(TlsError::AmbiguousPeer {
                    first: first.clone(),
                    second: domain.clone(),
                });
            }
            found = Some(domain);
        }
    }
    found.cloned().ok_or(TlsError::UntrustedPeer)
}

/// A server configuration presenting `identity` and requiring a client certificate pinned for
/// some peer in `trust`.
pub fn server_config(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedClientVerifier {
        trust: trust.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(TlsError::Config)?;
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A client configuration presenting `identity` and accepting a server only if its certificate
/// is pinned for the server name dialled.
pub fn client_config(
    identity: &TlsIdentity,
    trust: &PeerTrust,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        trust: trust.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(TlsError::Config)?;
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// Accepts any EKU: the pin, not the certificate's stated purpose, is what we trust, and one
/// certificate serves both as client and server.
struct AnyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        // Consume the extension so that a malformed one is still rejected.
        for id in iter {
            id?;
        }
        Ok(())
    }
}

/// Checks a presented certificate that already matched a pin: it must be well formed, inside
/// its validity period and signed by its own key (it is its own trust anchor).
fn check_pinned(
    end_entity: &CertificateDer<'_>,
    algs: &WebPkiSupportedAlgorithms,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let bad = |e: webpki::Error| -> rustls::Error {
        let reason = match e {
            webpki::Error::CertExpired { .. } => CertificateError::Expired,
            webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
            webpki::Error::InvalidSignatureForPublicKey
            | webpki::Error::UnsupportedSignatureAlgorithmContext(_)
            | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
                CertificateError::BadSignature
            }
            webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
            other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(reason)
    };
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(bad)?;
    let anchor = webpki::anchor_from_trusted_cert(end_entity).map_err(bad)?;
    cert.verify_for_usage(algs.all, &[anchor], &[], now, AnyUsage, None, None)
        .map_err(bad)?;
    Ok(())
}

fn not_pinned() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Client side: the server's certificate must be pinned for the name we dialled.
#[derive(Debug)]
struct PinnedServerVerifier {
    trust: PeerTrust,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        };
        // DNS names are case-insensitive; provider domains are stored lower-case.
        let domain = ProviderDomain::from_str(&name.as_ref().to_ascii_lowercase())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        let pins = self.trust.pinned(&domain);
        if !pins.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            tracing::warn!(peer = %domain, "server certificate is not pinned for this provider");
            return Err(not_pinned());
        }
        check_pinned(end_entity, &self.algs, now)?;
        Ok(ServerCertVerified::assertion())
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

/// Server side: the client's certificate must be pinned for some peer; which one is decided
/// after the handshake by [`peer_domain`].
#[derive(Debug)]
struct PinnedClientVerifier {
    trust: PeerTrust,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA names to hint: clients present their single certificate regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !self.trust.is_pinned_anywhere(end_entity) {
            tracing::warn!("client certificate is not pinned for any provider");
            return Err(not_pinned());
        }
        check_pinned(end_entity, &self.algs, now)?;
        Ok(ClientCertVerified::assertion())
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
