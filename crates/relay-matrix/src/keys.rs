//! Our ed25519 server signing key, the self-signed key document we serve, and the checks on
//! the documents peers serve.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ruma::CanonicalJsonObject;
use ruma::CanonicalJsonValue;
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeySet};
use rustls::pki_types::PrivateKeyDer;
use sha2::{Digest, Sha256};

use crate::wire::encode_b64;

/// Domain separation for [`SigningKey::derive`]: changing it changes every derived key.
const DERIVE_LABEL: &[u8] = b"mimi-relay matrix signing key v1\0";
/// PKCS#8 v1 prefix of an ed25519 private key (RFC 8410 §7), followed by the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// How long the key document we serve says our key is valid (the spec's typical week).
pub const KEY_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The ed25519 key a relay signs its federation requests and key document with.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// `ed25519:<version>`
    id: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The key could not be built.
#[derive(Debug, thiserror::Error)]
#[error("unusable ed25519 key")]
pub struct KeyError(#[source] ruma::signatures::Ed25519KeyPairParseError);

impl SigningKey {
    /// Builds the key from its 32-byte seed. The key id is `ed25519:m` + 8 hex digits of the
    /// SHA-256 of the public key, so a new key always gets a new id.
    pub fn from_seed(seed: [u8; 32]) -> Result<SigningKey, KeyError> {
        let mut der = Vec::with_capacity(48);
        der.extend_from_slice(&PKCS8_ED25519_PREFIX);
        der.extend_from_slice(&seed);
        let probe = Ed25519KeyPair::from_der(&der, String::new()).map_err(KeyError)?;
        let digest = Sha256::digest(probe.public_key());
        let version = format!("m{}", hex8(&digest));
        let pair = Ed25519KeyPair::from_der(&der, version.clone()).map_err(KeyError)?;
        Ok(SigningKey {
            pair,
            id: format!("ed25519:{version}"),
        })
    }

    /// Derives the key from the relay's TLS private key: seed = SHA-256(label || key DER).
    /// The TLS key is secret, so the seed is; one file to protect and to rotate.
    pub fn derive(tls_key: &PrivateKeyDer<'_>) -> Result<SigningKey, KeyError> {
        let mut h = Sha256::new();
        h.update(DERIVE_LABEL);
        h.update(tls_key.secret_der());
        SigningKey::from_seed(h.finalize().into())
    }

    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }

    /// `ed25519:<version>`
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.pair.public_key()
    }

    /// The self-signed `GET /_matrix/key/v2/server` answer, valid for [`KEY_VALIDITY`].
    pub fn key_document(&self, server_name: &str) -> Vec<u8> {
        let valid_until = now_ms().saturating_add(KEY_VALIDITY.as_millis() as u64);
        let mut keys = CanonicalJsonObject::new();
        keys.insert(
            self.id.clone(),
            CanonicalJsonValue::Object(CanonicalJsonObject::from([(
                "key".to_owned(),
                CanonicalJsonValue::String(encode_b64(&self.public_key())),
            )])),
        );
        let mut doc = CanonicalJsonObject::from([
            (
                "server_name".to_owned(),
                CanonicalJsonValue::String(server_name.to_owned()),
            ),
            (
                "valid_until_ts".to_owned(),
                CanonicalJsonValue::Integer(
                    ruma::Int::try_from(valid_until).unwrap_or(ruma::Int::MAX),
                ),
            ),
            ("verify_keys".to_owned(), CanonicalJsonValue::Object(keys)),
            (
                "old_verify_keys".to_owned(),
                CanonicalJsonValue::Object(CanonicalJsonObject::new()),
            ),
        ]);
        // Signing a map we built cannot fail; an unsigned document would only be refused.
        let _ = ruma::signatures::sign_json(server_name, &self.pair, &mut doc);
        serde_json::to_vec(&doc).unwrap_or_default()
    }
}

fn hex8(digest: &[u8]) -> String {
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a peer's key document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyDocError {
    #[error("key document is not json")]
    NotJson,
    #[error("key document names {0:?}, not the server asked")]
    WrongServer(String),
    #[error("key document has no usable ed25519 verify key")]
    NoKeys,
    #[error("key document is expired")]
    Expired,
    #[error("key document is not self-signed by its keys: {0}")]
    BadSignature(String),
}

