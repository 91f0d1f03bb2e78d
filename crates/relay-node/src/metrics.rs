//! Renders the core's counters in the Prometheus text exposition format (version 0.0.4).
//! Written by hand: the format is a few lines, and the counters already live in the core.

use std::fmt::Write;

use relay_core::stats::{Histogram, PeerStats};
use relay_core::{RejectReason, RelayStats};

use crate::core_loop::StoreStats;

/// A certificate the node holds: our own, or the one pinned for a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldCert {
    /// `own` or `pinned`.
    pub kind: &'static str,
    pub domain: String,
}

impl std::fmt::Display for HeldCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            "own" => write!(f, "our certificate for {}", self.domain),
            _ => write!(f, "the certificate pinned for {}", self.domain),
        }
    }
}

/// Whole days until our certificate and each peer's pinned certificate expire (negative once
/// expired), read from the live handles so a reload shows at once. Of several certificates
/// pinned for one peer, the one that lasts longest counts: the peer works until it expires.
pub fn tls_days_left(
    identity: &relay_tls::TlsIdentity,
    trust: &relay_tls::PeerTrust,
) -> Vec<(HeldCert, i64)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = |c: &[u8]| relay_tls::Validity::of(c).map(|v| v.days_left(now));
    let mut out = Vec::new();
    if let Some(d) = identity.current_chain().first().and_then(|c| days(c)) {
        let domain = identity.domain.to_string();
        out.push((
            HeldCert {
                kind: "own",
                domain,
            },
            d,
        ));
    }
    for domain in trust.domains() {
        if let Some(d) = trust.pinned(&domain).iter().filter_map(|c| days(c)).max() {
            let domain = domain.to_string();
            out.push((
                HeldCert {
                    kind: "pinned",
                    domain,
                },
                d,
            ));
        }
    }
    out
}

/// `mimi_relay_tls_cert_days_left`.
pub fn render_tls(out: &mut String, held: &[(HeldCert, i64)]) {
    let name = "mimi_relay_tls_cert_days_left";
    let _ = writeln!(
        out,
        "# HELP {name} Whole days until a certificate expires (negative once expired): ours (cert=\"own\") and each peer's pinned one (cert=\"pinned\").\n# TYPE {name} gauge"
    );
    for (c, days) in held {
        let _ = writeln!(
            out,
            "{name}{{cert=\"{}\",domain=\"{}\"}} {days}",
            c.kind, c.domain
        );
    }
}

/// Name, type, help and value of one per-peer metric.
type PeerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PeerStats) -> u64,
);

