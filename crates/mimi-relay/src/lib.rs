//! The pieces of the `mimi-relay` binary that tests reuse: the demo harness, the transport lab,
//! the local client, key generation and content inspection.
//! The binary itself (`main.rs`) is only argument parsing.

pub mod bench;
pub mod client;
pub mod content;
pub mod demo;
pub mod keygen;
