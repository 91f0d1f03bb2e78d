//! Which certificates a node accepts for each peer, and the checks behind it.
//!
//! Each peer provider is trusted in exactly one way ([`TrustMode`]):
//! - **pinned**: the end-entity certificate must be byte-for-byte one of those configured,
//!   whoever issued it (self-signed or CA-issued). No chain is built; the pin is the trust.
//!   Its validity period is still checked.
//! - **CA**: the chain must lead to one of the configured CA certificates (webpki), and the
//!   provider domain must be one of the certificate's subjectAltName DNS names (RFC 9525:
//!   no fallback to the subject's common name).
//! - **system roots**: as CA, with the platform's root store.
//!
//! A [`PeerTrust`] is a shared handle: clones see the same set, and [`PeerTrust::replace`]
//! swaps it for all of them at once, so configs built from it use new certificates from the
//! next handshake on (reload without restart).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};

use mimi_wire::uri::ProviderDomain;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::validity::{Validity, date};
use crate::{TlsError, parse_certs, read};

/// How a peer's certificate is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum TrustMode {
    /// Its end-entity certificate is pinned (`cert = ...`).
    Pinned,
    /// Its chain is verified against a configured CA bundle (`ca = ...`).
    Ca,
    /// Its chain is verified against the platform's roots (`[tls] roots = "system"`).
    SystemRoots,
}

impl TrustMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustMode::Pinned => "pinned",
            TrustMode::Ca => "ca",
            TrustMode::SystemRoots => "system-roots",
        }
    }
}

impl fmt::Display for TrustMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrustMode::Pinned => "pinned certificate",
            TrustMode::Ca => "configured CA",
            TrustMode::SystemRoots => "system roots",
        })
    }
}

/// Why a peer's certificate was refused, in words an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustFailure {
    #[error(
        "no trust is configured for {domain}: give the peer a cert or ca, or set [tls] roots = \"system\""
    )]
    NotConfigured { domain: ProviderDomain },
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the certificate presented for {domain} is not the one pinned for it")]
    PinMismatch { domain: ProviderDomain },
    #[error(
        "the certificate presented for {domain} is not issued by a CA trusted for it (wrong CA, or an intermediate missing from the peer's chain)"
    )]
    UnknownIssuer { domain: ProviderDomain },
    #[error("the certificate presented for {expected} is for {}, not {expected}", names(.presented))]
    WrongName {
        expected: ProviderDomain,
        presented: Vec<String>,
    },
    #[error("the certificate presented for {domain} expired on {}", date(*.not_after))]
    Expired {
        domain: ProviderDomain,
        /// Unix seconds.
        not_after: i64,
    },
    #[error("the certificate presented for {domain} is not valid before {}", date(*.not_before))]
    NotYetValid {
        domain: ProviderDomain,
        /// Unix seconds.
        not_before: i64,
    },
    #[error("the client certificate names no configured peer (it is for {})", names(.presented))]
    UnknownPeer { presented: Vec<String> },
    #[error(
        "the client certificate is valid for more than one configured peer ({first} and {second}), so it does not say which one it is"
    )]
    Ambiguous {
        first: ProviderDomain,
        second: ProviderDomain,
    },
    #[error("the certificate presented for {domain} is unusable: {reason}")]
    BadCertificate {
        domain: ProviderDomain,
        reason: String,
    },
}

fn names(presented: &[String]) -> String {
    if presented.is_empty() {
        "no DNS name".to_owned()
    } else {
        presented.join(", ")
    }
}

impl TrustFailure {
    /// The rustls error a verifier returns, so the TLS alert sent tells the peer the class of
    /// failure (unknown CA, bad certificate, expired, ...).
    pub(crate) fn to_rustls(&self) -> rustls::Error {
        use rustls::CertificateError as C;
        let e = match self {
            TrustFailure::UnknownIssuer { .. } => C::UnknownIssuer,
            TrustFailure::WrongName { .. } => C::NotValidForName,
            TrustFailure::Expired { .. } => C::Expired,
            TrustFailure::NotYetValid { .. } => C::NotValidYet,
            TrustFailure::NoCertificate => C::BadEncoding,
            TrustFailure::NotConfigured { .. }
            | TrustFailure::PinMismatch { .. }
            | TrustFailure::UnknownPeer { .. }
            | TrustFailure::Ambiguous { .. } => C::ApplicationVerificationFailure,
            TrustFailure::BadCertificate { .. } => {
                C::Other(rustls::OtherError(Arc::new(self.clone())))
            }
        };
        rustls::Error::InvalidCertificate(e)
    }

