//! What the HTTPS adapter's test files share: providers with self-signed certificates.

use anyhow::Result;
use mimi_wire::uri::ProviderDomain;
use relay_tls::{PeerTrust, TlsIdentity};

pub struct Provider {
    pub domain: ProviderDomain,
    pub identity: TlsIdentity,
    pub cert_pem: String,
}

impl Provider {
    pub fn new(name: &str) -> Result<Provider> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let domain: ProviderDomain = name.parse()?;
        let generated = relay_tls::generate(&domain)?;
        let identity =
            TlsIdentity::from_pem(domain.clone(), &generated.cert_pem, &generated.key_pem)?;
        Ok(Provider {
            domain,
            identity,
            cert_pem: generated.cert_pem,
        })
    }

    /// Trust in the self-signed certificates of `others`.
    pub fn trusting(others: &[&Provider]) -> Result<PeerTrust> {
        let mut trust = PeerTrust::new();
        for p in others {
            trust.add_pem(p.domain.clone(), &p.cert_pem)?;
        }
        Ok(trust)
    }
}
