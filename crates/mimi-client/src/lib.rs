//! Demo MLS clients for mimi-relay.
//!
//! Contract: a [`MlsClient`] is one user with one MLS client (openmls `MlsGroup`, ciphersuite
//! MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519, basic credential whose identity is the user
//! URI) that talks only to its own provider's loopback client API
//! ([`relay_node::client::LocalClient`]). Handshakes go out as PublicMessages (the hub
//! validates them, protocol-06 §5.3); application messages are PrivateMessages the relays
//! never read. [`MlsClient::poll`] reads the provider's inbox and applies what arrived in the
//! hub's order: Welcomes, commits, and application messages it decrypts.
//!
//! Rooms carry their state in the group's app_data_dictionary (draft-ietf-mls-extensions):
//! [`MlsClient::create_room`] puts the creator (as owner), the default roles and base policy
//! there ([`room_policy`]); [`MlsClient::add`] and [`MlsClient::remove`] commit an
//! AppDataUpdate of the participant list beside their Adds and Removes, computed the way the
//! hub's validator computes it ([`relay_mls::resolve_app_data_updates`]).

use std::net::SocketAddr;

pub mod franking;

use bytes::Bytes;
use mimi_wire::proto::room::{ParticipantListData, ParticipantListUpdate, PreAuthData, component};
use mimi_wire::proto::{
    ClientKeyMaterialStatus, ConsentEntry, ConsentOperation, FanoutExtra, FanoutMessage,
    GroupInfoCode, GroupInfoOption, GroupInfoRatchetTreeTbe, GroupInfoRequest, GroupInfoResponse,
    GroupInfoStatus, HandshakeBundle, IdentifierUri, KeyMaterialRequest, KeyMaterialResponse,
    MlsMessage, PartialGroupInfo, Protocol, RatchetTreeOption, RatchetTreePresence,
    SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRequest,
    UpdateRoomResponse, VLBytes,
};
use mimi_wire::uri::RoomId;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::Signer as _;
use relay_node::client::{ClientError, LocalClient, StatusCode};

/// The default room state (roles, base policy, participant-list updates), shared with the
/// hub's tests.
pub mod room_policy {
    pub use mimi_wire::proto::room::{BANNED_ROLE, NO_ROLE, PreAuthData};
    pub use mimi_wire::proto::room_defaults::*;
}

/// The one ciphersuite the demo clients use.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Why a client step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsClientError {
    #[error("local API")]
    Api(#[from] ClientError),
    #[error("the node answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("openmls: {0}")]
    Mls(String),
    #[error("wire: {0}")]
    Wire(#[from] mimi_wire::WireError),
    #[error("no group yet")]
    NoGroup,
    #[error("no key material for {user}: {status:?}")]
    NoKeyMaterial { user: String, status: String },
    #[error("a reported message is not kept (or the messages name several senders)")]
    NotKept,
}

fn mls(e: impl std::fmt::Display) -> MlsClientError {
    MlsClientError::Mls(e.to_string())
}

/// How the hub answered an /update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateResult {
    Accepted,
    WrongEpoch(u64),
    Refused(String),
}

/// How the hub answered a /submitMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitResult {
    Accepted,
    EpochTooOld(u64),
    NotAllowed,
}

/// What [`MlsClient::poll`] saw, in inbox (hub) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined {
        epoch: u64,
    },
    Commit {
        epoch: u64,
        removed_me: bool,
    },
    Message {
        sender: String,
        payload: Vec<u8>,
    },
    /// A group message that arrived before this client joined (for the provider's other
    /// clients): not for us.
    NotJoined,
    /// This client's own commit, fanned out by the hub after the client merged it.
    OwnCommit,
    /// This client's own application message, fanned back by the hub in its order (§5.5);
    /// `payload` is what was sent.
    OwnMessage {
        payload: Vec<u8>,
    },
    /// Could not be applied or decrypted (counted by the demo; must stay 0).
    Failed {
        what: String,
    },
}

/// An Ed25519 signer whose key is expanded once. `SignatureKeyPair::sign` rebuilds the
/// signing key from its seed for every signature, a scalar multiplication as costly as
/// the signature itself; a client signs every message it sends.
struct Ed25519Signer {
    key: ed25519_dalek::SigningKey,
    /// The same key as openmls stores and identifies it.
    pair: SignatureKeyPair,
}

impl Ed25519Signer {
    fn new(provider: &OpenMlsRustCrypto) -> Result<Self, MlsClientError> {
        debug_assert_eq!(CIPHERSUITE.signature_algorithm(), SignatureScheme::ED25519);
        let seed: [u8; 32] = provider.rand().random_array().map_err(mls)?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = key.verifying_key().to_bytes().to_vec();
        let pair = SignatureKeyPair::from_raw(SignatureScheme::ED25519, seed.to_vec(), public);
        Ok(Ed25519Signer { key, pair })
    }

    fn public(&self) -> &[u8] {
        self.pair.public()
    }

    /// The same key again (openmls's key pair is not `Clone` in our feature set).
    fn duplicate(&self) -> Self {
        let pair = SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            self.key.to_bytes().to_vec(),
            self.public().to_vec(),
        );
        Ed25519Signer {
            key: self.key.clone(),
            pair,
        }
    }
}

impl openmls_traits::signatures::Signer for Ed25519Signer {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, openmls_traits::signatures::SignerError> {
        use ed25519_dalek::Signer as _;
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// One user with one MLS client.
pub struct MlsClient {
    pub user: String,
    provider: OpenMlsRustCrypto,
    signer: Ed25519Signer,
    credential: CredentialWithKey,
    group: Option<MlsGroup>,
    /// The epoch this client joined at by external commit (0 otherwise): what its
    /// provider's inbox holds from earlier epochs predates it.
    joined_epoch: u64,
    api: LocalClient,
    inbox_after: u64,
    /// Events polled but not yet taken by [`MlsClient::next_event`].
    backlog: std::collections::VecDeque<Event>,
    /// Application messages sent, recognised when the hub fans them back.
    sent: own::SentLog,
    /// Hubs' published keys (`FrankingAgentData`) by domain: GroupInfoResponses are checked
    /// against them, and a room created here names its hub as franking agent.
    hub_keys: std::collections::BTreeMap<String, Vec<u8>>,
    /// Received messages whose hub Frank verified (protocol-06 §5.4.1.3), and those whose
    /// Frank did not.
    pub franks_verified: u64,
    pub franks_failed: u64,
    /// Verified franked messages, kept for abuse reports.
    kept: franking::Kept,
    /// Past epochs whose application messages stay decryptable (see [`PAST_EPOCHS`]).
    past_epochs: usize,
    /// The MLSMessage of the commit this client built and has not yet seen answered: the
    /// hub may fan it back before its answer arrives (see [`MlsClient::finish_commit`]).
    pending: Option<Vec<u8>>,
}

impl std::fmt::Debug for MlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsClient")
            .field("user", &self.user)
            .field("epoch", &self.epoch())
            .finish()
    }
}

/// Epochs whose application messages a member can still decrypt: a committer merges its
/// commit when the hub accepts it, while messages the hub sequenced before the commit may
/// still wait in its inbox.
const PAST_EPOCHS: usize = 2;

/// What every demo client's leaf supports beyond RFC 9420: the app_data_dictionary and the
/// AppDataUpdate and SelfRemove proposals.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        None,
        Some(&[ExtensionType::AppDataDictionary]),
        Some(&[ProposalType::AppDataUpdate, ProposalType::SelfRemove]),
        None,
    )
}