pub fn render(s: &RelayStats, store: &StoreStats) -> String {
    let mut out = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "mimi_relay_accepted_total",
        "Submissions accepted by this hub.",
        s.accepted,
    );
    counter(
        "mimi_relay_delivered_total",
        "Events delivered to local clients.",
        s.delivered,
    );
    counter(
        "mimi_relay_dedupe_hits_total",
        "Duplicates answered and not delivered again.",
        s.dedupe_hits,
    );
    counter(
        "mimi_relay_franks_issued_total",
        "Application messages the hub franked (protocol-06 section 5.4.1).",
        s.franks_issued,
    );
    counter(
        "mimi_relay_franks_verified_total",
        "Abuse reports whose franks the hub verified as its own.",
        s.franks_verified,
    );
    counter(
        "mimi_relay_franks_refused_total",
        "Abuse reports refused for a frank that is not the hub's.",
        s.franks_refused,
    );
    counter(
        "mimi_relay_retries_total",
        "Events sent again after a failure or a gap.",
        s.retries,
    );
    counter(
        "mimi_relay_probes_total",
        "Liveness probes sent to down peers.",
        s.probes,
    );
    counter(
        "mimi_relay_panics_total",
        "Peer requests (or MLS validator calls) that panicked and were refused; the node went on.",
        store.panics + s.mls_panics,
    );
    counter(
        "mimi_relay_policy_rejections_total",
        "Hub: handshakes and submissions the room policy refused (also in not_allowed rejects).",
        s.policy_rejections,
    );
    counter(
        "mimi_relay_lagging_total",
        "Hub: times a follower's queue reached max_queue and its backlog was dropped.",
        s.lagging,
    );
    counter(
        "mimi_relay_lag_dropped_total",
        "Hub: events dropped from lagging followers' queues (each told by a gap marker).",
        s.lag_dropped,
    );
    counter(
        "mimi_relay_resyncs_total",
        "Hub: queues resynchronised with a follower after either side lost or restored its store.",
        s.resyncs,
    );
    counter(
        "mimi_relay_gaps_total",
        "Follower: gaps a hub reported (events it could not deliver to us).",
        s.gaps,
    );
    counter(
        "mimi_relay_gap_events_total",
        "Follower: events inside the gaps hubs reported.",
        s.gap_events,
    );
    counter(
        "mimi_relay_lineage_mismatches_total",
        "Follower: /notify batches numbered by a hub incarnation our cursor does not follow.",
        s.lineage_mismatches,
    );
    counter(
        "mimi_relay_key_claims_total",
        "Target provider: /keyMaterial claims answered with at least one KeyPackage.",
        s.key_claims,
    );
    counter(
        "mimi_relay_consent_denials_total",
        "Target provider: /keyMaterial claims refused for want of the target's consent.",
        s.consent_denials,
    );
    counter(
        "mimi_relay_reused_seq_total",
        "Follower: events whose sequence number a hub had used before for other bytes.",
        s.reused_seq,
    );

    let _ = writeln!(
        out,
        "# HELP mimi_relay_rejects_total Requests refused, by reason."
    );
    let _ = writeln!(out, "# TYPE mimi_relay_rejects_total counter");
    for r in RejectReason::ALL {
        let _ = writeln!(
            out,
            "mimi_relay_rejects_total{{reason=\"{}\"}} {}",
            r.as_str(),
            s.rejects[r as usize]
        );
    }

    let per_peer: [PeerMetric; 6] = [
        (
            "mimi_relay_messages_in_total",
            "counter",
            "Events received from a peer and delivered.",
            |p| p.msgs_in,
        ),
        (
            "mimi_relay_messages_out_total",
            "counter",
            "Events acknowledged by a peer.",
            |p| p.msgs_out,
        ),
        (
            "mimi_relay_requests_in_total",
            "counter",
            "Requests received from a peer.",
            |p| p.requests_in,
        ),
        (
            "mimi_relay_transmits_total",
            "counter",
            "Requests sent to a peer.",
            |p| p.transmits,
        ),
        (
            "mimi_relay_peer_failures_total",
            "counter",
            "Failed exchanges that started a backoff.",
            |p| p.failures,
        ),
        (
            "mimi_relay_queue_depth",
            "gauge",
            "Events waiting for a peer, over all rooms.",
            |p| p.queue_depth,
        ),
    ];
    for (name, kind, help, get) in per_peer {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (domain, p) in &s.peers {
            let transport = p.transport.map_or("none", |t| t.as_str());
            let _ = writeln!(
                out,
                "{name}{{peer=\"{domain}\",transport=\"{transport}\"}} {}",
                get(p)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP mimi_relay_peer_up Whether a peer is considered reachable."
    );
    let _ = writeln!(out, "# TYPE mimi_relay_peer_up gauge");
    for (domain, p) in &s.peers {
        let transport = p.transport.map_or("none", |t| t.as_str());
        let _ = writeln!(
            out,
            "mimi_relay_peer_up{{peer=\"{domain}\",transport=\"{transport}\"}} {}",
            u8::from(p.up)
        );
    }
    let _ = writeln!(
        out,
        "# HELP mimi_relay_peer_draft_mode Whether a peer answers /notify without MIMI-Next-Seq, so its queues run by the draft's rules alone (one event per /notify, one in flight per room).\n# TYPE mimi_relay_peer_draft_mode gauge"
    );
    for (domain, p) in &s.peers {
        let _ = writeln!(
            out,
            "mimi_relay_peer_draft_mode{{peer=\"{domain}\"}} {}",
            u8::from(p.draft_mode)
        );
    }
    let _ = writeln!(
        out,
        "# HELP mimi_relay_dead_letters_total Events a peer refused for good (a final 4xx, or an endpoint it does not serve), kept as dead-letter records.\n# TYPE mimi_relay_dead_letters_total counter"
    );
    for (domain, p) in &s.peers {
        for (cause, n) in &p.dead_letters {
            let _ = writeln!(
                out,
                "mimi_relay_dead_letters_total{{peer=\"{domain}\",status=\"{}\"}} {n}",
                cause.label()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP mimi_relay_dead_letters_dropped_total Dead-letter records replaced by newer ones (a bounded number is kept per peer).\n# TYPE mimi_relay_dead_letters_dropped_total counter"
    );
    for (domain, p) in &s.peers {
        let _ = writeln!(
            out,
            "mimi_relay_dead_letters_dropped_total{{peer=\"{domain}\"}} {}",
            p.dead_letters_dropped
        );
    }
    let _ = writeln!(
        out,
        "# HELP mimi_relay_inbox_depth Delivered events not yet read by local clients."
    );
    let _ = writeln!(
        out,
        "# TYPE mimi_relay_inbox_depth gauge\nmimi_relay_inbox_depth {}",
        s.inbox_depth
    );
    let _ = writeln!(
        out,
        "# HELP mimi_relay_inbox_resident_bytes Bytes of undelivered inbox records held in memory (the rest is read back from the store)."
    );
    let _ = writeln!(
        out,
        "# TYPE mimi_relay_inbox_resident_bytes gauge\nmimi_relay_inbox_resident_bytes {}",
        s.inbox_resident_bytes
    );
    histogram(
        &mut out,
        "mimi_relay_delivery_latency_seconds",
        "Time from the hub's acceptance to the follower's acknowledgement.",
        &s.latency,
    );
    let _ = writeln!(
        out,
        "# HELP mimi_relay_store_commits_total Store commits that wrote something (one fsync each)."
    );
    let _ = writeln!(
        out,
        "# TYPE mimi_relay_store_commits_total counter\nmimi_relay_store_commits_total {}",
        store.commits
    );
    let _ = writeln!(
        out,
        "# HELP mimi_relay_store_commit_events_total Inputs handled in turns that ended in such a commit."
    );
    let _ = writeln!(
        out,
        "# TYPE mimi_relay_store_commit_events_total counter\nmimi_relay_store_commit_events_total {}",
        store.events
    );
    let _ = writeln!(
        out,
        "# HELP mimi_relay_disk_full Whether the store is out of space (1): new work is refused until a commit succeeds."
    );
    let _ = writeln!(
        out,
        "# TYPE mimi_relay_disk_full gauge\nmimi_relay_disk_full {}",
        u8::from(store.disk_full)
    );
    histogram(
        &mut out,
        "mimi_relay_store_commit_seconds",
        "Time spent writing and syncing one commit.",
        &store.commit_time,
    );
    render_stages(&mut out, &store.stages);
    out
}

/// A stretch of a message's life on one node, timed by the core thread (issue 17: where the
/// time goes). Each is counted per item it names, not per message: a transmit or a reply may
/// carry many messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A local client's submission, from the API handing it over to the core thread taking it.
    ClientQueue,
    /// A peer's request, from the adapter queueing it (fair queue) to the core thread taking it.
    PeerQueue,
    /// A submission or peer request, from the core thread taking it to the end of its turn
    /// (its outputs produced).
    Core,
    /// An output (reply or transmit), from the end of its turn to its release once the store
    /// batch holding its changes is durable.
    Commit,
    /// A transmit, from its handover to the transport to its outcome back at the core thread:
    /// the link both ways and the peer's whole handling.
    Transmit,
    /// An inbox record, from its being durable (readers woken) to a local client's read of it.
    Inbox,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::ClientQueue,
        Stage::PeerQueue,
        Stage::Core,
        Stage::Commit,
        Stage::Transmit,
        Stage::Inbox,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::ClientQueue => "client_queue",
            Stage::PeerQueue => "peer_queue",
            Stage::Core => "core",
            Stage::Commit => "commit",
            Stage::Transmit => "transmit",
            Stage::Inbox => "inbox",
        }
    }
}

