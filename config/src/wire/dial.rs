//! Small wire messages of the public port, sans-IO: the user's dial request and the engine's dial
//! response (`jaunt-ssh`, `jaunt-postgres`, `jaunt-tcp`), and the tunnel hello an agent receives
//! right after its `jaunt-tunnel` handshake.
//!
//! Every message is one frame: a big-endian `u16` length, then that many bytes of UTF-8 JSON. A
//! length of 0 or above the message's bound is refused before any JSON is read, so a peer can
//! make the engine hold at most `2 + bound` bytes. The parsers are pure functions of a byte
//! buffer that answer "need more" (`Ok(None)`), "here it is and this many bytes were used", or
//! an error; bytes after the frame belong to the next protocol layer (the user's SSH or
//! PostgreSQL bytes) and are never consumed. The client side (CLI, agent) uses the same types.
//!
//! ```text
//! user → engine   DialRequest  {"kind":"ssh","target":"web1","login":"root"}
//!                              {"kind":"db","target":"pg","db_user":"alice","db_name":"app"}
//! engine → user   DialResponse {"ok":true}  |  {"ok":false,"error":"agent offline: ..."}
//! engine → agent  TunnelHello  {"version":1,"shards":4,"shard":2}
//! agent → engine  AgentHello   (crate::wire::agent_hello), or a clean close if the agent
//!                              already has a tunnel to that shard
//! ```
//!
//! The engine then opens a tunnel stream whose OPEN carries a [`StreamHeader`]: the dial request
//! plus who asked (unframed JSON: the mux frame carries its length).
//!
//! Unknown JSON fields are refused: clients and engines ship in one binary, and a field the
//! engine does not know is a field it would not enforce.

use serde::{Deserialize, Serialize};

use crate::wire::{ResourceKind, ALPN_APP, ALPN_POSTGRES, ALPN_SSH, ALPN_TCP, MAX_DIAL_HEADER_LEN};

/// Bytes of the length prefix of every message.
pub const LENGTH_PREFIX_BYTES: usize = 2;

/// Largest dial request body: a target, a login and two database names fit many times over; the
/// same bound as a mux OPEN's dial header, since the request travels on to the agent.
pub const MAX_DIAL_REQUEST_BYTES: usize = MAX_DIAL_HEADER_LEN;

/// Largest dial response body. The error message is truncated to fit.
pub const MAX_DIAL_RESPONSE_BYTES: usize = 2 * 1024;

/// Longest error message in a dial response (bytes of UTF-8).
pub const MAX_DIAL_ERROR_BYTES: usize = 1024;

/// Largest tunnel hello body.
pub const MAX_TUNNEL_HELLO_BYTES: usize = 1024;

/// Longest target name: a DNS name (RFC 1035).
pub const MAX_TARGET_BYTES: usize = 253;

/// Longest login, database user or database name.
pub const MAX_PRINCIPAL_BYTES: usize = 255;

/// Version of the tunnel hello this engine sends.
pub const TUNNEL_HELLO_VERSION: u16 = 1;

/// What a user stream dials; must match the ALPN the connection arrived with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialKind {
    /// An SSH node (ALPN `jaunt-ssh`).
    Ssh,
    /// A PostgreSQL database (ALPN `jaunt-postgres`).
    Db,
    /// A TCP app (ALPN `jaunt-tcp`).
    Tcp,
    /// A web (HTTP) app, reached by HTTP/1.1 at SNI `<app>.<public host>`; the engine makes
    /// the dial itself from the SNI (there is no dial request on that route).
    App,
}

