//! `jaunt play` (the user's side of recordings; `jaunt recordings ls` is a table in `cli.rs`).
//!
//! The `.cast` is fetched in ranges of [`MAX_READ_BYTES`] (`GET /v1/recordings/ID/cast`) and
//! handled line by line as it arrives, so memory stays at one range whatever the length.
//! Formats: `text` (default) replays the output (`o` events) with the original timing divided
//! by `--speed` (`0`: at once; also at once when stdout is not a terminal); `cast` writes the
//! asciicast v2 file as stored; `json` writes the events as a JSON array.
//!
//! Not here: the endpoints (`api.rs`).

use std::io::Write;
use std::time::{Duration, Instant};

use super::{RecordingInfo, MAX_READ_BYTES};
use crate::client::Client;

/// Longest single pause of a replay (idle minutes of a session are not replayed in full).
pub const MAX_PAUSE: Duration = Duration::from_secs(2);

/// How `jaunt play` writes a recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlayFormat {
    Text,
    Cast,
    Json,
}

/// Calls `line` for each line of recording `id` (without its newline), fetching it in ranges.
pub fn for_each_line(
    client: &Client,
    id: &str,
    mut line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<RecordingInfo> {
    let seg = crate::recordings::sigv4::encode(id, true);
    let info: RecordingInfo = client.get_json(&format!("/v1/recordings/{seg}"))?;
    let mut offset = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    while offset < info.size {
        let (status, body) = client.request(
            "GET",
            &format!("/v1/recordings/{seg}/cast?offset={offset}&length={MAX_READ_BYTES}"),
            None,
        )?;
        if status != 200 {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_default();
            anyhow::bail!("{message} (HTTP {status})");
        }
        if body.is_empty() {
            anyhow::bail!("recording {id} ended at byte {offset} of {}", info.size);
        }
        offset += body.len() as u64;
        pending.extend_from_slice(&body);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            line(&String::from_utf8_lossy(&pending[start..start + nl]))?;
            start += nl + 1;
        }
        pending.drain(..start);
    }
    if !pending.is_empty() {
        line(&String::from_utf8_lossy(&pending))?;
    }
    Ok(info)
}

/// `jaunt play ID`.
pub fn play(
    client: &Client,
    id: &str,
    format: PlayFormat,
    speed: f64,
    out: &mut dyn Write,
    tty: bool,
) -> anyhow::Result<()> {
    if !(speed.is_finite() && speed >= 0.0) {
        anyhow::bail!("--speed must be 0 (at once) or more");
    }
    let timed = tty && speed > 0.0 && format == PlayFormat::Text;
    let started = Instant::now();
    let mut first = true;
    let mut json_first = true;
    // Skipped pauses are taken out of the schedule.
    let mut skipped = 0.0f64;
    let mut last_time = 0.0f64;
    if format == PlayFormat::Json {
        out.write_all(b"[")?;
    }
    for_each_line(client, id, |line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        if first {
            first = false;
            if format == PlayFormat::Cast {
                writeln!(out, "{line}")?;
            }
            return Ok(());
        }
        if format == PlayFormat::Cast {
            writeln!(out, "{line}")?;
            return Ok(());
        }
        let Ok((time, code, data)) = serde_json::from_str::<(f64, String, String)>(line) else {
            anyhow::bail!("recording {id}: unreadable event line");
        };
        match format {
            PlayFormat::Json => {
                if !json_first {
                    out.write_all(b",")?;
                }
                json_first = false;
                serde_json::to_writer(
                    &mut *out,
                    &serde_json::json!({"time": time, "code": code, "data": data}),
                )?;
            }
            PlayFormat::Text | PlayFormat::Cast => {
                if code != "o" {
                    return Ok(());
                }
                if timed {
                    let gap = (time - last_time).max(0.0);
                    if gap > MAX_PAUSE.as_secs_f64() {
                        skipped += gap - MAX_PAUSE.as_secs_f64();
                    }
                    last_time = time;
                    let due = Duration::from_secs_f64(((time - skipped) / speed).max(0.0));
                    let now = started.elapsed();
                    if due > now {
                        out.flush()?;
                        std::thread::sleep(due - now);
                    }
                }
                out.write_all(data.as_bytes())?;
            }
        }
        Ok(())
    })?;
    if format == PlayFormat::Json {
        out.write_all(b"]\n")?;
    }
    out.flush()?;
    Ok(())
}
