//! The room policy the hub enforces on every handshake (draft-ietf-mimi-protocol-06 §5.3,
//! §7.5; draft-ietf-mimi-room-policy §3 roles, §5 base policy, §8.1 membership
//! capabilities). Pure: no I/O, no [`crate::Relay`]; the hub keeps a [`RoomState`] per hosted
//! room and asks [`authorize`] about each staged handshake.
//!
//! The room state lives in the MLS group's app_data_dictionary: participant_list (0x0022),
//! roles_list (0x0025), preauth_list (0x0026), base_room_policy (0x0027). A group made by a
//! client that writes none of them (a "hub-kept" room) still gets a policy:
//! - roles: [`default_roles`] (room-policy Appendix A.2, "strictly administered": 0 no_role,
//!   1 banned, 2 ordinary_user, 3 group_admin, 4 super_admin);
//! - participant list: kept by the hub (persisted beside the MLS state), the creator's users
//!   as super_admin; an MLS Add of an unlisted user lists it as ordinary_user, a user whose
//!   last client goes is unlisted; both judged as the list changes they stand for;
//! - external joins: besides the roles' own rules, an unlisted user of a provider that has an
//!   active participant may join as ordinary_user (the provider vouches for its users: the
//!   hub's stand-in for a preauth_list by domain, room-policy §4, which rooms with a
//!   participant_list do not get).
//!
//! preauth_list (room-policy §4): the hub checks the claims it can see, those of a Basic
//! credential ([`preauth_claim`]: the user URI, its domain); an entry with any other claim
//! never matches. The first matching entry gives an unlisted joiner by external commit its
//! role (canJoinIfPreauthorized on that role), and a listed user its own new role
//! (canChangeOwnRole). Changing the list needs canChangePreauthorizedUserList.
//!
//! Messages (room-policy §8.3): the hub judges canSendMessage at /submitMessage. The other
//! message capabilities (reply, react, edit, delete, topics, links, copy) are about the
//! content, which is MLS ciphertext to the hub: only clients can judge them. Nor does the
//! hub withhold messages from a user lacking canReceiveMessage: it fans out per provider,
//! not per user.
//!
//! Not judged here: join codes (no join_links component is read), the metadata, asset,
//! media and other policy components (an AppDataUpdate of another component is let
//! through).

use std::collections::{BTreeMap, BTreeSet};

use mimi_wire::WireError;
use mimi_wire::proto::room::{
    BANNED_ROLE, BaseRoomPolicy, Claim, NO_ROLE, ParticipantListData, PreAuthData, Role,
    RoleChangeTargets, RoleData, UserRolePair, capability as cap, component, preauth_claim,
};
use mimi_wire::proto::{IdentifierUri, VLBytes};

use crate::mls::{AppDataChange, HandshakeEffect};

/// Role indexes of [`default_roles`].
pub mod default_role {
    /// A participant without special rights.
    pub const ORDINARY: u32 = 2;
    /// Adds, removes, bans, kicks, changes roles.
    pub const ADMIN: u32 = 3;
    /// The room's creator (of a hub-kept room): everything an admin may, over admins too.
    pub const SUPER_ADMIN: u32 = 4;
}

/// Why the room policy refuses a handshake, a message or a join. Each cause is its own
/// variant; the text goes to the peer in `errorDescription`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyRefusal {
    /// The handshake's sender is not a user of the provider that sent it.
    #[error("sender {sender} is not a user of the authenticated provider {provider}")]
    SenderNotOfProvider { sender: String, provider: String },
    #[error("a KeyPackage is used a second time")]
    KeyPackageReused,
    #[error("{user} is not a MIMI user URI")]
    NotAUserUri { user: String },
    #[error("no route to provider {provider}")]
    NoRoute { provider: String },
    /// protocol-06 §5.3: a removed (or never listed) participant only removes its clients.
    #[error("{user} is not an active participant of the room")]
    InactiveSender { user: String },
    #[error("{user} is banned from the room")]
    Banned { user: String },
    #[error("component {component:#06x} is malformed or given twice")]
    MalformedComponent { component: u16 },
    #[error("component {component:#06x} may not be removed")]
    ComponentRemoved { component: u16 },
    #[error("the roles list is invalid: {0}")]
    InvalidRoles(&'static str),
    #[error("{user} is in the participant list twice")]
    DuplicateParticipant { user: String },
    #[error("{user} has role {role}, which the room does not define (or is role 0)")]
    UnknownRole { user: String, role: u32 },
    /// room-policy §3: roles or base policy changes need canChangeUserRole.
    #[error(
        "{user} may not change the room's roles or base policy: its role lacks canChangeUserRole"
    )]
    PolicyChangeNotAuthorized { user: String },
    /// room-policy §3: never in the same commit as a participant list change.
    #[error("a roles or base policy change may not come with a participant list change")]
    PolicyChangeWithListChange,
    #[error("the room has fixed membership: no user may be added or removed")]
    FixedMembership,
    #[error(
        "{sender} may not add {user} as role {role}: canAddParticipant and a change from role 0 to {role} are needed"
    )]
    AddNotAuthorized {
        sender: String,
        user: String,
        role: u32,
    },
    #[error("{user} may not join the room (no open join to that role for it)")]
    JoinNotAuthorized { user: String },
    #[error("{user} may not add its own clients: its role lacks canAddOwnClient")]
    AddOwnClientNotAuthorized { user: String },
    #[error("{sender} may not add clients of {user}: its role lacks canAddParticipant")]
    AddClientNotAuthorized { sender: String, user: String },
    #[error(
        "{sender} may not remove {user}: canRemoveParticipant and a change from its role to 0 are needed"
    )]
    RemoveNotAuthorized { sender: String, user: String },
    #[error(
        "{user} may not leave the room: canRemoveSelf and a change from its role to 0 are needed"
    )]
    LeaveNotAuthorized { user: String },
    #[error("{user} leaves the participant list but keeps clients in the group")]
    RemovedUserStillHasClients { user: String },
    #[error("{sender} may not remove clients of {user}: its role lacks canKick")]
    KickNotAuthorized { sender: String, user: String },
    #[error("{user} may not remove its own clients: its role lacks canRemoveOwnClient")]
    RemoveOwnClientNotAuthorized { user: String },
    /// room-policy §8.1.3: only to the first role its preauth_list entry gives it, with
    /// canChangeOwnRole.
    #[error(
        "{user} may not change its own role (canChangeOwnRole and a preauthorized role are needed)"
    )]
    OwnRoleChange { user: String },
    /// room-policy §8.6.
    #[error(
        "{user} may not change the preauth_list: its role lacks canChangePreauthorizedUserList"
    )]
    PreauthChangeNotAuthorized { user: String },
    /// room-policy §4: never in the same commit as a participant list change but removals.
    #[error("a preauth_list change may only come with participant removals")]
    PreauthChangeWithListChange,
    /// room-policy §8.3.
    #[error("{user} may not send messages: its role lacks canSendMessage")]
    SendNotAuthorized { user: String },
    #[error("{sender} may not move {user} from role {from} to role {to}")]
    RoleChangeNotAuthorized {
        sender: String,
        user: String,
        from: u32,
        to: u32,
    },
    #[error("{sender} may not ban {user}: canBan and a change from its role to 1 are needed")]
    BanNotAuthorized { sender: String, user: String },
    #[error("{sender} may not unban {user} to role {to}")]
    UnbanNotAuthorized {
        sender: String,
        user: String,
        to: u32,
    },
    /// protocol-06 §5.3: the list change comes before or with the MLS add.
    #[error("{user} would have clients in the group but is not in the participant list")]
    UnlistedMember { user: String },
    #[error("{user} would have clients in the group but is banned")]
    BannedMember { user: String },
    #[error("role {role} would have fewer than {min} participants")]
    TooFewParticipants { role: u32, min: u32 },
    #[error("role {role} would have more than {max} participants")]
    TooManyParticipants { role: u32, max: u32 },
    #[error("role {role} would have fewer than {min} active participants")]
    TooFewActive { role: u32, min: u32 },
    #[error("role {role} would have more than {max} active participants")]
    TooManyActive { role: u32, max: u32 },
    #[error("the room would have more than {max} users")]
    TooManyUsers { max: u32 },
    #[error("the group would have more than {max} clients")]
    TooManyClients { max: u32 },
    #[error("{user} would have more than one client: the room is single-device")]
    SingleDevice { user: String },
}

/// The hub's view of one room's policy state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomState {
    pub participants: ParticipantListData,
    pub roles: RoleData,
    pub base: Option<BaseRoomPolicy>,
    pub preauth: Option<PreAuthData>,
    /// The group has no participant_list component: the hub keeps the list (see the module
    /// doc) and persists it itself.
    pub hub_kept_list: bool,
    /// The group's members: user URIs, one per leaf.
    pub members: Vec<String>,
}

fn role(index: u32, name: &str, caps: &[u16], changes: &[(u32, &[u32])]) -> Role {
    Role {
        role_index: index,
        role_name: VLBytes::new(name.as_bytes().to_vec()),
        role_description: VLBytes::new(Vec::new()),
        role_capabilities: caps.to_vec(),
        minimum_participants_constraint: 0,
        maximum_participants_constraint: None,
        minimum_active_participants_constraint: 0,
        maximum_active_participants_constraint: None,
        authorized_role_changes: changes
            .iter()
            .map(|(from, to)| RoleChangeTargets {
                from_role_index: *from,
                target_role_indexes: to.to_vec(),
            })
            .collect(),
    }
}

