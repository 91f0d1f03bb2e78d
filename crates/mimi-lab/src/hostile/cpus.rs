//! Where each role of a hostile row runs. A real attacker's CPU is not on its victim's hub:
//! on a shared machine the flooder's own work would otherwise be taken from the hub and the
//! victim, and the lab would measure the attacker's CPU rather than the hub's fairness. So the
//! flooder's thread and the flooding provider's own node get a set of CPUs of their own, and
//! everything honest (the hub, the victim's node, the lab's driver and readers, the link
//! forwarder) the rest, in the quiet run as in the flooded one.

use std::io;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::model::Placement;

impl Placement {
    /// Splits the CPUs this process may use: the last quarter (at least one) for the attacker,
    /// the rest for the honest side. `Err` says why there is no split (a single CPU).
    pub fn plan() -> Result<Placement, String> {
        let mine = sched_getaffinity(Pid::from_raw(0)).map_err(|e| e.to_string())?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| mine.is_set(c).unwrap_or(false))
            .collect();
        Placement::split(&cpus)
    }

    fn split(cpus: &[usize]) -> Result<Placement, String> {
        if cpus.len() < 2 {
            return Err(format!(
                "{} CPU available: the flooder shares it with the hub",
                cpus.len()
            ));
        }
        let attacker = (cpus.len() / 4).max(1);
        let (honest, attacker) = cpus.split_at(cpus.len() - attacker);
        Ok(Placement {
            honest: honest.to_vec(),
            attacker: attacker.to_vec(),
        })
    }

    /// Pins every thread of this process to the honest CPUs; threads started later inherit
    /// the mask of the thread that starts them.
    pub fn pin_process(&self) -> io::Result<()> {
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread that ended meanwhile is no error.
            match sched_setaffinity(Pid::from_raw(tid), &set(&self.honest)?) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Pins the calling thread (and what it starts afterwards, threads and child processes) to
/// `cpus`.
pub fn pin_this_thread(cpus: &[usize]) -> io::Result<()> {
    sched_setaffinity(Pid::from_raw(0), &set(cpus)?).map_err(io::Error::from)
}

fn set(cpus: &[usize]) -> io::Result<CpuSet> {
    let mut s = CpuSet::new();
    for &c in cpus {
        s.set(c).map_err(io::Error::from)?;
    }
    Ok(s)
}

/// The CPUs a task may run on, as the kernel lists them (`Cpus_allowed_list` of its status,
/// "0-1" or "0,2"): what a role actually had, for the report.
pub fn allowed(status_path: &str) -> Option<String> {
    let s = std::fs::read_to_string(status_path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
}

/// Starts `cmd` from a thread pinned to `cpus`, so the child starts with that mask before it
/// starts any thread of its own.
pub fn spawn_pinned(
    cmd: &mut std::process::Command,
    cpus: Option<&[usize]>,
) -> io::Result<std::process::Child> {
    let Some(cpus) = cpus else {
        return cmd.spawn();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_this_thread(cpus)?;
            cmd.spawn()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_attacker_gets_its_own_cpus_and_the_honest_side_the_rest() {
        let p = Placement::split(&[0, 1]).unwrap();
        assert_eq!((p.honest, p.attacker), (vec![0], vec![1]));
        let p = Placement::split(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(p.honest, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.attacker, vec![6, 7]);
        assert!(Placement::split(&[3]).is_err());
    }

    #[test]
    fn a_pinned_child_starts_on_its_cpus() {
        let Ok(plan) = Placement::plan() else {
            return; // one CPU: nothing to split
        };
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("5");
        let mut child = spawn_pinned(&mut cmd, Some(&plan.attacker)).unwrap();
        let got = allowed(&format!("/proc/{}/status", child.id()));
        let _ = child.kill();
        let _ = child.wait();
        let want = plan
            .attacker
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // The kernel writes ranges ("2-3"); one CPU or a split of two reads the same.
        if plan.attacker.len() == 1 {
            assert_eq!(got.as_deref(), Some(want.as_str()));
        } else {
            assert!(got.is_some());
        }
        assert!(
            allowed("/proc/thread-self/status").is_some(),
            "this thread's own mask is readable"
        );
    }
}
