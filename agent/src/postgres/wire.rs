//! The parts of the PostgreSQL frontend/backend protocol (version 3) the agent reads and writes,
//! sans-IO: pure functions and state machines over byte buffers, so every malformed, split or
//! oversized input is a unit test rather than a network setup.
//!
//! ```text
//! first message (no type byte)   Int32 length (self included) · Int32 code · body
//!   SSLRequest                   length 8,  code 80877103            → answer 'S' or 'N'
//!   GSSENCRequest                length 8,  code 80877104            → answer 'G' or 'N'
//!   CancelRequest                length 16, code 80877102 · Int32 pid · Int32 secret
//!   StartupMessage               code 196608 (3.0) · (key NUL value NUL)* · NUL
//! every later message            Byte1 type · Int32 length (self included) · body
//!   Query 'Q'                    query NUL
//!   Parse 'P'                    statement NUL · query NUL · Int16 n · Int32 oid × n
//!   ErrorResponse 'E' (backend)  (Byte1 field · text NUL)* · NUL
//! ```
//!
//! Bounds: a first message is at most [`MAX_STARTUP_BYTES`] (the server's own
//! `MAX_STARTUP_PACKET_LENGTH`), and its length is checked before its body is awaited; a
//! recorded query keeps at most [`MAX_RECORDED_QUERY_BYTES`] (longer ones are recorded truncated,
//! and forwarded whole: the scanner only watches).

use std::fmt;

/// The `SSLRequest` code.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// The `GSSENCRequest` code.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// The `CancelRequest` code.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0, as a StartupMessage's version field.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Largest first message accepted, length field included: PostgreSQL's own
/// `MAX_STARTUP_PACKET_LENGTH`, so nothing the server would take is refused here.
pub const MAX_STARTUP_BYTES: usize = 10_000;
/// Most parameters in a StartupMessage (libpq sends fewer than ten).
pub const MAX_STARTUP_PARAMS: usize = 64;
/// Bytes of a query kept for the record; the rest is counted, not kept.
pub const MAX_RECORDED_QUERY_BYTES: usize = 16 * 1024;
/// Longest message text in an [`error_response`] (bytes of UTF-8).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 2048;

/// The SSLRequest as a client sends it.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// The answer "no TLS here" to an SSLRequest or GSSENCRequest.
pub const NO_ENCRYPTION: u8 = b'N';
/// A server's answer "TLS it is" to an SSLRequest.
pub const WILL_TLS: u8 = b'S';

/// The first message of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstMessage {
    /// Asks for TLS.
    SslRequest,
    /// Asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancels a query running on another connection of the same server.
    Cancel(CancelRequest),
    /// Starts a session.
    Startup(Startup),
}

/// A CancelRequest: the backend's process id and secret from its BackendKeyData.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: u32,
    pub secret: u32,
}

impl CancelRequest {
    /// The message's 16 bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&16u32.to_be_bytes());
        out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        out[8..12].copy_from_slice(&self.pid.to_be_bytes());
        out[12..].copy_from_slice(&self.secret.to_be_bytes());
        out
    }
}

/// A StartupMessage: the protocol version and the parameters, in order, plus the bytes as they
/// arrived (forwarded to the server unchanged once checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Startup {
    pub version: u32,
    pub params: Vec<(String, String)>,
    pub raw: Vec<u8>,
}

impl Startup {
    /// The value of parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The database user (always present: [`parse_first`] refuses a startup without one).
    pub fn user(&self) -> &str {
        self.param("user").unwrap_or_default()
    }

    /// The database the server will open: `database`, or the user name when it is absent or
    /// empty (the server's own default).
    pub fn database(&self) -> &str {
        match self.param("database") {
            Some(db) if !db.is_empty() => db,
            _ => self.user(),
        }
    }

    /// A StartupMessage for protocol 3.0 with `params` (tests and tools).
    pub fn encode(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }
}

