//! The `mimi-relay bench` arguments.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

use super::{BenchOptions, Hostile, NetMode, Profile, SizeMix, Traffic};
use crate::fleet::Launcher;

/// Compare the transports under the same load and network conditions.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Transports to compare, comma-separated: https, quic, xmpp, matrix, and the baselines
    /// bare-quinn and bare-tls.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "https,quic,xmpp,matrix,bare-quinn,bare-tls"
    )]
    pub transports: Vec<String>,
    /// Network profiles, comma-separated: lan, wan (40 ms RTT), lossy (40 ms, 1%), bad
    /// (100 ms, 5% in bursts of 3 packets, each over within 50 ms), custom (from --delay-ms,
    /// --loss, --burst, --burst-ms, --rate-mbit).
    #[arg(long, value_delimiter = ',', default_value = "lan")]
    pub profile: Vec<String>,
    /// Rooms hosted by the hub (a.example).
    #[arg(long, default_value_t = 16)]
    pub rooms: usize,
    /// Follower providers, members of every room besides the hub.
    #[arg(long, default_value_t = 1)]
    pub followers: usize,
    /// Open-loop arrival rate over all rooms, messages/s; 0 = closed loop (maximum throughput).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Closed loop: messages per room in flight (sent, not yet delivered everywhere), at most.
    #[arg(long, default_value_t = 64)]
    pub window: u64,
    /// Most messages the driver hands the hub in one submitBatch call: those already due
    /// (open loop) or that the rooms' windows have room for (closed loop).
    #[arg(long, default_value_t = 1024)]
    pub submit_batch: u64,
    /// Seconds of the measured phase of each row.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Runs of every row, interleaved (each round runs every transport once, the next round
    /// starting one transport further on); the report gives each figure's median.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Application message size (MLS ciphertext bytes).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Share of commit-sized messages (1.5-4 KiB).
    #[arg(long, default_value_t = 0.04)]
    pub commit_share: f64,
    /// Share of Welcome-sized messages (8-32 KiB).
    #[arg(long, default_value_t = 0.01)]
    pub welcome_share: f64,
    /// Node store: memory or durable.
    #[arg(long, default_value = "memory")]
    pub store: String,
    /// Where nodes run: auto (namespaces when root), loopback, netns.
    #[arg(long, default_value = "auto", value_parser = ["auto", "loopback", "netns"])]
    pub net: String,
    /// custom profile: round-trip delay in ms.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// custom profile: loss share per direction (0.01 = 1%).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// custom profile: mean loss burst in packets.
    #[arg(long, default_value_t = 1.0)]
    pub burst: f64,
    /// custom profile: longest a loss burst lasts, in ms (0 = counted in packets only, as
    /// netem's gemodel does).
    #[arg(long, default_value_t = 0.0)]
    pub burst_ms: f64,
    /// custom profile: share of packets reordered (sent without the delay).
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// custom profile: bandwidth cap per direction, Mbit/s.
    #[arg(long)]
    pub rate_mbit: Option<f64>,
    /// Skip the cut-link recovery phase.
    #[arg(long)]
    pub no_recovery: bool,
    /// Output directory: results.json, report.md, plots.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Keep the nodes' working directories (OUT/work).
    #[arg(long)]
    pub keep: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Congestion controller of QUIC (the relay's and bare quinn's): bbr, cubic or new_reno;
    /// the relay's default when not given.
    #[arg(long)]
    pub quic_cc: Option<String>,
    /// A hostile peer: `flood` runs each relay transport twice with two followers, quiet and
    /// while the second follower's identity floods the hub with oversize, malformed and
    /// valid-but-expensive requests; the first follower's traffic is measured in both (the
    /// baselines are skipped, and --followers does not apply).
    #[arg(long, default_value = "none", value_parser = ["none", "flood"])]
    pub hostile: String,
    /// Transmits in flight per (room, destination) for every relay transport (1 to 4096);
    /// without it each keeps its default (HTTPS 1, QUIC 64, XMPP 8, Matrix 8). Every row
    /// states the limit it ran with.
    #[arg(long)]
    pub inflight: Option<u32>,
    /// What the relay rows carry: `synthetic` (random bytes in a PrivateMessage frame, the hub
    /// the only sender) or `mls` (one openmls client per provider and room: every provider
    /// encrypts and sends into every room, every member decrypts, commits move the epochs
    /// on; --size is then the plaintext size). The baselines and --hostile rows are synthetic.
    #[arg(long, default_value = "mls", value_parser = ["synthetic", "mls"])]
    pub traffic: String,
    /// `--traffic mls`: commits per second over all rooms, in turn a self-update by a random
    /// member, an add or remove of a spare client (key claim, Welcome, AppDataUpdate) and a
    /// role change (AppDataUpdate).
    #[arg(long, default_value_t = 1.0)]
    pub commit_rate: f64,
    /// `--traffic mls`: when receivers decrypt. `inline`: each inbox batch as it arrives.
    /// `deferred`: a message is recorded when it arrives (identified by its ciphertext's
    /// digest) and decrypted later, at the next commit or Welcome of its room or after the
    /// phase, so that the clients' openmls work does not share the CPU with the nodes while
    /// the rate is measured; every message is still decrypted, its plaintext checked and
    /// failures counted.
    #[arg(long, default_value = "inline", value_parser = ["inline", "deferred"])]
    pub mls_decrypt: String,
    /// `--traffic mls`: when senders encrypt. `inline`: each message when it is due.
    /// `ahead`: before the measured phase, every sender encrypts its rooms' messages for the
    /// current epochs (the open loop's whole schedule, or 100,000 per second of the phase in a
    /// closed loop), so that a replay of real MLS bytes is timed, as tcpreplay times a
    /// capture. The phase's commits are planned then too, on copies of the members' clients
    /// that apply each commit and encrypt the pools of the epoch it starts; a client takes
    /// its copy's state when the commit happens. A pool that runs dry, or a room whose plan
    /// failed, is encrypted inline. Each row says how many messages came from the pools.
    #[arg(long, default_value = "inline", value_parser = ["inline", "ahead"])]
    pub mls_encrypt: String,
    /// `--traffic mls`: application messages are MIMI content (draft-ietf-mimi-content)
    /// asserting their sender and room, with the franking tag in the AAD, so that the hub
    /// franks each (protocol-06 §5.4.1: an HMAC and an Ed25519 signature) and every receiver
    /// verifies the frank. Without it they are bare lab payloads the hub does not frank.
    #[arg(long)]
    pub mls_frank: bool,
}

