//! The one small interface between the node and every transport adapter.
//!
//! An adapter owns its sockets. Outbound, the node hands it [`Transmit`]s and probes through the
//! [`Transport`] trait; the adapter reports each outcome back. Inbound, the adapter authenticates
//! the peer, builds a [`Request`] and awaits the node's [`Response`] through [`Inbound`]. The
//! data types are the routing core's; the traits live here because only the node and the
//! adapters call them (as quinn keeps its runtime traits out of quinn-proto).

use std::future::Future;
use std::pin::Pin;

use mimi_wire::uri::ProviderDomain;
use relay_core::transport::{
    Request, Response, Transmit, TransmitId, TransportError, TransportKind,
};

/// Implemented by each transport adapter. Both calls must return at once: the adapter queues
/// the work and later reports through [`Inbound::outcome`] / [`Inbound::probe_outcome`].
pub trait Transport: Send + Sync + 'static {
    fn kind(&self) -> TransportKind;
    fn send(&self, transmit: Transmit);
    /// A cheap liveness check of `peer` (connect and one round trip).
    fn probe(&self, peer: &ProviderDomain);
    /// Stops accepting, closes connections politely, and resolves when the sockets are closed.
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Implemented by the node and handed to each adapter at start.
pub trait Inbound: Clone + Send + Sync + 'static {
    /// Handles one request from an authenticated peer. Resolves once the answer may be sent:
    /// for anything the relay accepts, after it is durable.
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send;
    /// Reports the outcome of a [`Transmit`].
    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>);
    /// Reports the outcome of a probe.
    fn probe_outcome(&self, peer: ProviderDomain, alive: bool);
}
