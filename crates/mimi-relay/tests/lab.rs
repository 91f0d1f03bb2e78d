//! The transport lab end to end, short: `mimi-relay bench` on loopback (lan), and, as root, in
//! network namespaces through the lab's forwarder with the `lossy` profile. Each asserts the
//! rows of results.json exist and that nothing was lost, duplicated or reordered.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

/// One lab run at a time: two would compete for the same cores and skew each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bench(args: &[&str]) -> (Vec<Value>, tempfile::TempDir) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_mimi-relay"))
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out.path())
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "mimi-relay bench failed: {}\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(out.path().join("report.md").exists());
    (rows, out)
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
        assert_clean(row(&rows, t, "lan"));
    }
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
    }
    for t in ["quic", "https"] {
        let r = row(&rows, t, "lossy");
        assert!(r["recovery_ms"].as_f64().is_some(), "{t}: no recovery time");
    }
}
