//! The transport comparison lab behind `mimi-relay bench`: for each network profile and each
//! transport, it starts one hub and F follower nodes (separate processes of this binary, each in
//! its own network namespace when root), drives rooms hosted by the hub through the hub's
//! loopback client API, reads every follower's inbox, and measures what arrived: throughput,
//! latency from the scheduled send time (open loop, so that a slow relay cannot hide its queue:
//! no coordinated omission), bytes on the link, CPU of the node processes, setup and recovery
//! time, and lost/duplicated/out-of-order deliveries. A bare quinn stream pump and a bare
//! TLS-over-TCP pump carry the same messages through the same link as baselines.
//!
//! A transport that this build lacks (its node exits with "not part of this build") becomes a
//! `gap` row, not a failure of the run.
//!
//! The demo harness (`mimi-relay demo`, [`demo`]) lives here too: it starts its nodes the same
//! way.

mod cli;
pub mod demo;
mod hostile;
mod mls;
pub mod netlab;
mod pump;
mod report;
mod stages;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::TransportKind;
use relay_node::client::LocalClient;
use serde::Serialize;

use crate::demo::Launcher;
pub use cli::{BenchArgs, main};
use hostile::Variant;
pub use hostile::{CpuShares, FloodCounts, Hostile, HostileLimits};
use netlab::NetLab;
pub use netlab::Profile;
pub use stages::{StageFigure, TimelinePoint};

const MAGIC: &[u8; 4] = b"MLAB";
/// The stream id of the setup probe (rooms use 0..rooms).
const PROBE_STREAM: u32 = u32::MAX;

/// Sizes of the messages: application messages of `app` bytes of MLS ciphertext, with a share
/// of commit-sized and Welcome-sized ones mixed in. The sizes follow what OpenMLS produces for
/// small groups (a commit with an update path of a few KiB, a Welcome of several KiB to tens
/// of KiB as the group grows); the relay never looks inside, so only the size matters.
#[derive(Clone, Debug, Serialize)]
pub struct SizeMix {
    pub app: usize,
    pub commit_share: f64,
    pub commit: (usize, usize),
    pub welcome_share: f64,
    pub welcome: (usize, usize),
}

impl Default for SizeMix {
    fn default() -> Self {
        SizeMix {
            app: 1024,
            commit_share: 0.04,
            commit: (1536, 4096),
            welcome_share: 0.01,
            welcome: (8192, 32768),
        }
    }
}

impl SizeMix {
    fn pick(&self, rng: &mut u64) -> usize {
        let u = unit(rng);
        let range = |(lo, hi): (usize, usize), rng: &mut u64| {
            lo + (unit(rng) * (hi.saturating_sub(lo)) as f64) as usize
        };
        if u < self.welcome_share {
            range(self.welcome, rng)
        } else if u < self.welcome_share + self.commit_share {
            range(self.commit, rng)
        } else {
            self.app
        }
    }
}

fn unit(rng: &mut u64) -> f64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    (*rng >> 11) as f64 / (1u64 << 53) as f64
}

/// Where the nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// Namespaces when root, else loopback.
    Auto,
    Loopback,
    Netns,
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Relay transports plus `bare-quinn` / `bare-tls`.
    pub transports: Vec<String>,
    pub profiles: Vec<Profile>,
    pub rooms: usize,
    /// Follower providers per room (each room has the hub plus these).
    pub followers: usize,
    pub sizes: SizeMix,
    /// Open-loop arrival rate over all rooms (messages/s); None = closed loop.
    pub rate: Option<f64>,
    /// Closed loop: messages per room sent but not yet delivered to every follower, at most.
    pub window: u64,
    /// Most messages per submitBatch call to the hub.
    pub submit_batch: u64,
    pub duration: Duration,
    /// Runs of every row, interleaved by round; the report gives medians.
    pub repeat: usize,
    /// `memory` or `durable`.
    pub store: String,
    pub net: NetMode,
    pub out: PathBuf,
    /// Cut the link for 5 s after the main phase and time the recovery (needs namespaces).
    pub recovery: bool,
    pub progress: bool,
    /// Keep the nodes' working directories under OUT/work.
    pub keep: bool,
    /// How long to wait for the last deliveries after a phase.
    pub settle: Duration,
    /// The congestion controller of the relay's QUIC transport and of the bare-quinn pump.
    pub quic_cc: relay_quic::Congestion,
    /// `--hostile flood`: each relay transport runs quiet and flooded (see [`hostile`]).
    pub hostile: Hostile,
    /// `--inflight`: transmits in flight per (room, destination) for every relay transport;
    /// None keeps each transport's default (the core's `pipeline`).
    pub inflight: Option<u32>,
    /// `--traffic`: what the relay rows carry (the baselines always carry synthetic bytes); the
    /// command line defaults to mls.
    pub traffic: Traffic,
    /// `--commit-rate`: MLS commits per second over all rooms (mls traffic only).
    pub commit_rate: f64,
    /// `--mls-decrypt deferred`: receivers record each message when it arrives and decrypt
    /// application messages later (at a handshake of their room, or when the phase ends), so
    /// that their openmls work leaves the machine's CPU to the nodes while the rate is
    /// measured; every message is still decrypted and checked.
    pub mls_deferred: bool,
}

/// What the relay rows carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Random bytes in a PrivateMessage frame, submitted by the hub only.
    Synthetic,
    /// Real MLS groups: every provider's clients encrypt, decrypt and commit.
    Mls,
}

impl Traffic {
    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::Synthetic => "synthetic",
            Traffic::Mls => "mls",
        }
    }
}

/// The in-flight limit a relay transport runs with in this lab: `--inflight`, or the core's
/// default for it. None for the baselines, which are not the relay.
pub fn inflight_of(transport: &str, opts: &BenchOptions) -> Option<u32> {
    let kind: TransportKind = transport.parse().ok()?;
    Some(opts.inflight.unwrap_or_else(|| {
        let local: ProviderDomain = "a.example".parse().unwrap_or_else(|_| unreachable!());
        relay_core::RelayConfig::new(local)
            .pipeline
            .get(&kind)
            .copied()
            .unwrap_or(1)
    }))
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            transports: vec![
                "https".into(),
                "quic".into(),
                "xmpp".into(),
                "matrix".into(),
                "bare-quinn".into(),
                "bare-tls".into(),
            ],
            profiles: vec![Profile::named("lan").unwrap_or_else(|| unreachable!())],
            rooms: 16,
            followers: 1,
            sizes: SizeMix::default(),
            rate: None,
            window: 64,
            submit_batch: 1024,
            duration: Duration::from_secs(10),
            repeat: 1,
            store: "memory".into(),
            net: NetMode::Auto,
            out: PathBuf::from("bench-out"),
            recovery: true,
            progress: true,
            keep: false,
            settle: Duration::from_secs(30),
            quic_cc: relay_quic::Congestion::default(),
            hostile: Hostile::None,
            inflight: None,
            traffic: Traffic::Synthetic,
            commit_rate: 1.0,
            mls_deferred: false,
        }
    }
}