fn group_config(
    creator: &str,
    franking_agent: Option<&[u8]>,
    past_epochs: usize,
) -> Result<MlsGroupCreateConfig, MlsClientError> {
    let mut dict = AppDataDictionary::new();
    for (id, data) in room_policy::initial_app_data(creator)? {
        dict.insert(id, data);
    }
    if let Some(agent) = franking_agent {
        dict.insert(component::FRANKING_AGENT, agent.to_vec());
    }
    let extensions = Extensions::from_vec(vec![
        Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
            &[ExtensionType::AppDataDictionary],
            &[ProposalType::AppDataUpdate, ProposalType::SelfRemove],
            &[],
        )),
        Extension::AppDataDictionary(AppDataDictionaryExtension::new(dict)),
    ])
    .map_err(mls)?;
    Ok(MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .max_past_epochs(past_epochs)
        .capabilities(capabilities())
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .with_group_context_extensions(extensions)
        .build())
}

/// The participant list in `group`'s app_data_dictionary (empty when it has none).
fn participant_list(group: &MlsGroup) -> Result<ParticipantListData, MlsClientError> {
    match group
        .extensions()
        .app_data_dictionary()
        .and_then(|d| d.dictionary().get(&component::PARTICIPANT_LIST))
    {
        Some(b) => Ok(ParticipantListData::decode(b)?),
        None => Ok(ParticipantListData::default()),
    }
}

fn join_config(past_epochs: usize) -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .max_past_epochs(past_epochs)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build()
}

/// The bare struct inside an MLSMessage (its 4-byte version and wire format header removed).
fn bare(msg: &MlsMessageOut) -> Result<Vec<u8>, MlsClientError> {
    let b = msg.to_bytes().map_err(mls)?;
    Ok(b.get(4..).unwrap_or_default().to_vec())
}

fn status(status: StatusCode, body: &[u8]) -> MlsClientError {
    MlsClientError::Status {
        status: status.as_u16(),
        body: String::from_utf8_lossy(body).into_owned(),
    }
}

