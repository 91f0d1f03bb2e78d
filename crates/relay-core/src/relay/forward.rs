//! A follower's forwards of its local clients' room requests (/submitMessage, /update) to the
//! room's hub, one ordered queue per room.
//!
//! The hub orders a room by arrival, and a forward carries no sequence number: two forwards in
//! flight at once may reach the hub swapped (concurrent HTTP/2 streams served in parallel, a
//! request parked behind a busy HTTP/1.1 connection), and a commit overtaken by a message of its
//! new epoch is refused. So a room's forwards leave in the order its clients made them, and
//! one is sent only when every earlier one has an outcome, unless the transport carries a
//! room's requests on one ordered channel that the hub serves in order (see
//! [`TransportKind::keeps_room_order`]): then up to the room's pipeline window are in flight.

use std::collections::VecDeque;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::RoomId;

use super::{InFlight, Output, PeerIdx, Refusal, Relay, ReplyToken};
use crate::Now;
use crate::transport::{Response, Transmit, TransportKind};

/// One room's forwards to its hub: those not sent yet, in arrival order, and how many are in
/// flight.
#[derive(Debug)]
pub(super) struct ForwardQueue {
    peer: PeerIdx,
    waiting: VecDeque<Waiting>,
    inflight: u32,
}

#[derive(Debug)]
struct Waiting {
    token: ReplyToken,
    endpoint: Endpoint,
    body: Bytes,
}

impl Relay {
    /// Queues a local client's request for `room`'s hub (`peer`) behind the room's earlier
    /// ones, and sends what the room's window allows. `None`: answered when the hub answers;
    /// `Some`: refused here (the room's queue is full).
    pub(super) fn forward_in_room(
        &mut self,
        now: Now,
        token: ReplyToken,
        peer: PeerIdx,
        endpoint: Endpoint,
        room: &RoomId,
        body: Bytes,
    ) -> Option<Response> {
        let max = self.cfg.max_queue;
        let fq = self
            .follower
            .forwards
            .entry(room.clone())
            .or_insert_with(|| ForwardQueue {
                peer,
                waiting: VecDeque::new(),
                inflight: 0,
            });
        if fq.waiting.len() >= max {
            return Some(self.refuse(Refusal::ForwardQueueFull));
        }
        // The route to a room's hub does not change while its queue lives.
        fq.peer = peer;
        fq.waiting.push_back(Waiting {
            token,
            endpoint,
            body,
        });
        self.send_forwards(now, room);
        None
    }

    /// One of `room`'s forwards has its outcome: the next may go.
    pub(super) fn forward_done(&mut self, now: Now, room: &RoomId) {
        if let Some(fq) = self.follower.forwards.get_mut(room) {
            fq.inflight = fq.inflight.saturating_sub(1);
        }
        self.send_forwards(now, room);
    }

    fn send_forwards(&mut self, now: Now, room: &RoomId) {
        loop {
            let Some(fq) = self.follower.forwards.get_mut(room) else {
                return;
            };
            let kind = self.peers[fq.peer].kind;
            let window = if kind.keeps_room_order() {
                self.cfg.pipeline_for(kind)
            } else {
                1
            };
            if fq.inflight >= window {
                return;
            }
            let Some(w) = fq.waiting.pop_front() else {
                if fq.inflight == 0 {
                    // Nothing left for this room: its queue goes, so idle rooms cost nothing.
                    self.follower.forwards.remove(room);
                }
                return;
            };
            fq.inflight += 1;
            let peer = fq.peer;
            let id = self.next_id();
            let deadline = now.mono + self.cfg.transmit_timeout;
            self.inflight.insert(
                id,
                InFlight::RoomForward {
                    token: w.token,
                    deadline,
                    room: room.clone(),
                },
            );
            self.deadlines.insert((deadline, id));
            let p = &mut self.peers[peer];
            p.stats.transmits += 1;
            self.outputs.push_back(Output::Transmit(Transmit {
                id,
                dest: p.domain.clone(),
                transport: p.kind,
                endpoint: w.endpoint,
                target: room.as_str().to_owned(),
                seq: None,
                lineage: None,
                body: vec![w.body],
            }));
        }
    }
}

impl TransportKind {
    /// Whether this transport carries the requests for one (destination, target) on one
    /// ordered channel that the peer serves in order, so that several may be in flight without
    /// one overtaking another: QUIC (one stream per room, served in order per stream; a dead
    /// stream fails every request on it) and Matrix (one transaction in flight per
    /// destination, its requests served in order). HTTPS is not (HTTP/2 streams are served
    /// concurrently), nor XMPP (its iq stanzas are served concurrently once read).
    pub fn keeps_room_order(self) -> bool {
        match self {
            TransportKind::Quic | TransportKind::Matrix => true,
            TransportKind::Https | TransportKind::Xmpp => false,
        }
    }
}
