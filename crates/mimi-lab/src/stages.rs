//! Where the time goes (issue 17): a row's latency over the run (p50 and p99 per 100 ms of send
//! time), and per-stage figures from the nodes' own histograms, scraped from `/metrics` before
//! and after the measured phase: the difference of the two is the phase's, and its quantiles are
//! interpolated inside the buckets as Prometheus' `histogram_quantile` does.

use std::collections::BTreeMap;
use std::time::Duration;

pub use crate::model::{StageFigure, TimelinePoint};

use super::{Admin, median_u64};

/// Width of a timeline bucket, by send time.
pub(crate) const BUCKET_MS: u64 = 100;

/// Where the start of a connection shows (the first ProbeRTT of BBR, a cold path): the
/// timeline's first part, against the rest.
pub(crate) const EARLY_MS: u64 = 400;

/// The nearest-rank quantile of sorted values (none empty).
fn rank(sorted: &[u64], q: f64) -> u64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The timeline of a phase's samples `(stream, scheduled ns since the epoch, latency µs)`;
/// buckets without a message are left out.
pub(crate) fn timeline(samples: &[(u32, u64, u64)]) -> Vec<TimelinePoint> {
    let Some(t0) = samples.iter().map(|s| s.1).min() else {
        return Vec::new();
    };
    let mut buckets: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (_, sched, us) in samples {
        let i = (sched - t0) / (BUCKET_MS * 1_000_000);
        buckets.entry(i).or_default().push(*us);
    }
    buckets
        .into_iter()
        .map(|(i, mut v)| {
            v.sort_unstable();
            TimelinePoint {
                t_ms: i * BUCKET_MS,
                n: v.len() as u64,
                p50_us: rank(&v, 0.50),
                p99_us: rank(&v, 0.99),
            }
        })
        .collect()
}

/// p99 of the messages sent in the phase's first [`EARLY_MS`], and of those sent after.
pub(crate) fn early_late_p99(samples: &[(u32, u64, u64)]) -> (Option<u64>, Option<u64>) {
    let Some(t0) = samples.iter().map(|s| s.1).min() else {
        return (None, None);
    };
    let cut = t0 + EARLY_MS * 1_000_000;
    let (mut early, mut late): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for (_, sched, us) in samples {
        if *sched < cut {
            early.push(*us);
        } else {
            late.push(*us);
        }
    }
    let p99 = |mut v: Vec<u64>| {
        v.sort_unstable();
        (!v.is_empty()).then(|| rank(&v, 0.99))
    };
    (p99(early), p99(late))
}

/// The timeline of a repeated row: at each bucket the median over the runs that have it,
/// counts summed.
pub(crate) fn median_timeline(runs: &[&[TimelinePoint]]) -> Vec<TimelinePoint> {
    let mut by_t: BTreeMap<u64, Vec<&TimelinePoint>> = BTreeMap::new();
    for run in runs {
        for p in *run {
            by_t.entry(p.t_ms).or_default().push(p);
        }
    }
    by_t.into_iter()
        .map(|(t_ms, ps)| TimelinePoint {
            t_ms,
            n: ps.iter().map(|p| p.n).sum(),
            p50_us: median_u64(ps.iter().map(|p| p.p50_us).collect()).unwrap_or(0),
            p99_us: median_u64(ps.iter().map(|p| p.p99_us).collect()).unwrap_or(0),
        })
        .collect()
}

/// One histogram of a Prometheus text page: cumulative counts per upper bound in seconds
/// (+Inf last), as exposed.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PromHistogram {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub sum_s: f64,
    pub count: u64,
}

