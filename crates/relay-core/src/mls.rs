//! The hub's MLS policy point, without naming an MLS library.
//!
//! A room the hub hosts with MLS state (created from its first member's GroupInfo and ratchet
//! tree) has its handshake messages checked by an [`MlsValidator`] before they are ordered and
//! fanned out (draft-ietf-mimi-protocol-06 §5.3): a commit for another epoch is refused with
//! the current epoch, the first valid commit of an epoch wins, an invalid commit or proposal
//! is refused. The validator only ever reads public framing (PublicMessage commits and
//! proposals, GroupInfo, KeyPackages, Welcome headers): the hub never decrypts a
//! PrivateMessage. The core keeps the outcome (epoch, participant list, the validator's
//! opaque state) and persists it through the [`crate::Store`].

use std::fmt;

/// What a handshake message does once merged, as far as the hub's policy needs to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandshakeEffect {
    /// The user URI of the member that sent it (for an external commit: the joiner).
    pub sender: String,
    /// Whether it is a commit (else a proposal).
    pub is_commit: bool,
    /// Whether it is an external commit (a join by GroupInfo).
    pub external: bool,
    /// User URIs added by it.
    pub added: Vec<String>,
    /// User URIs removed by it.
    pub removed: Vec<String>,
    /// The epoch after a commit; the current one for a proposal.
    pub epoch: u64,
    /// Refs (hash outputs) of the KeyPackages it adds, so the hub can route the Welcome.
    pub key_package_refs: Vec<Vec<u8>>,
    /// User URIs whose clients left by SelfRemove (draft-ietf-mls-extensions), one per leaf.
    pub self_removed: Vec<String>,
    /// The group's members (user URIs, one per leaf) once this is merged.
    pub members_after: Vec<String>,
    /// The app_data_dictionary components it changes (AppDataUpdate proposals), each with
    /// its data before and after; the hub's room policy judges them.
    pub app_data: Vec<AppDataChange>,
}

/// One component of the group's app_data_dictionary, before and after a handshake
/// (`None`: absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppDataChange {
    pub component: u16,
    pub before: Option<Vec<u8>>,
    pub after: Option<Vec<u8>>,
}

/// The group's public state after a create or a merged commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupState {
    pub epoch: u64,
    /// User URIs of the members (one per leaf; a user with two clients appears twice).
    pub members: Vec<String>,
    /// The group's app_data_dictionary (component id -> data): the room's participant
    /// list, roles and policy live here (protocol-06 §7.5, draft-ietf-mimi-room-policy).
    pub app_data: std::collections::BTreeMap<u16, Vec<u8>>,
    /// The validator's own encoding of its state, persisted by the core and given back to
    /// [`MlsValidator::restore`] after a restart.
    pub state: Vec<u8>,
}

/// Why a handshake message (or a room's initial state) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MlsReject {
    /// The message is for another epoch than the group's current one.
    #[error("wrong epoch: the group is at {current}")]
    WrongEpoch { current: u64 },
    /// The message failed MLS validation (signature, membership tag, tree, proposals).
    #[error("invalid: {0}")]
    Invalid(String),
    /// Valid MLS, refused by the hub's policy (PrivateMessage handshakes, unsupported forms).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The room has no MLS state at this validator.
    #[error("no such group")]
    NoGroup,
}

/// The MLS checks the hub delegates. One implementation lives in `relay-mls` (openmls); the
/// core's tests use a fake. Calls are synchronous and made on the core's thread.
pub trait MlsValidator: fmt::Debug + Send {
    /// Starts tracking `room` from its creator's GroupInfo (an MLSMessage) and the exported
    /// ratchet tree (TLS-encoded `RatchetTree`).
    fn create(
        &mut self,
        room: &str,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<GroupState, MlsReject>;

    /// Restores a room from a state it produced before.
    fn restore(&mut self, room: &str, state: &[u8]) -> Result<GroupState, MlsReject>;

    /// Checks one handshake MLSMessage (a PublicMessage commit or proposal, or an external
    /// commit) against the room's state, and stages it without merging.
    fn stage(&mut self, room: &str, message: &[u8]) -> Result<HandshakeEffect, MlsReject>;

    /// Merges what [`MlsValidator::stage`] staged last (a commit moves to the next epoch, a
    /// proposal is queued for the next commit).
    fn merge(&mut self, room: &str) -> Result<GroupState, MlsReject>;

    /// Drops what was staged (the hub's policy refused it).
    fn discard(&mut self, room: &str);

    /// The ref of a KeyPackage (its MLSMessage or bare struct), as a Welcome names it.
    fn key_package_ref(&self, key_package: &[u8]) -> Option<Vec<u8>>;

    /// Checks a `GroupInfoRequest` (protocol-06 §5.6): its signature by
    /// `requestingSignatureKey`. Returns the requester's identity (the user URI of its
    /// credential). A validator without a GroupInfo service refuses.
    fn group_info_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        let _ = request;
        Err(MlsReject::NotAllowed("no GroupInfo service".into()))
    }

