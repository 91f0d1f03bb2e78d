//! MIMI wire formats for the mimi-relay: the protocol-06 message bodies (§5) in the TLS
//! presentation language, a minimal MLS (RFC 9420) framing reader, MIMI URIs, the
//! endpoint directory, and the MIMI content format (draft-ietf-mimi-content-08, CBOR) in
//! [`content`].
//!
//! Contract:
//! * No I/O, no clocks, no randomness.
//! * Decoding untrusted bytes never panics. Every length is checked against the input and
//!   against [`Limits`] before use; failures are typed [`WireError`]s.
//! * The relay forwards bodies as exact bytes. Typed decoding is for validation, tests and
//!   clients, never for re-encoding what is forwarded: [`mls::MlsMessageView`],
//!   [`proto::SubmitMessageView`] and [`proto::split_fanout_sequence`] borrow from the
//!   input, and [`proto::encode_fanout_application`] copies an MLS message verbatim.
//! * MLS is read only as far as needed to find where an object ends and what it leaves in
//!   the clear (group id, epoch, content type); nothing cryptographic is checked here.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub(crate) mod codec;
pub mod content;
pub mod endpoint;
mod error;
pub mod mls;
pub mod proto;
pub mod uri;

pub use endpoint::{Directory, Endpoint, PathParam};
pub use error::{DEFAULT_MAX_BODY, Limits, WireError};
pub use mls::{ContentType, MlsMessageView, WireFormat};
pub use uri::{MimiUri, ProviderDomain, RoomId, UriError, UriKind};

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic xorshift64 for mutation tests, so failures reproduce.
    pub struct XorShift(u64);

    impl XorShift {
        pub fn new(seed: u64) -> Self {
            XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }

        /// Flip, overwrite, insert or delete a few bytes.
        pub fn mutate(&mut self, m: &mut Vec<u8>) {
            for _ in 0..1 + self.below(4) {
                let at = self.below(m.len());
                match self.below(4) {
                    0 if !m.is_empty() => m[at] ^= 1 << self.below(8),
                    1 if !m.is_empty() => m[at] = self.next() as u8,
                    2 => m.insert(at.min(m.len()), self.next() as u8),
                    _ if !m.is_empty() => {
                        m.remove(at);
                    }
                    _ => {}
                }
            }
        }
    }
}