/// The value of label `key` in a `{a="x",b="y"}` label set.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The histograms of family `name` in `text`, by the value of their label `by` (`""` for a
/// family without it). Lines of other families, and malformed ones, are skipped.
pub(crate) fn histograms(text: &str, name: &str, by: &str) -> BTreeMap<String, PromHistogram> {
    let mut out: BTreeMap<String, PromHistogram> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let (part, labels) = match series.split_once('{') {
            Some((p, l)) => (p, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let key = label(labels, by).unwrap_or("").to_owned();
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        match part {
            "_bucket" => {
                let bound = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(b) => match b.parse::<f64>() {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                let h = out.entry(key).or_default();
                h.bounds.push(bound);
                h.cumulative.push(v as u64);
            }
            "_sum" => out.entry(key).or_default().sum_s = v,
            "_count" => out.entry(key).or_default().count = v as u64,
            _ => {}
        }
    }
    out
}

impl PromHistogram {
    /// What was added between `before` and `self` (the whole of `self` when the bounds
    /// differ: a node that restarted, or no `before`).
    pub(crate) fn since(&self, before: Option<&PromHistogram>) -> PromHistogram {
        match before {
            Some(b) if b.bounds == self.bounds => PromHistogram {
                bounds: self.bounds.clone(),
                cumulative: self
                    .cumulative
                    .iter()
                    .zip(&b.cumulative)
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect(),
                sum_s: (self.sum_s - b.sum_s).max(0.0),
                count: self.count.saturating_sub(b.count),
            },
            _ => self.clone(),
        }
    }

    /// Adds `other` (same bounds) into `self`: several followers as one.
    pub(crate) fn add(&mut self, other: &PromHistogram) {
        if self.bounds.is_empty() {
            *self = other.clone();
            return;
        }
        if self.bounds != other.bounds {
            return;
        }
        for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *a += b;
        }
        self.sum_s += other.sum_s;
        self.count += other.count;
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket (from 0 below the
    /// first bound); in the +Inf bucket, the highest finite bound. None without observations.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let i = self.cumulative.iter().position(|c| *c as f64 >= rank)?;
        let upper = self.bounds[i];
        let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
        if upper.is_infinite() {
            return Some(lower);
        }
        let below = if i == 0 { 0 } else { self.cumulative[i - 1] };
        let inside = self.cumulative[i] - below;
        if inside == 0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * (rank - below as f64) / inside as f64)
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_s / self.count as f64)
    }
}

/// The suffix of the stages that cover only the phase's first [`EARLY_MS`].
pub(crate) const EARLY_SUFFIX: &str = " (first 400 ms)";
/// The lab's stages of the messages scheduled in the first [`EARLY_MS`].
pub(crate) const EARLY_DRIVER: &str = "driver (first 400 ms)";
pub(crate) const EARLY_API_CALL: &str = "api_call (first 400 ms)";

/// The nodes' figures of the phase's first [`EARLY_MS`] (scraped then), named apart.
pub(crate) fn early(figures: Vec<StageFigure>) -> impl Iterator<Item = StageFigure> {
    figures.into_iter().map(|mut f| {
        f.stage.push_str(EARLY_SUFFIX);
        f
    })
}

/// The families the lab reads, and the stage each (or each label) stands for.
const FAMILIES: [(&str, &str, Option<&str>); 3] = [
    ("mimi_relay_stage_seconds", "stage", None),
    ("mimi_relay_store_commit_seconds", "", Some("store_write")),
    (
        "mimi_relay_delivery_latency_seconds",
        "",
        Some("accept_to_ack"),
    ),
];

/// The stage histograms of one scrape, by (node, stage).
#[derive(Clone, Debug, Default)]
pub(crate) struct Scrape(BTreeMap<(String, String), PromHistogram>);

impl Scrape {
    /// Adds one node's `/metrics` page as `node` (pages of the same node name add up).
    pub(crate) fn add_page(&mut self, node: &str, text: &str) {
        for (family, by, fixed) in FAMILIES {
            for (label, h) in histograms(text, family, by) {
                let stage = fixed.map_or(label, str::to_owned);
                self.0.entry((node.to_owned(), stage)).or_default().add(&h);
            }
        }
    }

    /// Reads the hub's page (`admins[0]`) and the followers' (`admins[1..=followers]`); a
    /// node that does not answer is left out.
    pub(crate) async fn of(admins: &[Admin], followers: usize) -> Scrape {
        let mut s = Scrape::default();
        for (i, a) in admins.iter().enumerate().take(followers + 1) {
            let mut client = a.client().with_timeout(Duration::from_secs(5));
            if let Ok((status, body)) = client.get("/metrics").await
                && status.is_success()
            {
                let node = if i == 0 { "hub" } else { "follower" };
                s.add_page(node, &String::from_utf8_lossy(&body));
            }
        }
        s
    }

