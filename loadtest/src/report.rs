//! Results: one [`Row`] per measured variant, written as JSON (`results.json`), a markdown
//! summary (`summary.md` and stdout), and SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

/// One measured variant of a scenario.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub variant: String,
    /// Which path: `jaunt`, `direct`, `nginx`, `nginx-2hop`, `nginx-2proc`, `haproxy`.
    pub path: String,
    pub metrics: Map<String, Value>,
    /// CPU seconds per process group.
    pub cpu: BTreeMap<String, f64>,
    /// The unit CPU is normalised to (`GiB`, `1k handshakes`, `1k requests`, ...) and how many
    /// of it were done.
    pub unit: String,
    pub units: f64,
    pub notes: Vec<String>,
    /// Which round of `--rounds` measured it (from 1).
    pub round: u32,
}

impl Row {
    pub fn new(scenario: &str, variant: &str, path: &str) -> Row {
        Row {
            scenario: scenario.into(),
            variant: variant.into(),
            path: path.into(),
            metrics: Map::new(),
            cpu: BTreeMap::new(),
            unit: String::new(),
            units: 0.0,
            notes: Vec::new(),
            round: 1,
        }
    }

    pub fn metric(mut self, k: &str, v: impl Into<Value>) -> Row {
        self.metrics.insert(k.into(), v.into());
        self
    }

    pub fn work(mut self, cpu: BTreeMap<String, f64>, unit: &str, units: f64) -> Row {
        self.cpu = cpu;
        self.unit = unit.into();
        self.units = units;
        self
    }

    /// `busy_<group>` for each multi-process group ([`crate::procfs::busy`]).
    pub fn busy(mut self, busy: &BTreeMap<String, usize>) -> Row {
        for (group, n) in busy {
            self.metrics
                .insert(format!("busy_{group}"), Value::from(*n as u64));
        }
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.notes.push(n.into());
        self
    }