/// Why a first message is refused. Each is the client's fault (or not a PostgreSQL client at
/// all); the agent answers with an [`error_response`] and closes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The length field is below the smallest first message (8).
    TooShort { len: usize },
    /// The length field exceeds [`MAX_STARTUP_BYTES`].
    TooLong { len: usize },
    /// An SSLRequest, GSSENCRequest or CancelRequest of the wrong length.
    BadLength { what: &'static str, len: usize },
    /// A protocol other than 3.x (or an unknown request code).
    UnsupportedProtocol { major: u16, minor: u16 },
    /// The parameter list is not `key NUL value NUL … NUL`.
    Malformed(&'static str),
    /// A parameter name or value is not UTF-8.
    NotUtf8,
    /// More than [`MAX_STARTUP_PARAMS`] parameters.
    TooManyParams,
    /// The same parameter twice.
    DuplicateParam(String),
    /// No `user` parameter, or an empty one.
    MissingUser,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooShort { len } => {
                write!(f, "invalid length of startup packet ({len} bytes)")
            }
            WireError::TooLong { len } => write!(
                f,
                "startup packet of {len} bytes exceeds the limit of {MAX_STARTUP_BYTES}"
            ),
            WireError::BadLength { what, len } => {
                write!(f, "invalid length of {what} ({len} bytes)")
            }
            WireError::UnsupportedProtocol { major, minor } => write!(
                f,
                "unsupported frontend protocol {major}.{minor}: only 3.x is spoken here"
            ),
            WireError::Malformed(why) => write!(f, "malformed startup packet: {why}"),
            WireError::NotUtf8 => f.write_str("startup packet parameters are not UTF-8"),
            WireError::TooManyParams => write!(
                f,
                "startup packet has more than {MAX_STARTUP_PARAMS} parameters"
            ),
            WireError::DuplicateParam(key) => {
                write!(f, "startup packet sets parameter {key:?} twice")
            }
            WireError::MissingUser => {
                f.write_str("no PostgreSQL user name specified in startup packet")
            }
        }
    }
}

impl std::error::Error for WireError {}

fn be32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(word)
}

/// Reads a connection's first message from the front of `buf`: `Ok(None)` until it is complete,
/// then the message and the bytes it used. The length is checked as soon as its four bytes are
/// there, so an oversized message is refused before its body is waited for.
pub fn parse_first(buf: &[u8]) -> Result<Option<(FirstMessage, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = be32(buf) as usize;
    if len < 8 {
        return Err(WireError::TooShort { len });
    }
    if len > MAX_STARTUP_BYTES {
        return Err(WireError::TooLong { len });
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let code = be32(&buf[4..]);
    let fixed = |what: &'static str, want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(WireError::BadLength { what, len })
        }
    };
    match code {
        SSL_REQUEST_CODE => fixed("SSLRequest", 8)?,
        GSSENC_REQUEST_CODE => fixed("GSSENCRequest", 8)?,
        CANCEL_REQUEST_CODE => fixed("CancelRequest", 16)?,
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
        }
    }
    let Some(message) = buf.get(..len) else {
        return Ok(None);
    };
    let first = match code {
        SSL_REQUEST_CODE => FirstMessage::SslRequest,
        GSSENC_REQUEST_CODE => FirstMessage::GssEncRequest,
        CANCEL_REQUEST_CODE => FirstMessage::Cancel(CancelRequest {
            pid: be32(&message[8..]),
            secret: be32(&message[12..]),
        }),
        version => FirstMessage::Startup(Startup {
            version,
            params: parse_params(&message[8..])?,
            raw: message.to_vec(),
        }),
    };
    Ok(Some((first, len)))
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let Some(key) = take_cstr(&mut body)? else {
            return Err(WireError::Malformed("the parameter list is not terminated"));
        };
        if key.is_empty() {
            break;
        }
        let Some(value) = take_cstr(&mut body)? else {
            return Err(WireError::Malformed("a parameter has no value"));
        };
        if params.len() == MAX_STARTUP_PARAMS {
            return Err(WireError::TooManyParams);
        }
        if params.iter().any(|(k, _)| k == key) {
            return Err(WireError::DuplicateParam(key.to_owned()));
        }
        params.push((key.to_owned(), value.to_owned()));
    }
    if !body.is_empty() {
        return Err(WireError::Malformed(
            "bytes after the end of the parameter list",
        ));
    }
    match params.iter().find(|(k, _)| k == "user") {
        Some((_, user)) if !user.is_empty() => Ok(params),
        _ => Err(WireError::MissingUser),
    }
}

