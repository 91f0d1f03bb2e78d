//! The lab's outputs: `results.json`, `report.md` and SVG plots (latency CDF per profile,
//! throughput against loss).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::{BenchReport, Row};

mod hostile;
mod plots;

pub(crate) use hostile::{hostile_table, hostile_words, placement_words};
use plots::{cdf_plot, throughput_plot, timeline_plot};

/// CPU model and core count of this machine, and the kernel.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

pub(crate) fn write(out: &Path, report: &BenchReport) -> Result<()> {
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report.rows)?,
    )
    .context("writing results.json")?;
    std::fs::write(out.join("run.json"), serde_json::to_string_pretty(&report)?)?;
    let mut plots = Vec::new();
    let mut profiles: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !profiles.contains(&r.profile.as_str()) {
            profiles.push(&r.profile);
        }
    }
    for p in &profiles {
        let name = format!("latency-cdf-{p}.svg");
        let rows: Vec<&Row> = report
            .rows
            .iter()
            .filter(|r| r.profile == *p && !r.cdf.is_empty())
            .collect();
        if !rows.is_empty() {
            cdf_plot(&out.join(&name), p, &rows)?;
            plots.push(name);
        }
        // Beside the CDF: the same latencies over the run.
        let name = format!("latency-timeline-{p}.svg");
        let rows: Vec<&Row> = report
            .rows
            .iter()
            .filter(|r| r.profile == *p && !r.timeline.is_empty())
            .collect();
        if !rows.is_empty() {
            timeline_plot(&out.join(&name), p, &rows)?;
            plots.push(name);
        }
    }
    if profiles.len() > 1 {
        let name = "throughput-vs-loss.svg".to_owned();
        throughput_plot(&out.join(&name), report)?;
        plots.push(name);
    }
    std::fs::write(out.join("report.md"), markdown(report, &plots))?;
    Ok(())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "–".into())
}

fn ms(us: Option<u64>) -> String {
    us.map(|u| format!("{:.1}", u as f64 / 1000.0))
        .unwrap_or_else(|| "–".into())
}

/// The baseline a transport is compared with: QUIC against bare quinn, the TCP-based
/// transports against bare TLS.
fn carrier(transport: &str) -> &'static str {
    if transport == "quic" {
        "bare-quinn"
    } else {
        "bare-tls"
    }
}

/// The row a transport's row is compared with: its carrier's in the same profile (none for
/// a baseline, or when the carrier was not run).
fn carrier_row<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    if r.transport.starts_with("bare-") {
        return None;
    }
    rows.iter()
        .find(|b| b.transport == carrier(&r.transport) && b.profile == r.profile)
}

/// "msgs/s ratio / p99 ratio" of a transport's figures to its carrier's.
fn ratio(
    msgs: Option<f64>,
    p99: Option<u64>,
    base_msgs: Option<f64>,
    base_p99: Option<u64>,
) -> Option<String> {
    Some(format!(
        "{:.2}x / {:.2}x",
        msgs? / base_msgs?,
        p99? as f64 / base_p99?.max(1) as f64
    ))
}

/// A row's transport, with its hostile run when it has one ("https (flood)").
fn name(r: &Row) -> String {
    match &r.hostile {
        Some(h) => format!("{} ({h})", r.transport),
        None => r.transport.clone(),
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.0}", b as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "–".into())
}

fn pct(x: Option<f64>) -> String {
    x.map(|x| format!("{:.0}%", x * 100.0))
        .unwrap_or_else(|| "–".into())
}

fn times(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "–".into())
}

/// A row's in-flight limit per (room, destination); a baseline's is its own (not the relay's).
fn inflight(r: &Row) -> String {
    r.inflight
        .map_or_else(|| "own".to_owned(), |n| n.to_string())
}