    /// CPU seconds per unit of work, per process group.
    pub fn cpu_per_unit(&self) -> BTreeMap<String, f64> {
        self.cpu
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if self.units > 0.0 {
                        v / self.units
                    } else {
                        0.0
                    },
                )
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "variant": self.variant,
            "path": self.path,
            "metrics": self.metrics,
            "cpu_seconds": self.cpu,
            "unit": self.unit,
            "units": self.units,
            "cpu_seconds_per_unit": self.cpu_per_unit(),
            "notes": self.notes,
            "round": self.round,
        })
    }
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f == 0.0 {
                "0".into()
            } else if n.is_u64() || n.is_i64() {
                group(f as i64)
            } else if f.abs() >= 100.0 {
                group(f.round() as i64)
            } else if f.abs() >= 1.0 {
                format!("{f:.2}")
            } else {
                format!("{f:.4}")
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// CPU per unit as a readable figure: µs or ms or s.
fn fmt_cpu(seconds: f64) -> String {
    if seconds == 0.0 {
        "0".into()
    } else if seconds < 0.01 {
        format!("{:.0} µs", seconds * 1e6)
    } else if seconds < 10.0 {
        format!("{:.3} s", seconds)
    } else {
        format!("{:.1} s", seconds)
    }
}

/// The markdown summary: one table per scenario.
pub fn markdown(machine: &Value, rows: &[Row], command: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# loadtest results\n");
    let _ = writeln!(out, "Command: `{command}`\n");
    let _ = writeln!(
        out,
        "Machine: {} ({} cores, {} GiB, Linux {}), {} build, load average {} at the end.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["build"].as_str().unwrap_or("?"),
        machine["loadavg"],
    );
    let mut scenarios: Vec<&str> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    for s in scenarios {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.scenario == s).collect();
        let _ = writeln!(out, "## {s}\n");
        // Columns: metrics (union, in order of first appearance) and CPU groups.
        let mut keys: Vec<String> = Vec::new();
        let mut groups: Vec<String> = Vec::new();
        for r in &rows {
            for k in r.metrics.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
            for g in r.cpu.keys() {
                if !groups.contains(g) {
                    groups.push(g.clone());
                }
            }
        }
        let rounds = rows.iter().any(|r| r.round > 1);
        let mut header = vec!["path".to_string(), "variant".to_string()];
        if rounds {
            header.push("round".into());
        }
        header.extend(keys.iter().cloned());
        header.push("CPU per".into());
        header.extend(groups.iter().map(|g| format!("CPU {g}")));
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
        for r in &rows {
            let mut cells = vec![r.path.clone(), r.variant.clone()];
            if rounds {
                cells.push(r.round.to_string());
            }
            for k in &keys {
                cells.push(r.metrics.get(k).map(fmt_value).unwrap_or_default());
            }
            cells.push(r.unit.clone());
            let per = r.cpu_per_unit();
            for g in &groups {
                cells.push(per.get(g).map(|v| fmt_cpu(*v)).unwrap_or_default());
            }
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        // Each note once (rows of several rounds repeat them).
        let mut notes: Vec<&String> = Vec::new();
        for n in rows.iter().flat_map(|r| r.notes.iter()) {
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(out);
            for n in notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        let _ = writeln!(out);
    }
    out
}

/// A line chart as a standalone SVG. `log_x` uses a log10 x axis (latencies).
pub fn svg_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let (w, h) = (720.0, 420.0);
    let (ml, mr, mt, mb) = (70.0, 20.0, 40.0, 50.0);
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, y) in pts {
        x0 = x0.min(tx(*x));
        x1 = x1.max(tx(*x));
        y1 = y1.max(*y);
    }
    if x0 >= x1 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let px = |x: f64| ml + (tx(x) - x0) / (x1 - x0) * (w - ml - mr);
    let py = |y: f64| h - mb - y / y1 * (h - mt - mb);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<line x1="{ml}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        w / 2.0,
        esc(title),
        h - mb,
        w - mr,
        h - mb,
        h - mb,
        (ml + w - mr) / 2.0,
        h - 12.0,
        esc(x_label),
        (mt + h - mb) / 2.0,
        (mt + h - mb) / 2.0,
        esc(y_label)
    );
    // Ticks: 5 on y; x: decades on a log axis, else 5.
    for i in 0..=5 {
        let y = y1 * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{py}" x2="{}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            w - mr,
            ml - 5.0,
            py(y) + 4.0,
            short(y),
            py = py(y)
        );
    }
    let xticks: Vec<f64> = if log_x {
        (x0.floor() as i32..=x1.ceil() as i32)
            .map(|e| 10f64.powi(e))
            .filter(|v| tx(*v) >= x0 - 1e-9 && tx(*v) <= x1 + 1e-9)
            .collect()
    } else {
        (0..=5).map(|i| x0 + (x1 - x0) * i as f64 / 5.0).collect()
    };
    for x in xticks {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            h - mb + 16.0,
            short(x)
        );
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            ml + 10.0,
            mt + 8.0 + 16.0 * i as f64,
            ml + 28.0,
            mt + 12.0 + 16.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Several line charts stacked in one SVG, sharing the x axis (seconds into the run), with
/// vertical marks (the kill). Each panel: (title, y label, series).
pub type Panel = (String, String, Vec<(String, Vec<(f64, f64)>)>);

