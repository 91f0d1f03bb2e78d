//! The MIMI content decoder (draft-ietf-mimi-content-08) on arbitrary bytes: it must never
//! panic; whatever decodes re-encodes to the input exactly when the decoder called the input
//! deterministic, and the re-encoding decodes to the same value; the message ID of any input
//! with a salt is computable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mimi_wire::content::{ContentLimits, MessageDerivedValues, MimiContent, message_id};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = MimiContent::decode_with_limits(data, &ContentLimits::default()) {
        let again = d.content.encode().expect("a decoded message re-encodes");
        assert_eq!(
            again == data,
            d.canonical,
            "canonical flag matches the round trip"
        );
        let back = MimiContent::decode_canonical(&again).expect("the encoding is canonical");
        assert_eq!(back.encode().expect("re-encode"), again);
        message_id("mimi://a.example/u/a", "mimi://a.example/r/r", data).expect("id");
    }
    if let Ok((v, canonical)) = MessageDerivedValues::decode(data) {
        let again = v.encode().expect("re-encode");
        assert_eq!(again == data, canonical);
    }
});