impl DialKind {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            DialKind::Ssh => "ssh",
            DialKind::Db => "db",
            DialKind::Tcp => "tcp",
            DialKind::App => "app",
        }
    }

    /// The ALPN a dial request of this kind arrives with. A web app has a second way in, by
    /// SNI `<app>.<public host>` with `http/1.1` and no dial request.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            DialKind::Ssh => ALPN_SSH,
            DialKind::Db => ALPN_POSTGRES,
            DialKind::Tcp => ALPN_TCP,
            DialKind::App => ALPN_APP,
        }
    }

    /// What a person calls the target of this kind, for error messages.
    pub fn noun(self) -> &'static str {
        match self {
            DialKind::Ssh => "node",
            DialKind::Db => "database",
            DialKind::Tcp => "app",
            DialKind::App => "app",
        }
    }

    /// The kind of resource this dial reaches: what an agent announces in its
    /// [`AgentHello`](crate::wire::AgentHello) and what [`crate::rbac::authorize`] decides on.
    /// The one mapping from dial kind to authorization kind.
    pub fn resource_kind(self) -> ResourceKind {
        match self {
            DialKind::Ssh => ResourceKind::Node,
            DialKind::Db => ResourceKind::Db,
            DialKind::Tcp => ResourceKind::Tcp,
            DialKind::App => ResourceKind::App,
        }
    }
}

/// The first message of a user stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialRequest {
    /// What is dialed.
    pub kind: DialKind,
    /// The node, database or app name.
    pub target: String,
    /// OS login (SSH; required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// Database user (databases; required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    /// Database name (databases; optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_name: Option<String>,
    /// `jaunt join`: watch the live session of this id on `target`, read-only, instead of
    /// logging in (SSH only; the login is then unused). Needs the role rule `session`/`join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
}

/// The engine's answer to a [`DialRequest`]; after `ok: true` the stream carries the user's
/// protocol bytes both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialResponse {
    /// Whether the stream is connected to the target.
    pub ok: bool,
    /// Why not, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the engine tells an agent right after the tunnel handshake: how many shards this engine
/// runs and which one accepted this tunnel, so the agent can keep one tunnel per shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelHello {
    /// [`TUNNEL_HELLO_VERSION`].
    pub version: u16,
    /// Number of shards of this engine.
    pub shards: usize,
    /// Index of the shard that owns this tunnel, `< shards`.
    pub shard: usize,
}

/// The dial header of a tunnel stream the engine opens for a user: what to dial, for whom.
/// The agent refuses the open (with a readable reason) if it cannot reach the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamHeader {
    /// What is dialed.
    pub kind: DialKind,
    /// The node, database or app name.
    pub target: String,
    /// OS login (SSH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// Database user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    /// Database name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_name: Option<String>,
    /// The user the engine authorized (the certificate's name).
    pub user: String,
    /// That user's roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The user's address as the engine saw it, for the audit log.
    pub client_addr: String,
    /// Database dials: the database users the user's certificate allows (`*` = any), so the
    /// agent can check the user name the client logs in with. Empty for other kinds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_db_users: Vec<String>,
    /// Database dials: the database names the user's certificate allows (`*` = any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_db_names: Vec<String>,
    /// The engine's id of the session (as in its `session.start`/`session.end` audit events),
    /// so what the agent records (queries, recordings) joins up with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// `jaunt join`: the stream watches the live session of this id (see [`DialRequest::join`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// The web terminal (`/web/terminal/<node>/<login>`): an SSH dial whose stream carries
    /// [`crate::wire::term`] frames (terminal input and resizes in, terminal output back)
    /// instead of the user's SSH bytes; the agent is the SSH client of sshd.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
}

impl StreamHeader {
    /// The header for `request`, made by `user` with `roles` from `client_addr`.
    pub fn new(
        request: &DialRequest,
        user: &str,
        roles: &[String],
        client_addr: &str,
    ) -> StreamHeader {
        StreamHeader {
            kind: request.kind,
            target: request.target.clone(),
            login: request.login.clone(),
            db_user: request.db_user.clone(),
            db_name: request.db_name.clone(),
            user: user.to_owned(),
            roles: roles.to_vec(),
            client_addr: client_addr.to_owned(),
            allowed_db_users: Vec::new(),
            allowed_db_names: Vec::new(),
            session_id: None,
            join: request.join.clone(),
            terminal: false,
        }
    }

    /// Marks an SSH dial as the web terminal's (see [`StreamHeader::terminal`]).
    pub fn with_terminal(mut self, terminal: bool) -> StreamHeader {
        self.terminal = terminal && self.kind == DialKind::Ssh;
        self
    }

