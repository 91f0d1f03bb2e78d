//! Figures from what the receivers saw: delivery records, latency quantiles, head-of-line
//! exposure, medians of repeated rows, recovery time and CPU time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use relay_core::TransportKind;

use crate::hostile::{self, CpuShares, FloodCounts};
use crate::model::{Repeat, Row};
use crate::netlab::{self, Profile};
use crate::stages::{self, StageFigure, TimelinePoint};

/// The median of `v`; for an even count, `mid` of the middle two.
pub(crate) fn median<T: Copy>(
    mut v: Vec<T>,
    cmp: fn(&T, &T) -> std::cmp::Ordering,
    mid: fn(T, T) -> T,
) -> Option<T> {
    v.sort_by(cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some(mid(v[n / 2 - 1], v[n / 2])),
    }
}

pub(crate) fn median_f64(v: Vec<f64>) -> Option<f64> {
    median(v, f64::total_cmp, |a, b| (a + b) / 2.0)
}

pub(crate) fn median_u64(v: Vec<u64>) -> Option<u64> {
    median(v, Ord::cmp, u64::midpoint)
}

impl Row {
    /// One row from the runs of a repeated row: each figure the median of the runs' (the
    /// mean of the middle two for an even count), the largest latency the largest, counts
    /// summed, and the CDF the median at each quantile. A failed run fails the row: a median
    /// must not quietly stand on fewer runs than were asked for.
    pub(crate) fn median_of(mut runs: Vec<Row>) -> Row {
        if runs.len() <= 1 {
            return runs
                .pop()
                .unwrap_or_else(|| unreachable!("a row runs at least once"));
        }
        let n = runs.len();
        if let Some(k) = runs.iter().position(|r| r.status != "ok") {
            let mut bad = runs.swap_remove(k);
            bad.note = format!("run {} of {n}: {}", k + 1, bad.note);
            return bad;
        }
        let repeats = runs
            .iter()
            .map(|r| Repeat {
                msgs_per_s: r.msgs_per_s,
                p99_us: r.p99_us,
                clean_p99_us: r.clean_p99_us,
            })
            .collect();
        let f = |get: fn(&Row) -> Option<f64>| median_f64(runs.iter().filter_map(get).collect());
        let u = |get: fn(&Row) -> Option<u64>| median_u64(runs.iter().filter_map(get).collect());
        let sum = |get: fn(&Row) -> Option<u64>| runs.iter().map(get).sum::<Option<u64>>();
        let cdf = runs[0]
            .cdf
            .iter()
            .enumerate()
            .map(|(i, (q, _))| {
                let at = runs
                    .iter()
                    .filter_map(|r| r.cdf.get(i).map(|p| p.1))
                    .collect();
                (*q, median_u64(at).unwrap_or(0))
            })
            .collect();
        let mut flood: Option<FloodCounts> = None;
        let mut hub_refusals = BTreeMap::new();
        let mut commit_kinds = BTreeMap::new();
        for r in &runs {
            for (k, v) in &r.commit_kinds {
                *commit_kinds.entry(k.clone()).or_insert(0) += v;
            }
            if let Some(f) = &r.flood {
                flood.get_or_insert_with(FloodCounts::default).add(f);
            }
            for (k, v) in &r.hub_refusals {
                *hub_refusals.entry(k.clone()).or_insert(0) += v;
            }
        }
        let cpus: Vec<&CpuShares> = runs.iter().filter_map(|r| r.cpu.as_ref()).collect();
        let timelines: Vec<&[TimelinePoint]> = runs.iter().map(|r| &r.timeline[..]).collect();
        let stage_runs: Vec<&[StageFigure]> = runs.iter().map(|r| &r.stages[..]).collect();
        Row {
            timeline: stages::median_timeline(&timelines),
            stages: stages::median_stages(&stage_runs),
            p99_first_400ms_us: u(|r| r.p99_first_400ms_us),
            p99_after_400ms_us: u(|r| r.p99_after_400ms_us),
            cpu: CpuShares::mean(&cpus),
            hub_peak_rss_bytes: runs.iter().filter_map(|r| r.hub_peak_rss_bytes).max(),
            flood,
            hub_refusals,
            cpus: runs[0].cpus.clone(),
            sent: runs.iter().map(|r| r.sent).sum(),
            delivered: runs.iter().map(|r| r.delivered).sum(),
            msgs_per_s: f(|r| r.msgs_per_s),
            p50_us: u(|r| r.p50_us),
            p99_us: u(|r| r.p99_us),
            p999_us: u(|r| r.p999_us),
            max_us: runs.iter().filter_map(|r| r.max_us).max(),
            clean_p99_us: u(|r| r.clean_p99_us),
            hol_p99_us: u(|r| r.hol_p99_us),
            clean_msgs: runs.iter().map(|r| r.clean_msgs).sum(),
            hol_exposed_msgs: runs.iter().map(|r| r.hol_exposed_msgs).sum(),
            wire_bytes_per_msg: f(|r| r.wire_bytes_per_msg),
            cpu_us_per_msg: f(|r| r.cpu_us_per_msg),
            node_cpu_us_per_msg: (0..runs[0].node_cpu_us_per_msg.len())
                .map(|i| {
                    median_f64(
                        runs.iter()
                            .filter_map(|r| r.node_cpu_us_per_msg.get(i).copied())
                            .collect(),
                    )
                    .unwrap_or(0.0)
                })
                .collect(),
            lab_cpu_us_per_msg: f(|r| r.lab_cpu_us_per_msg),
            client_crypto_us_per_msg: f(|r| r.client_crypto_us_per_msg),
            client_encrypt_us_per_msg: f(|r| r.client_encrypt_us_per_msg),
            setup_ms: f(|r| r.setup_ms),
            recovery_ms: f(|r| r.recovery_ms),
            link_drops: sum(|r| r.link_drops),
            socket_drops: sum(|r| r.socket_drops),
            lost: sum(|r| r.lost),
            duplicated: sum(|r| r.duplicated),
            out_of_order: sum(|r| r.out_of_order),
            decrypt_failures: sum(|r| r.decrypt_failures),
            franks_verified: sum(|r| r.franks_verified),
            retries: sum(|r| r.retries),
            mls_msg_bytes: f(|r| r.mls_msg_bytes),
            commits: sum(|r| r.commits),
            commits_refused: sum(|r| r.commits_refused),
            commit_kinds,
            decrypted_after_phase: sum(|r| r.decrypted_after_phase),
            cdf,
            repeats,
            ..runs.swap_remove(0)
        }
    }
}

