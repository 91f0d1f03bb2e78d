//! A default room state for new rooms: the roles, base policy and first participant list a
//! demo client puts in a group's app_data_dictionary, shared with the tests of the hub's
//! room policy so both sides agree on what the role indexes mean.
//!
//! Roles, in the spirit of draft-ietf-mimi-room-policy Appendix A.2: 1 banned (nothing),
//! 2 regular (send, receive, report, leave, add and remove its own clients, join if
//! preauthorized), 3 owner (all a regular participant may, plus adding, removing, kicking,
//! banning, unbanning participants, changing their roles and the preauth_list). Index 0 is
//! the "no role" of §3 and has no entry.

use super::IdentifierUri;
use super::VLBytes;
use super::room::{
    BANNED_ROLE, BaseRoomPolicy, Claim, NO_ROLE, ParticipantListData, ParticipantListUpdate,
    PreAuthData, PreAuthRoleEntry, Role, RoleChangeTargets, RoleData, UserIndexRolePair,
    UserRolePair, capability, component,
};
use crate::error::WireError;

/// The ordinary participant's role index.
pub const REGULAR_ROLE: u32 = 2;
/// The owner's (administrator's) role index; a room's creator takes it.
pub const OWNER_ROLE: u32 = 3;

// canJoinIfPreauthorized is inert until a preauth_list names the role.
const REGULAR_CAPABILITIES: [u16; 7] = [
    capability::SEND_MESSAGE,
    capability::RECEIVE_MESSAGE,
    capability::REPORT_ABUSE,
    capability::REMOVE_SELF,
    capability::ADD_OWN_CLIENT,
    capability::REMOVE_OWN_CLIENT,
    capability::JOIN_IF_PREAUTHORIZED,
];

const OWNER_EXTRA_CAPABILITIES: [u16; 7] = [
    capability::ADD_PARTICIPANT,
    capability::REMOVE_PARTICIPANT,
    capability::KICK,
    capability::BAN,
    capability::UNBAN,
    capability::CHANGE_USER_ROLE,
    capability::CHANGE_PREAUTH_LIST,
];

fn role(index: u32, name: &str, description: &str, capabilities: Vec<u16>) -> Role {
    Role {
        role_index: index,
        role_name: VLBytes::new(name.as_bytes().to_vec()),
        role_description: VLBytes::new(description.as_bytes().to_vec()),
        role_capabilities: capabilities,
        minimum_participants_constraint: 0,
        maximum_participants_constraint: None,
        minimum_active_participants_constraint: 0,
        // A banned user has no clients in the group.
        maximum_active_participants_constraint: (index == BANNED_ROLE).then_some(0),
        authorized_role_changes: Vec::new(),
    }
}

/// The default roles_list: banned (1), regular (2), owner (3).
pub fn default_roles() -> RoleData {
    let mut owner_caps = REGULAR_CAPABILITIES.to_vec();
    owner_caps.extend_from_slice(&OWNER_EXTRA_CAPABILITIES);
    let mut owner = role(OWNER_ROLE, "owner", "administers the room", owner_caps);
    // Adding (0 -> regular or owner), banning (-> 1), unbanning (1 -> 0), removing (-> 0),
    // promoting and demoting.
    owner.authorized_role_changes = vec![
        RoleChangeTargets {
            from_role_index: NO_ROLE,
            target_role_indexes: vec![BANNED_ROLE, REGULAR_ROLE, OWNER_ROLE],
        },
        RoleChangeTargets {
            from_role_index: BANNED_ROLE,
            target_role_indexes: vec![NO_ROLE],
        },
        RoleChangeTargets {
            from_role_index: REGULAR_ROLE,
            target_role_indexes: vec![NO_ROLE, BANNED_ROLE, OWNER_ROLE],
        },
        RoleChangeTargets {
            from_role_index: OWNER_ROLE,
            target_role_indexes: vec![NO_ROLE, BANNED_ROLE, REGULAR_ROLE],
        },
    ];
    RoleData {
        roles: vec![
            role(BANNED_ROLE, "banned", "may not take part", Vec::new()),
            role(
                REGULAR_ROLE,
                "regular",
                "an ordinary participant",
                REGULAR_CAPABILITIES.to_vec(),
            ),
            owner,
        ],
    }
}

/// The default base_room_policy: open membership managed by the roles, several devices per
/// user, not persistent, not discoverable.
pub fn default_base_policy() -> BaseRoomPolicy {
    BaseRoomPolicy {
        fixed_membership: false,
        parent_dependant: false,
        parent_room: Vec::new(),
        multi_device: true,
        max_clients: None,
        max_users: None,
        pseudonyms_allowed: false,
        persistent_room: false,
        discoverable: false,
        policy_component_ids: vec![
            component::PARTICIPANT_LIST,
            component::ROLES_LIST,
            component::BASE_ROOM_POLICY,
        ],
    }
}

/// The first participant list: the creator as owner.
pub fn initial_participants(creator: &str) -> ParticipantListData {
    ParticipantListData {
        participants: vec![UserRolePair {
            user: IdentifierUri::new(creator),
            role_index: OWNER_ROLE,
        }],
    }
}

/// A new room's app_data_dictionary entries (component id, data), sorted by id.
pub fn initial_app_data(creator: &str) -> Result<Vec<(u16, Vec<u8>)>, WireError> {
    Ok(vec![
        (
            component::PARTICIPANT_LIST,
            initial_participants(creator).encode()?,
        ),
        (component::ROLES_LIST, default_roles().encode()?),
        (component::BASE_ROOM_POLICY, default_base_policy().encode()?),
    ])
}

