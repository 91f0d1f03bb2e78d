//! The hub's MLS validation for mimi-relay, on openmls public groups.
//!
//! Contract: [`OpenMlsValidator`] implements `relay_core::mls::MlsValidator`. Per hosted room
//! it keeps an openmls [`PublicGroup`] (built with `PublicGroup::from_external` from the
//! creator's GroupInfo and ratchet tree), checks each handshake PublicMessage with
//! `process_message` (signatures, membership tag, epoch, proposals, tree and path validity:
//! RFC 9420 §12.4.2, the openmls ValSem list) and merges it only when the core says so. It
//! never sees a PrivateMessage's plaintext: openmls refuses PrivateMessages in a public group,
//! and the core only ever passes handshake PublicMessages. The whole state of a room (its
//! openmls storage entries) is one opaque byte string the core persists.

use std::collections::{BTreeMap, HashMap};

use openmls::group::GroupId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    KeyPackageIn, LeafNodeIndex, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal,
    ProposalStore, ProtocolMessage, ProtocolVersion, PublicGroup, QueuedProposal, RatchetTreeIn,
    Sender, StagedCommit,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use relay_core::mls::{GroupState, HandshakeEffect, MlsReject, MlsValidator};
use tracing::debug;

enum Staged {
    Commit(Box<StagedCommit>),
    Proposal(Box<QueuedProposal>),
}

struct Room {
    storage: MemoryStorage,
    group: PublicGroup,
    staged: Option<Staged>,
}

/// openmls-backed [`MlsValidator`].
#[derive(Default)]
pub struct OpenMlsValidator {
    crypto: RustCrypto,
    rooms: HashMap<String, Room>,
}

impl std::fmt::Debug for OpenMlsValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenMlsValidator")
            .field("rooms", &self.rooms.len())
            .finish()
    }
}

fn identity(cred: &openmls::prelude::Credential) -> String {
    String::from_utf8_lossy(cred.serialized_content()).into_owned()
}

fn invalid(e: impl std::fmt::Display) -> MlsReject {
    MlsReject::Invalid(e.to_string())
}

impl OpenMlsValidator {
    pub fn new() -> Self {
        Self::default()
    }

    fn summary(room: &Room) -> GroupState {
        GroupState {
            epoch: room.group.group_context().epoch().as_u64(),
            members: room
                .group
                .members()
                .map(|m| identity(&m.credential))
                .collect(),
            state: encode_state(room.group.group_id(), &room.storage),
        }
    }

    fn leaf_identity(group: &PublicGroup, idx: LeafNodeIndex) -> String {
        group
            .leaf(idx)
            .map(|l| identity(l.credential()))
            .unwrap_or_default()
    }
}

