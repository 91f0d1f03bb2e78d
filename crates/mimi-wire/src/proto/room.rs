//! Room state as MLS application components (draft-ietf-mimi-protocol-06 §7.5, §5.4.1, §10;
//! draft-ietf-mimi-room-policy §3-§5, §10). The hub reads these from the group's
//! `app_data_dictionary` and from AppDataUpdate proposals (draft-ietf-mls-extensions).

use super::{IdentifierUri, VLBytes, put_vlbytes, read_vlbytes};
use crate::codec::{Decode, Encode, Reader, Writer, decode_list, encode_list, wire_type};
use crate::error::WireError;

/// Component ids (protocol-06 §10; room-policy §10.1 suggested values).
pub mod component {
    /// `frank_aad` (safe AAD).
    pub const FRANK_AAD: u16 = 0x0020;
    /// `franking_signature_key` / `franking_agent` (GroupContext).
    pub const FRANKING_AGENT: u16 = 0x0021;
    /// `participant_list` (GroupContext).
    pub const PARTICIPANT_LIST: u16 = 0x0022;
    /// `room_metadata` (GroupContext).
    pub const ROOM_METADATA: u16 = 0x0023;
    /// `mls_operational_policy` (GroupContext).
    pub const OPERATIONAL_POLICY: u16 = 0x0024;
    /// `roles_list` (GroupContext).
    pub const ROLES_LIST: u16 = 0x0025;
    /// `preauth_list` (GroupContext).
    pub const PREAUTH_LIST: u16 = 0x0026;
    /// `base_room_policy` (GroupContext).
    pub const BASE_ROOM_POLICY: u16 = 0x0027;
}

/// Role capabilities (room-policy §10.2).
pub mod capability {
    pub const ADD_PARTICIPANT: u16 = 0x0000;
    pub const REMOVE_PARTICIPANT: u16 = 0x0001;
    pub const ADD_OWN_CLIENT: u16 = 0x0002;
    pub const REMOVE_OWN_CLIENT: u16 = 0x0003;
    pub const OPEN_JOIN: u16 = 0x0004;
    pub const JOIN_IF_PREAUTHORIZED: u16 = 0x0005;
    pub const REMOVE_SELF: u16 = 0x0006;
    pub const USE_JOIN_CODE: u16 = 0x0009;
    pub const BAN: u16 = 0x000a;
    pub const UNBAN: u16 = 0x000b;
    pub const KICK: u16 = 0x000c;
    pub const CHANGE_USER_ROLE: u16 = 0x000f;
    pub const CHANGE_OWN_ROLE: u16 = 0x0010;
    pub const SEND_MESSAGE: u16 = 0x0100;
    pub const RECEIVE_MESSAGE: u16 = 0x0101;
    pub const REPORT_ABUSE: u16 = 0x0103;
    pub const CHANGE_PREAUTH_LIST: u16 = 0x0504;
}

/// The claims a hub can check in a preauth_list entry (room-policy §4 leaves claim ids to
/// each credential type, "TODO refactor Claims"): for a Basic credential (type 1), whose
/// identity is the user URI, `user` matches that URI exactly and `domain` its provider's
/// domain. A claim of any other type or id is one the hub cannot check: the entry holding
/// it never matches at the hub.
pub mod preauth_claim {
    /// `CredentialType` basic (RFC 9420 §17.5).
    pub const BASIC_CREDENTIAL: u16 = 0x0001;
    /// Claim id: the whole user URI.
    pub const USER: &[u8] = b"user";
    /// Claim id: the domain of the user URI (`mimi://DOMAIN/u/...`).
    pub const DOMAIN: &[u8] = b"domain";
}

/// The role index of "not (or no longer) in the participant list" (room-policy §3).
pub const NO_ROLE: u32 = 0;
/// The role index of the "banned" role when a room has one (room-policy §8.1.3).
pub const BANNED_ROLE: u32 = 1;