    /// Each stage's figures over what was added since `before`; stages that timed nothing
    /// are left out.
    pub(crate) fn since(&self, before: &Scrape) -> Vec<StageFigure> {
        let us = |s: Option<f64>| s.map(|s| s * 1e6);
        self.0
            .iter()
            .filter_map(|((node, stage), after)| {
                let h = after.since(before.0.get(&(node.clone(), stage.clone())));
                (h.count > 0).then(|| StageFigure {
                    node: node.clone(),
                    stage: stage.clone(),
                    n: h.count,
                    p50_us: us(h.quantile(0.50)),
                    p99_us: us(h.quantile(0.99)),
                    mean_us: us(h.mean()),
                })
            })
            .collect()
    }
}

/// A lab stage from per-message values (µs each): `driver`, how late the driver handed
/// messages to the hub's API after their scheduled time; `api_call`, how long the
/// `submitBatch` call that carried each message took to be answered.
pub(crate) fn lab_figure(stage: &str, lags_us: &mut [u64]) -> Option<StageFigure> {
    if lags_us.is_empty() {
        return None;
    }
    lags_us.sort_unstable();
    let mean = lags_us.iter().map(|v| *v as f64).sum::<f64>() / lags_us.len() as f64;
    Some(StageFigure {
        node: "lab".into(),
        stage: stage.into(),
        n: lags_us.len() as u64,
        p50_us: Some(rank(lags_us, 0.50) as f64),
        p99_us: Some(rank(lags_us, 0.99) as f64),
        mean_us: Some(mean),
    })
}

