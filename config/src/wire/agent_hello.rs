//! [`AgentHello`]: the one message an agent sends on a new tunnel before the multiplexer starts,
//! saying who it is and what it serves. Sans-IO: the engine reads it with [`AgentHello::parse`],
//! the agent writes it with [`AgentHello::encode`]. What does not live here: the engine's
//! [`TunnelHello`](crate::wire::TunnelHello) (in `wire::dial`), the mux itself, and
//! routing (which tunnel serves which target).
//!
//! # The tunnel opening
//!
//! ```text
//! agent  → engine   TCP, TLS (ALPN jaunt-tunnel, the agent's host certificate)
//! engine → agent    TunnelHello  u16 length + {"version":1,"shards":4,"shard":2}
//! agent  → engine   AgentHello   u16 length + {"version":1,"name":"node1","labels":{"env":"prod"},
//!                                  "resources":[{"kind":"node","name":"node1","labels":{},
//!                                  "protocol":"ssh"}, ...]}
//! both              mux frames: the engine runs Role::Server (it opens the streams), the agent
//!                   Role::Client
//! ```
//!
//! Then, for as long as the tunnel lives, the agent heartbeats its resources on a mux stream
//! *it* opens (agent ids are even; the engine accepts agent-opened streams only for this and
//! for recording notes, below):
//!
//! ```text
//! agent  → engine   OPEN  stream 2k, dial header = b"jaunt-heartbeat/1" (HEARTBEAT_OPEN)
//! engine → agent    OPEN_RESULT OK (any other header, or a second heartbeat stream while one
//!                   is open, is refused)
//! agent  → engine   DATA: heartbeat, heartbeat, ... each one:
//!                     u64 big-endian sequence number (the agent's resource version)
//!                     the AgentHello frame: u16 length + the same JSON as above
//! ```
//!
//! The agent sends one heartbeat right after opening the stream, then every heartbeat interval
//! (default [`DEFAULT_HEARTBEAT_INTERVAL`]) and at once when its resources change (a config
//! reload). The sequence starts at the agent's start time in Unix milliseconds and grows by one
//! per change, so it keeps increasing across agent restarts; the engine ignores a heartbeat whose
//! sequence is not above the last one it applied from that agent (a late one from another
//! tunnel). A heartbeat whose bytes hash like the announcement in force costs the engine a hash
//! and nothing else; a changed one is parsed and validated exactly like the AgentHello
//! ([`Heartbeat::split`] then [`AgentHello::parse`]), and an invalid one closes the tunnel, like
//! an invalid AgentHello refuses it. Closing the heartbeat stream leaves the tunnel and its
//! announcement as they are.
//!
//! A session the agent terminates and records (SSH) gets its recordings named to the engine the
//! same way, one agent-opened stream per recording as it starts, so that the engine's
//! `session.end` can carry `recording_ids`:
//!
//! ```text
//! agent  → engine   OPEN  stream 2k, dial header = b"jaunt-recording/1 <session id> <recording id>"
//!                   (RecordingNote::encode)
//! engine → agent    OPEN_RESULT OK: noted (the stream carries nothing and is dropped); refused
//!                   with a reason: not noted (a malformed note, no live session of that id
//!                   served by this tunnel's agent, an engine older than the note, whose
//!                   refusal is the heartbeat one above)
//! ```
//!
//! An agent that already has a tunnel to the shard named in the TunnelHello does not send an
//! AgentHello: it closes the connection (TLS close_notify) instead, and the engine should treat a
//! clean EOF at this point as "duplicate, not needed" rather than as a failure.
//!
//! The host id is deliberately not in the message: the engine takes it from the verified client
//! certificate, so an agent can describe its resources but never claim another host's identity.
//! `name` is the node name users dial (SSH target), which is also the name of its `node` resource.
//!
//! # Format and bounds
//!
//! The frame is the one of `wire::dial`: a big-endian `u16` length, then that many bytes of
//! UTF-8 JSON; a length of 0 or above [`MAX_AGENT_HELLO_BYTES`] is refused before any JSON is
//! read. Unknown fields are refused (the engine would not enforce what it does not know). Names
//! are non-empty, at most [`MAX_NAME_BYTES`], without control characters (they end up in logs);
//! label keys follow the config file's rule; label and resource counts are bounded; each
//! resource's protocol must fit its kind; `(kind, name)` is unique and at most one `node` exists,
//! named like the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::dial::{split_frame, DialError, LENGTH_PREFIX_BYTES};
pub use crate::wire::ResourceKind;

