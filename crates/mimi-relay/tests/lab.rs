//! The transport lab end to end, short: `mimi-relay bench` on loopback (lan), and, as root, in
//! network namespaces through the lab's forwarder with the `lossy` profile. Each asserts the
//! rows of results.json exist and that nothing was lost, duplicated or reordered.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One lab run at a time: two would compete for the same cores and skew each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The longest one lab run of these tests may take: the rows bound themselves well below this,
/// so reaching it means the harness itself is wedged.
const WATCHDOG: Duration = Duration::from_secs(900);

fn bench(args: &[&str]) -> (Vec<Value>, tempfile::TempDir) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mimi-relay"))
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out.path())
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes on threads, so that a full pipe cannot stall the child.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + WATCHDOG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    if !status.is_some_and(|s| s.success()) {
        panic!(
            "mimi-relay bench {}\n{stdout}\n{stderr}\n{}",
            status.map_or(format!("was killed after {WATCHDOG:?}"), |s| format!(
                "failed: {s}"
            )),
            node_logs(out.path())
        );
    }
    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(out.path().join("report.md").exists());
    // A row that failed keeps its nodes' logs under work/: show them with the failure.
    if rows
        .iter()
        .any(|r| r["status"] != "ok" && r["status"] != "gap")
    {
        eprintln!("{stderr}\n{}", node_logs(out.path()));
    }
    (rows, out)
}

/// The last lines of every node log the lab kept (it keeps those of failed rows).
fn node_logs(out: &Path) -> String {
    let mut text = String::new();
    let Ok(rows) = std::fs::read_dir(out.join("work")) else {
        return text;
    };
    for dir in rows.flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.path().extension().is_some_and(|e| e == "log") {
                let log = std::fs::read_to_string(f.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                text += &format!("--- {}\n", f.path().display());
                for l in tail.into_iter().rev() {
                    text += l;
                    text += "\n";
                }
            }
        }
    }
    text
}

fn row<'a>(rows: &'a [Value], transport: &str, profile: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["transport"] == transport && r["profile"] == profile)
        .unwrap_or_else(|| panic!("no row for {transport}/{profile}"))
}

