//! The pieces of the `mimi-relay` binary that tests reuse: the local client, key generation,
//! content inspection and the peer check. The binary itself (`main.rs`) is only argument
//! parsing; the transport lab and the demo harness are the `mimi-lab` crate.

pub mod check_peers;
pub mod client;
pub mod content;
pub mod keygen;