/// The results table in Markdown (also used by the README).
pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| transport | in flight | profile | msgs/s | p50 ms | p99 ms | p99.9 ms | clean p99 ms | HOL-exposed p99 ms | wire B/msg | CPU µs/msg | setup ms | recovery ms | link drops | socket drops | lost/dup/ooo | vs carrier (msgs/s, p99) |\n");
    s.push_str(
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for r in rows {
        if r.status != "ok" {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | | | | | | | | | | | | | {} |",
                name(r),
                inflight(r),
                r.profile,
                r.status,
                r.note
            );
            continue;
        }
        let ratio = if r.transport.starts_with("bare-") {
            "baseline".to_owned()
        } else {
            carrier_row(rows, r)
                .and_then(|b| {
                    let x = ratio(r.msgs_per_s, r.p99_us, b.msgs_per_s, b.p99_us)?;
                    Some(format!("{x} ({})", b.transport))
                })
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{} | {} |",
            name(r),
            inflight(r),
            r.profile,
            r.msgs_per_s.map(|v| format!("{v:.0}")).unwrap_or_default(),
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.p999_us),
            ms(r.clean_p99_us),
            ms(r.hol_p99_us),
            r.wire_bytes_per_msg
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            r.cpu_us_per_msg
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            r.setup_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "–".into()),
            r.recovery_ms
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            opt(r.link_drops),
            opt(r.socket_drops),
            opt(r.lost),
            opt(r.duplicated),
            opt(r.out_of_order),
            ratio
        );
    }
    s
}

/// Each node's CPU per delivered message (the hub first), µs.
fn node_cpu(r: &Row) -> String {
    if r.node_cpu_us_per_msg.is_empty() {
        return "–".into();
    }
    r.node_cpu_us_per_msg
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The MLS figures of `--traffic mls` rows; empty when there are none.
pub(crate) fn mls_table(rows: &[Row]) -> String {
    let mls: Vec<&Row> = rows
        .iter()
        .filter(|r| r.traffic == "mls" && r.status == "ok")
        .collect();
    if mls.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "MLS traffic (real openmls groups; decryption failures must be 0):\n\n\
         | transport | profile | MLS message B | decryption failures | franks verified | epochTooOld retries | commits (refused) | self-updates / adds / removes / role changes | spares joined / left | node CPU µs/msg (hub, followers) | lab CPU µs/msg | clients' openmls µs/msg (encryption) | decryption (after the phase), encryption (from the pools) |\n\
         |---|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|\n",
    );
    for r in mls {
        let kind = |k: &str| opt(r.commit_kinds.get(k).copied());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} / {} / {} / {} | {} / {} | {} | {} | {} | {} |",
            name(r),
            r.profile,
            r.mls_msg_bytes
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            opt(r.decrypt_failures),
            opt(r.franks_verified),
            opt(r.retries),
            opt(r.commits),
            opt(r.commits_refused),
            kind("self_update"),
            kind("add"),
            kind("remove"),
            kind("role"),
            kind("spares_joined"),
            kind("spares_left"),
            node_cpu(r),
            r.lab_cpu_us_per_msg
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "–".into()),
            match (r.client_crypto_us_per_msg, r.client_encrypt_us_per_msg) {
                (Some(all), Some(enc)) => format!("{all:.1} ({enc:.1})"),
                _ => "–".into(),
            },
            match (&r.mls_decrypt, r.decrypted_after_phase) {
                (Some(m), Some(after)) => format!("{m} ({after})"),
                (Some(m), None) => m.clone(),
                _ => "–".into(),
            } + &match (&r.mls_encrypt, r.encrypted_ahead) {
                (Some(m), Some(n)) => format!(", encrypt {m} ({n})"),
                (Some(m), None) => format!(", encrypt {m}"),
                _ => String::new(),
            },
        );
    }
    s.push('\n');
    s
}

