//! `compare`'s summary: Jaunt's proxy CPU and rr latencies beside nginx's and HAProxy's, with
//! the ratios (markdown for `summary.md`, JSON for `results.json`'s `compare`).
//!
//! With `--rounds N` every measure has one value per round and path. A ratio is only ever taken
//! within a round, between runs of the same minutes; the summary gives each path's median over
//! the rounds and, per baseline, the median of the per-round ratios with their range. With one
//! round that is the single run's value and ratio, as before `--rounds` existed.
//!
//! Not here: running the traffic ([`crate::scenarios`]), the per-scenario tables of every row
//! ([`crate::report`]), the order in which a round runs Jaunt and the baselines (`main.rs`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::report::Row;

/// The paths a compare summary has columns for, Jaunt first.
const PATHS: [&str; 5] = ["jaunt", "nginx", "nginx-2hop", "nginx-2proc", "haproxy"];

/// One line of the summary: a value per round and path.
#[derive(Debug)]
pub struct Measure {
    pub label: &'static str,
    /// round → path → value.
    pub values: BTreeMap<u32, BTreeMap<&'static str, f64>>,
}

/// The per-round ratios of Jaunt to one baseline, and their median and range.
#[derive(Debug, PartialEq)]
pub struct Ratios {
    pub per_round: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Measure {
    fn new(label: &'static str) -> Measure {
        Measure {
            label,
            values: BTreeMap::new(),
        }
    }

    fn put(&mut self, round: u32, path: &'static str, v: f64) {
        self.values.entry(round).or_default().insert(path, v);
    }

    /// `path`'s values, in round order.
    pub fn of(&self, path: &str) -> Vec<f64> {
        self.values
            .values()
            .filter_map(|m| m.get(path).copied())
            .collect()
    }

    /// The median of `path`'s values over the rounds.
    pub fn median(&self, path: &str) -> Option<f64> {
        median(self.of(path))
    }

    /// Jaunt over `peer`, taken in each round that measured both (and the peer above 0).
    pub fn ratios(&self, peer: &str) -> Option<Ratios> {
        let per_round: Vec<f64> = self
            .values
            .values()
            .filter_map(|m| match (m.get("jaunt"), m.get(peer)) {
                (Some(j), Some(o)) if *o > 0.0 => Some(j / o),
                _ => None,
            })
            .collect();
        let median = median(per_round.clone())?;
        let min = per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let max = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Ratios {
            per_round,
            median,
            min,
            max,
        })
    }
}

/// The median (the mean of the middle two for an even count); `None` for no values.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Proxy CPU (every group but the loadtest itself) per unit of `row`.
pub fn proxy_cpu(row: &Row) -> f64 {
    row.cpu_per_unit()
        .iter()
        .filter(|(k, _)| k.as_str() != "loadtest")
        .map(|(_, v)| v)
        .sum()
}

fn path_key(path: &str) -> Option<&'static str> {
    PATHS.iter().copied().find(|p| *p == path)
}

/// Proxy CPU per unit × `scale` of the rows of `scenario` (and `variant`, if given), per round
/// and path.
fn cpu_measure(
    rows: &[Row],
    label: &'static str,
    scenario: &str,
    variant: Option<&str>,
    scale: f64,
) -> Measure {
    let mut m = Measure::new(label);
    let wanted = |r: &&Row| r.scenario == scenario && variant.is_none_or(|v| r.variant == v);
    for r in rows.iter().filter(wanted) {
        if let Some(p) = path_key(&r.path) {
            m.put(r.round, p, proxy_cpu(r) * scale);
        }
    }
    m
}

/// The summary's measures from all rows of all rounds.
pub fn measures(rows: &[Row]) -> Vec<Measure> {
    let mut out = Vec::new();
    // Jaunt's user path and the peers' one-hop or chained TLS termination, each with an echo.
    for (variant, label) in [
        ("full+echo", "CPU µs per full handshake (+ echo)"),
        ("resumed+echo", "CPU µs per resumed handshake (+ echo)"),
    ] {
        out.push(cpu_measure(rows, label, "handshake", Some(variant), 1000.0));
    }
    // The engine alone (TLS + a ping answered by the engine, no backend) against the peers'
    // one-hop TLS termination with an echo from the backend.
    for (jv, pv, label) in [
        (
            "full+ping",
            "full+echo",
            "CPU µs per full handshake; jaunt = engine web route (ping, no tunnel)",
        ),
        (
            "resumed+ping",
            "resumed+echo",
            "CPU µs per resumed handshake; jaunt = engine web route",
        ),
    ] {
        let mut m = Measure::new(label);
        for r in rows.iter().filter(|r| r.scenario == "handshake") {
            let path = if r.path == "jaunt-web" && r.variant == jv {
                Some("jaunt")
            } else if r.path != "jaunt" && r.variant == pv {
                path_key(&r.path)
            } else {
                None
            };
            if let Some(p) = path {
                m.put(r.round, p, proxy_cpu(r) * 1000.0);
            }
        }
        out.push(m);
    }
    for (variant, label) in [
        ("upload", "CPU s per GiB, upload"),
        ("download", "CPU s per GiB, download"),
    ] {
        out.push(cpu_measure(rows, label, "bulk", Some(variant), 1.0));
    }
    // rr's unit is 1k requests: CPU seconds per 1k requests are ms, × 1000 µs per request.
    out.push(cpu_measure(
        rows,
        "rr CPU µs per request",
        "rr",
        None,
        1000.0,
    ));
    for (key, label) in [
        ("added_p50_us", "rr added p50 µs"),
        ("added_p99_us", "rr added p99 µs"),
    ] {
        let mut m = Measure::new(label);
        for r in rows.iter().filter(|r| r.scenario == "rr") {
            if let (Some(p), Some(v)) = (
                path_key(&r.path),
                r.metrics.get(key).and_then(|v| v.as_f64()),
            ) {
                m.put(r.round, p, v);
            }
        }
        out.push(m);
    }
    out
}