/// The figures of a repeated row: each stage's median over the runs that have it.
pub(crate) fn median_stages(runs: &[&[StageFigure]]) -> Vec<StageFigure> {
    let mut by: BTreeMap<(String, String), Vec<&StageFigure>> = BTreeMap::new();
    for run in runs {
        for f in *run {
            by.entry((f.node.clone(), f.stage.clone()))
                .or_default()
                .push(f);
        }
    }
    let med = |v: Vec<f64>| super::median_f64(v);
    by.into_iter()
        .map(|((node, stage), fs)| StageFigure {
            node,
            stage,
            n: fs.iter().map(|f| f.n).sum(),
            p50_us: med(fs.iter().filter_map(|f| f.p50_us).collect()),
            p99_us: med(fs.iter().filter_map(|f| f.p99_us).collect()),
            mean_us: med(fs.iter().filter_map(|f| f.mean_us).collect()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn the_timeline_buckets_by_send_time_from_the_first_send() {
        let ms = |m: u64| 5_000_000_000 + m * 1_000_000;
        let mut samples = Vec::new();
        // 0..100 ms: latencies 1..=100 µs; 250 ms: one message of 9 ms; nothing at 100..200.
        for i in 1..=100u64 {
            samples.push((0, ms(i - 1), i));
        }
        samples.push((1, ms(250), 9_000));
        let t = timeline(&samples);
        assert_eq!(
            t,
            vec![
                TimelinePoint {
                    t_ms: 0,
                    n: 100,
                    p50_us: 50,
                    p99_us: 99
                },
                TimelinePoint {
                    t_ms: 200,
                    n: 1,
                    p50_us: 9_000,
                    p99_us: 9_000
                },
            ]
        );
        assert!(timeline(&[]).is_empty());
        // 101 messages in the first 400 ms: the 100th smallest is their p99.
        assert_eq!(early_late_p99(&samples), (Some(100), None));
        samples.push((1, ms(400), 7));
        assert_eq!(early_late_p99(&samples), (Some(100), Some(7)));
    }

    #[test]
    fn a_repeated_timeline_takes_each_buckets_median() {
        let p = |t_ms, p99_us| TimelinePoint {
            t_ms,
            n: 10,
            p50_us: 1,
            p99_us,
        };
        let (a, b, c) = (vec![p(0, 10), p(100, 5)], vec![p(0, 30)], vec![p(0, 20)]);
        let m = median_timeline(&[&a, &b, &c]);
        assert_eq!(m, vec![TimelinePoint { n: 30, ..p(0, 20) }, p(100, 5)]);
    }

    const PAGE: &str = "\
# HELP mimi_relay_stage_seconds x
# TYPE mimi_relay_stage_seconds histogram
mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"0.00001\"} 10
mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"0.0001\"} 90
mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"0.001\"} 100
mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"+Inf\"} 100
mimi_relay_stage_seconds_sum{stage=\"core\"} 0.005
mimi_relay_stage_seconds_count{stage=\"core\"} 100
mimi_relay_stage_seconds_bucket{stage=\"inbox\",le=\"0.00001\"} 0
mimi_relay_stage_seconds_bucket{stage=\"inbox\",le=\"0.0001\"} 0
mimi_relay_stage_seconds_bucket{stage=\"inbox\",le=\"0.001\"} 0
mimi_relay_stage_seconds_bucket{stage=\"inbox\",le=\"+Inf\"} 0
mimi_relay_stage_seconds_sum{stage=\"inbox\"} 0
mimi_relay_stage_seconds_count{stage=\"inbox\"} 0
mimi_relay_store_commit_seconds_bucket{le=\"0.001\"} 4
mimi_relay_store_commit_seconds_bucket{le=\"+Inf\"} 5
mimi_relay_store_commit_seconds_sum 0.02
mimi_relay_store_commit_seconds_count 5
mimi_relay_accepted_total 7
";

    #[test]
    fn histograms_are_read_by_label_and_their_quantiles_interpolated() {
        let hs = histograms(PAGE, "mimi_relay_stage_seconds", "stage");
        assert_eq!(hs.len(), 2);
        let core = &hs["core"];
        assert_eq!(core.bounds.len(), 4);
        assert!(core.bounds[3].is_infinite());
        assert_eq!(core.cumulative, [10, 90, 100, 100]);
        assert_eq!(core.count, 100);
        // Rank 50 of 100 is the 40th of the 80 in (10 µs, 100 µs]: half way.
        assert!(close(core.quantile(0.5), 55e-6), "{:?}", core.quantile(0.5));
        // Rank 5 is half way through the first bucket, from 0.
        assert!(close(core.quantile(0.05), 5e-6));
        // Rank 99 is the 9th of the 10 in (100 µs, 1 ms].
        assert!(close(core.quantile(0.99), 100e-6 + 900e-6 * 0.9));
        assert!(close(core.mean(), 50e-6));
        assert_eq!(hs["inbox"].quantile(0.5), None);
        // In the +Inf bucket the answer is the highest finite bound.
        let commit = &histograms(PAGE, "mimi_relay_store_commit_seconds", "")[""];
        assert!(close(commit.quantile(0.99), 0.001));
    }

    #[test]
    fn a_phase_is_the_difference_of_two_scrapes() {
        let mut before = Scrape::default();
        before.add_page("hub", PAGE);
        // The lower buckets did not move.
        let later = PAGE
            .replace("le=\"0.001\"} 100", "le=\"0.001\"} 190")
            .replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 200")
            .replace(
                "seconds_sum{stage=\"core\"} 0.005",
                "seconds_sum{stage=\"core\"} 0.105",
            )
            .replace(
                "seconds_count{stage=\"core\"} 100",
                "seconds_count{stage=\"core\"} 200",
            );
        let mut after = Scrape::default();
        after.add_page("hub", &later);
        let figs = after.since(&before);
        // Only core moved: 100 more, 90 in (100 µs, 1 ms] and 10 above 1 ms.
        assert_eq!(figs.len(), 1, "{figs:?}");
        let core = &figs[0];
        assert_eq!(
            (core.node.as_str(), core.stage.as_str(), core.n),
            ("hub", "core", 100)
        );
        assert!(close(core.p50_us, 100.0 + 900.0 * 50.0 / 90.0), "{core:?}");
        assert!(close(core.p99_us, 1000.0));
        assert!(close(core.mean_us, 1000.0));
        // Two followers' pages add up.
        let mut two = Scrape::default();
        two.add_page("follower", PAGE);
        two.add_page("follower", PAGE);
        let figs = two.since(&Scrape::default());
        let stages: Vec<(&str, u64)> = figs.iter().map(|f| (f.stage.as_str(), f.n)).collect();
        assert_eq!(stages, [("core", 200), ("store_write", 10)]);
    }

    #[test]
    fn the_driver_figure_is_nearest_rank() {
        let mut lags: Vec<u64> = (1..=200).rev().collect();
        let f = lab_figure("driver", &mut lags).expect("some");
        assert_eq!((f.n, f.p50_us, f.p99_us), (200, Some(100.0), Some(198.0)));
        assert!(close(f.mean_us, 100.5));
        assert!(lab_figure("api_call", &mut []).is_none());
    }
}