/// Each run of a repeated row, and its ratio to the carrier's run of the same round: how
/// often a target held, which a median alone does not show.
pub(crate) fn runs_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "Each run (in round order; a transport's run k is paired with its carrier's run k):\n\n",
    );
    s.push_str("| transport | profile | msgs/s | p99 ms | vs carrier (msgs/s, p99) |\n");
    s.push_str("|---|---|---|---|---|\n");
    let list = |v: Vec<String>| v.join(", ");
    for r in rows.iter().filter(|r| !r.repeats.is_empty()) {
        let ratios = match carrier_row(rows, r).filter(|b| !b.repeats.is_empty()) {
            None => "–".to_owned(),
            Some(b) => list(
                r.repeats
                    .iter()
                    .zip(&b.repeats)
                    .map(|(x, y)| {
                        ratio(x.msgs_per_s, x.p99_us, y.msgs_per_s, y.p99_us)
                            .unwrap_or_else(|| "–".into())
                    })
                    .collect(),
            ),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.transport,
            r.profile,
            list(
                r.repeats
                    .iter()
                    .map(|x| x
                        .msgs_per_s
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or("–".into()))
                    .collect()
            ),
            list(r.repeats.iter().map(|x| ms(x.p99_us)).collect()),
            ratios
        );
    }
    s.push('\n');
    s
}

