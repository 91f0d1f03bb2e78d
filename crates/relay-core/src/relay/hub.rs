//! The hub's state (rooms hosted here): the rooms, and one ordered outbound queue per
//! (room, destination) with the queues ready to send and those held back. Owned by
//! [`super::Relay`], which keeps the `handle_*`/`poll_*` surface, as quinn-proto's
//! `Connection` owns its `StreamsState`. The MLS side of hosted rooms stays in
//! [`super::hub_mls`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use mimi_wire::uri::{ProviderDomain, RoomId};

use super::{FastMap, HubRoom, OutQueue, QueueIdx, RoomIdx};

#[derive(Debug, Default)]
pub(super) struct HubState {
    pub(super) rooms: Vec<HubRoom>,
    /// Hosted rooms; found by a room URI's text too (`RoomId: Borrow<str>`).
    pub(super) room_by_id: FastMap<RoomId, RoomIdx>,
    pub(super) queues: Vec<OutQueue>,
    pub(super) queue_by_key: HashMap<(RoomId, ProviderDomain), QueueIdx>,
    /// Queues with something to send, in the order they became ready.
    pub(super) ready: VecDeque<QueueIdx>,
    /// Queues held back after a refusal, by release time.
    pub(super) held: BTreeSet<(Instant, QueueIdx)>,
    /// The hosted room found last by [`HubState::hosted`]: a burst of submissions mostly goes
    /// to one room (rooms are never removed, so an index stays valid).
    last_found: Option<RoomIdx>,
}

impl HubState {
    pub(super) fn queue_for(&self, room: &RoomId, dest: &ProviderDomain) -> Option<QueueIdx> {
        self.queue_by_key
            .get(&(room.clone(), dest.clone()))
            .copied()
    }

    /// The hosted room whose URI is `room`: compared with the last one found before the map
    /// is asked (a string compare instead of a hash and a compare).
    pub(super) fn hosted(&mut self, room: &str) -> Option<RoomIdx> {
        if let Some(i) = self.last_found
            && self.rooms.get(i).is_some_and(|r| r.id.as_str() == room)
        {
            return Some(i);
        }
        let i = *self.room_by_id.get(room)?;
        self.last_found = Some(i);
        Some(i)
    }

    /// Puts queue `qi` on the ready list if it has something to send and is not there yet.
    pub(super) fn mark_ready(&mut self, qi: QueueIdx) {
        let q = &mut self.queues[qi];
        if !q.in_ready && (q.send_next < q.next_qseq() || q.needs_skip) {
            q.in_ready = true;
            self.ready.push_back(qi);
        }
    }

    /// Sends nothing more from queue `qi` before `until` (a later hold already set stands).
    pub(super) fn hold(&mut self, qi: QueueIdx, until: Instant) {
        let q = &mut self.queues[qi];
        if q.held_until.is_some_and(|t| t >= until) {
            return;
        }
        q.held_until = Some(until);
        self.held.insert((until, qi));
    }
}

#[cfg(test)]
mod tests {
    use super::super::HubRoom;
    use super::super::dedupe::SeenWindow;
    use super::*;

    #[test]
    fn hosted_finds_each_room_whichever_was_found_last() {
        let mut hub = HubState::default();
        let ids = ["mimi://a.example/r/one", "mimi://a.example/r/two"];
        for (i, id) in ids.iter().enumerate() {
            let id: RoomId = id.parse().expect("room");
            hub.room_by_id.insert(id.clone(), i);
            hub.rooms.push(HubRoom {
                id,
                followers: Vec::new(),
                next_seq: 1,
                last_ms: 0,
                seen: SeenWindow::default(),
            });
        }
        for (room, want) in [
            (ids[0], Some(0)),
            (ids[0], Some(0)),
            (ids[1], Some(1)),
            ("mimi://a.example/r/three", None),
            (ids[1], Some(1)),
            (ids[0], Some(0)),
            // A prefix of the last room found is another room.
            ("mimi://a.example/r/on", None),
        ] {
            assert_eq!(hub.hosted(room), want, "{room}");
        }
    }
}