/// A latency histogram for the stages inside one node, which are often shorter than the first
/// bound (100 µs) of [`Histogram`]: its bounds start at 5 µs, then follow the same steps.
#[derive(Clone, Debug)]
pub struct FineHistogram {
    /// Counts per upper bound (the last bucket is +Inf).
    pub counts: [u64; FineHistogram::BOUNDS_US.len() + 1],
    /// Sum in nanoseconds: a µs sum would round most of these stages away.
    pub sum_ns: u64,
    pub count: u64,
}

impl Default for FineHistogram {
    fn default() -> Self {
        Self {
            counts: [0; FineHistogram::BOUNDS_US.len() + 1],
            sum_ns: 0,
            count: 0,
        }
    }
}

impl FineHistogram {
    pub const BOUNDS_US: [u64; 20] = [
        5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
        250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
    ];

    pub fn record(&mut self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // A bound holds what is at most it, in whole ns.
        let i = Self::BOUNDS_US.partition_point(|b| b.saturating_mul(1_000) < ns);
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }
}

/// One [`FineHistogram`] per [`Stage`].
#[derive(Clone, Debug, Default)]
pub struct StageStats {
    pub stages: [FineHistogram; Stage::ALL.len()],
}

impl StageStats {
    pub fn record(&mut self, stage: Stage, d: std::time::Duration) {
        self.stages[stage as usize].record(d);
    }