fn read_u32s(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u32>, WireError> {
    let mut s = r.sub_vec(what)?;
    let mut v = Vec::new();
    while !s.is_empty() {
        v.push(s.u32()?);
    }
    Ok(v)
}

fn put_u32s(out: &mut Vec<u8>, v: &[u32]) -> Result<(), WireError> {
    out.put_vec_with(|o| {
        for x in v {
            o.put_u32(*x);
        }
        Ok(())
    })
}

fn read_opt_u32(r: &mut Reader<'_>, what: &'static str) -> Result<Option<u32>, WireError> {
    Ok(if r.present(what)? {
        Some(r.u32()?)
    } else {
        None
    })
}

fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        None => out.push(0),
        Some(x) => {
            out.push(1);
            out.put_u32(x);
        }
    }
}

fn read_bool(r: &mut Reader<'_>, what: &'static str) -> Result<bool, WireError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(WireError::BadValue { what }),
    }
}

/// `UserRolePair` (protocol-06 §7.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRolePair {
    /// `opaque user<V>`: the user URI.
    pub user: IdentifierUri,
    pub role_index: u32,
}

impl<'a> Decode<'a> for UserRolePair {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(UserRolePair {
            user: IdentifierUri::decode_from(r)?,
            role_index: r.u32()?,
        })
    }
}

impl Encode for UserRolePair {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.user.encode_to(out)?;
        out.put_u32(self.role_index);
        Ok(())
    }
}
wire_type!(UserRolePair);

/// `ParticipantListData`, the data of the participant_list component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParticipantListData {
    pub participants: Vec<UserRolePair>,
}

impl<'a> Decode<'a> for ParticipantListData {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ParticipantListData {
            participants: decode_list(r, "participants")?,
        })
    }
}

impl Encode for ParticipantListData {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.participants)
    }
}
wire_type!(ParticipantListData);

/// `UserindexRolePair`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIndexRolePair {
    pub user_index: u32,
    pub role_index: u32,
}

impl<'a> Decode<'a> for UserIndexRolePair {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(UserIndexRolePair {
            user_index: r.u32()?,
            role_index: r.u32()?,
        })
    }
}

impl Encode for UserIndexRolePair {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.put_u32(self.user_index);
        out.put_u32(self.role_index);
        Ok(())
    }
}
wire_type!(UserIndexRolePair);

/// `ParticipantListUpdate`, the update of an AppDataUpdate proposal for participant_list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParticipantListUpdate {
    pub changed_role_participants: Vec<UserIndexRolePair>,
    pub removed_indices: Vec<u32>,
    pub added_participants: Vec<UserRolePair>,
}

impl<'a> Decode<'a> for ParticipantListUpdate {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ParticipantListUpdate {
            changed_role_participants: decode_list(r, "changedRoleParticipants")?,
            removed_indices: read_u32s(r, "removedIndices")?,
            added_participants: decode_list(r, "addedParticipants")?,
        })
    }
}

impl Encode for ParticipantListUpdate {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.changed_role_participants)?;
        put_u32s(out, &self.removed_indices)?;
        encode_list(out, &self.added_participants)
    }
}
wire_type!(ParticipantListUpdate);

/// Why a [`ParticipantListUpdate`] cannot apply to a list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParticipantListError {
    #[error("user index {0} is not in the participant list")]
    NoSuchIndex(u32),
    #[error("{0} is changed more than once in one commit")]
    TouchedTwice(String),
    #[error("{0} is in the participant list already")]
    AlreadyListed(String),
}

impl ParticipantListData {
    /// The role of `user`, [`NO_ROLE`] when unlisted.
    pub fn role_of(&self, user: &str) -> u32 {
        self.participants
            .iter()
            .find(|p| p.user.as_str() == user)
            .map_or(NO_ROLE, |p| p.role_index)
    }