    fn from_webpki(domain: &ProviderDomain, e: webpki::Error) -> TrustFailure {
        let domain = domain.clone();
        match e {
            webpki::Error::CertExpired { not_after, .. } => TrustFailure::Expired {
                domain,
                not_after: not_after.as_secs() as i64,
            },
            webpki::Error::CertNotValidYet { not_before, .. } => TrustFailure::NotYetValid {
                domain,
                not_before: not_before.as_secs() as i64,
            },
            webpki::Error::UnknownIssuer => TrustFailure::UnknownIssuer { domain },
            webpki::Error::CertNotValidForName(ctx) => TrustFailure::WrongName {
                expected: domain,
                presented: clean_names(ctx.presented),
            },
            other => TrustFailure::BadCertificate {
                domain,
                reason: format!("{other:?}"),
            },
        }
    }
}

#[derive(Clone, Debug)]
enum Anchor {
    Pins(Vec<CertificateDer<'static>>),
    Ca(Vec<TrustAnchor<'static>>),
    System,
}

impl Anchor {
    fn mode(&self) -> TrustMode {
        match self {
            Anchor::Pins(_) => TrustMode::Pinned,
            Anchor::Ca(_) => TrustMode::Ca,
            Anchor::System => TrustMode::SystemRoots,
        }
    }
}

/// One consistent set of trust, read once per handshake.
#[derive(Clone, Debug, Default)]
pub(crate) struct TrustSet {
    peers: BTreeMap<ProviderDomain, Anchor>,
    system: Arc<Vec<TrustAnchor<'static>>>,
}

/// The trust configured for each peer provider. A shared handle: see the module docs.
#[derive(Clone, Default)]
pub struct PeerTrust {
    set: Arc<RwLock<Arc<TrustSet>>>,
}

impl fmt::Debug for PeerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.snapshot();
        f.debug_map()
            .entries(s.peers.iter().map(|(d, a)| (d, a.mode())))
            .finish()
    }
}

/// Accepts clientAuth or serverAuth (or no EKU at all) in a client certificate: public CAs
/// are dropping clientAuth from server certificates, and a provider presents the same
/// certificate in both roles.
struct ClientOrServerAuth;

impl webpki::ExtendedKeyUsageValidator for ClientOrServerAuth {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut present = Vec::new();
        for id in iter {
            present.push(id?.to_decoded_oid());
        }
        let usable = |oid: &Vec<usize>| {
            oid == webpki::KeyUsage::SERVER_AUTH_REPR || oid == webpki::KeyUsage::CLIENT_AUTH_REPR
        };
        if present.is_empty() || present.iter().any(usable) {
            Ok(())
        } else {
            Err(webpki::Error::RequiredEkuNotFoundContext(
                webpki::RequiredEkuNotFoundContext {
                    required: webpki::KeyUsage::client_auth(),
                    present,
                },
            ))
        }
    }
}

/// The DNS names a certificate presents (for error messages).
fn presented_names(cert: &webpki::EndEntityCert<'_>) -> Vec<String> {
    let probe = ServerName::try_from("invalid.invalid").map(|n| n.to_owned());
    match probe.map(|n| cert.verify_is_valid_for_subject_name(&n)) {
        Ok(Err(webpki::Error::CertNotValidForName(ctx))) => clean_names(ctx.presented),
        _ => Vec::new(),
    }
}

/// webpki gives presented names in their Debug form (`DnsName("b.example")`); operators want
/// the name.
fn clean_names(presented: Vec<String>) -> Vec<String> {
    presented
        .into_iter()
        .map(|n| {
            n.strip_prefix("DnsName(\"")
                .and_then(|r| r.strip_suffix("\")"))
                .map(str::to_owned)
                .unwrap_or(n)
        })
        .collect()
}

fn dns_name(domain: &ProviderDomain) -> Option<ServerName<'static>> {
    ServerName::try_from(domain.as_str().to_owned()).ok()
}

