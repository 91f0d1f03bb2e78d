//! Message franking (draft-ietf-mimi-protocol-06 §5.4.1): the sender's franking tag, the
//! hub's server frank and its FrankingIntegrityTBS signature, and their checks. HMAC-SHA256
//! is HKDF-Extract (RFC 5869: `HKDF-Extract(salt, IKM) = HMAC-Hash(salt, IKM)`), so the
//! crypto provider serves for both.

use mimi_wire::proto::{Frank, IdentifierUri, VLBytes};
use openmls::prelude::tls_codec::Serialize as _;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto as _;
use openmls_traits::types::HashType;

use crate::{HUB_CIPHERSUITE, sign_content};

/// The label of the franking integrity signature.
pub const FRANKING_LABEL: &str = "FrankingIntegrityTBS";

/// `HMAC_SHA256(key, data)`.
pub fn hmac_sha256(crypto: &RustCrypto, key: &[u8], data: &[u8]) -> Option<[u8; 32]> {
    crypto
        .hkdf_extract(HashType::Sha2_256, key, data)
        .ok()?
        .as_slice()
        .try_into()
        .ok()
}

/// The sender's `franking_tag = HMAC_SHA256(salt, application_data)` (§5.4.1.1).
pub fn franking_tag(crypto: &RustCrypto, salt: &[u8], application_data: &[u8]) -> Option<[u8; 32]> {
    hmac_sha256(crypto, salt, application_data)
}

/// `ServerFrankingContext { IdentifierUri sender_uri; IdentifierUri room_uri; uint64
/// accepted_timestamp; }`, encoded.
pub fn server_franking_context(
    sender_uri: &str,
    room_uri: &str,
    accepted_ms: u64,
) -> Option<Vec<u8>> {
    let mut out = IdentifierUri::new(sender_uri).encode().ok()?;
    out.extend(IdentifierUri::new(room_uri).encode().ok()?);
    out.extend_from_slice(&accepted_ms.to_be_bytes());
    Some(out)
}

/// `server_frank = HMAC_SHA256(hub_key, franking_tag || context)` (§5.4.1.2).
pub fn server_frank(
    crypto: &RustCrypto,
    hub_key: &[u8],
    franking_tag: &[u8; 32],
    context: &[u8],
) -> Option<[u8; 32]> {
    let mut data = franking_tag.to_vec();
    data.extend_from_slice(context);
    hmac_sha256(crypto, hub_key, &data)
}

/// `FrankingIntegrityTBS { opaque server_frank[32]; CipherSuite
/// franking_signature_ciphersuite; ServerFrankingContext context; }`, encoded.
pub fn franking_integrity_tbs(
    server_frank: &[u8; 32],
    ciphersuite: u16,
    context: &[u8],
) -> Vec<u8> {
    let mut out = server_frank.to_vec();
    out.extend_from_slice(&ciphersuite.to_be_bytes());
    out.extend_from_slice(context);
    out
}

/// The hub's Frank: the server frank and `SignWithLabel(signing key,
/// "FrankingIntegrityTBS", FrankingIntegrityTBS)` under [`HUB_CIPHERSUITE`].
pub fn make_frank(
    crypto: &RustCrypto,
    hub_key: &[u8],
    signing_key: &ed25519_dalek::SigningKey,
    franking_tag: &[u8; 32],
    context: &[u8],
) -> Option<Frank> {
    use ed25519_dalek::Signer as _;
    let frank = server_frank(crypto, hub_key, franking_tag, context)?;
    let cs = u16::from(HUB_CIPHERSUITE);
    let tbs = franking_integrity_tbs(&frank, cs, context);
    // HUB_CIPHERSUITE signs with Ed25519 (deterministic: the bytes openmls would make).
    let sig = signing_key.sign(&sign_content(FRANKING_LABEL, &tbs).ok()?);
    Some(Frank {
        server_frank: frank,
        franking_signature_ciphersuite: cs,
        franking_integrity_signature: VLBytes::new(sig.to_bytes().to_vec()),
    })
}

/// Why a receiver refuses a frank (§5.4.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrankError {
    #[error("the frank's ciphersuite is not the group's")]
    Ciphersuite,
    #[error("the franking integrity signature does not verify")]
    Signature,
    #[error("the franking tag does not match the content and its salt")]
    Tag,
    #[error("the content is not MIMI content with a salt")]
    Content,
}

/// A receiver's check of a frank: the integrity signature under the franking agent's
/// `franking_signature_key`, over the context the receiver rebuilt.
pub fn verify_frank_signature(
    crypto: &RustCrypto,
    franking_signature_key: &[u8],
    frank: &Frank,
    context: &[u8],
) -> Result<(), FrankError> {
    if frank.franking_signature_ciphersuite != u16::from(HUB_CIPHERSUITE) {
        return Err(FrankError::Ciphersuite);
    }
    let tbs = franking_integrity_tbs(
        &frank.server_frank,
        frank.franking_signature_ciphersuite,
        context,
    );
    let content = sign_content(FRANKING_LABEL, &tbs).map_err(|_| FrankError::Signature)?;
    crypto
        .verify_signature(
            HUB_CIPHERSUITE.signature_algorithm(),
            &content,
            franking_signature_key,
            frank.franking_integrity_signature.as_slice(),
        )
        .map_err(|_| FrankError::Signature)
}