/// The verified keys of one server and until when we may use them (ms since the epoch).
#[derive(Debug, Clone)]
pub struct ServerKeys {
    pub keys: PublicKeySet,
    pub valid_until_ms: u64,
}

/// Checks a `GET /_matrix/key/v2/server` answer from `server_name`: it must name that server,
/// be unexpired and carry a valid signature by each of its verify keys.
pub fn verify_key_document(server_name: &str, body: &[u8]) -> Result<ServerKeys, KeyDocError> {
    let doc: CanonicalJsonObject =
        serde_json::from_slice(body).map_err(|_| KeyDocError::NotJson)?;
    match doc.get("server_name") {
        Some(CanonicalJsonValue::String(s)) if s == server_name => {}
        other => {
            return Err(KeyDocError::WrongServer(
                other.map(|v| v.to_string()).unwrap_or_default(),
            ));
        }
    }
    let valid_until_ms = match doc.get("valid_until_ts") {
        Some(CanonicalJsonValue::Integer(i)) => u64::try_from(i64::from(*i)).unwrap_or(0),
        _ => 0,
    };
    if valid_until_ms <= now_ms() {
        return Err(KeyDocError::Expired);
    }
    let mut keys = PublicKeySet::new();
    if let Some(CanonicalJsonValue::Object(vk)) = doc.get("verify_keys") {
        for (id, v) in vk {
            if !id.starts_with("ed25519:") {
                continue;
            }
            if let CanonicalJsonValue::Object(o) = v
                && let Some(CanonicalJsonValue::String(k)) = o.get("key")
                && let Ok(b) = Base64::parse(k)
            {
                keys.insert(id.clone(), b);
            }
        }
    }
    if keys.is_empty() {
        return Err(KeyDocError::NoKeys);
    }
    // Every listed key must have signed the document (verify_json checks each key id that
    // appears in the signatures; require each of ours to appear).
    let signed_by: Vec<String> = match doc.get("signatures") {
        Some(CanonicalJsonValue::Object(s)) => match s.get(server_name) {
            Some(CanonicalJsonValue::Object(by)) => by.keys().cloned().collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    if keys.keys().any(|k| !signed_by.contains(k)) {
        return Err(KeyDocError::BadSignature(
            "a verify key did not sign".into(),
        ));
    }
    let map = ruma::signatures::PublicKeyMap::from([(server_name.to_owned(), keys.clone())]);
    ruma::signatures::verify_json(&map, &doc)
        .map_err(|e| KeyDocError::BadSignature(e.to_string()))?;
    Ok(ServerKeys {
        keys,
        valid_until_ms,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn key_document_verifies_and_tampering_is_detected() {
        let k = SigningKey::from_seed([7; 32]).unwrap();
        assert!(k.id().starts_with("ed25519:m") && k.id().len() == "ed25519:m".len() + 8);
        let doc = k.key_document("a.example");
        let keys = verify_key_document("a.example", &doc).unwrap();
        assert_eq!(
            keys.keys.get(k.id()).map(|b| b.as_bytes().to_vec()),
            Some(k.public_key().to_vec())
        );
        assert!(matches!(
            verify_key_document("b.example", &doc),
            Err(KeyDocError::WrongServer(_))
        ));
        let text = String::from_utf8(doc).unwrap();
        let other = SigningKey::from_seed([8; 32]).unwrap();
        let forged = text.replace(
            &encode_b64(&k.public_key()),
            &encode_b64(&other.public_key()),
        );
        assert!(matches!(
            verify_key_document("a.example", forged.as_bytes()),
            Err(KeyDocError::BadSignature(_))
        ));
        assert!(matches!(
            verify_key_document("a.example", b"{"),
            Err(KeyDocError::NotJson)
        ));
    }

    #[test]
    fn derived_key_is_stable_and_depends_on_the_tls_key() {
        let a = PrivateKeyDer::Pkcs8(vec![1u8; 40].into());
        let b = PrivateKeyDer::Pkcs8(vec![2u8; 40].into());
        let ka = SigningKey::derive(&a).unwrap();
        assert_eq!(
            ka.public_key(),
            SigningKey::derive(&a).unwrap().public_key()
        );
        assert_ne!(
            ka.public_key(),
            SigningKey::derive(&b).unwrap().public_key()
        );
        assert_ne!(ka.id(), SigningKey::derive(&b).unwrap().id());
    }
}