pub fn svg_panels(panels: &[Panel], marks: &[(f64, String)]) -> String {
    let (w, ph) = (820.0, 250.0);
    let (ml, mr, mt, mb) = (70.0, 190.0, 30.0, 40.0);
    let h = ph * panels.len().max(1) as f64;
    let mut x1 = 0.0f64;
    for (_, _, series) in panels {
        for (_, pts) in series {
            for (x, _) in pts {
                if x.is_finite() {
                    x1 = x1.max(*x);
                }
            }
        }
    }
    if x1 <= 0.0 {
        x1 = 1.0;
    }
    let px = |x: f64| ml + x / x1 * (w - ml - mr);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, (title, y_label, series)) in panels.iter().enumerate() {
        let top = ph * i as f64;
        let mut y1 = 0.0f64;
        for (_, pts) in series {
            for (_, y) in pts {
                if y.is_finite() {
                    y1 = y1.max(*y);
                }
            }
        }
        if y1 <= 0.0 {
            y1 = 1.0;
        }
        y1 *= 1.05;
        let py = |y: f64| top + ph - mb - y.max(0.0) / y1 * (ph - mt - mb);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>
<line x1="{ml}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{ml}" y1="{}" x2="{ml}" y2="{}" stroke="black"/>
<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>
<text x="{}" y="{}" text-anchor="middle">seconds into the run</text>"#,
            (ml + w - mr) / 2.0,
            top + 18.0,
            esc(title),
            top + ph - mb,
            w - mr,
            top + ph - mb,
            top + mt,
            top + ph - mb,
            top + ph / 2.0,
            top + ph / 2.0,
            esc(y_label),
            (ml + w - mr) / 2.0,
            top + ph - 8.0,
        );
        for k in 0..=4 {
            let y = y1 * k as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{ml}" y1="{py}" x2="{}" y2="{py}" stroke="#e4e4e4"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                w - mr,
                ml - 4.0,
                py(y) + 4.0,
                short(y),
                py = py(y)
            );
        }
        for k in 0..=5 {
            let x = x1 * k as f64 / 5.0;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                px(x),
                top + ph - mb + 14.0,
                short(x)
            );
        }
        for (x, label) in marks {
            let _ = writeln!(
                s,
                r##"<line x1="{px}" y1="{}" x2="{px}" y2="{}" stroke="#999" stroke-dasharray="4 3"/><text x="{}" y="{}" fill="#666">{}</text>"##,
                top + mt,
                top + ph - mb,
                px(*x) + 3.0,
                top + mt + 10.0,
                esc(label),
                px = px(*x)
            );
        }
        for (j, (name, pts)) in series.iter().enumerate() {
            let color = colors[j % colors.len()];
            let path: Vec<String> = pts
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{}"/>"#,
                path.join(" ")
            );
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
                w - mr + 10.0,
                top + mt + 4.0 + 14.0 * j as f64,
                w - mr + 26.0,
                top + mt + 8.0 + 14.0 * j as f64,
                esc(name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn short(v: f64) -> String {
    if v.abs() >= 1000.0 {
        group(v.round() as i64)
    } else if v.abs() >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn numbers_are_grouped_and_cpu_is_scaled() {
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(-1000), "-1,000");
        assert_eq!(group(999), "999");
        assert_eq!(fmt_cpu(0.000_4), "400 µs");
        assert_eq!(fmt_cpu(1.5), "1.500 s");
        assert_eq!(fmt_value(&json!(0.0)), "0");
        assert_eq!(fmt_value(&json!(12345.6)), "12,346");
    }

    #[test]
    fn cpu_per_unit_and_markdown() {
        let mut cpu = BTreeMap::new();
        cpu.insert("jaunt".to_string(), 2.0);
        let row = Row::new("bulk", "upload", "jaunt")
            .metric("MiB_per_s", 100.0)
            .work(cpu, "GiB", 4.0);
        assert_eq!(row.cpu_per_unit()["jaunt"], 0.5);
        let md = markdown(&crate::procfs::machine(), &[row], "loadtest");
        assert!(md.contains("## bulk"), "{md}");
        assert!(
            md.contains("| jaunt | upload | 100 | GiB | 0.500 s |"),
            "{md}"
        );
    }

    #[test]
    fn rows_of_several_rounds_say_which_round() {
        let mut rows = Vec::new();
        for round in [1, 2] {
            let mut cpu = BTreeMap::new();
            cpu.insert("jaunt".to_string(), round as f64);
            let mut r = Row::new("bulk", "upload", "jaunt")
                .work(cpu, "GiB", 1.0)
                .note("a note");
            r.round = round;
            rows.push(r);
        }
        let md = markdown(&crate::procfs::machine(), &rows, "loadtest");
        assert_eq!(md.matches("- a note").count(), 1, "{md}");
        assert!(
            md.contains("| path | variant | round | CPU per | CPU jaunt |"),
            "{md}"
        );
        assert!(
            md.contains("| jaunt | upload | 2 | GiB | 2.000 s |"),
            "{md}"
        );
        assert_eq!(rows[1].to_json()["round"], 2);
    }

    #[test]
    fn stacked_panels_are_well_formed() {
        let s = svg_panels(
            &[
                (
                    "rss <MiB>".into(),
                    "MiB".into(),
                    vec![("daemon".into(), vec![(0.0, 1.0), (10.0, 2.0)])],
                ),
                ("empty".into(), "n".into(), vec![("none".into(), vec![])]),
            ],
            &[(5.0, "kill -9".into())],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("rss &lt;MiB&gt;") && s.contains("kill -9"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
        assert_eq!(s.matches("<polyline").count(), 2);
    }

    #[test]
    fn svg_is_well_formed() {
        let s = svg_chart(
            "t <1>",
            "x",
            "y",
            &[("a".into(), vec![(1.0, 0.0), (1000.0, 100.0)])],
            true,
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t &lt;1&gt;"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
    }
}