/// Largest AgentHello body: a few hundred resources with labels. The `u16` length prefix caps any
/// frame at 64 KiB anyway; this keeps what an unauthenticated-until-now peer makes the engine
/// buffer and parse small.
pub const MAX_AGENT_HELLO_BYTES: usize = 16 * 1024;

/// Version of the AgentHello this code reads and writes.
pub const AGENT_HELLO_VERSION: u16 = 1;

/// Most resources one agent announces.
pub const MAX_RESOURCES: usize = 256;

/// Most labels in one label set (the agent's, or one resource's).
pub const MAX_LABELS: usize = 64;

/// Longest agent or resource name: a DNS name (RFC 1035), as in dial requests.
pub const MAX_NAME_BYTES: usize = 253;

/// Longest label key: the config file's bound.
pub const MAX_LABEL_KEY_BYTES: usize = 253;

/// Longest label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;

/// The dial header of the agent-opened heartbeat stream (see the module doc).
pub const HEARTBEAT_OPEN: &[u8] = b"jaunt-heartbeat/1";

/// Bytes of a heartbeat's sequence number, before its AgentHello frame.
pub const HEARTBEAT_SEQ_BYTES: usize = 8;

/// Largest heartbeat on the wire: the sequence number and the largest AgentHello frame.
pub const MAX_HEARTBEAT_BYTES: usize =
    HEARTBEAT_SEQ_BYTES + LENGTH_PREFIX_BYTES + MAX_AGENT_HELLO_BYTES;

/// How often an agent heartbeats its resources when nothing changes.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// What an agent tells the engine about itself, once per tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHello {
    /// [`AGENT_HELLO_VERSION`].
    pub version: u16,
    /// The agent's node name (the SSH target users dial).
    pub name: String,
    /// The host's labels (from `agent.labels`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What this agent serves.
    #[serde(default)]
    pub resources: Vec<Resource>,
}

/// One thing an agent serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// What kind of target it is; decides which dial kind reaches it.
    pub kind: ResourceKind,
    /// The name users dial.
    pub name: String,
    /// The resource's own labels, as configured (the host's are in [`AgentHello::labels`]).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The protocol the agent speaks to it.
    pub protocol: ResourceProtocol,
}

/// Protocols the agent speaks to its resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceProtocol {
    /// OpenSSH (the bytes are end-to-end SSH; the agent only forwards them).
    Ssh,
    /// HTTP/1.1 in clear to the app.
    Http,
    /// HTTP/1.1 over TLS to the app.
    Https,
    /// Bytes as they come.
    Tcp,
    /// PostgreSQL wire protocol.
    Postgres,
    /// MySQL/MariaDB client/server protocol.
    Mysql,
}

impl ResourceKind {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Node => "node",
            ResourceKind::App => "app",
            ResourceKind::Db => "db",
            ResourceKind::Tcp => "tcp",
        }
    }

    /// Whether a resource of this kind may use `protocol`.
    pub fn allows(self, protocol: ResourceProtocol) -> bool {
        matches!(
            (self, protocol),
            (ResourceKind::Node, ResourceProtocol::Ssh)
                | (
                    ResourceKind::App,
                    ResourceProtocol::Http | ResourceProtocol::Https
                )
                | (
                    ResourceKind::Db,
                    ResourceProtocol::Postgres | ResourceProtocol::Mysql
                )
                | (ResourceKind::Tcp, ResourceProtocol::Tcp)
        )
    }
}

impl ResourceProtocol {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceProtocol::Ssh => "ssh",
            ResourceProtocol::Http => "http",
            ResourceProtocol::Https => "https",
            ResourceProtocol::Tcp => "tcp",
            ResourceProtocol::Postgres => "postgres",
            ResourceProtocol::Mysql => "mysql",
        }
    }
}

impl AgentHello {
    /// A version-1 hello.
    pub fn new(
        name: &str,
        labels: BTreeMap<String, String>,
        resources: Vec<Resource>,
    ) -> AgentHello {
        AgentHello {
            version: AGENT_HELLO_VERSION,
            name: name.to_owned(),
            labels,
            resources,
        }
    }

