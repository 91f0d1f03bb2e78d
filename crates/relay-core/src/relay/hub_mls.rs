//! MLS rooms at the hub (protocol-06 §5.3, §5.4) and key material at the provider (§5.2).
//!
//! A room created with MLS state has every /update checked by the [`MlsValidator`] and by
//! the room's policy ([`crate::room_policy`]: participant list, roles and base policy of
//! draft-ietf-mimi-room-policy) before it is ordered and fanned out like an application
//! message; its followers are the providers of its members.
//! Key packages published by local clients are handed out once each.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::mls::WireFormat;
use mimi_wire::proto::room::{ParticipantListData, SafeAad, UserRolePair};
use mimi_wire::proto::{
    ClientKeyMaterial, ClientKeyMaterialStatus, FanoutExtra, FanoutMessage, GroupInfoOption,
    GroupInfoRequest, GroupInfoResponse, GroupInfoStatus, HandshakeBundle, IdentifierUri,
    KeyMaterialRequest, KeyMaterialResponse, KeyMaterialUserCode, KeyPackage, MlsMessage, Protocol,
    UpdateRequest, UpdateRoomResponse, VLBytes,
};
use mimi_wire::proto::{Frank, SubmitMessageView};
use mimi_wire::uri::{ProviderDomain, RoomId};
use tracing::{debug, info};

use super::refusal::{Forbidden, Malformed, Refusal, UpdateNotAllowed, update_answer};
use super::{Entry, InFlight, Output, Relay, ReplyToken, uri_in_domain, xxh3_128};
use crate::Now;
use crate::mls::{GroupState, HandshakeEffect, MlsReject, MlsValidator};
use crate::room_policy::{self, PolicyRefusal, RoomState};
use crate::store::{InboxRecord, Store, StoreOp};
use crate::transport::{Response, Status, Transmit};

/// Record key spaces (first byte of a [`StoreOp::Record`] key).
const REC_MLS_STATE: u8 = 1;
const REC_MLS_META: u8 = 2;
const REC_KP_OWNER: u8 = 3;
const REC_KEY_PACKAGE: u8 = 4;
const REC_KP_USED: u8 = 5;
/// Not 6: that is the directory's (relay/services.rs), and the two once shared it.
const REC_GROUP_INFO: u8 = 9;
/// The hub secret (one record, key `[15]`): the validator derives the hub's signature key
/// and franking key from it, so they outlive a restart.
const REC_HUB_SECRET: u8 = 15;

/// The hub's MLS view of one hosted room.
#[derive(Debug)]
pub(super) struct MlsRoom {
    pub epoch: u64,
    /// Members, participant list, roles and base policy.
    pub state: RoomState,
    /// The last accepted commit (hash of the /update body and its answer), so an exact retry
    /// is answered with success instead of wrongEpoch.
    pub last_commit: Option<(u128, u64)>,
    /// Refs of the KeyPackages accepted commits added: each may be used once.
    pub used_key_packages: BTreeSet<Vec<u8>>,
    /// The current epoch's GroupInfo (bare struct) as its committer sent it, for /groupInfo;
    /// `None` when the last commit came without a full GroupInfo.
    pub group_info: Option<Bytes>,
}

/// Key packages this provider holds for its local users: user -> client -> (id, KeyPackage).
#[derive(Debug, Default)]
pub(super) struct KeyDirectory {
    pub users: BTreeMap<String, BTreeMap<String, VecDeque<(u64, Bytes)>>>,
    pub next_id: u64,
}

/// MLS and key material state of a [`Relay`].
#[derive(Debug, Default)]
pub(super) struct MlsState {
    pub validator: Option<Box<dyn MlsValidator>>,
    /// Validator calls that panicked (see [`crate::mls::Isolated`]).
    pub panics: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub rooms: HashMap<String, MlsRoom>,
    /// KeyPackageRef -> the provider that handed the KeyPackage out (for the Welcome).
    pub kp_owner: HashMap<Vec<u8>, ProviderDomain>,
    pub keys: KeyDirectory,
}

/// Why a local MLS room could not be created.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MlsRoomError {
    #[error("this relay has no MLS validator")]
    NoValidator,
    #[error("room {0} is not hosted here")]
    NotLocal(String),
    #[error("room {0} exists already")]
    Exists(String),
    #[error("the initial group state was refused")]
    Refused(#[source] MlsReject),
    #[error("the creator {0} is not a user of this provider")]
    ForeignCreator(String),
    #[error("no route to provider {0} of a member")]
    NoRoute(String),
    #[error("the store is out of space: try again later")]
    StorageFull,
    #[error("the initial room state breaks its own policy")]
    Policy(#[source] PolicyRefusal),
}

/// One entry of a hosted room's participant list (protocol-06 §7.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomParticipant {
    pub user: String,
    pub role_index: u32,
    /// The role's name in the room's roles list (empty when it defines none).
    pub role_name: String,
}