impl TrustSet {
    /// A pinned certificate: the pin matched, so only its dates are left to check.
    fn check_pinned_dates(
        domain: &ProviderDomain,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), TrustFailure> {
        // Parsed so that a pin webpki cannot read fails here and not in the signature check.
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| TrustFailure::from_webpki(domain, e))?;
        let v = Validity::of(end_entity).ok_or_else(|| TrustFailure::BadCertificate {
            domain: domain.clone(),
            reason: "its validity period cannot be read".to_owned(),
        })?;
        let now = now.as_secs() as i64;
        if now < v.not_before {
            return Err(TrustFailure::NotYetValid {
                domain: domain.clone(),
                not_before: v.not_before,
            });
        }
        if now > v.not_after {
            return Err(TrustFailure::Expired {
                domain: domain.clone(),
                not_after: v.not_after,
            });
        }
        Ok(())
    }

    fn anchors<'s>(&'s self, anchor: &'s Anchor) -> &'s [TrustAnchor<'static>] {
        match anchor {
            Anchor::Pins(_) => &[],
            Anchor::Ca(a) => a,
            Anchor::System => &self.system,
        }
    }

    /// A chain through webpki, then the name.
    #[allow(clippy::too_many_arguments)]
    fn check_chain(
        &self,
        domain: &ProviderDomain,
        anchor: &Anchor,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        algs: &WebPkiSupportedAlgorithms,
        server: bool,
    ) -> Result<(), TrustFailure> {
        let bad = |e| TrustFailure::from_webpki(domain, e);
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(bad)?;
        let anchors = self.anchors(anchor);
        if server {
            cert.verify_for_usage(
                algs.all,
                anchors,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(bad)?;
        } else {
            cert.verify_for_usage(
                algs.all,
                anchors,
                intermediates,
                now,
                ClientOrServerAuth,
                None,
                None,
            )
            .map_err(bad)?;
        }
        let name = dns_name(domain).ok_or_else(|| TrustFailure::WrongName {
            expected: domain.clone(),
            presented: presented_names(&cert),
        })?;
        cert.verify_is_valid_for_subject_name(&name).map_err(bad)
    }

    /// We dialled `domain`: is `end_entity` (with `intermediates`) its certificate?
    pub(crate) fn verify_server(
        &self,
        domain: &ProviderDomain,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<TrustMode, TrustFailure> {
        let anchor = self
            .peers
            .get(domain)
            .ok_or_else(|| TrustFailure::NotConfigured {
                domain: domain.clone(),
            })?;
        match anchor {
            Anchor::Pins(pins) => {
                if !pins.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
                    return Err(TrustFailure::PinMismatch {
                        domain: domain.clone(),
                    });
                }
                Self::check_pinned_dates(domain, end_entity, now)?;
            }
            Anchor::Ca(_) | Anchor::System => {
                self.check_chain(domain, anchor, end_entity, intermediates, now, algs, true)?
            }
        }
        Ok(anchor.mode())
    }

    /// Which configured peer a client certificate claims to be: a pin names it outright;
    /// otherwise its DNS names must match exactly one peer trusted by CA or system roots.
    fn identify(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<(&ProviderDomain, &Anchor), TrustFailure> {
        let mut found: Option<(&ProviderDomain, &Anchor)> = None;
        for (domain, anchor) in &self.peers {
            if let Anchor::Pins(pins) = anchor
                && pins.iter().any(|c| c.as_ref() == end_entity.as_ref())
            {
                if let Some((first, _)) = found {
                    return Err(TrustFailure::Ambiguous {
                        first: first.clone(),
                        second: domain.clone(),
                    });
                }
                found = Some((domain, anchor));
            }
        }
        if let Some(found) = found {
            return Ok(found);
        }
        let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else {
            return Err(TrustFailure::UnknownPeer {
                presented: Vec::new(),
            });
        };
        let mut pinned_name: Option<&ProviderDomain> = None;
        for (domain, anchor) in &self.peers {
            let Some(name) = dns_name(domain) else {
                continue;
            };
            if cert.verify_is_valid_for_subject_name(&name).is_err() {
                continue;
            }
            if let Anchor::Pins(_) = anchor {
                pinned_name.get_or_insert(domain);
                continue;
            }
            if let Some((first, _)) = found {
                return Err(TrustFailure::Ambiguous {
                    first: first.clone(),
                    second: domain.clone(),
                });
            }
            found = Some((domain, anchor));
        }
        match (found, pinned_name) {
            (Some(found), _) => Ok(found),
            // Names a pinned peer but is not its pin: say so rather than "unknown".
            (None, Some(domain)) => Err(TrustFailure::PinMismatch {
                domain: domain.clone(),
            }),
            (None, None) => Err(TrustFailure::UnknownPeer {
                presented: presented_names(&cert),
            }),
        }
    }

    /// A client certificate: which peer it is, verified by that peer's trust.
    pub(crate) fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<(ProviderDomain, TrustMode), TrustFailure> {
        let (domain, anchor) = self.identify(end_entity)?;
        match anchor {
            Anchor::Pins(_) => Self::check_pinned_dates(domain, end_entity, now)?,
            Anchor::Ca(_) | Anchor::System => {
                self.check_chain(domain, anchor, end_entity, intermediates, now, algs, false)?
            }
        }
        Ok((domain.clone(), anchor.mode()))
    }

    /// After a handshake whose verifier accepted the chain: the peer it names.
    pub(crate) fn peer_domain(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<ProviderDomain, TlsError> {
        match self.identify(end_entity) {
            Ok((d, _)) => Ok(d.clone()),
            Err(TrustFailure::Ambiguous { first, second }) => {
                Err(TlsError::AmbiguousPeer { first, second })
            }
            Err(_) => Err(TlsError::UntrustedPeer),
        }
    }

    /// After a handshake whose verifier accepted the chain for a dialled name: does it name
    /// `domain` (its pin, or its DNS names for CA and system trust)?
    pub(crate) fn names(&self, domain: &ProviderDomain, end_entity: &CertificateDer<'_>) -> bool {
        match self.peers.get(domain) {
            None => false,
            Some(Anchor::Pins(pins)) => pins.iter().any(|c| c.as_ref() == end_entity.as_ref()),
            Some(Anchor::Ca(_) | Anchor::System) => {
                let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else {
                    return false;
                };
                dns_name(domain).is_some_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
            }
        }
    }
}

fn anchors_from(
    certs: Vec<CertificateDer<'static>>,
    origin: &str,
) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    certs
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::BadCa {
                    origin: origin.to_owned(),
                    reason: format!("{e:?}"),
                })
        })
        .collect()
}

