//! The pieces of the `mimi-relay` binary that tests reuse: the demo harness, the transport lab, the local client and key generation.
//! The binary itself (`main.rs`) is only argument parsing.

pub mod bench;
pub mod client;
pub mod demo;
pub mod keygen;
