//! Why the core refuses a request: one variant per cause, each knowing its status, its metrics
//! reason and its text, in the manner of rustls's `Error`. Call sites name the cause;
//! [`Relay::refuse`] is the one place that turns it into a [`Response`] and counts it.

use std::time::Duration;

use bytes::Bytes;
use mimi_wire::proto::{
    GroupInfoResponse, GroupInfoStatus, Protocol, SubmitMessageResponse, UpdateOutcome,
    UpdateRoomResponse, VLBytes,
};
use tracing::debug;

use super::{Relay, submit_answer};
use crate::room_policy::PolicyRefusal;
use crate::stats::RejectReason;
use crate::transport::{Response, Status};

/// A refusal of a peer's request or a local client's: what is answered, and why.
///
/// Most are answered with their status and their text as the body; those of the protocol's
/// own vocabulary (`notAllowed`, `epochTooOld`, `wrongEpoch`, `notAuthorized`, ...) with 200
/// and the endpoint's response structure, as protocol-06 asks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// 400: the body or the path could not be decoded.
    #[error("{0}")]
    Malformed(Malformed),
    /// 413: the body is over the configured limit.
    #[error("body over the size limit")]
    TooLarge,
    /// 403: the authenticated peer may not make this request.
    #[error("{0}")]
    Forbidden(Forbidden),
    /// 404: no such room here.
    #[error("unknown room")]
    UnknownRoom,
    /// 404: a /notify for a room that no local user takes part in.
    #[error("room not followed here: no local user takes part in it")]
    RoomNotFollowed,
    /// 404: a request for another provider's users.
    #[error("not this provider")]
    NotThisProvider,
    /// 502: a local client's request for a room whose hub has no route.
    #[error("no route to the room's hub")]
    NoRouteToHub,
    /// 502: a request to forward to a provider with no route.
    #[error("no route to the provider")]
    NoRouteToProvider,
    /// 501: an endpoint this relay does not serve to peers.
    #[error("endpoint not served by this relay")]
    EndpointNotServed,
    /// 501: an endpoint this relay does not serve to local clients.
    #[error("endpoint not served to local clients")]
    EndpointNotServedToClients,
    /// 501: a handshake for a room, and no MLS validator to check it.
    #[error("no MLS validator")]
    NoMlsValidator,
    /// 501: a key material claim, and no MLS validator to check it.
    #[error("no MLS validator: key material is not served")]
    KeyMaterialNotServed,
    /// 503: the store is out of space; nothing new is taken.
    #[error("storage full: nothing new is taken until space is freed")]
    StorageFull,
    /// 503: the local inbox is full.
    #[error("local inbox full: local clients are not reading")]
    InboxFull,
    /// 503: the sending provider's share of the local inbox is full.
    #[error("this provider's share of the local inbox is full: local clients are not reading")]
    InboxShareFull,
    /// 503: a room's queue of local clients' requests to its hub is full.
    #[error("forward queue to the room's hub is full")]
    ForwardQueueFull,
    /// 503: the peer is over its budget of stored records (abuse reports, consent).
    #[error("over this provider's budget of stored records")]
    PeerBudget,
    /// 429: the peer is over its request rate for this endpoint.
    #[error("over this provider's request rate")]
    RateLimited { retry_after: Duration },
    /// 409: a /notify beyond our cursor: resend from `next` (after our event of `inc`).
    #[error("sequence gap: resend from next")]
    SequenceGap { next: u64, inc: u64 },
    /// 409: a /notify numbered by a hub incarnation that is not the one we follow.
    #[error("sequence from another hub incarnation: resend from next")]
    OtherIncarnation { next: u64, inc: u64 },
    /// 422: an abuse report whose frank this hub did not make.
    #[error("a reported message's frank is not this hub's")]
    BadFrank,
    /// 200 `notAllowed`: the sender does not take part in the room, or sent no
    /// PrivateMessage, or one of no known epoch.
    #[error("submission not allowed in the room")]
    SubmitNotAllowed,
    /// 200 `notAllowed`: the room's policy refuses the sender.
    #[error("{0}")]
    SubmitPolicy(PolicyRefusal),
    /// 200 `epochTooOld`: the message is of an epoch before the room's.
    #[error("epoch too old: the room is at epoch {current}")]
    EpochTooOld { current: u64 },
    /// 200 `notAllowed` to an /update, with the cause as its errorDescription.
    #[error("{0}")]
    UpdateNotAllowed(UpdateNotAllowed),
    /// 200 `notAllowed` to an /update: the room's policy refuses the handshake.
    #[error("{0}")]
    UpdatePolicy(PolicyRefusal),
    /// 200 `wrongEpoch` to an /update.
    #[error("wrong epoch: the room is at epoch {current}")]
    WrongEpoch { current: u64 },
    /// 200 `invalidProposal` to an /update: the validator refused the handshake.
    #[error("invalid handshake: {0}")]
    InvalidHandshake(String),
    /// 200 `notAuthorized` to a /groupInfo request.
    #[error("not authorized for the GroupInfo of {room}")]
    GroupInfoNotAuthorized { room: String },
}

