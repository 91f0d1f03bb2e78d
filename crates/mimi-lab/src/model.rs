//! The lab's options and results: what a run is asked to do (sizes, network profiles, the
//! hostile scenario's limits) and the rows and report it produces (the JSON of
//! `results.json`). Plain data and pure arithmetic: no I/O, and nothing of the rest of the lab,
//! so that a reader of the results needs only this module.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_core::TransportKind;
use serde::Serialize;

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
    pub(crate) fn pick(&self, rng: &mut u64) -> usize {
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

pub(crate) fn unit(rng: &mut u64) -> f64 {
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
    /// `--hostile flood`: each relay transport runs quiet and flooded (see the `hostile` module).
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
    /// `--mls-encrypt ahead`: senders encrypt their messages before the measured phase.
    pub mls_ahead: bool,
    /// `--mls-frank`: application messages are franked MIMI content.
    pub mls_frank: bool,
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
            mls_ahead: false,
            mls_frank: false,
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
    /// mls traffic: the hub's franks the receivers verified (those that did not verify count
    /// in `decrypt_failures`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub franks_verified: Option<u64>,
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
    /// mls traffic: `inline` or `ahead` (see `--mls-encrypt`), and with ahead the messages
    /// submitted from the pools encrypted before the phase (the rest were encrypted inline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mls_encrypt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted_ahead: Option<u64>,
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
    pub cpu: Option<CpuShares>,
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
    pub(crate) fn empty(transport: &str, profile: &str, net: &str, opts: &BenchOptions) -> Row {
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
            franks_verified: None,
            retries: None,
            mls_msg_bytes: None,
            commits: None,
            commits_refused: None,
            commit_kinds: BTreeMap::new(),
            mls_decrypt: None,
            decrypted_after_phase: None,
            mls_encrypt: None,
            encrypted_ahead: None,
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

    /// Nothing lost, nothing twice, nothing out of order (gaps and errors are not clean).
    pub fn is_clean(&self) -> bool {
        self.status == "ok"
            && self.lost == Some(0)
            && self.duplicated == Some(0)
            && self.out_of_order == Some(0)
            && self.decrypt_failures.unwrap_or(0) == 0
    }
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
    pub placement: Option<Placement>,
    /// What the run left out, and why.
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
}

/// Delay, loss, reordering and rate of a link, applied to each direction independently.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub name: String,
    /// Round-trip time added (half each way).
    pub rtt_ms: f64,
    /// Share of packets lost in each direction, 0..1.
    pub loss: f64,
    /// Mean length of a loss burst in packets (1 = independent losses).
    pub burst: f64,
    /// Longest a loss burst lasts in time; None = counted in packets only (netem's gemodel).
    /// A burst stands for a fade of the link: counted only in packets, one that hits a
    /// connection with little in flight also swallows retransmissions sent seconds later.
    pub burst_ms: Option<f64>,
    /// Share of packets sent without the delay, so that they overtake (netem's reorder).
    pub reorder: f64,
    /// Bandwidth cap per direction; None = uncapped.
    pub rate_mbit: Option<f64>,
}

impl Profile {
    /// The named profiles: lan, wan (40 ms RTT), lossy (40 ms, 1%), bad (100 ms, 5% in bursts
    /// of 3 packets, each over within 50 ms). The quic-interop-runner's simulator scenarios use
    /// the same kinds of knobs.
    pub fn named(name: &str) -> Option<Profile> {
        let p = |rtt_ms, loss, burst, burst_ms| Profile {
            name: name.to_owned(),
            rtt_ms,
            loss,
            burst,
            burst_ms,
            reorder: 0.0,
            rate_mbit: None,
        };
        Some(match name {
            "lan" => p(0.0, 0.0, 1.0, None),
            "wan" => p(40.0, 0.0, 1.0, None),
            "lossy" => p(40.0, 0.01, 1.0, None),
            "bad" => p(100.0, 0.05, 3.0, Some(BAD_BURST_MS)),
            _ => return None,
        })
    }

    pub fn is_impaired(&self) -> bool {
        self.rtt_ms > 0.0 || self.loss > 0.0 || self.reorder > 0.0 || self.rate_mbit.is_some()
    }
}

/// How long a burst of `bad` lasts at most: a busy flow still loses its ~3 packets back to
/// back, but a burst cannot also take the retransmissions sent one timeout (200 ms or more)
/// later, which turned single bursts into TCP stalls of 5-15 s (ARCHITECTURE.md).
pub const BAD_BURST_MS: f64 = 50.0;

/// One bucket of the timeline: the messages scheduled in `[t_ms, t_ms + 100)` after the
/// phase's first send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimelinePoint {
    pub t_ms: u64,
    pub n: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One stage on one side of a row over the measured phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageFigure {
    /// `hub`, `follower` (all followers together) or `lab` (the load driver).
    pub node: String,
    pub stage: String,
    /// Items timed: messages, requests, outputs, commits or records (see the report).
    pub n: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub mean_us: Option<f64>,
}

/// `--hostile`: which adversary shares the hub with the measured traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hostile {
    #[default]
    None,
    /// One follower floods the hub at full speed.
    Flood,
}

/// The hub's `[limits]` in hostile rows: written into its config so that the memory budget
/// below is computed from what the hub was actually told.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct HostileLimits {
    pub max_body: usize,
    pub max_peer_bytes: usize,
    pub max_conns_per_peer: usize,
    /// Small, so that partial requests are given up within a short row.
    pub frame_deadline_ms: u64,
    /// The hub's own inbox (its local clients' copy of every room event a peer submitted):
    /// only the flooder's accepted submissions land there, the lab's come from a local client.
    pub max_inbox: usize,
}