/// Completes each flood row from its transport's quiet row: the victim's ratios, the hub's
/// memory budget and whether every target held.
pub(crate) fn hostile_figures(rows: &mut [Row]) {
    let quiet: Vec<Row> = rows
        .iter()
        .filter(|r| r.hostile.as_deref() == Some("quiet") && r.status == "ok")
        .cloned()
        .collect();
    for r in rows
        .iter_mut()
        .filter(|r| r.hostile.as_deref() == Some("flood") && r.status == "ok")
    {
        let Some(q) = quiet.iter().find(|q| q.transport == r.transport) else {
            continue;
        };
        let (q_rate, q_p99, q_rss) = (&q.msgs_per_s, &q.p99_us, &q.hub_peak_rss_bytes);
        r.victim_rate_ratio = match (r.msgs_per_s, q_rate) {
            (Some(f), Some(q)) if *q > 0.0 => Some(f / q),
            _ => None,
        };
        r.victim_p99_ratio = match (r.p99_us, q_p99) {
            (Some(f), Some(q)) => Some(f as f64 / (*q).max(1) as f64),
            _ => None,
        };
        let kind = r.transport.parse::<TransportKind>().ok();
        r.rss_budget_bytes = match (q_rss, kind) {
            (Some(q), Some(k)) => Some(q + hostile::LIMITS.allowance(k, HOSTILE_PEERS)),
            _ => None,
        };
        r.targets_met = Some(
            r.victim_rate_ratio
                .is_some_and(|x| x >= hostile::RATE_TARGET)
                && r.victim_p99_ratio.is_some_and(|x| x <= hostile::P99_TARGET)
                && matches!((r.hub_peak_rss_bytes, r.rss_budget_bytes), (Some(p), Some(b)) if p <= b)
                && r.is_clean(),
        );
    }
}

