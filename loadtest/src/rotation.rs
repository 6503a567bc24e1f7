//! `--scenario rotation` (issue 13's benchmark): K emulated agents that follow CA rotation
//! phases as the real agent does (`emul.rs`, `follow`), and `jaunt ca rotate --type all` through
//! `init`, `update_clients`, `update_servers` and `standby` on the spawned cluster. Per phase:
//! the time from the command until every emulated agent has confirmed the new phase (control
//! acknowledged its `?confirmed=`), and until control's guard counts every connected agent as
//! confirmed (`jaunt status`, what `jaunt ca rotate` refuses on without `--force`). The users
//! log in again at the end (their certificates are from the CAs rotated away).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use crate::client::JauntUser;
use crate::cluster::Spawned;
use crate::emul;
use crate::procfs::{self, Watch};
use crate::progress::Progress;
use crate::report::{self, Row};
use crate::scenarios::{percentile, Sizes};

/// The phases the scenario goes through, in order.
pub const PHASES: [&str; 4] = ["init", "update_clients", "update_servers", "standby"];

/// How long one phase may take to be confirmed by every agent before the scenario fails.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// (connected agents, of them not confirmed) as control's guard counts them now, from `jaunt
/// status --format json` (each host's `ca_phase_confirmed`).
fn guard_view(spawned: &Spawned) -> anyhow::Result<(usize, usize)> {
    let text = spawned.admin(&["status", "--format", "json"], None)?;
    let st: serde_json::Value = serde_json::from_str(&text)?;
    let hosts = st["hosts"]
        .as_array()
        .ok_or_else(|| anyhow!("no hosts in jaunt status: {text}"))?;
    let connected = hosts.iter().filter(|h| h["connected"] == true).count();
    let unconfirmed = hosts
        .iter()
        .filter(|h| h["connected"] == true && h["ca_phase_confirmed"] == false)
        .count();
    Ok((connected, unconfirmed))
}

/// The first confirmation of each agent recorded at index `from` or later: (agent, (generation,
/// when)).
fn firsts_since(shared: &emul::Shared, from: usize) -> BTreeMap<usize, (String, Instant)> {
    let confirms = shared
        .confirms
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    let mut m = BTreeMap::new();
    for (i, generation, at) in confirms.into_iter().skip(from) {
        m.entry(i).or_insert((generation, at));
    }
    m
}