    /// Carries the engine's session id.
    pub fn with_session_id(mut self, session_id: &str) -> StreamHeader {
        self.session_id = Some(session_id.to_owned());
        self
    }

    /// For a database dial, carries the database users and names the user's identity allows
    /// (the agent enforces them against what the client logs in with); other kinds are
    /// returned unchanged.
    pub fn with_db_grants(mut self, db_users: &[String], db_names: &[String]) -> StreamHeader {
        if self.kind == DialKind::Db {
            self.allowed_db_users = db_users.to_vec();
            self.allowed_db_names = db_names.to_vec();
        }
        self
    }

    /// The header bytes, or `None` if they would exceed [`MAX_DIAL_HEADER_LEN`]
    /// (a user with very many roles).
    pub fn encode(&self) -> Option<Vec<u8>> {
        let bytes = serde_json::to_vec(self).ok()?;
        (bytes.len() <= MAX_DIAL_HEADER_LEN).then_some(bytes)
    }

    /// The header bytes with the user's verified client certificate (`cert_der`, DER) in the
    /// [`CLIENT_CERT_FIELD`] field as standard base64, so the agent can verify the identity
    /// itself instead of trusting `user` and `roles`; `None` if they would exceed
    /// [`MAX_DIAL_HEADER_LEN`]. A Jaunt user certificate (ECDSA P-256, identity
    /// JSON in one extension) is 0.6–1.2 KiB, 0.8–1.6 KiB in base64, which leaves the rest of
    /// the 4 KiB for the header itself.
    pub fn encode_with_client_cert(&self, cert_der: &[u8]) -> Option<Vec<u8>> {
        let mut value = serde_json::to_value(self).ok()?;
        let object = value.as_object_mut()?;
        object.insert(
            CLIENT_CERT_FIELD.to_owned(),
            serde_json::Value::String(base64::encode(cert_der)),
        );
        let bytes = serde_json::to_vec(&value).ok()?;
        (bytes.len() <= MAX_DIAL_HEADER_LEN).then_some(bytes)
    }

    /// Reads a header (agent side), with or without a client certificate.
    pub fn parse(bytes: &[u8]) -> Result<StreamHeader, DialError> {
        Self::parse_with_client_cert(bytes).map(|(header, _)| header)
    }

    /// Reads a header and the client certificate (DER) it carries, if any (agent side).
    /// Fields other than the header's and [`CLIENT_CERT_FIELD`] are refused, as everywhere.
    pub fn parse_with_client_cert(
        bytes: &[u8],
    ) -> Result<(StreamHeader, Option<Vec<u8>>), DialError> {
        if bytes.len() > MAX_DIAL_HEADER_LEN {
            return Err(DialError::TooLarge {
                len: bytes.len(),
                max: MAX_DIAL_HEADER_LEN,
            });
        }
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(json_error)?;
        let cert = match value
            .as_object_mut()
            .and_then(|object| object.remove(CLIENT_CERT_FIELD))
        {
            None => None,
            Some(serde_json::Value::String(text)) => {
                Some(base64::decode(&text).ok_or(DialError::Invalid {
                    field: CLIENT_CERT_FIELD,
                    why: "not standard base64",
                })?)
            }
            Some(_) => {
                return Err(DialError::Invalid {
                    field: CLIENT_CERT_FIELD,
                    why: "not a string",
                })
            }
        };
        let header = serde_json::from_value(value).map_err(json_error)?;
        Ok((header, cert))
    }
}

/// The [`StreamHeader`] field that carries the user's client certificate (DER, standard base64
/// with padding). It is not a field of the `StreamHeader` struct so that code building headers
/// by hand keeps compiling; [`StreamHeader::encode_with_client_cert`] and
/// [`StreamHeader::parse_with_client_cert`] add and take it.
pub const CLIENT_CERT_FIELD: &str = "client_cert";