impl PeerTrust {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn snapshot(&self) -> Arc<TrustSet> {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&mut self, f: impl FnOnce(&mut TrustSet)) {
        let mut guard = self.set.write().unwrap_or_else(PoisonError::into_inner);
        f(Arc::make_mut(&mut guard));
    }

    /// Swaps in `from`'s set for this handle and every clone of it: handshakes from now on use
    /// it, those in progress finish with the old one.
    pub fn replace(&self, from: &PeerTrust) {
        let new = from.snapshot();
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    /// Pins `cert` (DER) as an end-entity certificate of `domain`. Several certificates may be
    /// pinned for one domain (for example during a key rollover). Replaces CA or system trust
    /// configured for `domain` before.
    pub fn add(&mut self, domain: ProviderDomain, cert: impl Into<CertificateDer<'static>>) {
        let cert = cert.into();
        self.update(|s| {
            let entry = s
                .peers
                .entry(domain)
                .or_insert_with(|| Anchor::Pins(Vec::new()));
            match entry {
                Anchor::Pins(pins) => {
                    if !pins.contains(&cert) {
                        pins.push(cert);
                    }
                }
                other => *other = Anchor::Pins(vec![cert]),
            }
        });
    }

    /// Pins every certificate in `pem` for `domain`.
    pub fn add_pem(&mut self, domain: ProviderDomain, pem: &str) -> Result<(), TlsError> {
        for cert in parse_certs(pem, None)? {
            self.add(domain.clone(), cert);
        }
        Ok(())
    }

    /// Pins every certificate in the PEM file at `path` for `domain`.
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

    fn add_anchors(&mut self, domain: ProviderDomain, anchors: Vec<TrustAnchor<'static>>) {
        self.update(|s| match s.peers.get_mut(&domain) {
            Some(Anchor::Ca(existing)) => existing.extend(anchors),
            _ => {
                s.peers.insert(domain, Anchor::Ca(anchors));
            }
        });
    }

    /// Trusts, for `domain`, certificates issued under any CA certificate in `pem` (a bundle:
    /// roots, or intermediates taken as anchors) and naming `domain`. Replaces pins configured
    /// for `domain` before.
    pub fn add_ca_pem(&mut self, domain: ProviderDomain, pem: &str) -> Result<(), TlsError> {
        let anchors = anchors_from(parse_certs(pem, None)?, "PEM text")?;
        self.add_anchors(domain, anchors);
        Ok(())
    }

    /// [`PeerTrust::add_ca_pem`] from the PEM file at `path`.
    pub fn load_ca(
        &mut self,
        domain: ProviderDomain,
        path: impl AsRef<Path>,
    ) -> Result<(), TlsError> {
        let path = path.as_ref();
        let certs = parse_certs(&read(path)?, Some(path))?;
        let anchors = anchors_from(certs, &path.display().to_string())?;
        self.add_anchors(domain, anchors);
        Ok(())
    }

    /// Trusts `domain` by the system roots (see [`PeerTrust::set_system_roots`]).
    pub fn add_system(&mut self, domain: ProviderDomain) {
        self.update(|s| {
            s.peers.insert(domain, Anchor::System);
        });
    }

    /// The roots behind [`TrustMode::SystemRoots`]; certificates webpki cannot use as an
    /// anchor are skipped. Returns how many were taken.
    pub fn set_system_roots(
        &mut self,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> usize {
        let anchors: Vec<_> = roots
            .into_iter()
            .filter_map(|c| {
                webpki::anchor_from_trusted_cert(&c)
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect();
        let n = anchors.len();
        self.update(|s| s.system = Arc::new(anchors));
        n
    }

    /// Loads the platform's root certificates (on Linux the distribution's bundle, or the
    /// files named by `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    pub fn load_system_roots(&mut self) -> Result<usize, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        let n = self.set_system_roots(found.certs);
        if n == 0 {
            let reason = found
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(TlsError::NoSystemRoots { reason });
        }
        Ok(n)
    }

    /// The certificates pinned for `domain` (none if it is trusted by CA or system roots).
    pub fn pinned(&self, domain: &ProviderDomain) -> Vec<CertificateDer<'static>> {
        match self.snapshot().peers.get(domain) {
            Some(Anchor::Pins(p)) => p.clone(),
            _ => Vec::new(),
        }
    }

    /// How `domain` is trusted, if it is.
    pub fn mode(&self, domain: &ProviderDomain) -> Option<TrustMode> {
        self.snapshot().peers.get(domain).map(Anchor::mode)
    }

    /// The domains with trust configured.
    pub fn domains(&self) -> Vec<ProviderDomain> {
        self.snapshot().peers.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot().peers.is_empty()
    }

    /// Would a server we dialled as `domain`, presenting this chain (end-entity first), be
    /// accepted now, and how? The check the TLS client config runs, for tools that report on
    /// a peer (`check-peers`) after a handshake of their own.
    pub fn verify_server(
        &self,
        domain: &ProviderDomain,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<TrustMode, TrustFailure> {
        let (ee, rest) = chain.split_first().ok_or(TrustFailure::NoCertificate)?;
        let algs = crate::provider().signature_verification_algorithms;
        self.snapshot().verify_server(domain, ee, rest, now, &algs)
    }

    /// Would a client presenting this chain be accepted now, as which peer, and how?
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(ProviderDomain, TrustMode), TrustFailure> {
        let (ee, rest) = chain.split_first().ok_or(TrustFailure::NoCertificate)?;
        let algs = crate::provider().signature_verification_algorithms;
        self.snapshot().verify_client(ee, rest, now, &algs)
    }
}

/// `domain` parsed from a TLS server name (DNS names are case-insensitive; provider domains
/// are stored lower-case).
pub(crate) fn domain_of(name: &ServerName<'_>) -> Option<ProviderDomain> {
    match name {
        ServerName::DnsName(n) => ProviderDomain::from_str(&n.as_ref().to_ascii_lowercase()).ok(),
        _ => None,
    }
}
