//! asciicast v2 (<https://docs.asciinema.org/manual/asciicast/v2>), sans-IO: newline-delimited
//! JSON, a header object on the first line, then one `[time, code, data]` array per event,
//! `time` in seconds since the start.
//!
//! What Jaunt writes: the header's `version` 2, `width`, `height`, `timestamp` (unix seconds),
//! `command` (exec channels) and `title` (`user@node as login`); events `o` (output), `i`
//! (input, only when a role sets `record_input`), `r` (resize, data `COLSxROWS`) and `m`
//! (markers, v2's only free-form event) whose label is a JSON object with a `note` key: `exec`
//! (the command line), `exit` (the status), `sftp`/`scp` (operation, path, bytes). Players that
//! know nothing of Jaunt show the markers as plain labels.
//!
//! Terminal bytes are not always UTF-8 and arrive split anywhere: [`CastEncoder`] carries an
//! incomplete UTF-8 sequence over to the next chunk and replaces invalid bytes with U+FFFD (JSON
//! strings cannot hold them).
//!
//! Not here: files, limits, clocks (the spool passes the elapsed time in) and playback timing
//! (the `jaunt play` command).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest event line [`parse`] accepts (a single output chunk is far smaller).
pub const LINE_LEN_MAX: usize = 4 << 20;

/// The header line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CastHeader {
    pub version: u32,
    pub width: u32,
    pub height: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

/// One event, as read back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CastEvent {
    /// Seconds since the start.
    pub time: f64,
    /// `o`, `i`, `r` or `m` (others are kept as read).
    pub code: String,
    pub data: String,
}

/// A whole recording, as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Cast {
    pub header: CastHeader,
    pub events: Vec<CastEvent>,
}

/// Why a cast file does not parse: the line (1-based) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("asciicast line {line}: {reason}")]
pub struct CastError {
    pub line: usize,
    pub reason: String,
}

/// Turns a channel's bytes into asciicast v2 lines. Pure: every call returns the text to
/// append (possibly empty).
#[derive(Debug, Default)]
pub struct CastEncoder {
    /// An incomplete UTF-8 sequence at the end of the last output chunk (at most 3 bytes).
    pending_out: Vec<u8>,
    /// The same for input.
    pending_in: Vec<u8>,
}

impl CastEncoder {
    pub fn new() -> CastEncoder {
        CastEncoder::default()
    }

    /// The header line (with its newline).
    pub fn header(header: &CastHeader) -> String {
        let mut line = serde_json::to_string(header).unwrap_or_else(|_| {
            format!(
                "{{\"version\":2,\"width\":{},\"height\":{}}}",
                header.width, header.height
            )
        });
        line.push('\n');
        line
    }

    /// An `o` event for `bytes` at `at` (empty if `bytes` only starts a UTF-8 sequence).
    pub fn output(&mut self, at: Duration, bytes: &[u8]) -> String {
        let text = decode(&mut self.pending_out, bytes);
        event(at, "o", &text)
    }

    /// An `i` event.
    pub fn input(&mut self, at: Duration, bytes: &[u8]) -> String {
        let text = decode(&mut self.pending_in, bytes);
        event(at, "i", &text)
    }

    /// An `r` event: the terminal is now `width` columns by `height` rows.
    pub fn resize(&self, at: Duration, width: u32, height: u32) -> String {
        event(at, "r", &format!("{width}x{height}"))
    }

    /// An `m` event whose label is `{"note": kind, ..fields}` (fields of a JSON object are
    /// merged; any other value goes under `value`).
    pub fn note(&self, at: Duration, kind: &str, fields: &serde_json::Value) -> String {
        let mut object = serde_json::Map::new();
        object.insert("note".into(), kind.into());
        match fields {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    if key != "note" {
                        object.insert(key.clone(), value.clone());
                    }
                }
            }
            serde_json::Value::Null => {}
            other => {
                object.insert("value".into(), other.clone());
            }
        }
        event(at, "m", &serde_json::Value::Object(object).to_string())
    }

    /// What is left of incomplete UTF-8 sequences, as U+FFFD `o`/`i` events (at the end).
    pub fn flush(&mut self, at: Duration) -> String {
        let mut out = String::new();
        if !self.pending_out.is_empty() {
            self.pending_out.clear();
            out.push_str(&event(at, "o", "\u{FFFD}"));
        }
        if !self.pending_in.is_empty() {
            self.pending_in.clear();
            out.push_str(&event(at, "i", "\u{FFFD}"));
        }
        out
    }
}