    /// Builds the success `GroupInfoResponse` for `request` (already checked): `group_info`
    /// (a bare GroupInfo of the room's current epoch, as a member made it) with the room's
    /// ratchet tree, HPKE-encrypted to the requester and signed by the hub.
    fn group_info_response(
        &mut self,
        room: &str,
        group_info: &[u8],
        request: &[u8],
    ) -> Result<Vec<u8>, MlsReject> {
        let _ = (room, group_info, request);
        Err(MlsReject::NotAllowed("no GroupInfo service".into()))
    }

    // --- Key material (protocol-06 §5.2) ---

    /// Checks a `KeyMaterialRequest`: `key_material_request_signature` is
    /// SignWithLabel(requesterSignatureKey, "KeyMaterialRequestTBS", KeyMaterialRequestTBS)
    /// under the signature scheme of one of its acceptable ciphersuites. Returns the
    /// requester's identity (the user URI of `requesterCredential`); the core checks it is
    /// `requestingUser`. A validator without a key material service refuses.
    fn key_material_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        let _ = request;
        Err(MlsReject::NotAllowed("no key material service".into()))
    }

    // ---- Hub keys (protocol-06 §5.6, §5.4.1) ------------------------------------------
    // One persistent hub secret, kept by the core as a store record, from which the
    // validator derives the hub's signature key pair and the franking `hub_key`.

    /// A fresh random hub secret, made once when the store holds none. `None`: this
    /// validator has no hub keys.
    fn generate_hub_secret(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Sets the hub secret (from the store, or just generated); the keys derive from it.
    fn set_hub_secret(&mut self, secret: &[u8]) {
        let _ = secret;
    }

    /// The hub's signature public key, derived from the hub secret (`None` before it is set).
    fn hub_signature_public_key(&self) -> Option<Vec<u8>> {
        None
    }

    /// The hub's Frank (protocol-06 §5.4.1.2) for an accepted application message whose
    /// AAD held `franking_tag`: only when the room's GroupContext has a franking_agent
    /// component holding this hub's signature key. `None`: not franked.
    fn frank(
        &self,
        room: &str,
        franking_tag: &[u8; 32],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
    ) -> Option<mimi_wire::proto::Frank> {
        let _ = (room, franking_tag, sender_uri, room_uri, accepted_ms);
        None
    }

    /// Whether `frank` is a server frank this hub made (§5.9 abuse reports): the franking
    /// tag is recomputed from `application_data` (MIMI content) and its salt, then the
    /// server frank under the hub's franking key. `None`: no franking key here.
    fn check_reported_frank(
        &self,
        application_data: &[u8],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
        frank: &mimi_wire::proto::Frank,
    ) -> Option<bool> {
        let _ = (application_data, sender_uri, room_uri, accepted_ms, frank);
        None
    }
}

