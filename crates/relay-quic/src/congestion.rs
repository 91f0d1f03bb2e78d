//! BBR with a floor under its congestion window.
//!
//! Quinn's BBR enters ProbeRTT every 10 s and holds the window to four packets for 200 ms,
//! however small the connection's rate. A relay connection carries every room to a peer, so
//! that stalls them all at once: in the lab's `bad` profile (100 ms RTT, 5% loss) at 50 msg/s,
//! messages of rooms that lost nothing waited 200 ms or more in bursts across neighbouring
//! rooms. A floor of a few packets keeps a low-rate connection moving; at any rate where
//! BBR's own window is above it, it changes nothing.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Packets BBR's window never drops below (Linux TCP starts at 10).
pub(crate) const FLOOR_PACKETS: u64 = 10;

#[derive(Debug, Default)]
pub(crate) struct FlooredBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for FlooredBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(FlooredBbr {
            inner: self.bbr.clone().build(now, current_mtu),
            mtu: u64::from(current_mtu),
        })
    }
}

struct FlooredBbr {
    inner: Box<dyn Controller>,
    mtu: u64,
}

impl Controller for FlooredBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest: Option<u64>,
    ) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        persistent: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, persistent, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().max(FLOOR_PACKETS * self.mtu)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(FlooredBbr {
            inner: self.inner.clone_box(),
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller whose window is whatever the test sets.
    #[derive(Clone)]
    struct Fixed(u64);

    impl Controller for Fixed {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            self.0
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            self.0
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    #[test]
    fn the_window_never_drops_below_the_floor_and_is_bbrs_above_it() {
        let low = FlooredBbr {
            inner: Box::new(Fixed(4 * 1200)),
            mtu: 1200,
        };
        assert_eq!(low.window(), FLOOR_PACKETS * 1200);
        assert_eq!(low.metrics().congestion_window, FLOOR_PACKETS * 1200);
        let mut low = low;
        low.on_mtu_update(1452);
        assert_eq!(low.window(), FLOOR_PACKETS * 1452);
        let high = FlooredBbr {
            inner: Box::new(Fixed(300_000)),
            mtu: 1200,
        };
        assert_eq!(high.window(), 300_000);
        // The real BBR starts well above the floor.
        let bbr = Arc::new(FlooredBbrConfig::default()).build(Instant::now(), 1200);
        assert_eq!(bbr.window(), bbr.initial_window());
    }
}