/// What could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    #[error("not a room URI")]
    NotARoomUri,
    #[error("malformed SubmitMessageRequest")]
    SubmitMessageRequest,
    #[error("malformed FanoutMessage sequence")]
    FanoutSequence,
    #[error("empty /notify body")]
    EmptyNotify,
    #[error("malformed UpdateRequest")]
    UpdateRequest,
    #[error("malformed GroupInfoRequest")]
    GroupInfoRequest,
    #[error("malformed KeyMaterialRequest")]
    KeyMaterialRequest,
    #[error("targetUser differs from the path")]
    TargetUserMismatch,
    #[error("targetUser is not a MIMI URI")]
    TargetUserNotMimi,
    #[error("roomId is not a room URI")]
    RoomIdNotRoomUri,
    #[error("malformed IdentifierRequest")]
    IdentifierRequest,
    #[error("malformed ConsentEntry")]
    ConsentEntry,
    #[error("consent operation does not fit the endpoint")]
    ConsentOperation,
    #[error("NUL in a URI")]
    NulInUri,
    #[error("malformed AbuseReport")]
    AbuseReport,
    #[error("no provider to send this to")]
    NoProvider,
}

/// What the authenticated peer may not do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Forbidden {
    #[error("sendingUri is not a user of the authenticated provider")]
    SenderNotOfProvider,
    #[error("only the room's hub may notify")]
    NotTheHub,
    #[error("consent users are not of these providers")]
    ConsentUsers,
    #[error("a local client decides consent for local users only")]
    ConsentLocalOnly,
    #[error("requestingUser is of neither the asking provider nor a room it hosts")]
    RequesterNotOfProvider,
    #[error("requestingUser is not a member of the room")]
    RequesterNotMember,
    #[error("requesterCredential does not name requestingUser")]
    CredentialMismatch,
    #[error("bad KeyMaterialRequest signature")]
    BadSignature,
}

/// Why an /update is `notAllowed`; the text is its errorDescription.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateNotAllowed {
    #[error("room has no MLS state at its hub")]
    NoMlsState,
    #[error("the provider takes no part in the room")]
    NotParticipant,
    #[error("handshake messages must be PublicMessages: the hub validates them")]
    NotPublicMessage,
    #[error("no such group")]
    NoGroup,
    /// The validator's own reason.
    #[error("{0}")]
    Validator(String),
}

impl Refusal {
    /// The answer's status.
    pub fn status(&self) -> Status {
        match self {
            Refusal::Malformed(_) => Status::BadRequest,
            Refusal::TooLarge => Status::TooLarge,
            Refusal::Forbidden(_) => Status::Forbidden,
            Refusal::UnknownRoom | Refusal::RoomNotFollowed | Refusal::NotThisProvider => {
                Status::NotFound
            }
            Refusal::NoRouteToHub | Refusal::NoRouteToProvider => Status::BadGateway,
            Refusal::EndpointNotServed
            | Refusal::EndpointNotServedToClients
            | Refusal::NoMlsValidator
            | Refusal::KeyMaterialNotServed => Status::NotImplemented,
            Refusal::StorageFull
            | Refusal::InboxFull
            | Refusal::InboxShareFull
            | Refusal::ForwardQueueFull
            | Refusal::PeerBudget => Status::Unavailable,
            Refusal::RateLimited { .. } => Status::TooManyRequests,
            Refusal::SequenceGap { .. } | Refusal::OtherIncarnation { .. } => Status::OutOfOrder,
            Refusal::BadFrank => Status::Other(422),
            Refusal::SubmitNotAllowed
            | Refusal::SubmitPolicy(_)
            | Refusal::EpochTooOld { .. }
            | Refusal::UpdateNotAllowed(_)
            | Refusal::UpdatePolicy(_)
            | Refusal::WrongEpoch { .. }
            | Refusal::InvalidHandshake(_)
            | Refusal::GroupInfoNotAuthorized { .. } => Status::Ok,
        }
    }