    /// The list after `update` (protocol-06 §7.5: role changes, then removals, then
    /// additions appended), refusing an update that touches one user twice.
    pub fn apply(
        &self,
        update: &ParticipantListUpdate,
    ) -> Result<ParticipantListData, ParticipantListError> {
        let mut touched = std::collections::BTreeSet::new();
        let mut list: Vec<Option<UserRolePair>> =
            self.participants.iter().cloned().map(Some).collect();
        let user_at = |i: u32| {
            self.participants
                .get(i as usize)
                .ok_or(ParticipantListError::NoSuchIndex(i))
        };
        for c in &update.changed_role_participants {
            let u = user_at(c.user_index)?.user.as_str().to_owned();
            if !touched.insert(u.clone()) {
                return Err(ParticipantListError::TouchedTwice(u));
            }
            if let Some(Some(p)) = list.get_mut(c.user_index as usize) {
                p.role_index = c.role_index;
            }
        }
        for &i in &update.removed_indices {
            let u = user_at(i)?.user.as_str().to_owned();
            if !touched.insert(u.clone()) {
                return Err(ParticipantListError::TouchedTwice(u));
            }
            list[i as usize] = None;
        }
        let mut participants: Vec<UserRolePair> = list.into_iter().flatten().collect();
        for a in &update.added_participants {
            let u = a.user.as_str().to_owned();
            if !touched.insert(u.clone()) {
                return Err(ParticipantListError::TouchedTwice(u));
            }
            if participants.iter().any(|p| p.user == a.user) {
                return Err(ParticipantListError::AlreadyListed(u));
            }
            participants.push(a.clone());
        }
        Ok(ParticipantListData { participants })
    }
}

/// `SingleSourceRoleChangeTargets` (room-policy §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChangeTargets {
    pub from_role_index: u32,
    pub target_role_indexes: Vec<u32>,
}

impl<'a> Decode<'a> for RoleChangeTargets {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(RoleChangeTargets {
            from_role_index: r.u32()?,
            target_role_indexes: read_u32s(r, "target_role_indexes")?,
        })
    }
}

impl Encode for RoleChangeTargets {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.put_u32(self.from_role_index);
        put_u32s(out, &self.target_role_indexes)
    }
}
wire_type!(RoleChangeTargets);

/// `Role` (room-policy §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub role_index: u32,
    pub role_name: VLBytes,
    pub role_description: VLBytes,
    pub role_capabilities: Vec<u16>,
    pub minimum_participants_constraint: u32,
    pub maximum_participants_constraint: Option<u32>,
    pub minimum_active_participants_constraint: u32,
    pub maximum_active_participants_constraint: Option<u32>,
    pub authorized_role_changes: Vec<RoleChangeTargets>,
}

impl Role {
    pub fn has(&self, capability: u16) -> bool {
        self.role_capabilities.contains(&capability)
    }

    /// The targets this role may move a user from `from` to.
    pub fn targets_from(&self, from: u32) -> &[u32] {
        self.authorized_role_changes
            .iter()
            .find(|c| c.from_role_index == from)
            .map_or(&[], |c| &c.target_role_indexes)
    }
}

impl<'a> Decode<'a> for Role {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let role_index = r.u32()?;
        let role_name = read_vlbytes(r, "role_name")?;
        let role_description = read_vlbytes(r, "role_description")?;
        let mut caps = r.sub_vec("role_capabilities")?;
        let mut role_capabilities = Vec::new();
        while !caps.is_empty() {
            role_capabilities.push(caps.u16()?);
        }
        Ok(Role {
            role_index,
            role_name,
            role_description,
            role_capabilities,
            minimum_participants_constraint: r.u32()?,
            maximum_participants_constraint: read_opt_u32(r, "maximum_participants")?,
            minimum_active_participants_constraint: r.u32()?,
            maximum_active_participants_constraint: read_opt_u32(r, "maximum_active")?,
            authorized_role_changes: decode_list(r, "authorized_role_changes")?,
        })
    }
}

