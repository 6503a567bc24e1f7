//! CPU time and resident memory of processes, from `/proc`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux in practice).
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of `pid` in seconds (all its threads), or `None` if it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) → indexes 11 and 12 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// The parent pid of `pid`.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and all its descendants (nginx's master and workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some(pp) = ppid(p) {
                    all.push((p, pp));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for (p, pp) in &all {
            if *pp == parent && !out.contains(p) {
                out.push(*p);
            }
        }
        i += 1;
    }
    out
}

/// VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Named groups of processes whose CPU time is tracked across a scenario.
#[derive(Clone, Debug, Default)]
pub struct Watch {
    /// Name → pids (a group is summed: nginx master + workers).
    pub groups: BTreeMap<String, Vec<u32>>,
}

impl Watch {
    pub fn new() -> Watch {
        Watch::default()
    }

    pub fn add(&mut self, name: &str, pids: Vec<u32>) {
        self.groups.insert(name.to_string(), pids);
    }

    /// Current CPU seconds per group (processes that are gone count 0).
    pub fn sample(&self) -> BTreeMap<String, f64> {
        group_sums(&self.sample_pids())
    }

    /// Current CPU seconds per process, by group.
    pub fn sample_pids(&self) -> PidSample {
        self.groups
            .iter()
            .map(|(name, pids)| {
                let per: Vec<(u32, f64)> = pids
                    .iter()
                    .filter_map(|p| cpu_seconds(*p).map(|s| (*p, s)))
                    .collect();
                (name.clone(), per)
            })
            .collect()
    }
}

/// Current CPU seconds of every watched process, per group (processes that are gone are left
/// out).
pub type PidSample = BTreeMap<String, Vec<(u32, f64)>>;

/// CPU seconds per group of a per-process sample.
pub fn group_sums(sample: &PidSample) -> BTreeMap<String, f64> {
    sample
        .iter()
        .map(|(name, per)| (name.clone(), per.iter().map(|(_, s)| s).sum()))
        .collect()
}

/// For each group of more than one process: how many of its processes spent at least a tenth of
/// the group's CPU between two samples. Which processes did the work: nginx's chain served by one
/// worker (both hops in one process, 2 sleeps per request) reads 1, by two workers 2.
pub fn busy(before: &PidSample, after: &PidSample) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (group, now) in after {
        let Some(then) = before.get(group) else {
            continue;
        };
        if now.len() < 2 {
            continue;
        }
        let spent: Vec<f64> = now
            .iter()
            .map(|(pid, s)| {
                let was = then.iter().find(|(p, _)| p == pid).map_or(0.0, |(_, v)| *v);
                (s - was).max(0.0)
            })
            .collect();
        let total: f64 = spent.iter().sum();
        let n = if total > 0.0 {
            spent.iter().filter(|s| **s >= total / 10.0).count()
        } else {
            0
        };
        out.insert(group.clone(), n);
    }
    out
}

/// CPU seconds spent per group between two samples.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).copied().unwrap_or(0.0)).max(0.0),
            )
        })
        .collect()
}

/// Short description of this machine for the report.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    serde_json::json!({
        "cpu": model,
        "cores": cores,
        "kernel": kernel,
        "memory_gib": (mem_kib as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        "loadavg": loadavg(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod busy_tests {
    use super::*;

    #[test]
    fn busy_counts_the_processes_that_did_the_work() {
        let g = |v: &[(u32, f64)]| -> PidSample {
            let mut m = BTreeMap::new();
            m.insert("nginx".to_string(), v.to_vec());
            m.insert("jaunt".to_string(), vec![(9, 1.0)]);
            m
        };
        let before = g(&[(1, 0.1), (2, 5.0), (3, 7.0)]);
        // One worker served both hops: the master and the other worker barely moved.
        let one = g(&[(1, 0.1), (2, 9.0), (3, 7.05)]);
        assert_eq!(busy(&before, &one)["nginx"], 1);
        // Two workers shared it.
        let two = g(&[(1, 0.1), (2, 7.0), (3, 9.0)]);
        assert_eq!(busy(&before, &two)["nginx"], 2);
        // Single-process groups are not counted; idle groups count 0.
        assert!(!busy(&before, &two).contains_key("jaunt"));
        assert_eq!(busy(&before, &before)["nginx"], 0);
        // A process that appeared in between counts from 0.
        let new = g(&[(1, 0.1), (2, 5.0), (3, 7.0), (4, 3.0)]);
        assert_eq!(busy(&before, &new)["nginx"], 1);
    }
}