/// The roles of a room whose group has no roles_list: room-policy Appendix A.2 ("strictly
/// administered"), membership and message capabilities only, and without its minimum of one
/// group_admin (a hub-kept room has none at first).
pub fn default_roles() -> RoleData {
    let ordinary = [
        cap::ADD_OWN_CLIENT,
        cap::REMOVE_OWN_CLIENT,
        cap::REMOVE_SELF,
        cap::SEND_MESSAGE,
        cap::RECEIVE_MESSAGE,
        cap::REPORT_ABUSE,
        cap::JOIN_IF_PREAUTHORIZED,
    ];
    let mut admin = ordinary.to_vec();
    admin.extend([
        cap::ADD_PARTICIPANT,
        cap::REMOVE_PARTICIPANT,
        cap::BAN,
        cap::UNBAN,
        cap::KICK,
        cap::CHANGE_USER_ROLE,
    ]);
    let mut super_admin = admin.clone();
    super_admin.push(cap::CHANGE_PREAUTH_LIST);
    let mut no_role = role(0, "no_role", &[], &[]);
    no_role.maximum_active_participants_constraint = Some(0);
    let mut banned = role(1, "banned", &[], &[]);
    banned.maximum_active_participants_constraint = Some(0);
    RoleData {
        roles: vec![
            no_role,
            banned,
            role(2, "ordinary_user", &ordinary, &[(0, &[2]), (2, &[0])]),
            role(
                3,
                "group_admin",
                &admin,
                &[
                    (0, &[1, 2, 3]),
                    (1, &[0, 2, 3]),
                    (2, &[0, 1, 3]),
                    (3, &[0, 1, 2]),
                ],
            ),
            role(
                4,
                "super_admin",
                &super_admin,
                &[
                    (0, &[1, 2, 3, 4]),
                    (1, &[0, 2, 3, 4]),
                    (2, &[0, 1, 3, 4]),
                    (3, &[0, 1, 2, 4]),
                    (4, &[0, 1, 2, 3]),
                ],
            ),
        ],
    }
}

/// Whether `index` is the "banned" role of `roles` (index 1 named "banned", room-policy
/// §8.1.3; a room may define role 1 otherwise).
fn is_banned(roles: &RoleData, index: u32) -> bool {
    index == BANNED_ROLE
        && roles
            .role(BANNED_ROLE)
            .is_some_and(|r| r.role_name.as_slice() == b"banned")
}

fn user_domain(user: &str) -> Option<&str> {
    user.strip_prefix("mimi://")?.split('/').next()
}

fn decode<T>(
    bytes: &[u8],
    component: u16,
    f: fn(&[u8]) -> Result<T, WireError>,
) -> Result<T, PolicyRefusal> {
    f(bytes).map_err(|_| PolicyRefusal::MalformedComponent { component })
}

fn decode_after<T>(
    c: &AppDataChange,
    f: fn(&[u8]) -> Result<T, WireError>,
) -> Result<T, PolicyRefusal> {
    let after = c.after.as_deref().ok_or(PolicyRefusal::ComponentRemoved {
        component: c.component,
    })?;
    decode(after, c.component, f)
}

fn validate_roles(roles: &RoleData) -> Result<(), PolicyRefusal> {
    let mut seen = BTreeSet::new();
    for r in &roles.roles {
        if !seen.insert(r.role_index) {
            return Err(PolicyRefusal::InvalidRoles("a role index is given twice"));
        }
        // room-policy §8.1.1: canOpenJoin only on role 0.
        if r.role_index != NO_ROLE && r.has(cap::OPEN_JOIN) {
            return Err(PolicyRefusal::InvalidRoles(
                "canOpenJoin on a role other than 0",
            ));
        }
    }
    Ok(())
}

fn validate_list(list: &ParticipantListData, roles: &RoleData) -> Result<(), PolicyRefusal> {
    let mut seen = BTreeSet::new();
    for p in &list.participants {
        let user = p.user.as_str();
        if !seen.insert(user) {
            return Err(PolicyRefusal::DuplicateParticipant {
                user: user.to_owned(),
            });
        }
        if p.role_index == NO_ROLE || roles.role(p.role_index).is_none() {
            return Err(PolicyRefusal::UnknownRole {
                user: user.to_owned(),
                role: p.role_index,
            });
        }
    }
    Ok(())
}

fn clients(members: &[String]) -> BTreeMap<&str, usize> {
    let mut m = BTreeMap::new();
    for u in members {
        *m.entry(u.as_str()).or_insert(0) += 1;
    }
    m
}

fn roles_by_user(list: &ParticipantListData) -> BTreeMap<&str, u32> {
    list.participants
        .iter()
        .map(|p| (p.user.as_str(), p.role_index))
        .collect()
}

/// The room components of an app_data_dictionary.
type Components = (
    Option<ParticipantListData>,
    Option<RoleData>,
    Option<BaseRoomPolicy>,
    Option<PreAuthData>,
);

fn components(app_data: &BTreeMap<u16, Vec<u8>>) -> Result<Components, PolicyRefusal> {
    Ok((
        app_data
            .get(&component::PARTICIPANT_LIST)
            .map(|b| decode(b, component::PARTICIPANT_LIST, ParticipantListData::decode))
            .transpose()?,
        app_data
            .get(&component::ROLES_LIST)
            .map(|b| decode(b, component::ROLES_LIST, RoleData::decode))
            .transpose()?,
        app_data
            .get(&component::BASE_ROOM_POLICY)
            .map(|b| decode(b, component::BASE_ROOM_POLICY, BaseRoomPolicy::decode))
            .transpose()?,
        app_data
            .get(&component::PREAUTH_LIST)
            .map(|b| decode(b, component::PREAUTH_LIST, PreAuthData::decode))
            .transpose()?,
    ))
}

/// Whether `user` satisfies `claim` as far as the hub can tell (see the module doc).
fn claim_holds(claim: &Claim, user: &str) -> bool {
    let value = claim.claim_value.as_slice();
    claim.claim_id.credential_type == preauth_claim::BASIC_CREDENTIAL
        && match claim.claim_id.id.as_slice() {
            preauth_claim::USER => value == user.as_bytes(),
            preauth_claim::DOMAIN => user_domain(user).is_some_and(|d| d.as_bytes() == value),
            _ => false,
        }
}

fn listed(users: &[String], role: u32) -> ParticipantListData {
    let mut seen = BTreeSet::new();
    ParticipantListData {
        participants: users
            .iter()
            .filter(|u| seen.insert(u.as_str()))
            .map(|u| UserRolePair {
                user: IdentifierUri::new(u.clone()),
                role_index: role,
            })
            .collect(),
    }
}

impl RoomState {
    /// The state of a room its creator just made: from the group's app data, or (no
    /// participant_list) a hub-kept list with the creator's users as super_admin. Every
    /// member must be an active participant.
    pub fn created(
        app_data: &BTreeMap<u16, Vec<u8>>,
        members: Vec<String>,
    ) -> Result<RoomState, PolicyRefusal> {
        let (list, roles, base, preauth) = components(app_data)?;
        let roles = roles.unwrap_or_else(default_roles);
        validate_roles(&roles)?;
        let hub_kept_list = list.is_none();
        let participants = list.unwrap_or_else(|| listed(&members, default_role::SUPER_ADMIN));
        validate_list(&participants, &roles)?;
        let s = RoomState {
            participants,
            roles,
            base,
            preauth,
            hub_kept_list,
            members,
        };
        s.check_members(&s.participants, &s.roles, &s.members)?;
        Ok(s)
    }

    /// The state of a room after a restart: from the group's app data, else from the list
    /// the hub kept (`kept`), else its members as ordinary users. Not judged again.
    pub fn restored(
        app_data: &BTreeMap<u16, Vec<u8>>,
        members: Vec<String>,
        kept: Option<ParticipantListData>,
    ) -> Result<RoomState, PolicyRefusal> {
        let (list, roles, base, preauth) = components(app_data)?;
        let hub_kept_list = list.is_none();
        let participants = list
            .or(kept)
            .unwrap_or_else(|| listed(&members, default_role::ORDINARY));
        Ok(RoomState {
            participants,
            roles: roles.unwrap_or_else(default_roles),
            base,
            preauth,
            hub_kept_list,
            members,
        })
    }

    /// The role index of `user` ([`NO_ROLE`] when unlisted).
    pub fn role_of(&self, user: &str) -> u32 {
        self.participants.role_of(user)
    }

    /// The name of role `index`, empty if the room does not define it.
    pub fn role_name(&self, index: u32) -> String {
        self.roles
            .role(index)
            .map(|r| String::from_utf8_lossy(r.role_name.as_slice()).into_owned())
            .unwrap_or_default()
    }

    pub fn is_banned(&self, user: &str) -> bool {
        is_banned(&self.roles, self.role_of(user))
    }

    /// Listed, not banned.
    fn is_listed_active(&self, role: u32) -> bool {
        role != NO_ROLE && !is_banned(&self.roles, role)
    }