/// One result row: a transport (or baseline) under one profile.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub transport: String,
    pub profile: String,
    /// `netns` (packet-level impairment) or `loopback` (no impairment possible).
    pub net: String,
    /// `ok`, `gap` (transport not in this build) or `error`.
    pub status: String,
    pub note: String,
    pub mode: String,
    /// Transmits in flight per (room, destination) the relay ran with (None: a baseline).
    pub inflight: Option<u32>,
    /// `synthetic` or `mls` (see [`Traffic`]).
    pub traffic: String,
    pub rooms: usize,
    pub followers: usize,
    pub sent: u64,
    pub delivered: u64,
    pub msgs_per_s: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    pub max_us: Option<u64>,
    /// p99 of messages with no packet dropped on the link within their own send window.
    pub clean_p99_us: Option<u64>,
    /// p99 of those clean messages that had another message's drop within 2 RTT before them:
    /// the ones exposed to head-of-line blocking.
    pub hol_p99_us: Option<u64>,
    pub clean_msgs: u64,
    pub hol_exposed_msgs: u64,
    pub wire_bytes_per_msg: Option<f64>,
    pub cpu_us_per_msg: Option<f64>,
    /// CPU of each node process (the hub first) per delivered message, µs: where the nodes'
    /// CPU went.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub node_cpu_us_per_msg: Vec<f64>,
    /// CPU of the lab's own process (drivers, readers, the link forwarder and, with mls
    /// traffic, the clients) per delivered message, µs: it shares the machine with the nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lab_cpu_us_per_msg: Option<f64>,
    /// mls traffic: the clients' openmls CPU (thread time) per accepted message, µs: one
    /// encryption plus every member's decryption, and the commits and Welcomes applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_crypto_us_per_msg: Option<f64>,
    /// mls traffic: the encryption's part of `client_crypto_us_per_msg`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_encrypt_us_per_msg: Option<f64>,
    pub setup_ms: Option<f64>,
    pub recovery_ms: Option<f64>,
    pub link_drops: Option<u64>,
    /// UDP datagrams the kernel dropped at a full socket receive buffer (netns only): losses
    /// the link did not cause, which the clean/HOL split cannot see.
    pub socket_drops: Option<u64>,
    pub lost: Option<u64>,
    pub duplicated: Option<u64>,
    pub out_of_order: Option<u64>,
    /// mls traffic: messages that did not decrypt or apply (must be 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decrypt_failures: Option<u64>,
    /// mls traffic: messages encrypted again after the hub answered epochTooOld.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u64>,
    /// mls traffic: mean size of a submitted MLS message (PrivateMessage) on the wire, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mls_msg_bytes: Option<f64>,
    /// mls traffic: commits the hub accepted during the measured phase, and refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commits_refused: Option<u64>,
    /// mls traffic: accepted commits by kind (`self_update`, `add`, `remove`, `role`), and the
    /// spare clients that joined by Welcome (`spares_joined`) and applied their own removal
    /// (`spares_left`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub commit_kinds: BTreeMap<String, u64>,
    /// mls traffic: `inline` or `deferred` (see `--mls-decrypt`), and with deferred the
    /// messages decrypted after the measured phase (the rest were decrypted during it, at
    /// their rooms' handshakes or when a reader held too many).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mls_decrypt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decrypted_after_phase: Option<u64>,
    /// (quantile, latency µs) points of the latency distribution, for the CDF plot.
    pub cdf: Vec<(f64, u64)>,
    /// p50 and p99 per 100 ms of send time over the measured phase, for the timeline plot.
    pub timeline: Vec<TimelinePoint>,
    /// p99 of the messages sent in the phase's first 400 ms, and of those sent later.
    pub p99_first_400ms_us: Option<u64>,
    pub p99_after_400ms_us: Option<u64>,
    /// Where the time goes: per-stage figures from the nodes' `/metrics` over the measured
    /// phase (an MLS row: over the whole row), and the driver's lateness.
    pub stages: Vec<StageFigure>,
    /// With `--repeat`: each run's own figures, in round order; the row's are their medians.
    pub repeats: Vec<Repeat>,
    /// `--hostile`: `quiet` or `flood`, the two runs of a transport (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostile: Option<String>,
    /// On a flood row: the victim's p99 latency, flooded over quiet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub victim_p99_ratio: Option<f64>,
    /// On a flood row: the victim's delivered msgs/s, flooded over quiet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub victim_rate_ratio: Option<f64>,
    /// The hub process's peak resident set over the row (VmHWM), in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_peak_rss_bytes: Option<u64>,
    /// On a flood row: what the hub may hold by its configured budgets (the report gives the
    /// formula): its quiet run's peak plus what the `[limits]` let its peers add.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_budget_bytes: Option<u64>,
    /// On a flood row: what the flooder sent and how the hub answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<FloodCounts>,
    /// The hub's refusal counters from its `/metrics` at the end of the row (non-zero ones).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hub_refusals: BTreeMap<String, u64>,
    /// On a flood row: whether every target of the hostile scenario held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets_met: Option<bool>,
    /// Hostile rows: where the machine's CPU went over the phase (the hub's, the lab's, and
    /// processes outside the lab on a shared host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<hostile::CpuShares>,
    /// Hostile rows: the CPUs each role could run on, as the kernel listed them
    /// (`Cpus_allowed_list`): hub, victim, flooder_node, lab (driver, readers, forwarder) and,
    /// flooded, flooder.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cpus: BTreeMap<String, String>,
}

/// One run's headline figures, when a row is the median of several.
#[derive(Clone, Debug, Serialize)]
pub struct Repeat {
    pub msgs_per_s: Option<f64>,
    pub p99_us: Option<u64>,
    pub clean_p99_us: Option<u64>,
}

impl Row {
    fn empty(transport: &str, profile: &str, net: &str, opts: &BenchOptions) -> Row {
        Row {
            transport: transport.to_owned(),
            profile: profile.to_owned(),
            net: net.to_owned(),
            status: "ok".into(),
            note: String::new(),
            mode: match opts.rate {
                Some(r) => format!("open-loop {r} msg/s"),
                None => format!("closed-loop, window {} per room", opts.window),
            },
            inflight: inflight_of(transport, opts),
            traffic: match transport.parse::<TransportKind>() {
                Ok(_) if opts.hostile == Hostile::None => opts.traffic.as_str().to_owned(),
                _ => Traffic::Synthetic.as_str().to_owned(),
            },
            rooms: opts.rooms,
            followers: opts.followers,
            sent: 0,
            delivered: 0,
            msgs_per_s: None,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            max_us: None,
            clean_p99_us: None,
            hol_p99_us: None,
            clean_msgs: 0,
            hol_exposed_msgs: 0,
            wire_bytes_per_msg: None,
            cpu_us_per_msg: None,
            node_cpu_us_per_msg: Vec::new(),
            lab_cpu_us_per_msg: None,
            client_crypto_us_per_msg: None,
            client_encrypt_us_per_msg: None,
            setup_ms: None,
            recovery_ms: None,
            link_drops: None,
            socket_drops: None,
            lost: None,
            duplicated: None,
            out_of_order: None,
            decrypt_failures: None,
            retries: None,
            mls_msg_bytes: None,
            commits: None,
            commits_refused: None,
            commit_kinds: BTreeMap::new(),
            mls_decrypt: None,
            decrypted_after_phase: None,
            cdf: Vec::new(),
            timeline: Vec::new(),
            p99_first_400ms_us: None,
            p99_after_400ms_us: None,
            stages: Vec::new(),
            repeats: Vec::new(),
            hostile: None,
            victim_p99_ratio: None,
            victim_rate_ratio: None,
            hub_peak_rss_bytes: None,
            rss_budget_bytes: None,
            flood: None,
            hub_refusals: BTreeMap::new(),
            targets_met: None,
            cpu: None,
            cpus: BTreeMap::new(),
        }
    }

