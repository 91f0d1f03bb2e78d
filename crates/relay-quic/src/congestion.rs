//! BBR with a floor under its congestion window.
//!
//! Quinn's BBR enters ProbeRTT every 10 s and holds the window to four packets for 200 ms,
//! however small the connection's rate. A relay connection carries every room to a peer, so
//! that stalls them all at once: in the lab's `bad` profile (100 ms RTT, 5% loss) at 50 msg/s,
//! messages of rooms that lost nothing waited 200 ms or more in bursts across neighbouring
//! rooms. A floor of a few packets keeps a low-rate connection moving; at any rate where
//! BBR's own window is above it, it changes nothing.
//!
//! Quinn's BBR also takes its *first* ProbeRTT at the connection's first acknowledgement that
//! is not application-limited (it has no ProbeRTT time yet and counts that as expired), where
//! BBR's draft starts the 10 s clock when the connection starts. A relay's connection first
//! fills its window when load arrives, so the window fell to the floor (under a 0.75 x BDP of
//! the idle link's RTT) right then, for 200 ms and more: the relay's start-up latency tail.
//! We take that first ProbeRTT at the first acknowledgement instead (the handshake's, when
//! nothing waits), keeping BBR's initial window while it lasts, so the next one is due 10 s
//! after the connection started.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Packets BBR's window never drops below (Linux TCP starts at 10).
pub(crate) const FLOOR_PACKETS: u64 = 10;

/// BBR stays in ProbeRTT at least this long.
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);

/// The longest the forced first ProbeRTT keeps the initial window: BBR leaves ProbeRTT at the
/// first round start `PROBE_RTT_TIME` after it entered, which the 1 s keep-alive brings on an
/// idle connection.
const FIRST_PROBE_HOLD: Duration = Duration::from_secs(2);

/// Where the forced first ProbeRTT stands.
#[derive(Clone, Copy, Debug)]
enum FirstProbe {
    /// No acknowledgement yet.
    Due,
    /// BBR is in the ProbeRTT we forced: the window stays at least `window` (what BBR had when
    /// it entered) until BBR's own is back there after `PROBE_RTT_TIME` (ProbeRTT leaves
    /// BBR's window as it was), or at most `FIRST_PROBE_HOLD`.
    Holding {
        window: u64,
        since: Instant,
    },
    Done,
}

#[derive(Debug, Default)]
pub(crate) struct FlooredBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for FlooredBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(FlooredBbr {
            inner: self.bbr.clone().build(now, current_mtu),
            mtu: u64::from(current_mtu),
            first_probe: FirstProbe::Due,
        })
    }
}

struct FlooredBbr {
    inner: Box<dyn Controller>,
    mtu: u64,
    first_probe: FirstProbe,
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
        match self.first_probe {
            FirstProbe::Due => {
                // Not application-limited, as far as BBR knows: its ProbeRTT clock starts now.
                let window = self.inner.window();
                self.inner.on_end_acks(now, in_flight, false, largest);
                self.first_probe = FirstProbe::Holding { window, since: now };
            }
            FirstProbe::Holding { window, since } => {
                self.inner.on_end_acks(now, in_flight, app_limited, largest);
                let held_for = now.saturating_duration_since(since);
                if (held_for >= PROBE_RTT_TIME && self.inner.window() >= window)
                    || held_for >= FIRST_PROBE_HOLD
                {
                    self.first_probe = FirstProbe::Done;
                }
            }
            FirstProbe::Done => self.inner.on_end_acks(now, in_flight, app_limited, largest),
        }
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
        let held = match self.first_probe {
            FirstProbe::Holding { window, .. } => window,
            FirstProbe::Due | FirstProbe::Done => 0,
        };
        self.inner.window().max(FLOOR_PACKETS * self.mtu).max(held)
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
            first_probe: self.first_probe,
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

    /// Quinn's BBR as far as ProbeRTT goes: with no ProbeRTT yet, the first acknowledgement
    /// that is not application-limited enters it, the window falls to `probe` and comes back
    /// at the first acknowledgement 200 ms later.
    #[derive(Clone)]
    struct ProbeModel {
        cwnd: u64,
        probe: u64,
        entered: Option<Instant>,
        in_probe: bool,
    }