/// Reads a whole cast file: the header must be version 2; every event line a
/// `[number, string, string]` array with times that do not go backwards by more than a
/// millisecond (rounding). Empty lines are skipped.
pub fn parse(text: &str) -> Result<Cast, CastError> {
    let mut lines = text.lines().enumerate();
    let Some((_, first)) = lines.next() else {
        return Err(CastError {
            line: 1,
            reason: "empty file (no header)".into(),
        });
    };
    let header: CastHeader = serde_json::from_str(first).map_err(|e| CastError {
        line: 1,
        reason: format!("not an asciicast header: {e}"),
    })?;
    if header.version != 2 {
        return Err(CastError {
            line: 1,
            reason: format!("version {} (only 2 is read)", header.version),
        });
    }
    let mut events = Vec::new();
    let mut last = 0.0f64;
    for (index, line) in lines {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > LINE_LEN_MAX {
            return Err(CastError {
                line: line_no,
                reason: format!("longer than {LINE_LEN_MAX} bytes"),
            });
        }
        let (time, code, data): (f64, String, String) =
            serde_json::from_str(line).map_err(|e| CastError {
                line: line_no,
                reason: format!("not a [time, code, data] event: {e}"),
            })?;
        if !time.is_finite() || time < 0.0 || time + 0.001 < last {
            return Err(CastError {
                line: line_no,
                reason: format!("time {time} is negative or earlier than the one before"),
            });
        }
        last = last.max(time);
        events.push(CastEvent { time, code, data });
    }
    Ok(Cast { header, events })
}

fn event(at: Duration, code: &str, data: &str) -> String {
    if data.is_empty() && code != "m" {
        return String::new();
    }
    let data = serde_json::Value::String(data.to_owned()).to_string();
    format!("[{:.6}, \"{code}\", {data}]\n", at.as_secs_f64())
}

/// Decodes `bytes` after the `pending` bytes of an earlier chunk; invalid sequences become
/// U+FFFD and an incomplete sequence at the end waits in `pending`.
fn decode(pending: &mut Vec<u8>, bytes: &[u8]) -> String {
    let joined;
    let mut rest: &[u8] = if pending.is_empty() {
        bytes
    } else {
        let mut buf = std::mem::take(pending);
        buf.extend_from_slice(bytes);
        joined = buf;
        &joined
    };
    let mut text = String::with_capacity(rest.len());
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                return text;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // `valid_up_to` bytes are UTF-8 by definition.
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        text.push('\u{FFFD}');
                        rest = after.get(bad..).unwrap_or_default();
                    }
                    None => {
                        pending.extend_from_slice(after);
                        return text;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_session_round_trips() {
        let header = CastHeader {
            version: 2,
            width: 80,
            height: 24,
            timestamp: Some(1_700_000_000),
            duration: None,
            command: Some("ls -l".into()),
            title: Some("alice@node1 as root".into()),
            env: None,
        };
        let mut enc = CastEncoder::new();
        let mut file = CastEncoder::header(&header);
        file += &enc.output(ms(10), b"$ \x1b[1mhi\x1b[0m\r\n");
        file += &enc.input(ms(20), b"ls\r");
        file += &enc.resize(ms(30), 120, 40);
        file += &enc.note(ms(40), "exit", &serde_json::json!({"status": 0}));
        let cast = parse(&file).unwrap();
        assert_eq!(cast.header, header);
        let codes: Vec<&str> = cast.events.iter().map(|e| e.code.as_str()).collect();
        assert_eq!(codes, ["o", "i", "r", "m"]);
        assert_eq!(cast.events[0].data, "$ \x1b[1mhi\x1b[0m\r\n");
        assert_eq!(cast.events[0].time, 0.01);
        assert_eq!(cast.events[2].data, "120x40");
        let note: serde_json::Value = serde_json::from_str(&cast.events[3].data).unwrap();
        assert_eq!(note, serde_json::json!({"note": "exit", "status": 0}));
        assert!(
            file.starts_with("{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1700000000")
        );
    }

    #[test]
    fn utf8_split_across_chunks_and_invalid_bytes() {
        let mut enc = CastEncoder::new();
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(enc.output(ms(1), &euro[..1]), "");
        let line = enc.output(ms(2), &[&euro[1..], b"x"].concat());
        assert_eq!(parse_event(&line).2, "€x");
        let line = enc.output(ms(3), b"a\xffb\xc3");
        assert_eq!(parse_event(&line).2, "a\u{FFFD}b");
        let tail = enc.flush(ms(4));
        assert_eq!(parse_event(&tail).2, "\u{FFFD}");
        assert_eq!(enc.flush(ms(5)), "");
    }

    #[test]
    fn bad_files_name_the_line() {
        let header = "{\"version\":2,\"width\":80,\"height\":24}\n";
        assert_eq!(parse("").unwrap_err().line, 1);
        assert!(parse("{\"version\":1,\"width\":1,\"height\":1}")
            .unwrap_err()
            .reason
            .contains("version 1"));
        let err = parse(&format!(
            "{header}[1.0, \"o\", \"a\"]\n[0.5, \"o\", \"b\"]\n"
        ))
        .unwrap_err();
        assert_eq!(err.line, 3);
        let err = parse(&format!("{header}\n[1.0, \"o\"]\n")).unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(parse(header).unwrap().events, vec![]);
    }

    fn parse_event(line: &str) -> (f64, String, String) {
        serde_json::from_str(line.trim_end()).unwrap()
    }
}
