//! What the hub tests share: one openmls client per user and the leaf capabilities the
//! room's extensions need.

#![allow(dead_code)] // each test file uses its own part

use mimi_wire::uri::ProviderDomain;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

pub const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

pub fn d(s: &str) -> ProviderDomain {
    s.parse().expect("domain")
}

/// One user's MLS client: crypto provider, signature keys and basic credential.
pub struct Client {
    pub provider: OpenMlsRustCrypto,
    pub signer: SignatureKeyPair,
    pub cred: CredentialWithKey,
}

impl Client {
    pub fn new(user: &str) -> Client {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(CS.signature_algorithm()).expect("signer");
        signer.store(provider.storage()).expect("store signer");
        let cred = CredentialWithKey {
            credential: BasicCredential::new(user.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Client {
            provider,
            signer,
            cred,
        }
    }
}

/// Leaves that support the app_data_dictionary and the AppDataUpdate and SelfRemove
/// proposals (draft-ietf-mls-extensions).
pub fn caps() -> Capabilities {
    Capabilities::new(
        None,
        None,
        Some(&[ExtensionType::AppDataDictionary]),
        Some(&[ProposalType::AppDataUpdate, ProposalType::SelfRemove]),
        None,
    )
}