impl Encode for Role {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.put_u32(self.role_index);
        put_vlbytes(out, &self.role_name)?;
        put_vlbytes(out, &self.role_description)?;
        out.put_vec_with(|o| {
            for c in &self.role_capabilities {
                o.put_u16(*c);
            }
            Ok(())
        })?;
        out.put_u32(self.minimum_participants_constraint);
        put_opt_u32(out, self.maximum_participants_constraint);
        out.put_u32(self.minimum_active_participants_constraint);
        put_opt_u32(out, self.maximum_active_participants_constraint);
        encode_list(out, &self.authorized_role_changes)
    }
}
wire_type!(Role);

/// `RoleData`, the data of roles_list (and a RoleUpdate, which replaces it whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleData {
    pub roles: Vec<Role>,
}

impl RoleData {
    pub fn role(&self, index: u32) -> Option<&Role> {
        self.roles.iter().find(|r| r.role_index == index)
    }
}

impl<'a> Decode<'a> for RoleData {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(RoleData {
            roles: decode_list(r, "roles")?,
        })
    }
}

impl Encode for RoleData {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.roles)
    }
}
wire_type!(RoleData);

/// `BaseRoomPolicy` (room-policy §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRoomPolicy {
    pub fixed_membership: bool,
    pub parent_dependant: bool,
    pub parent_room: Vec<IdentifierUri>,
    pub multi_device: bool,
    pub max_clients: Option<u32>,
    pub max_users: Option<u32>,
    pub pseudonyms_allowed: bool,
    pub persistent_room: bool,
    pub discoverable: bool,
    pub policy_component_ids: Vec<u16>,
}

impl<'a> Decode<'a> for BaseRoomPolicy {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let fixed_membership = read_bool(r, "fixed_membership")?;
        let parent_dependant = read_bool(r, "parent_dependant")?;
        let parent_room = decode_list(r, "parent_room")?;
        let multi_device = read_bool(r, "multi_device")?;
        let max_clients = read_opt_u32(r, "max_clients")?;
        let max_users = read_opt_u32(r, "max_users")?;
        let pseudonyms_allowed = read_bool(r, "pseudonyms_allowed")?;
        let persistent_room = read_bool(r, "persistent_room")?;
        let discoverable = read_bool(r, "discoverable")?;
        let mut ids = r.sub_vec("policy_component_ids")?;
        let mut policy_component_ids = Vec::new();
        while !ids.is_empty() {
            policy_component_ids.push(ids.u16()?);
        }
        Ok(BaseRoomPolicy {
            fixed_membership,
            parent_dependant,
            parent_room,
            multi_device,
            max_clients,
            max_users,
            pseudonyms_allowed,
            persistent_room,
            discoverable,
            policy_component_ids,
        })
    }
}

impl Encode for BaseRoomPolicy {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.push(self.fixed_membership as u8);
        out.push(self.parent_dependant as u8);
        encode_list(out, &self.parent_room)?;
        out.push(self.multi_device as u8);
        put_opt_u32(out, self.max_clients);
        put_opt_u32(out, self.max_users);
        out.push(self.pseudonyms_allowed as u8);
        out.push(self.persistent_room as u8);
        out.push(self.discoverable as u8);
        out.put_vec_with(|o| {
            for c in &self.policy_component_ids {
                o.put_u16(*c);
            }
            Ok(())
        })
    }
}
wire_type!(BaseRoomPolicy);

/// `ClaimId` (room-policy §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimId {
    /// The MLS `CredentialType` the claim is of.
    pub credential_type: u16,
    /// `opaque id<V>`: an X.509 OID, a JWT claim name, a CWT key; see [`preauth_claim`].
    pub id: VLBytes,
}

impl<'a> Decode<'a> for ClaimId {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ClaimId {
            credential_type: r.u16()?,
            id: read_vlbytes(r, "claim id")?,
        })
    }
}

