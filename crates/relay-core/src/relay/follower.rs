//! The follower's state (rooms hosted elsewhere): which rooms are followed, a cursor per
//! (hub, room) stream, and the ordered forwards of local clients' requests to each hub. Owned by
//! [`super::Relay`], which keeps the `handle_*`/`poll_*` surface, as quinn-proto's
//! `Connection` owns its `StreamsState`.

use std::collections::{HashMap, HashSet, VecDeque};

use mimi_wire::uri::{ProviderDomain, RoomId};

use super::{FastMap, RECENT_WINDOW, forward};
use crate::store::{Store, StoreOp};

#[derive(Debug, Default)]
pub(super) struct FollowerState {
    /// A cursor per (hub, room) stream this node takes /notify from.
    pub(super) cursors: HashMap<(ProviderDomain, RoomId), Cursor>,
    /// Rooms hosted elsewhere that this node follows: a local client took part in them, a
    /// local user's key material was claimed for them, or the config names them.
    pub(super) followed: HashSet<RoomId>,
    /// Local clients' requests to rooms hosted elsewhere, one ordered queue per room.
    pub(super) forwards: HashMap<RoomId, forward::ForwardQueue>,
}

/// A follower's view of one (hub, room) stream.
#[derive(Debug)]
pub(super) struct Cursor {
    pub(super) hub: ProviderDomain,
    pub(super) room: RoomId,
    pub(super) next: u64,
    /// The hub incarnation that numbered event `next - 1` (0: not known).
    pub(super) inc: u64,
    /// Hashes of recent delivered FanoutMessages (the draft's byte-exact duplicate rule),
    /// kept in the store too, so a restart does not forget them.
    pub(super) recent: FastMap<u128, ()>,
    pub(super) recent_order: VecDeque<u128>,
    /// How many hashes were ever remembered: numbers the next one, and picks its ring slot
    /// in the store.
    pub(super) recent_n: u64,
}

impl Cursor {
    pub(super) fn new(hub: ProviderDomain, room: RoomId, next: u64) -> Cursor {
        Cursor {
            hub,
            room,
            next,
            inc: 0,
            recent: FastMap::default(),
            recent_order: VecDeque::new(),
            recent_n: 0,
        }
    }

    /// Keeps `h` among the last `RECENT_WINDOW` delivered hashes, in memory and in the store.
    pub(super) fn remember<S: Store>(&mut self, store: &mut S, h: u128) {
        if self.recent.insert(h, ()).is_some() {
            return;
        }
        let n = self.recent_n;
        self.recent_n += 1;
        store.apply(StoreOp::RecentHash {
            hub: &self.hub,
            room: &self.room,
            // The store's ring holds as many slots as the window: slot n replaces n - window.
            slot: (n % RECENT_WINDOW as u64) as u16,
            n,
            hash: h,
        });
        self.recent_order.push_back(h);
        if self.recent_order.len() > RECENT_WINDOW
            && let Some(old) = self.recent_order.pop_front()
        {
            self.recent.remove(&old);
        }
    }
}
