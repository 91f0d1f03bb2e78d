//! The hostile scenario's part of the report: its table, what it showed in words, and where
//! the flooder ran.

use std::fmt::Write as _;

use super::{mib, ms, opt, pct, times};
use crate::hostile::{HostileLimits, P99_TARGET, Placement, RATE_TARGET};
use crate::model::Row;

/// The hostile scenario's table: per transport, the victim quiet and flooded, the hub's peak
/// memory against its budget, and what the flood sent and had refused.
pub(crate) fn hostile_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| transport | profile | quiet msgs/s | flooded msgs/s | rate ratio | quiet p99 ms | flooded p99 ms | p99 ratio | hub peak RSS MiB (quiet / flooded) | RSS budget MiB | flood sent | accepted / refused 2xx / 4xx / 5xx / reset | flooder CPU ms | machine CPU busy, quiet / flooded (others) | targets |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---|---|\n");
    for f in rows
        .iter()
        .filter(|r| r.hostile.as_deref() == Some("flood"))
    {
        let q = quiet_of(rows, f);
        let rate = |r: Option<&Row>| {
            r.and_then(|r| r.msgs_per_s)
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into())
        };
        let p99 = |r: Option<&Row>| ms(r.and_then(|r| r.p99_us));
        let flood = f.flood.as_ref();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} / {} ({}) | {} |",
            f.transport,
            f.profile,
            rate(q),
            rate(Some(f)),
            times(f.victim_rate_ratio),
            p99(q),
            p99(Some(f)),
            times(f.victim_p99_ratio),
            mib(q.and_then(|q| q.hub_peak_rss_bytes)),
            mib(f.hub_peak_rss_bytes),
            mib(f.rss_budget_bytes),
            opt(flood.map(|c| c.sent)),
            flood
                .map(|c| format!(
                    "{} / {} / {} / {} / {}",
                    c.accepted, c.refused_2xx, c.refused_4xx, c.refused_5xx, c.reset
                ))
                .unwrap_or_else(|| "–".into()),
            opt(flood.and_then(|c| c.flooder_cpu_ms)),
            pct(q.and_then(|q| q.cpu.as_ref()).map(|c| c.machine_busy)),
            pct(f.cpu.as_ref().map(|c| c.machine_busy)),
            pct(f.cpu.as_ref().map(|c| c.others)),
            verdict(f)
        );
    }
    s
}

fn quiet_of<'a>(rows: &'a [Row], f: &Row) -> Option<&'a Row> {
    rows.iter().find(|q| {
        q.hostile.as_deref() == Some("quiet")
            && q.transport == f.transport
            && q.profile == f.profile
    })
}

fn verdict(f: &Row) -> &'static str {
    match (f.status.as_str(), f.targets_met) {
        ("ok", Some(true)) => "held",
        ("ok", Some(false)) => "missed",
        ("ok", None) => "–",
        _ => "failed",
    }
}