impl Encode for ClaimId {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.put_u16(self.credential_type);
        put_vlbytes(out, &self.id)
    }
}
wire_type!(ClaimId);

/// `Claim` (room-policy §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub claim_id: ClaimId,
    pub claim_value: VLBytes,
}

impl Claim {
    /// A Basic-credential claim `id` = `value` (see [`preauth_claim`]).
    pub fn basic(id: &[u8], value: &str) -> Claim {
        Claim {
            claim_id: ClaimId {
                credential_type: preauth_claim::BASIC_CREDENTIAL,
                id: VLBytes::new(id.to_vec()),
            },
            claim_value: VLBytes::new(value.as_bytes().to_vec()),
        }
    }
}

impl<'a> Decode<'a> for Claim {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(Claim {
            claim_id: ClaimId::decode_from(r)?,
            claim_value: read_vlbytes(r, "claim_value")?,
        })
    }
}

impl Encode for Claim {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.claim_id.encode_to(out)?;
        put_vlbytes(out, &self.claim_value)
    }
}
wire_type!(Claim);

/// `PreAuthRoleEntry` (room-policy §4): whoever satisfies every claim of `claimset` may take
/// `target_role` (the draft carries a whole `Role`; its `role_index` names a role of the
/// room's roles_list, which alone defines what the role may do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthRoleEntry {
    pub claimset: Vec<Claim>,
    pub target_role: Role,
}

impl<'a> Decode<'a> for PreAuthRoleEntry {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(PreAuthRoleEntry {
            claimset: decode_list(r, "claimset")?,
            target_role: Role::decode_from(r)?,
        })
    }
}

impl Encode for PreAuthRoleEntry {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.claimset)?;
        self.target_role.encode_to(out)
    }
}
wire_type!(PreAuthRoleEntry);

/// `PreAuthData`, the data of preauth_list (and a PreAuthUpdate, which replaces it whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreAuthData {
    pub preauthorized_entries: Vec<PreAuthRoleEntry>,
}

impl<'a> Decode<'a> for PreAuthData {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(PreAuthData {
            preauthorized_entries: decode_list(r, "preauthorized_entries")?,
        })
    }
}

impl Encode for PreAuthData {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.preauthorized_entries)
    }
}
wire_type!(PreAuthData);

/// `FrankingAgentData` (protocol-06 §5.4.1): the hub's franking signature key and its
/// credential, as the room's franking_agent component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrankingAgentData {
    /// `SignaturePublicKey` contents.
    pub franking_signature_key: VLBytes,
    /// An MLS `Credential`.
    pub credential: super::Credential,
}

impl<'a> Decode<'a> for FrankingAgentData {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(FrankingAgentData {
            franking_signature_key: read_vlbytes(r, "franking_signature_key")?,
            credential: super::Credential::decode_from(r)?,
        })
    }
}

impl Encode for FrankingAgentData {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vlbytes(out, &self.franking_signature_key)?;
        self.credential.encode_to(out)
    }
}
wire_type!(FrankingAgentData);

/// `FrankAAD` (protocol-06 §5.4.1): the franking tag a sender puts in the safe AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrankAad {
    pub franking_tag: [u8; 32],
}

impl<'a> Decode<'a> for FrankAad {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(FrankAad {
            franking_tag: r.array()?,
        })
    }
}

