//! The client's own application messages, as the hub fans them back (protocol-06 §5.5: the
//! hub delivers to every member, the sender included). An MLS sender cannot decrypt its own
//! PrivateMessage (its sender ratchet has moved on), so the client recognises the exact
//! bytes it submitted instead.

use std::collections::{HashMap, VecDeque};

use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::HashType;

/// How many sent messages are remembered while their echo is awaited.
const REMEMBERED: usize = 4096;

/// SHA-256 of each sent MLSMessage -> its plaintext, oldest first out.
#[derive(Debug, Default)]
pub(crate) struct SentLog {
    by_hash: HashMap<Vec<u8>, Vec<u8>>,
    order: VecDeque<Vec<u8>>,
}

impl SentLog {
    /// Remembers a submitted MLSMessage and the plaintext it carries.
    pub(crate) fn note(&mut self, crypto: &impl OpenMlsCrypto, mls: &[u8], payload: &[u8]) {
        let Ok(h) = crypto.hash(HashType::Sha2_256, mls) else {
            return;
        };
        if self.order.len() == REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.by_hash.remove(&old);
        }
        self.by_hash.insert(h.clone(), payload.to_vec());
        self.order.push_back(h);
    }

    /// The plaintext of `mls` if this client sent it (each echo is taken once).
    pub(crate) fn take(&mut self, crypto: &impl OpenMlsCrypto, mls: &[u8]) -> Option<Vec<u8>> {
        let h = crypto.hash(HashType::Sha2_256, mls).ok()?;
        let payload = self.by_hash.remove(&h)?;
        self.order.retain(|x| *x != h);
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_is_recognised_once_and_others_not_at_all() {
        let crypto = openmls_rust_crypto::RustCrypto::default();
        let mut log = SentLog::default();
        log.note(&crypto, b"mls-1", b"hello");
        assert_eq!(log.take(&crypto, b"mls-2"), None);
        assert_eq!(log.take(&crypto, b"mls-1").as_deref(), Some(&b"hello"[..]));
        assert_eq!(log.take(&crypto, b"mls-1"), None);
    }

    #[test]
    fn the_log_is_bounded() {
        let crypto = openmls_rust_crypto::RustCrypto::default();
        let mut log = SentLog::default();
        for i in 0..REMEMBERED + 10 {
            log.note(&crypto, &i.to_be_bytes(), b"x");
        }
        assert_eq!(log.by_hash.len(), REMEMBERED);
        assert_eq!(log.take(&crypto, &0usize.to_be_bytes()), None);
        assert!(log.take(&crypto, &(REMEMBERED + 9).to_be_bytes()).is_some());
    }
}