fn assert_clean(r: &Value) {
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["msgs_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["delivered"].as_u64().unwrap() > 0, "{r}");
    for k in ["lost", "duplicated", "out_of_order"] {
        assert_eq!(r[k].as_u64(), Some(0), "{k} in {r}");
    }
    // mls rows: every message decrypted (synthetic rows have no such figure).
    if r["traffic"] == "mls" {
        assert_eq!(r["decrypt_failures"].as_u64(), Some(0), "{r}");
    }
    for k in ["p50_us", "p99_us", "p999_us", "cpu_us_per_msg", "setup_ms"] {
        assert!(!r[k].is_null(), "{k} missing in {r}");
    }
    assert!(r["p50_us"].as_u64() <= r["p99_us"].as_u64());
}

#[test]
fn lan_on_loopback_delivers_everything_once_in_order() {
    let (rows, out) = bench(&[
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--duration",
        "2",
        "--rooms",
        "4",
        "--rate",
        "200",
    ]);
    for t in ["https", "quic", "bare-quinn", "bare-tls"] {
        let r = row(&rows, t, "lan");
        assert_clean(r);
        // Loopback shares the host's counters with everything else: no figure rather than a wrong one.
        assert!(r["socket_drops"].is_null(), "{r}");
    }
    // The relay rows carry MLS by default; the baselines are not the relay and carry bytes.
    assert_eq!(row(&rows, "quic", "lan")["traffic"], "mls");
    assert_eq!(row(&rows, "bare-quinn", "lan")["traffic"], "synthetic");
    // Every transport the core names has a row: measured, or reported as a gap of this build.
    for t in ["xmpp", "matrix"] {
        let r = row(&rows, t, "lan");
        assert!(
            r["status"] == "ok" || r["status"] == "gap",
            "{t}: {}",
            r["status"]
        );
        if r["status"] == "ok" {
            assert_clean(r);
        }
    }
    assert!(out.path().join("latency-cdf-lan.svg").exists());
}

#[test]
fn closed_loop_batches_stay_in_order_within_the_window() {
    // Small windows and calls, so the front end waits on full windows and splits its bursts.
    let (rows, _out) = bench(&[
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--transports",
        "https,quic,bare-quinn",
        "--duration",
        "1",
        "--rooms",
        "4",
        "--window",
        "8",
        "--submit-batch",
        "5",
    ]);
    for t in ["https", "quic", "bare-quinn"] {
        let r = row(&rows, t, "lan");
        assert_clean(r);
        assert!(r["delivered"].as_u64().unwrap() > 100, "{t}: {r}");
    }
}

#[test]
fn repeated_rows_give_each_run_and_their_median() {
    let (rows, out) = bench(&[
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--transports",
        "quic,bare-quinn",
        "--duration",
        "1",
        "--rooms",
        "2",
        "--rate",
        "100",
        "--repeat",
        "3",
    ]);
    assert_eq!(rows.len(), 2, "one row per transport, not per run");
    for t in ["quic", "bare-quinn"] {
        let r = row(&rows, t, "lan");
        assert_clean(r);
        let runs = r["repeats"].as_array().unwrap();
        assert_eq!(runs.len(), 3, "{r}");
        let mut p99: Vec<u64> = runs.iter().map(|x| x["p99_us"].as_u64().unwrap()).collect();
        p99.sort_unstable();
        assert_eq!(
            r["p99_us"].as_u64(),
            Some(p99[1]),
            "the median run's p99: {r}"
        );
        // Three runs of about 100 messages each are counted together.
        assert!(r["delivered"].as_u64().unwrap() >= 3 * 90, "{r}");
    }
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(report.contains("3 runs of every row"), "{report}");
    assert!(report.contains("Each run (in round order"), "{report}");
}

/// The row of `transport`'s `run` ("quiet" or "flood") of a hostile lab.
fn hostile_row<'a>(rows: &'a [Value], transport: &str, run: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["transport"] == transport && r["hostile"] == run)
        .unwrap_or_else(|| panic!("no {run} row for {transport}"))
}