    /// The framed bytes, after the same checks [`AgentHello::parse`] makes: an agent learns that
    /// its configuration does not fit before the engine has to refuse it.
    pub fn encode(&self) -> Result<Vec<u8>, DialError> {
        self.validate()?;
        let body = serde_json::to_vec(self).map_err(|e| DialError::Json(e.to_string()))?;
        if body.len() > MAX_AGENT_HELLO_BYTES {
            return Err(DialError::TooLarge {
                len: body.len(),
                max: MAX_AGENT_HELLO_BYTES,
            });
        }
        let len = u16::try_from(body.len()).map_err(|_| DialError::TooLarge {
            len: body.len(),
            max: MAX_AGENT_HELLO_BYTES,
        })?;
        let mut out = Vec::with_capacity(LENGTH_PREFIX_BYTES + body.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Reads a hello from the front of `buf` (engine side): `Ok(None)` until the frame is
    /// complete, then the hello and the bytes used. Bytes after the frame are mux frames and are
    /// left alone.
    pub fn parse(buf: &[u8]) -> Result<Option<(AgentHello, usize)>, DialError> {
        let Some((body, used)) = split_frame(buf, MAX_AGENT_HELLO_BYTES)? else {
            return Ok(None);
        };
        let hello: AgentHello =
            serde_json::from_slice(body).map_err(|e| DialError::Json(e.to_string()))?;
        hello.validate()?;
        Ok(Some((hello, used)))
    }

    /// Checks the version, names, labels, counts and kind/protocol pairs (see the module doc).
    pub fn validate(&self) -> Result<(), DialError> {
        if self.version != AGENT_HELLO_VERSION {
            return Err(invalid(
                "version",
                "unsupported version (this engine speaks 1)",
            ));
        }
        check_name("name", &self.name)?;
        check_labels("labels", &self.labels)?;
        if self.resources.len() > MAX_RESOURCES {
            return Err(invalid("resources", "too many resources"));
        }
        let mut seen = BTreeSet::new();
        let mut nodes = 0usize;
        for resource in &self.resources {
            check_name("resources.name", &resource.name)?;
            check_labels("resources.labels", &resource.labels)?;
            if !resource.kind.allows(resource.protocol) {
                return Err(invalid(
                    "resources.protocol",
                    "not a protocol of the resource's kind (node: ssh; app: http, https; \
                     db: postgres; tcp: tcp)",
                ));
            }
            if !seen.insert((resource.kind, resource.name.as_str())) {
                return Err(invalid("resources.name", "duplicate resource"));
            }
            if resource.kind == ResourceKind::Node {
                nodes += 1;
                if resource.name != self.name {
                    return Err(invalid(
                        "resources.name",
                        "a node resource must carry the agent's name",
                    ));
                }
            }
        }
        debug_assert!(
            nodes <= 1,
            "a second node would have the agent's name twice"
        );
        Ok(())
    }

    /// The resource of `kind` named `name`, if announced.
    pub fn resource(&self, kind: ResourceKind, name: &str) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| r.kind == kind && r.name == name)
    }
}

/// A heartbeat split off a buffer by [`Heartbeat::split`]: its sequence number, its AgentHello
/// frame (length prefix included) and the bytes it used.
pub type SplitHeartbeat<'a> = (u64, &'a [u8], usize);

/// One heartbeat: the agent's resource version and its current announcement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The agent's resource version (see the module doc).
    pub seq: u64,
    /// What it serves now.
    pub hello: AgentHello,
}

/// Prefix of the dial header of an agent-opened recording note (see the module doc).
pub const RECORDING_NOTE_OPEN: &[u8] = b"jaunt-recording/1 ";

/// Longest session id or recording id in a [`RecordingNote`].
pub const MAX_NOTE_ID_BYTES: usize = 128;

/// "The session `session_id` is recorded as `recording_id`": an agent terminating a recorded
/// session tells the engine each recording id as the recording starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingNote {
    /// The engine's session id (the `StreamHeader`'s).
    pub session_id: String,
    /// The recording's id, as `jaunt play` takes it.
    pub recording_id: String,
}

impl RecordingNote {
    /// The dial header carrying this note.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = RECORDING_NOTE_OPEN.to_vec();
        out.extend_from_slice(self.session_id.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.recording_id.as_bytes());
        out
    }

    /// `None` if `header` is not a recording note; else the note, or why it is malformed. Both
    /// ids are 1 to [`MAX_NOTE_ID_BYTES`] characters of `[0-9a-z-]`.
    pub fn parse(header: &[u8]) -> Option<Result<RecordingNote, DialError>> {
        let rest = header.strip_prefix(RECORDING_NOTE_OPEN)?;
        let mut parts = rest.split(|b| *b == b' ');
        let (Some(session), Some(recording), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Some(Err(DialError::Invalid {
                field: "recording note",
                why: "not two ids separated by one space",
            }));
        };
        Some(
            note_id("session_id", session)
                .and_then(|s| Ok((s, note_id("recording_id", recording)?)))
                .map(|(session_id, recording_id)| RecordingNote {
                    session_id,
                    recording_id,
                }),
        )
    }
}