/// Runs a validator with every call under panic isolation: third-party MLS code that panics on
/// a peer's input becomes a typed refusal and a count, not the end of the core thread. The
/// room's staged state is dropped after such a panic, since it may be half-built.
#[derive(Debug)]
pub struct Isolated {
    inner: Box<dyn MlsValidator>,
    /// Calls that panicked, shared with whoever reports it.
    panics: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Isolated {
    pub fn new(
        inner: Box<dyn MlsValidator>,
        panics: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self { inner, panics }
    }

    fn run<T>(
        &mut self,
        what: &'static str,
        room: &str,
        f: impl FnOnce(&mut dyn MlsValidator) -> Result<T, MlsReject>,
    ) -> Result<T, MlsReject> {
        let inner = &mut *self.inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(inner))) {
            Ok(r) => r,
            Err(_) => {
                self.panics
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    room,
                    call = what,
                    "the MLS validator panicked on this input; refused"
                );
                let inner = &mut *self.inner;
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.discard(room)));
                Err(MlsReject::Invalid(format!(
                    "the MLS validator failed on this input ({what})"
                )))
            }
        }
    }

    /// [`Isolated::run`] for the read-only calls: a panic is counted, logged and refused.
    fn look<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&dyn MlsValidator) -> Result<T, MlsReject>,
    ) -> Result<T, MlsReject> {
        let inner = &*self.inner;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(inner))).unwrap_or_else(|_| {
            self.panics
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                call = what,
                "the MLS validator panicked on this input; refused"
            );
            Err(MlsReject::Invalid(format!(
                "the MLS validator failed on this input ({what})"
            )))
        })
    }

    /// [`Isolated::look`] for calls whose answer is optional: a panic is `None`.
    fn look_opt<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&dyn MlsValidator) -> Option<T>,
    ) -> Option<T> {
        self.look(what, |v| Ok(f(v))).ok().flatten()
    }
}

impl MlsValidator for Isolated {
    fn create(
        &mut self,
        room: &str,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<GroupState, MlsReject> {
        self.run("create", room, |v| v.create(room, group_info, ratchet_tree))
    }

    fn restore(&mut self, room: &str, state: &[u8]) -> Result<GroupState, MlsReject> {
        self.run("restore", room, |v| v.restore(room, state))
    }

    fn stage(&mut self, room: &str, message: &[u8]) -> Result<HandshakeEffect, MlsReject> {
        self.run("stage", room, |v| v.stage(room, message))
    }

    fn merge(&mut self, room: &str) -> Result<GroupState, MlsReject> {
        self.run("merge", room, |v| v.merge(room))
    }

    fn discard(&mut self, room: &str) {
        let _ = self.run("discard", room, |v| {
            v.discard(room);
            Ok(())
        });
    }

    fn key_package_ref(&self, key_package: &[u8]) -> Option<Vec<u8>> {
        self.look_opt("key_package_ref", |v| v.key_package_ref(key_package))
    }

    fn group_info_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        self.look("group_info_requester", |v| v.group_info_requester(request))
    }

    fn group_info_response(
        &mut self,
        room: &str,
        group_info: &[u8],
        request: &[u8],
    ) -> Result<Vec<u8>, MlsReject> {
        self.run("group_info_response", room, |v| {
            v.group_info_response(room, group_info, request)
        })
    }

    // ---- Hub keys ----------------------------------------------------------------------

    fn generate_hub_secret(&mut self) -> Option<Vec<u8>> {
        self.run("generate_hub_secret", "", |v| Ok(v.generate_hub_secret()))
            .ok()
            .flatten()
    }

    fn set_hub_secret(&mut self, secret: &[u8]) {
        let _ = self.run("set_hub_secret", "", |v| {
            v.set_hub_secret(secret);
            Ok(())
        });
    }

    fn hub_signature_public_key(&self) -> Option<Vec<u8>> {
        self.look_opt("hub_signature_public_key", |v| v.hub_signature_public_key())
    }

    // --- Key material (protocol-06 §5.2) ---

    fn key_material_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        self.look("key_material_requester", |v| {
            v.key_material_requester(request)
        })
    }

    fn frank(
        &self,
        room: &str,
        franking_tag: &[u8; 32],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
    ) -> Option<mimi_wire::proto::Frank> {
        self.look_opt("frank", |v| {
            v.frank(room, franking_tag, sender_uri, room_uri, accepted_ms)
        })
    }

    fn check_reported_frank(
        &self,
        application_data: &[u8],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
        frank: &mimi_wire::proto::Frank,
    ) -> Option<bool> {
        self.look_opt("check_reported_frank", |v| {
            v.check_reported_frank(application_data, sender_uri, room_uri, accepted_ms, frank)
        })
    }
}