/// Standard base64 (RFC 4648, with padding) for the client certificate: a few lines here
/// rather than a dependency of the engine for one field.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    }

    /// `None` unless `text` is canonical padded base64.
    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        let bytes = text.as_bytes();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        let quads = bytes.len() / 4;
        for (index, quad) in bytes.chunks(4).enumerate() {
            let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && index + 1 != quads) {
                return None;
            }
            let mut n = 0u32;
            for &c in &quad[..4 - pad] {
                n = (n << 6) | value(c)?;
            }
            n <<= 6 * pad as u32;
            let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&decoded[..3 - pad]);
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_refuses_garbage() {
            for (raw, text) in [
                (&b""[..], ""),
                (b"f", "Zg=="),
                (b"fo", "Zm8="),
                (b"foo", "Zm9v"),
                (b"foob", "Zm9vYg=="),
                (b"\xff\x00\xfe", "/wD+"),
            ] {
                assert_eq!(super::encode(raw), text);
                assert_eq!(super::decode(text).as_deref(), Some(raw));
            }
            let all: Vec<u8> = (0..=255).collect();
            assert_eq!(super::decode(&super::encode(&all)), Some(all));
            for bad in ["Zg=", "Z===", "Zg==Zm8=", "Zm9v!", "Zm 9"] {
                assert_eq!(super::decode(bad), None, "{bad}");
            }
        }
    }
}

/// Why a message could not be read. Always the sender's fault; resending the same bytes cannot
/// help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// Length prefix 0.
    #[error("empty message")]
    Empty,
    /// Length prefix above the message's bound.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Not the expected JSON.
    #[error("malformed message: {0}")]
    Json(String),
    /// A field is missing, too long, or holds characters it may not.
    #[error("invalid field `{field}`: {why}")]
    Invalid {
        /// The JSON field.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Splits one length-prefixed frame off the front of `buf`: `Ok(None)` until it is complete,
/// then the body and the bytes used (prefix included).
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, DialError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
    if len == 0 {
        return Err(DialError::Empty);
    }
    if len > max {
        return Err(DialError::TooLarge { len, max });
    }
    let end = LENGTH_PREFIX_BYTES + len;
    Ok(buf.get(LENGTH_PREFIX_BYTES..end).map(|body| (body, end)))
}