/// An update adding `users` with `role`.
pub fn add_participants<'a>(
    users: impl IntoIterator<Item = &'a str>,
    role: u32,
) -> ParticipantListUpdate {
    ParticipantListUpdate {
        added_participants: users
            .into_iter()
            .map(|u| UserRolePair {
                user: IdentifierUri::new(u),
                role_index: role,
            })
            .collect(),
        ..ParticipantListUpdate::default()
    }
}

/// A preauth_list entry (room-policy §4): a user satisfying every `(claim id, value)` of
/// `claims` (ids of [`super::room::preauth_claim`]) may join as `role`, a role of
/// [`default_roles`] (`None`: not one of them).
pub fn preauth_entry(claims: &[(&[u8], &str)], role: u32) -> Option<PreAuthRoleEntry> {
    Some(PreAuthRoleEntry {
        claimset: claims.iter().map(|(id, v)| Claim::basic(id, v)).collect(),
        target_role: default_roles().role(role)?.clone(),
    })
}

/// A preauth_list letting every user of `domain` join as a regular participant.
pub fn preauth_domain(domain: &str) -> PreAuthData {
    PreAuthData {
        preauthorized_entries: preauth_entry(
            &[(super::room::preauth_claim::DOMAIN, domain)],
            REGULAR_ROLE,
        )
        .into_iter()
        .collect(),
    }
}

/// An update listing `user` itself with `role`: what a joiner by external commit puts in
/// its commit (room-policy §8.1.1 canOpenJoin, canJoinIfPreauthorized).
pub fn self_listing(user: &str, role: u32) -> ParticipantListUpdate {
    add_participants([user], role)
}

/// An update removing `user` from `list` (`None`: not listed).
pub fn remove_participant(list: &ParticipantListData, user: &str) -> Option<ParticipantListUpdate> {
    let i = index_of(list, user)?;
    Some(ParticipantListUpdate {
        removed_indices: vec![i],
        ..ParticipantListUpdate::default()
    })
}

/// An update giving `user` the role `role` (`None`: not listed).
pub fn change_role(
    list: &ParticipantListData,
    user: &str,
    role: u32,
) -> Option<ParticipantListUpdate> {
    let i = index_of(list, user)?;
    Some(ParticipantListUpdate {
        changed_role_participants: vec![UserIndexRolePair {
            user_index: i,
            role_index: role,
        }],
        ..ParticipantListUpdate::default()
    })
}

/// The index of `user` in `list`.
pub fn index_of(list: &ParticipantListData, user: &str) -> Option<u32> {
    let i = list
        .participants
        .iter()
        .position(|p| p.user.as_str() == user)?;
    u32::try_from(i).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_mean_what_they_say() {
        let roles = RoleData::decode(&default_roles().encode().unwrap()).unwrap();
        let owner = roles.role(OWNER_ROLE).unwrap();
        let regular = roles.role(REGULAR_ROLE).unwrap();
        let banned = roles.role(BANNED_ROLE).unwrap();
        assert!(owner.has(capability::ADD_PARTICIPANT) && owner.has(capability::BAN));
        assert!(owner.has(capability::SEND_MESSAGE));
        assert!(regular.has(capability::REMOVE_SELF) && !regular.has(capability::ADD_PARTICIPANT));
        assert!(banned.role_capabilities.is_empty());
        assert_eq!(
            owner.targets_from(NO_ROLE),
            &[BANNED_ROLE, REGULAR_ROLE, OWNER_ROLE]
        );
        assert!(regular.authorized_role_changes.is_empty());
        let policy = BaseRoomPolicy::decode(&default_base_policy().encode().unwrap()).unwrap();
        assert_eq!(policy, default_base_policy());
        let entries = initial_app_data("mimi://a.example/u/alice").unwrap();
        let ids: Vec<u16> = entries.iter().map(|e| e.0).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "sorted by component id"
        );
    }

    #[test]
    fn update_builders_apply() {
        let alice = "mimi://a.example/u/alice";
        let bob = "mimi://b.example/u/bob";
        let list = initial_participants(alice)
            .apply(&add_participants([bob], REGULAR_ROLE))
            .unwrap();
        assert_eq!(list.role_of(bob), REGULAR_ROLE);
        let banned = list
            .apply(&change_role(&list, bob, BANNED_ROLE).unwrap())
            .unwrap();
        assert_eq!(banned.role_of(bob), BANNED_ROLE);
        let gone = list
            .apply(&remove_participant(&list, bob).unwrap())
            .unwrap();
        assert_eq!(gone.role_of(bob), NO_ROLE);
        assert_eq!(gone.role_of(alice), OWNER_ROLE);
        assert!(remove_participant(&gone, bob).is_none());
    }

    #[test]
    fn preauth_builders_name_default_roles_only() {
        let p = PreAuthData::decode(&preauth_domain("b.example").encode().unwrap()).unwrap();
        let e = &p.preauthorized_entries[0];
        assert_eq!(e.target_role.role_index, REGULAR_ROLE);
        assert_eq!(e.claimset, vec![Claim::basic(b"domain", "b.example")]);
        assert!(preauth_entry(&[], 7).is_none());
        let roles = default_roles();
        assert!(
            roles
                .role(REGULAR_ROLE)
                .unwrap()
                .has(capability::JOIN_IF_PREAUTHORIZED)
        );
        assert!(
            roles
                .role(OWNER_ROLE)
                .unwrap()
                .has(capability::CHANGE_PREAUTH_LIST)
        );
        let bob = "mimi://b.example/u/bob";
        let list = initial_participants("mimi://a.example/u/alice")
            .apply(&self_listing(bob, REGULAR_ROLE))
            .unwrap();
        assert_eq!(list.role_of(bob), REGULAR_ROLE);
    }
}