    /// The reason it is counted under in the metrics.
    pub fn reason(&self) -> RejectReason {
        match self {
            Refusal::Malformed(_) => RejectReason::Malformed,
            Refusal::TooLarge => RejectReason::TooLarge,
            Refusal::Forbidden(_) | Refusal::GroupInfoNotAuthorized { .. } => {
                RejectReason::Forbidden
            }
            Refusal::UnknownRoom | Refusal::RoomNotFollowed => RejectReason::UnknownRoom,
            Refusal::NotThisProvider | Refusal::NoRouteToHub | Refusal::NoRouteToProvider => {
                RejectReason::NoRoute
            }
            Refusal::EndpointNotServed
            | Refusal::EndpointNotServedToClients
            | Refusal::NoMlsValidator
            | Refusal::KeyMaterialNotServed => RejectReason::NotImplemented,
            Refusal::StorageFull => RejectReason::StorageFull,
            Refusal::InboxFull | Refusal::ForwardQueueFull => RejectReason::QueueFull,
            Refusal::InboxShareFull => RejectReason::InboxShare,
            Refusal::PeerBudget => RejectReason::PeerBudget,
            Refusal::RateLimited { .. } => RejectReason::RateLimited,
            Refusal::SequenceGap { .. } | Refusal::OtherIncarnation { .. } => {
                RejectReason::OutOfOrder
            }
            Refusal::BadFrank => RejectReason::BadFrank,
            Refusal::SubmitNotAllowed
            | Refusal::SubmitPolicy(_)
            | Refusal::EpochTooOld { .. }
            | Refusal::UpdateNotAllowed(_)
            | Refusal::UpdatePolicy(_)
            | Refusal::WrongEpoch { .. }
            | Refusal::InvalidHandshake(_) => RejectReason::NotAllowed,
        }
    }

    /// Whether the room's policy refused (counted apart as well).
    pub fn is_policy(&self) -> bool {
        matches!(self, Refusal::SubmitPolicy(_) | Refusal::UpdatePolicy(_))
    }

    /// When the sender may try again, for the refusals that say so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::StorageFull => Some(Duration::from_secs(5)),
            Refusal::InboxFull | Refusal::InboxShareFull | Refusal::ForwardQueueFull => {
                Some(Duration::from_secs(1))
            }
            Refusal::PeerBudget => Some(Duration::from_secs(60)),
            Refusal::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The answer on the wire.
    pub fn response(&self) -> Response {
        let mut r = match self {
            Refusal::SubmitNotAllowed | Refusal::SubmitPolicy(_) => {
                submit_answer(&SubmitMessageResponse::not_allowed())
            }
            Refusal::EpochTooOld { current } => {
                submit_answer(&SubmitMessageResponse::epoch_too_old(*current))
            }
            Refusal::UpdateNotAllowed(why) => {
                update_answer(&UpdateRoomResponse::not_allowed(why.to_string()))
            }
            Refusal::UpdatePolicy(why) => {
                update_answer(&UpdateRoomResponse::not_allowed(why.to_string()))
            }
            Refusal::WrongEpoch { current } => {
                update_answer(&UpdateRoomResponse::wrong_epoch(*current))
            }
            Refusal::InvalidHandshake(d) => update_answer(&UpdateRoomResponse {
                error_description: d.clone(),
                outcome: UpdateOutcome::InvalidProposal {
                    invalid_proposals: Vec::new(),
                },
            }),
            Refusal::GroupInfoNotAuthorized { room } => {
                let resp = GroupInfoResponse {
                    protocol: Protocol::Mls10,
                    room_id: VLBytes::new(room.as_bytes().to_vec()),
                    status: GroupInfoStatus::NotAuthorized,
                };
                match resp.encode() {
                    Ok(v) => Response::new(Status::Ok, v),
                    Err(_) => Response::error(Status::Internal, "cannot encode GroupInfoResponse"),
                }
            }
            other => Response::new(other.status(), Bytes::from(other.to_string())),
        };
        r.retry_after = self.retry_after();
        if let Refusal::SequenceGap { next, inc } | Refusal::OtherIncarnation { next, inc } = self {
            r.next_seq = Some(*next);
            r.next_inc = Some(*inc);
        }
        r
    }
}

/// A 200 carrying an UpdateRoomResponse.
pub(super) fn update_answer(resp: &UpdateRoomResponse) -> Response {
    match resp.encode() {
        Ok(v) => Response::new(Status::Ok, v),
        // Encoding our own small struct cannot fail; if it ever does, answer 500, not panic.
        Err(_) => Response::error(Status::Internal, "cannot encode UpdateRoomResponse"),
    }
}