impl Encode for FrankAad {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.franking_tag);
        Ok(())
    }
}
wire_type!(FrankAad);

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str, role: u32) -> UserRolePair {
        UserRolePair {
            user: IdentifierUri::new(s),
            role_index: role,
        }
    }

    #[test]
    fn participant_list_update_applies_in_the_drafts_order() {
        let list = ParticipantListData {
            participants: vec![
                u("mimi://a/u/1", 3),
                u("mimi://a/u/2", 2),
                u("mimi://b/u/3", 2),
            ],
        };
        let up = ParticipantListUpdate {
            changed_role_participants: vec![UserIndexRolePair {
                user_index: 2,
                role_index: 1,
            }],
            removed_indices: vec![1],
            added_participants: vec![u("mimi://c/u/4", 2)],
        };
        let bytes = up.encode().expect("encode");
        assert_eq!(ParticipantListUpdate::decode(&bytes).expect("decode"), up);
        let after = list.apply(&up).expect("apply");
        assert_eq!(
            after.participants,
            vec![
                u("mimi://a/u/1", 3),
                u("mimi://b/u/3", 1),
                u("mimi://c/u/4", 2)
            ]
        );
        assert_eq!(after.role_of("mimi://b/u/3"), 1);
        assert_eq!(after.role_of("mimi://a/u/2"), NO_ROLE);
    }

    #[test]
    fn an_update_that_touches_a_user_twice_or_a_missing_index_is_refused() {
        let list = ParticipantListData {
            participants: vec![u("mimi://a/u/1", 3)],
        };
        let twice = ParticipantListUpdate {
            changed_role_participants: vec![UserIndexRolePair {
                user_index: 0,
                role_index: 2,
            }],
            removed_indices: vec![0],
            added_participants: vec![],
        };
        assert!(matches!(
            list.apply(&twice),
            Err(ParticipantListError::TouchedTwice(_))
        ));
        let missing = ParticipantListUpdate {
            removed_indices: vec![7],
            ..Default::default()
        };
        assert_eq!(
            list.apply(&missing),
            Err(ParticipantListError::NoSuchIndex(7))
        );
        let again = ParticipantListUpdate {
            added_participants: vec![u("mimi://a/u/1", 2)],
            ..Default::default()
        };
        assert!(matches!(
            list.apply(&again),
            Err(ParticipantListError::AlreadyListed(_))
        ));
    }

    #[test]
    fn roles_and_base_policy_round_trip() {
        let roles = RoleData {
            roles: vec![Role {
                role_index: 3,
                role_name: VLBytes::new(b"owner".to_vec()),
                role_description: VLBytes::new(Vec::new()),
                role_capabilities: vec![capability::ADD_PARTICIPANT, capability::BAN],
                minimum_participants_constraint: 1,
                maximum_participants_constraint: Some(4),
                minimum_active_participants_constraint: 0,
                maximum_active_participants_constraint: None,
                authorized_role_changes: vec![RoleChangeTargets {
                    from_role_index: 0,
                    target_role_indexes: vec![2, 3],
                }],
            }],
        };
        let b = roles.encode().expect("encode");
        assert_eq!(RoleData::decode(&b).expect("decode"), roles);
        assert_eq!(roles.role(3).map(|r| r.targets_from(0)), Some(&[2, 3][..]));
        let base = BaseRoomPolicy {
            fixed_membership: false,
            parent_dependant: false,
            parent_room: vec![],
            multi_device: true,
            max_clients: None,
            max_users: Some(50),
            pseudonyms_allowed: false,
            persistent_room: true,
            discoverable: false,
            policy_component_ids: vec![component::ROLES_LIST],
        };
        let b = base.encode().expect("encode");
        assert_eq!(BaseRoomPolicy::decode(&b).expect("decode"), base);
        let mut bad = b.clone();
        bad[0] = 2;
        assert!(BaseRoomPolicy::decode(&bad).is_err());
    }

    #[test]
    fn preauth_data_round_trips_with_known_claim_bytes() {
        let claim = Claim::basic(preauth_claim::DOMAIN, "b.example");
        // credential_type 1, id<V> "domain", claim_value<V> "b.example".
        let mut want = vec![0, 1, 6];
        want.extend_from_slice(b"domain");
        want.push(9);
        want.extend_from_slice(b"b.example");
        assert_eq!(claim.encode().expect("encode"), want);
        let data = PreAuthData {
            preauthorized_entries: vec![PreAuthRoleEntry {
                claimset: vec![
                    claim,
                    Claim::basic(preauth_claim::USER, "mimi://b.example/u/x"),
                ],
                target_role: Role {
                    role_index: 2,
                    role_name: VLBytes::new(b"regular".to_vec()),
                    role_description: VLBytes::new(Vec::new()),
                    role_capabilities: vec![capability::JOIN_IF_PREAUTHORIZED],
                    minimum_participants_constraint: 0,
                    maximum_participants_constraint: None,
                    minimum_active_participants_constraint: 0,
                    maximum_active_participants_constraint: None,
                    authorized_role_changes: vec![],
                },
            }],
        };
        let b = data.encode().expect("encode");
        assert_eq!(PreAuthData::decode(&b).expect("decode"), data);
        // Truncated anywhere: an error, never a panic.
        for n in 0..b.len() {
            assert!(PreAuthData::decode(&b[..n]).is_err(), "{n}");
        }
    }
}