    /// One row from the runs of a repeated row: each figure the median of the runs' (the
    /// mean of the middle two for an even count), the largest latency the largest, counts
    /// summed, and the CDF the median at each quantile. A failed run fails the row: a median
    /// must not quietly stand on fewer runs than were asked for.
    fn median_of(mut runs: Vec<Row>) -> Row {
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

    /// Nothing lost, nothing twice, nothing out of order (gaps and errors are not clean).
    pub fn is_clean(&self) -> bool {
        self.status == "ok"
            && self.lost == Some(0)
            && self.duplicated == Some(0)
            && self.out_of_order == Some(0)
            && self.decrypt_failures.unwrap_or(0) == 0
    }
}

/// The median of `v`; for an even count, `mid` of the middle two.
fn median<T: Copy>(
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

fn median_f64(v: Vec<f64>) -> Option<f64> {
    median(v, f64::total_cmp, |a, b| (a + b) / 2.0)
}

fn median_u64(v: Vec<u64>) -> Option<u64> {
    median(v, Ord::cmp, u64::midpoint)
}

/// The whole run: rows plus how it was made.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// `--traffic`: `synthetic` or `mls` (each row says what it carried).
    pub traffic: String,
    pub net: String,
    pub net_note: String,
    pub started_unix: u64,
    pub machine: String,
    pub command: String,
    pub sizes: SizeMix,
    pub profiles: Vec<Profile>,
    pub duration_s: f64,
    /// The QUIC congestion controller (relay and bare quinn).
    pub quic_cc: String,
    /// Runs per row (`--repeat`); with more than one, the rows' figures are medians.
    pub repeat: usize,
    /// With `--hostile flood`: the hub's `[limits]` in the hostile rows.
    pub hostile: Option<HostileLimits>,
    /// With `--hostile flood`: the CPUs of the honest side and of the attacker (none when the
    /// machine has a single CPU; the notes say so).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<hostile::Placement>,
    /// What the run left out, and why.
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
}

/// Completes each flood row from its transport's quiet row: the victim's ratios, the hub's
/// memory budget and whether every target held.
fn hostile_figures(rows: &mut [Row]) {
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
const HOSTILE_PEERS: u64 = 2;

/// Parses `--transports`: relay transport names and the two baselines.
pub fn check_transport(name: &str) -> Result<()> {
    if name == "bare-quinn" || name == "bare-tls" || name.parse::<TransportKind>().is_ok() {
        Ok(())
    } else {
        bail!(
            "unknown transport {name:?}: expected {} or bare-quinn, bare-tls",
            TransportKind::ALL.map(TransportKind::as_str).join(", ")
        )
    }
}

/// The message marker inside the MLS ciphertext: stream (room), counter, scheduled send time.
fn marker_bytes(stream: u32, counter: u32, sched_ns: u64) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[..4].copy_from_slice(MAGIC);
    m[4..8].copy_from_slice(&stream.to_be_bytes());
    m[8..12].copy_from_slice(&counter.to_be_bytes());
    m[12..20].copy_from_slice(&sched_ns.to_be_bytes());
    m
}

fn find_marker(b: &[u8]) -> Option<(u32, u32, u64)> {
    let at = b.windows(4).position(|w| w == MAGIC)?;
    let s = u32::from_be_bytes(b.get(at + 4..at + 8)?.try_into().ok()?);
    let c = u32::from_be_bytes(b.get(at + 8..at + 12)?.try_into().ok()?);
    let t = u64::from_be_bytes(b.get(at + 12..at + 20)?.try_into().ok()?);
    Some((s, c, t))
}

/// A ciphertext of `size` bytes starting with the marker.
fn ciphertext(marker: [u8; 20], size: usize, rng: &mut u64) -> Vec<u8> {
    let mut ct = Vec::with_capacity(size.max(20) + 8);
    ct.extend_from_slice(&marker);
    while ct.len() < size {
        unit(rng);
        ct.extend_from_slice(&rng.to_le_bytes());
    }
    ct.truncate(size.max(20));
    ct
}

fn submit_body(hub: &str, room: u32, ct: &[u8]) -> Result<Bytes> {
    let mls = mimi_wire::mls::private_message(format!("room{room}").as_bytes(), 1, ct);
    let req = mimi_wire::proto::SubmitMessageRequest::mls10(mls, format!("mimi://{hub}/u/bench"))
        .map_err(|e| anyhow!("building a submit request: {e}"))?;
    Ok(Bytes::from(
        req.encode()
            .map_err(|e| anyhow!("encoding a submit request: {e}"))?,
    ))
}

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

/// Closed loop: waits until message `counter` of `stream` is within `window` messages of the
/// oldest one not yet delivered to all `receivers`, so that the backlog stays bounded and
/// throughput is what the path delivers, not what a queue absorbs.
pub(crate) async fn wait_window(
    rx: &Mutex<Rx>,
    stream: u32,
    counter: u64,
    receivers: u64,
    window: u64,
    stop: &AtomicBool,
) {
    let need = (counter + 1).saturating_sub(window) * receivers;
    let mut spins = 0u32;
    while lock(rx).per_stream.get(&stream).copied().unwrap_or(0) < need {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Yield a few times before sleeping: a timer costs up to a millisecond.
        spins += 1;
        if spins < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

fn provider(i: usize) -> String {
    format!("{}.example", (b'a' + (i as u8 % 26)) as char)
}

fn room_id(r: usize) -> String {
    format!("mimi://a.example/r/room{r}")
}

/// The room of the flooding follower in a hostile row (the victim is not a member).
const FLOOD_ROOM: &str = "mimi://a.example/r/flood";

/// What the flooder of a hostile row needs: the hub's listener as the flooding follower (the
/// last node) reaches it, that follower's TLS identity from the row's config directory, and
/// the hub's certificate to pin.
fn flood_target(
    kind: TransportKind,
    configs: &[PathBuf],
    lab: Option<&NetLab>,
) -> Result<hostile::FloodTarget> {
    let me = configs.len() - 1;
    let hub_cfg = relay_node::NodeConfig::load(&configs[0])?;
    let hub_addr = match lab {
        Some(_) => SocketAddr::from((NetLab::addr(0), netns_port(kind))),
        None => *hub_cfg
            .listen
            .get(&kind)
            .ok_or_else(|| anyhow!("the hub does not listen on {kind}"))?,
    };
    let my_cfg = relay_node::NodeConfig::load(&configs[me])?;
    let identity = relay_tls::TlsIdentity::load(my_cfg.domain.clone(), &my_cfg.cert, &my_cfg.key)?;
    let mut trust = relay_tls::PeerTrust::new();
    trust.load_pem(hub_cfg.domain.clone(), &hub_cfg.cert)?;
    Ok(hostile::FloodTarget {
        kind,
        hub: hub_cfg.domain,
        hub_addr,
        trust,
        identity,
        member_room: FLOOD_ROOM.to_owned(),
        victim_room: room_id(0),
        limits: hostile::LIMITS,
        netns: lab.map(|l| l.path(me)),
        cpus: None,
    })
}

/// The progress line on stderr.
#[derive(Clone)]
pub(crate) struct Progress {
    on: bool,
    /// The last step reported, to say where a row that ran out of time was.
    last: Arc<Mutex<String>>,
}

impl Progress {
    pub(crate) fn line(&self, s: &str) {
        s.clone_into(&mut lock(&self.last));
        if self.on {
            eprint!("\r\x1b[2K{s}");
        }
    }
    pub(crate) fn last(&self) -> String {
        lock(&self.last).clone()
    }

    pub(crate) fn done(&self, s: &str) {
        if self.on {
            eprintln!("\r\x1b[2K{s}");
        } else {
            eprintln!("{s}");
        }
    }
}

/// Runs the whole comparison and writes `results.json`, `report.md` and the plots into
/// `opts.out`.
pub async fn run(opts: BenchOptions, launcher: Launcher, command: String) -> Result<BenchReport> {
    for t in &opts.transports {
        check_transport(t)?;
    }
    if opts.rooms == 0 || opts.followers == 0 || opts.followers > 25 {
        bail!("--rooms must be at least 1 and --followers 1 to 25");
    }
    if !["durable", "memory"].contains(&opts.store.as_str()) {
        bail!("--store {}: expected durable or memory", opts.store);
    }
    let (use_netns, net_note) = match (opts.net, netlab::available()) {
        (NetMode::Loopback, _) => (false, "loopback (asked for): no impairment applied".into()),
        (_, Ok(())) => (
            true,
            "network namespaces linked by TUN devices through the lab's userspace forwarder \
             (kernel netem is not used)"
                .to_owned(),
        ),
        (NetMode::Netns, Err(why)) => bail!("--net netns: namespaces unavailable: {why}"),
        (NetMode::Auto, Err(why)) => (
            false,
            format!(
                "loopback: namespaces unavailable ({why}), so profiles other than lan are NOT applied"
            ),
        ),
    };
    if !use_netns && opts.profiles.iter().any(Profile::is_impaired) {
        eprintln!("warning: {net_note}");
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    // Nodes run in their own working directory: every path handed to them must be absolute.
    let mut opts = opts;
    opts.out = std::fs::canonicalize(&opts.out)?;
    let progress = Progress {
        on: opts.progress,
        last: Arc::default(),
    };
    let budget = row_budget(&opts);
    // The rows of each profile: every transport once, or, hostile, each relay transport quiet
    // and flooded (the baselines carry no relay to flood).
    let mut notes = Vec::new();
    if opts.traffic == Traffic::Mls {
        notes.push(format!(
            "--traffic mls: relay rows carry real MLS groups ({} commits/s, in turn \
             self-updates, adds or removes of spare clients by key claim, Welcome and \
             AppDataUpdate, and role changes; --size is the plaintext size; the commit/Welcome \
             size mix does not apply; a follower forwards its clients' submissions to the hub in \
             their order, pipelined over QUIC and Matrix, one per room at a time over HTTPS \
             and XMPP); \
             every provider submits into every room at its own node, and every message is \
             delivered to every other member (the sender's provider's inbox gets it too). \
             msgs/s counts deliveries, timed from the scheduled send to the arrival at the \
             receiver's inbox reader; {}. The baselines and hostile rows carry synthetic bytes, \
             submitted at the hub only",
            opts.commit_rate,
            if opts.mls_deferred {
                "decryption deferred (--mls-decrypt deferred): receivers decrypt application \
                 messages at their room's next commit or Welcome or after the phase, so the \
                 clients' decryption (not their encryption) is mostly off the timed path; every \
                 message is still decrypted and its plaintext checked"
            } else {
                "decryption inline: the clients' openmls work (one encryption, a decryption at \
                 every other member) runs on the same CPUs as the nodes, on the timed path"
            }
        ));
    }
    let units: Vec<(String, Variant)> = match opts.hostile {
        Hostile::None => opts
            .transports
            .iter()
            .map(|t| (t.clone(), Variant::Normal))
            .collect(),
        Hostile::Flood => {
            let skipped: Vec<&str> = opts
                .transports
                .iter()
                .filter(|t| t.starts_with("bare-"))
                .map(String::as_str)
                .collect();
            if !skipped.is_empty() {
                notes.push(format!(
                    "--hostile flood: {} skipped (a baseline has no relay to flood)",
                    skipped.join(", ")
                ));
            }
            opts.transports
                .iter()
                .filter(|t| !t.starts_with("bare-"))
                .flat_map(|t| [(t.clone(), Variant::Quiet), (t.clone(), Variant::Flood)])
                .collect()
        }
    };
    // Hostile: the attacker's CPUs apart from the hub's, the same in the quiet and the flooded
    // runs (hostile/cpus.rs says why). The lab's threads, and the forwarder and runtime
    // threads started from them, take the honest side's.
    let placement = match opts.hostile {
        Hostile::None => None,
        Hostile::Flood => match hostile::Placement::plan() {
            Ok(p) => match p.pin_process() {
                Ok(()) => Some(p),
                Err(e) => {
                    notes.push(format!("--hostile flood: CPUs not split ({e}): the flooder competes with the hub for every CPU"));
                    None
                }
            },
            Err(why) => {
                notes.push(format!("--hostile flood: CPUs not split ({why})"));
                None
            }
        },
    };
    for n in &notes {
        eprintln!("note: {n}");
    }
    let mut rows = Vec::new();
    let net = if use_netns { "netns" } else { "loopback" };
    for profile in &opts.profiles {
        let epoch = Instant::now();
        let lab = if use_netns {
            let nodes = match opts.hostile {
                Hostile::None => 1 + opts.followers,
                Hostile::Flood => 3,
            };
            Some(NetLab::create(nodes, profile, epoch)?)
        } else {
            None
        };
        // runs[i]: the runs of unit i, in round order.
        let mut runs: Vec<Vec<Row>> = vec![Vec::new(); units.len()];
        let order = (0..opts.repeat).flat_map(|round| {
            let n = units.len();
            (0..n).map(move |i| (round, (round + i) % n))
        });
        for (round, ti) in order {
            let (t, variant) = (&units[ti].0, units[ti].1);
            let mut row = Row::empty(t, &profile.name, net, &opts);
            row.hostile = variant.label().map(str::to_owned);
            let name = match variant.label() {
                Some(v) => format!("{t} / {v}"),
                None => t.clone(),
            };
            let dir = name.replace(" / ", "-");
            let (label, work) = if opts.repeat == 1 {
                (
                    format!("[{name} / {}]", profile.name),
                    format!("{}-{dir}", profile.name),
                )
            } else {
                (
                    format!("[{name} / {} / run {}]", profile.name, round + 1),
                    format!("{}-{dir}-{}", profile.name, round + 1),
                )
            };
            let work = opts.out.join("work").join(work);
            let one_row = async {
                let carrier = match t.as_str() {
                    "bare-quinn" => Some(pump::Carrier::Quinn),
                    "bare-tls" => Some(pump::Carrier::Tls),
                    _ => None,
                };
                match carrier {
                    Some(carrier) => {
                        pump::run(
                            carrier,
                            &opts,
                            profile,
                            lab.as_ref(),
                            epoch,
                            &mut row,
                            &progress,
                            &label,
                        )
                        .await
                    }
                    None => {
                        let kind: TransportKind = t.parse()?;
                        run_relay(
                            kind,
                            variant,
                            &work,
                            &opts,
                            profile,
                            lab.as_ref(),
                            epoch,
                            &launcher,
                            placement.as_ref(),
                            &mut row,
                            &progress,
                            &label,
                        )
                        .await
                    }
                }
            };
            // Every wait inside a row is bounded; this bounds the row as a whole, so that a
            // wedged node or link fails its row instead of the whole run.
            let result = match tokio::time::timeout(budget, one_row).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!(
                    "did not finish within {budget:?}; last step: {}",
                    progress.last().trim()
                )),
            };
            match result {
                Ok(()) => progress.done(&format!(
                    "{label} {:.0} msg/s, p50 {} us, p99 {} us, lost/dup/ooo {}/{}/{}",
                    row.msgs_per_s.unwrap_or(0.0),
                    row.p50_us.unwrap_or(0),
                    row.p99_us.unwrap_or(0),
                    row.lost.unwrap_or(0),
                    row.duplicated.unwrap_or(0),
                    row.out_of_order.unwrap_or(0)
                )),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if msg.contains("not part of this build") {
                        row.status = "gap".into();
                        row.note = format!("transport {t} is not part of this build");
                        let _ = std::fs::remove_dir_all(&work);
                    } else {
                        row.status = "error".into();
                        row.note = msg.lines().next().unwrap_or_default().to_owned();
                    }
                    progress.done(&format!("{label} {}: {}", row.status, row.note));
                }
            }
            runs[ti].push(row);
        }
        let mut profile_rows: Vec<Row> = runs.into_iter().map(Row::median_of).collect();
        hostile_figures(&mut profile_rows);
        rows.extend(profile_rows);
        if let Some(lab) = &lab {
            lab.set_cut(false);
        }
        drop(lab);
    }
    let report = BenchReport {
        traffic: opts.traffic.as_str().to_owned(),
        net: net.into(),
        net_note,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: report::machine(),
        command,
        sizes: opts.sizes.clone(),
        profiles: opts.profiles.clone(),
        duration_s: opts.duration.as_secs_f64(),
        quic_cc: opts.quic_cc.to_string(),
        repeat: opts.repeat,
        hostile: (opts.hostile == Hostile::Flood).then_some(hostile::LIMITS),
        placement,
        notes,
        rows,
    };
    report::write(&opts.out, &report)?;
    // Only when empty: kept or failed rows leave their logs there.
    let _ = std::fs::remove_dir(opts.out.join("work"));
    Ok(report)
}

/// The longest a row may take: node start, setup, the phase, its settle time and the
/// recovery phase, each at its own limit, and a margin.
fn row_budget(opts: &BenchOptions) -> Duration {
    let recovery = if opts.recovery {
        Duration::from_secs(8) + opts.settle.max(Duration::from_secs(30))
    } else {
        Duration::ZERO
    };
    Duration::from_secs(30 + 30 + 60) + opts.duration + opts.settle + recovery
}

/// The node processes of one relay run.
struct Nodes {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Nodes {
    fn stop(&mut self) {
        for c in &self.children {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{}.log", provider(i))))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl std::ops::Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ports inside a namespace: the same in every one (each has its own stack).
fn netns_port(kind: TransportKind) -> u16 {
    7000 + TransportKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0) as u16
}

const NETNS_ADMIN: u16 = 9100;

/// Writes certificates and node configs; returns (config paths, admin address each node
/// listens on inside its own stack).
fn prepare(
    dir: &Path,
    kind: TransportKind,
    n: usize,
    opts: &BenchOptions,
    netns: bool,
    variant: Variant,
) -> Result<Vec<PathBuf>> {
    let hostile = variant != Variant::Normal;
    // mls traffic: the hub's clients create the rooms and add the followers' clients.
    let mls = opts.traffic == Traffic::Mls && !hostile;
    let (rooms, store) = (if mls { 0 } else { opts.rooms }, &opts.store);
    std::fs::create_dir_all(dir.join("certs"))?;
    for i in 0..n {
        let p = provider(i);
        let d: ProviderDomain = p.parse()?;
        let g = relay_tls::generate(&d)?;
        std::fs::write(dir.join(format!("certs/{p}.crt")), g.cert_pem)?;
        std::fs::write(dir.join(format!("certs/{p}.key")), g.key_pem)?;
    }
    // Each port stays bound until all are picked, so that no two nodes are given the same one.
    let mut held: (Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>) = (Vec::new(), Vec::new());
    let mut free = |udp: bool| -> Result<u16> {
        Ok(if udp {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let port = s.local_addr()?.port();
            held.0.push(s);
            port
        } else {
            let s = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = s.local_addr()?.port();
            held.1.push(s);
            port
        })
    };
    let mut addrs = Vec::new();
    let mut admins = Vec::new();
    for i in 0..n {
        if netns {
            addrs.push(SocketAddr::from((NetLab::addr(i), netns_port(kind))));
            admins.push(NETNS_ADMIN);
        } else {
            addrs.push(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                free(kind == TransportKind::Quic)?,
            )));
            admins.push(free(false)?);
        }
    }
    drop(held);
    let mut configs = Vec::new();
    for i in 0..n {
        let p = provider(i);
        // Every follower's users take part in every room of the hub; in a hostile row the
        // flooder's (the last follower's) only in a room of its own.
        let follows = if i == 0 || mls {
            String::new()
        } else if hostile && i == n - 1 {
            format!("follows = [\"{FLOOD_ROOM}\"]\n")
        } else {
            let rooms: Vec<String> = (0..rooms).map(|r| format!("\"{}\"", room_id(r))).collect();
            format!("follows = [{}]\n", rooms.join(", "))
        };
        let mut t = format!(
            "[node]\ndomain = \"{p}\"\ndata_dir = \"data/{p}\"\nadmin = \"127.0.0.1:{}\"\nstore = \"{store}\"\n{follows}\n\
             [tls]\ncert = \"certs/{p}.crt\"\nkey = \"certs/{p}.key\"\n\n[listen]\n{kind} = \"{}\"\n",
            admins[i], addrs[i]
        );
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                let q = provider(j);
                let _ = write!(
                    t,
                    "\n[[peers]]\ndomain = \"{q}\"\ntransport = \"{kind}\"\naddress = \"{a}\"\ncert = \"certs/{q}.crt\"\n"
                );
            }
        }
        if kind == TransportKind::Quic {
            let _ = write!(t, "\n[quic]\ncongestion = \"{}\"\n", opts.quic_cc);
        }
        // Written out even when it is the default, so the config says what the row ran with.
        if let Some(n) = inflight_of(kind.as_str(), opts) {
            let _ = write!(t, "\n[pipeline]\n{kind} = {n}\n");
        }
        if i == 0 {
            let members = if hostile { 1..n - 1 } else { 1..n };
            let followers: Vec<String> = members.map(|j| format!("\"{}\"", provider(j))).collect();
            for r in 0..rooms {
                let _ = write!(
                    t,
                    "\n[[rooms]]\nid = \"{}\"\nfollowers = [{}]\n",
                    room_id(r),
                    followers.join(", ")
                );
            }
            if hostile {
                let _ = write!(
                    t,
                    "\n[[rooms]]\nid = \"{FLOOD_ROOM}\"\nfollowers = [\"{}\"]\n{}",
                    provider(n - 1),
                    hostile::LIMITS.toml()
                );
            }
        }
        let path = dir.join(format!("{p}.toml"));
        std::fs::write(&path, t)?;
        configs.push(path);
    }
    let _ = admins;
    Ok(configs)
}