pub fn rotation(
    spawned: &mut Spawned,
    watch: &Watch,
    sizes: &Sizes,
    out: &Path,
) -> anyhow::Result<Vec<Row>> {
    let k = sizes.agents;
    let ids = emul::join_all(spawned, k, "rotation")?;
    let user = JauntUser::from_home(&spawned.home)?;
    let shared = Arc::new(emul::Shared::default());
    let handles = emul::start(ids, user.addr, user.name.clone(), shared.clone(), true, 1)?;
    let result = (|| -> anyhow::Result<Vec<Row>> {
        // Every agent up and confirming the current phase, and the guard agreeing.
        let deadline = Instant::now() + Duration::from_secs(60 + k as u64 / 10);
        {
            let progress =
                Progress::new("rotation: agents connected and confirmed", Some(k as u64));
            loop {
                let confirmed = firsts_since(&shared, 0).len();
                let connected = shared.connected.load(SeqCst);
                progress
                    .done
                    .store(confirmed.min(connected) as u64, Relaxed);
                if confirmed >= k && connected >= k {
                    // A busy control may close a handshake (load shedding): asked again.
                    if let Ok((in_guard, 0)) = guard_view(spawned) {
                        if in_guard >= k {
                            break;
                        }
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "only {connected} of {k} emulated agents connected and {confirmed} \
                         confirmed the CA phase; errors: {:?}",
                        shared
                            .first_errors
                            .lock()
                            .map(|e| e.clone())
                            .unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let mut rows = Vec::new();
        let mut curves = Vec::new();
        let mut previous: Option<String> = None;
        for phase in PHASES {
            let from = shared.confirms.lock().map(|c| c.len()).unwrap_or(0);
            let fetches0 = shared.fetches.load(SeqCst);
            let (renewals0, errors0, follow0, pushes0) = (
                shared.renewals.load(SeqCst),
                shared.poll_errors.load(SeqCst),
                shared.follow_errors.load(SeqCst),
                shared.pushes.load(SeqCst),
            );
            let downs0 = shared.downs.lock().map(|d| d.len()).unwrap_or(0);
            let before = watch.sample();
            let t0 = Instant::now();
            // Without --force: refused if control's guard still counts an agent unconfirmed
            // (it should not: the previous phase ended with the guard seeing every agent).
            // A handshake a busy engine closed carried no request: asked again, counted.
            let mut attempts = 0u64;
            loop {
                attempts += 1;
                match spawned.admin(&["ca", "rotate", "--type", "all", "--phase", phase], None) {
                    Ok(_) => break,
                    Err(e)
                        if attempts < 20 && format!("{e:#}").contains("during the handshake") =>
                    {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => bail!("phase {phase}: {e:#}"),
                }
            }
            let t_cmd = Instant::now();
            let progress = Progress::new(&format!("rotation: {phase} confirmed"), Some(k as u64));
            let mut t_guard = None;
            let mut guard_polls = 0u64;
            let mut guard_errors = 0u64;
            let firsts = loop {
                let firsts = firsts_since(&shared, from);
                progress.done.store(firsts.len() as u64, Relaxed);
                if t_guard.is_none() {
                    guard_polls += 1;
                    match guard_view(spawned) {
                        Ok((in_guard, 0)) if in_guard >= k => t_guard = Some(Instant::now()),
                        Ok(_) => {}
                        // A busy control may close a handshake (load shedding): asked again.
                        Err(_) => guard_errors += 1,
                    }
                }
                if firsts.len() >= k && t_guard.is_some() {
                    break firsts;
                }
                if t0.elapsed() > PHASE_DEADLINE {
                    bail!(
                        "phase {phase}: {} of {k} emulated agents confirmed within {:?}; the \
                         guard {}; errors: {:?}",
                        firsts.len(),
                        PHASE_DEADLINE,
                        if t_guard.is_some() {
                            "saw them all"
                        } else {
                            "did not see them all"
                        },
                        shared
                            .first_errors
                            .lock()
                            .map(|e| e.clone())
                            .unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            drop(progress);
            let cpu = procfs::delta(&before, &watch.sample());
            let generations: BTreeSet<&String> = firsts.values().map(|(g, _)| g).collect();
            if generations.len() != 1 {
                bail!("phase {phase}: the agents confirmed different generations: {generations:?}");
            }
            let generation = generations.into_iter().next().cloned().unwrap_or_default();
            if previous.as_ref() == Some(&generation) {
                bail!("phase {phase}: the CA generation did not change ({generation})");
            }
            previous = Some(generation);
            let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
            let mut ms: Vec<u64> = firsts
                .values()
                .map(|(_, t)| t.saturating_duration_since(t0).as_millis() as u64)
                .collect();
            ms.sort_unstable();
            let all = firsts.values().map(|(_, t)| *t).max().unwrap_or(t0);
            let t_guard = t_guard.unwrap_or(t0);
            let n = ms.len().max(1);
            curves.push((
                phase.to_string(),
                ms.iter()
                    .enumerate()
                    .map(|(i, v)| (*v as f64 / 1e3, (i + 1) as f64 * 100.0 / n as f64))
                    .collect::<Vec<_>>(),
            ));
            // The cadence the agents kept: fetches per agent over the phase (the follow's
            // confirmation is a fetch too).
            let fetches = shared.fetches.load(SeqCst) - fetches0;
            let lost = shared
                .downs
                .lock()
                .map(|d| d.len().saturating_sub(downs0))
                .unwrap_or(0);
            rows.push(
                Row::new("rotation", &format!("{k} emulated, {phase}"), "jaunt")
                    .metric("agents", k as u64)
                    .metric("rotate_command_s", secs(t_cmd))
                    .metric("rotate_attempts", attempts)
                    .metric("confirmed_p50_s", percentile(&ms, 0.5) / 1e3)
                    .metric("confirmed_p99_s", percentile(&ms, 0.99) / 1e3)
                    .metric("all_confirmed_s", secs(all))
                    .metric("guard_all_confirmed_s", secs(t_guard))
                    .metric("guard_polls", guard_polls)
                    .metric("guard_poll_errors", guard_errors)
                    .metric("policy_fetches", fetches as u64)
                    .metric(
                        "mean_s_between_fetches",
                        secs(all) * k as f64 / (fetches.max(1) as f64),
                    )
                    .metric(
                        "host_certs_renewed",
                        (shared.renewals.load(SeqCst) - renewals0) as u64,
                    )
                    .metric(
                        "policy_fetch_errors",
                        (shared.poll_errors.load(SeqCst) - errors0) as u64,
                    )
                    .metric(
                        "follow_errors",
                        (shared.follow_errors.load(SeqCst) - follow0) as u64,
                    )
                    .metric(
                        "policies_pushed",
                        (shared.pushes.load(SeqCst) - pushes0) as u64,
                    )
                    .metric("tunnels_lost", lost as u64)
                    .work(cpu, "1k agents", k as f64 / 1000.0),
            );
        }
        let svg = report::svg_chart(
            &format!(
                "{k} emulated agents: CA phase confirmations after `jaunt ca rotate --type all`"
            ),
            "seconds since the command",
            "agents confirmed (%)",
            &curves,
            false,
        );
        std::fs::write(out.join("rotation-confirmed.svg"), svg)?;
        if let Some(last) = rows.last_mut() {
            last.notes.push(format!(
                "rotation: {k} emulated agents (one tunnel each, as in `agents`) that also run the real agent's policy poll every {} s: `GET /v1/agent/policy?confirmed=GEN` with the host certificate, a new version compiled, a new CA generation followed (host CAs written, host certificate renewed through `POST /v1/hosts/renew` when control asks, the next tunnel's TLS rebuilt) and confirmed at once; pushed policies are read off the tunnel. Times are from the start of `jaunt ca rotate --type all --phase P` (no --force); `all_confirmed_s` when control acknowledged the last agent's confirmation; `guard_all_confirmed_s` the end of the first `jaunt status` that counted every connected agent (the emulated ones and the cluster's own `jaunt agent`) as confirmed, polled back to back (`guard_polls` of them, `guard_poll_errors` of which failed, e.g. a handshake a busy engine closed, and were asked again); `mean_s_between_fetches` = agents x all_confirmed_s / policy_fetches (the confirmations count as fetches), to see whether the 5 s cadence held; plot: rotation-confirmed.svg",
                jaunt_control::agent_host::policy_delay(0).as_secs()
            ));
        }
        Ok(rows)
    })();
    shared.stop.store(true, SeqCst);
    for h in handles {
        let _ = h.join();
    }
    // The users' certificates and trust are from the CAs rotated away: log them in again for
    // the scenarios that follow.
    let relogin = spawned.relogin();
    let rows = result?;
    relogin.map_err(|e| e.context("logging the users in again after the rotation"))?;
    Ok(rows)
}
