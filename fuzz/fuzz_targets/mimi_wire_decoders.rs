//! Every mimi-wire decoder on the same input: none may panic, and whatever decodes must
//! re-encode to exactly the input (all encodings are canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mimi_wire::proto::*;
use mimi_wire::{Limits, MlsMessageView, RoomId};

macro_rules! round_trip {
    ($data:expr, $($t:ty),* $(,)?) => {
        $(
            if let Ok(v) = <$t>::decode($data) {
                assert_eq!(v.encode().expect("re-encode"), $data, stringify!($t));
            }
        )*
    };
}

fuzz_target!(|data: &[u8]| {
    let _ = MlsMessageView::parse_prefix(data);
    // The follower's framing-only read, the hub's franking-tag read, the claim's lifetime.
    if let Ok(v) = MlsMessageView::parse_framing(data) {
        let _ = v.private_authenticated_data();
    }
    let _ = mimi_wire::mls::key_package_lifetime(data, &Limits::default());
    let _ = SubmitMessageView::parse(data);
    let _ = split_fanout_sequence(data, &Limits::default());
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = RoomId::from_path_segment(s);
        let _ = mimi_wire::MimiUri::parse(s);
    }
    round_trip!(
        data,
        MlsMessage,
        SubmitMessageRequest,
        SubmitMessageResponse,
        UpdateRequest,
        UpdateRoomResponse,
        FanoutMessage,
        KeyMaterialRequest,
        KeyMaterialResponse,
        GroupInfoRequest,
        GroupInfoResponse,
        GroupInfoRatchetTreeTbe,
        ConsentEntry,
        ConsentScope,
        IdentifierRequest,
        IdentifierResponse,
        AbuseReport,
        room::ParticipantListData,
        room::ParticipantListUpdate,
        room::RoleData,
        room::BaseRoomPolicy,
        room::PreAuthData,
        room::FrankingAgentData,
        room::SafeAad,
    );
    // A participant-list update applied to a list, both read from the same bytes split.
    let mid = data.len() / 2;
    if let (Ok(list), Ok(up)) = (
        room::ParticipantListData::decode(&data[..mid]),
        room::ParticipantListUpdate::decode(&data[mid..]),
    ) {
        let _ = list.apply(&up);
    }
});
