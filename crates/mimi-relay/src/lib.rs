//! The pieces of the `mimi-relay` binary that tests reuse: the demo harness and key generation.
//! The binary itself (`main.rs`) is only argument parsing.

pub mod demo;
pub mod keygen;