impl Relay {
    /// The one place a refusal becomes an answer: counted under its reason, then answered.
    pub(super) fn refuse(&mut self, refusal: Refusal) -> Response {
        let reason = refusal.reason();
        self.stats.rejects[reason as usize] += 1;
        if refusal.is_policy() {
            self.stats.policy_rejections += 1;
        }
        debug!(reason = reason.as_str(), %refusal, "refused");
        refusal.response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PolicyRefusal {
        PolicyRefusal::SenderNotOfProvider {
            sender: "mimi://b.example/u/eve".to_owned(),
            provider: "c.example".to_owned(),
        }
    }

    /// Every variant's place in this table; a new variant does not compile until it has one.
    fn index(r: &Refusal) -> usize {
        match r {
            Refusal::Malformed(_) => 0,
            Refusal::TooLarge => 1,
            Refusal::Forbidden(_) => 2,
            Refusal::UnknownRoom => 3,
            Refusal::RoomNotFollowed => 4,
            Refusal::NotThisProvider => 5,
            Refusal::NoRouteToHub => 6,
            Refusal::NoRouteToProvider => 7,
            Refusal::EndpointNotServed => 8,
            Refusal::EndpointNotServedToClients => 9,
            Refusal::NoMlsValidator => 10,
            Refusal::KeyMaterialNotServed => 11,
            Refusal::StorageFull => 12,
            Refusal::InboxFull => 13,
            Refusal::InboxShareFull => 14,
            Refusal::ForwardQueueFull => 15,
            Refusal::PeerBudget => 16,
            Refusal::RateLimited { .. } => 17,
            Refusal::SequenceGap { .. } => 18,
            Refusal::OtherIncarnation { .. } => 19,
            Refusal::BadFrank => 20,
            Refusal::SubmitNotAllowed => 21,
            Refusal::SubmitPolicy(_) => 22,
            Refusal::EpochTooOld { .. } => 23,
            Refusal::UpdateNotAllowed(_) => 24,
            Refusal::UpdatePolicy(_) => 25,
            Refusal::WrongEpoch { .. } => 26,
            Refusal::InvalidHandshake(_) => 27,
            Refusal::GroupInfoNotAuthorized { .. } => 28,
        }
    }
    const VARIANTS: usize = 29;

    /// Each refusal, its HTTP status, its metrics reason, and the body text peers and the
    /// interop scripts see (the texts the call sites wrote before the refusals were typed);
    /// `None` for the answers in the endpoint's own structure.
    fn table() -> Vec<(Refusal, u16, &'static str, Option<&'static str>)> {
        use Refusal as R;
        let secs = Duration::from_secs;
        vec![
            (
                R::Malformed(Malformed::NotARoomUri),
                400,
                "malformed",
                Some("not a room URI"),
            ),
            (
                R::Malformed(Malformed::SubmitMessageRequest),
                400,
                "malformed",
                Some("malformed SubmitMessageRequest"),
            ),
            (
                R::TooLarge,
                413,
                "too_large",
                Some("body over the size limit"),
            ),
            (
                R::Forbidden(Forbidden::NotTheHub),
                403,
                "forbidden",
                Some("only the room's hub may notify"),
            ),
            (R::UnknownRoom, 404, "unknown_room", Some("unknown room")),
            (
                R::RoomNotFollowed,
                404,
                "unknown_room",
                Some("room not followed here: no local user takes part in it"),
            ),
            (
                R::NotThisProvider,
                404,
                "no_route",
                Some("not this provider"),
            ),
            (
                R::NoRouteToHub,
                502,
                "no_route",
                Some("no route to the room's hub"),
            ),
            (
                R::NoRouteToProvider,
                502,
                "no_route",
                Some("no route to the provider"),
            ),
            (
                R::EndpointNotServed,
                501,
                "not_implemented",
                Some("endpoint not served by this relay"),
            ),
            (
                R::EndpointNotServedToClients,
                501,
                "not_implemented",
                Some("endpoint not served to local clients"),
            ),
            (
                R::NoMlsValidator,
                501,
                "not_implemented",
                Some("no MLS validator"),
            ),
            (
                R::KeyMaterialNotServed,
                501,
                "not_implemented",
                Some("no MLS validator: key material is not served"),
            ),
            (
                R::StorageFull,
                503,
                "storage_full",
                Some("storage full: nothing new is taken until space is freed"),
            ),
            (
                R::InboxFull,
                503,
                "queue_full",
                Some("local inbox full: local clients are not reading"),
            ),
            (
                R::InboxShareFull,
                503,
                "inbox_share",
                Some(
                    "this provider's share of the local inbox is full: local clients are not \
                     reading",
                ),
            ),
            (
                R::ForwardQueueFull,
                503,
                "queue_full",
                Some("forward queue to the room's hub is full"),
            ),
            (
                R::PeerBudget,
                503,
                "peer_budget",
                Some("over this provider's budget of stored records"),
            ),
            (
                R::RateLimited {
                    retry_after: secs(3),
                },
                429,
                "rate_limited",
                Some("over this provider's request rate"),
            ),
            (
                R::SequenceGap { next: 7, inc: 9 },
                409,
                "out_of_order",
                Some("sequence gap: resend from next"),
            ),
            (
                R::OtherIncarnation { next: 7, inc: 9 },
                409,
                "out_of_order",
                Some("sequence from another hub incarnation: resend from next"),
            ),
            (
                R::BadFrank,
                422,
                "bad_frank",
                Some("a reported message's frank is not this hub's"),
            ),
            (R::SubmitNotAllowed, 200, "not_allowed", None),
            (R::SubmitPolicy(policy()), 200, "not_allowed", None),
            (R::EpochTooOld { current: 4 }, 200, "not_allowed", None),
            (
                R::UpdateNotAllowed(UpdateNotAllowed::NotParticipant),
                200,
                "not_allowed",
                None,
            ),
            (R::UpdatePolicy(policy()), 200, "not_allowed", None),
            (R::WrongEpoch { current: 4 }, 200, "not_allowed", None),
            (
                R::InvalidHandshake("bad".to_owned()),
                200,
                "not_allowed",
                None,
            ),
            (
                R::GroupInfoNotAuthorized {
                    room: "mimi://a.example/r/x".to_owned(),
                },
                200,
                "forbidden",
                None,
            ),
        ]
    }

    #[test]
    fn every_refusal_has_its_status_reason_and_text() {
        let table = table();
        let mut covered = [false; VARIANTS];
        for (refusal, code, reason, text) in &table {
            covered[index(refusal)] = true;
            let r = refusal.response();
            assert_eq!(r.status, refusal.status(), "{refusal:?}");
            assert_eq!(r.status.http_code(), *code, "{refusal:?}");
            assert_eq!(refusal.reason().as_str(), *reason, "{refusal:?}");
            assert_eq!(r.retry_after, refusal.retry_after(), "{refusal:?}");
            match text {
                Some(t) => {
                    assert_eq!(&r.body[..], t.as_bytes(), "{refusal:?}");
                    assert_eq!(refusal.to_string(), *t);
                }
                None => assert!(!r.body.is_empty(), "{refusal:?}: a response structure"),
            }
        }
        let missing: Vec<usize> = (0..VARIANTS).filter(|&i| !covered[i]).collect();
        assert!(missing.is_empty(), "variants without a row: {missing:?}");
    }

    #[test]
    fn busy_refusals_say_when_to_retry_and_409s_carry_the_cursor() {
        assert_eq!(
            Refusal::StorageFull.response().retry_after,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            Refusal::InboxFull.response().retry_after,
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            Refusal::PeerBudget.response().retry_after,
            Some(Duration::from_secs(60))
        );
        assert_eq!(Refusal::UnknownRoom.response().retry_after, None);
        let r = Refusal::SequenceGap { next: 7, inc: 9 }.response();
        assert_eq!((r.next_seq, r.next_inc), (Some(7), Some(9)));
        assert_eq!(Refusal::UnknownRoom.response().next_seq, None);
    }

    #[test]
    fn protocol_answers_are_the_endpoints_own_structures() {
        let r = Refusal::EpochTooOld { current: 4 }.response();
        let decoded = SubmitMessageResponse::decode(&r.body).expect("a SubmitMessageResponse");
        assert_eq!(decoded, SubmitMessageResponse::epoch_too_old(4));
        let r = Refusal::SubmitPolicy(policy()).response();
        let decoded = SubmitMessageResponse::decode(&r.body).expect("a SubmitMessageResponse");
        assert_eq!(decoded, SubmitMessageResponse::not_allowed());
        let r = Refusal::UpdatePolicy(policy()).response();
        let decoded = UpdateRoomResponse::decode(&r.body).expect("an UpdateRoomResponse");
        assert_eq!(decoded.error_description, policy().to_string());
    }
}