impl MlsClient {
    /// A client of `user` (e.g. `mimi://b.example/u/bob`) at the node whose API is `admin`.
    pub fn new(user: &str, admin: SocketAddr) -> Result<Self, MlsClientError> {
        let provider = OpenMlsRustCrypto::default();
        let signer = Ed25519Signer::new(&provider)?;
        signer.pair.store(provider.storage()).map_err(mls)?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(user.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Ok(MlsClient {
            user: user.to_owned(),
            provider,
            signer,
            credential,
            group: None,
            joined_epoch: 0,
            api: LocalClient::new(admin),
            inbox_after: 0,
            backlog: std::collections::VecDeque::new(),
            sent: own::SentLog::default(),
            hub_keys: Default::default(),
            franks_verified: 0,
            franks_failed: 0,
            kept: franking::Kept::default(),
            past_epochs: PAST_EPOCHS,
            pending: None,
        })
    }

    /// A client of `user` talking to its provider through `api` (e.g. one whose sockets open
    /// in another network namespace, as the transport lab's do).
    pub fn with_api(user: &str, api: LocalClient) -> Result<Self, MlsClientError> {
        let mut c = Self::new(user, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        c.api = api;
        Ok(c)
    }

    /// Encrypts `payload` for the current epoch and returns the SubmitMessageRequest body,
    /// without sending it: for a front end that submits many at once (`submitBatch`). An
    /// `EpochTooOld` answer means: apply the pending commits, then encrypt again.
    pub fn encrypt(&mut self, payload: &[u8]) -> Result<Bytes, MlsClientError> {
        let group = self.group.as_mut().ok_or(MlsClientError::NoGroup)?;
        // Franked as `send` franks: MIMI content in a room with a franking agent.
        if let Some(aad) = franking::send_aad(self.provider.crypto(), group, payload) {
            group.set_aad(aad);
        }
        let msg = group
            .create_message(&self.provider, &self.signer, payload)
            .map_err(mls)?;
        let req = SubmitMessageRequest::mls10(msg.to_bytes().map_err(mls)?, self.user.clone())?;
        Ok(Bytes::from(req.encode()?))
    }

    /// A copy of this client with its group state, talking through `api`: to plan on ahead
    /// of time (build or process a commit before it happens, encrypt for the epoch after it)
    /// and to [`MlsClient::adopt`] later in the client's place. Its random numbers are its
    /// own; its counters and logs start empty.
    pub fn fork(&self, api: LocalClient) -> Result<MlsClient, MlsClientError> {
        let provider = OpenMlsRustCrypto::default();
        let values = self
            .provider
            .storage()
            .values
            .read()
            .map_err(|_| MlsClientError::Mls("storage lock poisoned".into()))?
            .clone();
        *provider
            .storage()
            .values
            .write()
            .map_err(|_| MlsClientError::Mls("storage lock poisoned".into()))? = values;
        let group = match &self.group {
            Some(g) => Some(
                MlsGroup::load(provider.storage(), g.group_id())
                    .map_err(mls)?
                    .ok_or(MlsClientError::NoGroup)?,
            ),
            None => None,
        };
        Ok(MlsClient {
            user: self.user.clone(),
            provider,
            signer: self.signer.duplicate(),
            credential: self.credential.clone(),
            group,
            joined_epoch: self.joined_epoch,
            api,
            inbox_after: self.inbox_after,
            backlog: Default::default(),
            sent: Default::default(),
            hub_keys: self.hub_keys.clone(),
            franks_verified: 0,
            franks_failed: 0,
            kept: Default::default(),
            past_epochs: self.past_epochs,
            pending: self.pending.clone(),
        })
    }

    /// Takes the group state of `fork` (a [`MlsClient::fork`] of this client, moved on
    /// since) in place of its own, keeping its API connection, counters and logs.
    pub fn adopt(&mut self, fork: MlsClient) {
        self.provider = fork.provider;
        self.group = fork.group;
        self.pending = fork.pending;
    }

    /// Applies one FanoutMessage read from the provider's inbox by someone else (a reader
    /// shared by several clients of the provider), as [`MlsClient::poll`] does.
    pub fn handle_fanout(&mut self, fanout: &[u8]) -> Event {
        self.apply(fanout)
    }

    /// 16 random bytes, for a MIMI content salt.
    pub fn salt(&self) -> Result<[u8; 16], MlsClientError> {
        use openmls_traits::random::OpenMlsRand as _;
        self.provider
            .rand()
            .random_array::<16>()
            .map_err(|e| MlsClientError::Mls(format!("{e:?}")))
    }

    /// The client's URI (one client per user here).
    pub fn client_uri(&self) -> String {
        format!("{}/c1", self.user)
    }

    /// How many past epochs' application messages the rooms this client creates or joins
    /// from now on keep decryptable (default [`PAST_EPOCHS`]): a reader that holds messages
    /// back while it applies later commits needs more.
    pub fn set_past_epochs(&mut self, epochs: usize) {
        self.past_epochs = epochs;
    }

    pub fn epoch(&self) -> Option<u64> {
        self.group.as_ref().map(|g| g.epoch().as_u64())
    }

    /// User URIs of the group's members, by leaf.
    /// The room's participant list as this client's group has it: (user URI, role index).
    pub fn participants(&self) -> Vec<(String, u32)> {
        self.group
            .as_ref()
            .and_then(|g| participant_list(g).ok())
            .map(|l| {
                l.participants
                    .into_iter()
                    .map(|p| (p.user.as_str().to_owned(), p.role_index))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn members(&self) -> Vec<String> {
        self.group
            .as_ref()
            .map(|g| {
                g.members()
                    .map(|m| String::from_utf8_lossy(m.credential.serialized_content()).into())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Makes `n` KeyPackages and publishes them at the provider.
    pub async fn publish_key_packages(&mut self, n: usize) -> Result<(), MlsClientError> {
        let mut kps = Vec::new();
        for _ in 0..n {
            let b = KeyPackage::builder()
                .leaf_node_capabilities(capabilities())
                .build(
                    CIPHERSUITE,
                    &self.provider,
                    &self.signer,
                    self.credential.clone(),
                )
                .map_err(mls)?;
            kps.push(b.key_package().tls_serialize_detached().map_err(mls)?);
        }
        let (user, client) = (self.user.clone(), self.client_uri());
        self.api.publish_key_packages(&user, &client, &kps).await?;
        Ok(())
    }

    /// Fetches this client's own provider's hub key (`GET /v1/client/hubKey`) and pins it
    /// for that provider's domain.
    pub async fn fetch_hub_key(&mut self) -> Result<Vec<u8>, MlsClientError> {
        let data = self.api.hub_key().await?.to_vec();
        let domain = self
            .user
            .strip_prefix("mimi://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_owned();
        self.hub_keys.insert(domain, data.clone());
        Ok(data)
    }

    /// Pins the published key (`FrankingAgentData`) of the hub at `domain`.
    pub fn pin_hub_key(&mut self, domain: &str, agent_data: Vec<u8>) {
        self.hub_keys.insert(domain.to_owned(), agent_data);
    }

    /// The group config for `room`: with the hub as franking agent when its key is pinned.
    /// The new room's config: its policy components, and the hub as franking agent when
    /// its key is pinned.
    fn room_config(&self, room: &RoomId) -> Result<MlsGroupCreateConfig, MlsClientError> {
        group_config(
            &self.user,
            self.hub_keys.get(room.domain()).map(|k| k.as_slice()),
            self.past_epochs,
        )
    }

    /// Creates the MLS group and has the provider host it as `room`.
    pub async fn create_room(&mut self, room: &RoomId) -> Result<(), MlsClientError> {
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &self.room_config(room)?,
            GroupId::from_slice(room.as_str().as_bytes()),
            self.credential.clone(),
        )
        .map_err(mls)?;
        let gi = group
            .export_group_info(self.provider.crypto(), &self.signer, false)
            .map_err(mls)?
            .to_bytes()
            .map_err(mls)?;
        let tree = group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .map_err(mls)?;
        self.api.create_mls_room(room, &gi, &tree).await?;
        self.group = Some(group);
        Ok(())
    }

    /// Grants (`grant`) or revokes `requester` consent to fetch this user's KeyPackages, for
    /// `room` or (with `None`) for every room (protocol-06 §5.7 updateConsent). The
    /// provider keeps the decision, since it answers the claims, and tells the requester's.
    pub async fn set_consent(
        &mut self,
        requester: &str,
        room: Option<&RoomId>,
        grant: bool,
    ) -> Result<(), MlsClientError> {
        let operation = if grant {
            ConsentOperation::Grant
        } else {
            ConsentOperation::Revoke
        };
        let entry = ConsentEntry {
            operation,
            requester_uri: IdentifierUri::new(requester),
            target_uri: IdentifierUri::new(self.user.clone()),
            room_id: room.map(|r| IdentifierUri::new(r.as_str())),
            client_key_packages: Vec::new(),
            consent_extensions: VLBytes::new(Vec::new()),
        };
        let (st, body) = self
            .api
            .post("/v1/client/updateConsent", Bytes::from(entry.encode()?))
            .await?;
        if !st.is_success() {
            return Err(status(st, &body));
        }
        Ok(())
    }

    /// Claims one KeyPackage of `target` for `room` through the provider and the hub (the
    /// target must have granted this user consent, see [`MlsClient::set_consent`]).
    pub async fn claim(
        &mut self,
        target: &str,
        room: &RoomId,
    ) -> Result<Result<KeyPackage, String>, MlsClientError> {
        let body = self.prepare_claim(target, room)?;
        let (st, body) = self.api.key_material(body).await?;
        self.finish_claim(st, &body)
    }

    /// The signed KeyMaterialRequest of [`MlsClient::claim`], for whoever sends it.
    pub fn prepare_claim(&self, target: &str, room: &RoomId) -> Result<Bytes, MlsClientError> {
        let cred = self
            .credential
            .credential
            .tls_serialize_detached()
            .map_err(mls)?;
        let rc = RequiredCapabilitiesExtension::new(&[], &[], &[])
            .tls_serialize_detached()
            .map_err(mls)?;
        let mut req = KeyMaterialRequest {
            protocol: Protocol::Mls10,
            requesting_user: IdentifierUri::new(self.user.clone()),
            target_user: IdentifierUri::new(target),
            room_id: IdentifierUri::new(room.as_str()),
            acceptable_ciphersuites: vec![u16::from(CIPHERSUITE)],
            required_capabilities: mimi_wire::proto::RequiredCapabilities::from_bytes(rc)?,
            requester_signature_key: VLBytes::new(self.signer.public().to_vec()),
            requester_credential: mimi_wire::proto::Credential::from_bytes(cred)?,
            signature: VLBytes::new(Vec::new()),
        };
        // SignWithLabel(requesterSignatureKey, "KeyMaterialRequestTBS", ..) (§5.2).
        let tbs = relay_mls::sign_content(relay_mls::KEY_MATERIAL_REQUEST_LABEL, &req.tbs()?)
            .map_err(mls)?;
        let sig = self
            .signer
            .sign(&tbs)
            .map_err(|e| MlsClientError::Mls(format!("{e:?}")))?;
        req.signature = VLBytes::new(sig);
        Ok(Bytes::from(req.encode()?))
    }

    /// The KeyPackage in the provider's answer to a claim, validated, or why there is none.
    pub fn finish_claim(
        &self,
        st: StatusCode,
        body: &[u8],
    ) -> Result<Result<KeyPackage, String>, MlsClientError> {
        if !st.is_success() {
            return Err(status(st, body));
        }
        let resp = KeyMaterialResponse::decode(body)?;
        for c in resp.clients {
            if let ClientKeyMaterialStatus::Success { key_package } = c.status {
                let kp = KeyPackageIn::tls_deserialize_exact(key_package.as_bytes())
                    .map_err(mls)?
                    .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(mls)?;
                return Ok(Ok(kp));
            }
        }
        Ok(Err(format!("{:?}", resp.user_status)))
    }

    fn bundle(
        commit: &MlsMessageOut,
        welcome: Option<&MlsMessageOut>,
        group_info: Option<&openmls::messages::group_info::GroupInfo>,
    ) -> Result<Bytes, MlsClientError> {
        let group_info_option = match group_info {
            Some(gi) => GroupInfoOption::Full(mimi_wire::proto::GroupInfo::from_bytes(
                gi.tls_serialize_detached().map_err(mls)?,
            )?),
            None => GroupInfoOption::Partial(PartialGroupInfo {
                ratchet_tree_presence: RatchetTreePresence::NoRatchetTree,
                group_info_extensions: VLBytes::new(Vec::new()),
                signature: VLBytes::new(Vec::new()),
            }),
        };
        let welcome = match welcome {
            Some(w) => Some(mimi_wire::proto::Welcome::from_bytes(bare(w)?)?),
            None => None,
        };
        let req = UpdateRequest {
            bundle: HandshakeBundle::Commit {
                commit: MlsMessage::from_bytes(commit.to_bytes().map_err(mls)?)?,
                welcome,
                group_info_option,
                // The Welcome's GroupInfo carries the tree (ratchet_tree extension).
                ratchet_tree_option: RatchetTreeOption::OutOfBand {
                    tree_signature: VLBytes::new(Vec::new()),
                },
            },
        };
        Ok(Bytes::from(req.encode()?))
    }

    async fn send_commit(
        &mut self,
        room: &RoomId,
        body: Bytes,
    ) -> Result<UpdateResult, MlsClientError> {
        let (st, b) = self.api.update(room, body).await?;
        self.finish_commit(st, &b)
    }

    /// Applies the hub's answer to the UpdateRequest of this client's pending commit (built
    /// by a `prepare_*` method and sent by anyone): merges it if the hub took it (unless its
    /// fan-out, read first, merged it already), drops it otherwise.
    pub fn finish_commit(
        &mut self,
        st: StatusCode,
        body: &[u8],
    ) -> Result<UpdateResult, MlsClientError> {
        if !st.is_success() {
            return Err(status(st, body));
        }
        let resp = UpdateRoomResponse::decode(body)?;
        let group = self.group.as_mut().ok_or(MlsClientError::NoGroup)?;
        self.pending = None;
        let result = match resp.outcome {
            UpdateOutcome::Success { .. } => {
                if group.pending_commit().is_some() {
                    group.merge_pending_commit(&self.provider).map_err(mls)?;
                }
                return Ok(UpdateResult::Accepted);
            }
            UpdateOutcome::WrongEpoch { current_epoch } => UpdateResult::WrongEpoch(current_epoch),
            _ => UpdateResult::Refused(resp.error_description),
        };
        group
            .clear_pending_commit(self.provider.storage())
            .map_err(mls)?;
        Ok(result)
    }

    /// Commits adding `key_packages`, with a Welcome for them.
    pub async fn add(
        &mut self,
        room: &RoomId,
        key_packages: &[KeyPackage],
    ) -> Result<UpdateResult, MlsClientError> {
        let body = self.prepare_add(key_packages)?;
        self.send_commit(room, body).await
    }

    /// Builds (without sending) the commit of [`MlsClient::add`]; it stays pending until
    /// [`MlsClient::finish_commit`].
    pub fn prepare_add(&mut self, key_packages: &[KeyPackage]) -> Result<Bytes, MlsClientError> {
        let group = self.group.as_ref().ok_or(MlsClientError::NoGroup)?;
        let list = participant_list(group)?;
        let mut users: Vec<String> = Vec::new();
        for kp in key_packages {
            let u = String::from_utf8_lossy(kp.leaf_node().credential().serialized_content())
                .into_owned();
            // Another client of a listed user needs no list change.
            if list.role_of(&u) == room_policy::NO_ROLE && !users.contains(&u) {
                users.push(u);
            }
        }
        let update = room_policy::add_participants(
            users.iter().map(String::as_str),
            room_policy::REGULAR_ROLE,
        );
        self.prepare_participants(Some(update), &[], key_packages)
    }

    /// Commits an arbitrary change of the participant list (an AppDataUpdate, when given)
    /// with Removes of `remove` leaves and Adds of `add`: the way to ask the hub for what its
    /// room policy may refuse.
    pub async fn update_participants(
        &mut self,
        room: &RoomId,
        update: Option<ParticipantListUpdate>,
        remove: &[LeafNodeIndex],
        add: &[KeyPackage],
    ) -> Result<UpdateResult, MlsClientError> {
        let body = self.prepare_participants(update, remove, add)?;
        self.send_commit(room, body).await
    }

    fn prepare_participants(
        &mut self,
        update: Option<ParticipantListUpdate>,
        remove: &[LeafNodeIndex],
        add: &[KeyPackage],
    ) -> Result<Bytes, MlsClientError> {
        let app_data = match update.filter(|u| *u != ParticipantListUpdate::default()) {
            Some(u) => vec![(component::PARTICIPANT_LIST, u.encode()?)],
            None => Vec::new(),
        };
        self.prepare_app_data(app_data, remove, add)
    }

    /// Commits Removes of `remove`, Adds of `add` and one AppDataUpdate per (component,
    /// data) in `app_data`, the dictionary updates resolved as the hub's validator resolves
    /// them, and sends it with its Welcome and GroupInfo.
    fn prepare_app_data(
        &mut self,
        app_data: Vec<(u16, Vec<u8>)>,
        remove: &[LeafNodeIndex],
        add: &[KeyPackage],
    ) -> Result<Bytes, MlsClientError> {
        let group = self.group.as_mut().ok_or(MlsClientError::NoGroup)?;
        let mut builder = group
            .commit_builder()
            .propose_adds(add.iter().cloned())
            .propose_removals(remove.iter().copied());
        for (c, data) in app_data {
            builder = builder.add_proposal(Proposal::AppDataUpdate(Box::new(
                AppDataUpdateProposal::update(c, data),
            )));
        }
        let mut stage = builder.load_psks(self.provider.storage()).map_err(mls)?;
        let proposals: Vec<AppDataUpdateProposal> =
            stage.app_data_update_proposals().cloned().collect();
        if !proposals.is_empty() {
            let (updates, _) = relay_mls::resolve_app_data_updates(
                stage.app_data_dictionary_updater(),
                &proposals,
            )
            .map_err(mls)?;
            stage.with_app_data_dictionary_updates(updates);
        }
        let bundle = stage
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .map_err(mls)?
            .stage_commit(&self.provider)
            .map_err(mls)?;
        let welcome = bundle.to_welcome_msg();
        self.pending = Some(bundle.commit().to_bytes().map_err(mls)?);
        Self::bundle(bundle.commit(), welcome.as_ref(), bundle.group_info())
    }

    /// Commits a role change of `user` in the participant list (nothing else).
    pub async fn change_role(
        &mut self,
        room: &RoomId,
        user: &str,
        role_index: u32,
    ) -> Result<UpdateResult, MlsClientError> {
        let body = self.prepare_change_role(user, role_index)?;
        self.send_commit(room, body).await
    }

    /// Builds (without sending) the commit of [`MlsClient::change_role`]; it stays pending
    /// until [`MlsClient::finish_commit`].
    pub fn prepare_change_role(
        &mut self,
        user: &str,
        role_index: u32,
    ) -> Result<Bytes, MlsClientError> {
        let group = self.group.as_ref().ok_or(MlsClientError::NoGroup)?;
        let update = room_policy::change_role(&participant_list(group)?, user, role_index)
            .ok_or_else(|| MlsClientError::Mls(format!("{user} is not listed")))?;
        self.prepare_participants(Some(update), &[], &[])
    }

    /// Commits `preauth` as the room's preauth_list (room-policy §4; the committer's role
    /// needs canChangePreauthorizedUserList), nothing else.
    pub async fn set_preauth(
        &mut self,
        room: &RoomId,
        preauth: &PreAuthData,
    ) -> Result<UpdateResult, MlsClientError> {
        let app_data = vec![(component::PREAUTH_LIST, preauth.encode()?)];
        let body = self.prepare_app_data(app_data, &[], &[])?;
        self.send_commit(room, body).await
    }

    /// Bans `user`: its role becomes banned and its clients are removed.
    pub async fn ban(&mut self, room: &RoomId, user: &str) -> Result<UpdateResult, MlsClientError> {
        let group = self.group.as_ref().ok_or(MlsClientError::NoGroup)?;
        let update =
            room_policy::change_role(&participant_list(group)?, user, room_policy::BANNED_ROLE);
        let leaves = self.leaves_of(user);
        self.update_participants(room, update, &leaves, &[]).await
    }

    /// Leaves the room: a SelfRemove proposal (draft-ietf-mls-extensions §6.3) for another
    /// member to commit.
    pub async fn leave(&mut self, room: &RoomId) -> Result<UpdateResult, MlsClientError> {
        let group = self.group.as_mut().ok_or(MlsClientError::NoGroup)?;
        let proposal = group
            .leave_group_via_self_remove(&self.provider, &self.signer)
            .map_err(mls)?;
        let req = UpdateRequest {
            bundle: HandshakeBundle::Proposal {
                proposal: MlsMessage::from_bytes(proposal.to_bytes().map_err(mls)?)?,
                more_proposals: Vec::new(),
            },
        };
        let (st, b) = self.api.update(room, Bytes::from(req.encode()?)).await?;
        if !st.is_success() {
            return Err(status(st, &b));
        }
        let resp = UpdateRoomResponse::decode(&b)?;
        Ok(match resp.outcome {
            UpdateOutcome::Success { .. } => UpdateResult::Accepted,
            UpdateOutcome::WrongEpoch { current_epoch } => UpdateResult::WrongEpoch(current_epoch),
            _ => UpdateResult::Refused(resp.error_description),
        })
    }

    /// Commits the proposals this client holds (e.g. another member's SelfRemove), dropping
    /// from the participant list users whose last client leaves by them.
    pub async fn commit_pending(&mut self, room: &RoomId) -> Result<UpdateResult, MlsClientError> {
        let group = self.group.as_ref().ok_or(MlsClientError::NoGroup)?;
        let mut list = participant_list(group)?;
        let leaving: Vec<String> = group
            .pending_proposals()
            .filter_map(|p| match (p.proposal(), p.sender()) {
                (Proposal::SelfRemove, Sender::Member(i)) => group
                    .member(*i)
                    .map(|c| String::from_utf8_lossy(c.serialized_content()).into_owned()),
                _ => None,
            })
            .collect();
        let mut update = ParticipantListUpdate::default();
        for user in leaving {
            let clients = self.leaves_of(&user).len();
            let leaving_clients = 1;
            if clients <= leaving_clients
                && let Some(u) = room_policy::remove_participant(&list, &user)
            {
                update.removed_indices.extend(u.removed_indices);
                list.participants.retain(|p| p.user.as_str() != user);
            }
        }
        self.update_participants(room, Some(update), &[], &[]).await
    }

    fn leaves_of(&self, user: &str) -> Vec<LeafNodeIndex> {
        self.group
            .as_ref()
            .map(|g| {
                g.members()
                    .filter(|m| m.credential.serialized_content() == user.as_bytes())
                    .map(|m| m.index)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Commits removing the members whose identity is `user`.
    pub async fn remove(
        &mut self,
        room: &RoomId,
        user: &str,
    ) -> Result<UpdateResult, MlsClientError> {
        let body = self.prepare_remove(user)?;
        self.send_commit(room, body).await
    }

    /// Builds (without sending) the commit of [`MlsClient::remove`]; it stays pending until
    /// [`MlsClient::finish_commit`].
    pub fn prepare_remove(&mut self, user: &str) -> Result<Bytes, MlsClientError> {
        let group = self.group.as_ref().ok_or(MlsClientError::NoGroup)?;
        let update = room_policy::remove_participant(&participant_list(group)?, user);
        let leaves = self.leaves_of(user);
        self.prepare_participants(update, &leaves, &[])
    }

    /// Builds (without sending) a commit that updates the own leaf; it stays pending until
    /// [`MlsClient::send_update`] or [`MlsClient::finish_commit`] learns the hub's answer.
    pub fn prepare_self_update(&mut self) -> Result<Bytes, MlsClientError> {
        let group = self.group.as_mut().ok_or(MlsClientError::NoGroup)?;
        let bundle = group
            .self_update(&self.provider, &self.signer, LeafNodeParameters::default())
            .map_err(mls)?;
        let (commit, _welcome, gi) = bundle.into_contents();
        self.pending = Some(commit.to_bytes().map_err(mls)?);
        Self::bundle(&commit, None, gi.as_ref())
    }

    /// Sends an UpdateRequest built by this client and applies the hub's answer.
    pub async fn send_update(
        &mut self,
        room: &RoomId,
        body: Bytes,
    ) -> Result<UpdateResult, MlsClientError> {
        self.send_commit(room, body).await
    }

    /// Commits an update of the own leaf.
    pub async fn self_update(&mut self, room: &RoomId) -> Result<UpdateResult, MlsClientError> {
        let body = self.prepare_self_update()?;
        self.send_commit(room, body).await
    }

    /// Fetches the room's GroupInfo and ratchet tree through the provider from the hub
    /// (protocol-06 §5.6): a signed GroupInfoRequest with a fresh HPKE key; the answer's
    /// hub signature is checked and its payload decrypted. `Ok(Err(code))`: the hub refused.
    pub async fn fetch_group_info(
        &mut self,
        room: &RoomId,
    ) -> Result<Result<(VerifiableGroupInfo, RatchetTreeIn), GroupInfoCode>, MlsClientError> {
        let crypto = self.provider.crypto();
        let ikm = self.provider.rand().random_vec(32).map_err(mls)?;
        let hpke = crypto
            .derive_hpke_keypair(CIPHERSUITE.hpke_config(), &ikm)
            .map_err(mls)?;
        let cred = self
            .credential
            .credential
            .tls_serialize_detached()
            .map_err(mls)?;
        let mut req = GroupInfoRequest {
            protocol: Protocol::Mls10,
            cipher_suite: u16::from(CIPHERSUITE),
            requesting_signature_key: VLBytes::new(self.signer.public().to_vec()),
            requesting_credential: mimi_wire::proto::Credential::from_bytes(cred)?,
            group_info_public_key: VLBytes::new(hpke.public.clone()),
            joining_code: VLBytes::new(Vec::new()),
            signature: VLBytes::new(Vec::new()),
        };
        let tbs = relay_mls::sign_content(relay_mls::REQUEST_LABEL, &req.tbs()?).map_err(mls)?;
        let sig = self
            .signer
            .sign(&tbs)
            .map_err(|e| MlsClientError::Mls(format!("{e:?}")))?;
        req.signature = VLBytes::new(sig);
        let (st, body) = self
            .api
            .group_info(room, Bytes::from(req.encode()?))
            .await?;
        if !st.is_success() {
            return Err(status(st, &body));
        }
        let resp = GroupInfoResponse::decode(&body)?;
        let tbs = resp.tbs()?;
        let (
            GroupInfoStatus::Success {
                hub_sender,
                encrypted_groupinfo_and_tree,
                signature,
                ..
            },
            Some(tbs),
        ) = (&resp.status, tbs)
        else {
            return Ok(Err(resp.code()));
        };
        let signed = relay_mls::sign_content(relay_mls::RESPONSE_LABEL, &tbs).map_err(mls)?;
        // The hub's published key when pinned (a forged response could carry any key); the
        // carried one otherwise.
        let pinned = match self.hub_keys.get(room.domain()) {
            Some(k) => Some(
                mimi_wire::proto::room::FrankingAgentData::decode(k)?
                    .franking_signature_key
                    .as_slice()
                    .to_vec(),
            ),
            None => None,
        };
        let key = pinned
            .as_deref()
            .unwrap_or(hub_sender.signature_key.as_slice());
        crypto
            .verify_signature(
                CIPHERSUITE.signature_algorithm(),
                &signed,
                key,
                signature.as_slice(),
            )
            .map_err(|_| {
                MlsClientError::Mls("bad hub signature on the GroupInfoResponse".into())
            })?;
        let info = relay_mls::encrypt_context(relay_mls::ENCRYPT_LABEL, room.as_str().as_bytes())
            .map_err(mls)?;
        let ct = openmls_traits::types::HpkeCiphertext {
            kem_output: encrypted_groupinfo_and_tree
                .kem_output
                .as_slice()
                .to_vec()
                .into(),
            ciphertext: encrypted_groupinfo_and_tree
                .ciphertext
                .as_slice()
                .to_vec()
                .into(),
        };
        let plain = crypto
            .hpke_open(CIPHERSUITE.hpke_config(), &ct, &hpke.private, &info, &[])
            .map_err(mls)?;
        let tbe = GroupInfoRatchetTreeTbe::decode(&plain)?;
        let vgi =
            VerifiableGroupInfo::tls_deserialize_exact(tbe.group_info.as_bytes()).map_err(mls)?;
        if pinned.is_none() {
            // No pinned key (a follower's client cannot fetch the hub's): the carried key
            // must be the one the room's members named as its franking agent, in the group
            // context the GroupInfo's signer (a member) signed and openmls verifies on join.
            let agent = relay_mls::app_data_component(
                vgi.group_context().extensions(),
                component::FRANKING_AGENT,
            );
            if let Some(agent) = agent {
                let agent = mimi_wire::proto::room::FrankingAgentData::decode(&agent)?;
                if agent.franking_signature_key.as_slice() != hub_sender.signature_key.as_slice() {
                    return Err(MlsClientError::Mls(
                        "the GroupInfoResponse's hub key is not the room's franking agent".into(),
                    ));
                }
            }
        }
        let RatchetTreeOption::Full { ratchet_tree } = tbe.ratchet_tree_option else {
            return Err(MlsClientError::Mls("the hub sent no ratchet tree".into()));
        };
        let tree = openmls::prelude::tls_codec::VLBytes::new(ratchet_tree.as_slice().to_vec())
            .tls_serialize_detached()
            .map_err(mls)?;
        let tree = RatchetTreeIn::tls_deserialize_exact(&tree).map_err(mls)?;
        Ok(Ok((vgi, tree)))
    }

    /// Joins `room` by external commit (RFC 9420 §12.4.3.2): fetches the GroupInfo from the
    /// hub, commits, and sends the commit by /update. `Ok(Err(code))`: the hub refused the
    /// GroupInfo.
    pub async fn join_external(
        &mut self,
        room: &RoomId,
    ) -> Result<Result<UpdateResult, GroupInfoCode>, MlsClientError> {
        self.join_external_with(room, None).await
    }

    /// Joins `room` by an external commit that also lists this client's user with `role`
    /// (an AppDataUpdate of the participant list in the commit): how an unlisted user takes
    /// the role the room's canOpenJoin or preauth_list gives it (room-policy §8.1.1).
    pub async fn join_external_as(
        &mut self,
        room: &RoomId,
        role: u32,
    ) -> Result<Result<UpdateResult, GroupInfoCode>, MlsClientError> {
        let listing = room_policy::self_listing(&self.user, role);
        self.join_external_with(room, Some(listing)).await
    }

    async fn join_external_with(
        &mut self,
        room: &RoomId,
        listing: Option<ParticipantListUpdate>,
    ) -> Result<Result<UpdateResult, GroupInfoCode>, MlsClientError> {
        let (vgi, tree) = match self.fetch_group_info(room).await? {
            Ok(x) => x,
            Err(code) => return Ok(Err(code)),
        };
        let mut builder = MlsGroup::external_commit_builder()
            .with_ratchet_tree(tree)
            .with_config(join_config(self.past_epochs))
            .build_group(&self.provider, vgi, self.credential.clone())
            .map_err(mls)?
            .leaf_node_parameters(
                LeafNodeParameters::builder()
                    .with_capabilities(capabilities())
                    .build(),
            );
        if let Some(u) = listing {
            builder = builder.add_app_data_update_proposal(AppDataUpdateProposal::update(
                component::PARTICIPANT_LIST,
                u.encode()?,
            ));
        }
        let mut stage = builder.load_psks(self.provider.storage()).map_err(mls)?;
        // The dictionary after the listing, computed as the hub computes it.
        let proposals: Vec<AppDataUpdateProposal> =
            stage.app_data_update_proposals().cloned().collect();
        if !proposals.is_empty() {
            let (updates, _) = relay_mls::resolve_app_data_updates(
                stage.app_data_dictionary_updater(),
                &proposals,
            )
            .map_err(mls)?;
            stage.with_app_data_dictionary_updates(updates);
        }
        let (group, bundle) = stage
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .map_err(mls)?
            .finalize(&self.provider)
            .map_err(mls)?;
        let (commit, _welcome, gi) = bundle.into_contents();
        let body = Self::bundle(&commit, None, gi.as_ref())?;
        let (st, b) = self.api.update(room, body).await?;
        if !st.is_success() {
            return Err(status(st, &b));
        }
        let resp = UpdateRoomResponse::decode(&b)?;
        // An external commit cannot be cleared: a refused one drops the group.
        Ok(Ok(match resp.outcome {
            UpdateOutcome::Success { .. } => {
                let mut group = group;
                group.merge_pending_commit(&self.provider).map_err(mls)?;
                self.joined_epoch = group.epoch().as_u64();
                self.group = Some(group);
                UpdateResult::Accepted
            }
            UpdateOutcome::WrongEpoch { current_epoch } => UpdateResult::WrongEpoch(current_epoch),
            _ => UpdateResult::Refused(resp.error_description),
        }))
    }

    /// Encrypts `payload` and submits it to the room.
    pub async fn send(
        &mut self,
        room: &RoomId,
        payload: &[u8],
    ) -> Result<SubmitResult, MlsClientError> {
        let group = self.group.as_mut().ok_or(MlsClientError::NoGroup)?;
        if let Some(aad) = franking::send_aad(self.provider.crypto(), group, payload) {
            group.set_aad(aad);
        }
        let msg = group
            .create_message(&self.provider, &self.signer, payload)
            .map_err(mls)?;
        let bytes = msg.to_bytes().map_err(mls)?;
        self.sent.note(self.provider.crypto(), &bytes, payload);
        let req = SubmitMessageRequest::mls10(bytes, self.user.clone())?;
        let (st, b) = self.api.submit(room, Bytes::from(req.encode()?)).await?;
        if !st.is_success() {
            return Err(status(st, &b));
        }
        Ok(match SubmitMessageResponse::decode(&b)?.status {
            SubmitStatus::Accepted { .. } => SubmitResult::Accepted,
            SubmitStatus::EpochTooOld { current_epoch } => SubmitResult::EpochTooOld(current_epoch),
            SubmitStatus::NotAllowed => SubmitResult::NotAllowed,
        })
    }

    /// The franked messages this client verified and keeps (for [`MlsClient::report_abuse`]).
    pub fn kept_franks(&self) -> &franking::Kept {
        &self.kept
    }

    /// Reports kept messages `ids` of one sender to the room's hub through this client's
    /// provider (§5.9); the hub checks each frank is its own. Returns the HTTP status.
    pub async fn report_abuse(
        &mut self,
        room: &RoomId,
        ids: &[mimi_wire::content::MessageId],
        note: &str,
    ) -> Result<StatusCode, MlsClientError> {
        let report = self
            .kept
            .report(&self.user, ids, note)
            .ok_or(MlsClientError::NotKept)?;
        self.send_report(room, &report).await
    }

    /// Sends `report` as it is (a test may alter a kept one first).
    pub async fn send_report(
        &mut self,
        room: &RoomId,
        report: &mimi_wire::proto::AbuseReport,
    ) -> Result<StatusCode, MlsClientError> {
        let (st, _) = self
            .api
            .report_abuse(room, Bytes::from(report.encode()?))
            .await?;
        Ok(st)
    }

    /// Reads the provider's inbox (waiting up to `wait_ms` for something) and applies it.
    pub async fn poll(&mut self, wait_ms: u64) -> Result<Vec<Event>, MlsClientError> {
        let items = self.api.inbox(self.inbox_after, 1024, wait_ms).await?;
        let mut events = Vec::new();
        for item in items {
            self.inbox_after = self.inbox_after.max(item.offset);
            events.push(self.apply(&item.fanout));
        }
        Ok(events)
    }

    /// The next event in hub order, polling (up to `wait_ms`) when none is waiting.
    pub async fn next_event(&mut self, wait_ms: u64) -> Result<Option<Event>, MlsClientError> {
        if self.backlog.is_empty() {
            let events = self.poll(wait_ms).await?;
            self.backlog.extend(events);
        }
        Ok(self.backlog.pop_front())
    }

    fn apply(&mut self, fanout: &[u8]) -> Event {
        let failed = |what: String| Event::Failed { what };
        let f = match FanoutMessage::decode(fanout) {
            Ok(f) => f,
            Err(e) => return failed(format!("fanout: {e}")),
        };
        let msg = match MlsMessageIn::tls_deserialize_exact(f.message.as_bytes()) {
            Ok(m) => m,
            Err(e) => return failed(format!("mls message: {e}")),
        };
        if let FanoutExtra::Welcome { .. } = f.extra {
            if self.group.is_some() {
                // A Welcome for others (or one we used already).
                return Event::Joined {
                    epoch: self.epoch().unwrap_or(0),
                };
            }
            let MlsMessageBodyIn::Welcome(w) = msg.extract() else {
                return failed("welcome body".into());
            };
            return match StagedWelcome::new_from_welcome(
                &self.provider,
                &join_config(self.past_epochs),
                w,
                None,
            )
            .and_then(|s| s.into_group(&self.provider))
            {
                Ok(g) => {
                    let epoch = g.epoch().as_u64();
                    self.group = Some(g);
                    Event::Joined { epoch }
                }
                // Not for us: the Welcome names other KeyPackages.
                Err(WelcomeError::NoMatchingKeyPackage) => Event::Joined { epoch: 0 },
                Err(e) => failed(format!("welcome: {e}")),
            };
        }
        if let Some(payload) = self.sent.take(self.provider.crypto(), f.message.as_bytes()) {
            return Event::OwnMessage { payload };
        }
        let joined_epoch = self.joined_epoch;
        let Some(group) = self.group.as_mut() else {
            return Event::NotJoined;
        };
        let pm = match msg.try_into_protocol_message() {
            Ok(p) => p,
            Err(e) => return failed(format!("protocol message: {e}")),
        };
        if pm.epoch().as_u64() < joined_epoch {
            // From before our external join; the last of them is our own join commit.
            return match &pm {
                ProtocolMessage::PublicMessage(p)
                    if matches!(p.sender(), Sender::NewMemberCommit)
                        && p.epoch().as_u64() + 1 == joined_epoch =>
                {
                    Event::OwnCommit
                }
                _ => Event::NotJoined,
            };
        }
        if let ProtocolMessage::PublicMessage(p) = &pm
            && p.epoch() < group.epoch()
            && matches!(p.sender(), Sender::Member(i) if *i == group.own_leaf_index())
        {
            return Event::OwnCommit;
        }
        // Our pending commit, fanned out before the hub's answer reached us: the hub took it
        // (it fans out only what it accepted).
        if self.pending.as_deref() == Some(f.message.as_bytes()) {
            self.pending = None;
            return match group.merge_pending_commit(&self.provider) {
                Ok(()) => Event::OwnCommit,
                Err(e) => failed(format!("merge own commit: {e}")),
            };
        }
        let processed = match group.process_message(&self.provider, pm) {
            Ok(p) => p,
            Err(e) => return failed(format!("process: {e}")),
        };
        let sender =
            String::from_utf8_lossy(processed.credential().serialized_content()).into_owned();
        let aad = processed.aad().to_vec();
        let content = match processed.into_content() {
            // Computed as the hub computes it; a commit the hub took resolves alike.
            ProcessedMessageContent::UnresolvedAppDataCommit(u) => {
                let updates = match relay_mls::resolve_app_data_updates(
                    group.app_data_dictionary_updater(),
                    u.app_data_update_proposals(),
                ) {
                    Ok((updates, _)) => updates,
                    Err(e) => return failed(format!("app data: {e}")),
                };
                match group.stage_app_data_commit(&self.provider, *u, updates) {
                    Ok(c) => ProcessedMessageContent::StagedCommitMessage(Box::new(c)),
                    Err(e) => return failed(format!("app data commit: {e}")),
                }
            }
            other => other,
        };
        match content {
            ProcessedMessageContent::ApplicationMessage(a) => {
                let payload = a.into_bytes();
                if let FanoutExtra::Application { frank: Some(fr) } = &f.extra {
                    let checked = franking::check(
                        self.provider.crypto(),
                        group,
                        fr,
                        &aad,
                        &payload,
                        &sender,
                        f.timestamp,
                    );
                    let room = String::from_utf8_lossy(group.group_id().as_slice()).into_owned();
                    let checked = checked
                        .map_err(franking::ReceiveError::from)
                        .and_then(|()| franking::check_content_uris(&payload, &sender, &room));
                    match checked {
                        Ok(()) => {
                            self.franks_verified += 1;
                            self.kept.keep(franking::Received {
                                sender_uri: sender.clone(),
                                room_uri: room,
                                accepted_ms: f.timestamp,
                                frank: fr.clone(),
                                content: payload.clone(),
                            });
                        }
                        Err(_) => self.franks_failed += 1,
                    }
                }
                Event::Message { sender, payload }
            }
            ProcessedMessageContent::StagedCommitMessage(c) => {
                let removed_me = c.self_removed();
                match group.merge_staged_commit(&self.provider, *c) {
                    Ok(()) => Event::Commit {
                        epoch: group.epoch().as_u64(),
                        removed_me,
                    },
                    Err(e) => failed(format!("merge: {e}")),
                }
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                match group.store_pending_proposal(self.provider.storage(), *p) {
                    Ok(()) => Event::Commit {
                        epoch: group.epoch().as_u64(),
                        removed_me: false,
                    },
                    Err(e) => failed(format!("proposal: {e}")),
                }
            }
            _ => failed("unexpected handshake".into()),
        }
    }
}
mod own;
pub mod scenario;

#[cfg(test)]
mod tests {
    use super::*;

    /// The FanoutMessage the hub makes of a SubmitMessageRequest body.
    fn fanout_of(submit: &[u8]) -> Vec<u8> {
        let req = SubmitMessageRequest::decode(submit).expect("a submit request");
        let mut out = Vec::new();
        mimi_wire::proto::encode_fanout_application(1, req.app_message.as_bytes(), &mut out);
        out
    }

    #[test]
    fn the_expanded_signer_signs_as_openmls_key_pair_does() {
        use openmls_traits::signatures::Signer;
        let provider = OpenMlsRustCrypto::default();
        let signer = Ed25519Signer::new(&provider).expect("a signer");
        let payload = b"FramedContentTBS of some message";
        let fast = signer.sign(payload).expect("signed");
        // Ed25519 is deterministic: the same seed must give the same bytes.
        assert_eq!(fast, signer.pair.sign(payload).expect("signed"));
        let public: [u8; 32] = signer.public().try_into().expect("32 bytes");
        let key = ed25519_dalek::VerifyingKey::from_bytes(&public).expect("a point");
        let sig = ed25519_dalek::Signature::from_slice(&fast).expect("64 bytes");
        assert!(key.verify_strict(payload, &sig).is_ok());
        assert!(key.verify_strict(b"another payload", &sig).is_err());
    }

    /// Alice's group with Bob in it, made directly (no node).
    fn pair() -> (MlsClient, MlsClient) {
        let mut alice = MlsClient::new(
            "mimi://a.example/u/alice",
            "127.0.0.1:9".parse().expect("addr"),
        )
        .expect("alice");
        let mut bob = MlsClient::new(
            "mimi://b.example/u/bob",
            "127.0.0.1:9".parse().expect("addr"),
        )
        .expect("bob");
        let mut group = MlsGroup::new(
            &alice.provider,
            &alice.signer,
            &group_config("mimi://a.example/u/alice", None, PAST_EPOCHS).expect("config"),
            alice.credential.clone(),
        )
        .expect("group");
        let kp = KeyPackage::builder()
            .leaf_node_capabilities(capabilities())
            .build(
                CIPHERSUITE,
                &bob.provider,
                &bob.signer,
                bob.credential.clone(),
            )
            .expect("key package");
        let (_commit, welcome, _gi) = group
            .add_members(&alice.provider, &alice.signer, &[kp.key_package().clone()])
            .expect("add");
        group.merge_pending_commit(&alice.provider).expect("merge");
        alice.group = Some(group);
        let welcome = MlsMessageIn::tls_deserialize_exact(welcome.to_bytes().expect("bytes"))
            .expect("welcome");
        let MlsMessageBodyIn::Welcome(w) = welcome.extract() else {
            panic!("not a welcome");
        };
        let joined =
            StagedWelcome::new_from_welcome(&bob.provider, &join_config(PAST_EPOCHS), w, None)
                .and_then(|s| s.into_group(&bob.provider))
                .expect("join");
        bob.group = Some(joined);
        (alice, bob)
    }

    /// The FanoutMessage the hub makes of the commit in an UpdateRequest body.
    fn commit_fanout_of(update: &[u8]) -> Vec<u8> {
        let req = UpdateRequest::decode(update).expect("an update request");
        let HandshakeBundle::Commit { commit, .. } = req.bundle else {
            panic!("not a commit");
        };
        FanoutMessage {
            timestamp: 1,
            message: commit,
            extra: FanoutExtra::Commit {
                external_proposals: Vec::new(),
            },
        }
        .encode()
        .expect("fanout")
    }

    #[test]
    fn a_pending_commit_fanned_back_before_the_hubs_answer_is_merged_once() {
        let (mut alice, mut bob) = pair();
        let accepted = UpdateRoomResponse::success(1).encode().expect("answer");
        for answer_first in [false, true] {
            let before = alice.epoch().expect("epoch");
            let body = alice.prepare_self_update().expect("commit");
            // Pending: still the old epoch, and a message to it is not our commit.
            assert_eq!(alice.epoch(), Some(before));
            let fanout = commit_fanout_of(&body);
            if answer_first {
                assert!(matches!(
                    alice.finish_commit(StatusCode::OK, &accepted),
                    Ok(UpdateResult::Accepted)
                ));
                assert!(matches!(alice.handle_fanout(&fanout), Event::OwnCommit));
            } else {
                assert!(matches!(alice.handle_fanout(&fanout), Event::OwnCommit));
                assert_eq!(alice.epoch(), Some(before + 1));
                // The answer finds nothing left to merge.
                assert!(matches!(
                    alice.finish_commit(StatusCode::OK, &accepted),
                    Ok(UpdateResult::Accepted)
                ));
            }
            assert_eq!(alice.epoch(), Some(before + 1));
            assert!(
                matches!(bob.handle_fanout(&fanout), Event::Commit { epoch, .. } if epoch == before + 1)
            );
            let msg = alice.encrypt(b"after the commit").expect("encrypt");
            assert!(matches!(
                bob.handle_fanout(&fanout_of(&msg)),
                Event::Message { payload, .. } if payload == b"after the commit"
            ));
        }
        // A refused commit is dropped: the epoch stays, and the next commit can be built.
        let before = alice.epoch().expect("epoch");
        alice.prepare_self_update().expect("commit");
        let refused = UpdateRoomResponse {
            error_description: "no".into(),
            outcome: UpdateOutcome::WrongEpoch {
                current_epoch: before,
            },
        }
        .encode()
        .expect("answer");
        assert!(matches!(
            alice.finish_commit(StatusCode::OK, &refused),
            Ok(UpdateResult::WrongEpoch(e)) if e == before
        ));
        assert_eq!(alice.epoch(), Some(before));
        assert!(alice.prepare_self_update().is_ok());
    }

    #[test]
    fn forks_plan_a_commit_and_the_next_epochs_messages_that_the_clients_then_adopt() {
        let (mut alice, mut bob) = pair();
        let api = || LocalClient::new("127.0.0.1:9".parse().expect("addr"));
        let before = alice.epoch().expect("epoch");
        // Ahead of time: alice's fork commits, bob's fork processes it, both encrypt for the
        // epoch after it.
        let (mut alice_next, mut bob_next) = (
            alice.fork(api()).expect("fork"),
            bob.fork(api()).expect("fork"),
        );
        let body = alice_next.prepare_self_update().expect("commit");
        let accepted = UpdateRoomResponse::success(1).encode().expect("answer");
        alice_next
            .finish_commit(StatusCode::OK, &accepted)
            .expect("merged");
        let commit = commit_fanout_of(&body);
        assert!(matches!(
            bob_next.handle_fanout(&commit),
            Event::Commit { .. }
        ));
        let early = alice_next.encrypt(b"planned").expect("encrypt");
        let early_back = bob_next.encrypt(b"planned back").expect("encrypt");
        // Meanwhile the clients themselves go on in the old epoch.
        let old = alice.encrypt(b"still the old epoch").expect("encrypt");
        assert!(matches!(
            bob.handle_fanout(&fanout_of(&old)),
            Event::Message { payload, .. } if payload == b"still the old epoch"
        ));
        assert_eq!(alice.epoch(), Some(before));
        // The commit happens: each adopts its fork.
        alice.adopt(alice_next);
        bob.adopt(bob_next);
        assert_eq!(alice.epoch(), Some(before + 1));
        assert_eq!(bob.epoch(), Some(before + 1));
        for (to, msg, want) in [
            (&mut bob, &early, &b"planned"[..]),
            (&mut alice, &early_back, &b"planned back"[..]),
        ] {
            assert!(matches!(
                to.handle_fanout(&fanout_of(msg)),
                Event::Message { payload, .. } if payload == want
            ));
        }
        // And they go on from the adopted state: the next message follows the planned one.
        let next = alice.encrypt(b"after").expect("encrypt");
        assert!(matches!(
            bob.handle_fanout(&fanout_of(&next)),
            Event::Message { payload, .. } if payload == b"after"
        ));
        // The commit's own fan-out is recognised as alice's and changes nothing.
        assert!(matches!(alice.handle_fanout(&commit), Event::OwnCommit));
    }

    #[test]
    fn encrypt_and_handle_fanout_carry_a_message_between_members() {
        let (mut alice, mut bob) = pair();
        assert!(matches!(
            MlsClient::new("mimi://c.example/u/c", "127.0.0.1:9".parse().expect("addr"))
                .expect("carol")
                .encrypt(b"x"),
            Err(MlsClientError::NoGroup)
        ));
        let body = alice.encrypt(b"hello bob").expect("encrypt");
        match bob.handle_fanout(&fanout_of(&body)) {
            Event::Message { sender, payload } => {
                assert_eq!(sender, "mimi://a.example/u/alice");
                assert_eq!(payload, b"hello bob");
            }
            other => panic!("bob saw {other:?}"),
        }
        // The same message twice cannot be decrypted twice (its key is gone).
        assert!(matches!(
            bob.handle_fanout(&fanout_of(&body)),
            Event::Failed { .. }
        ));
    }
}