/// The hub's peers in a hostile row: the victim and the flooder.
pub(crate) const HOSTILE_PEERS: u64 = 2;

/// Most messages per receiver [`Rx::reserve`] makes room for (about 40 MB of tables).
pub(crate) const RESERVE_MAX: usize = 2_000_000;

/// What the receivers saw.
pub(crate) struct Rx {
    epoch: Instant,
    seen: Vec<HashSet<(u32, u32)>>,
    last: Vec<HashMap<u32, u32>>,
    pub(crate) delivered: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    pub(crate) hist: Histogram<u64>,
    /// (stream, scheduled ns since epoch, latency µs) of each first delivery in this phase.
    pub(crate) samples: Vec<(u32, u64, u64)>,
    pub(crate) first: Option<Instant>,
    pub(crate) last_delivery: Option<Instant>,
    /// First deliveries per stream over the whole row (the first `window_receivers`
    /// receivers): the closed loop's window.
    pub(crate) per_stream: HashMap<u32, u64>,
    /// Receivers whose deliveries count in `per_stream` (all, unless set lower: MLS spare
    /// clients, members only for a while, do not move the window).
    pub(crate) window_receivers: usize,
    /// Notified after deliveries are recorded (a closed loop waits on it when its windows are full).
    pub(crate) progress: Arc<tokio::sync::Notify>,
}

