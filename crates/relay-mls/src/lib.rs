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
//!
//! Room state (draft-ietf-mimi-protocol-06 §7.5, draft-ietf-mimi-room-policy) lives in the
//! group's app_data_dictionary (draft-ietf-mls-extensions). A commit covering AppDataUpdate
//! proposals is staged with the dictionary the hub computes itself: the participant_list
//! component applies each `ParticipantListUpdate` in order (one that does not apply makes the
//! commit invalid), any other component's update replaces its data whole, a remove removes it.
//! The effect reports each changed component before and after, for the hub's policy to judge.
//!
//! For /groupInfo (protocol-06 §5.6) it checks the request's SignWithLabel signature and
//! answers with the GroupInfo a member made plus the public group's ratchet tree,
//! EncryptWithLabel'd to the requester's HPKE key and signed by the hub's own Ed25519 key
//! (derived from the hub secret the core keeps in its store, see [`derive_hub_keys`]; made per
//! validator when none is set).

use std::collections::{BTreeMap, HashMap};

use mimi_wire::proto::room::{ParticipantListData, ParticipantListUpdate, component};
pub mod frank;

use mimi_wire::proto::{
    ExternalSender, GroupInfoRatchetTreeTbe, GroupInfoRequest, GroupInfoResponse, GroupInfoStatus,
    KeyMaterialRequest, Protocol, RatchetTreeOption, VLBytes,
};
use openmls::group::GroupId;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{AppDataUpdateOperation, AppDataUpdateProposal, AppDataUpdates};
use openmls::prelude::{BasicCredential, Ciphersuite};
use openmls::prelude::{
    KeyPackageIn, LeafNodeIndex, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal,
    ProposalStore, ProtocolMessage, ProtocolVersion, PublicGroup, QueuedProposal, RatchetTreeIn,
    Sender, StagedCommit,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto as _;
use relay_core::mls::{AppDataChange, GroupState, HandshakeEffect, MlsReject, MlsValidator};
use tracing::debug;

enum Staged {
    Commit(Box<StagedCommit>),
    Proposal(Box<QueuedProposal>),
}

struct Room {
    storage: MemoryStorage,
    group: PublicGroup,
    staged: Option<Staged>,
    /// The franking agent's signature key the group context names, read when the group
    /// changes rather than for every franked message.
    agent: Option<Vec<u8>>,
}

/// The `franking_signature_key` of the group's franking_agent component, if any.
fn franking_agent_key(group: &PublicGroup) -> Option<Vec<u8>> {
    let agent = app_data_component(
        group.group_context().extensions(),
        mimi_wire::proto::room::component::FRANKING_AGENT,
    )?;
    let agent = mimi_wire::proto::room::FrankingAgentData::decode(&agent).ok()?;
    Some(agent.franking_signature_key.as_slice().to_vec())
}

/// openmls-backed [`MlsValidator`].
#[derive(Default)]
pub struct OpenMlsValidator {
    crypto: RustCrypto,
    rooms: HashMap<String, Room>,
    /// The hub's signature key pair (private, public) for GroupInfoResponses, made on first
    /// use.
    hub_key: std::sync::OnceLock<(Vec<u8>, Vec<u8>)>,
    /// The same private key, expanded once: deriving it costs a scalar multiplication, as
    /// much as the signature, and every franked message is signed.
    signer: std::sync::OnceLock<ed25519_dalek::SigningKey>,
    /// The hub's identity in its basic credential (`mimi://<domain>`).
    hub_identity: String,
    /// The franking `hub_key` (protocol-06 §5.4.1), derived from the hub secret.
    franking_key: Option<Vec<u8>>,
}

/// HKDF labels deriving the hub's keys from its persistent secret.
const HUB_SIGNATURE_INFO: &[u8] = b"mimi-relay hub signature key";
const HUB_FRANKING_INFO: &[u8] = b"mimi-relay hub franking key";

/// The hub's Ed25519 key pair: (private seed, public key).
pub type HubKeyPair = (Vec<u8>, Vec<u8>);

/// The hub's Ed25519 key pair and franking key from its secret: HKDF-SHA256 with the secret
/// as input keying material.
pub fn derive_hub_keys(secret: &[u8]) -> Result<(HubKeyPair, Vec<u8>), MlsReject> {
    use openmls_traits::types::HashType;
    let crypto = RustCrypto::default();
    let prk = crypto
        .hkdf_extract(HashType::Sha2_256, b"", secret)
        .map_err(|e| invalid(format!("{e:?}")))?;
    let expand = |info: &[u8]| {
        crypto
            .hkdf_expand(HashType::Sha2_256, prk.as_slice(), info, 32)
            .map(|k| k.as_slice().to_vec())
            .map_err(|e| invalid(format!("{e:?}")))
    };
    let seed: [u8; 32] = expand(HUB_SIGNATURE_INFO)?
        .try_into()
        .map_err(|_| invalid("hkdf output length"))?;
    let pk = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes()
        .to_vec();
    Ok(((seed.to_vec(), pk), expand(HUB_FRANKING_INFO)?))
}

/// The ciphersuite of GroupInfoRequests and responses this hub serves (the demo clients').
pub const HUB_CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// `SignContent` of RFC 9420 §5.1.2 for SignWithLabel / VerifyWithLabel.
pub fn sign_content(
    label: &str,
    content: &[u8],
) -> Result<Vec<u8>, openmls::prelude::tls_codec::Error> {
    labeled(label, content)
}

/// `EncryptContext` of RFC 9420 §5.1.3 for EncryptWithLabel / DecryptWithLabel (the HPKE
/// info; the aad is empty).
pub fn encrypt_context(
    label: &str,
    context: &[u8],
) -> Result<Vec<u8>, openmls::prelude::tls_codec::Error> {
    labeled(label, context)
}

fn labeled(label: &str, content: &[u8]) -> Result<Vec<u8>, openmls::prelude::tls_codec::Error> {
    use openmls::prelude::tls_codec::Serialize as _;
    let mut out =
        openmls::prelude::tls_codec::VLBytes::new(format!("MLS 1.0 {label}").into_bytes())
            .tls_serialize_detached()?;
    out.extend(
        openmls::prelude::tls_codec::VLBytes::new(content.to_vec()).tls_serialize_detached()?,
    );
    Ok(out)
}

/// The label of the GroupInfoRequest signature (protocol-06 §5.6).
pub const REQUEST_LABEL: &str = "GroupInfoRequestTBS";
/// The label of the GroupInfoResponse signature.
pub const RESPONSE_LABEL: &str = "GroupInfoResponseTBS";
/// The label of the KeyMaterialRequest signature (protocol-06 §5.2).
pub const KEY_MATERIAL_REQUEST_LABEL: &str = "KeyMaterialRequestTBS";
/// The label of the GroupInfo encryption.
pub const ENCRYPT_LABEL: &str = "GroupInfo and ratchet_tree encryption";

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

    /// A validator whose GroupInfoResponses name the hub `mimi://<domain>`.
    pub fn for_hub(domain: &str) -> Self {
        Self {
            hub_identity: format!("mimi://{domain}"),
            ..Self::default()
        }
    }

    /// The hub's signature public key (made on first use; lives as long as the validator).
    pub fn hub_signature_key(&self) -> Result<&[u8], MlsReject> {
        Ok(&self.hub_key()?.1)
    }

    fn hub_key(&self) -> Result<&(Vec<u8>, Vec<u8>), MlsReject> {
        if let Some(k) = self.hub_key.get() {
            return Ok(k);
        }
        let k = self
            .crypto
            .signature_key_gen(HUB_CIPHERSUITE.signature_algorithm())
            .map_err(|e| invalid(format!("{e:?}")))?;
        Ok(self.hub_key.get_or_init(|| k))
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
            app_data: app_data_of(&room.group),
        }
    }

    fn leaf_identity(group: &PublicGroup, idx: LeafNodeIndex) -> String {
        group
            .leaf(idx)
            .map(|l| identity(l.credential()))
            .unwrap_or_default()
    }
}

