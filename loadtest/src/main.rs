//! Jaunt's load-test harness: drives real TLS traffic through a Jaunt cluster (its own with
//! `--spawn`, or a running one with `--proxy`), measures rates, latencies, memory and the CPU
//! seconds every process spent per unit of work, and with `compare` runs the same traffic
//! through nginx and HAProxy in the same run. See BENCHMARKS.md, "Load tests".

mod backend;
mod client;
mod cluster;
mod compare;
mod emul;
mod peers;
mod procfs;
mod progress;
mod report;
mod rotation;
mod scenarios;
mod soak;
mod soak_env;
mod takeover;

// The allocator of the `jaunt` binary the emulated agents stand in for (glibc's malloc was 10%
// of the harness's CPU in a 9,900-agent reconnect).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, ValueEnum};
use serde_json::json;

use client::{JauntUser, Target};
use procfs::Watch;
use report::Row;
use scenarios::Sizes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Run the scenarios against Jaunt.
    Run,
    /// Also run handshake, bulk and rr through nginx and HAProxy in the same run.
    Compare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Restart {
    Term,
    Crash,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BulkDirection {
    Both,
    Upload,
    Download,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Scenario {
    Handshake,
    Bulk,
    Rr,
    Streams,
    Idle,
    Lock,
    Agents,
    /// CA rotation phases followed by `--agents` emulated agents (only when asked for).
    Rotation,
    /// A connect loop's latency across `jaunt start --takeover` (only when asked for; it
    /// replaces the spawned daemon).
    Takeover,
    /// The long mixed run (only when asked for; on its own cluster).
    Soak,
}

/// Jaunt's load-test harness.
#[derive(Parser, Debug)]
#[command(name = "loadtest", version)]
struct Cli {
    /// `run` (default) or `compare` (adds nginx and HAProxy as same-run baselines).
    #[arg(value_enum)]
    mode: Option<Mode>,
    /// Start a local dev cluster, agent and backend, and tear them down at the end.
    #[arg(long, conflicts_with = "proxy")]
    spawn: bool,
    /// A running cluster's public address instead (with --home and --app; only the handshake,
    /// bulk, rr and streams scenarios, which need no admin access).
    #[arg(long, requires_all = ["home", "app"])]
    proxy: Option<String>,
    /// With --proxy: a `$JAUNT_HOME` logged in to that cluster.
    #[arg(long)]
    home: Option<PathBuf>,
    /// With --proxy: a TCP app pointing at this loadtest's backend (see --backend).
    #[arg(long)]
    app: Option<String>,
    /// Where the loadtest's own backend listens (the TCP app's target with --proxy).
    #[arg(long, default_value = "127.0.0.1:0")]
    backend: String,
    /// Scenarios to run (repeatable); default: all but rotation, takeover and soak (compare:
    /// handshake, bulk, rr).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Run the scenarios this many times. In `compare`, every other round runs the baselines
    /// before Jaunt, and the comparison gives each path's median and Jaunt's ratio to each
    /// baseline per round (median and range): this host's speed moves between minutes, and a
    /// ratio is only taken within a round.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Reduced sizes: every scenario in a few seconds (CI).
    #[arg(long)]
    smoke: bool,
    /// Where results.json, summary.md and the SVG plots go.
    #[arg(long, default_value = "loadtest/results")]
    out: PathBuf,
    /// The `jaunt` binary (default: next to this one).
    #[arg(long)]
    jaunt: Option<PathBuf>,
    /// Seconds per handshake/streams variant.
    #[arg(long)]
    seconds: Option<f64>,
    /// Client threads for the rate scenarios.
    #[arg(long)]
    threads: Option<usize>,
    /// MiB per bulk direction.
    #[arg(long)]
    bulk_mib: Option<u64>,
    /// Bulk directions to run: `both` (default), or only `upload` or `download` (to profile one).
    #[arg(long, value_enum, default_value = "both")]
    bulk_direction: BulkDirection,
    /// Requests in rr.
    #[arg(long)]
    requests: Option<usize>,
    /// Idle sessions (idle) and live sessions (lock).
    #[arg(long)]
    sessions: Option<usize>,
    /// Emulated agents (agents and rotation scenarios).
    #[arg(long)]
    agents: Option<usize>,
    /// How the agents scenario restarts the engine: `term` (SIGTERM, drain, start) or `crash`
    /// (SIGKILL, start).
    #[arg(long, value_enum, default_value = "term")]
    restart: Restart,
    /// Soak size: user streams to open (the other operations are paced to them; default
    /// 1,000,000, with --smoke 3,000).
    #[arg(long)]
    soak_opens: Option<u64>,
    /// Seconds between soak samples (default 5; with --smoke 0.5).
    #[arg(long)]
    soak_interval: Option<f64>,
    /// `audit.retention` of the soak's cluster (default 10m; with --smoke 8s).
    #[arg(long)]
    soak_retention: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => {}
        Ok(false) => {
            cluster::emergency_teardown();
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            cluster::emergency_teardown();
            std::process::exit(2);
        }
    }
}

/// What runs the traffic: a spawned cluster or a running one.
struct Setup {
    spawned: Option<cluster::Spawned>,
    user: JauntUser,
    app: String,
    backend: String,
}

fn wait_for_app(user: &JauntUser, app: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = user.target(app);
    loop {
        match target.connect(false) {
            Ok(c) => {
                c.close();
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("the app {app} never became reachable")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    cluster::install_signal_teardown()?;
    let mode = cli.mode.unwrap_or(Mode::Run);
    let mut sizes = if cli.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    if let Some(v) = cli.seconds {
        sizes.seconds = v;
    }
    if let Some(v) = cli.threads {
        sizes.threads = v;
    }
    if let Some(v) = cli.bulk_mib {
        sizes.bulk_bytes = v << 20;
    }
    sizes.bulk_variants = match cli.bulk_direction {
        BulkDirection::Both => &["upload", "download"],
        BulkDirection::Upload => &["upload"],
        BulkDirection::Download => &["download"],
    };
    if let Some(v) = cli.requests {
        sizes.requests = v;
    }
    if let Some(v) = cli.sessions {
        sizes.idle = v;
        sizes.lock = v;
    }
    if let Some(v) = cli.agents {
        sizes.agents = v;
    }
    let mut wanted: Vec<Scenario> = if cli.scenarios.is_empty() {
        match mode {
            Mode::Run => Scenario::value_variants()
                .iter()
                .copied()
                .filter(|s| !matches!(s, Scenario::Soak | Scenario::Rotation | Scenario::Takeover))
                .collect(),
            Mode::Compare => vec![Scenario::Handshake, Scenario::Bulk, Scenario::Rr],
        }
    } else {
        cli.scenarios.clone()
    };
    wanted.sort();
    wanted.dedup();
    if !cli.spawn && cli.proxy.is_none() {
        bail!("pass --spawn (start a local cluster) or --proxy HOST:PORT --home DIR --app NAME");
    }
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if wanted.contains(&Scenario::Soak) {
        if wanted.len() > 1 || !cli.spawn || mode != Mode::Run {
            bail!("--scenario soak runs alone, with --spawn (it starts its own cluster)");
        }
        return run_soak(&cli, &command);
    }

    let backend = backend::start(&cli.backend)?;
    if wanted
        .iter()
        .any(|s| matches!(s, Scenario::Agents | Scenario::Rotation))
    {
        // One socket per emulated tunnel here and in the daemon (which inherits the limit):
        // agents x shards (the dev cluster has at most 2), and room for the rest.
        let want = (sizes.agents as u64) * 2 + 4096;
        match emul::sys::raise_open_files(want) {
            Ok(n) if n >= want => {}
            Ok(n) => eprintln!(
                "loadtest: warning: open files are limited to {n} (the hard limit; raising it \
                 needs CAP_SYS_RESOURCE) and {} emulated agents need about {want} here and in \
                 the daemon: dials beyond the limit fail. Run with `ulimit -Hn {want}` where \
                 allowed, or fewer --agents",
                sizes.agents
            ),
            Err(e) => eprintln!(
                "loadtest: warning: could not raise the open-files limit to {want} ({e}): \
                 dials beyond the limit fail"
            ),
        }
    }
    let mut setup = if cli.spawn {
        let jaunt = cluster::find_jaunt(cli.jaunt.as_deref())?;
        eprintln!("loadtest: starting a dev cluster with {}", jaunt.display());
        let spawned = cluster::Spawned::start(&jaunt, &backend)?;
        let user = JauntUser::from_home(&spawned.home)?;
        Setup {
            spawned: Some(spawned),
            user,
            app: cluster::APP.to_string(),
            backend: backend.clone(),
        }
    } else {
        let home = cli
            .home
            .clone()
            .ok_or_else(|| anyhow!("--proxy needs --home"))?;
        let user = JauntUser::from_home(&home)?;
        Setup {
            spawned: None,
            user,
            app: cli.app.clone().unwrap_or_default(),
            backend: backend.clone(),
        }
    };
    wait_for_app(&setup.user, &setup.app)?;
    eprintln!("loadtest: cluster ready; scenarios: {wanted:?}");

    let me = std::process::id();
    let mut jaunt_watch = Watch::new();
    if let Some(s) = &setup.spawned {
        jaunt_watch.add("jaunt", vec![s.daemon.pid()]);
        if let Some(a) = s.agent_pid() {
            jaunt_watch.add("agent", vec![a]);
        }
    }
    jaunt_watch.add("loadtest", vec![me]);
    let mut self_watch = Watch::new();
    self_watch.add("loadtest", vec![me]);

    let peer_dir = tempfile::Builder::new()
        .prefix("loadtest-peers")
        .tempdir()?;
    cluster::register_temp(peer_dir.path());
    let mut peer_targets: Vec<(String, Target, Watch)> = Vec::new();
    let mut _peer_procs: Vec<Box<dyn std::any::Any>> = Vec::new();
    if mode == Mode::Compare {
        let cert = peers::make_cert(peer_dir.path())?;
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        if let Some(n) = peers::Nginx::start(peer_dir.path(), &cert, &setup.backend, workers)? {
            let mut w = Watch::new();
            w.add("nginx", n.pids());
            w.add("loadtest", vec![me]);
            peer_targets.push(("nginx".into(), n.one_hop.clone(), w.clone()));
            peer_targets.push(("nginx-2hop".into(), n.two_hop.clone(), w));
            // The same chain with each hop in its own nginx (its own master and workers), as
            // Jaunt's engine and agent are two processes: in `nginx-2hop` one worker may serve
            // both hops of a connection, which no two-host deployment can.
            if let Some(front) = peers::Nginx::start_front(
                peer_dir.path(),
                &cert,
                &setup.backend,
                workers,
                n.inner_port,
            )? {
                let mut w = Watch::new();
                w.add("nginx", n.pids());
                w.add("nginx-front", front.pids());
                w.add("loadtest", vec![me]);
                peer_targets.push(("nginx-2proc".into(), front.two_hop.clone(), w));
                _peer_procs.push(Box::new(front));
            }
            _peer_procs.push(Box::new(n));
        }
        if let Some(h) = peers::Haproxy::start(peer_dir.path(), &cert, &setup.backend, workers)? {
            let mut w = Watch::new();
            w.add("haproxy", vec![h.proc_.pid()]);
            w.add("loadtest", vec![me]);
            peer_targets.push(("haproxy".into(), h.target.clone(), w));
            _peer_procs.push(Box::new(h));
        }
    }

    let jaunt_target = setup.user.target(&setup.app);
    let direct = Target::Direct {
        addr: setup.backend.parse()?,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut errors: Vec<serde_json::Value> = Vec::new();
    let mut skipped: Vec<serde_json::Value> = Vec::new();
    for (round, sc) in (1..=cli.rounds).flat_map(|r| wanted.iter().map(move |sc| (r, sc))) {
        let name = format!("{sc:?}").to_lowercase();
        if cli.rounds > 1 {
            eprintln!("loadtest: {name}, round {round} of {}", cli.rounds);
        } else {
            eprintln!("loadtest: {name}");
        }
        // Rounds alternate the order of Jaunt and the baselines, so that neither always runs
        // in the earlier minutes.
        let jaunt_first = round % 2 == 1;
        let started = Instant::now();
        let result: anyhow::Result<Vec<Row>> = match sc {
            Scenario::Handshake => (|| {
                let mut r = Vec::new();
                let jaunt = |r: &mut Vec<Row>| -> anyhow::Result<()> {
                    r.extend(scenarios::handshake_web(&setup.user, &jaunt_watch, &sizes)?);
                    r.extend(scenarios::handshake_echo(
                        "jaunt",
                        &jaunt_target,
                        &jaunt_watch,
                        &sizes,
                    )?);
                    Ok(())
                };
                if jaunt_first {
                    jaunt(&mut r)?;
                }
                for (path, t, w) in &peer_targets {
                    r.extend(scenarios::handshake_echo(path, t, w, &sizes)?);
                }
                if !jaunt_first {
                    jaunt(&mut r)?;
                }
                Ok(r)
            })(),
            Scenario::Bulk => (|| {
                let mut r = scenarios::bulk("direct", &direct, &self_watch, &sizes)?;
                let jaunt = || scenarios::bulk("jaunt", &jaunt_target, &jaunt_watch, &sizes);
                if jaunt_first {
                    r.extend(jaunt()?);
                }
                for (path, t, w) in &peer_targets {
                    r.extend(scenarios::bulk(path, t, w, &sizes)?);
                }
                if !jaunt_first {
                    r.extend(jaunt()?);
                }
                Ok(r)
            })(),
            Scenario::Rr => (|| {
                let (base_row, base) = scenarios::rr("direct", &direct, &self_watch, &sizes)?;
                let mut series = vec![("direct TCP".to_string(), scenarios::cdf(&base))];
                let mut r = vec![base_row];
                let mut jaunt = |r: &mut Vec<Row>| -> anyhow::Result<()> {
                    let (row, lat) = scenarios::rr("jaunt", &jaunt_target, &jaunt_watch, &sizes)?;
                    series.push((
                        "jaunt (engine + tunnel + agent)".to_string(),
                        scenarios::cdf(&lat),
                    ));
                    r.push(scenarios::added_latency(row, &lat, &base));
                    Ok(())
                };
                if jaunt_first {
                    jaunt(&mut r)?;
                }
                let mut peer_series = Vec::new();
                for (path, t, w) in &peer_targets {
                    let (row, lat) = scenarios::rr(path, t, w, &sizes)?;
                    peer_series.push((path.clone(), scenarios::cdf(&lat)));
                    r.push(scenarios::added_latency(row, &lat, &base));
                }
                if !jaunt_first {
                    jaunt(&mut r)?;
                }
                series.extend(peer_series);
                let svg = report::svg_chart(
                    &format!("rr: {} B echo latency, one connection", sizes.message),
                    "latency (µs, log scale)",
                    "percentile",
                    &series,
                    true,
                );
                std::fs::write(cli.out.join("rr-latency.svg"), svg)?;
                if let Some(last) = r.last_mut() {
                    last.notes.push("rr: latency distribution in rr-latency.svg; added_* = path minus the direct TCP baseline of the same run, per percentile".into());
                }
                Ok(r)
            })(),
            Scenario::Streams => scenarios::streams(&setup.user, &setup.app, &jaunt_watch, &sizes),
            Scenario::Idle => match &setup.spawned {
                Some(s) => scenarios::idle(
                    &setup.user,
                    &setup.app,
                    s.daemon.pid(),
                    s.agent_pid(),
                    &jaunt_watch,
                    &sizes,
                ),
                None => Err(anyhow!("skipped: needs --spawn (process ids)")),
            },
            Scenario::Lock => match &setup.spawned {
                Some(s) => scenarios::lock(s, &setup.app, &jaunt_watch, &sizes),
                None => Err(anyhow!("skipped: needs --spawn (admin access)")),
            },
            Scenario::Agents => match setup.spawned.as_mut() {
                Some(s) => scenarios::agents(
                    cli.restart == Restart::Crash,
                    s,
                    &mut jaunt_watch,
                    &sizes,
                    &cli.out,
                ),
                None => Err(anyhow!("skipped: needs --spawn (engine restart)")),
            },
            Scenario::Rotation => match setup.spawned.as_mut() {
                Some(s) => rotation::rotation(s, &jaunt_watch, &sizes, &cli.out),
                None => Err(anyhow!("skipped: needs --spawn (admin access)")),
            },
            Scenario::Takeover => match setup.spawned.as_mut() {
                Some(s) => takeover::takeover(s, &setup.app, &mut jaunt_watch, &sizes, &cli.out),
                None => Err(anyhow!("skipped: needs --spawn (replaces the daemon)")),
            },
            // Handled before the shared cluster starts (run_soak).
            Scenario::Soak => Err(anyhow!("skipped: soak runs alone")),
        };
        match result {
            Ok(r) => {
                eprintln!(
                    "loadtest: {name} done in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                rows.extend(r.into_iter().map(|mut row| {
                    row.round = round;
                    row
                }));
            }
            Err(e) if setup.spawned.is_none() && format!("{e}").starts_with("skipped") => {
                eprintln!("loadtest: {name} {e}");
                if round == 1 {
                    skipped.push(json!({"scenario": name, "why": format!("{e}")}));
                }
            }
            Err(e) => {
                eprintln!("loadtest: {name} failed: {e:#}");
                errors.push(json!({"scenario": name, "round": round, "error": format!("{e:#}")}));
            }
        }
    }

    let machine = procfs::machine();
    let mut md = report::markdown(&machine, &rows, &command);
    if mode == Mode::Compare {
        md.push_str(&compare::table(&rows, cli.rounds));
    }
    if !errors.is_empty() {
        md.push_str("## Errors\n\n");
        for e in &errors {
            md.push_str(&format!("- {}: {}\n", e["scenario"], e["error"]));
        }
    }
    let results = json!({
        "command": command,
        "mode": format!("{mode:?}").to_lowercase(),
        "smoke": cli.smoke,
        "machine": machine,
        "sizes": {
            "seconds": sizes.seconds, "threads": sizes.threads, "bulk_bytes": sizes.bulk_bytes,
            "requests": sizes.requests, "message": sizes.message, "idle": sizes.idle,
            "lock": sizes.lock, "agents": sizes.agents,
        },
        "scenarios": wanted.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>(),
        "rounds": cli.rounds,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "compare": if mode == Mode::Compare { compare::to_json(&rows) } else { json!([]) },
        "errors": errors,
        "skipped": skipped,
    });
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(cli.out.join("summary.md"), &md)?;
    println!("{md}");
    eprintln!("loadtest: results in {}", cli.out.display());
    drop(_peer_procs);
    if let Some(s) = setup.spawned.as_mut() {
        s.stop();
    }
    Ok(errors.is_empty())
}

/// `--scenario soak`: its own cluster (a config file with `audit.retention`), its own report.
fn run_soak(cli: &Cli, command: &str) -> anyhow::Result<bool> {
    let mut size = if cli.smoke {
        soak::SoakSize::smoke()
    } else {
        soak::SoakSize::full()
    };
    if let Some(v) = cli.soak_opens {
        size.opens = v.max(2);
    }
    if let Some(v) = cli.soak_interval {
        size.interval = v;
    }
    if let Some(v) = &cli.soak_retention {
        size.retention = v.clone();
    }
    if let Some(v) = cli.threads {
        size.threads = v;
    }
    let backend = backend::start(&cli.backend)?;
    let jaunt = cluster::find_jaunt(cli.jaunt.as_deref())?;
    eprintln!(
        "loadtest: soak of {} user streams with {} (retention {}, a sample every {} s)",
        size.opens,
        jaunt.display(),
        size.retention,
        size.interval
    );
    let (rows, soak_md, ok) = soak::run(&jaunt, &backend, &size, &cli.out)?;
    let machine = procfs::machine();
    let mut md = report::markdown(&machine, &[], command);
    md.push_str(&soak_md);
    let results = json!({
        "command": command,
        "mode": "run",
        "smoke": cli.smoke,
        "machine": machine,
        "scenarios": ["soak"],
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "errors": if ok { vec![] } else { vec![json!({"scenario": "soak", "error": "a soak check failed: see summary.md"})] },
        "skipped": [],
    });
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(cli.out.join("summary.md"), &md)?;
    println!("{md}");
    eprintln!("loadtest: results in {}", cli.out.display());
    Ok(ok)
}