/// How the lab reaches one node's API, which listens on its own namespace's loopback: with
/// sockets opened in that namespace (they stay there, whichever thread then uses them), so
/// that no proxy in between spends the lab's CPU on copies.
#[derive(Clone)]
struct Admin {
    addr: SocketAddr,
    connector: Option<relay_node::client::Connector>,
}

impl Admin {
    /// Reads a node's API address from its config; in namespace `i` when there is a lab.
    fn of_node(config: &Path, lab: Option<&NetLab>, i: usize) -> Result<Admin> {
        let addr = relay_node::NodeConfig::load(config)?.admin;
        let connector = lab.map(|lab| -> relay_node::client::Connector {
            let path = lab.path(i);
            Arc::new(move |addr| {
                netlab::in_namespace(&path, move || {
                    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    s.set_nodelay(true)?;
                    Ok(s)
                })
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
            })
        });
        Ok(Admin { addr, connector })
    }

    fn client(&self) -> LocalClient {
        let c = LocalClient::new(self.addr);
        match &self.connector {
            Some(f) => c.with_connector(f.clone()),
            None => c,
        }
    }
}

async fn wait_healthy(nodes: &mut Nodes, admins: &[Admin]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, admin) in admins.iter().enumerate() {
        let mut client = admin.client().with_timeout(Duration::from_secs(2));
        loop {
            if let Ok((s, _)) = client.get("/healthz").await
                && s.is_success()
            {
                break;
            }
            if let Some(status) = nodes.children[i].try_wait()? {
                bail!(
                    "{} exited with {status} at start: {}",
                    provider(i),
                    nodes.log_tail(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become healthy: {}",
                    provider(i),
                    nodes.log_tail(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A closed loop's limits for `drive`.
#[derive(Clone)]
struct ClosedLoop {
    rx: Arc<Mutex<Rx>>,
    /// Deliveries that complete one message (one per follower).
    receivers: u64,
    /// Messages per room in flight, at most.
    window: u64,
}

/// Submits messages into every room until `until`: open loop at `rate` (spread over rooms) or
/// closed loop. Returns the messages accepted. Like a provider's front end, it hands the hub
/// everything it has in one `submitBatch` call at a time (at most `batch_max` messages):
/// in the open loop every message already due, each with its own scheduled time, in the
/// closed loop what the rooms' windows have room for. Calls go one after another and each
/// room's messages in order, so their order at every follower must be that of their counters.
#[allow(clippy::too_many_arguments)]
async fn drive(
    hub: &Admin,
    rooms: usize,
    rate: Option<f64>,
    until: Instant,
    sizes: &SizeMix,
    epoch: Instant,
    counters: &Arc<Vec<AtomicU64>>,
    accepted: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
    window: Option<ClosedLoop>,
    batch_max: u64,
    lags_us: Option<&Mutex<LabLags>>,
) -> Result<u64> {
    let room_ids: Vec<String> = (0..rooms).map(room_id).collect();
    let mut rngs: Vec<u64> = (0..rooms)
        .map(|r| 0x2545_f491_4f6c_dd1d ^ ((r as u64 + 1) << 20))
        .collect();
    let mut client = hub.client();
    let start = Instant::now();
    let interval = rate.map(|rate| Duration::from_secs_f64(rooms as f64 / rate.max(1e-3)));
    // Open loop: message k of room r is due at `start + offset(r) + k * interval`, the rooms'
    // schedules staggered over one interval.
    let due =
        |r: usize, k: u32| interval.map(|i| start + i.mul_f64(r as f64 / rooms as f64) + i * k);
    let mut next_k = vec![0u32; rooms];
    let mut first_room = 0usize;
    let batch_max = batch_max.max(1) as usize;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        // (room, scheduled time) of each message to hand over now; rooms take turns first.
        let mut picks: Vec<(usize, Instant)> = Vec::new();
        let mut wake = None;
        if let Some(c) = &window {
            if now >= until {
                break;
            }
            let t = lock(&c.rx);
            for r in (0..rooms).map(|i| (first_room + i) % rooms) {
                let sent = counters[r].load(Ordering::Relaxed);
                let done = t.per_stream.get(&(r as u32)).copied().unwrap_or(0) / c.receivers;
                let free = (c.window + done).saturating_sub(sent) as usize;
                let n = free.min(batch_max - picks.len());
                picks.extend(std::iter::repeat_n((r, now), n));
            }
            wake = Some(t.progress.clone());
        } else {
            let mut next_due: Option<Instant> = None;
            for r in (0..rooms).map(|i| (first_room + i) % rooms) {
                while let Some(at) = due(r, next_k[r]).filter(|at| *at < until) {
                    if at > now || picks.len() == batch_max {
                        next_due = Some(next_due.map_or(at, |d| d.min(at)));
                        break;
                    }
                    picks.push((r, at));
                    next_k[r] += 1;
                }
            }
            if picks.is_empty() {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => break, // every room's schedule has ended
                }
                continue;
            }
        }
        if picks.is_empty() {
            // Every window is full: wait for the readers to record a delivery.
            if let Some(w) = wake {
                let _ = tokio::time::timeout(Duration::from_millis(5), w.notified()).await;
            }
            continue;
        }
        first_room = (first_room + 1) % rooms;
        let mut batch = Vec::with_capacity(picks.len());
        let scheds: Vec<Instant> = picks.iter().map(|p| p.1).collect();
        for (r, sched) in picks {
            let sched_ns = sched.duration_since(epoch).as_nanos() as u64;
            let counter = counters[r].fetch_add(1, Ordering::Relaxed) as u32;
            let size = sizes.pick(&mut rngs[r]);
            let ct = ciphertext(
                marker_bytes(r as u32, counter, sched_ns),
                size,
                &mut rngs[r],
            );
            batch.push((
                room_ids[r].as_str(),
                submit_body("a.example", r as u32, &ct)?,
            ));
        }
        // Calls of at most CALL_BYTES, under the node's body limit (1 MiB by default).
        let mut rest = &batch[..];
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = rest
                .iter()
                .take_while(|(_, b)| {
                    bytes += b.len();
                    bytes <= CALL_BYTES
                })
                .count()
                .max(1);
            if let Some(lags) = lags_us {
                // How late the call starts for each message it carries: in open loop a call
                // waits for the one before (its answer comes once the hub's batch is durable).
                let now = Instant::now();
                let first = batch.len() - rest.len();
                lock(lags).driver.extend(
                    scheds[first..first + n]
                        .iter()
                        .map(|s| now.saturating_duration_since(*s).as_micros() as u64),
                );
            }
            let call = Instant::now();
            let done = submit_in_order(&mut client, &rest[..n], stop).await?;
            if let Some(lags) = lags_us {
                // The call's round trip, once per message it carried: the hub's HTTP API, its
                // core and its commit, as the lab's client sees them.
                let us = call.elapsed().as_micros() as u64;
                lock(lags).api_call.extend(std::iter::repeat_n(us, n));
            }
            accepted.fetch_add(done as u64, Ordering::Relaxed);
            if done < n {
                return Ok(accepted.load(Ordering::Relaxed)); // stopped while the hub refused
            }
            rest = &rest[n..];
        }
    }
    Ok(accepted.load(Ordering::Relaxed))
}

/// Per-message values the driver records for the lab's own stages (µs).
#[derive(Default)]
pub(crate) struct LabLags {
    pub driver: Vec<u64>,
    pub api_call: Vec<u64>,
}

/// Submits `batch` of (room, SubmitMessageRequest), retrying refusals for a bounded time. A
/// retry starts at the first refused message: those after it that were accepted are answered
/// from the hub's dedupe window, never fanned out twice. Returns how many were accepted: all
/// of them, unless `stop` came first.
async fn submit_in_order(
    client: &mut LocalClient,
    batch: &[(&str, Bytes)],
    stop: &AtomicBool,
) -> Result<usize> {
    let refused_since = Instant::now();
    let mut rest = batch;
    loop {
        let why = match client.submit_batch(rest).await {
            Ok(answers) => match answers.iter().position(|(s, b)| !accepted_response(*s, b)) {
                None => return Ok(batch.len()),
                Some(i) => {
                    rest = &rest[i..];
                    let (s, b) = &answers[i];
                    format!("{s}: {}", String::from_utf8_lossy(b))
                }
            },
            Err(e) => format!("{e:#}"),
        };
        if stop.load(Ordering::Relaxed) {
            return Ok(batch.len() - rest.len());
        }
        if refused_since.elapsed() > SUBMIT_PATIENCE {
            bail!(
                "the hub refused a message of {} for {SUBMIT_PATIENCE:?}: {why}",
                rest[0].0
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn accepted_response(status: hyper::StatusCode, body: &[u8]) -> bool {
    status == hyper::StatusCode::OK
        && matches!(
            mimi_wire::proto::SubmitMessageResponse::decode(body).map(|r| r.status),
            Ok(mimi_wire::proto::SubmitStatus::Accepted { .. })
        )
}

/// Inbox readers: one per measured follower (receiver index = follower - 1), plus ones that
/// drain the hub's own inbox and any unmeasured follower's, so that none fills.
fn start_readers(
    admins: &[Admin],
    measured: usize,
    rx: &Arc<Mutex<Rx>>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut v = tokio::task::JoinSet::new();
    for (i, admin) in admins.iter().cloned().enumerate() {
        let rx = rx.clone();
        let stop = stop.clone();
        v.spawn(async move {
            let mut client = admin.client();
            let mut after = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match client.inbox(after, 4096, 100).await {
                    Ok(items) => {
                        let now = Instant::now();
                        if i == 0 || i > measured {
                            if let Some(last) = items.last() {
                                after = after.max(last.offset);
                            }
                            continue;
                        }
                        let mut t = lock(&rx);
                        for item in items {
                            after = after.max(item.offset);
                            if let Some((s, c, sched)) = find_marker(&item.fanout) {
                                t.record(i - 1, s, c, sched, now);
                            }
                        }
                        t.progress.notify_one();
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
    }
    v
}

/// Request bytes per submitBatch call, at most (one larger request still goes alone).
const CALL_BYTES: usize = 256 * 1024;

/// How long a sender retries a refused message before the row fails.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `expected` deliveries or the settle time; returns whether all arrived.
async fn settle(rx: &Arc<Mutex<Rx>>, expected: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if lock(rx).delivered >= expected {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// One relay transport under one profile.
#[allow(clippy::too_many_arguments)]
async fn run_relay(
    kind: TransportKind,
    variant: Variant,
    work: &Path,
    opts: &BenchOptions,
    profile: &Profile,
    lab: Option<&NetLab>,
    epoch: Instant,
    launcher: &Launcher,
    placement: Option<&hostile::Placement>,
    row: &mut Row,
    progress: &Progress,
    label: &str,
) -> Result<()> {
    // Hostile rows: the victim (b.example, measured) and the flooder's own node (c.example).
    let (n, receivers) = match variant {
        Variant::Normal => (1 + opts.followers, opts.followers),
        Variant::Quiet | Variant::Flood => (3, 1),
    };
    if variant != Variant::Normal {
        row.followers = n - 1;
    }
    let dir = work.to_path_buf();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let configs = prepare(&dir, kind, n, opts, lab.is_some(), variant)?;
    let mut nodes = Nodes {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let started = Instant::now();
    for (i, cfg) in configs.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("{}.log", provider(i))))?;
        let mut cmd = match lab {
            Some(lab) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", lab.namespace(i)])
                    .arg(&launcher.program);
                c
            }
            None => Command::new(&launcher.program),
        };
        cmd.args(&launcher.args)
            .arg(cfg)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &launcher.env {
            cmd.env(k, v);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        // Hostile rows: the flooding provider's node is the attacker's, the rest honest.
        let cpus = placement.map(|p| match variant {
            Variant::Quiet | Variant::Flood if i == n - 1 => &p.attacker[..],
            _ => &p.honest[..],
        });
        let child = hostile::spawn_pinned(&mut cmd, cpus).context("starting a node")?;
        if variant != Variant::Normal {
            let role = match i {
                0 => "hub",
                1 => "victim",
                _ => "flooder_node",
            };
            if let Some(list) = hostile::allowed(&format!("/proc/{}/status", child.id())) {
                row.cpus.insert(role.to_owned(), list);
            }
        }
        nodes.children.push(child);
    }
    if variant != Variant::Normal
        && let Some(list) = hostile::allowed("/proc/thread-self/status")
    {
        row.cpus.insert("lab".to_owned(), list);
    }
    let mut admins = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        admins.push(Admin::of_node(cfg, lab, i)?);
    }
    progress.line(&format!("{label} starting {n} nodes"));
    wait_healthy(&mut nodes, &admins).await?;
    let startup = started.elapsed();
    if opts.traffic == Traffic::Mls && variant == Variant::Normal {
        let pids: Vec<u32> = nodes.children.iter().map(Child::id).collect();
        let before = stages::Scrape::of(&admins, receivers).await;
        let r = mls::run(
            &admins, &pids, opts, profile, lab, epoch, row, progress, label,
        )
        .await;
        if r.is_ok() {
            row.stages = stages::Scrape::of(&admins, receivers).await.since(&before);
        }
        nodes.stop();
        if r.is_ok() && !opts.keep && row.lost == Some(0) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return r;
    }

    let rx = Arc::new(Mutex::new(Rx::new(epoch, receivers)?));
    let stop_readers = Arc::new(AtomicBool::new(false));
    let readers = start_readers(&admins, receivers, &rx, &stop_readers);
    let counters: Arc<Vec<AtomicU64>> =
        Arc::new((0..opts.rooms).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));

    // Setup: the first message of the run opens the hub's connection to each follower; its
    // latency (submit to delivery at every follower) is the setup time.
    {
        let room: RoomId = room_id(0).parse().map_err(|e| anyhow!("room id: {e}"))?;
        let mut client = admins[0].client();
        let mut rng = 7u64;
        let t0 = Instant::now();
        let ct = ciphertext(
            marker_bytes(PROBE_STREAM, 0, t0.duration_since(epoch).as_nanos() as u64),
            opts.sizes.app,
            &mut rng,
        );
        let body = submit_body("a.example", 0, &ct)?;
        let deadline = t0 + Duration::from_secs(30);
        loop {
            match client.submit(&room, body.clone()).await {
                Ok((s, b)) if accepted_response(s, &b) => break,
                _ if Instant::now() > deadline => bail!("the setup message was not accepted"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        if !settle(&rx, receivers as u64, Duration::from_secs(30)).await {
            // Whether packets cross the lab's link at all tells a dead link from a slow relay.
            bail!(
                "the setup message did not reach every follower within 30 s{}",
                netlab::link_note(lab)
            );
        }
        let last = lock(&rx).last_delivery.unwrap_or(t0);
        row.setup_ms = Some(last.duration_since(t0).as_secs_f64() * 1e3);
        lock(&rx).new_phase();
    }

    // The measured phase.
    let pids: Vec<u32> = nodes.children.iter().map(Child::id).collect();
    let cpu0 = CpuSnap::now(&pids);
    let machine0 = hostile::MachineCpu::now(&pids);
    let link0 = lab.map(NetLab::snapshot).unwrap_or_default();
    if let Some(lab) = lab {
        lab.take_drops();
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let stages_before = stages::Scrape::of(&admins, receivers).await;
    let lags = Mutex::new(LabLags::default());
    let flood = match variant {
        Variant::Flood => {
            progress.line(&format!("{label} starting the flood"));
            let mut target = flood_target(kind, &configs, lab)?;
            target.cpus = placement.map(|p| p.attacker.clone());
            Some(hostile::Flood::start(target)?)
        }
        _ => None,
    };
    let until = Instant::now() + opts.duration;
    let drive_fut = drive(
        &admins[0],
        opts.rooms,
        opts.rate,
        until,
        &opts.sizes,
        epoch,
        &counters,
        &accepted,
        &stop,
        opts.rate.is_none().then(|| ClosedLoop {
            rx: rx.clone(),
            receivers: receivers as u64,
            window: opts.window,
        }),
        opts.submit_batch,
        Some(&lags),
    );
    tokio::pin!(drive_fut);
    let phase_start = Instant::now();
    let sent = loop {
        tokio::select! {
            r = &mut drive_fut => break r?,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                let d = lock(&rx).delivered;
                progress.line(&format!(
                    "{label} {:.1}/{:.0} s  accepted {}  delivered {}",
                    phase_start.elapsed().as_secs_f64().min(opts.duration.as_secs_f64()),
                    opts.duration.as_secs_f64(),
                    accepted.load(Ordering::Relaxed),
                    d
                ));
            }
        }
    };
    if let Some(f) = flood {
        progress.line(&format!("{label} stopping the flood"));
        let counts = f.stop().await;
        if let Some(list) = &counts.flooder_cpus {
            row.cpus.insert("flooder".to_owned(), list.clone());
        }
        row.flood = Some(counts);
    }
    let expected = sent * receivers as u64;
    progress.line(&format!("{label} waiting for the last deliveries"));
    settle(&rx, expected, opts.settle).await;
    // A moment more, so that late duplicates would be seen.
    tokio::time::sleep(Duration::from_millis(200)).await;
    row.stages = stages::Scrape::of(&admins, receivers)
        .await
        .since(&stages_before);
    {
        let mut l = lock(&lags);
        row.stages
            .extend(stages::lab_figure("driver", &mut l.driver));
        row.stages
            .extend(stages::lab_figure("api_call", &mut l.api_call));
    }
    if variant != Variant::Normal {
        // A node that died under the flood fails the row, with the end of its log.
        for (i, c) in nodes.children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "{} exited with {status} during the row: {}",
                    provider(i),
                    nodes.log_tail(i).replace('\n', " | ")
                );
            }
        }
        row.hub_peak_rss_bytes = nodes
            .children
            .first()
            .and_then(|c| hostile::peak_rss(c.id()));
        let mut client = admins[0].client().with_timeout(Duration::from_secs(5));
        if let Ok((s, body)) = client.get("/metrics").await
            && s.is_success()
        {
            row.hub_refusals = hostile::refusal_metrics(&String::from_utf8_lossy(&body));
        }
    }
    let cpu1 = CpuSnap::now(&pids);
    if variant != Variant::Normal
        && let (Some(a), Some(b)) = (machine0, hostile::MachineCpu::now(&pids))
    {
        row.cpu = Some(b.since(&a));
    }
    let link = lab.map(NetLab::snapshot).unwrap_or_default().since(link0);
    let drops = lab.map(NetLab::take_drops).unwrap_or_default();
    {
        let t = lock(&rx);
        row.sent = sent;
        row.delivered = t.delivered;
        fill_latency(row, &t, &drops, profile, epoch);
        cpu0.fill(&cpu1, t.delivered, row);
        if t.delivered > 0 && lab.is_some() {
            row.wire_bytes_per_msg = Some(link.bytes as f64 / t.delivered as f64);
        }
        row.link_drops = lab.map(|_| link.dropped);
        row.socket_drops = link.socket_drops;
    }
    let mut lost = expected.saturating_sub(lock(&rx).delivered);

    // Recovery: traffic at a low rate, the link cut for 5 s, then restored; the recovery time
    // runs from the restore until every message scheduled before it has been delivered.
    if let (Some(lab), true, Variant::Normal) = (lab, opts.recovery, variant) {
        lock(&rx).new_phase();
        // Low enough for the worst profile's carrier (QUIC in `bad` delivers ~50 msg/s).
        let rate = Some(20.0);
        let accepted2 = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let until2 = t0 + Duration::from_secs(8);
        let cut_at = t0 + Duration::from_secs(1);
        let restore_at = cut_at + Duration::from_secs(5);
        let f = drive(
            &admins[0],
            opts.rooms,
            rate,
            until2,
            &opts.sizes,
            epoch,
            &counters,
            &accepted2,
            &stop,
            None,
            opts.submit_batch,
            None,
        );
        tokio::pin!(f);
        let mut cut = false;
        let mut restored = false;
        let sent2 = loop {
            tokio::select! {
                r = &mut f => break r?,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    let now = Instant::now();
                    if !cut && now >= cut_at { lab.set_cut(true); cut = true; }
                    if cut && !restored && now >= restore_at { lab.set_cut(false); restored = true; }
                    progress.line(&format!("{label} recovery: link {}", if cut && !restored { "cut" } else { "up" }));
                }
            }
        };
        lab.set_cut(false);
        let expected2 = sent2 * receivers as u64;
        let all = settle(&rx, expected2, opts.settle.max(Duration::from_secs(30))).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = lock(&rx);
        lost += expected2.saturating_sub(t.delivered);
        if all {
            row.recovery_ms = recovery_ms(&t.samples, epoch, restore_at);
        }
        row.sent += sent2;
    }

    stop.store(true, Ordering::Relaxed);
    stop_readers.store(true, Ordering::Relaxed);
    let mut readers = readers;
    while readers.join_next().await.is_some() {}
    {
        let t = lock(&rx);
        row.lost = Some(lost);
        row.duplicated = Some(t.duplicated);
        row.out_of_order = Some(t.out_of_order);
    }
    nodes.stop();
    if !opts.keep && row.lost == Some(0) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = startup;
    Ok(())
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

    #[test]
    fn marker_round_trips_inside_a_ciphertext() {
        let mut rng = 1;
        let ct = ciphertext(marker_bytes(3, 77, 123_456_789), 1024, &mut rng);
        assert_eq!(ct.len(), 1024);
        let body = submit_body("a.example", 3, &ct).unwrap();
        assert_eq!(find_marker(&body), Some((3, 77, 123_456_789)));
    }

    #[test]
    fn size_mix_has_the_configured_shares() {
        let mix = SizeMix::default();
        let mut rng = 99;
        let n = 100_000;
        let sizes: Vec<usize> = (0..n).map(|_| mix.pick(&mut rng)).collect();
        let app = sizes.iter().filter(|s| **s == mix.app).count() as f64 / n as f64;
        let welcome = sizes.iter().filter(|s| **s >= mix.welcome.0).count() as f64 / n as f64;
        assert!((app - 0.95).abs() < 0.01, "app share {app}");
        assert!((welcome - 0.01).abs() < 0.003, "welcome share {welcome}");
    }

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