/// The markdown table: each path's median, and Jaunt's per-round ratio to each baseline (its
/// median, and with more than one round the range).
pub fn table(rows: &[Row], rounds: u32) -> String {
    let mut out = String::from("## Comparison (proxy processes only; same run)\n\n");
    if rounds > 1 {
        out.push_str(&format!(
            "Medians over {rounds} rounds; a ratio is Jaunt's value over the baseline's in the same round, shown as the median of the rounds' ratios (lowest-highest). The rounds alternate which runs first.\n\n"
        ));
    }
    out.push_str("| measure | jaunt | nginx | nginx 2 hops | nginx 2 processes | haproxy | jaunt / nginx | jaunt / nginx 2 hops | jaunt / nginx 2 processes | jaunt / haproxy |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for m in measures(rows) {
        if m.values.is_empty() {
            continue;
        }
        let mut cells = vec![m.label.to_string()];
        for p in PATHS {
            cells.push(
                m.median(p)
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "—".into()),
            );
        }
        for p in &PATHS[1..] {
            cells.push(match m.ratios(p) {
                Some(r) if r.per_round.len() > 1 => {
                    format!("{:.2}x ({:.2}-{:.2}x)", r.median, r.min, r.max)
                }
                Some(r) => format!("{:.2}x", r.median),
                None => "—".into(),
            });
        }
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out.push_str("\nJaunt's CPU is the daemon (control + engine) plus the agent; nginx's is its master and workers (both hops for `nginx 2 hops`; both instances for `nginx 2 processes`, one instance per hop); HAProxy's its one process. The loadtest's own CPU (clients and backend) is excluded here and listed per scenario above.\n\n");
    out
}