/// A receiver's whole check (§5.4.1.3): the signature, then that `franking_tag` (from the
/// message's AAD) is the HMAC of `application_data` under the content's own salt.
pub fn verify_frank(
    crypto: &RustCrypto,
    franking_signature_key: &[u8],
    frank: &Frank,
    franking_tag: &[u8; 32],
    application_data: &[u8],
    context: &[u8],
) -> Result<(), FrankError> {
    verify_frank_signature(crypto, franking_signature_key, frank, context)?;
    let salt =
        mimi_wire::content::content_salt(application_data).map_err(|_| FrankError::Content)?;
    match self::franking_tag(crypto, &salt, application_data) {
        Some(t) if constant_time_eq(&t, franking_tag) => Ok(()),
        _ => Err(FrankError::Tag),
    }
}

/// Equality of two MACs without an early exit.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The franking_agent component data naming the hub: its signature key and the basic
/// credential `mimi://<domain>`.
pub fn franking_agent_data(signature_key: &[u8], hub_identity: &str) -> Option<Vec<u8>> {
    let cred = openmls::prelude::Credential::from(openmls::prelude::BasicCredential::new(
        hub_identity.as_bytes().to_vec(),
    ))
    .tls_serialize_detached()
    .ok()?;
    mimi_wire::proto::room::FrankingAgentData {
        franking_signature_key: VLBytes::new(signature_key.to_vec()),
        credential: mimi_wire::proto::Credential::from_bytes(cred).ok()?,
    }
    .encode()
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answer: RFC 4231 test case 2 for HMAC-SHA256 checks the HMAC construction.
    #[test]
    fn hmac_is_rfc4231() {
        let c = RustCrypto::default();
        let mac = hmac_sha256(&c, b"Jefe", b"what do ya want for nothing?").expect("hmac");
        let want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let got: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn server_frank_and_tbs_follow_the_draft() {
        let c = RustCrypto::default();
        let ctx =
            server_franking_context("mimi://b.example/u/alice", "mimi://a.example/r/x", 0x0102)
                .expect("context");
        // IdentifierUri = opaque uri<V> (one-byte varint lengths here), then uint64.
        let mut want = vec![24];
        want.extend_from_slice(b"mimi://b.example/u/alice");
        want.push(20);
        want.extend_from_slice(b"mimi://a.example/r/x");
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(ctx, want);
        // server_frank = HMAC_SHA256(hub_key, franking_tag || context).
        let tag = [3u8; 32];
        let sf = server_frank(&c, b"hub key", &tag, &ctx).expect("frank");
        let mut data = tag.to_vec();
        data.extend_from_slice(&ctx);
        assert_eq!(Some(sf), hmac_sha256(&c, b"hub key", &data));
        // FrankingIntegrityTBS = server_frank[32] || CipherSuite(u16) || context.
        let tbs = franking_integrity_tbs(&sf, 1, &ctx);
        assert_eq!(&tbs[..32], &sf);
        assert_eq!(&tbs[32..34], &[0, 1]);
        assert_eq!(&tbs[34..], &ctx[..]);
    }

    #[test]
    fn frank_verifies_and_tampering_fails() {
        let c = RustCrypto::default();
        let ((sk, pk), hub_key) = crate::derive_hub_keys(&[5; 32]).expect("keys");
        let content = mimi_wire::content::MimiContent::markdown([9; 16], "hi")
            .encode()
            .expect("content");
        let tag = franking_tag(&c, &[9; 16], &content).expect("tag");
        let ctx = server_franking_context("mimi://b.example/u/alice", "mimi://a.example/r/x", 7)
            .expect("context");
        let sk = ed25519_dalek::SigningKey::from_bytes(&sk.try_into().expect("32-byte seed"));
        let frank = make_frank(&c, &hub_key, &sk, &tag, &ctx).expect("frank");
        assert_eq!(verify_frank(&c, &pk, &frank, &tag, &content, &ctx), Ok(()));
        // Another timestamp (a follower changed it): the signature fails.
        let ctx2 = server_franking_context("mimi://b.example/u/alice", "mimi://a.example/r/x", 8)
            .expect("context");
        assert_eq!(
            verify_frank(&c, &pk, &frank, &tag, &content, &ctx2),
            Err(FrankError::Signature)
        );
        let mut bad = frank.clone();
        bad.server_frank[0] ^= 1;
        assert_eq!(
            verify_frank(&c, &pk, &bad, &tag, &content, &ctx),
            Err(FrankError::Signature)
        );
        // A tag that is not the content's.
        assert_eq!(
            verify_frank(&c, &pk, &frank, &[0; 32], &content, &ctx),
            Err(FrankError::Tag)
        );
    }
}
