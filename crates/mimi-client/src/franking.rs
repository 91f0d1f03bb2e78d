//! Message franking at the client (draft-ietf-mimi-protocol-06 §5.4.1): the room's
//! franking_agent component (the hub's published key), the franking tag a sender puts in
//! the SafeAAD, and the receiver's check of the hub's Frank.

use mimi_wire::content::MessageId;
use mimi_wire::proto::room::{FrankingAgentData, SafeAad, component};
use mimi_wire::proto::{AbuseReport, AbusiveMessage, Frank, IdentifierUri, VLBytes};
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

/// Why a received message's frank was not accepted (§5.4.1.3): the hub's frank itself, or
/// the URIs the sender committed to in the MIMI content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiveError {
    #[error(transparent)]
    Frank(#[from] FrankError),
    #[error("the content does not assert senderUri and roomUri")]
    NoUris,
    #[error("the content's senderUri is not the sender's credential identity")]
    SenderMismatch,
    #[error("the content's roomUri is not the room the message arrived in")]
    RoomMismatch,
}

/// The draft's last receiver checks: the MIMI content's extensions map names the sender of
/// the MLS credential and the room of the MLS group. Without them a receiver could not tell
/// a message replayed into another room, or under another sender's name, from the original.
pub fn check_content_uris(payload: &[u8], sender: &str, room: &str) -> Result<(), ReceiveError> {
    let content = mimi_wire::content::MimiContent::decode(payload)
        .map_err(|_| ReceiveError::Frank(FrankError::Content))?;
    let ext = &content.extensions;
    let (Some(s), Some(r)) = (ext.sender_uri(), ext.room_uri()) else {
        return Err(ReceiveError::NoUris);
    };
    if s != sender {
        return Err(ReceiveError::SenderMismatch);
    }
    if r != room {
        return Err(ReceiveError::RoomMismatch);
    }
    Ok(())
}

/// What a receiver keeps of a franked message (§5.4.1.3: "the receiver needs to store the
/// server_frank, franking_signature_ciphersuite, franking_integrity_signature, and context
/// fields with the decoded message"), enough to report it later (§5.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub sender_uri: String,
    pub room_uri: String,
    pub accepted_ms: u64,
    pub frank: Frank,
    /// The MIMI content exactly as received (the franking tag is over these bytes).
    pub content: Vec<u8>,
}

/// How many franked messages a client keeps for reports; the oldest go first.
const KEPT: usize = 1024;

/// Received franked messages by MIMI message ID, bounded.
#[derive(Debug, Default)]
pub struct Kept {
    by_id: std::collections::HashMap<MessageId, Received>,
    order: std::collections::VecDeque<MessageId>,
}

impl Kept {
    /// Keeps `r`; returns its message ID (`None`: not MIMI content with a salt).
    pub fn keep(&mut self, r: Received) -> Option<MessageId> {
        let id = mimi_wire::content::message_id(&r.sender_uri, &r.room_uri, &r.content).ok()?;
        if self.by_id.insert(id, r).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > KEPT {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        Some(id)
    }

    pub fn get(&self, id: &MessageId) -> Option<&Received> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// An AbuseReport (§5.9) against the sender of the kept messages `ids` (all from one
    /// sender); `None` if one is not kept or they name several senders.
    pub fn report(&self, reporter: &str, ids: &[MessageId], note: &str) -> Option<AbuseReport> {
        let first = self.get(ids.first()?)?;
        let mut messages = Vec::with_capacity(ids.len());
        for id in ids {
            let r = self.get(id)?;
            if r.sender_uri != first.sender_uri {
                return None;
            }
            messages.push(AbusiveMessage {
                message_content: VLBytes::new(r.content.clone()),
                frank: r.frank.clone(),
                accepted_timestamp: r.accepted_ms,
            });
        }
        Some(AbuseReport {
            reporting_user: IdentifierUri::new(reporter),
            alleged_abuser_uri: IdentifierUri::new(first.sender_uri.clone()),
            reason_code: 0,
            note: VLBytes::new(note.as_bytes().to_vec()),
            messages,
            abuse_extensions: VLBytes::new(Vec::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimi_wire::content::MimiContent;

    const ALICE: &str = "mimi://a.example/u/alice";
    const ROOM: &str = "mimi://a.example/r/room";

    fn content(salt: u8, sender: Option<&str>, room: Option<&str>) -> Vec<u8> {
        let mut m = MimiContent::markdown([salt; 16], "hi");
        if let Some(s) = sender {
            m.extensions.set_sender_uri(s);
        }
        if let Some(r) = room {
            m.extensions.set_room_uri(r);
        }
        m.encode().expect("encodes")
    }

    fn received(salt: u8, sender: &str) -> Received {
        Received {
            sender_uri: sender.into(),
            room_uri: ROOM.into(),
            accepted_ms: 7,
            frank: Frank {
                server_frank: [salt; 32],
                franking_signature_ciphersuite: 1,
                franking_integrity_signature: VLBytes::new(vec![salt; 64]),
            },
            content: content(salt, Some(sender), Some(ROOM)),
        }
    }

    #[test]
    fn content_uris_must_name_the_sender_and_the_room() {
        let ok = content(1, Some(ALICE), Some(ROOM));
        assert_eq!(check_content_uris(&ok, ALICE, ROOM), Ok(()));
        let cases = [
            (content(1, None, Some(ROOM)), ReceiveError::NoUris),
            (content(1, Some(ALICE), None), ReceiveError::NoUris),
            (
                content(1, Some("mimi://a.example/u/mallory"), Some(ROOM)),
                ReceiveError::SenderMismatch,
            ),
            (
                content(1, Some(ALICE), Some("mimi://a.example/r/other")),
                ReceiveError::RoomMismatch,
            ),
            (
                b"not cbor".to_vec(),
                ReceiveError::Frank(FrankError::Content),
            ),
        ];
        for (payload, want) in cases {
            assert_eq!(check_content_uris(&payload, ALICE, ROOM), Err(want));
        }
    }

    #[test]
    fn kept_messages_make_a_report_of_one_sender_and_stay_bounded() {
        let mut kept = Kept::default();
        let a = kept.keep(received(1, ALICE)).expect("mimi content");
        let b = kept.keep(received(2, ALICE)).expect("mimi content");
        let m = kept
            .keep(received(3, "mimi://b.example/u/mallory"))
            .expect("mimi content");
        let report = kept
            .report("mimi://b.example/u/bob", &[a, b], "spam")
            .expect("both kept");
        assert_eq!(report.alleged_abuser_uri.as_str(), ALICE);
        assert_eq!(report.messages.len(), 2);
        assert_eq!(report.messages[1].frank.server_frank, [2; 32]);
        assert_eq!(report.messages[0].accepted_timestamp, 7);
        assert_eq!(
            report.messages[0].message_content.as_slice(),
            received(1, ALICE).content.as_slice()
        );
        // Two senders in one report, or a message not kept: no report.
        assert!(kept.report("x", &[a, m], "").is_none());
        assert!(kept.report("x", &[MessageId([0; 32])], "").is_none());
        for i in 0..KEPT as u32 + 10 {
            let mut r = received(9, ALICE);
            r.content = {
                let mut c = MimiContent::markdown([9; 16], &i.to_string());
                c.extensions.set_sender_uri(ALICE);
                c.encode().expect("encodes")
            };
            kept.keep(r);
        }
        assert_eq!(kept.len(), KEPT);
        assert!(kept.get(&a).is_none(), "the oldest went first");
    }
}