    pub fn of(&self, stage: Stage) -> &FineHistogram {
        &self.stages[stage as usize]
    }
}

/// `mimi_relay_stage_seconds{stage=...}`: one histogram family, a label per stage.
pub fn render_stages(out: &mut String, s: &StageStats) {
    let name = "mimi_relay_stage_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Where a message's time goes on this node, by stage: client_queue (local submission, API to core thread), peer_queue (peer request, adapter to core thread), core (taken to end of turn), commit (output held until its store batch is durable), transmit (handed to the transport to outcome), inbox (record durable to read by a local client). Counted per item, not per message.\n# TYPE {name} histogram"
    );
    for stage in Stage::ALL {
        let h = s.of(stage);
        let label = stage.as_str();
        let mut cumulative = 0;
        for (i, bound) in FineHistogram::BOUNDS_US.iter().enumerate() {
            cumulative += h.counts[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{stage=\"{label}\",le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{stage=\"{label}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "{name}_sum{{stage=\"{label}\"}} {}",
            h.sum_ns as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{{stage=\"{label}\"}} {}", h.count);
    }
}

/// The adapters' budget refusals, failed handshakes and Retries, by transport.
pub fn render_adapters(
    out: &mut String,
    adapters: &std::collections::BTreeMap<
        relay_core::TransportKind,
        std::sync::Arc<relay_adapter::AdapterStats>,
    >,
) {
    let name = "mimi_relay_budget_refusals_total";
    let _ = writeln!(
        out,
        "# HELP {name} Peers refused for going over a per-peer or per-node budget.\n# TYPE {name} counter"
    );
    for (kind, st) in adapters {
        for b in relay_adapter::Budget::ALL {
            let _ = writeln!(
                out,
                "{name}{{transport=\"{kind}\",budget=\"{b}\"}} {}",
                st.refusals(b)
            );
        }
    }
    let name = "mimi_relay_failed_handshakes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Inbound connections that failed to authenticate.\n# TYPE {name} counter"
    );
    for (kind, st) in adapters {
        let _ = writeln!(
            out,
            "{name}{{transport=\"{kind}\"}} {}",
            st.failed_handshakes()
        );
    }
    let name = "mimi_relay_handshake_retries_total";
    let _ = writeln!(
        out,
        "# HELP {name} Inbound handshakes asked to validate their address first (QUIC Retry, under handshake load).\n# TYPE {name} counter"
    );
    for (kind, st) in adapters {
        let _ = writeln!(out, "{name}{{transport=\"{kind}\"}} {}", st.retries_sent());
    }
    let name = "mimi_relay_unsupported_endpoint_total";
    let _ = writeln!(
        out,
        "# HELP {name} Transmits refused because the peer does not serve the endpoint (HTTPS: not in its directory).\n# TYPE {name} counter"
    );
    for (kind, st) in adapters {
        let _ = writeln!(
            out,
            "{name}{{transport=\"{kind}\"}} {}",
            st.unsupported_endpoints()
        );
    }
    let name = "mimi_relay_source_penalties_total";
    let _ = writeln!(
        out,
        "# HELP {name} Penalties given to a source address (refused at its peer's connection cap, or failing handshakes): its next connections are refused before TLS for a growing window.\n# TYPE {name} counter"
    );
    for (kind, st) in adapters {
        let _ = writeln!(
            out,
            "{name}{{transport=\"{kind}\"}} {}",
            st.source_strikes()
        );
    }
}

/// Peers' refused requests, and the requests that waited because their peer was in debt.
pub fn render_pacer(out: &mut String, pacer: &relay_adapter::Pacer) {
    let name = "mimi_relay_peer_refusals_total";
    let _ = writeln!(
        out,
        "# HELP {name} Peer requests the node turned away (counted against the peer's refusal budget).\n# TYPE {name} counter\n{name} {}",
        pacer.refusals()
    );
    let name = "mimi_relay_paced_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Peer requests that waited because their peer was over its refusal budget (limits.max_refusals_per_s).\n# TYPE {name} counter\n{name} {}",
        pacer.paced()
    );
}

/// Requests refused before the core: a peer over its share, or the node over its total.
pub fn render_ingress(out: &mut String, (share, total): (u64, u64)) {
    let name = "mimi_relay_ingress_refusals_total";
    let _ = writeln!(
        out,
        "# HELP {name} Peer requests answered 503 before the core, by cause.\n# TYPE {name} counter\n{name}{{cause=\"peer_share\"}} {share}\n{name}{{cause=\"total\"}} {total}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, bound) in Histogram::BOUNDS_US.iter().enumerate() {
        cumulative += h.counts[i];
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_count() {
        let mut s = RelayStats::default();
        s.latency.record(std::time::Duration::from_micros(50));
        s.latency.record(std::time::Duration::from_micros(700));
        s.latency.record(std::time::Duration::from_secs(60));
        let text = render(&s, &StoreStats::default());
        assert!(text.contains("mimi_relay_delivery_latency_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("mimi_relay_delivery_latency_seconds_bucket{le=\"0.001\"} 2"));
        assert!(text.contains("mimi_relay_delivery_latency_seconds_bucket{le=\"10\"} 2"));
        assert!(text.contains("mimi_relay_delivery_latency_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("mimi_relay_rejects_total{reason=\"queue_full\"} 0"));
    }

    #[test]
    fn stage_histograms_have_fine_bounds_and_one_label_per_stage() {
        let mut store = StoreStats::default();
        let us = std::time::Duration::from_micros;
        store.stages.record(Stage::Core, us(3));
        store.stages.record(Stage::Core, us(5));
        store
            .stages
            .record(Stage::Core, std::time::Duration::from_nanos(5_001));
        store.stages.record(Stage::Core, us(40));
        store.stages.record(Stage::Inbox, us(20_000_000));
        let text = render(&RelayStats::default(), &store);
        for line in [
            "mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"0.000005\"} 2",
            "mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"0.00001\"} 3",
            "mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"0.00005\"} 4",
            "mimi_relay_stage_seconds_bucket{stage=\"core\",le=\"+Inf\"} 4",
            "mimi_relay_stage_seconds_count{stage=\"core\"} 4",
            "mimi_relay_stage_seconds_sum{stage=\"core\"} 0.000053001",
            "mimi_relay_stage_seconds_bucket{stage=\"inbox\",le=\"10\"} 0",
            "mimi_relay_stage_seconds_bucket{stage=\"inbox\",le=\"+Inf\"} 1",
            "mimi_relay_stage_seconds_count{stage=\"client_queue\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn policy_rejections_are_rendered() {
        let s = RelayStats {
            policy_rejections: 7,
            ..RelayStats::default()
        };
        let text = render(&s, &StoreStats::default());
        assert!(text.contains("# TYPE mimi_relay_policy_rejections_total counter"));
        assert!(text.contains("mimi_relay_policy_rejections_total 7"));
    }

    #[test]
    fn dead_letters_and_draft_mode_are_rendered_per_peer() {
        let mut s = RelayStats::default();
        let mut p = relay_core::PeerStats {
            draft_mode: true,
            dead_letters_dropped: 2,
            ..Default::default()
        };
        p.dead_letters.insert(relay_core::DeadCause::Status(403), 3);
        p.dead_letters.insert(relay_core::DeadCause::Unsupported, 1);
        s.peers.insert("b.example".parse().expect("domain"), p);
        s.peers.insert(
            "c.example".parse().expect("domain"),
            relay_core::PeerStats::default(),
        );
        let text = render(&s, &StoreStats::default());
        for line in [
            "mimi_relay_peer_draft_mode{peer=\"b.example\"} 1",
            "mimi_relay_peer_draft_mode{peer=\"c.example\"} 0",
            "mimi_relay_dead_letters_total{peer=\"b.example\",status=\"403\"} 3",
            "mimi_relay_dead_letters_total{peer=\"b.example\",status=\"unsupported\"} 1",
            "mimi_relay_dead_letters_dropped_total{peer=\"b.example\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn adapter_counters_are_rendered_per_transport() {
        use relay_adapter::{AdapterStats, Budget};
        use relay_core::TransportKind;
        let quic = std::sync::Arc::new(AdapterStats::default());
        quic.retry_sent();
        quic.retry_sent();
        quic.refused(Budget::Handshakes);
        let https = std::sync::Arc::new(AdapterStats::default());
        https.unsupported_endpoint();
        let adapters = [(TransportKind::Https, https), (TransportKind::Quic, quic)]
            .into_iter()
            .collect();
        let mut text = String::new();
        render_adapters(&mut text, &adapters);
        for line in [
            "mimi_relay_handshake_retries_total{transport=\"quic\"} 2",
            "mimi_relay_handshake_retries_total{transport=\"https\"} 0",
            "mimi_relay_budget_refusals_total{transport=\"quic\",budget=\"handshakes\"} 1",
            "mimi_relay_failed_handshakes_total{transport=\"quic\"} 0",
            "mimi_relay_unsupported_endpoint_total{transport=\"https\"} 1",
            "mimi_relay_unsupported_endpoint_total{transport=\"quic\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