#[test]
fn a_flooding_follower_is_refused_while_the_victim_gets_everything_once() {
    let (rows, out) = bench(&[
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--transports",
        "https,quic,xmpp,matrix,bare-tls",
        "--duration",
        "2",
        "--rooms",
        "2",
        "--rate",
        "100",
        "--hostile",
        "flood",
    ]);
    assert!(
        rows.iter().all(|r| r["transport"] != "bare-tls"),
        "a baseline has no relay to flood"
    );
    assert_eq!(
        rows.len(),
        8,
        "a quiet and a flooded row per relay transport"
    );
    for t in ["https", "quic", "xmpp", "matrix"] {
        let (quiet, flood) = (
            hostile_row(&rows, t, "quiet"),
            hostile_row(&rows, t, "flood"),
        );
        // Status ok: no node exited (that fails the row); the victim got every message once,
        // in order, in both runs.
        assert_clean(quiet);
        assert_clean(flood);
        assert_eq!(flood["followers"], 2, "{flood}");
        assert_eq!(flood["sent"], flood["delivered"], "{flood}");
        for k in ["victim_p99_ratio", "victim_rate_ratio"] {
            assert!(flood[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {flood}");
        }
        let peak = flood["hub_peak_rss_bytes"].as_u64().unwrap();
        assert!(peak > 1 << 20, "{flood}");
        assert!(quiet["hub_peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
        // The budget stands on the quiet run's peak.
        assert!(
            flood["rss_budget_bytes"].as_u64().unwrap()
                > quiet["hub_peak_rss_bytes"].as_u64().unwrap(),
            "{flood}"
        );
        assert!(flood["targets_met"].is_boolean(), "{flood}");
        assert!(
            flood["cpu"]["hub"].as_f64().is_some_and(|x| x > 0.0),
            "{flood}"
        );
        // The flood reached the hub and was refused there: answers with refusal statuses,
        // counted by the hub itself too.
        let f = &flood["flood"];
        assert!(f["sent"].as_u64().unwrap() > 0, "{f}");
        assert!(f["connections"].as_u64().unwrap() > 0, "{f}");
        assert!(f["refused_4xx"].as_u64().unwrap() > 0, "{t}: {f}");
        assert!(f["refused_2xx"].as_u64().unwrap() > 0, "{t}: {f}");
        let counters = flood["hub_refusals"].as_object().unwrap();
        assert!(
            counters.keys().any(|k| k.starts_with("rejects_total")),
            "{t}: the hub's core refused nothing: {counters:?}"
        );
        assert!(
            counters
                .keys()
                .any(|k| k.starts_with("budget_refusals_total")),
            "{t}: no adapter budget refused the flood: {counters:?}"
        );
        assert!(quiet["flood"].is_null(), "{quiet}");
        assert!(
            quiet["hub_refusals"].is_null(),
            "nothing hostile in the quiet run: {quiet}"
        );
    }
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(report.contains("## Hostile peer: flood"), "{report}");
    assert!(report.contains("RSS budget"), "{report}");
}

fn namespaces_usable() -> bool {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0);
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    root && ip && std::path::Path::new("/dev/net/tun").exists()
}

#[test]
fn lossy_profile_in_namespaces_loses_nothing() {
    if !namespaces_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the namespace test: it needs root, iproute2 and /dev/net/tun"
        );
        eprintln!("skipping: network namespaces need root, iproute2 and /dev/net/tun");
        return;
    }
    let (rows, _out) = bench(&[
        "--net",
        "netns",
        "--profile",
        "lossy",
        "--transports",
        "quic,https,bare-quinn,bare-tls",
        "--duration",
        "2",
        "--rooms",
        "4",
        "--rate",
        "200",
    ]);
    for t in ["quic", "https", "bare-quinn", "bare-tls"] {
        let r = row(&rows, t, "lossy");
        assert_clean(r);
        assert_eq!(r["net"], "netns");
        assert!(r["wire_bytes_per_msg"].as_f64().unwrap() > 0.0);
        // 40 ms RTT through the forwarder: nothing arrives faster than one way.
        assert!(r["p50_us"].as_u64().unwrap() >= 20_000, "{r}");
        // The kernel's counter was read inside the namespaces.
        assert!(r["socket_drops"].as_u64().is_some(), "{r}");
    }
    for t in ["quic", "https"] {
        let r = row(&rows, t, "lossy");
        assert!(r["recovery_ms"].as_f64().is_some(), "{t}: no recovery time");
    }
}

#[test]
fn every_row_names_its_in_flight_limit_and_inflight_sets_it_for_all() {
    let common = [
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--transports",
        "https,quic,bare-quinn",
        "--duration",
        "1",
        "--rooms",
        "2",
        "--rate",
        "200",
    ];
    // Defaults: each transport its own, the baseline none of the relay's.
    let (rows, out) = bench(&common);
    assert_eq!(row(&rows, "https", "lan")["inflight"].as_u64(), Some(1));
    assert_eq!(row(&rows, "quic", "lan")["inflight"].as_u64(), Some(64));
    assert!(row(&rows, "bare-quinn", "lan")["inflight"].is_null());
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(report.contains("| in flight |"), "{report}");
    // --inflight: the same limit for every relay transport, and still everything once in order.
    let mut args = common.to_vec();
    args.extend(["--inflight", "4"]);
    let (rows, _out) = bench(&args);
    for t in ["https", "quic"] {
        let r = row(&rows, t, "lan");
        assert_clean(r);
        assert_eq!(r["inflight"].as_u64(), Some(4), "{t}: {r}");
    }
}

#[test]
fn mls_traffic_decrypts_everything_once_in_order() {
    // Real openmls groups: both providers send into every room and decrypt; commits (6/s)
    // move the epochs on while messages fly, so some are refused as of an old epoch and
    // encrypted again. The commits take turns: self-updates, adds and removes of spare
    // clients (key claim, Welcome, AppDataUpdate), role changes; a spare decrypts what its
    // epochs carry, and the counts below include its deliveries.
    let (rows, out) = bench(&[
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--transports",
        "quic,https",
        "--traffic",
        "mls",
        "--mls-frank",
        "--commit-rate",
        "6",
        "--duration",
        "3",
        "--rooms",
        "4",
        "--window",
        "16",
    ]);
    for t in ["quic", "https"] {
        let r = row(&rows, t, "lan");
        assert_eq!(r["traffic"], "mls", "{r}");
        assert_clean(r);
        assert_eq!(r["decrypt_failures"].as_u64(), Some(0), "{r}");
        // Every accepted message was franked by the hub and its frank verified by at least
        // its other provider's receiver (a frank that fails counts as a failure above).
        let (sent, franks) = (r["sent"].as_u64().unwrap(), r["franks_verified"].as_u64());
        assert!(franks.unwrap() >= sent && sent > 0, "{t}: {r}");
        assert!(r["commits"].as_u64().unwrap() > 0, "{t}: {r}");
        // Each kind of commit was accepted at least once, and some spare joined by its
        // Welcome and left by applying its own removal.
        let kinds = &r["commit_kinds"];
        for k in [
            "self_update",
            "add",
            "remove",
            "role",
            "spares_joined",
            "spares_left",
        ] {
            assert!(kinds[k].as_u64().unwrap() > 0, "{t}: no {k}: {kinds}");
        }
        assert_eq!(kinds["add"], kinds["spares_joined"], "{t}: {kinds}");
        assert!(r["retries"].as_u64().is_some(), "{r}");
        // A PrivateMessage of a 1 KiB plaintext (MIMI content): header, AAD with the
        // franking tag, padding-free AEAD, signature.
        let size = r["mls_msg_bytes"].as_f64().unwrap();
        assert!((1024.0..1400.0).contains(&size), "{t}: {size}");
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("MLS traffic"), "{md}");

    // Deferred decryption: recorded on arrival, decrypted later, all of it checked; commits
    // applied ahead of the held messages (a spare client applies them in order). Encrypted
    // ahead: pools replayed, the commits planned before the phase with the pools of the
    // epochs they start. An open loop, so that the pools (its schedule) stay small.
    let (rows, _out) = bench(&[
        "--net",
        "loopback",
        "--profile",
        "lan",
        "--transports",
        "quic",
        "--traffic",
        "mls",
        "--mls-decrypt",
        "deferred",
        "--mls-encrypt",
        "ahead",
        "--commit-rate",
        "6",
        "--duration",
        "2",
        "--rooms",
        "4",
        "--rate",
        "3000",
    ]);
    let r = row(&rows, "quic", "lan");
    assert_clean(r);
    assert_eq!(r["mls_decrypt"], "deferred", "{r}");
    assert_eq!(r["decrypt_failures"].as_u64(), Some(0), "{r}");
    // Bare lab payloads: the hub franks none.
    assert_eq!(r["franks_verified"].as_u64(), Some(0), "{r}");
    assert!(r["decrypted_after_phase"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["mls_encrypt"], "ahead", "{r}");
    let (sent, pooled) = (
        r["sent"].as_u64().unwrap(),
        r["encrypted_ahead"].as_u64().unwrap(),
    );
    assert!(pooled <= sent, "{r}");
    // Planned, the commits leave the pools in use: without plans, every room a commit moved
    // on (most of them, at 6 commits a second) would encrypt inline from then on.
    assert!(pooled as f64 >= 0.9 * sent as f64, "{r}");
    assert!(r["commits"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["commits_refused"].as_u64(), Some(0), "{r}");
    let kinds = &r["commit_kinds"];
    for k in ["self_update", "add", "role", "spares_joined"] {
        assert!(kinds[k].as_u64().unwrap() > 0, "no {k}: {kinds}");
    }
    assert_eq!(kinds["add"], kinds["spares_joined"], "{kinds}");
}
