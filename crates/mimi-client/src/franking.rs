//! Message franking at the client (draft-ietf-mimi-protocol-06 §5.4.1): the room's
//! franking_agent component (the hub's published key), the franking tag a sender puts in
//! the SafeAAD, and the receiver's check of the hub's Frank.

use mimi_wire::proto::Frank;
use mimi_wire::proto::room::{FrankingAgentData, SafeAad, component};
use mimi_wire::uri::RoomId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{Credential, MlsGroup};
use openmls_rust_crypto::RustCrypto;
use relay_mls::frank::{self, FrankError};

/// The franking agent's signature key from the group's GroupContext, if its credential
/// names the hub of the room (`mimi://<room domain>`, §5.4.1.3).
pub fn franking_key(group: &MlsGroup) -> Option<Vec<u8>> {
    let room: RoomId = std::str::from_utf8(group.group_id().as_slice())
        .ok()?
        .parse()
        .ok()?;
    let data = relay_mls::app_data_component(group.extensions(), component::FRANKING_AGENT)?;
    let agent = FrankingAgentData::decode(&data).ok()?;
    let cred = Credential::tls_deserialize_exact(agent.credential.as_bytes()).ok()?;
    (cred.serialized_content() == format!("mimi://{}", room.domain()).as_bytes())
        .then(|| agent.franking_signature_key.as_slice().to_vec())
}

/// The SafeAAD with the franking tag of `payload` (MIMI content: `HMAC_SHA256(salt,
/// application_data)`), when the room has a franking agent. `None`: send unfranked.
pub fn send_aad(crypto: &RustCrypto, group: &MlsGroup, payload: &[u8]) -> Option<Vec<u8>> {
    franking_key(group)?;
    let salt = mimi_wire::content::content_salt(payload).ok()?;
    let tag = frank::franking_tag(crypto, &salt, payload)?;
    SafeAad::frank(tag).encode().ok()
}

/// The receiver's check (§5.4.1.3) of the hub's `frank` on a message from `sender_uri`
/// accepted at `accepted_ms`: signature under the room's franking agent key, the tag in the
/// AAD recomputed from the content and its salt.
pub fn check(
    crypto: &RustCrypto,
    group: &MlsGroup,
    frank: &Frank,
    aad: &[u8],
    payload: &[u8],
    sender_uri: &str,
    accepted_ms: u64,
) -> Result<(), FrankError> {
    let key = franking_key(group).ok_or(FrankError::Signature)?;
    let tag = SafeAad::franking_tag(aad).ok_or(FrankError::Tag)?;
    let room = std::str::from_utf8(group.group_id().as_slice()).map_err(|_| FrankError::Content)?;
    let ctx =
        frank::server_franking_context(sender_uri, room, accepted_ms).ok_or(FrankError::Content)?;
    frank::verify_frank(crypto, &key, frank, &tag, payload, &ctx)
}
