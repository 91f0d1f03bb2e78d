//! The pieces of the `mimi-relay` binary that tests reuse: the demo harness, the transport lab,
//! the local client, key generation, content inspection and the peer check.
//! The binary itself (`main.rs`) is only argument parsing.

pub mod bench;
pub mod check_peers;
pub mod client;
pub mod content;
pub mod demo;
pub mod keygen;