/// The data of `component` in the app_data_dictionary among a GroupContext's extensions
/// (type 6, draft-ietf-mls-extensions). Read from the extension's encoding, so it works
/// whether openmls knows the extension (`extensions-draft`) or keeps it as unknown.
pub fn app_data_component(
    extensions: &openmls::prelude::Extensions<openmls::prelude::GroupContext>,
    component: u16,
) -> Option<Vec<u8>> {
    use mimi_wire::proto::room::{SafeAad, SafeAadItem};
    use openmls::prelude::tls_codec::Serialize as _;
    extensions.iter().find_map(|ext| {
        // `Extension` is { u16 type; opaque data<V> }, the shape of a SafeAADItem; the
        // dictionary is a list of { ComponentID; opaque data<V> }, the shape of SafeAAD.
        let ext = SafeAadItem::decode(&ext.tls_serialize_detached().ok()?).ok()?;
        if ext.component_id != APP_DATA_DICTIONARY {
            return None;
        }
        SafeAad::decode(ext.aad_item_data.as_slice())
            .ok()?
            .item(component)
            .map(<[u8]>::to_vec)
    })
}

/// The app_data_dictionary extension type (draft-ietf-mls-extensions).
pub const APP_DATA_DICTIONARY: u16 = 0x0006;

/// The group's app_data_dictionary, by component id.
fn app_data_of(group: &PublicGroup) -> BTreeMap<u16, Vec<u8>> {
    group
        .group_context()
        .extensions()
        .app_data_dictionary()
        .map(|d| {
            d.dictionary()
                .entries()
                .map(|e| (e.id(), e.data().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// The dictionary after the AppDataUpdate proposals of one commit (draft-ietf-mls-extensions
/// §4.7: per component, one remove or one or more updates in commit order), as openmls
/// stages it, and each changed component before and after.
fn resolve_app_data<'a>(
    group: &PublicGroup,
    proposals: impl IntoIterator<Item = &'a AppDataUpdateProposal>,
) -> Result<(Option<AppDataUpdates>, Vec<AppDataChange>), MlsReject> {
    resolve_app_data_updates(group.app_data_dictionary_updater(), proposals)
}

/// [`resolve_app_data`] over any group's updater (a member's `MlsGroup` or commit builder
/// too), so clients compute the dictionary exactly as the hub does.
pub fn resolve_app_data_updates<'a>(
    mut updater: openmls::prelude::AppDataDictionaryUpdater<'_>,
    proposals: impl IntoIterator<Item = &'a AppDataUpdateProposal>,
) -> Result<(Option<AppDataUpdates>, Vec<AppDataChange>), MlsReject> {
    let mut by_component: BTreeMap<u16, Vec<&AppDataUpdateOperation>> = BTreeMap::new();
    for p in proposals {
        by_component
            .entry(p.component_id())
            .or_default()
            .push(p.operation());
    }
    let mut changes = Vec::with_capacity(by_component.len());
    for (id, ops) in by_component {
        let before = updater.old_value(id).map(<[u8]>::to_vec);
        let after = match ops.as_slice() {
            [AppDataUpdateOperation::Remove] => {
                if before.is_none() {
                    return Err(MlsReject::Invalid(format!(
                        "app data component {id:#06x} removed but absent"
                    )));
                }
                updater.remove(&id);
                None
            }
            ops => {
                let mut data = before.clone();
                for op in ops {
                    let AppDataUpdateOperation::Update(update) = op else {
                        return Err(MlsReject::Invalid(format!(
                            "app data component {id:#06x} both updated and removed"
                        )));
                    };
                    data = Some(apply_update(id, data.as_deref(), update.as_slice())?);
                }
                let data = data.unwrap_or_default();
                updater.set(openmls::component::ComponentData::from_parts(
                    id,
                    data.clone().into(),
                ));
                Some(data)
            }
        };
        changes.push(AppDataChange {
            component: id,
            before,
            after,
        });
    }
    Ok((updater.changes(), changes))
}

/// One update of component `id`: the participant list applies it as a diff, any other
/// component takes it as its new data.
fn apply_update(id: u16, current: Option<&[u8]>, update: &[u8]) -> Result<Vec<u8>, MlsReject> {
    if id != component::PARTICIPANT_LIST {
        return Ok(update.to_vec());
    }
    let list = match current {
        Some(b) => ParticipantListData::decode(b)
            .map_err(|e| MlsReject::Invalid(format!("stored participant list: {e}")))?,
        None => ParticipantListData::default(),
    };
    let update = ParticipantListUpdate::decode(update)
        .map_err(|e| MlsReject::Invalid(format!("participant list update: {e}")))?;
    let after = list
        .apply(&update)
        .map_err(|e| MlsReject::Invalid(format!("participant list update: {e}")))?;
    after.encode().map_err(invalid)
}

/// Who leaves by SelfRemove, and the members (one user URI per leaf, by leaf index) once
/// `staged` is merged: removals blank leaves, updates may change a leaf's credential, each
/// added member and an external joiner take the leftmost blank leaf (RFC 9420 §12.1.1).
fn members_after(
    group: &PublicGroup,
    staged: &StagedCommit,
    joiner: Option<&String>,
) -> (Vec<String>, Vec<String>) {
    let mut leaves: BTreeMap<u32, String> = group
        .members()
        .map(|m| (m.index.u32(), identity(&m.credential)))
        .collect();
    let mut self_removed = Vec::new();
    for q in staged.queued_proposals() {
        match (q.proposal(), q.sender()) {
            (Proposal::Update(u), Sender::Member(i)) => {
                leaves.insert(i.u32(), identity(u.leaf_node().credential()));
            }
            (Proposal::Remove(rm), _) => {
                leaves.remove(&rm.removed().u32());
            }
            (Proposal::SelfRemove, Sender::Member(i)) => {
                if let Some(who) = leaves.remove(&i.u32()) {
                    self_removed.push(who);
                }
            }
            _ => {}
        }
    }
    let place = |leaves: &mut BTreeMap<u32, String>, who: String| {
        let free = (0u32..)
            .find(|i| !leaves.contains_key(i))
            .unwrap_or(u32::MAX);
        leaves.insert(free, who);
    };
    for add in staged.add_proposals() {
        let who = identity(add.add_proposal().key_package().leaf_node().credential());
        place(&mut leaves, who);
    }
    if let Some(who) = joiner {
        place(&mut leaves, who.clone());
    }
    (self_removed, leaves.into_values().collect())
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
            agent: franking_agent_key(&group),
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
            agent: franking_agent_key(&group),
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
        let content = match processed.into_content() {
            ProcessedMessageContent::UnresolvedAppDataCommit(unresolved) => {
                let (updates, changes) =
                    resolve_app_data(&r.group, unresolved.app_data_update_proposals())?;
                effect.app_data = changes;
                let staged = r
                    .group
                    .stage_app_data_commit(&self.crypto, *unresolved, updates)
                    .map_err(|e| {
                        debug!(room, error = %e, "app data commit failed validation");
                        invalid(e)
                    })?;
                ProcessedMessageContent::StagedCommitMessage(Box::new(staged))
            }
            other => other,
        };
        match content {
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
                let (self_removed, members_after) =
                    members_after(&r.group, &staged, external.then_some(&effect.sender));
                effect.self_removed = self_removed;
                effect.members_after = members_after;
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
                    Proposal::SelfRemove => effect.self_removed.push(effect.sender.clone()),
                    // What it would change if committed alone now; the commit is checked again.
                    Proposal::AppDataUpdate(u) => {
                        effect.app_data = resolve_app_data(&r.group, [u.as_ref()])?.1;
                    }
                    _ => {}
                }
                effect.members_after = r.group.members().map(|m| identity(&m.credential)).collect();
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
        r.agent = franking_agent_key(&r.group);
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

    fn group_info_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        let req = GroupInfoRequest::decode(request).map_err(invalid)?;
        if req.cipher_suite != u16::from(HUB_CIPHERSUITE) {
            return Err(MlsReject::NotAllowed("unsupported ciphersuite".into()));
        }
        let tbs = sign_content(REQUEST_LABEL, &req.tbs().map_err(invalid)?).map_err(invalid)?;
        self.crypto
            .verify_signature(
                HUB_CIPHERSUITE.signature_algorithm(),
                &tbs,
                req.requesting_signature_key.as_slice(),
                req.signature.as_slice(),
            )
            .map_err(|_| MlsReject::NotAllowed("bad GroupInfoRequest signature".into()))?;
        let cred = openmls::prelude::Credential::tls_deserialize_exact(
            req.requesting_credential.as_bytes(),
        )
        .map_err(invalid)?;
        Ok(identity(&cred))
    }

    fn group_info_response(
        &mut self,
        room: &str,
        group_info: &[u8],
        request: &[u8],
    ) -> Result<Vec<u8>, MlsReject> {
        use openmls::prelude::tls_codec::Serialize as _;
        let r = self.rooms.get(room).ok_or(MlsReject::NoGroup)?;
        let req = GroupInfoRequest::decode(request).map_err(invalid)?;
        // The GroupInfo must be of the group's current epoch, else the joiner's commit
        // would be refused with wrongEpoch.
        let vgi = VerifiableGroupInfo::tls_deserialize_exact(group_info).map_err(invalid)?;
        let current = r.group.group_context().epoch();
        if vgi.epoch() != current {
            return Err(MlsReject::WrongEpoch {
                current: current.as_u64(),
            });
        }
        let tree = r
            .group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .map_err(invalid)?;
        // RatchetTreeOption.full holds the node vector's contents (without its length).
        let nodes =
            openmls::prelude::tls_codec::VLBytes::tls_deserialize_exact(&tree).map_err(invalid)?;
        let tbe = GroupInfoRatchetTreeTbe {
            group_info: mimi_wire::proto::GroupInfo::from_bytes(group_info.to_vec())
                .map_err(invalid)?,
            ratchet_tree_option: RatchetTreeOption::Full {
                ratchet_tree: VLBytes::new(nodes.as_slice().to_vec()),
            },
            // Proposals the hub accepted in this epoch are not kept as MLSMessages yet.
            pending_proposals: Vec::new(),
        };
        let info = encrypt_context(ENCRYPT_LABEL, room.as_bytes()).map_err(invalid)?;
        let ct = self
            .crypto
            .hpke_seal(
                HUB_CIPHERSUITE.hpke_config(),
                req.group_info_public_key.as_slice(),
                &info,
                &[],
                &tbe.encode().map_err(invalid)?,
            )
            .map_err(|e| invalid(format!("hpke: {e:?}")))?;
        let (sk, pk) = self.hub_key()?.clone();
        let cred = openmls::prelude::Credential::from(BasicCredential::new(
            self.hub_identity.clone().into_bytes(),
        ))
        .tls_serialize_detached()
        .map_err(invalid)?;
        let mut resp = GroupInfoResponse {
            protocol: Protocol::Mls10,
            room_id: VLBytes::new(room.as_bytes().to_vec()),
            status: GroupInfoStatus::Success {
                cipher_suite: u16::from(HUB_CIPHERSUITE),
                hub_sender: ExternalSender {
                    signature_key: VLBytes::new(pk),
                    credential: mimi_wire::proto::Credential::from_bytes(cred).map_err(invalid)?,
                },
                encrypted_groupinfo_and_tree: mimi_wire::proto::HpkeCiphertext {
                    kem_output: VLBytes::new(ct.kem_output.as_slice().to_vec()),
                    ciphertext: VLBytes::new(ct.ciphertext.as_slice().to_vec()),
                },
                signature: VLBytes::new(Vec::new()),
            },
        };
        let tbs = resp
            .tbs()
            .map_err(invalid)?
            .ok_or_else(|| invalid("no TBS"))?;
        let sig = self
            .crypto
            .sign(
                HUB_CIPHERSUITE.signature_algorithm(),
                &sign_content(RESPONSE_LABEL, &tbs).map_err(invalid)?,
                &sk,
            )
            .map_err(|e| invalid(format!("sign: {e:?}")))?;
        if let GroupInfoStatus::Success { signature, .. } = &mut resp.status {
            *signature = VLBytes::new(sig);
        }
        resp.encode().map_err(invalid)
    }

    // ---- Hub keys ----------------------------------------------------------------------

    fn generate_hub_secret(&mut self) -> Option<Vec<u8>> {
        use openmls_traits::random::OpenMlsRand as _;
        self.crypto.random_vec(32).ok()
    }

    fn set_hub_secret(&mut self, secret: &[u8]) {
        match derive_hub_keys(secret) {
            Ok((sig, franking)) => {
                self.hub_key = std::sync::OnceLock::from(sig);
                self.signer = std::sync::OnceLock::new();
                self.franking_key = Some(franking);
            }
            Err(e) => tracing::error!(error = %e, "cannot derive the hub keys"),
        }
    }

    fn hub_signature_public_key(&self) -> Option<Vec<u8>> {
        self.hub_key.get().map(|(_, pk)| pk.clone())
    }

    // --- Key material (protocol-06 §5.2) ---

    fn key_material_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        let req = KeyMaterialRequest::decode(request).map_err(invalid)?;
        let tbs = sign_content(KEY_MATERIAL_REQUEST_LABEL, &req.tbs().map_err(invalid)?)
            .map_err(invalid)?;
        // The request names no ciphersuite of its own: the signature is under the scheme of
        // one it accepts. Each distinct scheme is tried once (a handful at most).
        let mut schemes = Vec::new();
        for suite in &req.acceptable_ciphersuites {
            if let Ok(cs) = Ciphersuite::try_from(*suite)
                && !schemes.contains(&cs.signature_algorithm())
            {
                schemes.push(cs.signature_algorithm());
            }
        }
        if schemes.is_empty() {
            return Err(MlsReject::NotAllowed(
                "no acceptable ciphersuite this validator knows".into(),
            ));
        }
        let verified = schemes.into_iter().any(|scheme| {
            self.crypto
                .verify_signature(
                    scheme,
                    &tbs,
                    req.requester_signature_key.as_slice(),
                    req.signature.as_slice(),
                )
                .is_ok()
        });
        if !verified {
            return Err(MlsReject::NotAllowed(
                "bad KeyMaterialRequest signature".into(),
            ));
        }
        let cred = openmls::prelude::Credential::tls_deserialize_exact(
            req.requester_credential.as_bytes(),
        )
        .map_err(invalid)?;
        Ok(identity(&cred))
    }

    fn frank(
        &self,
        room: &str,
        franking_tag: &[u8; 32],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
    ) -> Option<mimi_wire::proto::Frank> {
        let hub_key = self.franking_key.as_deref()?;
        let (sk, pk) = self.hub_key.get()?;
        // Only a franking_agent naming this hub's key: else receivers could not verify.
        if self.rooms.get(room)?.agent.as_deref() != Some(pk.as_slice()) {
            debug!(
                room,
                "the room's franking agent is not this hub: not franked"
            );
            return None;
        }
        let ctx = frank::server_franking_context(sender_uri, room_uri, accepted_ms)?;
        let signer = match self.signer.get() {
            Some(s) => s,
            None => {
                let seed: [u8; 32] = sk.as_slice().try_into().ok()?;
                self.signer
                    .get_or_init(|| ed25519_dalek::SigningKey::from_bytes(&seed))
            }
        };
        frank::make_frank(&self.crypto, hub_key, signer, franking_tag, &ctx)
    }

    fn check_reported_frank(
        &self,
        application_data: &[u8],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
        reported: &mimi_wire::proto::Frank,
    ) -> Option<bool> {
        let hub_key = self.franking_key.as_deref()?;
        let Ok(salt) = mimi_wire::content::content_salt(application_data) else {
            return Some(false);
        };
        let (Some(tag), Some(ctx)) = (
            frank::franking_tag(&self.crypto, &salt, application_data),
            frank::server_franking_context(sender_uri, room_uri, accepted_ms),
        ) else {
            return Some(false);
        };
        let ours = frank::server_frank(&self.crypto, hub_key, &tag, &ctx)?;
        Some(frank::constant_time_eq(&ours, &reported.server_frank))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_traits::signatures::Signer as _;

    fn signed_request(user: &str) -> GroupInfoRequest {
        let signer = SignatureKeyPair::new(HUB_CIPHERSUITE.signature_algorithm()).unwrap();
        let cred = openmls::prelude::Credential::from(BasicCredential::new(user.into()))
            .tls_serialize_detached()
            .unwrap();
        let mut req = GroupInfoRequest {
            protocol: Protocol::Mls10,
            cipher_suite: u16::from(HUB_CIPHERSUITE),
            requesting_signature_key: VLBytes::new(signer.public().to_vec()),
            requesting_credential: mimi_wire::proto::Credential::from_bytes(cred).unwrap(),
            group_info_public_key: VLBytes::new(vec![7; 32]),
            joining_code: VLBytes::new(Vec::new()),
            signature: VLBytes::new(Vec::new()),
        };
        let tbs = sign_content(REQUEST_LABEL, &req.tbs().unwrap()).unwrap();
        req.signature = VLBytes::new(signer.sign(&tbs).unwrap());
        req
    }

    fn signed_claim(user: &str, signer: &SignatureKeyPair) -> KeyMaterialRequest {
        let cred = openmls::prelude::Credential::from(BasicCredential::new(user.into()))
            .tls_serialize_detached()
            .unwrap();
        let mut req = KeyMaterialRequest {
            protocol: Protocol::Mls10,
            requesting_user: mimi_wire::proto::IdentifierUri::new(user),
            target_user: mimi_wire::proto::IdentifierUri::new("mimi://b.example/u/bob"),
            room_id: mimi_wire::proto::IdentifierUri::new("mimi://a.example/r/r1"),
            acceptable_ciphersuites: vec![u16::from(HUB_CIPHERSUITE)],
            required_capabilities: mimi_wire::proto::RequiredCapabilities::from_bytes(vec![
                0, 0, 0,
            ])
            .unwrap(),
            requester_signature_key: VLBytes::new(signer.public().to_vec()),
            requester_credential: mimi_wire::proto::Credential::from_bytes(cred).unwrap(),
            signature: VLBytes::new(Vec::new()),
        };
        let tbs = sign_content(KEY_MATERIAL_REQUEST_LABEL, &req.tbs().unwrap()).unwrap();
        req.signature = VLBytes::new(signer.sign(&tbs).unwrap());
        req
    }

    #[test]
    fn key_material_request_signature_is_checked() {
        let v = OpenMlsValidator::for_hub("b.example");
        let user = "mimi://a.example/u/alice";
        let signer = SignatureKeyPair::new(HUB_CIPHERSUITE.signature_algorithm()).unwrap();
        let req = signed_claim(user, &signer);
        assert_eq!(
            v.key_material_requester(&req.encode().unwrap()).unwrap(),
            user
        );
        let refused = |req: &KeyMaterialRequest| {
            matches!(
                v.key_material_requester(&req.encode().unwrap()),
                Err(MlsReject::NotAllowed(_))
            )
        };
        // Another target under the same signature: refused.
        let mut forged = req.clone();
        forged.target_user = mimi_wire::proto::IdentifierUri::new("mimi://b.example/u/carol");
        assert!(refused(&forged));
        // Another room, likewise.
        let mut forged = req.clone();
        forged.room_id = mimi_wire::proto::IdentifierUri::new("mimi://m.example/r/mine");
        assert!(refused(&forged));
        // Signed without the label (plain Sign over the TBS): refused.
        let mut unlabelled = req.clone();
        unlabelled.signature = VLBytes::new(signer.sign(&req.tbs().unwrap()).unwrap());
        assert!(refused(&unlabelled));
        // Another key named in the request than the one that signed: refused.
        let other = SignatureKeyPair::new(HUB_CIPHERSUITE.signature_algorithm()).unwrap();
        let mut swapped = req.clone();
        swapped.requester_signature_key = VLBytes::new(other.public().to_vec());
        assert!(refused(&swapped));
        // No ciphersuite the validator knows: refused, not guessed.
        let mut unknown = signed_claim(user, &signer);
        unknown.acceptable_ciphersuites = vec![0xfefe];
        assert!(refused(&unknown));
    }

    #[test]
    fn hub_keys_follow_the_secret_and_sign_verifiably() {
        let mut v = OpenMlsValidator::for_hub("a.example");
        let secret = v.generate_hub_secret().unwrap();
        v.set_hub_secret(&secret);
        let pk = v.hub_signature_public_key().unwrap();
        // A validator of a restarted hub, given the same secret, has the same key...
        let mut again = OpenMlsValidator::for_hub("a.example");
        again.set_hub_secret(&secret);
        assert_eq!(again.hub_signature_public_key().unwrap(), pk);
        // ...and its signatures verify under the key published before.
        let (sk, _) = again.hub_key().unwrap().clone();
        let sig = again
            .crypto
            .sign(HUB_CIPHERSUITE.signature_algorithm(), b"tbs", &sk)
            .unwrap();
        assert!(
            v.crypto
                .verify_signature(HUB_CIPHERSUITE.signature_algorithm(), b"tbs", &pk, &sig)
                .is_ok()
        );
        // Another secret, another key.
        let mut other = OpenMlsValidator::for_hub("a.example");
        other.set_hub_secret(&[9; 32]);
        assert_ne!(other.hub_signature_public_key().unwrap(), pk);
    }

    #[test]
    fn group_info_request_signature_is_checked() {
        let v = OpenMlsValidator::for_hub("a.example");
        let user = "mimi://b.example/u/dave";
        let req = signed_request(user);
        assert_eq!(
            v.group_info_requester(&req.encode().unwrap()).unwrap(),
            user
        );
        // Another HPKE key under the same signature: refused.
        let mut forged = req;
        forged.group_info_public_key = VLBytes::new(vec![8; 32]);
        assert!(matches!(
            v.group_info_requester(&forged.encode().unwrap()),
            Err(MlsReject::NotAllowed(_))
        ));
    }
}