/// `SafeAADItem` (draft-ietf-mls-extensions §4.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeAadItem {
    /// `component_id`
    pub component_id: u16,
    /// `aad_item_data<V>`
    pub aad_item_data: VLBytes,
}

impl<'a> Decode<'a> for SafeAadItem {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(SafeAadItem {
            component_id: r.u16()?,
            aad_item_data: read_vlbytes(r, "aad_item_data")?,
        })
    }
}

impl Encode for SafeAadItem {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.put_u16(self.component_id);
        put_vlbytes(out, &self.aad_item_data)
    }
}
wire_type!(SafeAadItem);

/// `SafeAAD` (draft-ietf-mls-extensions §4.9): the framed `authenticated_data` of an MLS
/// message, items sorted by component id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafeAad {
    /// `aad_items<V>`
    pub aad_items: Vec<SafeAadItem>,
}

impl SafeAad {
    /// A SafeAAD holding only a frank_aad item with `franking_tag`.
    pub fn frank(franking_tag: [u8; 32]) -> Self {
        SafeAad {
            aad_items: vec![SafeAadItem {
                component_id: component::FRANK_AAD,
                aad_item_data: VLBytes::new(franking_tag.to_vec()),
            }],
        }
    }

    /// The data of the item for `component_id`, if present.
    pub fn item(&self, component_id: u16) -> Option<&[u8]> {
        self.aad_items
            .iter()
            .find(|i| i.component_id == component_id)
            .map(|i| i.aad_item_data.as_slice())
    }

    /// The franking tag of `authenticated_data` framed as a SafeAAD with a frank_aad item;
    /// `None` if it is not one (malformed, or no such item).
    pub fn franking_tag(authenticated_data: &[u8]) -> Option<[u8; 32]> {
        let aad = SafeAad::decode(authenticated_data).ok()?;
        FrankAad::decode(aad.item(component::FRANK_AAD)?)
            .ok()
            .map(|f| f.franking_tag)
    }
}

impl<'a> Decode<'a> for SafeAad {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(SafeAad {
            aad_items: decode_list(r, "aad_items")?,
        })
    }
}

impl Encode for SafeAad {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.aad_items)
    }
}
wire_type!(SafeAad);

#[cfg(test)]
mod safe_aad_tests {
    use super::*;

    #[test]
    fn frank_aad_round_trips_with_known_bytes() {
        let aad = SafeAad::frank([7; 32]).encode().expect("encode");
        // aad_items<V> (35 bytes) = { component_id 0x0020, aad_item_data<V> (32 bytes) }.
        let mut want = vec![35, 0x00, 0x20, 32];
        want.extend_from_slice(&[7; 32]);
        assert_eq!(aad, want);
        assert_eq!(SafeAad::franking_tag(&aad), Some([7; 32]));
        // Not a SafeAAD, or no frank item: no tag.
        assert_eq!(SafeAad::franking_tag(b"hello"), None);
        assert_eq!(SafeAad::franking_tag(&[0]), None);
    }
}
