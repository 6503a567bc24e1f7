//! The agent's own counters, for the optional metrics endpoint of `jaunt agent`
//! (`--metrics-addr` / `agent.metrics_addr`; the `jaunt agent` command serves [`render`]).
//!
//! Today: the SSH connections a terminating agent refused or ended for bad input, by a stable
//! reason ([`SSH_REFUSALS`]): `jaunt_agent_ssh_refused_total{reason="..."}`; and where the
//! executor runs (`jaunt_agent_cpu_moves_total{to}`, `jaunt_agent_cpu_pinned`). Counters are
//! process-wide atomics (one agent per process; tests that run several agents in one process
//! see their sum).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why a terminated SSH connection was refused or ended, as counted (the `reason` label).
pub const SSH_REFUSALS: [&str; 10] = [
    // A packet or message that does not parse (sunset's transport or the relayed channel
    // protocol), or is too large.
    "malformed_packet",
    // Channel data beyond the window the other side granted.
    "window_overflow",
    // More channels than one connection may open.
    "channel_flood",
    // The certificate does not name the dialed login (or ssh asked for another user).
    "wrong_login",
    // The certificate is another Jaunt user's.
    "wrong_user",
    // The certificate is outside its validity period.
    "cert_expired",
    // Not signed by the cluster's user CA (another CA, a bad signature).
    "cert_untrusted",
    // A plain key, a host certificate, or bytes that are not a certificate.
    "not_a_certificate",
    // The user's ssh did not authenticate in time.
    "handshake_timeout",
    // A reason not above.
    "other",
];

static SSH_REFUSED: [AtomicU64; SSH_REFUSALS.len()] =
    [const { AtomicU64::new(0) }; SSH_REFUSALS.len()];

/// Counts one refused SSH connection; an unknown `reason` counts as `other`.
pub fn ssh_refused(reason: &str) {
    let i = SSH_REFUSALS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(SSH_REFUSALS.len() - 1);
    SSH_REFUSED[i].fetch_add(1, Ordering::Relaxed);
}

/// The count for `reason` so far.
pub fn ssh_refused_count(reason: &str) -> u64 {
    SSH_REFUSALS
        .iter()
        .position(|r| *r == reason)
        .map_or(0, |i| SSH_REFUSED[i].load(Ordering::Relaxed))
}

static CPU_PINS: AtomicU64 = AtomicU64::new(0);
static CPU_UNPINS: AtomicU64 = AtomicU64::new(0);
static CPU_PINNED: AtomicI64 = AtomicI64::new(-1);

/// The executor was pinned to `Some(cpu)` or unpinned (`None`) by `agent.cpu_placement`.
pub fn cpu_moved(to: Option<usize>) {
    match to {
        Some(cpu) => {
            CPU_PINS.fetch_add(1, Ordering::Relaxed);
            CPU_PINNED.store(i64::try_from(cpu).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
        None => {
            CPU_UNPINS.fetch_add(1, Ordering::Relaxed);
            CPU_PINNED.store(-1, Ordering::Relaxed);
        }
    }
}

/// The CPU the executor is pinned to, if it is.
pub fn cpu_pinned() -> Option<usize> {
    usize::try_from(CPU_PINNED.load(Ordering::Relaxed)).ok()
}

/// Every counter, in the Prometheus text format (0.0.4).
pub fn render() -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP jaunt_agent_ssh_refused_total SSH connections the agent refused or ended for \
         bad input, by reason.\n# TYPE jaunt_agent_ssh_refused_total counter\n",
    );
    for (i, reason) in SSH_REFUSALS.iter().enumerate() {
        let _ = writeln!(
            out,
            "jaunt_agent_ssh_refused_total{{reason=\"{reason}\"}} {}",
            SSH_REFUSED[i].load(Ordering::Relaxed)
        );
    }
    let _ = write!(
        out,
        "# HELP jaunt_agent_cpu_moves_total Times the executor was pinned beside a local \
         engine's shard or unpinned (agent.cpu_placement).\n# TYPE jaunt_agent_cpu_moves_total \
         counter\njaunt_agent_cpu_moves_total{{to=\"pinned\"}} {}\n\
         jaunt_agent_cpu_moves_total{{to=\"unpinned\"}} {}\n\
         # HELP jaunt_agent_cpu_pinned The CPU the executor is pinned to, -1 if none.\n\
         # TYPE jaunt_agent_cpu_pinned gauge\njaunt_agent_cpu_pinned {}\n",
        CPU_PINS.load(Ordering::Relaxed),
        CPU_UNPINS.load(Ordering::Relaxed),
        CPU_PINNED.load(Ordering::Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_stable_labels() {
        let before = ssh_refused_count("cert_untrusted");
        ssh_refused("cert_untrusted");
        ssh_refused("no such reason");
        assert_eq!(ssh_refused_count("cert_untrusted"), before + 1);
        let text = render();
        assert!(text.contains("jaunt_agent_ssh_refused_total{reason=\"window_overflow\"}"));
        assert!(text.contains(&format!(
            "jaunt_agent_ssh_refused_total{{reason=\"cert_untrusted\"}} {}",
            ssh_refused_count("cert_untrusted")
        )));
    }
}
