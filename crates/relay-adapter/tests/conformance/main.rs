//! The adapter conformance suite (issue 14): the same hostile cases against every transport,
//! each against a live adapter on loopback while an honest second peer keeps being served.
//!
//! The cases are in `cases.rs`, written once against the [`driver::Driver`] trait; each
//! transport has a driver (`https.rs`, `quic.rs`, `xmpp.rs`, `matrix.rs`) that starts the
//! adapter and speaks its protocol raw. [`conformance!`] is the case table: adding a transport
//! means writing a driver and one line at the bottom of this file.
//!
//! Every case runs on a current-thread runtime, so the adapters' tasks run on the test's
//! thread (the warning counter relies on it).

#![allow(clippy::unwrap_used)]

mod cases;
mod driver;
mod https;
mod matrix;
mod quic;
mod support;
mod xmpp;

/// The case table: every case, for one driver.
macro_rules! conformance {
    ($driver:ty) => {
        conformance!(
            $driver;
            oversize_is_refused_with_the_protocols_own_error,
            a_stalled_frame_is_cut_at_the_frame_deadline,
            connections_over_the_per_peer_cap_are_refused,
            a_source_refused_at_its_cap_is_refused_before_tls_and_no_other,
            a_peer_that_keeps_being_refused_is_slowed_and_no_other,
            a_peer_over_its_byte_budget_gets_backpressure,
            garbage_before_authentication_is_refused,
            garbage_after_authentication_is_refused,
            failed_handshakes_are_counted_and_not_each_logged,
            a_gap_marker_crosses_unchanged,
        );
    };
    ($driver:ty; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                crate::cases::$case::<$driver>().await;
            }
        )*
    };
}

mod over_https {
    conformance!(crate::https::Https);
}

mod over_quic {
    conformance!(crate::quic::Quic);
}

mod over_xmpp {
    conformance!(crate::xmpp::Xmpp);
}

mod over_matrix {
    conformance!(crate::matrix::Matrix);
}