    /// Every member's user is listed and not banned.
    fn check_members(
        &self,
        list: &ParticipantListData,
        roles: &RoleData,
        members: &[String],
    ) -> Result<(), PolicyRefusal> {
        let by_user = roles_by_user(list);
        for u in clients(members).keys() {
            match by_user.get(u) {
                None => {
                    return Err(PolicyRefusal::UnlistedMember {
                        user: (*u).to_owned(),
                    });
                }
                Some(r) if is_banned(roles, *r) => {
                    return Err(PolicyRefusal::BannedMember {
                        user: (*u).to_owned(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Whether an unlisted `user` may add itself as role `target` (room-policy §8.1.1
    /// canOpenJoin; or the hub-kept rooms' provider rule, see the module doc).
    fn may_join_as(&self, user: &str, target: u32) -> bool {
        let open = self.roles.role(NO_ROLE).is_some_and(|z| {
            z.has(cap::OPEN_JOIN) && target != NO_ROLE && z.targets_from(NO_ROLE).contains(&target)
        });
        open || self.preauth_join_role(user) == Some(target)
            || (self.hub_kept_list
                && target == default_role::ORDINARY
                && self.provider_has_participant(user_domain(user)))
    }

    /// The role of the first preauth_list entry `user` satisfies (room-policy §4), not
    /// role 0.
    pub fn preauth_role(&self, user: &str) -> Option<u32> {
        self.preauth
            .as_ref()?
            .preauthorized_entries
            .iter()
            .filter(|e| e.target_role.role_index != NO_ROLE)
            .find(|e| e.claimset.iter().all(|c| claim_holds(c, user)))
            .map(|e| e.target_role.role_index)
    }

    /// The role an unlisted `user` may join as by preauthorization (room-policy §8.1.1
    /// canJoinIfPreauthorized: on the first matching role, as the room defines it).
    fn preauth_join_role(&self, user: &str) -> Option<u32> {
        self.preauth_role(user).filter(|&t| {
            !is_banned(&self.roles, t)
                && self
                    .roles
                    .role(t)
                    .is_some_and(|r| r.has(cap::JOIN_IF_PREAUTHORIZED))
        })
    }

    /// Whether a preauth_list entry may let some user of `provider` join: its claims the
    /// hub can check all hold for that provider's users (a user claim of one of them, a
    /// domain claim of it).
    fn preauth_admits_provider(&self, provider: &str) -> bool {
        let Some(p) = &self.preauth else {
            return false;
        };
        p.preauthorized_entries.iter().any(|e| {
            let t = e.target_role.role_index;
            t != NO_ROLE
                && !is_banned(&self.roles, t)
                && self
                    .roles
                    .role(t)
                    .is_some_and(|r| r.has(cap::JOIN_IF_PREAUTHORIZED))
                && e.claimset.iter().all(|c| {
                    let v = c.claim_value.as_slice();
                    c.claim_id.credential_type == preauth_claim::BASIC_CREDENTIAL
                        && match c.claim_id.id.as_slice() {
                            preauth_claim::USER => std::str::from_utf8(v)
                                .is_ok_and(|u| user_domain(u) == Some(provider)),
                            preauth_claim::DOMAIN => v == provider.as_bytes(),
                            _ => false,
                        }
                })
        })
    }

    fn provider_has_participant(&self, domain: Option<&str>) -> bool {
        domain.is_some_and(|d| {
            self.participants.participants.iter().any(|p| {
                self.is_listed_active(p.role_index) && user_domain(p.user.as_str()) == Some(d)
            })
        })
    }

    /// Whether users of `provider` can take part at all (a cheap check before MLS work): it
    /// has a listed participant or a member, or anyone may open-join.
    pub fn provider_takes_part(&self, provider: &str) -> bool {
        let of = |u: &str| user_domain(u) == Some(provider);
        self.members.iter().any(|m| of(m))
            || self
                .participants
                .participants
                .iter()
                .any(|p| self.is_listed_active(p.role_index) && of(p.user.as_str()))
            || self
                .roles
                .role(NO_ROLE)
                .is_some_and(|z| z.has(cap::OPEN_JOIN))
            || self.preauth_admits_provider(provider)
    }

    /// The join rule for external commits and /groupInfo: a listed, not banned user whose
    /// role holds canAddOwnClient, or an unlisted user the room lets join.
    pub fn may_join(&self, user: &str) -> Result<(), PolicyRefusal> {
        let r = self.role_of(user);
        if is_banned(&self.roles, r) {
            return Err(PolicyRefusal::Banned {
                user: user.to_owned(),
            });
        }
        if r != NO_ROLE {
            return if self
                .roles
                .role(r)
                .is_some_and(|x| x.has(cap::ADD_OWN_CLIENT))
            {
                Ok(())
            } else {
                Err(PolicyRefusal::AddOwnClientNotAuthorized {
                    user: user.to_owned(),
                })
            };
        }
        let targets = self
            .roles
            .role(NO_ROLE)
            .map(|z| z.targets_from(NO_ROLE).to_vec())
            .unwrap_or_default();
        if targets
            .into_iter()
            .chain([default_role::ORDINARY])
            .chain(self.preauth_join_role(user))
            .any(|t| !is_banned(&self.roles, t) && self.may_join_as(user, t))
        {
            Ok(())
        } else {
            Err(PolicyRefusal::JoinNotAuthorized {
                user: user.to_owned(),
            })
        }
    }

    /// protocol-06 §5.3: only an active participant (listed, not banned, with a client in
    /// the group) sends application messages; room-policy §8.3: one whose role holds
    /// canSendMessage.
    pub fn may_send(&self, user: &str) -> Result<(), PolicyRefusal> {
        if self.is_banned(user) {
            return Err(PolicyRefusal::Banned {
                user: user.to_owned(),
            });
        }
        let r = self.role_of(user);
        if r == NO_ROLE || !self.members.iter().any(|m| m == user) {
            return Err(PolicyRefusal::InactiveSender {
                user: user.to_owned(),
            });
        }
        if !self.roles.role(r).is_some_and(|x| x.has(cap::SEND_MESSAGE)) {
            return Err(PolicyRefusal::SendNotAuthorized {
                user: user.to_owned(),
            });
        }
        Ok(())
    }
}

/// The group's members once `effect` is merged: what the validator says for a commit, else
/// (a proposal, judged as if committed, or a validator that does not report it) the members
/// less the removed leaves, plus the added ones and an external joiner.
fn members_after(state: &RoomState, effect: &HandshakeEffect) -> Vec<String> {
    if effect.is_commit && !effect.members_after.is_empty() {
        return effect.members_after.clone();
    }
    let mut m = state.members.clone();
    for u in effect.removed.iter().chain(&effect.self_removed) {
        if let Some(i) = m.iter().position(|x| x == u) {
            m.remove(i);
        }
    }
    m.extend(effect.added.iter().cloned());
    if effect.external {
        m.push(effect.sender.clone());
    }
    m
}

/// A hub-kept list after a membership change: users whose last client went are unlisted,
/// users with a first client are listed as ordinary users (an external `joiner` as its
/// preauthorized role, if it has one).
fn derive_list(
    state: &RoomState,
    members_after: &[String],
    joiner: Option<&str>,
) -> ParticipantListData {
    let before = clients(&state.members);
    let after = clients(members_after);
    let mut participants: Vec<UserRolePair> = state
        .participants
        .participants
        .iter()
        .filter(|p| {
            let u = p.user.as_str();
            !before.contains_key(u) || after.contains_key(u)
        })
        .cloned()
        .collect();
    let mut seen: BTreeSet<String> = participants
        .iter()
        .map(|p| p.user.as_str().to_owned())
        .collect();
    for u in members_after {
        if seen.insert(u.clone()) {
            let role = joiner
                .filter(|j| j == u)
                .and_then(|j| state.preauth_join_role(j))
                .unwrap_or(default_role::ORDINARY);
            participants.push(UserRolePair {
                user: IdentifierUri::new(u.clone()),
                role_index: role,
            });
        }
    }
    ParticipantListData { participants }
}

/// Judges a staged handshake from `sender` (the user of the committing or proposing
/// client; for an external commit, the joiner) against the room's state, and returns the
/// state once it is merged (a proposal's is what its commit would make).
pub fn authorize(
    state: &RoomState,
    sender: &str,
    effect: &HandshakeEffect,
) -> Result<RoomState, PolicyRefusal> {
    let user = |u: &str| u.to_owned();
    let sender_idx = state.role_of(sender);
    let sender_role = state.roles.role(sender_idx);
    let has = |c: u16| sender_role.is_some_and(|r| r.has(c));
    let may_move =
        |from: u32, to: u32| sender_role.is_some_and(|r| r.targets_from(from).contains(&to));
    let members_after = members_after(state, effect);

    // protocol-06 §5.3: a removed or banned participant may not commit, and proposes only
    // the removal of its own clients.
    if is_banned(&state.roles, sender_idx) && (effect.is_commit || effect.external) {
        return Err(PolicyRefusal::Banned { user: user(sender) });
    }
    if !effect.external && !state.is_listed_active(sender_idx) {
        let own_removal_only = !effect.is_commit
            && effect.added.is_empty()
            && effect.app_data.is_empty()
            && (!effect.removed.is_empty() || !effect.self_removed.is_empty())
            && effect
                .removed
                .iter()
                .chain(&effect.self_removed)
                .all(|u| u == sender);
        if !own_removal_only {
            return Err(if is_banned(&state.roles, sender_idx) {
                PolicyRefusal::Banned { user: user(sender) }
            } else {
                PolicyRefusal::InactiveSender { user: user(sender) }
            });
        }
        let mut next = state.clone();
        next.members = members_after;
        return Ok(next);
    }

    // The room components this changes.
    let (mut new_list, mut new_roles, mut new_base) = (None, None, None);
    // Some(None): the preauth_list is removed.
    let mut new_preauth: Option<Option<PreAuthData>> = None;
    let mut seen = BTreeSet::new();
    for c in &effect.app_data {
        if !seen.insert(c.component) {
            return Err(PolicyRefusal::MalformedComponent {
                component: c.component,
            });
        }
        match c.component {
            component::PARTICIPANT_LIST => {
                new_list = Some(decode_after(c, ParticipantListData::decode)?);
            }
            component::ROLES_LIST => new_roles = Some(decode_after(c, RoleData::decode)?),
            component::BASE_ROOM_POLICY => {
                new_base = Some(decode_after(c, BaseRoomPolicy::decode)?);
            }
            component::PREAUTH_LIST => {
                new_preauth = Some(
                    c.after
                        .as_deref()
                        .map(|b| decode(b, c.component, PreAuthData::decode))
                        .transpose()?,
                );
            }
            _ => {}
        }
    }
    let policy_change = new_roles.is_some() || new_base.is_some();
    if policy_change && !has(cap::CHANGE_USER_ROLE) {
        return Err(PolicyRefusal::PolicyChangeNotAuthorized { user: user(sender) });
    }
    let roles_after = new_roles.unwrap_or_else(|| state.roles.clone());
    validate_roles(&roles_after)?;
    let base_after = new_base.or_else(|| state.base.clone());
    let hub_kept_list = state.hub_kept_list && new_list.is_none();
    let joiner = effect.external.then_some(sender);
    let list_after = match new_list {
        Some(l) => l,
        None if state.hub_kept_list => derive_list(state, &members_after, joiner),
        None => state.participants.clone(),
    };
    validate_list(&list_after, &roles_after)?;
    if policy_change && list_after != state.participants {
        return Err(PolicyRefusal::PolicyChangeWithListChange);
    }
    let preauth_after = match new_preauth {
        Some(p) => {
            if !has(cap::CHANGE_PREAUTH_LIST) {
                return Err(PolicyRefusal::PreauthChangeNotAuthorized { user: user(sender) });
            }
            let before = roles_by_user(&state.participants);
            if roles_by_user(&list_after)
                .iter()
                .any(|(u, t)| before.get(u) != Some(t))
            {
                return Err(PolicyRefusal::PreauthChangeWithListChange);
            }
            p
        }
        None => state.preauth.clone(),
    };

    // Participant list changes (room-policy §8.1).
    let before = roles_by_user(&state.participants);
    let after = roles_by_user(&list_after);
    let clients_before = clients(&state.members);
    let clients_after = clients(&members_after);
    let roles = &state.roles;
    let fixed = state.base.as_ref().is_some_and(|b| b.fixed_membership);
    for (&u, &t) in &after {
        match before.get(u) {
            None if fixed => return Err(PolicyRefusal::FixedMembership),
            None if is_banned(roles, t) => {
                // Banning a user before it ever took part.
                if !(has(cap::BAN) && may_move(NO_ROLE, t)) {
                    return Err(PolicyRefusal::BanNotAuthorized {
                        sender: user(sender),
                        user: user(u),
                    });
                }
            }
            None if u == sender => {
                if !state.may_join_as(u, t) {
                    return Err(PolicyRefusal::JoinNotAuthorized { user: user(u) });
                }
            }
            None => {
                if !(has(cap::ADD_PARTICIPANT) && may_move(NO_ROLE, t)) {
                    return Err(PolicyRefusal::AddNotAuthorized {
                        sender: user(sender),
                        user: user(u),
                        role: t,
                    });
                }
            }
            Some(&r) if r == t => {}
            // room-policy §8.1.3 canChangeOwnRole: to its preauthorized role only, the
            // authorized_role_changes not consulted.
            Some(_) if u == sender => {
                if !(has(cap::CHANGE_OWN_ROLE) && state.preauth_role(u) == Some(t)) {
                    return Err(PolicyRefusal::OwnRoleChange { user: user(u) });
                }
            }
            Some(&r) if is_banned(roles, t) => {
                if !(has(cap::BAN) && may_move(r, t)) {
                    return Err(PolicyRefusal::BanNotAuthorized {
                        sender: user(sender),
                        user: user(u),
                    });
                }
            }
            Some(&r) if is_banned(roles, r) => {
                if !(has(cap::UNBAN) && may_move(r, t)) {
                    return Err(PolicyRefusal::UnbanNotAuthorized {
                        sender: user(sender),
                        user: user(u),
                        to: t,
                    });
                }
            }
            Some(&r) => {
                if !(has(cap::CHANGE_USER_ROLE) && may_move(r, t)) {
                    return Err(PolicyRefusal::RoleChangeNotAuthorized {
                        sender: user(sender),
                        user: user(u),
                        from: r,
                        to: t,
                    });
                }
            }
        }
    }
    for (&u, &r) in &before {
        if after.contains_key(u) {
            continue;
        }
        if fixed {
            return Err(PolicyRefusal::FixedMembership);
        }
        if u == sender || effect.self_removed.iter().any(|s| s == u) {
            let own = roles.role(r);
            if !own.is_some_and(|x| x.has(cap::REMOVE_SELF) && x.targets_from(r).contains(&NO_ROLE))
            {
                return Err(PolicyRefusal::LeaveNotAuthorized { user: user(u) });
            }
        } else if !(has(cap::REMOVE_PARTICIPANT) && may_move(r, NO_ROLE)) {
            return Err(PolicyRefusal::RemoveNotAuthorized {
                sender: user(sender),
                user: user(u),
            });
        }
        if clients_after.contains_key(u) {
            return Err(PolicyRefusal::RemovedUserStillHasClients { user: user(u) });
        }
    }

    // MLS client changes of users that stay listed.
    let mut added: BTreeSet<&str> = effect.added.iter().map(String::as_str).collect();
    if effect.external {
        added.insert(sender);
    }
    for u in added {
        if !before.contains_key(u) {
            // Newly listed: authorized with the list addition (or refused below).
            continue;
        }
        if u == sender {
            if !has(cap::ADD_OWN_CLIENT) {
                return Err(PolicyRefusal::AddOwnClientNotAuthorized { user: user(u) });
            }
        } else if !has(cap::ADD_PARTICIPANT) {
            return Err(PolicyRefusal::AddClientNotAuthorized {
                sender: user(sender),
                user: user(u),
            });
        }
    }
    let removed: BTreeSet<&str> = effect
        .removed
        .iter()
        .chain(&effect.self_removed)
        .map(String::as_str)
        .collect();
    for u in removed {
        let (Some(&r), Some(&t)) = (before.get(u), after.get(u)) else {
            // Unlisted before (a cleanup) or unlisted now (judged above).
            continue;
        };
        if !state.is_listed_active(r) || is_banned(roles, t) {
            // A banned user's clients go with the ban.
            continue;
        }
        if u == sender || effect.self_removed.iter().any(|s| s == u) {
            if !roles.role(r).is_some_and(|x| x.has(cap::REMOVE_OWN_CLIENT)) {
                return Err(PolicyRefusal::RemoveOwnClientNotAuthorized { user: user(u) });
            }
        } else if !has(cap::KICK) {
            return Err(PolicyRefusal::KickNotAuthorized {
                sender: user(sender),
                user: user(u),
            });
        }
    }

    // protocol-06 §5.3: every member is a listed, not banned participant after it.
    state.check_members(&list_after, &roles_after, &members_after)?;

    // Role constraints (room-policy §3): only a change that moves a count the wrong way is
    // refused, so a room already out of bounds is not stuck.
    let count = |list: &BTreeMap<&str, u32>, cl: &BTreeMap<&str, usize>, role: u32| {
        let all = list.values().filter(|r| **r == role).count();
        let active = list
            .iter()
            .filter(|(u, r)| **r == role && cl.contains_key(**u))
            .count();
        (all, active)
    };
    let n = |x: u32| usize::try_from(x).unwrap_or(usize::MAX);
    for role in roles_after.roles.iter().filter(|r| r.role_index != NO_ROLE) {
        let i = role.role_index;
        let (b, ba) = count(&before, &clients_before, i);
        let (a, aa) = count(&after, &clients_after, i);
        if a < b && a < n(role.minimum_participants_constraint) {
            return Err(PolicyRefusal::TooFewParticipants {
                role: i,
                min: role.minimum_participants_constraint,
            });
        }
        if let Some(max) = role.maximum_participants_constraint
            && a > b
            && a > n(max)
        {
            return Err(PolicyRefusal::TooManyParticipants { role: i, max });
        }
        if aa < ba && aa < n(role.minimum_active_participants_constraint) {
            return Err(PolicyRefusal::TooFewActive {
                role: i,
                min: role.minimum_active_participants_constraint,
            });
        }
        if let Some(max) = role.maximum_active_participants_constraint
            && aa > ba
            && aa > n(max)
        {
            return Err(PolicyRefusal::TooManyActive { role: i, max });
        }
    }

    // Base room policy (room-policy §5).
    if let Some(base) = &base_after {
        let users =
            |l: &BTreeMap<&str, u32>| l.values().filter(|r| !is_banned(&roles_after, **r)).count();
        if let Some(max) = base.max_users
            && users(&after) > users(&before)
            && users(&after) > n(max)
        {
            return Err(PolicyRefusal::TooManyUsers { max });
        }
        if let Some(max) = base.max_clients
            && members_after.len() > state.members.len()
            && members_after.len() > n(max)
        {
            return Err(PolicyRefusal::TooManyClients { max });
        }
        if !base.multi_device
            && let Some((u, _)) = clients_after
                .iter()
                .find(|(u, c)| **c > 1 && **c > clients_before.get(**u).copied().unwrap_or(0))
        {
            return Err(PolicyRefusal::SingleDevice { user: user(u) });
        }
    }

    Ok(RoomState {
        participants: list_after,
        roles: roles_after,
        base: base_after,
        preauth: preauth_after,
        hub_kept_list,
        members: members_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// super_admin (4).
    const A: &str = "mimi://a.example/u/alice";
    /// group_admin (3).
    const B: &str = "mimi://b.example/u/bob";
    /// ordinary_user (2), two clients.
    const C: &str = "mimi://c.example/u/carol";
    /// Not listed.
    const D: &str = "mimi://d.example/u/dave";
    /// Banned (1), no clients.
    const X: &str = "mimi://c.example/u/xavier";

    fn list(entries: &[(&str, u32)]) -> ParticipantListData {
        ParticipantListData {
            participants: entries
                .iter()
                .map(|(u, r)| UserRolePair {
                    user: IdentifierUri::new(*u),
                    role_index: *r,
                })
                .collect(),
        }
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A room with its own participant list and the default roles.
    fn room() -> RoomState {
        RoomState {
            participants: list(&[(A, 4), (B, 3), (C, 2), (X, 1)]),
            roles: default_roles(),
            base: None,
            preauth: None,
            hub_kept_list: false,
            members: strs(&[A, B, C, C]),
        }
    }

    fn change(component: u16, before: Option<Vec<u8>>, after: Option<Vec<u8>>) -> AppDataChange {
        AppDataChange {
            component,
            before,
            after,
        }
    }

    /// A commit (or proposal) from `sender`: `added` and `removed` are MLS leaves, `list`
    /// the participant list after it (if it changes), `members` the group after it.
    struct E(HandshakeEffect);

    impl E {
        fn commit(sender: &str) -> E {
            E(HandshakeEffect {
                sender: sender.to_owned(),
                is_commit: true,
                ..HandshakeEffect::default()
            })
        }
        fn proposal(sender: &str) -> E {
            let mut e = E::commit(sender);
            e.0.is_commit = false;
            e
        }
        fn external(sender: &str) -> E {
            let mut e = E::commit(sender);
            e.0.external = true;
            e
        }
        fn add(mut self, u: &str) -> E {
            self.0.added.push(u.to_owned());
            self
        }
        fn remove(mut self, u: &str) -> E {
            self.0.removed.push(u.to_owned());
            self
        }
        fn self_remove(mut self, u: &str) -> E {
            self.0.self_removed.push(u.to_owned());
            self
        }
        fn list(mut self, s: &RoomState, entries: &[(&str, u32)]) -> E {
            self.0.app_data.push(change(
                component::PARTICIPANT_LIST,
                s.participants.encode().ok(),
                list(entries).encode().ok(),
            ));
            self
        }
        fn roles(mut self, roles: &RoleData) -> E {
            self.0
                .app_data
                .push(change(component::ROLES_LIST, None, roles.encode().ok()));
            self
        }
        fn preauth(mut self, p: Option<&PreAuthData>) -> E {
            self.0.app_data.push(change(
                component::PREAUTH_LIST,
                None,
                p.and_then(|p| p.encode().ok()),
            ));
            self
        }
        fn base(mut self, base: &BaseRoomPolicy) -> E {
            self.0.app_data.push(change(
                component::BASE_ROOM_POLICY,
                None,
                base.encode().ok(),
            ));
            self
        }
    }

    fn ok(s: &RoomState, e: E) -> RoomState {
        let sender = e.0.sender.clone();
        match authorize(s, &sender, &e.0) {
            Ok(n) => n,
            Err(why) => panic!("refused: {why}"),
        }
    }

    fn no(s: &RoomState, e: E) -> PolicyRefusal {
        let sender = e.0.sender.clone();
        match authorize(s, &sender, &e.0) {
            Ok(n) => panic!("allowed: {:?}", n.participants),
            Err(why) => why,
        }
    }

    fn base() -> BaseRoomPolicy {
        BaseRoomPolicy {
            fixed_membership: false,
            parent_dependant: false,
            parent_room: vec![],
            multi_device: true,
            max_clients: None,
            max_users: None,
            pseudonyms_allowed: false,
            persistent_room: true,
            discoverable: false,
            policy_component_ids: vec![],
        }
    }

    /// The default roles with `f` applied to role `index`.
    fn roles_with(index: u32, f: impl FnOnce(&mut Role)) -> RoleData {
        let mut r = default_roles();
        if let Some(x) = r.roles.iter_mut().find(|x| x.role_index == index) {
            f(x);
        }
        r
    }

    fn without(caps: &mut Vec<u16>, c: u16) {
        caps.retain(|x| *x != c);
    }

    /// A preauth_list entry: Basic-credential claims (id, value) to a default role.
    fn entry(claims: &[(&[u8], &str)], role: u32) -> mimi_wire::proto::room::PreAuthRoleEntry {
        mimi_wire::proto::room::PreAuthRoleEntry {
            claimset: claims.iter().map(|(i, v)| Claim::basic(i, v)).collect(),
            target_role: default_roles().role(role).expect("a default role").clone(),
        }
    }

    fn preauth(entries: Vec<mimi_wire::proto::room::PreAuthRoleEntry>) -> PreAuthData {
        PreAuthData {
            preauthorized_entries: entries,
        }
    }

    const DOMAIN: &[u8] = preauth_claim::DOMAIN;
    const USER: &[u8] = preauth_claim::USER;

    #[test]
    fn a_preauthorized_joiner_lists_itself_with_its_role_in_its_external_commit() {
        let s = RoomState {
            preauth: Some(preauth(vec![entry(&[(DOMAIN, "d.example")], 2)])),
            ..room()
        };
        let joined = |role| [(A, 4), (B, 3), (C, 2), (X, 1), (D, role)];
        let n = ok(&s, E::external(D).list(&s, &joined(2)));
        assert_eq!(n.role_of(D), 2);
        assert!(n.members.iter().any(|m| m == D));
        assert_eq!(n.preauth, s.preauth, "kept");
        assert!(s.may_join(D).is_ok());
        assert!(s.provider_takes_part("d.example"));
        // Not above the preauthorized role.
        assert_eq!(
            no(&s, E::external(D).list(&s, &joined(3))),
            PolicyRefusal::JoinNotAuthorized { user: D.into() }
        );
        // Listed it must be: the hub does not list it for the group.
        assert_eq!(
            no(&s, E::external(D)),
            PolicyRefusal::UnlistedMember { user: D.into() }
        );
        // The joiner's commit changes nothing else: no one else listed, no preauth_list.
        let eve = "mimi://e.example/u/eve";
        let e = E::external(D).list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2), (eve, 2)]);
        assert!(matches!(
            no(&s, e),
            PolicyRefusal::AddNotAuthorized { role: 2, .. }
        ));
        let e = E::external(D)
            .list(&s, &joined(2))
            .preauth(Some(&preauth(vec![])));
        assert_eq!(
            no(&s, e),
            PolicyRefusal::PreauthChangeNotAuthorized { user: D.into() }
        );
        // A user of another domain is neither listed nor preauthorized.
        let e = E::external(eve).list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (eve, 2)]);
        assert_eq!(
            no(&s, e),
            PolicyRefusal::JoinNotAuthorized { user: eve.into() }
        );
        assert!(s.may_join(eve).is_err());
        assert!(!s.provider_takes_part("e.example"));
        // A banned user is never let back in by a preauthorization.
        let c_domain = RoomState {
            preauth: Some(preauth(vec![entry(&[(DOMAIN, "c.example")], 2)])),
            ..room()
        };
        assert_eq!(
            no(&c_domain, E::external(X)),
            PolicyRefusal::Banned { user: X.into() }
        );
        assert!(c_domain.may_join(X).is_err());
    }

    #[test]
    fn preauthorization_takes_the_first_matching_entry_with_checkable_claims_and_join_capability() {
        let joined = |role| [(A, 4), (B, 3), (C, 2), (X, 1), (D, role)];
        // dave matches the user entry first (role 3), so not the domain entry's role 2.
        let s = RoomState {
            preauth: Some(preauth(vec![
                entry(&[(USER, D)], 3),
                entry(&[(DOMAIN, "d.example")], 2),
            ])),
            ..room()
        };
        assert_eq!(s.preauth_role(D), Some(3));
        ok(&s, E::external(D).list(&s, &joined(3)));
        assert!(matches!(
            no(&s, E::external(D).list(&s, &joined(2))),
            PolicyRefusal::JoinNotAuthorized { .. }
        ));
        // Every claim of the set must hold.
        let both = RoomState {
            preauth: Some(preauth(vec![entry(
                &[(DOMAIN, "d.example"), (USER, "mimi://d.example/u/other")],
                2,
            )])),
            ..room()
        };
        assert_eq!(both.preauth_role(D), None);
        assert!(matches!(
            no(&both, E::external(D).list(&both, &joined(2))),
            PolicyRefusal::JoinNotAuthorized { .. }
        ));
        // A claim the hub cannot check (another credential type, another id) never holds.
        let mut x509 = entry(&[(DOMAIN, "d.example")], 2);
        x509.claimset[0].claim_id.credential_type = 2;
        let email = entry(&[(b"email", D)], 2);
        let unknown = RoomState {
            preauth: Some(preauth(vec![x509, email])),
            ..room()
        };
        assert_eq!(unknown.preauth_role(D), None);
        assert!(!unknown.provider_takes_part("d.example"));
        assert!(matches!(
            no(&unknown, E::external(D).list(&unknown, &joined(2))),
            PolicyRefusal::JoinNotAuthorized { .. }
        ));
        // The target role must hold canJoinIfPreauthorized (in the room's roles).
        let no_cap = RoomState {
            roles: roles_with(2, |r| {
                without(&mut r.role_capabilities, cap::JOIN_IF_PREAUTHORIZED)
            }),
            preauth: Some(preauth(vec![entry(&[(DOMAIN, "d.example")], 2)])),
            ..room()
        };
        assert!(matches!(
            no(&no_cap, E::external(D).list(&no_cap, &joined(2))),
            PolicyRefusal::JoinNotAuthorized { .. }
        ));
        assert!(no_cap.may_join(D).is_err());
        assert!(!no_cap.provider_takes_part("d.example"));
    }

    #[test]
    fn a_hub_kept_room_lists_a_preauthorized_joiner_with_its_role() {
        let mut app_data = BTreeMap::new();
        app_data.insert(
            component::PREAUTH_LIST,
            preauth(vec![entry(&[(USER, D)], 3)])
                .encode()
                .expect("encode"),
        );
        let s = RoomState::created(&app_data, strs(&[A])).expect("created");
        assert!(s.hub_kept_list);
        assert!(s.provider_takes_part("d.example"));
        let n = ok(&s, E::external(D));
        assert_eq!(n.role_of(D), 3);
        // Others of that provider are not preauthorized (and it has no participant yet).
        assert_eq!(
            no(&s, E::external("mimi://d.example/u/dan")),
            PolicyRefusal::JoinNotAuthorized {
                user: "mimi://d.example/u/dan".into()
            }
        );
    }

    #[test]
    fn changing_the_preauth_list_needs_its_capability_and_no_list_change_but_removals() {
        let s = room();
        let p = preauth(vec![entry(&[(DOMAIN, "d.example")], 2)]);
        // alice, super_admin, holds canChangePreauthorizedUserList.
        let n = ok(&s, E::commit(A).preauth(Some(&p)));
        assert_eq!(n.preauth.as_ref(), Some(&p));
        assert!(n.provider_takes_part("d.example"));
        assert_eq!(ok(&n, E::commit(A).preauth(None)).preauth, None);
        // bob, group_admin, does not.
        assert_eq!(
            no(&s, E::commit(B).preauth(Some(&p))),
            PolicyRefusal::PreauthChangeNotAuthorized { user: B.into() }
        );
        // Not with an addition or a role change ...
        let e = E::commit(A)
            .preauth(Some(&p))
            .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]);
        assert_eq!(no(&s, e), PolicyRefusal::PreauthChangeWithListChange);
        let e = E::commit(A)
            .preauth(Some(&p))
            .list(&s, &[(A, 4), (B, 3), (C, 3), (X, 1)]);
        assert_eq!(no(&s, e), PolicyRefusal::PreauthChangeWithListChange);
        // ... but with a removal.
        let e = E::commit(A)
            .preauth(Some(&p))
            .remove(C)
            .remove(C)
            .list(&s, &[(A, 4), (B, 3), (X, 1)]);
        assert_eq!(ok(&s, e).role_of(C), NO_ROLE);
        let mut bad = E::commit(A);
        bad.0
            .app_data
            .push(change(component::PREAUTH_LIST, None, Some(vec![9, 9])));
        assert_eq!(
            no(&s, bad),
            PolicyRefusal::MalformedComponent {
                component: component::PREAUTH_LIST
            }
        );
    }

    #[test]
    fn can_change_own_role_moves_only_to_the_first_preauthorized_role() {
        let p = preauth(vec![
            entry(&[(USER, C)], 3),
            entry(&[(DOMAIN, "c.example")], 4),
        ]);
        let s = RoomState {
            roles: roles_with(2, |r| r.role_capabilities.push(cap::CHANGE_OWN_ROLE)),
            preauth: Some(p.clone()),
            ..room()
        };
        let n = ok(&s, E::commit(C).list(&s, &[(A, 4), (B, 3), (C, 3), (X, 1)]));
        assert_eq!(n.role_of(C), 3);
        // Not to the second matching entry's role.
        assert_eq!(
            no(&s, E::commit(C).list(&s, &[(A, 4), (B, 3), (C, 4), (X, 1)])),
            PolicyRefusal::OwnRoleChange { user: C.into() }
        );
        // Without canChangeOwnRole: no.
        let plain = RoomState {
            preauth: Some(p),
            ..room()
        };
        assert_eq!(
            no(
                &plain,
                E::commit(C).list(&plain, &[(A, 4), (B, 3), (C, 3), (X, 1)])
            ),
            PolicyRefusal::OwnRoleChange { user: C.into() }
        );
        // Without a preauthorization: no.
        let none = RoomState {
            preauth: None,
            ..s.clone()
        };
        assert_eq!(
            no(
                &none,
                E::commit(C).list(&none, &[(A, 4), (B, 3), (C, 3), (X, 1)])
            ),
            PolicyRefusal::OwnRoleChange { user: C.into() }
        );
        // The target role's constraints still hold.
        let full = RoomState {
            roles: roles_with(3, |r| r.maximum_participants_constraint = Some(1)),
            ..s
        };
        let mut full = full;
        if let Some(r) = full.roles.roles.iter_mut().find(|r| r.role_index == 2) {
            r.role_capabilities.push(cap::CHANGE_OWN_ROLE);
        }
        assert_eq!(
            no(
                &full,
                E::commit(C).list(&full, &[(A, 4), (B, 3), (C, 3), (X, 1)])
            ),
            PolicyRefusal::TooManyParticipants { role: 3, max: 1 }
        );
    }

    #[test]
    fn sending_messages_needs_can_send_message() {
        let s = room();
        assert_eq!(s.may_send(C), Ok(()));
        let mute = RoomState {
            roles: roles_with(2, |r| without(&mut r.role_capabilities, cap::SEND_MESSAGE)),
            ..room()
        };
        assert_eq!(
            mute.may_send(C),
            Err(PolicyRefusal::SendNotAuthorized { user: C.into() })
        );
        // Other roles keep theirs.
        assert_eq!(mute.may_send(A), Ok(()));
    }

    #[test]
    fn adding_a_user_needs_can_add_participant_and_a_change_from_role_0() {
        let s = room();
        let n = ok(
            &s,
            E::commit(B)
                .add(D)
                .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]),
        );
        assert_eq!(n.role_of(D), 2);
        assert_eq!(n.members.iter().filter(|m| *m == D).count(), 1);
        // carol is ordinary: no canAddParticipant.
        let e = E::commit(C)
            .add(D)
            .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]);
        assert!(matches!(
            no(&s, e),
            PolicyRefusal::AddNotAuthorized { role: 2, .. }
        ));
        // bob, an admin, may add as 1..3 but not as super_admin.
        let e = E::commit(B)
            .add(D)
            .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 4)]);
        assert!(matches!(
            no(&s, e),
            PolicyRefusal::AddNotAuthorized { role: 4, .. }
        ));
        // Listing only (clients later) is an add too.
        let n = ok(
            &s,
            E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 4)]),
        );
        assert_eq!(n.role_of(D), 4);
    }

    #[test]
    fn an_mls_add_needs_the_list_change_before_or_with_it() {
        let s = room();
        assert_eq!(
            no(&s, E::commit(A).add(D)),
            PolicyRefusal::UnlistedMember { user: D.into() }
        );
        // A banned user's clients are never added.
        assert_eq!(
            no(&s, E::commit(A).add(X)),
            PolicyRefusal::BannedMember { user: X.into() }
        );
        // Listed in an earlier commit, added now.
        let s = ok(
            &s,
            E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]),
        );
        ok(&s, E::commit(B).add(D));
    }

    #[test]
    fn maximum_participants_constraints_bound_adds() {
        let s = RoomState {
            roles: roles_with(2, |r| r.maximum_participants_constraint = Some(1)),
            ..room()
        };
        let e = E::commit(A)
            .add(D)
            .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]);
        assert_eq!(
            no(&s, e),
            PolicyRefusal::TooManyParticipants { role: 2, max: 1 }
        );
        ok(
            &s,
            E::commit(A)
                .add(D)
                .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 3)]),
        );

        let s = RoomState {
            roles: roles_with(2, |r| r.maximum_active_participants_constraint = Some(1)),
            ..room()
        };
        let e = E::commit(A)
            .add(D)
            .list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]);
        assert_eq!(no(&s, e), PolicyRefusal::TooManyActive { role: 2, max: 1 });
        // Listed without a client: not active.
        ok(
            &s,
            E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)]),
        );
    }

    #[test]
    fn base_policy_max_users_max_clients_single_device_and_fixed_membership() {
        let five = &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)][..];
        let mut s = room();
        s.base = Some(BaseRoomPolicy {
            max_users: Some(4),
            ..base()
        });
        // The banned entry does not count: four users.
        ok(&s, E::commit(A).list(&s, five));
        let e = E::commit(A).list(
            &s,
            &[
                (A, 4),
                (B, 3),
                (C, 2),
                (X, 1),
                (D, 2),
                ("mimi://d.example/u/e", 2),
            ],
        );
        assert_eq!(no(&s, e), PolicyRefusal::TooManyUsers { max: 4 });

        s.base = Some(BaseRoomPolicy {
            max_clients: Some(4),
            ..base()
        });
        assert_eq!(
            no(&s, E::commit(C).add(C)),
            PolicyRefusal::TooManyClients { max: 4 }
        );
        ok(&s, E::commit(C).remove(C).add(C));

        s.base = Some(BaseRoomPolicy {
            multi_device: false,
            ..base()
        });
        assert_eq!(
            no(&s, E::commit(A).add(A)),
            PolicyRefusal::SingleDevice { user: A.into() }
        );
        ok(&s, E::commit(A).list(&s, five));

        s.base = Some(BaseRoomPolicy {
            fixed_membership: true,
            ..base()
        });
        assert_eq!(
            no(&s, E::commit(A).list(&s, five)),
            PolicyRefusal::FixedMembership
        );
        let e = E::commit(A)
            .remove(C)
            .remove(C)
            .list(&s, &[(A, 4), (B, 3), (X, 1)]);
        assert_eq!(no(&s, e), PolicyRefusal::FixedMembership);
        // Clients of listed users still come and go.
        ok(&s, E::commit(A).add(A));
    }

    #[test]
    fn clients_of_listed_users_need_can_add_own_client_or_can_add_participant() {
        let s = room();
        ok(&s, E::commit(C).add(C));
        ok(&s, E::commit(B).add(C));
        assert_eq!(
            no(&s, E::commit(C).add(B)),
            PolicyRefusal::AddClientNotAuthorized {
                sender: C.into(),
                user: B.into()
            }
        );
        let s = RoomState {
            roles: roles_with(2, |r| {
                without(&mut r.role_capabilities, cap::ADD_OWN_CLIENT)
            }),
            ..room()
        };
        assert_eq!(
            no(&s, E::commit(C).add(C)),
            PolicyRefusal::AddOwnClientNotAuthorized { user: C.into() }
        );
    }

    #[test]
    fn external_joins_follow_can_open_join_on_role_0() {
        let s = room();
        let joined = &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 2)][..];
        // No canOpenJoin on role 0 here.
        assert_eq!(
            no(&s, E::external(D).list(&s, joined)),
            PolicyRefusal::JoinNotAuthorized { user: D.into() }
        );
        assert!(s.may_join(D).is_err());
        let open = RoomState {
            roles: roles_with(0, |r| {
                r.role_capabilities.push(cap::OPEN_JOIN);
                r.authorized_role_changes = vec![RoleChangeTargets {
                    from_role_index: 0,
                    target_role_indexes: vec![2],
                }];
                r.maximum_active_participants_constraint = None;
            }),
            ..room()
        };
        assert!(open.may_join(D).is_ok());
        assert!(open.provider_takes_part("d.example"));
        let n = ok(&open, E::external(D).list(&open, joined));
        assert_eq!(n.role_of(D), 2);
        assert!(n.members.iter().any(|m| m == D));
        // Only to the targets of role 0.
        let e = E::external(D).list(&open, &[(A, 4), (B, 3), (C, 2), (X, 1), (D, 3)]);
        assert_eq!(
            no(&open, e),
            PolicyRefusal::JoinNotAuthorized { user: D.into() }
        );
        // Joining unlisted.
        assert_eq!(
            no(&open, E::external(D)),
            PolicyRefusal::UnlistedMember { user: D.into() }
        );
        // A listed user's new client: canAddOwnClient.
        ok(&s, E::external(C));
        assert!(s.may_join(C).is_ok());
        let s2 = RoomState {
            roles: roles_with(2, |r| {
                without(&mut r.role_capabilities, cap::ADD_OWN_CLIENT)
            }),
            ..room()
        };
        assert_eq!(
            no(&s2, E::external(C)),
            PolicyRefusal::AddOwnClientNotAuthorized { user: C.into() }
        );
        assert!(s2.may_join(C).is_err());
        // Banned: never, even in an open room.
        assert_eq!(
            no(&open, E::external(X)),
            PolicyRefusal::Banned { user: X.into() }
        );
        assert_eq!(
            open.may_join(X),
            Err(PolicyRefusal::Banned { user: X.into() })
        );
    }

    #[test]
    fn removing_another_user_needs_can_remove_participant_and_all_its_clients_gone() {
        let s = room();
        let n = ok(
            &s,
            E::commit(B)
                .remove(C)
                .remove(C)
                .list(&s, &[(A, 4), (B, 3), (X, 1)]),
        );
        assert_eq!(n.role_of(C), NO_ROLE);
        assert_eq!(n.members, strs(&[A, B]));
        let e = E::commit(C).remove(B).list(&s, &[(A, 4), (C, 2), (X, 1)]);
        assert_eq!(
            no(&s, e),
            PolicyRefusal::RemoveNotAuthorized {
                sender: C.into(),
                user: B.into()
            }
        );
        // An admin's changes do not reach the super_admin.
        let e = E::commit(B).remove(A).list(&s, &[(B, 3), (C, 2), (X, 1)]);
        assert!(matches!(
            no(&s, e),
            PolicyRefusal::RemoveNotAuthorized { .. }
        ));
        // One of carol's clients stays.
        let e = E::commit(B).remove(C).list(&s, &[(A, 4), (B, 3), (X, 1)]);
        assert_eq!(
            no(&s, e),
            PolicyRefusal::RemovedUserStillHasClients { user: C.into() }
        );
        // Clients of an unlisted user go without list change (a cleanup).
        let odd = RoomState {
            members: strs(&[A, B, C, C, D]),
            ..room()
        };
        ok(&odd, E::commit(C).remove(D));
    }

    #[test]
    fn a_kick_needs_can_kick() {
        let s = room();
        let n = ok(&s, E::commit(B).remove(C));
        assert_eq!(n.role_of(C), 2, "still listed");
        assert_eq!(n.members, strs(&[A, B, C]));
        assert_eq!(
            no(&s, E::commit(C).remove(B)),
            PolicyRefusal::KickNotAuthorized {
                sender: C.into(),
                user: B.into()
            }
        );
    }

    #[test]
    fn leaving_needs_can_remove_self_and_removing_own_clients_can_remove_own_client() {
        let s = room();
        let gone = &[(A, 4), (B, 3), (X, 1)][..];
        // carol proposes her leave (SelfRemove of both clients); alice commits it.
        ok(
            &s,
            E::proposal(C).self_remove(C).self_remove(C).list(&s, gone),
        );
        let n = ok(
            &s,
            E::commit(A).self_remove(C).self_remove(C).list(&s, gone),
        );
        assert_eq!(n.role_of(C), NO_ROLE);
        let s2 = RoomState {
            roles: roles_with(2, |r| without(&mut r.role_capabilities, cap::REMOVE_SELF)),
            ..room()
        };
        let e = E::commit(A).self_remove(C).self_remove(C).list(&s2, gone);
        assert_eq!(
            no(&s2, e),
            PolicyRefusal::LeaveNotAuthorized { user: C.into() }
        );
        // One client leaves, carol stays listed.
        ok(&s, E::proposal(C).self_remove(C));
        ok(&s, E::proposal(C).remove(C));
        let s3 = RoomState {
            roles: roles_with(2, |r| {
                without(&mut r.role_capabilities, cap::REMOVE_OWN_CLIENT)
            }),
            ..room()
        };
        assert_eq!(
            no(&s3, E::commit(A).self_remove(C)),
            PolicyRefusal::RemoveOwnClientNotAuthorized { user: C.into() }
        );
    }

    #[test]
    fn role_changes_need_can_change_user_role_and_never_ones_own() {
        let s = room();
        let n = ok(&s, E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 3), (X, 1)]));
        assert_eq!(n.role_of(C), 3);
        assert_eq!(
            no(&s, E::commit(B).list(&s, &[(A, 4), (B, 3), (C, 4), (X, 1)])),
            PolicyRefusal::RoleChangeNotAuthorized {
                sender: B.into(),
                user: C.into(),
                from: 2,
                to: 4
            }
        );
        assert!(matches!(
            no(&s, E::commit(C).list(&s, &[(A, 4), (B, 2), (C, 2), (X, 1)])),
            PolicyRefusal::RoleChangeNotAuthorized { .. }
        ));
        assert_eq!(
            no(&s, E::commit(B).list(&s, &[(A, 4), (B, 4), (C, 2), (X, 1)])),
            PolicyRefusal::OwnRoleChange { user: B.into() }
        );
    }

    #[test]
    fn ban_and_unban_need_can_ban_and_can_unban() {
        let s = room();
        let banned = &[(A, 4), (B, 3), (C, 1), (X, 1)][..];
        let n = ok(&s, E::commit(B).remove(C).remove(C).list(&s, banned));
        assert!(n.is_banned(C));
        // The banned user's clients must go with the ban.
        assert_eq!(
            no(&s, E::commit(B).remove(C).list(&s, banned)),
            PolicyRefusal::BannedMember { user: C.into() }
        );
        let s2 = RoomState {
            roles: roles_with(3, |r| without(&mut r.role_capabilities, cap::BAN)),
            ..room()
        };
        assert!(matches!(
            no(&s2, E::commit(B).remove(C).remove(C).list(&s2, banned)),
            PolicyRefusal::BanNotAuthorized { .. }
        ));
        // Unban: back to ordinary, by an admin.
        let n = ok(&s, E::commit(B).list(&s, &[(A, 4), (B, 3), (C, 2), (X, 2)]));
        assert_eq!(n.role_of(X), 2);
        let s3 = RoomState {
            roles: roles_with(3, |r| without(&mut r.role_capabilities, cap::UNBAN)),
            ..room()
        };
        assert_eq!(
            no(
                &s3,
                E::commit(B).list(&s3, &[(A, 4), (B, 3), (C, 2), (X, 2)])
            ),
            PolicyRefusal::UnbanNotAuthorized {
                sender: B.into(),
                user: X.into(),
                to: 2
            }
        );
        // A role 1 not named "banned" is an ordinary role: moving to it is a role change.
        let s4 = RoomState {
            roles: roles_with(1, |r| r.role_name = VLBytes::new(b"guest".to_vec())),
            ..room()
        };
        assert!(!s4.is_banned(X));
        assert!(matches!(
            no(
                &s4,
                E::commit(C).list(&s4, &[(A, 4), (B, 1), (C, 2), (X, 1)])
            ),
            PolicyRefusal::RoleChangeNotAuthorized { .. }
        ));
    }

    #[test]
    fn minimum_constraints_keep_a_role_filled() {
        let s = RoomState {
            roles: roles_with(3, |r| {
                r.minimum_participants_constraint = 1;
                r.minimum_active_participants_constraint = 1;
            }),
            ..room()
        };
        assert_eq!(
            no(
                &s,
                E::commit(A).remove(B).list(&s, &[(A, 4), (C, 2), (X, 1)])
            ),
            PolicyRefusal::TooFewParticipants { role: 3, min: 1 }
        );
        assert_eq!(
            no(&s, E::commit(A).list(&s, &[(A, 4), (B, 2), (C, 2), (X, 1)])),
            PolicyRefusal::TooFewParticipants { role: 3, min: 1 }
        );
        assert_eq!(
            no(&s, E::commit(A).remove(B)),
            PolicyRefusal::TooFewActive { role: 3, min: 1 }
        );
        // With a second admin, bob may go.
        let s = ok(&s, E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 3), (X, 1)]));
        ok(
            &s,
            E::commit(A).remove(B).list(&s, &[(A, 4), (C, 3), (X, 1)]),
        );
    }

    #[test]
    fn roles_and_base_policy_change_only_by_can_change_user_role_and_alone() {
        let s = room();
        let mut roles = default_roles();
        roles.roles[2].role_description = VLBytes::new(b"anyone".to_vec());
        let n = ok(&s, E::commit(A).roles(&roles));
        assert_eq!(n.roles, roles);
        let n = ok(&s, E::commit(B).base(&base()));
        assert_eq!(n.base, Some(base()));
        assert_eq!(
            no(&s, E::commit(C).roles(&roles)),
            PolicyRefusal::PolicyChangeNotAuthorized { user: C.into() }
        );
        assert_eq!(
            no(&s, E::commit(C).base(&base())),
            PolicyRefusal::PolicyChangeNotAuthorized { user: C.into() }
        );
        let e = E::commit(A)
            .roles(&roles)
            .list(&s, &[(A, 4), (B, 3), (C, 3), (X, 1)]);
        assert_eq!(no(&s, e), PolicyRefusal::PolicyChangeWithListChange);
        // A listed user's role must stay defined.
        let mut fewer = default_roles();
        fewer.roles.retain(|r| r.role_index != 2);
        assert_eq!(
            no(&s, E::commit(A).roles(&fewer)),
            PolicyRefusal::UnknownRole {
                user: C.into(),
                role: 2
            }
        );
        let open_two = roles_with(2, |r| r.role_capabilities.push(cap::OPEN_JOIN));
        assert!(matches!(
            no(&s, E::commit(A).roles(&open_two)),
            PolicyRefusal::InvalidRoles(_)
        ));
    }

    #[test]
    fn malformed_removed_or_inconsistent_components_are_refused() {
        let s = room();
        let mut e = E::commit(A);
        e.0.app_data
            .push(change(component::PARTICIPANT_LIST, None, Some(vec![0xff])));
        assert_eq!(
            no(&s, e),
            PolicyRefusal::MalformedComponent {
                component: component::PARTICIPANT_LIST
            }
        );
        let mut e = E::commit(A);
        e.0.app_data
            .push(change(component::ROLES_LIST, Some(vec![]), None));
        assert_eq!(
            no(&s, e),
            PolicyRefusal::ComponentRemoved {
                component: component::ROLES_LIST
            }
        );
        let e = E::commit(A).base(&base()).base(&base());
        assert!(matches!(
            no(&s, e),
            PolicyRefusal::MalformedComponent { .. }
        ));
        assert_eq!(
            no(&s, E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 2), (C, 3)])),
            PolicyRefusal::DuplicateParticipant { user: C.into() }
        );
        assert!(matches!(
            no(&s, E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 2), (D, 0)])),
            PolicyRefusal::UnknownRole { role: 0, .. }
        ));
        // Other components are not judged here.
        let mut e = E::commit(C);
        e.0.app_data
            .push(change(component::ROOM_METADATA, None, Some(vec![1, 2, 3])));
        ok(&s, e);
    }

    #[test]
    fn a_removed_or_banned_participant_only_removes_its_own_clients() {
        // xavier is banned but still has a client; dave has one and is not listed.
        let s = RoomState {
            members: strs(&[A, B, C, C, X, D]),
            ..room()
        };
        assert_eq!(
            no(&s, E::commit(X)),
            PolicyRefusal::Banned { user: X.into() }
        );
        assert_eq!(
            no(&s, E::commit(X).remove(X)),
            PolicyRefusal::Banned { user: X.into() }
        );
        assert_eq!(
            no(&s, E::commit(D).remove(D)),
            PolicyRefusal::InactiveSender { user: D.into() }
        );
        ok(&s, E::proposal(X).remove(X));
        ok(&s, E::proposal(D).self_remove(D));
        assert_eq!(
            no(&s, E::proposal(X).remove(C)),
            PolicyRefusal::Banned { user: X.into() }
        );
        assert_eq!(
            no(&s, E::proposal(D).remove(D).add(D)),
            PolicyRefusal::InactiveSender { user: D.into() }
        );
        // An empty proposal (an Update, say) is neither.
        assert_eq!(
            no(&s, E::proposal(D)),
            PolicyRefusal::InactiveSender { user: D.into() }
        );
    }

    #[test]
    fn only_active_participants_send_messages() {
        let s = RoomState {
            members: strs(&[A, B, C, C, X, D]),
            participants: list(&[(A, 4), (B, 3), (C, 2), (X, 1), ("mimi://e.example/u/e", 2)]),
            ..room()
        };
        assert_eq!(s.may_send(C), Ok(()));
        assert_eq!(s.may_send(X), Err(PolicyRefusal::Banned { user: X.into() }));
        assert_eq!(
            s.may_send(D),
            Err(PolicyRefusal::InactiveSender { user: D.into() })
        );
        // Listed, but with no client in the group.
        assert!(matches!(
            s.may_send("mimi://e.example/u/e"),
            Err(PolicyRefusal::InactiveSender { .. })
        ));
    }

    #[test]
    fn a_room_without_a_participant_list_is_kept_by_the_hub() {
        let s = RoomState::created(&BTreeMap::new(), strs(&[A, A])).expect("created");
        assert!(s.hub_kept_list);
        assert_eq!(s.participants, list(&[(A, 4)]));
        assert_eq!(s.role_name(4), "super_admin");
        // An MLS add by the creator lists the user as ordinary.
        let s = ok(&s, E::commit(A).add(B).add(C));
        assert_eq!(s.participants, list(&[(A, 4), (B, 2), (C, 2)]));
        // An ordinary user adds nobody, removes nobody else.
        assert_eq!(
            no(&s, E::commit(B).add(D)),
            PolicyRefusal::AddNotAuthorized {
                sender: B.into(),
                user: D.into(),
                role: 2
            }
        );
        assert!(matches!(
            no(&s, E::commit(B).remove(C)),
            PolicyRefusal::RemoveNotAuthorized { .. }
        ));
        // Leaving unlists.
        let n = ok(&s, E::commit(B).remove(B));
        assert_eq!(n.participants, list(&[(A, 4), (C, 2)]));
        // A user of a provider with a participant may join as ordinary; others not.
        let cousin = "mimi://b.example/u/bea";
        assert!(s.may_join(cousin).is_ok());
        assert!(s.provider_takes_part("b.example"));
        assert!(!s.provider_takes_part("d.example"));
        let n = ok(&s, E::external(cousin));
        assert_eq!(n.role_of(cousin), 2);
        assert!(s.may_join(D).is_err());
        assert_eq!(
            no(&s, E::external(D)),
            PolicyRefusal::JoinNotAuthorized { user: D.into() }
        );
        // A roles change may not come with an MLS add (a list change here).
        assert_eq!(
            no(&s, E::commit(A).add(D).roles(&default_roles())),
            PolicyRefusal::PolicyChangeWithListChange
        );
        // The group's own list takes over.
        let n = ok(&s, E::commit(A).list(&s, &[(A, 4), (B, 3), (C, 2)]));
        assert!(!n.hub_kept_list);
        assert_eq!(n.role_of(B), 3);
    }

    #[test]
    fn a_created_room_with_a_list_must_list_its_members() {
        let mut app_data = BTreeMap::new();
        app_data.insert(
            component::PARTICIPANT_LIST,
            list(&[(A, 4)]).encode().expect("encode"),
        );
        let s = RoomState::created(&app_data, strs(&[A])).expect("created");
        assert!(!s.hub_kept_list);
        assert_eq!(
            RoomState::created(&app_data, strs(&[A, B])),
            Err(PolicyRefusal::UnlistedMember { user: B.into() })
        );
        app_data.insert(component::ROLES_LIST, vec![0xff, 0]);
        assert!(matches!(
            RoomState::created(&app_data, strs(&[A])),
            Err(PolicyRefusal::MalformedComponent { .. })
        ));
    }
}