/// Frames `body` with its length prefix. `body` must be at most `u16::MAX` bytes (every message
/// here is bounded far below that).
fn frame(body: &[u8]) -> Vec<u8> {
    debug_assert!(body.len() <= usize::from(u16::MAX));
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(LENGTH_PREFIX_BYTES + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn json_error(e: serde_json::Error) -> DialError {
    DialError::Json(e.to_string())
}

impl DialRequest {
    /// Reads a dial request from the front of `buf` (see [`split_frame`]) and validates it.
    pub fn parse(buf: &[u8]) -> Result<Option<(DialRequest, usize)>, DialError> {
        let Some((body, used)) = split_frame(buf, MAX_DIAL_REQUEST_BYTES)? else {
            return Ok(None);
        };
        let request: DialRequest = serde_json::from_slice(body).map_err(json_error)?;
        request.validate()?;
        Ok(Some((request, used)))
    }

    /// The framed bytes of this request.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings cannot fail.
        frame(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// Checks lengths and characters, and that the fields the kind needs are present.
    pub fn validate(&self) -> Result<(), DialError> {
        check_name("target", &self.target, MAX_TARGET_BYTES)?;
        for (field, value) in [
            ("login", &self.login),
            ("db_user", &self.db_user),
            ("db_name", &self.db_name),
            ("join", &self.join),
        ] {
            if let Some(value) = value {
                check_name(field, value, MAX_PRINCIPAL_BYTES)?;
            }
        }
        match self.kind {
            _ if self.join.is_some() && self.kind != DialKind::Ssh => Err(DialError::Invalid {
                field: "join",
                why: "only SSH sessions can be joined",
            }),
            DialKind::Ssh if self.login.is_none() => Err(DialError::Invalid {
                field: "login",
                why: "an SSH dial needs a login",
            }),
            DialKind::Db if self.db_user.is_none() => Err(DialError::Invalid {
                field: "db_user",
                why: "a database dial needs a database user",
            }),
            _ => Ok(()),
        }
    }
}

/// A name is non-empty, bounded, and free of control characters (it ends up in logs and audit
/// events).
fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), DialError> {
    if value.is_empty() {
        return Err(DialError::Invalid {
            field,
            why: "empty",
        });
    }
    if value.len() > max {
        return Err(DialError::Invalid {
            field,
            why: "too long",
        });
    }
    if value.chars().any(char::is_control) {
        return Err(DialError::Invalid {
            field,
            why: "contains control characters",
        });
    }
    Ok(())
}

impl DialResponse {
    /// The success answer.
    pub fn ok() -> DialResponse {
        DialResponse {
            ok: true,
            error: None,
        }
    }

    /// A refusal; `message` is truncated to [`MAX_DIAL_ERROR_BYTES`] at a character boundary.
    pub fn error(message: &str) -> DialResponse {
        let mut end = message.len().min(MAX_DIAL_ERROR_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        DialResponse {
            ok: false,
            error: Some(message[..end].to_owned()),
        }
    }

    /// The framed bytes of this response.
    pub fn encode(&self) -> Vec<u8> {
        frame(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads a response from the front of `buf` (client side).
    pub fn parse(buf: &[u8]) -> Result<Option<(DialResponse, usize)>, DialError> {
        let Some((body, used)) = split_frame(buf, MAX_DIAL_RESPONSE_BYTES)? else {
            return Ok(None);
        };
        let response: DialResponse = serde_json::from_slice(body).map_err(json_error)?;
        Ok(Some((response, used)))
    }
}

impl TunnelHello {
    /// The hello of shard `shard` out of `shards`.
    pub fn new(shards: usize, shard: usize) -> TunnelHello {
        debug_assert!(shard < shards);
        TunnelHello {
            version: TUNNEL_HELLO_VERSION,
            shards,
            shard,
        }
    }

    /// The framed bytes of this hello.
    pub fn encode(&self) -> Vec<u8> {
        frame(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads a hello from the front of `buf` (agent side).
    pub fn parse(buf: &[u8]) -> Result<Option<(TunnelHello, usize)>, DialError> {
        let Some((body, used)) = split_frame(buf, MAX_TUNNEL_HELLO_BYTES)? else {
            return Ok(None);
        };
        let hello: TunnelHello = serde_json::from_slice(body).map_err(json_error)?;
        if hello.shards == 0 || hello.shard >= hello.shards {
            return Err(DialError::Invalid {
                field: "shard",
                why: "not below the shard count",
            });
        }
        Ok(Some((hello, used)))
    }
}

/// Fuzz entry point for every message of this module. The first byte picks the parser; the
/// rest is what a hostile peer sent. Whatever parses must encode back to something that parses
/// to the same value (checked with `debug_assert!`, live in cargo-fuzz builds), so a message the
/// engine accepted reaches the agent unchanged.
pub fn fuzz_parse(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(Some((request, used))) = DialRequest::parse(bytes) {
                debug_assert!(used <= bytes.len());
                let again = DialRequest::parse(&request.encode());
                debug_assert!(matches!(again, Ok(Some((ref r, _))) if *r == request));
            }
        }
        1 => {
            if let Ok((header, cert)) = StreamHeader::parse_with_client_cert(bytes) {
                let encoded = match &cert {
                    Some(der) => header.encode_with_client_cert(der),
                    None => header.encode(),
                };
                if let Some(encoded) = encoded {
                    let again = StreamHeader::parse_with_client_cert(&encoded);
                    debug_assert!(again == Ok((header, cert)));
                }
            }
        }
        2 => {
            if let Ok(Some((response, used))) = DialResponse::parse(bytes) {
                debug_assert!(used <= bytes.len());
                std::hint::black_box(response);
            }
        }
        _ => {
            if let Ok(Some((hello, _))) = TunnelHello::parse(bytes) {
                debug_assert!(hello.shard < hello.shards);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        frame(body)
    }

    fn ssh(target: &str) -> DialRequest {
        DialRequest {
            join: None,
            kind: DialKind::Ssh,
            target: target.to_owned(),
            login: Some("root".to_owned()),
            db_user: None,
            db_name: None,
        }
    }

    #[test]
    fn request_round_trip_at_every_split() {
        let request = DialRequest {
            join: None,
            kind: DialKind::Db,
            target: "pg-main".to_owned(),
            login: None,
            db_user: Some("alice".to_owned()),
            db_name: Some("app".to_owned()),
        };
        let mut bytes = request.encode();
        bytes.extend_from_slice(b"\x00\x00\x00\x08startup");
        let frame_len = bytes.len() - 11;
        for cut in 0..frame_len {
            assert_eq!(DialRequest::parse(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            DialRequest::parse(&bytes),
            Ok(Some((request, frame_len))),
            "the bytes after the frame are left alone"
        );
    }

    #[test]
    fn request_wire_format_is_the_documented_one() {
        let bytes = ssh("web1").encode();
        assert_eq!(&bytes[..2], &(bytes.len() as u16 - 2).to_be_bytes());
        assert_eq!(
            &bytes[2..],
            br#"{"kind":"ssh","target":"web1","login":"root"}"#
        );
        let parsed = DialRequest::parse(&framed(br#"{"kind":"tcp","target":"grafana"}"#));
        assert!(matches!(
            parsed,
            Ok(Some((
                DialRequest {
                    join: None,
                    kind: DialKind::Tcp,
                    ..
                },
                _
            )))
        ));
    }

    #[test]
    fn bounds_are_checked_before_json() {
        assert_eq!(DialRequest::parse(&[0, 0, b'{']), Err(DialError::Empty));
        let len = (MAX_DIAL_REQUEST_BYTES + 1) as u16;
        assert_eq!(
            DialRequest::parse(&len.to_be_bytes()),
            Err(DialError::TooLarge {
                len: MAX_DIAL_REQUEST_BYTES + 1,
                max: MAX_DIAL_REQUEST_BYTES
            })
        );
        assert_eq!(
            DialRequest::parse(&u16::MAX.to_be_bytes()).map(|_| ()),
            Err(DialError::TooLarge {
                len: 65535,
                max: MAX_DIAL_REQUEST_BYTES
            })
        );
    }

    #[test]
    fn malformed_and_invalid_requests() {
        let cases: [&[u8]; 9] = [
            b"not json",
            br#"{"kind":"ftp","target":"x"}"#,
            br#"{"kind":"ssh"}"#,
            br#"{"kind":"ssh","target":"web1","login":"root","extra":1}"#,
            br#"{"kind":"ssh","target":"","login":"root"}"#,
            br#"{"kind":"ssh","target":"web1"}"#,
            br#"{"kind":"db","target":"pg"}"#,
            br#"{"kind":"ssh","target":"web\n1","login":"root"}"#,
            br#"[1,2,3]"#,
        ];
        for body in cases {
            let result = DialRequest::parse(&framed(body));
            assert!(
                matches!(result, Err(DialError::Json(_) | DialError::Invalid { .. })),
                "{:?}: {result:?}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(
            r#"{{"kind":"tcp","target":"{}"}}"#,
            "a".repeat(MAX_TARGET_BYTES + 1)
        );
        assert_eq!(
            DialRequest::parse(&framed(long.as_bytes())),
            Err(DialError::Invalid {
                field: "target",
                why: "too long"
            })
        );
    }

    #[test]
    fn response_round_trip_and_truncation() {
        for response in [DialResponse::ok(), DialResponse::error("agent offline")] {
            let bytes = response.encode();
            assert_eq!(
                DialResponse::parse(&bytes),
                Ok(Some((response, bytes.len())))
            );
        }
        assert_eq!(&DialResponse::ok().encode()[2..], br#"{"ok":true}"#);
        assert_eq!(
            &DialResponse::error("no").encode()[2..],
            br#"{"ok":false,"error":"no"}"#
        );
        let long = "é".repeat(MAX_DIAL_ERROR_BYTES);
        let response = DialResponse::error(&long);
        let message = response.error.as_deref().unwrap_or_default();
        assert!(message.len() <= MAX_DIAL_ERROR_BYTES && message.len() >= MAX_DIAL_ERROR_BYTES - 1);
        assert!(response.encode().len() <= LENGTH_PREFIX_BYTES + MAX_DIAL_RESPONSE_BYTES);
    }

    #[test]
    fn tunnel_hello_round_trip() {
        let hello = TunnelHello::new(4, 3);
        let bytes = hello.encode();
        assert_eq!(&bytes[2..], br#"{"version":1,"shards":4,"shard":3}"#);
        assert_eq!(TunnelHello::parse(&bytes), Ok(Some((hello, bytes.len()))));
        assert_eq!(TunnelHello::parse(&bytes[..5]), Ok(None));
        assert!(TunnelHello::parse(&framed(br#"{"version":1,"shards":2,"shard":2}"#)).is_err());
        assert!(TunnelHello::parse(&framed(br#"{"version":1,"shards":0,"shard":0}"#)).is_err());
    }

    #[test]
    fn stream_header_round_trip_and_bound() {
        let header = StreamHeader::new(&ssh("web1"), "alice", &["access".into()], "192.0.2.1:5555");
        let bytes = header.encode().unwrap_or_default();
        assert_eq!(StreamHeader::parse(&bytes), Ok(header));
        let db = DialRequest {
            join: None,
            kind: DialKind::Db,
            target: "pg".to_owned(),
            login: None,
            db_user: Some("alice".to_owned()),
            db_name: None,
        };
        let grants = (
            vec!["alice".to_owned()],
            vec!["app".to_owned(), "*".to_owned()],
        );
        let header = StreamHeader::new(&db, "alice", &[], "x").with_db_grants(&grants.0, &grants.1);
        assert_eq!(header.allowed_db_names, ["app", "*"]);
        let bytes = header.encode().unwrap_or_default();
        assert_eq!(StreamHeader::parse(&bytes), Ok(header));
        let ssh_header =
            StreamHeader::new(&ssh("web1"), "alice", &[], "x").with_db_grants(&grants.0, &grants.1);
        assert!(ssh_header.allowed_db_users.is_empty());
        let text = String::from_utf8(ssh_header.encode().unwrap_or_default()).unwrap_or_default();
        assert!(!text.contains("allowed_db"), "{text}");
        let many: Vec<String> = (0..1000).map(|i| format!("role-{i}")).collect();
        assert_eq!(
            StreamHeader::new(&ssh("web1"), "alice", &many, "x").encode(),
            None
        );
    }

    #[test]
    fn stream_header_carries_the_client_certificate() {
        let header = StreamHeader::new(&ssh("web1"), "alice", &["access".into()], "x");
        let cert: Vec<u8> = (0..1100u32).map(|i| (i * 7) as u8).collect();
        let bytes = header.encode_with_client_cert(&cert).unwrap_or_default();
        assert_eq!(
            StreamHeader::parse_with_client_cert(&bytes),
            Ok((header.clone(), Some(cert.clone())))
        );
        assert_eq!(StreamHeader::parse(&bytes), Ok(header.clone()));
        let plain = header.encode().unwrap_or_default();
        assert_eq!(
            StreamHeader::parse_with_client_cert(&plain),
            Ok((header.clone(), None))
        );
        for bad in [
            br#"{"kind":"ssh","target":"a","user":"u","client_addr":"x","client_cert":"%%"}"#
                .as_slice(),
            br#"{"kind":"ssh","target":"a","user":"u","client_addr":"x","client_cert":1}"#,
            br#"{"kind":"ssh","target":"a","user":"u","client_addr":"x","other":"y"}"#,
            br#"[1]"#,
        ] {
            assert!(StreamHeader::parse_with_client_cert(bad).is_err());
        }
        let huge = vec![0u8; MAX_DIAL_HEADER_LEN];
        assert_eq!(header.encode_with_client_cert(&huge), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = DialRequest::parse(&bytes);
            let _ = DialResponse::parse(&bytes);
            let _ = TunnelHello::parse(&bytes);
            let _ = StreamHeader::parse(&bytes);
            let _ = StreamHeader::parse_with_client_cert(&bytes);
        }
    }
}
