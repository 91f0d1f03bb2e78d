//! The routing core of mimi-relay, without I/O.
//!
//! Contract: no sockets, no async runtime, no clock. Every input is a `handle_*(now, store, ..)`
//! call and every effect is read back with `poll_output`/`poll_timeout`, in the style of
//! quinn-proto. The node owns the store and commits it after each batch of inputs, and only
//! then releases the replies the core produced; so whatever the core answered as accepted is
//! durable. The node also tells the core which inbox records are durable
//! (`handle_inbox_durable`): only those leave its memory, to be read back through the store. Payload bytes are never re-encoded: the hub stores and forwards each
//! FanoutMessage exactly as it built it around the submitted MLSMessage, and a follower
//! delivers the exact bytes it received.
//!
//! Delivery is at-least-once on the wire and exactly-once at the receiver: each
//! (room, destination) queue numbers its events, the follower keeps a durable cursor and
//! answers with the next sequence it expects, and a retried submission is recognised by the
//! hub (same provider, same body bytes) and answered without a second fan-out.

pub mod config;
pub mod mls;
mod relay;
pub mod rng;
pub mod room_policy;
pub mod stats;
pub mod store;
pub mod transport;

pub use config::{RelayConfig, RetryPolicy};
pub use relay::{
    DeadLetter, Forbidden, InboxQuery, Malformed, MlsRoomError, Now, Output, Refusal, Relay,
    ReplyToken, RoomError, RoomParticipant, UpdateNotAllowed,
};
pub use stats::{DeadCause, PeerStats, RejectReason, RelayStats};
pub use store::{InboxRange, MemStore, SealedCommit, Snapshot, Store, StoreError, StoreOp};
pub use transport::{
    Lineage, Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