fn note_id(field: &'static str, id: &[u8]) -> Result<String, DialError> {
    if id.is_empty() || id.len() > MAX_NOTE_ID_BYTES {
        return Err(DialError::Invalid {
            field,
            why: "empty or longer than 128 bytes",
        });
    }
    if !id
        .iter()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || *b == b'-')
    {
        return Err(DialError::Invalid {
            field,
            why: "holds characters other than 0-9, a-z and -",
        });
    }
    Ok(String::from_utf8_lossy(id).into_owned())
}

impl Heartbeat {
    /// The bytes of a heartbeat with sequence `seq` around an already framed (and so already
    /// checked) AgentHello from [`AgentHello::encode`].
    pub fn encode_framed(seq: u64, framed_hello: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEARTBEAT_SEQ_BYTES + framed_hello.len());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(framed_hello);
        out
    }

    /// The bytes of this heartbeat, after the AgentHello's checks.
    pub fn encode(&self) -> Result<Vec<u8>, DialError> {
        Ok(Heartbeat::encode_framed(self.seq, &self.hello.encode()?))
    }

    /// Splits the next heartbeat off the front of `buf` without reading its JSON: `Ok(None)`
    /// until it is complete, then its sequence number, its AgentHello frame (for
    /// [`AgentHello::parse`], or for comparing a hash first) and the bytes used. A length of 0
    /// or above [`MAX_AGENT_HELLO_BYTES`] is refused as soon as the length is in.
    pub fn split(buf: &[u8]) -> Result<Option<SplitHeartbeat<'_>>, DialError> {
        let Some((seq, rest)) = buf.split_first_chunk::<HEARTBEAT_SEQ_BYTES>() else {
            return Ok(None);
        };
        let Some((_, used)) = split_frame(rest, MAX_AGENT_HELLO_BYTES)? else {
            return Ok(None);
        };
        let frame = rest.get(..used).ok_or(DialError::Empty)?;
        Ok(Some((
            u64::from_be_bytes(*seq),
            frame,
            HEARTBEAT_SEQ_BYTES + used,
        )))
    }

    /// [`Heartbeat::split`] and [`AgentHello::parse`]: a whole, validated heartbeat.
    pub fn parse(buf: &[u8]) -> Result<Option<(Heartbeat, usize)>, DialError> {
        let Some((seq, frame, used)) = Heartbeat::split(buf)? else {
            return Ok(None);
        };
        match AgentHello::parse(frame)? {
            Some((hello, _)) => Ok(Some((Heartbeat { seq, hello }, used))),
            None => Ok(None),
        }
    }

    /// How many bytes the heartbeat at the front of `buf` needs in all, as far as its prefix
    /// tells (the sequence and length prefix first): a reader reads exactly up to it.
    pub fn wanted(buf: &[u8]) -> usize {
        let header = HEARTBEAT_SEQ_BYTES + LENGTH_PREFIX_BYTES;
        match buf.get(HEARTBEAT_SEQ_BYTES..header) {
            Some(&[a, b]) => header + usize::from(u16::from_be_bytes([a, b])),
            _ => header,
        }
    }
}

fn invalid(field: &'static str, why: &'static str) -> DialError {
    DialError::Invalid { field, why }
}