fn key(space: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![space];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn user_domain(user: &str) -> Option<&str> {
    user.strip_prefix("mimi://")?.split('/').next()
}

/// The tag after the epoch in a REC_MLS_META record holding a participant list (an older
/// record has the toy roles there, whose first byte is at most 3).
const META_LIST: u8 = 0xff;

/// The epoch and the participant list, which the hub keeps for a room whose group carries
/// none (and writes for every room: the group's own list wins on restore).
fn encode_meta(epoch: u64, state: &RoomState) -> Vec<u8> {
    let mut v = epoch.to_be_bytes().to_vec();
    v.push(META_LIST);
    match state.participants.encode() {
        Ok(l) => v.extend_from_slice(&l),
        Err(e) => tracing::error!(error = %e, "cannot encode a participant list"),
    }
    v
}

/// The participant list of a REC_MLS_META record; an older record's toy roles (banned,
/// regular, admin, owner) map to the default roles 1 to 4.
fn decode_meta(meta: &[u8]) -> Option<ParticipantListData> {
    let rest = meta.get(8..)?;
    if let Some(list) = rest.strip_prefix(&[META_LIST]) {
        return ParticipantListData::decode(list).ok();
    }
    let mut participants = Vec::new();
    let mut b = rest;
    while !b.is_empty() {
        let role = u32::from(*b.first()?);
        let n = usize::from(u16::from_be_bytes([*b.get(1)?, *b.get(2)?]));
        let user = std::str::from_utf8(b.get(3..3 + n)?).ok()?;
        participants.push(UserRolePair {
            user: IdentifierUri::new(user),
            role_index: (role <= 3).then_some(role + 1)?,
        });
        b = b.get(3 + n..)?;
    }
    Some(ParticipantListData { participants })
}

impl Relay {
    /// Gives the core its MLS validator and restores MLS rooms and key material from the
    /// store's records. Call once, right after [`Relay::new`].
    pub fn set_mls_validator(
        &mut self,
        validator: Box<dyn MlsValidator>,
        records: &BTreeMap<Vec<u8>, Bytes>,
    ) {
        let mut validator: Box<dyn MlsValidator> = Box::new(crate::mls::Isolated::new(
            validator,
            self.mls.panics.clone(),
        ));
        let mut used = Vec::new();
        for (k, v) in records {
            match k.split_first() {
                Some((&REC_MLS_STATE, room)) => {
                    let Ok(room) = std::str::from_utf8(room) else {
                        continue;
                    };
                    let kept = records
                        .get(&key(REC_MLS_META, &[room.as_bytes()]))
                        .and_then(|m| decode_meta(m));
                    match validator.restore(room, v).and_then(|g| {
                        RoomState::restored(&g.app_data, g.members, kept)
                            .map(|s| (g.epoch, s))
                            .map_err(|e| MlsReject::NotAllowed(e.to_string()))
                    }) {
                        Ok((epoch, state)) => {
                            self.mls.rooms.insert(
                                room.to_owned(),
                                MlsRoom {
                                    epoch,
                                    state,
                                    last_commit: None,
                                    used_key_packages: BTreeSet::new(),
                                    group_info: records
                                        .get(&key(REC_GROUP_INFO, &[room.as_bytes()]))
                                        .cloned(),
                                },
                            );
                        }
                        Err(e) => tracing::error!(room, error = %e, "stored MLS state refused"),
                    }
                }
                Some((&REC_KP_USED, rest)) => {
                    if let Some(at) = rest.iter().position(|b| *b == 0)
                        && let Ok(room) = std::str::from_utf8(&rest[..at])
                    {
                        used.push((room.to_owned(), rest[at + 1..].to_vec()));
                    }
                }
                Some((&REC_KP_OWNER, r)) => {
                    if let Some(d) = std::str::from_utf8(v)
                        .ok()
                        .and_then(|d| d.parse::<ProviderDomain>().ok())
                    {
                        self.mls.kp_owner.insert(r.to_vec(), d);
                    }
                }
                _ => {}
            }
        }
        for (room, r) in used {
            if let Some(mr) = self.mls.rooms.get_mut(&room) {
                mr.used_key_packages.insert(r);
            }
        }
        self.mls.validator = Some(validator);
    }

    /// Gives the validator the hub secret kept in `records`, or has it make one and keeps
    /// that in the store (commit before answering anyone). Call right after
    /// [`Relay::set_mls_validator`]. Returns whether a new secret was made.
    pub fn handle_hub_secret<S: Store>(
        &mut self,
        store: &mut S,
        records: &BTreeMap<Vec<u8>, Bytes>,
    ) -> bool {
        let Some(v) = self.mls.validator.as_mut() else {
            return false;
        };
        if let Some(secret) = records.get(&[REC_HUB_SECRET][..]) {
            v.set_hub_secret(secret);
            return false;
        }
        let Some(secret) = v.generate_hub_secret() else {
            return false;
        };
        store.apply(StoreOp::Record {
            key: &[REC_HUB_SECRET],
            value: Some(&secret),
        });
        v.set_hub_secret(&secret);
        info!("made the hub secret");
        true
    }

    /// The hub's signature public key (GroupInfoResponses; the franking agent's key), for
    /// followers and clients to pin.
    pub fn hub_signature_public_key(&self) -> Option<Vec<u8>> {
        self.mls.validator.as_ref()?.hub_signature_public_key()
    }

    /// Restores the local key packages (no validator needed). Called from `Relay::new`.
    pub(super) fn restore_key_packages(&mut self, records: &BTreeMap<Vec<u8>, Bytes>) {
        for (k, v) in records {
            let Some((&REC_KEY_PACKAGE, rest)) = k.split_first() else {
                continue;
            };
            // key: user 0 client 0 id(8)
            let mut parts = rest.splitn(3, |b| *b == 0);
            let (Some(user), Some(client), Some(id)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(user), Ok(client), Ok(id)) = (
                std::str::from_utf8(user),
                std::str::from_utf8(client),
                <[u8; 8]>::try_from(id),
            ) else {
                continue;
            };
            let id = u64::from_be_bytes(id);
            self.mls.keys.next_id = self.mls.keys.next_id.max(id + 1);
            self.mls
                .keys
                .users
                .entry(user.to_owned())
                .or_default()
                .entry(client.to_owned())
                .or_default()
                .push_back((id, v.clone()));
        }
    }

    /// The epoch of a hosted MLS room.
    pub fn mls_epoch(&self, room: &str) -> Option<u64> {
        self.mls.rooms.get(room).map(|r| r.epoch)
    }

    /// The participant list of a hosted MLS room, with roles (banned users included).
    pub fn mls_participants(&self, room: &str) -> Option<Vec<RoomParticipant>> {
        let s = &self.mls.rooms.get(room)?.state;
        Some(
            s.participants
                .participants
                .iter()
                .map(|p| RoomParticipant {
                    user: p.user.as_str().to_owned(),
                    role_index: p.role_index,
                    role_name: s.role_name(p.role_index),
                })
                .collect(),
        )
    }

    /// Hosts `room` as an MLS room whose first member (its owner) made the group.
    pub fn handle_create_mls_room<S: Store>(
        &mut self,
        store: &mut S,
        room: RoomId,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<(), MlsRoomError> {
        if room.domain() != self.cfg.local.as_str() {
            return Err(MlsRoomError::NotLocal(room.as_str().to_owned()));
        }
        if self.mls.rooms.contains_key(room.as_str())
            || self.hub.room_by_id.contains_key(room.as_str())
        {
            return Err(MlsRoomError::Exists(room.as_str().to_owned()));
        }
        let Some(v) = self.mls.validator.as_mut() else {
            return Err(MlsRoomError::NoValidator);
        };
        let g = v
            .create(room.as_str(), group_info, ratchet_tree)
            .map_err(MlsRoomError::Refused)?;
        let local = self.cfg.local.as_str().to_owned();
        if let Some(m) = g
            .members
            .iter()
            .find(|m| user_domain(m) != Some(local.as_str()))
        {
            if let Some(v) = self.mls.validator.as_mut() {
                v.discard(room.as_str());
            }
            return Err(MlsRoomError::ForeignCreator(m.clone()));
        }
        let state = match RoomState::created(&g.app_data, g.members.clone()) {
            Ok(s) => s,
            Err(e) => {
                if let Some(v) = self.mls.validator.as_mut() {
                    v.discard(room.as_str());
                }
                return Err(MlsRoomError::Policy(e));
            }
        };
        // The creator's GroupInfo is an MLSMessage: keep the bare struct (after the version
        // and the wire format group_info(4)).
        let group_info = group_info
            .strip_prefix(&[0, 1, 0, 4][..])
            .map(Bytes::copy_from_slice);
        let mr = MlsRoom {
            epoch: g.epoch,
            state,
            last_commit: None,
            used_key_packages: BTreeSet::new(),
            group_info,
        };
        store.apply(StoreOp::Room {
            room: &room,
            followers: &[],
        });
        Self::persist_mls(store, room.as_str(), &mr, &g);
        info!(room = %room, epoch = g.epoch, "hosting MLS room");
        self.mls.rooms.insert(room.as_str().to_owned(), mr);
        self.ensure_room(room, &[]);
        Ok(())
    }

    fn persist_mls<S: Store>(store: &mut S, room: &str, mr: &MlsRoom, g: &GroupState) {
        store.apply(StoreOp::Record {
            key: &key(REC_GROUP_INFO, &[room.as_bytes()]),
            value: mr.group_info.as_deref(),
        });
        store.apply(StoreOp::Record {
            key: &key(REC_MLS_STATE, &[room.as_bytes()]),
            value: Some(&g.state),
        });
        store.apply(StoreOp::Record {
            key: &key(REC_MLS_META, &[room.as_bytes()]),
            value: Some(&encode_meta(mr.epoch, &mr.state)),
        });
    }

    /// The MLS part of /submitMessage for a room with MLS state: the sending user must be an
    /// active participant (listed, not banned, a member: protocol-06 §5.3) and the message of
    /// the current epoch. `None`: go on.
    pub(super) fn check_mls_submit(
        &mut self,
        room: &str,
        sending_uri: &str,
        epoch: Option<u64>,
    ) -> Option<Response> {
        let r = self.mls.rooms.get(room)?;
        let current = r.epoch;
        if let Err(why) = r.state.may_send(sending_uri) {
            debug!(room, %why, "submission refused by the room policy");
            return Some(self.refuse(Refusal::SubmitPolicy(why)));
        }
        match epoch {
            Some(e) if e < current => Some(self.refuse(Refusal::EpochTooOld { current })),
            Some(e) if e == current => None,
            _ => Some(self.refuse(Refusal::SubmitNotAllowed)),
        }
    }

    /// The hub's Frank for an accepted submission (protocol-06 §5.4.1.2): when its
    /// PrivateMessage's authenticated_data is a SafeAAD with a frank_aad item and the
    /// validator franks for the room (its GroupContext names this hub's key).
    pub(super) fn frank_submission(
        &self,
        room: &str,
        view: &SubmitMessageView<'_>,
        accepted_ms: u64,
    ) -> Option<Frank> {
        let v = self.mls.validator.as_ref()?;
        if !self.mls.rooms.contains_key(room) {
            return None;
        }
        let aad = view.app_message.private_authenticated_data()?;
        let tag = SafeAad::franking_tag(aad)?;
        v.frank(room, &tag, view.sending_uri, room, accepted_ms)
    }

    /// The hub's side of /update (from a follower, or from a local client).
    pub(super) fn update<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        sender: &ProviderDomain,
        room: &str,
        body: &Bytes,
    ) -> Response {
        let Some(&ri) = self.hub.room_by_id.get(room) else {
            return self.refuse(Refusal::UnknownRoom);
        };
        let Some(current) = self.mls.rooms.get(room).map(|r| r.epoch) else {
            return self.refuse(Refusal::UpdateNotAllowed(UpdateNotAllowed::NoMlsState));
        };
        // Cheap checks before MLS work: only a provider that takes part in the room (or may
        // join it by the room's policy) gets its handshake validated at all.
        if !self.takes_part(sender, ri, room) {
            return self.refuse(Refusal::UpdateNotAllowed(UpdateNotAllowed::NotParticipant));
        }
        let req = match UpdateRequest::decode(body) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "malformed UpdateRequest");
                return self.refuse(Refusal::Malformed(Malformed::UpdateRequest));
            }
        };
        let body_key = xxh3_128(body);
        if let Some((k, ts)) = self.mls.rooms.get(room).and_then(|r| r.last_commit)
            && k == body_key
        {
            self.stats.dedupe_hits += 1;
            return update_answer(&UpdateRoomResponse::success(ts));
        }
        let msg = req.bundle.message();
        if msg.wire_format() != WireFormat::PublicMessage {
            return self.refuse(Refusal::UpdateNotAllowed(
                UpdateNotAllowed::NotPublicMessage,
            ));
        }
        if let Some(e) = msg.epoch()
            && e != current
        {
            return self.refuse(Refusal::WrongEpoch { current });
        }
        let Some(v) = self.mls.validator.as_mut() else {
            return self.refuse(Refusal::NoMlsValidator);
        };
        let effect = match v.stage(room, msg.as_bytes()) {
            Ok(e) => e,
            Err(reject) => {
                debug!(room, error = %reject, "handshake refused");
                return self.refuse(match reject {
                    MlsReject::WrongEpoch { current } => Refusal::WrongEpoch { current },
                    MlsReject::Invalid(d) => Refusal::InvalidHandshake(d),
                    MlsReject::NotAllowed(d) => {
                        Refusal::UpdateNotAllowed(UpdateNotAllowed::Validator(d))
                    }
                    MlsReject::NoGroup => Refusal::UpdateNotAllowed(UpdateNotAllowed::NoGroup),
                });
            }
        };
        let next = match self.policy(sender, room, &effect) {
            Ok(next) => next,
            Err(why) => {
                if let Some(v) = self.mls.validator.as_mut() {
                    v.discard(room);
                }
                debug!(room, %why, "handshake refused by policy");
                return self.refuse(Refusal::UpdatePolicy(why));
            }
        };
        // A lagging follower loses its backlog, not the room: the commit that removes it
        // must get through.
        self.drop_lagging(now, store, ri);
        let merged = match self.mls.validator.as_mut().map(|v| v.merge(room)) {
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                tracing::error!(room, error = %e, "merging a staged handshake failed");
                return Response::error(Status::Internal, "cannot merge the staged handshake");
            }
            None => return Response::error(Status::Internal, "validator vanished"),
        };

        // The room's new state and participant list.
        let r = &mut self.hub.rooms[ri];
        let accepted_ms = now.unix_ms.max(r.last_ms);
        r.last_ms = accepted_ms;
        let room_id = r.id.clone();
        let before: BTreeSet<ProviderDomain> = r.followers.iter().map(|(f, _)| f.clone()).collect();
        let Some(mr) = self.mls.rooms.get_mut(room) else {
            return Response::error(Status::Internal, "room state vanished");
        };
        mr.epoch = merged.epoch;
        if effect.is_commit {
            // A proposal changes the room once committed.
            mr.state = next;
        }
        mr.state.members = merged.members.clone();
        if effect.is_commit {
            mr.last_commit = Some((body_key, accepted_ms));
            mr.group_info = match &req.bundle {
                HandshakeBundle::Commit {
                    group_info_option: GroupInfoOption::Full(gi),
                    ..
                } => Some(Bytes::copy_from_slice(gi.as_bytes())),
                _ => None,
            };
            for r in &effect.key_package_refs {
                mr.used_key_packages.insert(r.clone());
                store.apply(StoreOp::Record {
                    key: &key(REC_KP_USED, &[room.as_bytes(), r]),
                    value: Some(&[]),
                });
            }
        }
        let after: BTreeSet<ProviderDomain> = mr
            .state
            .members
            .iter()
            .filter_map(|m| user_domain(m)?.parse::<ProviderDomain>().ok())
            .filter(|d| *d != self.cfg.local)
            .collect();
        Self::persist_mls(store, room, mr, &merged);

        // New followers get queues first, so the fan-out below reaches them.
        let all: Vec<ProviderDomain> = before.union(&after).cloned().collect();
        self.ensure_room(room_id.clone(), &all);

        let extra = match &req.bundle {
            HandshakeBundle::Commit { .. } => FanoutExtra::Commit {
                external_proposals: Vec::new(),
            },
            HandshakeBundle::Proposal { more_proposals, .. } => FanoutExtra::Proposal {
                more_proposals: more_proposals.clone(),
            },
        };
        let fanout = match (FanoutMessage {
            timestamp: accepted_ms,
            message: msg.clone(),
            extra,
        })
        .encode()
        {
            Ok(f) => Bytes::from(f),
            Err(_) => return Response::error(Status::Internal, "cannot encode FanoutMessage"),
        };
        // The commit goes to every provider that was in the room (a removed member learns
        // it), the sender's included: its other clients need it, and the committer knows its
        // own by epoch and leaf. Providers new to the room join by the Welcome.
        let mut dests: Vec<ProviderDomain> = before.iter().cloned().collect();
        self.fan_out(now, store, ri, &fanout, &dests, true);

        // The Welcome goes to the providers of the new members' KeyPackages.
        if let HandshakeBundle::Commit {
            welcome: Some(welcome),
            ratchet_tree_option,
            ..
        } = &req.bundle
        {
            let mut targets: BTreeSet<ProviderDomain> = BTreeSet::new();
            for r in &effect.key_package_refs {
                if let Some(p) = self.mls.kp_owner.get(r) {
                    targets.insert(p.clone());
                }
            }
            for u in &effect.added {
                if let Some(d) = user_domain(u).and_then(|d| d.parse::<ProviderDomain>().ok()) {
                    targets.insert(d);
                }
            }
            let mut mls = vec![0, 1, 0, 3]; // mls10, wire format welcome
            mls.extend_from_slice(welcome.as_bytes());
            let msg = MlsMessage::from_bytes(mls);
            let wf = msg.and_then(|message| {
                FanoutMessage {
                    timestamp: accepted_ms,
                    message,
                    extra: FanoutExtra::Welcome {
                        ratchet_tree_option: ratchet_tree_option.clone(),
                    },
                }
                .encode()
            });
            match wf {
                Ok(wf) => {
                    let wf = Bytes::from(wf);
                    let local = targets.remove(&self.cfg.local);
                    dests = targets.into_iter().collect();
                    self.fan_out(now, store, ri, &wf, &dests, local);
                }
                Err(e) => debug!(error = %e, "welcome not fanned out: malformed"),
            }
        }
        // Providers with no member left stop following (their queues still drain).
        let followers: Vec<ProviderDomain> = after.into_iter().collect();
        store.apply(StoreOp::Room {
            room: &room_id,
            followers: &followers,
        });
        self.ensure_room(room_id, &followers);
        self.stats.accepted += 1;
        info!(room, epoch = merged.epoch, commit = effect.is_commit, from = %sender, "handshake accepted");
        update_answer(&UpdateRoomResponse::success(accepted_ms))
    }

    /// The room policy's answer to a staged handshake: the room's state once it is merged.
    /// The hub's own checks (the sender's provider, KeyPackage reuse, routes) come first,
    /// then [`room_policy::authorize`].
    fn policy(
        &self,
        sender: &ProviderDomain,
        room: &str,
        effect: &HandshakeEffect,
    ) -> Result<RoomState, PolicyRefusal> {
        if !uri_in_domain(&effect.sender, sender.as_str()) {
            return Err(PolicyRefusal::SenderNotOfProvider {
                sender: effect.sender.clone(),
                provider: sender.as_str().to_owned(),
            });
        }
        let Some(mr) = self.mls.rooms.get(room) else {
            return Err(PolicyRefusal::InactiveSender {
                user: effect.sender.clone(),
            });
        };
        if effect
            .key_package_refs
            .iter()
            .any(|r| mr.used_key_packages.contains(r))
        {
            return Err(PolicyRefusal::KeyPackageReused);
        }
        for u in &effect.added {
            let Some(d) = user_domain(u).and_then(|d| d.parse::<ProviderDomain>().ok()) else {
                return Err(PolicyRefusal::NotAUserUri { user: u.clone() });
            };
            if d != self.cfg.local && !self.peer_by_domain.contains_key(&d) {
                return Err(PolicyRefusal::NoRoute {
                    provider: d.as_str().to_owned(),
                });
            }
        }
        room_policy::authorize(&mr.state, &effect.sender, effect)
    }

    /// Whether `sender` is this hub, a follower of the room, or a provider whose users take
    /// part in it or may join it (see [`RoomState::provider_takes_part`]).
    fn takes_part(&self, sender: &ProviderDomain, ri: usize, room: &str) -> bool {
        if *sender == self.cfg.local
            || self.hub.rooms[ri]
                .followers
                .iter()
                .any(|(f, _)| f == sender)
        {
            return true;
        }
        self.mls
            .rooms
            .get(room)
            .is_some_and(|mr| mr.state.provider_takes_part(sender.as_str()))
    }

    /// /groupInfo at the hub (protocol-06 §5.6): the requester (a user of the asking
    /// provider, proven by the request's signature) gets the current GroupInfo and ratchet
    /// tree, encrypted to it, if the join policy lets it in; else notAuthorized. An unknown
    /// room gets noSuchRoom.
    pub(super) fn group_info(
        &mut self,
        from: &ProviderDomain,
        room: &str,
        body: &Bytes,
    ) -> Response {
        let code_answer = |status: GroupInfoStatus| {
            let resp = GroupInfoResponse {
                protocol: Protocol::Mls10,
                room_id: VLBytes::new(room.as_bytes().to_vec()),
                status,
            };
            match resp.encode() {
                Ok(v) => Response::new(Status::Ok, v),
                Err(_) => Response::error(Status::Internal, "cannot encode GroupInfoResponse"),
            }
        };
        if GroupInfoRequest::decode(body).is_err() {
            return self.refuse(Refusal::Malformed(Malformed::GroupInfoRequest));
        }
        let Some(mr) = self.mls.rooms.get(room) else {
            return code_answer(GroupInfoStatus::NoSuchRoom);
        };
        let Some(v) = self.mls.validator.as_mut() else {
            return code_answer(GroupInfoStatus::NoSuchRoom);
        };
        let requester = match v.group_info_requester(body) {
            Ok(u) => u,
            Err(e) => {
                debug!(room, error = %e, "GroupInfoRequest refused");
                return self.refuse(Refusal::GroupInfoNotAuthorized {
                    room: room.to_owned(),
                });
            }
        };
        if !uri_in_domain(&requester, from.as_str()) || mr.state.may_join(&requester).is_err() {
            debug!(room, requester, "GroupInfo refused by the join policy");
            return self.refuse(Refusal::GroupInfoNotAuthorized {
                room: room.to_owned(),
            });
        }
        let Some(gi) = mr.group_info.clone() else {
            return Response::error(
                Status::Unavailable,
                "no GroupInfo for the current epoch: the last commit carried none",
            );
        };
        match v.group_info_response(room, &gi, body) {
            Ok(resp) => {
                info!(room, requester, "GroupInfo handed out");
                Response::new(Status::Ok, resp)
            }
            Err(e) => {
                tracing::warn!(room, error = %e, "cannot answer /groupInfo");
                Response::error(Status::Internal, "cannot build the GroupInfoResponse")
            }
        }
    }

    /// Appends one FanoutMessage to the queues of `dests` (and the local inbox), in the
    /// room's order.
    fn fan_out<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        ri: usize,
        fanout: &Bytes,
        dests: &[ProviderDomain],
        local: bool,
    ) {
        let r = &mut self.hub.rooms[ri];
        r.next_seq += 1;
        store.apply(StoreOp::RoomSeq {
            room: &r.id,
            next_seq: r.next_seq,
            last_ms: r.last_ms,
        });
        let accepted_ms = r.last_ms;
        for d in dests {
            let Some(qi) = self.queue_for(&self.hub.rooms[ri].id.clone(), d) else {
                continue;
            };
            let q = &mut self.hub.queues[qi];
            let qseq = q.next_qseq();
            store.apply(StoreOp::Enqueue {
                room: &q.room,
                dest: &q.dest,
                qseq,
                fanout,
            });
            q.entries.push_back(Entry {
                fanout: fanout.clone(),
                enqueued: now.mono,
            });
            self.mark_ready(qi);
        }
        if local {
            let record = InboxRecord {
                room: self.hub.rooms[ri].id.clone(),
                from: self.cfg.local.clone(),
                accepted_ms,
                fanout: fanout.clone(),
            };
            self.deliver_local(store, record);
        }
    }

    /// A local client publishes KeyPackages (bare `KeyPackage` structs) for one of its
    /// clients. Each must be valid now (its leaf node's lifetime holds `now.unix_ms`).
    pub fn handle_publish_key_packages<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        user: &str,
        client: &str,
        key_packages: Vec<Bytes>,
    ) -> Result<usize, &'static str> {
        if user_domain(user) != Some(self.cfg.local.as_str()) {
            return Err("user is not of this provider");
        }
        if client.as_bytes().contains(&0) || user.as_bytes().contains(&0) {
            return Err("NUL in a URI");
        }
        let now_s = now.unix_ms / 1000;
        for kp in &key_packages {
            let Ok(kp) = KeyPackage::from_bytes(kp.to_vec()) else {
                return Err("not a KeyPackage");
            };
            if !kp.lifetime().is_some_and(|l| l.contains(now_s)) {
                return Err("KeyPackage expired or not yet valid");
            }
        }
        let n = key_packages.len();
        for kp in key_packages {
            let id = self.mls.keys.next_id;
            self.mls.keys.next_id += 1;
            store.apply(StoreOp::Record {
                key: &key(
                    REC_KEY_PACKAGE,
                    &[user.as_bytes(), client.as_bytes(), &id.to_be_bytes()],
                ),
                value: Some(&kp),
            });
            self.mls
                .keys
                .users
                .entry(user.to_owned())
                .or_default()
                .entry(client.to_owned())
                .or_default()
                .push_back((id, kp));
        }
        Ok(n)
    }

    /// Answers a KeyMaterialRequest for a local user (its signature and sender already
    /// checked): nothing without the target's consent to the requester (§5.2, §5.7);
    /// else each client's first KeyPackage of an acceptable ciphersuite that is valid now,
    /// handed out once. Expired ones are dropped on the way; not-yet-valid ones wait.
    fn claim_local<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        req: &KeyMaterialRequest,
    ) -> Response {
        let user = req.target_user.as_str().to_owned();
        let mut resp = KeyMaterialResponse {
            protocol: Protocol::Mls10,
            user_status: KeyMaterialUserCode::UserUnknown,
            user_uri: req.target_user.clone(),
            clients: Vec::new(),
        };
        // Consent first: without it the answer says nothing of the user or its clients.
        let consent = self.claim_consent(req.requesting_user.as_str(), &user, req.room_id.as_str());
        if let Err(code) = consent {
            debug!(target = user, code = ?code, "key material claim without consent");
            self.stats.consent_denials += 1;
            resp.user_status = code;
        } else if let Some(clients) = self.mls.keys.users.get_mut(&user) {
            let now_s = now.unix_ms / 1000;
            let acceptable = |kp: &Bytes| {
                let suite = kp.get(2..4).map(|s| u16::from_be_bytes([s[0], s[1]]));
                req.acceptable_ciphersuites.is_empty()
                    || suite.is_some_and(|s| req.acceptable_ciphersuites.contains(&s))
            };
            let lifetime = |kp: &Bytes| {
                mimi_wire::mls::key_package_lifetime(kp, &mimi_wire::Limits::default())
                    .ok()
                    .flatten()
            };
            let mut ok = 0;
            for (client, kps) in clients.iter_mut() {
                // Expired KeyPackages are never handed out (§5.2): drop them for good.
                kps.retain(|(id, kp)| {
                    let live = lifetime(kp).is_some_and(|l| l.not_after >= now_s);
                    if !live {
                        store.apply(StoreOp::Record {
                            key: &key(
                                REC_KEY_PACKAGE,
                                &[user.as_bytes(), client.as_bytes(), &id.to_be_bytes()],
                            ),
                            value: None,
                        });
                    }
                    live
                });
                let valid_now = |kp: &Bytes| lifetime(kp).is_some_and(|l| l.contains(now_s));
                let status = if !kps.iter().any(|(_, kp)| valid_now(kp)) {
                    ClientKeyMaterialStatus::KeyMaterialExhausted
                } else if let Some(i) = kps
                    .iter()
                    .position(|(_, kp)| acceptable(kp) && valid_now(kp))
                {
                    let Some((id, kp)) = kps.remove(i) else {
                        continue;
                    };
                    store.apply(StoreOp::Record {
                        key: &key(
                            REC_KEY_PACKAGE,
                            &[user.as_bytes(), client.as_bytes(), &id.to_be_bytes()],
                        ),
                        value: None,
                    });
                    match KeyPackage::from_bytes(kp.to_vec()) {
                        Ok(key_package) => {
                            ok += 1;
                            ClientKeyMaterialStatus::Success { key_package }
                        }
                        Err(_) => ClientKeyMaterialStatus::KeyMaterialExhausted,
                    }
                } else {
                    ClientKeyMaterialStatus::NothingCompatible {
                        client_capabilities: None,
                    }
                };
                resp.clients.push(ClientKeyMaterial {
                    client_uri: IdentifierUri::new(client.clone()),
                    status,
                });
            }
            // A local user is being added to the room: its events (the Welcome first) are
            // wanted here. Only on a real claim, so naming rooms costs a KeyPackage each.
            if ok > 0
                && let Ok(room) = req.room_id.as_str().parse::<RoomId>()
            {
                self.follow(store, &room);
            }
            resp.user_status = if ok == 0 {
                KeyMaterialUserCode::NoCompatibleMaterial
            } else if ok == resp.clients.len() {
                KeyMaterialUserCode::Success
            } else {
                KeyMaterialUserCode::PartialSuccess
            };
            if ok > 0 {
                self.stats.key_claims += 1;
            }
        }
        match resp.encode() {
            Ok(v) => Response::new(Status::Ok, v),
            Err(_) => Response::error(Status::Internal, "cannot encode KeyMaterialResponse"),
        }
    }

    /// /keyMaterial from a peer or a local client. Answered here for local users; a hub
    /// forwards claims for a room it hosts to the target's provider and remembers whose
    /// KeyPackages it saw; a local client's other claims go to the room's hub (or, outside
    /// a room, to the target's provider).
    ///
    /// Who may claim for whom. protocol-06 §5.2 has the requester's provider send the claim
    /// to the room's hub, which forwards it to the target's provider; the request is signed
    /// by the requester (SignWithLabel over KeyMaterialRequestTBS), checked wherever the
    /// claim is handled, and its credential must name `requestingUser`.
    /// * A local client claims as a local `requestingUser` only.
    /// * At the room's hub, a peer's claim comes from `requestingUser`'s own provider, which
    ///   takes part in the room; in a room with MLS state `requestingUser` is a member.
    /// * At the target's provider, a peer's claim comes from `requestingUser`'s provider, or
    ///   from the hub of the named room: the provider the room URI itself names. Claims
    ///   outside a room come only from `requestingUser`'s provider.
    /// * Anyone else refuses a peer's claim: no forwarding for others.
    /// * The target must have granted `requestingUser` consent (for this room or for all
    ///   rooms, not revoked since), and each peer claims at its own rate.
    ///
    /// What is left to trust: the target's provider cannot check that a hub forwarding for
    /// another provider's requester really was asked by it (the draft gives it nothing to
    /// check with; with basic credentials the signature proves only that the sender holds
    /// the key it names). So a peer naming a room of its own can claim as anyone's user; it
    /// gets KeyPackages only of targets that granted that user consent, at its own rate, and
    /// the Welcome it could make goes into a room it hosts, under its own name.
    pub(super) fn key_material<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        token: ReplyToken,
        from: &ProviderDomain,
        target: &str,
        body: &Bytes,
    ) -> Option<Response> {
        let per_minute = self.cfg.key_claims_per_minute;
        if let Some(r) = self.over_rate(now, from, super::services::RATE_KEY_CLAIMS, per_minute) {
            return Some(r);
        }
        let req = match KeyMaterialRequest::decode(body) {
            Ok(r) => r,
            Err(_) => {
                return Some(self.refuse(Refusal::Malformed(Malformed::KeyMaterialRequest)));
            }
        };
        if req.target_user.as_str() != target {
            return Some(self.refuse(Refusal::Malformed(Malformed::TargetUserMismatch)));
        }
        let Some(target_domain) =
            user_domain(target).and_then(|d| d.parse::<ProviderDomain>().ok())
        else {
            return Some(self.refuse(Refusal::Malformed(Malformed::TargetUserNotMimi)));
        };
        let room = req.room_id.as_str();
        let room_hub = if room.is_empty() {
            None
        } else {
            match room
                .parse::<RoomId>()
                .ok()
                .and_then(|r| r.domain().parse::<ProviderDomain>().ok())
            {
                Some(h) => Some(h),
                None => {
                    return Some(self.refuse(Refusal::Malformed(Malformed::RoomIdNotRoomUri)));
                }
            }
        };
        let local = self.cfg.local.clone();
        let requester = req.requesting_user.as_str();
        let own_provider = uri_in_domain(requester, from.as_str());
        let target_local = target_domain == local;
        let we_host = room_hub.as_ref() == Some(&local) && self.hub.room_by_id.contains_key(room);
        let allowed = if *from == local {
            own_provider
        } else if target_local {
            own_provider || room_hub.as_ref() == Some(from)
        } else if we_host {
            own_provider && self.claims_in_room(from, room, requester)
        } else {
            false
        };
        if !allowed {
            debug!(
                peer = from.as_str(),
                requester, "key material claim refused"
            );
            return Some(self.refuse(Refusal::Forbidden(Forbidden::RequesterNotOfProvider)));
        }
        if we_host && *from == local && !self.claims_in_room(from, room, requester) {
            return Some(self.refuse(Refusal::Forbidden(Forbidden::RequesterNotMember)));
        }
        let Some(v) = self.mls.validator.as_ref() else {
            return Some(self.refuse(Refusal::KeyMaterialNotServed));
        };
        match v.key_material_requester(body) {
            Ok(u) if u == requester => {}
            Ok(u) => {
                debug!(
                    requester,
                    credential = u,
                    "KeyMaterialRequest of another user"
                );
                return Some(self.refuse(Refusal::Forbidden(Forbidden::CredentialMismatch)));
            }
            Err(e) => {
                debug!(requester, error = %e, "KeyMaterialRequest signature refused");
                return Some(self.refuse(Refusal::Forbidden(Forbidden::BadSignature)));
            }
        }
        if target_local {
            return Some(self.claim_local(now, store, &req));
        }
        let dest = match room_hub {
            None => target_domain.clone(),
            Some(_) if we_host => target_domain.clone(),
            Some(h) if h == local => {
                return Some(self.refuse(Refusal::UnknownRoom));
            }
            Some(h) => h,
        };
        let remember = we_host.then(|| target_domain.clone());
        self.forward(
            now,
            token,
            dest,
            Endpoint::KeyMaterial,
            target,
            body.clone(),
            remember,
        )
    }

    /// At the hub: whether `provider` takes part in `room` and, in a room with MLS state,
    /// `requester` is a member (only a member can add anyone).
    fn claims_in_room(&self, provider: &ProviderDomain, room: &str, requester: &str) -> bool {
        let Some(&ri) = self.hub.room_by_id.get(room) else {
            return false;
        };
        self.takes_part(provider, ri, room)
            && self
                .mls
                .rooms
                .get(room)
                .is_none_or(|mr| mr.state.members.iter().any(|m| m == requester))
    }

    /// Sends a request to `dest` and answers `token` with its answer. `None` when sent.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        now: Now,
        token: ReplyToken,
        dest: ProviderDomain,
        endpoint: Endpoint,
        target: &str,
        body: Bytes,
        key_material_of: Option<ProviderDomain>,
    ) -> Option<Response> {
        let Some(&peer) = self.peer_by_domain.get(&dest) else {
            return Some(self.refuse(Refusal::NoRouteToProvider));
        };
        let id = self.next_id();
        let deadline = now.mono + self.cfg.transmit_timeout;
        self.inflight.insert(
            id,
            InFlight::Forward {
                token,
                deadline,
                key_material_of,
            },
        );
        self.deadlines.insert((deadline, id));
        let p = &mut self.peers[peer];
        p.stats.transmits += 1;
        self.outputs.push_back(Output::Transmit(Transmit {
            id,
            dest: p.domain.clone(),
            transport: p.kind,
            endpoint,
            target: target.to_owned(),
            seq: None,
            lineage: None,
            body: vec![body],
        }));
        None
    }

    /// A forwarded /keyMaterial answer passing through the hub: remember which provider each
    /// handed-out KeyPackage came from, so the Welcome that uses it reaches that provider.
    pub(super) fn remember_key_material<S: Store>(
        &mut self,
        store: &mut S,
        provider: &ProviderDomain,
        response: &Response,
    ) {
        if response.status != Status::Ok {
            return;
        }
        let Ok(resp) = KeyMaterialResponse::decode(&response.body) else {
            return;
        };
        for c in &resp.clients {
            if let ClientKeyMaterialStatus::Success { key_package } = &c.status
                && let Some(r) = self
                    .mls
                    .validator
                    .as_ref()
                    .and_then(|v| v.key_package_ref(key_package.as_bytes()))
            {
                store.apply(StoreOp::Record {
                    key: &key(REC_KP_OWNER, &[&r]),
                    value: Some(provider.as_str().as_bytes()),
                });
                self.mls.kp_owner.insert(r, provider.clone());
            }
        }
    }

    /// A request from one of this provider's clients for an endpoint other than
    /// /submitMessage: handled here when we are the one to answer, else forwarded.
    pub fn handle_client_request<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        token: ReplyToken,
        endpoint: Endpoint,
        target: &str,
        body: Bytes,
    ) {
        let local = self.cfg.local.clone();
        let response = match endpoint {
            Endpoint::Update if self.hub.room_by_id.contains_key(target) => {
                Some(self.update(now, store, &local, target, &body))
            }
            Endpoint::Update => match target.parse::<RoomId>() {
                Ok(r) => match r.domain().parse::<ProviderDomain>() {
                    Ok(hub) if hub != local => {
                        self.follow(store, &r);
                        // Behind the room's earlier submissions, in order (relay/forward.rs).
                        match self.peer_by_domain.get(&hub) {
                            Some(&peer) => {
                                self.forward_in_room(now, token, peer, endpoint, &r, body)
                            }
                            None => self.forward(now, token, hub, endpoint, target, body, None),
                        }
                    }
                    _ => Some(self.refuse(Refusal::UnknownRoom)),
                },
                Err(_) => Some(self.refuse(Refusal::Malformed(Malformed::NotARoomUri))),
            },
            Endpoint::KeyMaterial => self.key_material(now, store, token, &local, target, &body),
            _ => self.client_service(now, store, token, endpoint, target, body),
        };
        if let Some(response) = response {
            self.outputs.push_back(Output::Reply { token, response });
        }
        self.pump(now);
    }
}
