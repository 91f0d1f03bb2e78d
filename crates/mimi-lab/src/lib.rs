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
//! The demo harness (`mimi-relay demo`, [`demo`]) lives here too: both start their nodes with
//! [`fleet`], which writes each node's config as the node's own file type.
//!
//! Modules: [`model`] (options and result rows, no I/O), `stats` (figures from deliveries),
//! `payload` (the marked messages), `driver` (the load loops and inbox readers),
//! `orchestrate` (a run: rows, nodes, phases), [`netlab`] (namespaces and the impaired link),
//! `hostile` (the flood scenario), `mls` (real MLS traffic), `pump` (the bare baselines),
//! `stages` and `report` (the nodes' stage metrics, tables and plots), `cli` (`BenchArgs`).

mod cli;
pub mod demo;
mod driver;
pub mod fleet;
mod hostile;
mod mls;
pub mod model;
pub mod netlab;
mod orchestrate;
mod payload;
mod pump;
mod report;
mod stages;
mod stats;

use std::sync::Mutex;

pub use cli::{BenchArgs, main};
pub use hostile::{CpuShares, FloodCounts, Hostile, HostileLimits};
pub use model::{BenchOptions, BenchReport, NetMode, Repeat, Row, SizeMix, Traffic, inflight_of};
pub use netlab::Profile;
pub use orchestrate::{check_transport, run};
pub use stages::{StageFigure, TimelinePoint};

// The names the lab's modules reach as `super::` (mls.rs, pump.rs, ...).
use driver::{Admin, CALL_BYTES, SUBMIT_PATIENCE, settle, wait_window};
use model::unit;
use netlab::NetLab;
use orchestrate::Progress;
use payload::{PROBE_STREAM, ciphertext, find_marker, marker_bytes, provider, room_id};
use stats::{CpuSnap, Rx, cpu_us, cpu_us_at, fill_latency, median_f64, median_u64, recovery_ms};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