pub(crate) const LIMITS: HostileLimits = HostileLimits {
    max_body: 1 << 20,
    max_peer_bytes: 8 << 20,
    max_conns_per_peer: 4,
    frame_deadline_ms: 2_000,
    max_inbox: 64,
};

impl HostileLimits {
    /// Bytes one connection can hold below the adapter's own accounting: the receive window
    /// the transport grants before the adapter reads (HTTPS: hyper's adaptive h2 window, at
    /// most 16 MiB, relay-https/src/server.rs; QUIC: the 16 MiB connection window,
    /// relay-quic/src/lib.rs; Matrix: hyper's default h2 window, counted as HTTPS's since it
    /// is no larger; XMPP: one stanza being scanned, the largest `max_body` as base64 plus
    /// 16 KiB of head).
    pub(crate) fn conn_window(&self, kind: TransportKind) -> u64 {
        match kind {
            TransportKind::Xmpp => (self.max_body as u64).div_ceil(3) * 4 + (16 << 10),
            _ => 16 << 20,
        }
    }

    /// What the configured budgets let the hub's peers make it hold beyond its quiet run:
    /// `peers x max_peer_bytes` (bytes in the adapter and the ingress queue; the ingress
    /// share is at most the same figure) `+ peers x max_conns_per_peer x conn_window`
    /// `+ max_inbox x max_body` (peer submissions the hub's own inbox keeps).
    pub(crate) fn allowance(&self, kind: TransportKind, peers: u64) -> u64 {
        peers * self.max_peer_bytes as u64
            + peers * self.max_conns_per_peer as u64 * self.conn_window(kind)
            + self.max_inbox as u64 * self.max_body as u64
    }
}

/// The targets of a hostile row (issue 14): the flooded run of the victim keeps at least this
/// share of its quiet throughput, and its p99 at most this multiple.
pub(crate) const RATE_TARGET: f64 = 0.8;

pub(crate) const P99_TARGET: f64 = 2.0;

/// What the flooder sent and how the hub answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloodCounts {
    /// Requests sent (an XMPP stanza, a QUIC frame, an HTTP request, a Matrix EDU).
    pub sent: u64,
    /// Connections the flooder opened (TLS or QUIC handshakes completed).
    pub connections: u64,
    /// Answered 2xx and, for a submission, accepted.
    pub accepted: u64,
    /// Answered 200 with a refusal inside (a submission to a room it is not a member of).
    pub refused_2xx: u64,
    pub refused_4xx: u64,
    pub refused_5xx: u64,
    /// Ended by the hub with no answer: stream resets, XMPP stream errors, connections closed
    /// or refused at the connection cap.
    pub reset: u64,
    /// Every answer by status code or by how the stream ended.
    pub by_outcome: BTreeMap<String, u64>,
    /// CPU the flooder's thread used over the flood, in ms.
    pub flooder_cpu_ms: Option<u64>,
    /// The CPUs the flooder's thread could run on (`Cpus_allowed_list`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flooder_cpus: Option<String>,
}

impl FloodCounts {
    /// Refusals of every kind: the hub turned the request away.
    pub fn refused(&self) -> u64 {
        self.refused_2xx + self.refused_4xx + self.refused_5xx + self.reset
    }

    /// Adds another run's counts.
    pub(crate) fn add(&mut self, o: &FloodCounts) {
        self.sent += o.sent;
        self.connections += o.connections;
        self.accepted += o.accepted;
        self.refused_2xx += o.refused_2xx;
        self.refused_4xx += o.refused_4xx;
        self.refused_5xx += o.refused_5xx;
        self.reset += o.reset;
        for (k, v) in &o.by_outcome {
            *self.by_outcome.entry(k.clone()).or_default() += v;
        }
        self.flooder_cpu_ms = match (self.flooder_cpu_ms, o.flooder_cpu_ms) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        if self.flooder_cpus.is_none() {
            self.flooder_cpus.clone_from(&o.flooder_cpus);
        }
    }
}

/// Where the machine's CPU went over a phase, as shares of all its cores' time.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuShares {
    /// Busy, by anything.
    pub machine_busy: f64,
    /// The hub process.
    pub hub: f64,
    /// All the row's nodes.
    pub nodes: f64,
    /// The lab process: driver, readers and, in a flooded row, the flooder.
    pub lab: f64,
    /// Everything else (another job on a shared host competes for the same cores).
    pub others: f64,
}

impl CpuShares {
    /// The mean of several runs' shares.
    pub(crate) fn mean(runs: &[&CpuShares]) -> Option<CpuShares> {
        let n = runs.len() as f64;
        let avg = |f: fn(&CpuShares) -> f64| runs.iter().map(|c| f(c)).sum::<f64>() / n;
        (!runs.is_empty()).then(|| CpuShares {
            machine_busy: avg(|c| c.machine_busy),
            hub: avg(|c| c.hub),
            nodes: avg(|c| c.nodes),
            lab: avg(|c| c.lab),
            others: avg(|c| c.others),
        })
    }
}

/// Which CPUs each side of a hostile row had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The hub, the victim's node, the lab's driver and readers, and the link forwarder (the
    /// kernel's work for a packet runs where the forwarder writes it, so the flood's packets
    /// are received on these CPUs, as they would be on the hub's machine).
    pub honest: Vec<usize>,
    /// The flooder's thread and the flooding provider's own node (c.example).
    pub attacker: Vec<usize>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