fn markdown(report: &BenchReport, plots: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# mimi-relay transport comparison\n");
    let _ = writeln!(s, "- command: `{}`", report.command);
    let _ = writeln!(s, "- machine: {}", report.machine);
    let _ = writeln!(s, "- network: {}", report.net_note);
    let _ = writeln!(s, "- QUIC congestion controller: {}", report.quic_cc);
    let _ = writeln!(
        s,
        "- workload: {} s per row; sizes: {} B application messages, {:.0}% commits of {}-{} B, {:.0}% Welcomes of {}-{} B",
        report.duration_s,
        report.sizes.app,
        report.sizes.commit_share * 100.0,
        report.sizes.commit.0,
        report.sizes.commit.1,
        report.sizes.welcome_share * 100.0,
        report.sizes.welcome.0,
        report.sizes.welcome.1
    );
    if let Some(r) = report.rows.first() {
        let _ = writeln!(
            s,
            "- {} rooms hosted by a.example, {} follower provider(s); {}",
            r.rooms, r.followers, r.mode
        );
    }
    for p in &report.profiles {
        let _ = writeln!(
            s,
            "- profile `{}`: RTT {} ms, loss {:.1}%, mean burst {} packets{}, reorder {:.1}%, rate {}",
            p.name,
            p.rtt_ms,
            p.loss * 100.0,
            p.burst,
            p.burst_ms
                .filter(|_| p.burst > 1.0)
                .map(|ms| format!(" (each over within {ms} ms)"))
                .unwrap_or_default(),
            p.reorder * 100.0,
            p.rate_mbit
                .map(|r| format!("{r} Mbit/s"))
                .unwrap_or_else(|| "uncapped".into())
        );
    }
    if report.repeat > 1 {
        let _ = writeln!(
            s,
            "- {} runs of every row, interleaved: each round runs every transport once, the next \
             round starting one transport further on; each figure below is the median of the \
             runs (the mean of the middle two for an even count), counts are totals, and the \
             ratios divide the medians",
            report.repeat
        );
    }
    for n in &report.notes {
        let _ = writeln!(s, "- note: {n}");
    }
    let _ = writeln!(s, "\n{}", table(&report.rows));
    s.push_str(&mls_table(&report.rows));
    if report.repeat > 1 {
        s.push_str(&runs_table(&report.rows));
    }
    if report.hostile.is_some() {
        let _ = writeln!(
            s,
            "## Hostile peer: flood\n\nTwo followers: b.example is the victim, whose deliveries \
             are measured; c.example's identity floods the hub from the lab process (oversize, \
             malformed and valid-but-expensive requests on one connection more than its cap, \
             a thread of its own). Each transport runs once quiet and once flooded, otherwise \
             alike. In the flooded rows of the table above, wire B/msg and CPU µs/msg include \
             the flood's bytes and the nodes' work on it.\n\n{}\n\n{}\n{}",
            placement_words(report.placement.as_ref()),
            hostile_table(&report.rows),
            hostile_words(&report.rows, report.hostile.as_ref())
        );
    }
    let gaps: Vec<&Row> = report.rows.iter().filter(|r| r.status != "ok").collect();
    if !gaps.is_empty() {
        let _ = writeln!(s, "Not measured:\n");
        for g in gaps {
            let _ = writeln!(
                s,
                "- {} / {}: {} ({})",
                g.transport, g.profile, g.status, g.note
            );
        }
        s.push('\n');
    }
    let bad: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.status == "ok" && !r.is_clean())
        .collect();
    if !bad.is_empty() {
        let _ = writeln!(
            s,
            "**Integrity failures** (lost, duplicated or out of order deliveries): {}\n",
            bad.iter()
                .map(|r| format!("{}/{}", r.transport, r.profile))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s.push_str(&stage_tables(&report.rows));
    s.push_str(METHOD);
    // A profile's CDF and timeline side by side (one line), other plots alone.
    let mut i = 0;
    while i < plots.len() {
        let p = &plots[i];
        let _ = write!(s, "\n![{p}]({p})");
        if let Some(t) = plots.get(i + 1)
            && p.starts_with("latency-cdf-")
            && t.starts_with("latency-timeline-")
        {
            let _ = write!(s, " ![{t}]({t})");
            i += 1;
        }
        s.push('\n');
        i += 1;
    }
    s
}

/// A stage's place in the life of a message, and what it times (per item it counts).
const STAGES: [(&str, &str, &str); 14] = [
    (
        "lab",
        "driver",
        "scheduled send → handed to the hub's API (per message)",
    ),
    (
        "lab",
        "api_call",
        "the submitBatch call carrying it → answered: HTTP API, core, commit (per message)",
    ),
    (
        "hub",
        "client_queue",
        "API → core thread takes the submission (per message)",
    ),
    (
        "hub",
        "core",
        "core thread: taken → end of its turn (per message)",
    ),
    (
        "hub",
        "store_write",
        "write + fsync of one batch, committer thread (per commit)",
    ),
    (
        "hub",
        "commit",
        "output held until its batch is durable (per reply or transmit)",
    ),
    (
        "hub",
        "transmit",
        "transmit → its outcome back at the core: link both ways + the follower (per transmit)",
    ),
    (
        "follower",
        "peer_queue",
        "adapter → core thread takes the /notify (per request)",
    ),
    (
        "follower",
        "core",
        "core thread: taken → end of its turn (per request)",
    ),
    (
        "follower",
        "store_write",
        "write + fsync of one batch (per commit)",
    ),
    (
        "follower",
        "commit",
        "ack held until its batch is durable (per reply)",
    ),
    (
        "follower",
        "inbox",
        "record durable → read by the client's long-poll (per record)",
    ),
    (
        "hub",
        "inbox",
        "the hub's own inbox: durable → read by the lab's (unmeasured) reader (per record)",
    ),
    (
        "hub",
        "accept_to_ack",
        "hub accepted → follower acknowledged (per message)",
    ),
];

/// A duration in µs, in the unit that reads best.
fn dur(us: Option<f64>) -> String {
    match us {
        None => "–".into(),
        Some(us) if us < 1_000.0 => format!("{us:.0} µs"),
        Some(us) if us < 100_000.0 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{:.0} ms", us / 1e3),
    }
}

/// "Where the time goes": per row, the timeline's early and late p99 and the stage table.
pub(crate) fn stage_tables(rows: &[Row]) -> String {
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.status == "ok" && (!r.stages.is_empty() || !r.timeline.is_empty()))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "## Where the time goes

Per row: the p99 of the messages sent in the measured \
         phase's first 400 ms (a connection's start, BBR's first ProbeRTT) against the rest, \
         then each stage of a message's life from the nodes' own histograms (`/metrics`, \
         `mimi_relay_stage_seconds` and the store and delivery histograms), scraped before and \
         after the phase; quantiles are interpolated inside the buckets (bounds 5 µs, 10 µs, \
         25 µs, 50 µs, 100 µs, then x2-x2.5 to 10 s; the store and delivery histograms start \
         at 100 µs). Stages overlap (the hub's transmit holds the follower's queue, core and \
         commit), so they do not add up to the latency; an item may carry several messages. \
         MLS rows cover the whole row, its setup included. Stages marked (first 400 ms) \
         cover the phase's first 400 ms only: the nodes' as scraped at that moment, the lab's \
         for the messages scheduled in it.\n\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "**{} / {}**: p99 {} ms; sent in the first 400 ms {} ms, later {} ms.\n",
            name(r),
            r.profile,
            ms(r.p99_us),
            ms(r.p99_first_400ms_us),
            ms(r.p99_after_400ms_us),
        );
        if r.stages.is_empty() {
            continue;
        }
        s.push_str("| node | stage | what it times | n | p50 | p99 | mean |\n");
        s.push_str("|---|---|---|---:|---:|---:|---:|\n");
        let known = |f: &&super::StageFigure| {
            STAGES
                .iter()
                .any(|(n, st, _)| *n == f.node && *st == f.stage)
        };
        let ordered = STAGES.iter().filter_map(|(node, stage, what)| {
            let f = r
                .stages
                .iter()
                .find(|f| f.node == *node && f.stage == *stage)?;
            Some((f, *what))
        });
        let others = r.stages.iter().filter(|f| !known(f)).map(|f| (f, ""));
        for (f, what) in ordered.chain(others) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.node,
                f.stage,
                what,
                f.n,
                dur(f.p50_us),
                dur(f.p99_us),
                dur(f.mean_us)
            );
        }
        s.push('\n');
    }
    s
}