/// Most runs of a row: enough for a median that shrugs off two outliers.
const MAX_REPEAT: usize = 15;

impl BenchArgs {
    pub fn options(&self) -> Result<BenchOptions> {
        let mut profiles = Vec::new();
        for p in &self.profile {
            profiles.push(match p.as_str() {
                "custom" => {
                    if !(0.0..1.0).contains(&self.loss) || self.burst < 1.0 {
                        bail!("--loss must be in [0, 1) and --burst at least 1");
                    }
                    if !self.burst_ms.is_finite() || self.burst_ms < 0.0 {
                        bail!("--burst-ms must be 0 or more");
                    }
                    Profile {
                        name: "custom".into(),
                        rtt_ms: self.delay_ms.max(0.0),
                        loss: self.loss,
                        burst: self.burst,
                        burst_ms: (self.burst_ms > 0.0).then_some(self.burst_ms),
                        reorder: self.reorder.clamp(0.0, 1.0),
                        rate_mbit: self.rate_mbit,
                    }
                }
                name => match Profile::named(name) {
                    Some(p) => p,
                    None => bail!("--profile {name}: expected lan, wan, lossy, bad or custom"),
                },
            });
        }
        for t in &self.transports {
            super::check_transport(t)?;
        }
        let most = relay_node::client::MAX_BATCH as u64;
        if !(1..=most).contains(&self.submit_batch) {
            bail!("--submit-batch must be between 1 and {most}");
        }
        if self.duration.is_nan() || self.duration <= 0.0 {
            bail!("--duration must be positive");
        }
        if !(1..=MAX_REPEAT).contains(&self.repeat) {
            bail!("--repeat must be between 1 and {MAX_REPEAT}");
        }
        if self.inflight.is_some_and(|n| !(1..=4096).contains(&n)) {
            bail!("--inflight must be between 1 and 4096");
        }
        if !self.commit_rate.is_finite() || self.commit_rate < 0.0 {
            bail!("--commit-rate must be 0 or more");
        }
        Ok(BenchOptions {
            inflight: self.inflight,
            traffic: match self.traffic.as_str() {
                "mls" => Traffic::Mls,
                _ => Traffic::Synthetic,
            },
            commit_rate: self.commit_rate,
            mls_deferred: self.mls_decrypt == "deferred",
            mls_ahead: self.mls_encrypt == "ahead",
            mls_frank: self.mls_frank,
            transports: self.transports.clone(),
            profiles,
            rooms: self.rooms,
            submit_batch: self.submit_batch,
            followers: self.followers,
            sizes: SizeMix {
                app: self.size.max(20),
                commit_share: self.commit_share.clamp(0.0, 1.0),
                welcome_share: self.welcome_share.clamp(0.0, 1.0),
                ..SizeMix::default()
            },
            rate: (self.rate > 0.0).then_some(self.rate),
            window: self.window.max(1),
            duration: Duration::from_secs_f64(self.duration),
            repeat: self.repeat,
            store: self.store.clone(),
            net: match self.net.as_str() {
                "loopback" => NetMode::Loopback,
                "netns" => NetMode::Netns,
                _ => NetMode::Auto,
            },
            out: self.out.clone(),
            recovery: !self.no_recovery,
            progress: !self.quiet,
            keep: self.keep,
            settle: Duration::from_secs(30),
            quic_cc: match &self.quic_cc {
                None => relay_quic::Congestion::default(),
                Some(c) => c.parse().map_err(|e| anyhow::anyhow!("--quic-cc: {e}"))?,
            },
            hostile: match self.hostile.as_str() {
                "flood" => Hostile::Flood,
                _ => Hostile::None,
            },
        })
    }
}

/// `mimi-relay bench`: runs the lab, prints the table, fails when any delivery was lost,
/// duplicated or out of order.
pub async fn main(args: BenchArgs, command: String) -> Result<bool> {
    let opts = args.options()?;
    let out = opts.out.clone();
    let report = tokio::select! {
        r = super::run(opts, Launcher::this_binary()?, command) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; nodes stopped and namespaces removed"),
    };
    print!("{}", super::report::table(&report.rows));
    let mls = super::report::mls_table(&report.rows);
    if !mls.is_empty() {
        print!("\n{mls}");
    }
    if report.repeat > 1 {
        print!("\n{}", super::report::runs_table(&report.rows));
    }
    if report.hostile.is_some() {
        print!(
            "\n{}\n\n{}\n{}",
            super::report::placement_words(report.placement.as_ref()),
            super::report::hostile_table(&report.rows),
            super::report::hostile_words(&report.rows, report.hostile.as_ref())
        );
    }
    eprintln!("network: {}", report.net_note);
    eprintln!("wrote {}/results.json, report.md and plots", out.display());
    Ok(report
        .rows
        .iter()
        .filter(|r| r.status == "ok")
        .all(super::Row::is_clean))
}