fn check_name(field: &'static str, value: &str) -> Result<(), DialError> {
    if value.is_empty() {
        return Err(invalid(field, "empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(invalid(field, "too long"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

fn check_labels(field: &'static str, labels: &BTreeMap<String, String>) -> Result<(), DialError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(field, "too many labels"));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_BYTES
            && key.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b':')
            });
        if !key_ok {
            return Err(invalid(
                field,
                "label keys are 1 to 253 letters, digits and . - _ / :",
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(invalid(field, "label value too long"));
        }
        if value.chars().any(char::is_control) {
            return Err(invalid(field, "label value contains control characters"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn recording_notes_round_trip_and_refuse_what_is_not_one() {
        let note = RecordingNote {
            session_id: "18f3a-0-7".into(),
            recording_id: "0123456789abcdef".into(),
        };
        assert_eq!(
            note.encode(),
            b"jaunt-recording/1 18f3a-0-7 0123456789abcdef".to_vec()
        );
        assert_eq!(RecordingNote::parse(&note.encode()), Some(Ok(note)));
        assert_eq!(RecordingNote::parse(HEARTBEAT_OPEN), None);
        assert_eq!(RecordingNote::parse(b"jaunt-recording/2 a b"), None);
        let long = format!("jaunt-recording/1 a {}", "b".repeat(129));
        for bad in [
            &b"jaunt-recording/1 "[..],
            b"jaunt-recording/1 a",
            b"jaunt-recording/1 a  b",
            b"jaunt-recording/1 a b c",
            b"jaunt-recording/1 A b",
            b"jaunt-recording/1 a b\n",
            b"jaunt-recording/1 a/../x b",
            b"jaunt-recording/1 a \xff",
            long.as_bytes(),
        ] {
            assert!(
                matches!(RecordingNote::parse(bad), Some(Err(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn resource(kind: ResourceKind, name: &str, protocol: ResourceProtocol) -> Resource {
        Resource {
            kind,
            name: name.to_owned(),
            labels: BTreeMap::new(),
            protocol,
        }
    }

    fn sample() -> AgentHello {
        AgentHello::new(
            "node1",
            labels(&[("env", "prod")]),
            vec![
                Resource {
                    labels: labels(&[("os", "debian")]),
                    ..resource(ResourceKind::Node, "node1", ResourceProtocol::Ssh)
                },
                resource(ResourceKind::App, "grafana", ResourceProtocol::Http),
                resource(ResourceKind::Tcp, "redis", ResourceProtocol::Tcp),
                resource(ResourceKind::Db, "pg", ResourceProtocol::Postgres),
            ],
        )
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn round_trip_at_every_split_leaves_mux_bytes_alone() {
        let hello = sample();
        let mut bytes = hello.encode().unwrap();
        let frame_len = bytes.len();
        bytes.extend_from_slice(&[0, 0, 0, 8, 5, 0, 0, 0, 0, 0, 0, 0]);
        for cut in 0..frame_len {
            assert_eq!(AgentHello::parse(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(AgentHello::parse(&bytes), Ok(Some((hello, frame_len))));
    }

    #[test]
    fn wire_format_is_the_documented_one() {
        let hello = AgentHello::new(
            "node1",
            labels(&[("env", "prod")]),
            vec![resource(ResourceKind::Node, "node1", ResourceProtocol::Ssh)],
        );
        let bytes = hello.encode().unwrap();
        assert_eq!(&bytes[..2], &(bytes.len() as u16 - 2).to_be_bytes());
        assert_eq!(
            &bytes[2..],
            br#"{"version":1,"name":"node1","labels":{"env":"prod"},"resources":[{"kind":"node","name":"node1","labels":{},"protocol":"ssh"}]}"#
        );
        let minimal = framed(br#"{"version":1,"name":"n"}"#);
        let (parsed, used) = AgentHello::parse(&minimal).unwrap().unwrap();
        assert_eq!(used, minimal.len());
        assert!(parsed.resources.is_empty() && parsed.labels.is_empty());
    }

    #[test]
    fn bounds_are_checked_before_json() {
        assert_eq!(AgentHello::parse(&[0, 0, b'{']), Err(DialError::Empty));
        let len = (MAX_AGENT_HELLO_BYTES + 1) as u16;
        assert_eq!(
            AgentHello::parse(&len.to_be_bytes()),
            Err(DialError::TooLarge {
                len: MAX_AGENT_HELLO_BYTES + 1,
                max: MAX_AGENT_HELLO_BYTES
            })
        );
    }

    #[test]
    fn encode_refuses_what_does_not_fit() {
        let big = "v".repeat(MAX_LABEL_VALUE_BYTES);
        let resources = (0..40)
            .map(|i| Resource {
                labels: labels(&[("k", big.as_str())]),
                ..resource(ResourceKind::Tcp, &format!("app{i}"), ResourceProtocol::Tcp)
            })
            .collect();
        let hello = AgentHello::new("node1", BTreeMap::new(), resources);
        assert!(matches!(hello.encode(), Err(DialError::TooLarge { .. })));
    }

    #[test]
    fn malformed_and_invalid_hellos() {
        let cases: [&[u8]; 14] = [
            b"not json",
            br#"{"version":2,"name":"n"}"#,
            br#"{"version":1,"name":"n","host_id":"x"}"#,
            br#"{"version":1,"name":""}"#,
            br#"{"version":1,"name":"a\u0007b"}"#,
            br#"{"version":1}"#,
            br#"{"version":1,"name":"n","labels":{"bad key":"v"}}"#,
            br#"{"version":1,"name":"n","labels":{"k":"line\nbreak"}}"#,
            br#"{"version":1,"name":"n","resources":[{"kind":"node","name":"n","protocol":"http"}]}"#,
            br#"{"version":1,"name":"n","resources":[{"kind":"node","name":"other","protocol":"ssh"}]}"#,
            br#"{"version":1,"name":"n","resources":[{"kind":"kube","name":"k","protocol":"tcp"}]}"#,
            br#"{"version":1,"name":"n","resources":[{"kind":"tcp","name":"r","protocol":"tcp","port":1}]}"#,
            br#"{"version":1,"name":"n","resources":[{"kind":"tcp","name":"r","protocol":"tcp"},{"kind":"tcp","name":"r","protocol":"tcp"}]}"#,
            br#"[1,2]"#,
        ];
        for body in cases {
            let result = AgentHello::parse(&framed(body));
            assert!(
                matches!(result, Err(DialError::Json(_) | DialError::Invalid { .. })),
                "{:?}: {result:?}",
                String::from_utf8_lossy(body)
            );
        }
        // The same name under two kinds is fine: an app and a database may share a name.
        let ok = br#"{"version":1,"name":"n","resources":[{"kind":"tcp","name":"r","protocol":"tcp"},{"kind":"db","name":"r","protocol":"postgres"}]}"#;
        assert!(AgentHello::parse(&framed(ok)).unwrap().is_some());
    }

    #[test]
    fn too_many_resources_or_labels() {
        let resources = (0..=MAX_RESOURCES)
            .map(|i| resource(ResourceKind::Tcp, &format!("a{i}"), ResourceProtocol::Tcp))
            .collect();
        let hello = AgentHello::new("n", BTreeMap::new(), resources);
        assert_eq!(
            hello.validate(),
            Err(invalid("resources", "too many resources"))
        );
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let hello = AgentHello::new("n", many, Vec::new());
        assert_eq!(hello.validate(), Err(invalid("labels", "too many labels")));
    }

    #[test]
    fn heartbeats_round_trip_at_every_split_and_keep_their_bounds() {
        let beat = Heartbeat {
            seq: 1_700_000_000_123,
            hello: sample(),
        };
        let mut bytes = beat.encode().unwrap();
        let len = bytes.len();
        assert_eq!(&bytes[..8], &beat.seq.to_be_bytes());
        assert_eq!(&bytes[8..], &sample().encode().unwrap()[..]);
        let second = Heartbeat {
            seq: 7,
            ..beat.clone()
        }
        .encode()
        .unwrap();
        bytes.extend_from_slice(&second);
        for cut in 0..len {
            assert_eq!(Heartbeat::parse(&bytes[..cut]), Ok(None), "cut {cut}");
            assert!(Heartbeat::wanted(&bytes[..cut]) <= len, "cut {cut}");
            if cut >= 10 {
                assert_eq!(Heartbeat::wanted(&bytes[..cut]), len);
            }
        }
        assert_eq!(Heartbeat::parse(&bytes), Ok(Some((beat, len))));
        let (seq, frame, used) = Heartbeat::split(&bytes[len..]).unwrap().unwrap();
        assert_eq!((seq, used), (7, second.len()));
        assert_eq!(frame, &second[8..]);
        // Bounds before JSON, and the AgentHello's validation.
        let mut big = 1u64.to_be_bytes().to_vec();
        big.extend_from_slice(&((MAX_AGENT_HELLO_BYTES + 1) as u16).to_be_bytes());
        assert!(matches!(
            Heartbeat::split(&big),
            Err(DialError::TooLarge { .. })
        ));
        let mut bad = 1u64.to_be_bytes().to_vec();
        bad.extend_from_slice(&framed(br#"{"version":1,"name":""}"#));
        assert!(matches!(
            Heartbeat::parse(&bad),
            Err(DialError::Invalid { .. })
        ));
    }

    #[test]
    fn lookup_by_kind_and_name() {
        let hello = sample();
        assert!(hello.resource(ResourceKind::Tcp, "redis").is_some());
        assert!(hello.resource(ResourceKind::App, "redis").is_none());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let valid = sample().encode().unwrap();
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = AgentHello::parse(&bytes);
            // Flip one byte of a valid hello.
            let mut mutated = valid.clone();
            let at = (seed as usize) % mutated.len();
            mutated[at] ^= (seed >> 32) as u8 | 1;
            let _ = AgentHello::parse(&mutated);
        }
    }
}