/// `results.json`'s `compare`: per measure, every round's value per path, the medians, and
/// Jaunt's ratio to each baseline per round with its median and range.
pub fn to_json(rows: &[Row]) -> Value {
    let mut list = Vec::new();
    for m in measures(rows) {
        if m.values.is_empty() {
            continue;
        }
        let mut values = serde_json::Map::new();
        let mut medians = serde_json::Map::new();
        let mut ratios = serde_json::Map::new();
        for p in PATHS {
            let v = m.of(p);
            if v.is_empty() {
                continue;
            }
            values.insert(p.into(), json!(v));
            medians.insert(p.into(), json!(m.median(p)));
            if p != "jaunt" {
                if let Some(r) = m.ratios(p) {
                    ratios.insert(
                        p.into(),
                        json!({"per_round": r.per_round, "median": r.median, "min": r.min, "max": r.max}),
                    );
                }
            }
        }
        list.push(json!({
            "measure": m.label,
            "values": values,
            "median": medians,
            "jaunt_ratio": ratios,
        }));
    }
    Value::Array(list)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The measure whose label starts with `label`.
    fn find<'a>(ms: &'a [Measure], label: &str) -> &'a Measure {
        ms.iter().find(|m| m.label.starts_with(label)).unwrap()
    }

    /// A row of 2 units at `per_unit` proxy CPU seconds each (and the loadtest's own CPU, which
    /// the summary leaves out).
    fn row(
        round: u32,
        scenario: &str,
        variant: &str,
        path: &str,
        unit: &str,
        per_unit: f64,
    ) -> Row {
        let mut cpu = BTreeMap::new();
        cpu.insert("proxy".to_string(), per_unit * 2.0);
        cpu.insert("loadtest".to_string(), 9.0);
        let mut r = Row::new(scenario, variant, path).work(cpu, unit, 2.0);
        r.round = round;
        r
    }

    fn bulk(round: u32, path: &str, variant: &str, cpu_s_per_gib: f64) -> Row {
        row(round, "bulk", variant, path, "GiB", cpu_s_per_gib)
    }

    #[test]
    fn medians_are_robust_to_one_odd_round() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![5.0, 1.0, 100.0]), Some(5.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn ratios_are_taken_within_a_round() {
        // Each round's ratio is 0.5, 0.8, 1.0: median 0.8. The ratio of the medians (1.25 over
        // 1.5, 0.83) would mix minutes in which the host ran at different speeds.
        let rows = vec![
            bulk(1, "jaunt", "upload", 1.0),
            bulk(1, "nginx-2hop", "upload", 2.0),
            bulk(2, "nginx-2hop", "upload", 1.25),
            bulk(2, "jaunt", "upload", 1.0),
            bulk(3, "jaunt", "upload", 1.5),
            bulk(3, "nginx-2hop", "upload", 1.5),
            // A round that measured Jaunt only gives no ratio.
            bulk(4, "jaunt", "upload", 9.0),
        ];
        let ms = measures(&rows);
        let up = find(&ms, "CPU s per GiB, upload");
        // The loadtest's own CPU is left out.
        assert_eq!(up.of("jaunt"), vec![1.0, 1.0, 1.5, 9.0]);
        assert_eq!(up.median("jaunt"), Some(1.25));
        assert_eq!(up.median("nginx-2hop"), Some(1.5));
        let r = up.ratios("nginx-2hop").unwrap();
        assert_eq!(r.per_round, vec![0.5, 0.8, 1.0]);
        assert_eq!((r.median, r.min, r.max), (0.8, 0.5, 1.0));
        assert!(up.ratios("haproxy").is_none());

        let md = table(&rows, 4);
        assert!(md.contains("Medians over 4 rounds"), "{md}");
        assert!(
            md.contains("| CPU s per GiB, upload | 1.25 | — | 1.50 | — | — | — | 0.80x (0.50-1.00x) | — | — |"),
            "{md}"
        );
        // Measures nothing was measured for are left out.
        assert!(!md.contains("rr added p50"), "{md}");

        let j = to_json(&rows);
        let up = &j[0];
        assert_eq!(up["measure"], "CPU s per GiB, upload");
        assert_eq!(up["values"]["jaunt"], json!([1.0, 1.0, 1.5, 9.0]));
        assert_eq!(up["jaunt_ratio"]["nginx-2hop"]["median"], json!(0.8));
        assert_eq!(
            up["jaunt_ratio"]["nginx-2hop"]["per_round"],
            json!([0.5, 0.8, 1.0])
        );
    }

    #[test]
    fn one_round_reads_as_a_single_run() {
        let rows = vec![
            bulk(1, "jaunt", "download", 1.6),
            bulk(1, "nginx-2proc", "download", 2.0),
        ];
        let md = table(&rows, 1);
        assert!(!md.contains("Medians over"), "{md}");
        assert!(
            md.contains(
                "| CPU s per GiB, download | 1.60 | — | — | 2.00 | — | — | — | 0.80x | — |"
            ),
            "{md}"
        );
    }

    #[test]
    fn rr_lines_are_cpu_per_request_and_added_latency() {
        // CPU seconds per 1k requests.
        let rows: Vec<Row> = [("jaunt", 0.125, 40.0), ("nginx-2proc", 0.25, 32.0)]
            .into_iter()
            .map(|(path, cpu, p50)| {
                row(1, "rr", "64B echo", path, "1k requests", cpu).metric("added_p50_us", p50)
            })
            .collect();
        let ms = measures(&rows);
        let cpu = find(&ms, "rr CPU µs per request");
        assert_eq!(cpu.of("jaunt"), vec![125.0]);
        assert_eq!(cpu.ratios("nginx-2proc").unwrap().median, 0.5);
        let p50 = find(&ms, "rr added p50 µs");
        assert_eq!(p50.ratios("nginx-2proc").unwrap().median, 1.25);
        // No bulk rows: the bulk lines have nothing.
        assert!(ms
            .iter()
            .filter(|m| m.label.starts_with("CPU s per GiB"))
            .all(|m| m.values.is_empty()));
    }

    #[test]
    fn the_web_route_line_pairs_jaunt_web_with_the_peers_echo() {
        let rows: Vec<Row> = [
            ("jaunt-web", "full+ping", 0.125),
            ("jaunt", "full+echo", 0.375),
            ("nginx", "full+echo", 0.5),
        ]
        .into_iter()
        .map(|(path, variant, cpu)| row(1, "handshake", variant, path, "1k handshakes", cpu))
        .collect();
        let ms = measures(&rows);
        let web = find(&ms, "CPU µs per full handshake; jaunt = engine web");
        assert_eq!(web.of("jaunt"), vec![125.0]);
        assert_eq!(web.ratios("nginx").unwrap().median, 0.25);
        let user = find(&ms, "CPU µs per full handshake (+ echo)");
        assert_eq!(user.of("jaunt"), vec![375.0]);
        assert_eq!(user.ratios("nginx").unwrap().median, 0.75);
    }
}