/// The room's state: the group id, then every storage entry (sorted, so equal states encode
/// equally), each as u32-length-prefixed key and value.
fn encode_state(group_id: &GroupId, storage: &MemoryStorage) -> Vec<u8> {
    let mut out = Vec::new();
    let gid = group_id.as_slice();
    out.extend_from_slice(&(gid.len() as u32).to_be_bytes());
    out.extend_from_slice(gid);
    let values = match storage.values.read() {
        Ok(v) => v,
        Err(poisoned) => poisoned.into_inner(),
    };
    let sorted: BTreeMap<&Vec<u8>, &Vec<u8>> = values.iter().collect();
    for (k, v) in sorted {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn take<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let v = b.get(4..4 + n)?;
    *b = b.get(4 + n..)?;
    Some(v)
}

fn decode_state(mut b: &[u8]) -> Option<(GroupId, MemoryStorage)> {
    let gid = GroupId::from_slice(take(&mut b)?);
    let storage = MemoryStorage::default();
    {
        let mut values = storage.values.write().ok()?;
        while !b.is_empty() {
            let k = take(&mut b)?.to_vec();
            let v = take(&mut b)?.to_vec();
            values.insert(k, v);
        }
    }
    Some((gid, storage))
}

impl MlsValidator for OpenMlsValidator {
    fn create(
        &mut self,
        room: &str,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<GroupState, MlsReject> {
        let msg = MlsMessageIn::tls_deserialize_exact(group_info).map_err(invalid)?;
        let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
            return Err(MlsReject::Invalid("not a GroupInfo".into()));
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree).map_err(invalid)?;
        let storage = MemoryStorage::default();
        let (group, _gi) =
            PublicGroup::from_external(&self.crypto, &storage, tree, vgi, ProposalStore::new())
                .map_err(invalid)?;
        let r = Room {
            storage,
            group,
            staged: None,
        };
        let s = Self::summary(&r);
        self.rooms.insert(room.to_owned(), r);
        Ok(s)
    }

    fn restore(&mut self, room: &str, state: &[u8]) -> Result<GroupState, MlsReject> {
        let (gid, storage) =
            decode_state(state).ok_or_else(|| MlsReject::Invalid("corrupt state".into()))?;
        let group = PublicGroup::load(&storage, &gid)
            .map_err(invalid)?
            .ok_or(MlsReject::NoGroup)?;
        let r = Room {
            storage,
            group,
            staged: None,
        };
        let s = Self::summary(&r);
        self.rooms.insert(room.to_owned(), r);
        Ok(s)
    }

    fn stage(&mut self, room: &str, message: &[u8]) -> Result<HandshakeEffect, MlsReject> {
        let r = self.rooms.get_mut(room).ok_or(MlsReject::NoGroup)?;
        r.staged = None;
        let msg = MlsMessageIn::tls_deserialize_exact(message).map_err(invalid)?;
        let pm: ProtocolMessage = msg.try_into_protocol_message().map_err(invalid)?;
        if matches!(pm, ProtocolMessage::PrivateMessage(_)) {
            return Err(MlsReject::NotAllowed(
                "a PrivateMessage handshake cannot be validated by the hub".into(),
            ));
        }
        let current = r.group.group_context().epoch().as_u64();
        if pm.epoch().as_u64() != current {
            return Err(MlsReject::WrongEpoch { current });
        }
        let processed = r.group.process_message(&self.crypto, pm).map_err(|e| {
            debug!(room, error = %e, "handshake failed validation");
            invalid(e)
        })?;
        let sender_identity = identity(processed.credential());
        let external = matches!(processed.sender(), Sender::NewMemberCommit);
        let mut effect = HandshakeEffect {
            sender: sender_identity,
            external,
            epoch: current,
            ..HandshakeEffect::default()
        };
        match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                effect.is_commit = true;
                effect.epoch = current + 1;
                for add in staged.add_proposals() {
                    let kp = add.add_proposal().key_package();
                    effect.added.push(identity(kp.leaf_node().credential()));
                    if let Ok(r) = kp.hash_ref(&self.crypto) {
                        effect.key_package_refs.push(r.as_slice().to_vec());
                    }
                }
                for rm in staged.remove_proposals() {
                    effect.removed.push(Self::leaf_identity(
                        &r.group,
                        rm.remove_proposal().removed(),
                    ));
                }
                r.staged = Some(Staged::Commit(staged));
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                match p.proposal() {
                    Proposal::Add(a) => effect
                        .added
                        .push(identity(a.key_package().leaf_node().credential())),
                    Proposal::Remove(rm) => effect
                        .removed
                        .push(Self::leaf_identity(&r.group, rm.removed())),
                    _ => {}
                }
                r.staged = Some(Staged::Proposal(p));
            }
            ProcessedMessageContent::ApplicationMessage(_) => {
                return Err(MlsReject::NotAllowed("not a handshake message".into()));
            }
            _ => {
                return Err(MlsReject::NotAllowed(
                    "this kind of handshake is not accepted by the hub".into(),
                ));
            }
        }
        Ok(effect)
    }

    fn merge(&mut self, room: &str) -> Result<GroupState, MlsReject> {
        let r = self.rooms.get_mut(room).ok_or(MlsReject::NoGroup)?;
        match r.staged.take() {
            Some(Staged::Commit(c)) => r.group.merge_commit(&r.storage, *c).map_err(invalid)?,
            Some(Staged::Proposal(p)) => r.group.add_proposal(&r.storage, *p).map_err(invalid)?,
            None => return Err(MlsReject::Invalid("nothing staged".into())),
        }
        Ok(Self::summary(r))
    }

    fn discard(&mut self, room: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.staged = None;
        }
    }

    fn key_package_ref(&self, key_package: &[u8]) -> Option<Vec<u8>> {
        let kp = match MlsMessageIn::tls_deserialize_exact(key_package) {
            Ok(m) => match m.extract() {
                MlsMessageBodyIn::KeyPackage(kp) => kp,
                _ => return None,
            },
            Err(_) => KeyPackageIn::tls_deserialize_exact(key_package).ok()?,
        };
        let kp = kp.validate(&self.crypto, ProtocolVersion::Mls10).ok()?;
        Some(kp.hash_ref(&self.crypto).ok()?.as_slice().to_vec())
    }
}