impl Rx {
    pub(crate) fn new(epoch: Instant, receivers: usize) -> Result<Rx> {
        Ok(Rx {
            epoch,
            seen: vec![HashSet::new(); receivers],
            last: vec![HashMap::new(); receivers],
            delivered: 0,
            duplicated: 0,
            out_of_order: 0,
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .map_err(|e| anyhow!("histogram: {e}"))?,
            samples: Vec::new(),
            first: None,
            last_delivery: None,
            per_stream: HashMap::new(),
            window_receivers: receivers,
            progress: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Makes room for `messages` first deliveries per receiver up front (at most
    /// [`RESERVE_MAX`]), so that the readers do not grow and rehash their tables while the
    /// measured phase runs.
    pub(crate) fn reserve(&mut self, messages: usize) {
        let n = messages.min(RESERVE_MAX);
        for s in &mut self.seen {
            s.reserve(n);
        }
        self.samples.reserve(n * self.seen.len());
    }

    /// Records one delivery of (stream, counter) at receiver `r`.
    pub(crate) fn record(
        &mut self,
        r: usize,
        stream: u32,
        counter: u32,
        sched_ns: u64,
        now: Instant,
    ) {
        if !self.seen[r].insert((stream, counter)) {
            self.duplicated += 1;
            return;
        }
        match self.last[r].get(&stream) {
            Some(prev) if counter < *prev => self.out_of_order += 1,
            _ => {
                self.last[r].insert(stream, counter);
            }
        }
        self.delivered += 1;
        if r < self.window_receivers {
            *self.per_stream.entry(stream).or_default() += 1;
        }
        let sched = self.epoch + Duration::from_nanos(sched_ns);
        let us = now.saturating_duration_since(sched).as_micros() as u64;
        let _ = self.hist.record(us.max(1));
        self.samples.push((stream, sched_ns, us));
        self.first.get_or_insert(now);
        self.last_delivery = Some(now);
    }

    /// Starts a new measuring phase: latency and timing restart, duplicate and order checks go on.
    pub(crate) fn new_phase(&mut self) {
        self.hist.reset();
        self.samples.clear();
        self.delivered = 0;
        self.first = None;
        self.last_delivery = None;
    }
}

/// CPU used so far by each node process and by the lab's own, µs.
pub(crate) struct CpuSnap {
    nodes: Vec<u64>,
    lab: u64,
}

impl CpuSnap {
    pub(crate) fn now(pids: &[u32]) -> CpuSnap {
        CpuSnap {
            nodes: pids.iter().map(|p| cpu_us(*p).unwrap_or(0)).collect(),
            lab: cpu_us(std::process::id()).unwrap_or(0),
        }
    }

    /// Fills the row's CPU figures per delivered message from `self` (the start) to `end`.
    pub(crate) fn fill(&self, end: &CpuSnap, delivered: u64, row: &mut Row) {
        if delivered == 0 {
            return;
        }
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / delivered as f64;
        row.node_cpu_us_per_msg = self
            .nodes
            .iter()
            .zip(&end.nodes)
            .map(|(a, b)| per(*a, *b))
            .collect();
        row.cpu_us_per_msg = Some(row.node_cpu_us_per_msg.iter().sum());
        row.lab_cpu_us_per_msg = Some(per(self.lab, end.lab));
    }
}

/// User+system CPU of a process in microseconds (Linux USER_HZ is 100).
pub(crate) fn cpu_us(pid: u32) -> Option<u64> {
    cpu_us_at(&format!("/proc/{pid}/stat"))
}

/// User+system CPU from a `stat` file of /proc (a process's or a thread's).
pub(crate) fn cpu_us_at(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000)
}

/// Fills the latency, HOL and throughput figures of `row` from a finished phase.
pub(crate) fn fill_latency(
    row: &mut Row,
    rx: &Rx,
    drops: &[netlab::Drop],
    profile: &Profile,
    epoch: Instant,
) {
    let h = &rx.hist;
    if h.is_empty() {
        return;
    }
    row.p50_us = Some(h.value_at_quantile(0.50));
    row.p99_us = Some(h.value_at_quantile(0.99));
    row.p999_us = Some(h.value_at_quantile(0.999));
    row.max_us = Some(h.max());
    row.cdf = [
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99,
        0.995, 0.999, 0.9995, 0.9999, 1.0,
    ]
    .iter()
    .map(|q| (*q, h.value_at_quantile(*q)))
    .collect();
    row.timeline = stages::timeline(&rx.samples);
    (row.p99_first_400ms_us, row.p99_after_400ms_us) = stages::early_late_p99(&rx.samples);
    // Throughput over the phase: from its start (the epoch of its first schedule) to the last
    // delivery; the first delivery stands in when unknown.
    let _ = epoch;
    if let (Some(first), Some(last)) = (rx.first, rx.last_delivery) {
        let first_sched = rx
            .samples
            .iter()
            .map(|(_, s, _)| *s)
            .min()
            .map(|s| rx.epoch + Duration::from_nanos(s))
            .unwrap_or(first);
        let secs = last.saturating_duration_since(first_sched).as_secs_f64();
        if secs > 0.0 {
            row.msgs_per_s = Some(rx.delivered as f64 / secs);
        }
    }
    // Head-of-line. A message is "clean" when its room lost nothing it had to wait for: no
    // packet was dropped within its own send window [sched, sched + W] (the packets that
    // carried it left then; W = 5 ms covers the hub's submit and commit), and no earlier
    // message of its room that was not clean was still undelivered when it was sent (per-room
    // order makes it wait for that one, whatever the transport). Encrypted packets cannot be
    // opened, so drops are attributed by time: a drop in the window may have hit another
    // room's packet, which only makes the clean set smaller, never dirtier. A clean message
    // is "exposed" when other packets were dropped within 2 RTT before it: on one ordered
    // byte stream (TCP) it may wait for their retransmission, on independent streams (QUIC)
    // it should not.
    let mut times: Vec<u64> = drops.iter().map(|d| d.at.as_nanos() as u64).collect();
    times.sort_unstable();
    let w = 5_000_000u64;
    let rtt2 = (profile.rtt_ms * 2e6) as u64 + w;
    // Each room's messages in the order they were sent.
    let mut by_room = rx.samples.clone();
    by_room.sort_unstable_by_key(|&(stream, sched, _)| (stream, sched));
    let mut clean = Vec::new();
    let mut exposed = Vec::new();
    // Per stream: until when an earlier message that was not clean stayed undelivered.
    let mut blocked_until: Option<(u32, u64)> = None;
    for (stream, sched, us) in by_room {
        let done = sched + us * 1000;
        let lo = times.partition_point(|t| *t < sched);
        let own = times.get(lo).is_some_and(|t| *t <= sched + w);
        let waited = matches!(blocked_until, Some((s, until)) if s == stream && until > sched);
        if own || waited {
            let until = match blocked_until {
                Some((s, until)) if s == stream => until.max(done),
                _ => done,
            };
            blocked_until = Some((stream, until));
            continue;
        }
        clean.push(us);
        let before = times.partition_point(|t| *t < sched.saturating_sub(rtt2));
        if lo > before {
            exposed.push(us);
        }
    }
    let p99 = |v: &mut Vec<u64>| -> Option<u64> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1])
    };
    row.clean_msgs = clean.len() as u64;
    row.hol_exposed_msgs = exposed.len() as u64;
    row.clean_p99_us = p99(&mut clean);
    row.hol_p99_us = p99(&mut exposed);
}