const METHOD: &str = "\
## How the figures are made

- **msgs/s**: distinct deliveries at the followers (or at the baseline's receiver) divided by the
  time from the first scheduled send to the last delivery of the measured phase.
- **latency**: from the *scheduled* send time to the moment the lab's reader got the message from
  the follower's inbox (relay) or the receiver's socket (baselines). In open loop the schedule is
  fixed in advance, so queueing in the relay counts (no coordinated omission); in closed loop each
  room sends its next message when the previous one was accepted. HDR histograms, 3 digits.
- **latency timeline** (beside each profile's CDF): the measured phase's messages grouped by
  scheduled send time in 100 ms buckets from its first send; per bucket and transport the p99
  (solid) and p50 (dashed), nearest rank, on a log scale. `timeline` in results.json.
- **wire B/msg**: bytes of every IP packet offered to the impaired link (both directions, dropped
  ones and retransmissions included) divided by deliveries. Only with namespaces.
- **CPU µs/msg**: user+system time of the node processes (from /proc/PID/stat) over the phase,
  divided by deliveries. For the baselines: this process minus the forwarder thread.
- **setup ms**: the first message of the row, from before any connection existed to its delivery
  (relay: handshake made on demand by the hub; baselines: handshake, then the message).
- **clean p99 / HOL-exposed p99**: the forwarder logs every packet its loss model drops. The
  packets are encrypted, so losses are attributed by time. A message is *clean* when its room
  lost nothing it had to wait for: no packet was dropped within its own send window (5 ms from
  its scheduled time, covering the hub's submit and commit), and no earlier message of its
  room that was not clean was still undelivered when it was sent (per-room order makes it wait
  for that one on any transport). *HOL-exposed* messages are clean ones with another drop
  within two RTTs before them: their delay beyond the path is head-of-line blocking behind
  other rooms' losses. It is an approximation: a drop inside the window may have hit another
  room, which only makes the clean set smaller.
- **socket drops**: UDP datagrams the kernel discarded in the lab's namespaces because a
  socket's receive buffer was full (`RcvbufErrors` of /proc/net/snmp, over the phase). The link
  did not cause them and the clean/HOL split cannot see them; QUIC resends them. TCP's window
  keeps TCP from meeting them. The relay's endpoint and bare quinn's sockets both ask for 8 MiB
  buffers (see `relay_quic::socket`).
- **recovery ms**: with namespaces only. After the main phase, traffic at a low rate, the link is
  cut (every packet discarded) for 5 s, then restored; recovery is from the restore until every
  message scheduled before it was delivered.
- **lost/dup/ooo**: per follower and room, each message counted once; must all be 0. *Lost*
  counts what had not arrived when the settle time (30 s after the last send) ran out and the
  nodes were stopped: a backlog too slow to drain shows up here too.
- Baselines carry the same messages on one hop (hub namespace to follower namespace) with no
  relay logic; the ratio column divides a transport's figure by its carrier's (QUIC by
  bare-quinn, the TCP-based ones by bare-tls).
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BenchOptions, StageFigure, TimelinePoint};

    fn fig(node: &str, stage: &str, p99_us: f64) -> StageFigure {
        StageFigure {
            node: node.into(),
            stage: stage.into(),
            n: 10,
            p50_us: Some(p99_us / 2.0),
            p99_us: Some(p99_us),
            mean_us: None,
        }
    }

    #[test]
    fn the_stage_table_follows_a_messages_life_and_picks_units() {
        let mut r = Row::empty("quic", "lan", "netns", &BenchOptions::default());
        r.p99_us = Some(12_000);
        r.p99_first_400ms_us = Some(40_000);
        r.p99_after_400ms_us = Some(3_000);
        r.stages = vec![
            fig("follower", "inbox", 250_000.0),
            fig("hub", "client_queue", 42.0),
            fig("lab", "driver", 1_500.0),
            fig("hub", "something_new", 7.0),
            fig("lab", "api_call", 900.0),
        ];
        let text = stage_tables(&[r]);
        assert!(
            text.contains(
                "**quic / lan**: p99 12.0 ms; sent in the first 400 ms 40.0 ms, later 3.0 ms."
            ),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[1].starts_with("| lab | driver |"), "{text}");
        assert!(
            lines[1].ends_with("| 10 | 750 µs | 1.50 ms | – |"),
            "{text}"
        );
        // The call's round trip follows the driver's lag, whatever order they came in.
        assert!(lines[2].starts_with("| lab | api_call |"), "{text}");
        assert!(lines[3].starts_with("| hub | client_queue |"));
        assert!(lines[3].contains("| 21 µs | 42 µs |"));
        assert!(lines[4].starts_with("| follower | inbox |"));
        assert!(lines[4].contains("| 125 ms | 250 ms |"));
        // A stage the report does not know yet still shows, last.
        assert!(lines[5].starts_with("| hub | something_new |  |"));
        // Rows without figures get no section.
        let empty = Row::empty("quic", "lan", "netns", &BenchOptions::default());
        assert_eq!(stage_tables(&[empty]), "");
    }

    #[test]
    fn the_timeline_is_plotted_beside_the_cdf() {
        let dir = std::env::temp_dir().join(format!("mimi-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut r = Row::empty("quic", "lan", "loopback", &BenchOptions::default());
        r.cdf = vec![(0.5, 1_000), (0.99, 5_000)];
        r.timeline = vec![
            TimelinePoint {
                t_ms: 0,
                n: 5,
                p50_us: 2_000,
                p99_us: 30_000,
            },
            TimelinePoint {
                t_ms: 100,
                n: 5,
                p50_us: 900,
                p99_us: 4_000,
            },
        ];
        let plots = [
            "latency-cdf-lan.svg".to_owned(),
            "latency-timeline-lan.svg".to_owned(),
        ];
        timeline_plot(&dir.join(&plots[1]), "lan", &[&r]).expect("plot");
        let svg = std::fs::read_to_string(dir.join(&plots[1])).expect("svg");
        assert!(svg.contains("quic p99"), "{svg}");
        let report = BenchReport {
            traffic: "synthetic".into(),
            net: "loopback".into(),
            net_note: String::new(),
            started_unix: 0,
            machine: String::new(),
            command: String::new(),
            sizes: Default::default(),
            profiles: Vec::new(),
            duration_s: 1.0,
            quic_cc: String::new(),
            repeat: 1,
            hostile: None,
            placement: None,
            notes: Vec::new(),
            rows: vec![r],
        };
        let md = markdown(&report, &plots);
        assert!(
            md.contains(
                "\n![latency-cdf-lan.svg](latency-cdf-lan.svg) ![latency-timeline-lan.svg](latency-timeline-lan.svg)\n"
            ),
            "{md}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
