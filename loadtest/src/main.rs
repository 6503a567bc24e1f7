//! Jaunt's load-test harness (filled in by the load-test issue).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("loadtest: no scenarios yet; see the load-test issue")
}