/// The hostile scenario in words, one paragraph per transport.
pub(crate) fn hostile_words(rows: &[Row], limits: Option<&HostileLimits>) -> String {
    let mut s = String::new();
    for f in rows
        .iter()
        .filter(|r| r.hostile.as_deref() == Some("flood"))
    {
        let q = quiet_of(rows, f);
        if f.status != "ok" {
            let _ = writeln!(
                s,
                "- **{} / {}**: the flooded run failed: {}. A crash of the hub under the flood \
                 fails the row; its log is kept under work/.\n",
                f.transport, f.profile, f.note
            );
            continue;
        }
        let mut missed = Vec::new();
        if let Some(x) = f.victim_rate_ratio.filter(|x| *x < RATE_TARGET) {
            missed.push(format!(
                "throughput {x:.2}x is under {RATE_TARGET}x (by {:.0}%)",
                (RATE_TARGET - x) / RATE_TARGET * 100.0
            ));
        }
        if let Some(x) = f.victim_p99_ratio.filter(|x| *x > P99_TARGET) {
            missed.push(format!(
                "p99 {x:.2}x is over {P99_TARGET}x (by {:.0}%)",
                (x - P99_TARGET) / P99_TARGET * 100.0
            ));
        }
        if let (Some(p), Some(b)) = (f.hub_peak_rss_bytes, f.rss_budget_bytes)
            && p > b
        {
            missed.push(format!(
                "the hub's peak RSS {} MiB is over its {} MiB budget",
                mib(Some(p)),
                mib(Some(b))
            ));
        }
        if !f.is_clean() {
            missed.push("the victim's deliveries were not all exactly once and in order".into());
        }
        let flood = f.flood.clone().unwrap_or_default();
        let refusals: Vec<String> = f
            .hub_refusals
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            s,
            "- **{} / {}**: while the flooder sent {} requests on {} connections ({} accepted, \
             {} refused inside a 200, {} refused 4xx, {} refused 5xx, {} ended by the hub \
             without an answer; flooder CPU {} ms), the victim received {} msgs/s against {} \
             quiet ({}) with a p99 of {} ms against {} ms quiet ({}), and lost, duplicated or \
             reordered nothing{}. The hub stayed up; its peak RSS was {} MiB (quiet run: {} \
             MiB) of a {} MiB budget. Over the flooded phase the machine's cores were {} busy \
             (hub {}, all nodes {}, lab process with the flooder {}, other processes {}; quiet \
             run: {} busy). {} The hub's own refusal counters: {}.\n",
            f.transport,
            f.profile,
            flood.sent,
            flood.connections,
            flood.accepted,
            flood.refused_2xx,
            flood.refused_4xx,
            flood.refused_5xx,
            flood.reset,
            opt(flood.flooder_cpu_ms),
            f.msgs_per_s
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            q.and_then(|q| q.msgs_per_s)
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            times(f.victim_rate_ratio),
            ms(f.p99_us),
            ms(q.and_then(|q| q.p99_us)),
            times(f.victim_p99_ratio),
            if f.is_clean() {
                ""
            } else {
                " (NOT SO: see lost/dup/ooo)"
            },
            mib(f.hub_peak_rss_bytes),
            mib(q.and_then(|q| q.hub_peak_rss_bytes)),
            mib(f.rss_budget_bytes),
            pct(f.cpu.as_ref().map(|c| c.machine_busy)),
            pct(f.cpu.as_ref().map(|c| c.hub)),
            pct(f.cpu.as_ref().map(|c| c.nodes)),
            pct(f.cpu.as_ref().map(|c| c.lab)),
            pct(f.cpu.as_ref().map(|c| c.others)),
            pct(q.and_then(|q| q.cpu.as_ref()).map(|c| c.machine_busy)),
            if missed.is_empty() {
                "Every target held.".to_owned()
            } else {
                format!("Missed: {}.", missed.join("; "))
            },
            if refusals.is_empty() {
                "none".to_owned()
            } else {
                refusals.join(", ")
            }
        );
    }
    if let Some(l) = limits {
        let _ = writeln!(
            s,
            "The hub's `[limits]` in these rows: max_body {} B, max_peer_bytes {} B, \
             max_conns_per_peer {}, frame_deadline_ms {}, max_inbox {}. **RSS budget** = the \
             hub's peak in the quiet run of the same transport + peers x max_peer_bytes (bytes \
             a peer holds in the adapter and the ingress queue) + peers x max_conns_per_peer x \
             the transport's per-connection receive window (16 MiB for HTTP/2 and QUIC; for \
             XMPP one stanza of max_body as base64 plus 16 KiB) + max_inbox x max_body (peer \
             submissions the hub's own inbox keeps), with 2 peers. Targets: the victim keeps at \
             least {RATE_TARGET}x its quiet msgs/s and at most {P99_TARGET}x its quiet p99, the \
             peak stays within the budget, nothing is lost, duplicated or reordered, no node \
             exits.\n",
            l.max_body, l.max_peer_bytes, l.max_conns_per_peer, l.frame_deadline_ms, l.max_inbox
        );
    }
    s
}

/// Where the flooder ran, in words: its own CPUs, or, on one CPU, the hub's.
pub(crate) fn placement_words(p: Option<&Placement>) -> String {
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    match p {
        Some(p) => format!(
            "**CPU placement.** The flooder's thread and the flooding provider's own node \
             (c.example) ran on CPU {}, and nothing else of the lab did; the hub, the victim's \
             node, the lab's driver and readers and the link forwarder (which also does the \
             kernel's receive work for every packet it delivers, the flood's included) ran on \
             CPU {}. The same in the quiet and the flooded run, so both compare the same hub \
             CPU. An attacker's CPU is not on its victim's hub: sharing the cores, the lab \
             would measure how much CPU the flooder itself takes from the hub rather than how \
             fairly the hub shares its own. Each row's `cpus` in results.json is what the \
             kernel listed for each role (`Cpus_allowed_list`).",
            list(&p.attacker),
            list(&p.honest)
        ),
        None => "**CPU placement: none.** The flooder shared every CPU with the hub (see the \
             notes), so a flooded row also counts the flooder's own CPU against the hub."
            .to_owned(),
    }
}