    impl Controller for ProbeModel {
        fn on_end_acks(&mut self, now: Instant, _: u64, app_limited: bool, _: Option<u64>) {
            if self.entered.is_none() && !app_limited {
                self.entered = Some(now);
                self.in_probe = true;
            } else if self
                .entered
                .is_some_and(|t| now.saturating_duration_since(t) >= PROBE_RTT_TIME)
            {
                self.in_probe = false;
            }
        }
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            if self.in_probe { self.probe } else { self.cwnd }
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            self.cwnd
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    fn model() -> ProbeModel {
        ProbeModel {
            cwnd: 240_000,
            probe: 4 * 1200,
            entered: None,
            in_probe: false,
        }
    }

    #[test]
    fn the_first_probe_rtt_is_taken_at_the_first_ack_and_keeps_the_initial_window() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // Unwrapped: the first busy acknowledgement, 3 s in, cuts the window to the probe's.
        let mut bare = model();
        bare.on_end_acks(ms(1), 0, true, Some(1));
        assert_eq!(bare.window(), 240_000);
        bare.on_end_acks(ms(3000), 200_000, false, Some(2));
        assert_eq!(
            bare.window(),
            4 * 1200,
            "the model enters ProbeRTT under load"
        );

        let mut bbr = FlooredBbr {
            inner: Box::new(model()),
            mtu: 1200,
            first_probe: FirstProbe::Due,
        };
        // The handshake's acknowledgement (application-limited) starts the probe, at the
        // initial window.
        bbr.on_end_acks(ms(1), 0, true, Some(1));
        assert!(matches!(bbr.first_probe, FirstProbe::Holding { .. }));
        assert_eq!(bbr.window(), 240_000);
        bbr.on_end_acks(ms(100), 0, true, Some(2));
        assert_eq!(bbr.window(), 240_000, "held while BBR probes");
        bbr.on_end_acks(ms(250), 0, true, Some(3));
        assert!(matches!(bbr.first_probe, FirstProbe::Done));
        // Load arrives later: no second probe within BBR's 10 s.
        bbr.on_end_acks(ms(3000), 200_000, false, Some(4));
        assert_eq!(bbr.window(), 240_000);
    }

    #[test]
    fn the_hold_ends_after_its_limit_even_if_bbr_stays_low() {
        let t0 = Instant::now();
        let mut bbr = FlooredBbr {
            inner: Box::new(model()),
            mtu: 1200,
            first_probe: FirstProbe::Due,
        };
        bbr.on_end_acks(t0, 0, true, Some(1));
        // A BBR whose window after the probe is below where it started (it left Startup).
        let low = ProbeModel {
            cwnd: 50_000,
            probe: 50_000,
            entered: Some(t0),
            in_probe: false,
        };
        bbr.inner = Box::new(low);
        bbr.on_end_acks(t0 + Duration::from_millis(500), 0, true, Some(2));
        assert_eq!(bbr.window(), 240_000, "still within the hold");
        bbr.on_end_acks(t0 + FIRST_PROBE_HOLD, 0, true, Some(3));
        assert!(matches!(bbr.first_probe, FirstProbe::Done));
        assert_eq!(bbr.window(), 50_000);
    }

    #[test]
    fn the_window_never_drops_below_the_floor_and_is_bbrs_above_it() {
        let low = FlooredBbr {
            inner: Box::new(Fixed(4 * 1200)),
            mtu: 1200,
            first_probe: FirstProbe::Done,
        };
        assert_eq!(low.window(), FLOOR_PACKETS * 1200);
        assert_eq!(low.metrics().congestion_window, FLOOR_PACKETS * 1200);
        let mut low = low;
        low.on_mtu_update(1452);
        assert_eq!(low.window(), FLOOR_PACKETS * 1452);
        let high = FlooredBbr {
            inner: Box::new(Fixed(300_000)),
            mtu: 1200,
            first_probe: FirstProbe::Done,
        };
        assert_eq!(high.window(), 300_000);
        // The real BBR starts well above the floor.
        let bbr = Arc::new(FlooredBbrConfig::default()).build(Instant::now(), 1200);
        assert_eq!(bbr.window(), bbr.initial_window());
    }
}
