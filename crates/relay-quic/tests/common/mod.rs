//! What the QUIC tests share: test identities and the trust of a set of them.

use mimi_wire::uri::ProviderDomain;
use relay_tls::{PeerTrust, TlsIdentity};

/// A fresh self-signed identity for `name`.
pub fn identity(name: &str) -> TlsIdentity {
    let d: ProviderDomain = name.parse().expect("valid test domain");
    let g = relay_tls::generate(&d).expect("generate");
    TlsIdentity::from_pem(d, &g.cert_pem, &g.key_pem).expect("identity")
}

/// Trust in exactly these identities' certificates.
pub fn trusting(ids: &[&TlsIdentity]) -> PeerTrust {
    let mut trust = PeerTrust::new();
    for id in ids {
        trust.add(id.domain.clone(), id.cert().expect("cert").clone());
    }
    trust
}