/// Splits a NUL-terminated string off the front of `body`; `None` if there is no NUL.
fn take_cstr<'a>(body: &mut &'a [u8]) -> Result<Option<&'a str>, WireError> {
    let Some(nul) = body.iter().position(|&b| b == 0) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&body[..nul]).map_err(|_| WireError::NotUtf8)?;
    *body = &body[nul + 1..];
    Ok(Some(text))
}

/// An ErrorResponse: severity (`FATAL`, `ERROR`), SQLSTATE `code` and `message`. The message
/// loses NUL bytes and is cut to [`MAX_ERROR_MESSAGE_BYTES`] at a character boundary; clients
/// print it as `FATAL:  message`.
pub fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let clean = |s: &str| s.replace('\0', "");
    let mut body = Vec::with_capacity(end + 32);
    for (field, text) in [
        (b'S', clean(severity)),
        (b'V', clean(severity)),
        (b'C', clean(code)),
        (b'M', clean(&message[..end])),
    ] {
        body.push(field);
        body.extend_from_slice(text.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(
        &u32::try_from(body.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

/// SQLSTATE `28000`, invalid_authorization_specification: access refused.
pub const SQLSTATE_ACCESS_DENIED: &str = "28000";
/// SQLSTATE `08006`, connection_failure: the server could not be reached.
pub const SQLSTATE_CONNECTION_FAILURE: &str = "08006";
/// SQLSTATE `08P01`, protocol_violation: the client sent something unreadable.
pub const SQLSTATE_PROTOCOL_VIOLATION: &str = "08P01";

/// A query the client sent, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientQuery {
    /// Simple (`Q`) or extended (`P`, with the prepared statement's name; empty = unnamed).
    pub kind: QueryKind,
    /// The SQL text (invalid UTF-8 replaced), at most [`MAX_RECORDED_QUERY_BYTES`].
    pub text: String,
    /// The text was longer than what is kept.
    pub truncated: bool,
}

/// How a query was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryKind {
    /// A simple query (`Q`).
    Simple,
    /// An extended-protocol Parse (`P`) of the named statement.
    Parse { statement: String },
    /// A MySQL prepared statement (`COM_STMT_PREPARE`; the server names it by number).
    Prepare,
}

impl QueryKind {
    /// Stable label: `query`, `parse` or `prepare`.
    pub fn as_str(&self) -> &'static str {
        match self {
            QueryKind::Simple => "query",
            QueryKind::Parse { .. } => "parse",
            QueryKind::Prepare => "prepare",
        }
    }
}

/// Watches the client → server byte stream after the StartupMessage and reports each Query and
/// Parse message. Fed bytes in whatever pieces they arrive; holds at most a message header and
/// [`MAX_RECORDED_QUERY_BYTES`] of a query, whatever the messages' sizes (a COPY's data passes
/// by without being kept). A length field below 4 cannot be framed: the scanner then stops
/// (the server closes such a connection itself) and says so once through [`Self::lost`].
#[derive(Debug, Default)]
pub struct QueryScanner {
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message not seen yet (valid once the header is complete).
    body_left: usize,
    capturing: bool,
    captured: Vec<u8>,
    overflow: bool,
    lost: bool,
}

impl QueryScanner {
    pub fn new() -> QueryScanner {
        QueryScanner::default()
    }

    /// True once the stream could not be framed; nothing more is reported.
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Consumes `bytes`, appending the queries completed by them to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<ClientQuery>) {
        while !bytes.is_empty() && !self.lost {
            if self.header_len < self.header.len() {
                let take = (self.header.len() - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len < self.header.len() {
                    return;
                }
                let len = be32(&self.header[1..]) as usize;
                if len < 4 {
                    self.lost = true;
                    return;
                }
                self.body_left = len - 4;
                self.capturing = matches!(self.header[0], b'Q' | b'P');
                self.captured.clear();
                self.overflow = false;
                if self.body_left == 0 {
                    self.finish(out);
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            if self.capturing {
                // Room for the statement name and the query of a Parse.
                let cap = 2 * MAX_RECORDED_QUERY_BYTES;
                let keep = take.min(cap - self.captured.len());
                self.captured.extend_from_slice(&bytes[..keep]);
                self.overflow |= keep < take;
            }
            self.body_left -= take;
            bytes = &bytes[take..];
            if self.body_left == 0 {
                self.finish(out);
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ClientQuery>) {
        self.header_len = 0;
        if !self.capturing {
            return;
        }
        self.capturing = false;
        let body = std::mem::take(&mut self.captured);
        let overflow = self.overflow;
        let (kind, sql) = if self.header[0] == b'Q' {
            (QueryKind::Simple, body.as_slice())
        } else {
            let nul = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            let statement = String::from_utf8_lossy(&body[..nul]).into_owned();
            (
                QueryKind::Parse { statement },
                body.get(nul + 1..).unwrap_or_default(),
            )
        };
        let (sql, terminated) = match sql.iter().position(|&b| b == 0) {
            Some(nul) => (&sql[..nul], true),
            None => (sql, false),
        };
        let keep = sql.len().min(MAX_RECORDED_QUERY_BYTES);
        let mut text = String::from_utf8_lossy(&sql[..keep]).into_owned();
        if keep < sql.len() {
            // A character cut in half at the bound reads as U+FFFD; drop it.
            if text.ends_with('\u{FFFD}') {
                text.pop();
            }
        }
        out.push(ClientQuery {
            kind,
            text,
            truncated: keep < sql.len() || (overflow && !terminated),
        });
        self.captured = body;
        self.captured.clear();
    }
}

/// A frontend message: type byte, length, body (tests and tools).
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(kind);
    out.extend_from_slice(
        &u32::try_from(body.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// Fuzz entry point: a hostile client's first message, then its message stream. The first
/// message is parsed as the agent does; the rest is fed to a [`QueryScanner`] in pieces whose
/// size the first byte picks, so split headers and bodies are covered. A recorded query is never
/// longer than [`MAX_RECORDED_QUERY_BYTES`] (checked with `debug_assert!`, live in cargo-fuzz
/// builds).
pub fn fuzz_parse(data: &[u8]) {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let rest = match parse_first(bytes) {
        Ok(Some((_, used))) => {
            debug_assert!(used <= bytes.len() && used <= MAX_STARTUP_BYTES);
            bytes.get(used..).unwrap_or_default()
        }
        Ok(None) => return,
        Err(e) => {
            std::hint::black_box(e.to_string());
            bytes
        }
    };
    let mut scanner = QueryScanner::new();
    let mut out = Vec::new();
    for piece in rest.chunks(1 + usize::from(control)) {
        scanner.feed(piece, &mut out);
        for query in out.drain(..) {
            // Invalid UTF-8 is replaced (up to 3 bytes per byte), so bound by that.
            debug_assert!(query.text.len() <= 3 * MAX_RECORDED_QUERY_BYTES);
            std::hint::black_box(&query);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        Startup::encode(params)
    }

    #[test]
    fn startup_parses_at_every_split_and_leaves_what_follows() {
        let mut bytes = startup(&[
            ("user", "alice"),
            ("database", "app"),
            ("application_name", "psql"),
        ]);
        let len = bytes.len();
        bytes.extend_from_slice(b"Qnext");
        for cut in 0..len {
            assert_eq!(parse_first(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        let Ok(Some((FirstMessage::Startup(s), used))) = parse_first(&bytes) else {
            panic!("no startup");
        };
        assert_eq!(used, len);
        assert_eq!(s.version, PROTOCOL_3_0);
        assert_eq!((s.user(), s.database()), ("alice", "app"));
        assert_eq!(s.param("application_name"), Some("psql"));
        assert_eq!(s.raw, bytes[..len]);
    }

    #[test]
    fn database_defaults_to_the_user() {
        let Ok(Some((FirstMessage::Startup(s), _))) = parse_first(&startup(&[("user", "bob")]))
        else {
            panic!()
        };
        assert_eq!(s.database(), "bob");
        let Ok(Some((FirstMessage::Startup(s), _))) =
            parse_first(&startup(&[("user", "bob"), ("database", "")]))
        else {
            panic!()
        };
        assert_eq!(s.database(), "bob");
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_first(&SSL_REQUEST),
            Ok(Some((FirstMessage::SslRequest, 8)))
        );
        let mut gss = [0u8; 8];
        gss[..4].copy_from_slice(&8u32.to_be_bytes());
        gss[4..].copy_from_slice(&GSSENC_REQUEST_CODE.to_be_bytes());
        assert_eq!(
            parse_first(&gss),
            Ok(Some((FirstMessage::GssEncRequest, 8)))
        );
        let cancel = CancelRequest {
            pid: 4242,
            secret: 0xdead_beef,
        };
        assert_eq!(
            parse_first(&cancel.encode()),
            Ok(Some((FirstMessage::Cancel(cancel), 16)))
        );
    }

    #[test]
    fn oversized_and_undersized_lengths_are_refused_before_the_body() {
        let too_long = ((MAX_STARTUP_BYTES + 1) as u32).to_be_bytes();
        assert_eq!(
            parse_first(&too_long),
            Err(WireError::TooLong {
                len: MAX_STARTUP_BYTES + 1
            })
        );
        assert_eq!(
            parse_first(&u32::MAX.to_be_bytes()),
            Err(WireError::TooLong {
                len: u32::MAX as usize
            })
        );
        assert_eq!(
            parse_first(&[0, 0, 0, 7]),
            Err(WireError::TooShort { len: 7 })
        );
        assert_eq!(
            parse_first(&[0, 0, 0, 0]),
            Err(WireError::TooShort { len: 0 })
        );
        // The largest allowed size is waited for, not refused.
        let mut max = (MAX_STARTUP_BYTES as u32).to_be_bytes().to_vec();
        max.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        assert_eq!(parse_first(&max), Ok(None));
    }

    #[test]
    fn malformed_startups_are_refused() {
        let raw = |version: u32, body: &[u8]| {
            let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(body);
            out
        };
        let cases: [(Vec<u8>, WireError); 9] = [
            (
                raw(PROTOCOL_3_0, b"user\0alice\0"),
                WireError::Malformed("the parameter list is not terminated"),
            ),
            (
                raw(PROTOCOL_3_0, b"user\0"),
                WireError::Malformed("a parameter has no value"),
            ),
            (
                raw(PROTOCOL_3_0, b"user\0alice\0\0junk"),
                WireError::Malformed("bytes after the end of the parameter list"),
            ),
            (
                raw(PROTOCOL_3_0, b"database\0app\0\0"),
                WireError::MissingUser,
            ),
            (raw(PROTOCOL_3_0, b"user\0\0\0"), WireError::MissingUser),
            (
                raw(PROTOCOL_3_0, b"user\0a\0user\0b\0\0"),
                WireError::DuplicateParam("user".into()),
            ),
            (raw(PROTOCOL_3_0, b"user\0\xff\xfe\0\0"), WireError::NotUtf8),
            (
                raw(2 << 16, b"user\0alice\0\0"),
                WireError::UnsupportedProtocol { major: 2, minor: 0 },
            ),
            (
                raw(SSL_REQUEST_CODE, b"xxxx"),
                WireError::BadLength {
                    what: "SSLRequest",
                    len: 12,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse_first(&bytes), Err(want.clone()), "{want}");
        }
        let many: Vec<(String, String)> = (0..=MAX_STARTUP_PARAMS)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        let mut params: Vec<(&str, &str)> = vec![("user", "alice")];
        params.extend(many.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(
            parse_first(&startup(&params)),
            Err(WireError::TooManyParams)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 48) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            if len >= 8 && seed.is_multiple_of(3) {
                bytes[..4].copy_from_slice(&(len as u32).to_be_bytes());
                bytes[4..8].copy_from_slice(&PROTOCOL_3_0.to_be_bytes());
            }
            let _ = parse_first(&bytes);
            let mut scanner = QueryScanner::new();
            scanner.feed(&bytes, &mut Vec::new());
        }
    }

    #[test]
    fn error_response_reads_as_postgres_writes_it() {
        let bytes = error_response("FATAL", "28000", "jaunt: access denied");
        assert_eq!(bytes[0], b'E');
        assert_eq!(be32(&bytes[1..]) as usize, bytes.len() - 1);
        assert_eq!(
            &bytes[5..],
            b"SFATAL\0VFATAL\0C28000\0Mjaunt: access denied\0\0"
        );
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let bytes = error_response("FATAL", "28000", &format!("a\0b{long}"));
        assert!(bytes.len() < MAX_ERROR_MESSAGE_BYTES + 64);
        assert!(std::str::from_utf8(&bytes[5..]).is_ok());
        assert!(bytes.windows(3).any(|w| w == b"Mab"));
    }

    fn parse(statement: &str, sql: &str) -> Vec<u8> {
        let mut body = statement.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&23u32.to_be_bytes());
        message(b'P', &body)
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        message(b'Q', &body)
    }

    #[test]
    fn scanner_reports_queries_and_parses_at_every_split() {
        let mut stream = query("select 1");
        stream.extend(message(b'B', b"\0\0\0\0\0\0\0\0\0\0"));
        stream.extend(parse("s1", "select $1::int"));
        stream.extend(message(b'S', b""));
        stream.extend(message(b'd', &vec![7u8; 100_000]));
        stream.extend(parse("", "insert into t values ($1)"));
        stream.extend(message(b'X', b""));
        let want = vec![
            ClientQuery {
                kind: QueryKind::Simple,
                text: "select 1".into(),
                truncated: false,
            },
            ClientQuery {
                kind: QueryKind::Parse {
                    statement: "s1".into(),
                },
                text: "select $1::int".into(),
                truncated: false,
            },
            ClientQuery {
                kind: QueryKind::Parse {
                    statement: String::new(),
                },
                text: "insert into t values ($1)".into(),
                truncated: false,
            },
        ];
        for cut in [1, 2, 3, 5, 7, 64, 4096, stream.len()] {
            let mut scanner = QueryScanner::new();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                scanner.feed(piece, &mut got);
            }
            assert_eq!(got, want, "pieces of {cut}");
            assert!(!scanner.lost());
        }
        // Byte by byte through the headers and the first query.
        let mut scanner = QueryScanner::new();
        let mut got = Vec::new();
        for b in &stream[..40] {
            scanner.feed(std::slice::from_ref(b), &mut got);
        }
        scanner.feed(&stream[40..], &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn long_queries_are_recorded_truncated_and_memory_stays_bounded() {
        let sql = format!("select '{}'", "x".repeat(3 * MAX_RECORDED_QUERY_BYTES));
        let mut scanner = QueryScanner::new();
        let mut got = Vec::new();
        let bytes = query(&sql);
        for piece in bytes.chunks(1000) {
            scanner.feed(piece, &mut got);
            assert!(scanner.captured.capacity() <= 4 * MAX_RECORDED_QUERY_BYTES);
        }
        scanner.feed(&query("select 2"), &mut got);
        assert_eq!(got.len(), 2);
        assert!(got[0].truncated);
        assert_eq!(got[0].text.len(), MAX_RECORDED_QUERY_BYTES);
        assert!(got[0].text.starts_with("select 'xxx"));
        assert_eq!(got[1].text, "select 2");
        assert!(!got[1].truncated);

        // A multi-byte character cut at the bound does not leave a replacement character.
        let sql = format!("{}é", "a".repeat(MAX_RECORDED_QUERY_BYTES - 1));
        let mut got = Vec::new();
        QueryScanner::new().feed(&query(&sql), &mut got);
        assert!(got[0].truncated);
        assert!(!got[0].text.contains('\u{FFFD}'));
    }

    #[test]
    fn an_unframeable_stream_stops_the_scanner() {
        let mut scanner = QueryScanner::new();
        let mut got = Vec::new();
        scanner.feed(&[b'Q', 0, 0, 0, 2, b'x'], &mut got);
        assert!(scanner.lost());
        scanner.feed(&query("select 1"), &mut got);
        assert!(got.is_empty());
        // Invalid UTF-8 in a query is replaced, not refused.
        let mut scanner = QueryScanner::new();
        scanner.feed(&message(b'Q', b"select '\xff'\0"), &mut got);
        assert_eq!(got[0].text, "select '\u{FFFD}'");
    }
}
