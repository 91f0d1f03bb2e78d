//! The Matrix binding's peer-facing parsers: the bounded `Authorization: X-Matrix` header
//! parser and a `/send` transaction body through every check the server makes (JSON, depth,
//! counts, sizes, EDU contents, fragment reassembly). None may panic. What is accepted is
//! within the bounds (header length, requests per transaction, target length), and every
//! accepted request splits into fragments that reassemble to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_matrix::fuzz::{json_depth_within, send_body, x_matrix_header};
use relay_matrix::server::{MAX_AUTH_HEADER, MAX_AUTH_PARAMS, MAX_JSON_DEPTH};
use relay_matrix::wire::{MAX_EDUS, MAX_TARGET, Reassembler, fragments};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Some((origin, key, _dest)) = x_matrix_header(rest) {
            assert!(rest.len() <= MAX_AUTH_HEADER, "accepted an overlong header");
            assert!(rest.iter().filter(|&&b| b == b',').count() < MAX_AUTH_PARAMS);
            assert!(!origin.is_empty() && !key.is_empty());
        }
        return;
    }
    let shallow = json_depth_within(rest, MAX_JSON_DEPTH);
    let Ok(requests) = send_body(rest) else {
        return;
    };
    assert!(
        shallow,
        "accepted a body nested deeper than {MAX_JSON_DEPTH}"
    );
    // Each request takes at least one EDU.
    assert!(requests.len() <= MAX_EDUS);
    let mut total = 0usize;
    for r in &requests {
        assert!(r.target.len() <= MAX_TARGET);
        total += r.body.len();
        // Our own encoding of what was accepted is accepted back as the same request.
        let frags = fragments(&r.id, r.endpoint, &r.target, r.seq, &[r.body.clone()]);
        let mut again = Reassembler::default();
        for f in frags {
            again.push(f).expect("our fragments are accepted");
        }
        let back = again.finish().expect("our fragments are complete");
        assert_eq!(back.len(), 1);
        assert_eq!(&back[0], r);
    }
    // Payloads travel as base64: never more bytes out than came in.
    assert!(total <= rest.len());
});
