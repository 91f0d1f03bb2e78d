//! One lab run: every profile and transport in turn, each row's nodes started, driven,
//! measured and stopped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mimi_wire::uri::RoomId;
use relay_core::TransportKind;

use crate::driver::{
    Admin, ClosedLoop, DriveJob, LabLags, accepted_response, drive_apart, settle, start_readers,
};
use crate::fleet::{self, Launcher};
use crate::hostile::{self, Hostile, Variant};
use crate::model::{BenchOptions, BenchReport, NetMode, Row, Traffic, inflight_of};
use crate::netlab::{self, NetLab, Profile};
use crate::payload::{
    FLOOD_ROOM, PROBE_STREAM, ciphertext, marker_bytes, provider, room_id, submit_body,
};
use crate::stages;
use crate::stats::{CpuSnap, Rx, fill_latency, hostile_figures, recovery_ms};
use crate::{lock, mls, pump, report};

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

/// What the flooder of a hostile row needs: the hub's listener as the flooding follower (the
/// last node) reaches it, that follower's TLS identity from the row's config directory, and
/// the hub's certificate to pin.
pub(crate) fn flood_target(
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
        notes.push(
            if opts.mls_frank {
                "--mls-frank: application messages are MIMI content asserting sender and room, \
                 with the franking tag in the AAD; the hub franks every one (an HMAC and an \
                 Ed25519 signature) and every receiver verifies the frank"
            } else {
                "application messages are the lab's bare payloads (no MIMI content, no franking \
                 tag): the hub franks none of them (--mls-frank makes them franked MIMI content)"
            }
            .to_owned(),
        );
        if opts.mls_ahead {
            notes.push(
                "--mls-encrypt ahead: senders encrypt their rooms' messages for the current \
                 epochs before the measured phase and replay them (each timed from when it is \
                 submitted); the phase's commits are planned before it too, with the pools of \
                 the epochs they start (key claims for the adds included), and a message \
                 refused as of an old epoch gives its place to the new pool's next; messages \
                 beyond the pools are encrypted inline; each row gives how many came from the \
                 pools"
                    .to_owned(),
            );
        }
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
pub(crate) fn row_budget(opts: &BenchOptions) -> Duration {
    let recovery = if opts.recovery {
        Duration::from_secs(8) + opts.settle.max(Duration::from_secs(30))
    } else {
        Duration::ZERO
    };
    Duration::from_secs(30 + 30 + 60) + opts.duration + opts.settle + recovery
}

/// The node processes of one relay run.
pub(crate) struct Nodes {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Nodes {
    fn stop(&mut self) {
        fleet::stop(&mut self.children, Duration::from_secs(5));
        self.children.clear();
    }

    fn log_tail(&self, i: usize) -> String {
        fleet::log_tail(&self.dir.join(format!("{}.log", provider(i))), 5)
    }
}

impl std::ops::Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ports inside a namespace: the same in every one (each has its own stack).
pub(crate) fn netns_port(kind: TransportKind) -> u16 {
    7000 + TransportKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0) as u16
}

pub(crate) const NETNS_ADMIN: u16 = 9100;

/// Writes certificates and node configs; returns (config paths, admin address each node
/// listens on inside its own stack).
pub(crate) fn prepare(
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
    let providers: Vec<String> = (0..n).map(provider).collect();
    fleet::write_certs(dir, providers.iter().map(String::as_str))?;
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
        let mut f = fleet::node_file(&p, admins[i], store);
        // Every follower's users take part in every room of the hub; in a hostile row the
        // flooder's (the last follower's) only in a room of its own.
        f.node.follows = if i == 0 || mls {
            Vec::new()
        } else if hostile && i == n - 1 {
            vec![FLOOD_ROOM.to_owned()]
        } else {
            (0..rooms).map(room_id).collect()
        };
        fleet::listen(&mut f, kind, addrs[i])?;
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                f.peers.push(fleet::peer(&provider(j), kind, *a));
            }
        }
        if kind == TransportKind::Quic {
            f.quic.congestion = Some(opts.quic_cc.to_string());
        }
        // Written out even when it is the default, so the config says what the row ran with.
        if let Some(n) = inflight_of(kind.as_str(), opts) {
            fleet::pipeline(&mut f, kind, n)?;
        }
        if i == 0 {
            let members = if hostile { 1..n - 1 } else { 1..n };
            let followers: Vec<String> = members.map(provider).collect();
            for r in 0..rooms {
                f.rooms
                    .push(fleet::room(&room_id(r), followers.iter().cloned()));
            }
            if hostile {
                f.rooms.push(fleet::room(FLOOD_ROOM, [provider(n - 1)]));
                f.limits = hostile::limits_section(&hostile::LIMITS);
            }
        }
        let path = dir.join(format!("{p}.toml"));
        fleet::write_config(&path, &f)?;
        configs.push(path);
    }
    let _ = admins;
    Ok(configs)
}

pub(crate) async fn wait_healthy(nodes: &mut Nodes, admins: &[Admin]) -> Result<()> {
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

/// One relay transport under one profile.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_relay(
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
        let mut cmd = launcher.command(cfg, log, lab.map(|l| l.namespace(i)), "warn")?;
        cmd.current_dir(&dir);
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

    let mut rx = Rx::new(epoch, receivers)?;
    if let Some(rate) = opts.rate {
        rx.reserve((rate * opts.duration.as_secs_f64()) as usize + 1);
    }
    let rx = Arc::new(Mutex::new(rx));
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
    let lags = Arc::new(Mutex::new(LabLags::default()));
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
    let drive_fut = drive_apart(DriveJob {
        hub: admins[0].clone(),
        rooms: opts.rooms,
        rate: opts.rate,
        until,
        sizes: opts.sizes.clone(),
        epoch,
        counters: counters.clone(),
        accepted: accepted.clone(),
        stop: stop.clone(),
        window: opts.rate.is_none().then(|| ClosedLoop {
            rx: rx.clone(),
            receivers: receivers as u64,
            window: opts.window,
        }),
        batch_max: opts.submit_batch,
        lags_us: Some(lags.clone()),
    });
    tokio::pin!(drive_fut);
    let phase_start = Instant::now();
    // The nodes' stages once more at the end of the phase's first EARLY_MS, to tell a
    // connection's start from the steady state.
    let early_at = phase_start + Duration::from_millis(stages::EARLY_MS);
    let mut stages_early = None;
    let sent = loop {
        tokio::select! {
            r = &mut drive_fut => break r?,
            _ = tokio::time::sleep_until(early_at.into()), if stages_early.is_none() => {
                stages_early = Some(stages::Scrape::of(&admins, receivers).await);
            }
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
        if let Some(early) = &stages_early {
            row.stages.extend(stages::lab_figure(
                stages::EARLY_DRIVER,
                &mut l.driver_early,
            ));
            row.stages.extend(stages::lab_figure(
                stages::EARLY_API_CALL,
                &mut l.api_call_early,
            ));
            row.stages
                .extend(stages::early(early.since(&stages_before)));
        }
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
        let f = drive_apart(DriveJob {
            hub: admins[0].clone(),
            rooms: opts.rooms,
            rate,
            until: until2,
            sizes: opts.sizes.clone(),
            epoch,
            counters: counters.clone(),
            accepted: accepted2.clone(),
            stop: stop.clone(),
            window: None,
            batch_max: opts.submit_batch,
            lags_us: None,
        });
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
