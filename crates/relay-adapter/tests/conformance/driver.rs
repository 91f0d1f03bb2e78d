//! What a transport must provide to run the conformance cases: a node under test, raw
//! connections for the hostile peer, and the protocol's answers mapped to [`Answer`].

use relay_adapter::Limits;
use relay_core::transport::TransportKind;

use crate::support::{Answer, Backpressure, Who, World};

/// One transport under test. `start` brings up b (the adapter under test, with `limits`,
/// trusting a and c, its node a [`crate::support::Node`]) and c's real adapter of the same
/// transport sending to b; the other calls act as a raw peer would.
pub trait Driver: Sized {
    const KIND: TransportKind;
    /// How the transport holds back a peer over its byte budget.
    const BACKPRESSURE: Backpressure;
    /// One raw, authenticated connection (or session) of a peer.
    type Conn;
    /// A request sent on a raw connection and not yet answered.
    type Pending;

    async fn start(limits: Limits) -> Self;

    fn world(&mut self) -> &mut World;

    /// The largest request body b accepts.
    fn max_body(&self) -> usize;

    /// Opens a raw connection as `who` and proves it is served (one round trip that does not
    /// reach the node); `Err` says how b refused it.
    async fn connect(&mut self, who: Who) -> Result<Self::Conn, Answer>;

    /// Sends one `/notify` to [`crate::support::ROOM`] with sequence number `seq`.
    async fn send(&mut self, conn: &mut Self::Conn, seq: u64, body: Vec<u8>) -> Self::Pending;

    async fn answer(&mut self, conn: &mut Self::Conn, pending: Self::Pending) -> Answer;

    async fn request(&mut self, conn: &mut Self::Conn, seq: u64, body: Vec<u8>) -> Answer {
        let pending = self.send(conn, seq, body).await;
        self.answer(conn, pending).await
    }

    /// Starts a request and never finishes it; how b cut it off.
    async fn stall(&mut self, conn: &mut Self::Conn) -> Answer;

    /// Bytes that are not the protocol, on a fresh authenticated connection; how b refused
    /// them.
    async fn garbage_after_auth(&mut self) -> Answer;

    /// Bytes that are not the protocol, to the listener before any handshake; returns once b
    /// has dealt with them (closed the connection, or dropped the datagrams).
    async fn garbage_before_auth(&mut self);

    /// One handshake b must fail: a certificate it does not trust, or no TLS at all.
    async fn failed_handshake(&mut self);

    async fn shutdown(self);
}