/// Recovery after a link cut: from the link's restoration to the last delivery of a message
/// sent before it (`samples`: (stream, sent ns since `epoch`, latency µs)).
pub(crate) fn recovery_ms(
    samples: &[(u32, u64, u64)],
    epoch: Instant,
    restore_at: Instant,
) -> Option<f64> {
    let restore_rel = restore_at.duration_since(epoch);
    let restore_ns = restore_rel.as_nanos() as u64;
    let done = samples
        .iter()
        .filter(|(_, s, _)| *s < restore_ns)
        .map(|(_, s, us)| Duration::from_nanos(*s) + Duration::from_micros(*us))
        .max()?;
    Some(done.saturating_sub(restore_rel).as_secs_f64() * 1e3)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::BenchOptions;

    #[test]
    fn rx_counts_duplicates_and_reordering() {
        let epoch = Instant::now();
        let mut rx = Rx::new(epoch, 1).unwrap();
        let now = epoch + Duration::from_millis(5);
        rx.record(0, 1, 0, 0, now);
        rx.record(0, 1, 2, 0, now);
        rx.record(0, 1, 1, 0, now);
        rx.record(0, 1, 2, 0, now);
        assert_eq!(rx.delivered, 3);
        assert_eq!(rx.duplicated, 1);
        assert_eq!(rx.out_of_order, 1);
        assert_eq!(rx.hist.len(), 3);
    }

    fn drop_at(ms: u64) -> netlab::Drop {
        netlab::Drop {
            at: Duration::from_millis(ms),
            from: 0,
            to: 1,
        }
    }

    /// The figures of a `wan` row from what `rx` received and the link dropped.
    fn wan_row(rx: &Rx, drops: &[netlab::Drop], epoch: Instant) -> Row {
        let profile = Profile::named("wan").unwrap();
        let mut row = Row::empty("quic", "wan", "netns", &BenchOptions::default());
        fill_latency(&mut row, rx, drops, &profile, epoch);
        row
    }

    #[test]
    fn clean_messages_exclude_those_with_a_drop_in_their_window() {
        let epoch = Instant::now();
        let mut rx = Rx::new(epoch, 1).unwrap();
        // Room 0 sends at 10 ms and a drop at 11 ms hits it (delivered at 200 ms); room 1
        // sends at 60 ms, unhurt (delivered at 80 ms).
        rx.record(0, 0, 0, 10_000_000, epoch + Duration::from_millis(200));
        rx.record(0, 1, 0, 60_000_000, epoch + Duration::from_millis(80));
        let row = wan_row(&rx, &[drop_at(11)], epoch);
        assert_eq!(row.clean_msgs, 1);
        // Both sent within the first 100 ms: one timeline bucket, the early p99 the worse.
        let t: Vec<(u64, u64, u64)> = row
            .timeline
            .iter()
            .map(|p| (p.t_ms, p.n, p.p99_us))
            .collect();
        assert_eq!(t, [(0, 2, 190_000)]);
        assert_eq!(
            (row.p99_first_400ms_us, row.p99_after_400ms_us),
            (Some(190_000), None)
        );
        assert_eq!(row.clean_p99_us, Some(20_000));
        // The drop lies within 2 RTT (80 ms) before room 1's message.
        assert_eq!(row.hol_exposed_msgs, 1);
        // Without drops every message is clean and none is exposed.
        let row = wan_row(&rx, &[], epoch);
        assert_eq!((row.clean_msgs, row.hol_exposed_msgs), (2, 0));
    }

    #[test]
    fn a_message_waiting_for_a_lost_one_of_its_own_room_is_not_clean() {
        let epoch = Instant::now();
        let mut rx = Rx::new(epoch, 1).unwrap();
        let ms = |m| epoch + Duration::from_millis(m);
        // Room 0: message 0 at 10 ms is hit (delivered at 300 ms); message 1 at 60 ms waits
        // for it (delivered at 300 ms too); message 2 at 400 ms comes after both: clean.
        rx.record(0, 0, 0, 10_000_000, ms(300));
        rx.record(0, 0, 1, 60_000_000, ms(300));
        rx.record(0, 0, 2, 400_000_000, ms(420));
        // Room 1 at 70 ms, while room 0 waits: clean, and exposed to room 0's loss.
        rx.record(0, 1, 0, 70_000_000, ms(90));
        let row = wan_row(&rx, &[drop_at(11)], epoch);
        assert_eq!(row.clean_msgs, 2, "room 0's third message and room 1's");
        assert_eq!(row.clean_p99_us, Some(20_000));
        assert_eq!(row.hol_exposed_msgs, 1, "room 1's message");
        assert_eq!(row.hol_p99_us, Some(20_000));
    }

    fn run_of(msgs: f64, p99: u64, lost: u64) -> Row {
        let mut r = Row::empty("quic", "wan", "netns", &BenchOptions::default());
        r.sent = 100;
        r.delivered = 100 - lost;
        r.msgs_per_s = Some(msgs);
        r.p99_us = Some(p99);
        r.max_us = Some(p99 * 2);
        r.lost = Some(lost);
        r.duplicated = Some(0);
        r.out_of_order = Some(0);
        r.link_drops = Some(3);
        r.cdf = vec![(0.5, p99 / 2), (0.99, p99)];
        r
    }

    #[test]
    fn a_repeated_row_takes_each_figures_median_and_sums_the_counts() {
        let row = Row::median_of(vec![
            run_of(900.0, 30, 0),
            run_of(1000.0, 90, 1),
            run_of(1100.0, 10, 0),
        ]);
        assert_eq!(row.status, "ok");
        // Medians figure by figure: p99 from the third run, msgs/s from the second.
        assert_eq!(row.msgs_per_s, Some(1000.0));
        assert_eq!(row.p99_us, Some(30));
        assert_eq!(row.max_us, Some(180), "the largest of all runs");
        assert_eq!(row.cdf, vec![(0.5, 15), (0.99, 30)]);
        // Counts are totals: one run's loss is not voted away.
        assert_eq!((row.sent, row.delivered), (300, 299));
        assert_eq!(row.lost, Some(1));
        assert!(!row.is_clean());
        assert_eq!(row.link_drops, Some(9));
        // Each run stays on record, in round order.
        let p99s: Vec<_> = row.repeats.iter().map(|r| r.p99_us).collect();
        assert_eq!(p99s, vec![Some(30), Some(90), Some(10)]);
        // An even count takes the mean of the middle two.
        let row = Row::median_of(vec![run_of(900.0, 30, 0), run_of(1000.0, 90, 0)]);
        assert_eq!((row.msgs_per_s, row.p99_us), (Some(950.0), Some(60)));
        // One run is the row itself, with no list of runs.
        let row = Row::median_of(vec![run_of(900.0, 30, 0)]);
        assert!(row.repeats.is_empty());
    }

    #[test]
    fn a_failed_run_fails_the_repeated_row() {
        let mut failed = run_of(0.0, 0, 0);
        failed.status = "error".into();
        failed.note = "did not finish".into();
        let row = Row::median_of(vec![run_of(900.0, 30, 0), failed, run_of(1000.0, 20, 0)]);
        assert_eq!(row.status, "error");
        assert_eq!(row.note, "run 2 of 3: did not finish");
    }
}
