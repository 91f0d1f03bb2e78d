//! The XMPP adapter's stream scanner and binding over arbitrary bytes in arbitrary chunkings
//! (relay-xmpp's `fuzz_scan`: bounded depth and tag length, then parse and classify every
//! element): it must never panic, whatever a peer sends on a stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| relay_xmpp::fuzz_scan(data));
