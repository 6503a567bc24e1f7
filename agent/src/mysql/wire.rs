//! The parts of the MySQL/MariaDB client/server protocol the agent reads and writes, sans-IO:
//! pure functions and state machines over byte buffers, so every malformed, split or oversized
//! input is a unit test (and [`fuzz_parse`] a fuzz target) rather than a network setup.
//!
//! ```text
//! packet                  int<3> payload length · int<1> sequence id · payload
//!                         (a payload of 0xffffff bytes continues in the next packet)
//! connection phase
//!   server → client  #0   HandshakeV10: 0x0a · version NUL · conn id · scramble[8] · 0 ·
//!                         caps lo · charset · status · caps hi · scramble len · reserved[10] ·
//!                         scramble rest · plugin NUL
//!   client → server  #1   SSLRequest (32 bytes, CLIENT_SSL) — then TLS — or:
//!                         HandshakeResponse41: caps · max packet · charset · reserved[23] ·
//!                         user NUL · auth data · [database NUL] · [plugin NUL] · [attrs]
//!   server → client       OK 0x00 · ERR 0xff · AuthSwitchRequest 0xfe · AuthMoreData 0x01
//! command phase (client → server, sequence id 0 starts a command)
//!   COM_QUIT 0x01 · COM_INIT_DB 0x02 name · COM_QUERY 0x03 text · COM_CHANGE_USER 0x11 ·
//!   COM_STMT_PREPARE 0x16 text · ...
//! ERR                     0xff · int<2> code · ['#' sqlstate[5]] · message
//! ```
//!
//! Bounds: a connection-phase packet is at most [`MAX_HANDSHAKE_PACKET_BYTES`] (checked from
//! its header, before its body is awaited); a COM_INIT_DB is at most [`MAX_INIT_DB_BYTES`];
//! a recorded query keeps at most [`MAX_RECORDED_QUERY_BYTES`]. Other command packets pass
//! through [`CommandFilter`] as they arrive, whatever their size: the server enforces its own
//! `max_allowed_packet`.
//!
//! Not here: TLS, sockets, timeouts, and the authorization decisions (`mysql.rs`); the wire
//! format of result sets (the agent never parses the server's answers beyond packet framing).

use std::fmt;

pub use crate::postgres::wire::MAX_RECORDED_QUERY_BYTES;
use crate::postgres::wire::{ClientQuery, QueryKind};

/// Largest payload of one packet; a payload this long continues in the next packet.
pub const MAX_PACKET_PAYLOAD: usize = 0xff_ffff;
/// Largest connection-phase packet accepted (handshake, response, auth exchange): real ones
/// are a few hundred bytes; connection attributes are bounded by the servers at 64 KiB.
pub const MAX_HANDSHAKE_PACKET_BYTES: usize = 64 * 1024;
/// Largest COM_INIT_DB accepted (a database name is at most 64 characters).
pub const MAX_INIT_DB_BYTES: usize = 1024;
/// Longest message text in an [`err_packet`] (bytes of UTF-8).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 2048;
/// Most rounds of an authentication exchange with the server before giving up.
pub const MAX_AUTH_ROUNDS: usize = 4;

/// Capability flags (the `CLIENT_*` constants of both servers).
pub mod caps {
    /// Also `CLIENT_MYSQL` in MariaDB: set means "no MariaDB extended capabilities".
    pub const LONG_PASSWORD: u32 = 1;
    pub const FOUND_ROWS: u32 = 1 << 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const NO_SCHEMA: u32 = 1 << 4;
    pub const COMPRESS: u32 = 1 << 5;
    pub const ODBC: u32 = 1 << 6;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const IGNORE_SPACE: u32 = 1 << 8;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const INTERACTIVE: u32 = 1 << 10;
    pub const SSL: u32 = 1 << 11;
    pub const IGNORE_SIGPIPE: u32 = 1 << 12;
    pub const TRANSACTIONS: u32 = 1 << 13;
    pub const RESERVED: u32 = 1 << 14;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const MULTI_RESULTS: u32 = 1 << 17;
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const CAN_HANDLE_EXPIRED_PASSWORDS: u32 = 1 << 22;
    pub const SESSION_TRACK: u32 = 1 << 23;
    pub const DEPRECATE_EOF: u32 = 1 << 24;
}

/// What the agent offers the user's client. Left out: `COMPRESS` (the agent frames the
/// stream), `SSL` (the hop to the cluster is TLS already), `LOCAL_FILES` (`LOAD DATA LOCAL`
/// lets the server read the client's files, and its data packets would wrap the sequence id),
/// and everything newer than MySQL 5.7 / MariaDB 10.2 (query attributes, optional metadata,
/// MariaDB's extended capabilities: `LONG_PASSWORD` = `CLIENT_MYSQL` turns those off).
pub const OFFERED_CAPABILITIES: u32 = caps::LONG_PASSWORD
    | caps::FOUND_ROWS
    | caps::LONG_FLAG
    | caps::CONNECT_WITH_DB
    | caps::NO_SCHEMA
    | caps::ODBC
    | caps::IGNORE_SPACE
    | caps::PROTOCOL_41
    | caps::INTERACTIVE
    | caps::IGNORE_SIGPIPE
    | caps::TRANSACTIONS
    | caps::RESERVED
    | caps::SECURE_CONNECTION
    | caps::MULTI_STATEMENTS
    | caps::MULTI_RESULTS
    | caps::PS_MULTI_RESULTS
    | caps::PLUGIN_AUTH
    | caps::CONNECT_ATTRS
    | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
    | caps::CAN_HANDLE_EXPIRED_PASSWORDS
    | caps::SESSION_TRACK
    | caps::DEPRECATE_EOF;

/// Capabilities that change what command-phase packets look like or mean: the agent relays
/// that phase unchanged, so the server must grant each of these the client uses.
pub const FORMAT_CAPABILITIES: u32 = caps::FOUND_ROWS
    | caps::LONG_FLAG
    | caps::NO_SCHEMA
    | caps::ODBC
    | caps::IGNORE_SPACE
    | caps::PROTOCOL_41
    | caps::INTERACTIVE
    | caps::TRANSACTIONS
    | caps::MULTI_STATEMENTS
    | caps::MULTI_RESULTS
    | caps::PS_MULTI_RESULTS
    | caps::SESSION_TRACK
    | caps::DEPRECATE_EOF;

/// Capabilities a client must use: the 4.1 protocol (every client since 2004).
pub const REQUIRED_CAPABILITIES: u32 = caps::PROTOCOL_41 | caps::SECURE_CONNECTION;

/// `mysql_native_password`, the plugin the agent announces to clients.
pub const NATIVE_PASSWORD: &str = "mysql_native_password";
/// `caching_sha2_password` (MySQL 8's default client plugin).
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";
/// Length of the scramble in a handshake.
pub const SCRAMBLE_LEN: usize = 20;
/// utf8mb4_general_ci, the character set announced to clients.
pub const DEFAULT_CHARSET: u8 = 45;
/// SERVER_STATUS_AUTOCOMMIT.
pub const STATUS_AUTOCOMMIT: u16 = 2;

/// Command bytes the agent looks at.
pub mod command {
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const CHANGE_USER: u8 = 0x11;
    pub const STMT_PREPARE: u8 = 0x16;
}

/// Error codes the agent sends (the servers' own numbers, so clients print them as usual).
pub mod code {
    /// ER_DBACCESS_DENIED_ERROR (SQLSTATE 42000).
    pub const DB_ACCESS_DENIED: u16 = 1044;
    /// ER_ACCESS_DENIED_ERROR (SQLSTATE 28000).
    pub const ACCESS_DENIED: u16 = 1045;
    /// ER_HANDSHAKE_ERROR (SQLSTATE 08S01): the client sent something unreadable.
    pub const HANDSHAKE_ERROR: u16 = 1043;
    /// ER_NET_PACKET_TOO_LARGE (SQLSTATE 08S01).
    pub const PACKET_TOO_LARGE: u16 = 1153;
    /// ER_NOT_SUPPORTED_YET (SQLSTATE 42000).
    pub const NOT_SUPPORTED: u16 = 1235;
    /// ER_CONNECT_TO_FOREIGN_DATA_SOURCE (SQLSTATE HY000): the agent cannot reach or log in
    /// to the database. Not the client's own 2003: libmariadb reads a server error with a
    /// client-range code as a malformed packet.
    pub const CANNOT_CONNECT: u16 = 1429;
}

/// Why bytes from a peer cannot be used. Each ends that connection only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A connection-phase packet (or a COM_INIT_DB) longer than its bound.
    TooLong { what: &'static str, len: usize },
    /// A packet ended before a field it must have.
    Truncated(&'static str),
    /// A field that cannot be what it says.
    Malformed(&'static str),
    /// A name that is not UTF-8.
    NotUtf8(&'static str),
    /// A handshake of a protocol version other than 10.
    UnsupportedProtocol(u8),
    /// A packet with the wrong sequence id.
    Sequence { want: u8, got: u8 },
    /// A client using capabilities it was not offered, or lacking required ones.
    Capabilities(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLong { what, len } => {
                write!(f, "{what} of {len} bytes is larger than allowed")
            }
            WireError::Truncated(what) => write!(f, "malformed packet: {what} is cut short"),
            WireError::Malformed(what) => write!(f, "malformed packet: {what}"),
            WireError::NotUtf8(what) => write!(f, "malformed packet: {what} is not UTF-8"),
            WireError::UnsupportedProtocol(v) => {
                write!(f, "handshake protocol {v} is not supported (only 10 is)")
            }
            WireError::Sequence { want, got } => {
                write!(
                    f,
                    "packets out of order (sequence id {got}, expected {want})"
                )
            }
            WireError::Capabilities(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for WireError {}

// ---------------------------------------------------------------------------------------------
// Packets

/// One whole packet at the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub seq: u8,
    pub payload: &'a [u8],
}

/// Reads one packet from the front of `buf`: `Ok(None)` until it is complete, then the packet
/// and the bytes it used. A payload longer than `max` is refused as soon as the header is in.
pub fn parse_packet<'a>(
    buf: &'a [u8],
    max: usize,
    what: &'static str,
) -> Result<Option<(Packet<'a>, usize)>, WireError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = le24(header);
    if len > max {
        return Err(WireError::TooLong { what, len });
    }
    let Some(payload) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((
        Packet {
            seq: header[3],
            payload,
        },
        4 + len,
    )))
}

/// A packet of `payload` (at most [`MAX_PACKET_PAYLOAD`] bytes: the agent only writes small
/// ones) with sequence id `seq`.
pub fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(MAX_PACKET_PAYLOAD);
    let mut out = Vec::with_capacity(len + 4);
    out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(&payload[..len]);
    out
}

fn le24(b: &[u8]) -> usize {
    usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16
}

/// A cursor over a payload; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Reader<'a> {
        Reader { rest }
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string (without the NUL).
    fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(WireError::Truncated(what));
        };
        let s = &self.rest[..nul];
        self.rest = &self.rest[nul + 1..];
        Ok(s)
    }

    /// A length-encoded integer.
    fn lenenc(&mut self, what: &'static str) -> Result<u64, WireError> {
        match self.u8(what)? {
            n @ 0..=0xfa => Ok(u64::from(n)),
            0xfc => Ok(u64::from(self.u16(what)?)),
            0xfd => {
                let b = self.bytes(3, what)?;
                Ok(le24(b) as u64)
            }
            0xfe => {
                let b = self.bytes(8, what)?;
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                Ok(u64::from_le_bytes(w))
            }
            _ => Err(WireError::Malformed(
                "a length-encoded integer starts with 0xfb/0xff",
            )),
        }
    }

    /// A length-encoded string.
    fn lenenc_bytes(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.lenenc(what)?;
        let n = usize::try_from(n).map_err(|_| WireError::Truncated(what))?;
        self.bytes(n, what)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::NotUtf8(what))
}

fn put_lenenc(out: &mut Vec<u8>, n: usize) {
    // The agent writes short fields only; a longer length still encodes correctly.
    if n < 0xfb {
        out.push(n as u8);
    } else if n <= 0xffff {
        out.push(0xfc);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if n <= 0xff_ffff {
        out.push(0xfd);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xfe);
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Connection phase

/// The server's first packet (HandshakeV10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: String,
    pub connection_id: u32,
    pub capabilities: u32,
    pub charset: u8,
    pub status: u16,
    /// The auth plugin's data (20 bytes of scramble for the usual plugins).
    pub scramble: Vec<u8>,
    /// The auth plugin (empty without `PLUGIN_AUTH`).
    pub auth_plugin: String,
}

impl Greeting {
    /// Reads a HandshakeV10 payload.
    pub fn parse(payload: &[u8]) -> Result<Greeting, WireError> {
        let mut r = Reader::new(payload);
        let protocol = r.u8("protocol version")?;
        if protocol != 10 {
            return Err(WireError::UnsupportedProtocol(protocol));
        }
        let server_version = String::from_utf8_lossy(r.cstr("server version")?).into_owned();
        let connection_id = r.u32("connection id")?;
        let mut scramble = r.bytes(8, "scramble")?.to_vec();
        r.u8("filler")?;
        let low = r.u16("capabilities")?;
        let charset = r.u8("character set")?;
        let status = r.u16("status")?;
        let high = r.u16("capabilities")?;
        let capabilities = u32::from(low) | u32::from(high) << 16;
        let data_len = r.u8("auth data length")?;
        r.bytes(10, "reserved")?;
        if capabilities & caps::SECURE_CONNECTION != 0 {
            let n = (usize::from(data_len).saturating_sub(8)).max(13);
            let rest = r.bytes(n.min(r.rest.len()), "scramble")?;
            // The second part ends with a NUL that is not part of the data.
            let rest = rest.strip_suffix(&[0]).unwrap_or(rest);
            scramble.extend_from_slice(rest);
        }
        let auth_plugin = if capabilities & caps::PLUGIN_AUTH != 0 && !r.is_empty() {
            let rest = r.rest();
            let name = rest.strip_suffix(&[0]).unwrap_or(rest);
            utf8(name, "auth plugin name")?.to_owned()
        } else {
            String::new()
        };
        Ok(Greeting {
            server_version,
            connection_id,
            capabilities,
            charset,
            status,
            scramble,
            auth_plugin,
        })
    }

    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(10);
        out.extend_from_slice(self.server_version.replace('\0', "").as_bytes());
        out.push(0);
        out.extend_from_slice(&self.connection_id.to_le_bytes());
        let mut scramble = self.scramble.clone();
        scramble.resize(scramble.len().max(8), 0);
        out.extend_from_slice(&scramble[..8]);
        out.push(0);
        out.extend_from_slice(&(self.capabilities as u16).to_le_bytes());
        out.push(self.charset);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&((self.capabilities >> 16) as u16).to_le_bytes());
        out.push(u8::try_from(scramble.len() + 1).unwrap_or(0));
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&scramble[8..]);
        out.push(0);
        out.extend_from_slice(self.auth_plugin.as_bytes());
        out.push(0);
        out
    }
}

/// The client's answer to the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    pub max_packet: u32,
    pub charset: u8,
    pub user: String,
    pub auth_response: Vec<u8>,
    /// With `CONNECT_WITH_DB` (an empty name reads as none).
    pub database: Option<String>,
    /// With `PLUGIN_AUTH`.
    pub auth_plugin: Option<String>,
    /// With `CONNECT_ATTRS`: the attribute block after its length, as sent.
    pub attrs: Option<Vec<u8>>,
}

/// What a client sends after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHandshake {
    /// A 32-byte SSLRequest: the client wants TLS.
    SslRequest { capabilities: u32 },
    /// A HandshakeResponse41.
    Response(HandshakeResponse),
}

impl HandshakeResponse {
    /// Reads a client's answer to the handshake. Only the 4.1 protocol is read (older clients
    /// are refused with [`WireError::Capabilities`]).
    pub fn parse(payload: &[u8]) -> Result<ClientHandshake, WireError> {
        let mut r = Reader::new(payload);
        let capabilities = r.u32("capabilities")?;
        if capabilities & caps::PROTOCOL_41 == 0 {
            return Err(WireError::Capabilities(
                "the client does not speak the 4.1 protocol (MySQL 4.1 or newer is needed)".into(),
            ));
        }
        let max_packet = r.u32("max packet size")?;
        let charset = r.u8("character set")?;
        r.bytes(23, "reserved")?;
        if r.is_empty() {
            if capabilities & caps::SSL != 0 {
                return Ok(ClientHandshake::SslRequest { capabilities });
            }
            return Err(WireError::Truncated("user name"));
        }
        let user = utf8(r.cstr("user name")?, "user name")?.to_owned();
        let auth_response = if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            r.lenenc_bytes("auth data")?
        } else if capabilities & caps::SECURE_CONNECTION != 0 {
            let n = r.u8("auth data")?;
            r.bytes(usize::from(n), "auth data")?
        } else {
            r.cstr("auth data")?
        }
        .to_vec();
        let mut database = None;
        if capabilities & caps::CONNECT_WITH_DB != 0 && !r.is_empty() {
            let db = utf8(r.cstr("database")?, "database")?;
            if !db.is_empty() {
                database = Some(db.to_owned());
            }
        }
        let mut auth_plugin = None;
        if capabilities & caps::PLUGIN_AUTH != 0 && !r.is_empty() {
            auth_plugin = Some(utf8(r.cstr("auth plugin name")?, "auth plugin name")?.to_owned());
        }
        let mut attrs = None;
        if capabilities & caps::CONNECT_ATTRS != 0 && !r.is_empty() {
            let block = r.lenenc_bytes("connection attributes")?;
            // Each attribute is a length-encoded key and value.
            let mut a = Reader::new(block);
            while !a.is_empty() {
                a.lenenc_bytes("attribute name")?;
                a.lenenc_bytes("attribute value")?;
            }
            attrs = Some(block.to_vec());
        }
        if !r.is_empty() {
            return Err(WireError::Malformed(
                "bytes after the end of the handshake response",
            ));
        }
        Ok(ClientHandshake::Response(HandshakeResponse {
            capabilities,
            max_packet,
            charset,
            user,
            auth_response,
            database,
            auth_plugin,
            attrs,
        }))
    }

    /// The payload, as the capabilities say.
    pub fn encode(&self) -> Vec<u8> {
        let c = self.capabilities;
        let mut out = Vec::with_capacity(128 + self.attrs.as_ref().map_or(0, Vec::len));
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&self.max_packet.to_le_bytes());
        out.push(self.charset);
        out.extend_from_slice(&[0; 23]);
        out.extend_from_slice(self.user.replace('\0', "").as_bytes());
        out.push(0);
        if c & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            put_lenenc(&mut out, self.auth_response.len());
            out.extend_from_slice(&self.auth_response);
        } else {
            let n = self.auth_response.len().min(255);
            out.push(n as u8);
            out.extend_from_slice(&self.auth_response[..n]);
        }
        if c & caps::CONNECT_WITH_DB != 0 {
            out.extend_from_slice(
                self.database
                    .as_deref()
                    .unwrap_or("")
                    .replace('\0', "")
                    .as_bytes(),
            );
            out.push(0);
        }
        if c & caps::PLUGIN_AUTH != 0 {
            out.extend_from_slice(self.auth_plugin.as_deref().unwrap_or("").as_bytes());
            out.push(0);
        }
        if c & caps::CONNECT_ATTRS != 0 {
            let attrs = self.attrs.as_deref().unwrap_or_default();
            put_lenenc(&mut out, attrs.len());
            out.extend_from_slice(attrs);
        }
        out
    }
}

/// A connection-attribute block (as in [`HandshakeResponse::attrs`]) with `key` = `value`
/// appended: the server shows them in `performance_schema.session_connect_attrs`.
pub fn with_attr(attrs: Option<&[u8]>, key: &str, value: &str) -> Vec<u8> {
    let mut out = attrs.unwrap_or_default().to_vec();
    put_lenenc(&mut out, key.len());
    out.extend_from_slice(key.as_bytes());
    put_lenenc(&mut out, value.len());
    out.extend_from_slice(value.as_bytes());
    out
}

/// An SSLRequest payload.
pub fn ssl_request(capabilities: u32, max_packet: u32, charset: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&(capabilities | caps::SSL).to_le_bytes());
    out.extend_from_slice(&max_packet.to_le_bytes());
    out.push(charset);
    out.extend_from_slice(&[0; 23]);
    out
}

/// Checks a client's capabilities against what it was offered; returns the ones in force.
pub fn negotiate(client: u32, offered: u32) -> Result<u32, WireError> {
    if client & caps::SSL != 0 && offered & caps::SSL == 0 {
        return Err(WireError::Capabilities(
            "the client asked for TLS, which is not offered here: the hop to the cluster is \
             TLS already, connect without --ssl (mysql: --ssl-mode=DISABLED)"
                .into(),
        ));
    }
    if client & REQUIRED_CAPABILITIES != REQUIRED_CAPABILITIES {
        return Err(WireError::Capabilities(
            "the client does not use the 4.1 protocol with secure connections".into(),
        ));
    }
    let unoffered = client & FORMAT_CAPABILITIES & !offered;
    if unoffered != 0 {
        return Err(WireError::Capabilities(format!(
            "the client claims capabilities it was not offered (0x{unoffered:08x})"
        )));
    }
    Ok(client & offered)
}

/// A server's answer during authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthReply<'a> {
    /// Logged in (the whole OK payload, relayed to the client).
    Ok,
    /// Refused.
    Err(ErrPacket),
    /// Use another plugin, with its data.
    Switch { plugin: String, data: &'a [u8] },
    /// More data for the current plugin.
    MoreData(&'a [u8]),
}

impl<'a> AuthReply<'a> {
    /// Reads a server packet of the authentication exchange.
    pub fn parse(payload: &'a [u8]) -> Result<AuthReply<'a>, WireError> {
        match payload.first() {
            Some(0x00) => Ok(AuthReply::Ok),
            Some(0xff) => Ok(AuthReply::Err(ErrPacket::parse(payload)?)),
            Some(0xfe) => {
                let mut r = Reader::new(&payload[1..]);
                let plugin = if r.is_empty() {
                    // The old-password switch of pre-4.1 servers.
                    String::new()
                } else {
                    utf8(r.cstr("auth plugin name")?, "auth plugin name")?.to_owned()
                };
                Ok(AuthReply::Switch {
                    plugin,
                    data: r.rest(),
                })
            }
            Some(0x01) => Ok(AuthReply::MoreData(&payload[1..])),
            Some(_) => Err(WireError::Malformed(
                "unexpected packet during authentication",
            )),
            None => Err(WireError::Truncated("authentication reply")),
        }
    }
}

/// An AuthSwitchRequest payload.
pub fn auth_switch(plugin: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + plugin.len() + data.len() + 1);
    out.push(0xfe);
    out.extend_from_slice(plugin.as_bytes());
    out.push(0);
    out.extend_from_slice(data);
    out.push(0);
    out
}

/// `caching_sha2_password`'s "fast authentication succeeded" (AuthMoreData 0x03).
pub const FAST_AUTH_SUCCESS: [u8; 2] = [0x01, 0x03];
/// `caching_sha2_password`'s "send the password" (AuthMoreData 0x04).
pub const PERFORM_FULL_AUTH: u8 = 0x04;

/// An ERR packet's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    /// Absent in errors sent before the 4.1 handshake completes.
    pub sqlstate: Option<String>,
    pub message: String,
}

impl ErrPacket {
    /// Reads an ERR payload (`0xff` first).
    pub fn parse(payload: &[u8]) -> Result<ErrPacket, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("error marker")? != 0xff {
            return Err(WireError::Malformed("not an error packet"));
        }
        let code = r.u16("error code")?;
        let mut sqlstate = None;
        if r.rest.first() == Some(&b'#') && r.rest.len() >= 6 {
            let state = r.bytes(6, "sqlstate")?;
            sqlstate = Some(String::from_utf8_lossy(&state[1..]).into_owned());
        }
        Ok(ErrPacket {
            code,
            sqlstate,
            message: String::from_utf8_lossy(r.rest()).into_owned(),
        })
    }

    /// The payload; with `sqlstate` only when the client speaks 4.1 (`protocol_41`).
    pub fn encode(&self, protocol_41: bool) -> Vec<u8> {
        let state = self.sqlstate.as_deref().filter(|_| protocol_41);
        err_packet(self.code, state, &self.message)
    }
}

/// An ERR payload: `code`, the five-character `sqlstate` (`None` before the client's 4.1
/// handshake response is in), and `message`, cut to [`MAX_ERROR_MESSAGE_BYTES`] at a
/// character boundary. Clients print `ERROR code (sqlstate): message`.
pub fn err_packet(code: u16, sqlstate: Option<&str>, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(end + 9);
    out.push(0xff);
    out.extend_from_slice(&code.to_le_bytes());
    if let Some(state) = sqlstate {
        let mut s = [b'H', b'Y', b'0', b'0', b'0'];
        if state.len() == 5 && state.is_ascii() {
            s.copy_from_slice(state.as_bytes());
        }
        out.push(b'#');
        out.extend_from_slice(&s);
    }
    out.extend_from_slice(&message.as_bytes()[..end]);
    out
}

// ---------------------------------------------------------------------------------------------
// Command phase

/// What the [`CommandFilter`] decided about the bytes it was fed.
#[derive(Debug, Default)]
pub struct Filtered {
    /// Bytes for the server, in order.
    pub to_server: Vec<u8>,
    /// Whole packets for the client (refusals), in order.
    pub to_client: Vec<Vec<u8>>,
    /// Queries and prepared statements, in order, as forwarded.
    pub queries: Vec<ClientQuery>,
    /// Refused commands, for the audit log: what the client was told.
    pub refused: Vec<String>,
    /// Databases switched to by a forwarded COM_INIT_DB.
    pub init_db: Vec<String>,
}

impl Filtered {
    /// Empties every list, keeping their allocations.
    pub fn clear(&mut self) {
        self.to_server.clear();
        self.to_client.clear();
        self.queries.clear();
        self.refused.clear();
        self.init_db.clear();
    }
}

/// The client → server direction of the command phase. Fed the client's bytes in whatever
/// pieces they arrive, it frames packets and, for each command (a packet with sequence id 0
/// that does not continue a 16 MiB payload):
///
/// - COM_QUERY, COM_STMT_PREPARE: forwarded as they arrive; the text (first
///   [`MAX_RECORDED_QUERY_BYTES`]) is reported when its packet ends;
/// - COM_INIT_DB: held until whole (at most [`MAX_INIT_DB_BYTES`]), then forwarded if the
///   database is allowed, else answered with an ERR 1044 and dropped;
/// - COM_CHANGE_USER: answered with an ERR and dropped (it would log in as another user);
/// - everything else: forwarded.
///
/// Holds at most a header, a COM_INIT_DB and the recorded part of one query, whatever the
/// packets' sizes.
#[derive(Debug)]
pub struct CommandFilter {
    allowed_db_names: Vec<String>,
    header: [u8; 4],
    header_len: usize,
    /// Payload bytes of the current packet still to come.
    body_left: usize,
    /// The previous packet was 0xffffff long: this one continues its payload.
    continues: bool,
    current: Current,
}

#[derive(Debug)]
enum Current {
    /// Forwarding a packet we do not look into.
    Forward,
    /// Forwarding a query or prepare, keeping its text.
    Record {
        kind: u8,
        text: Vec<u8>,
        overflow: bool,
    },
    /// Holding the first bytes of a COM_QUERY until it is clear whether it is a `USE`.
    Sniff(Vec<u8>),
    /// Holding a COM_INIT_DB, or a COM_QUERY that is a `USE` (`kind`), header included.
    Hold { held: Vec<u8>, kind: u8 },
    /// Dropping a refused packet.
    Drop,
}

impl CommandFilter {
    /// A filter allowing COM_INIT_DB to `allowed_db_names` (`*` = any).
    pub fn new(allowed_db_names: Vec<String>) -> CommandFilter {
        CommandFilter {
            allowed_db_names,
            header: [0; 4],
            header_len: 0,
            body_left: 0,
            continues: false,
            current: Current::Forward,
        }
    }

    /// Consumes `bytes`; what to do with them is appended to `out`. An error ends the
    /// connection (the client should be told `err`'s text).
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Filtered) -> Result<(), WireError> {
        while !bytes.is_empty() {
            if self.header_len < 4 {
                let take = (4 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len < 4 {
                    return Ok(());
                }
                self.body_left = le24(&self.header);
                if self.body_left == 0 {
                    // An empty packet: nothing to decide on (it ends a 16 MiB payload, or is
                    // an empty command the server will refuse).
                    if self.continues {
                        self.flush_held(out);
                    } else {
                        out.to_server.extend_from_slice(&self.header);
                    }
                    self.end_packet(out)?;
                    continue;
                }
                if self.header[3] == 0 && !self.continues {
                    // A new command: decided by its first byte, which is not here yet when
                    // the header ends the piece.
                    self.current = Current::Forward;
                    if bytes.is_empty() {
                        self.header_len = 5; // marker: header complete, command byte pending
                        return Ok(());
                    }
                    self.start_command(bytes[0], out)?;
                } else {
                    self.continue_packet(out);
                }
                continue;
            }
            if self.header_len == 5 {
                self.header_len = 4;
                self.start_command(bytes[0], out)?;
                continue;
            }
            let take = self.body_left.min(bytes.len());
            let piece = &bytes[..take];
            match &mut self.current {
                Current::Forward => out.to_server.extend_from_slice(piece),
                Current::Record { text, overflow, .. } => {
                    out.to_server.extend_from_slice(piece);
                    let room =
                        MAX_RECORDED_QUERY_BYTES + 1 - text.len().min(MAX_RECORDED_QUERY_BYTES + 1);
                    let keep = room.min(piece.len());
                    text.extend_from_slice(&piece[..keep]);
                    *overflow |= keep < piece.len();
                }
                Current::Sniff(held) => held.extend_from_slice(piece),
                Current::Hold { held, kind } => {
                    if held.len() + piece.len() > MAX_INIT_DB_BYTES + 4 {
                        return Err(WireError::TooLong {
                            what: if *kind == command::INIT_DB {
                                "COM_INIT_DB"
                            } else {
                                "USE statement"
                            },
                            len: held.len() - 4 + self.body_left,
                        });
                    }
                    held.extend_from_slice(piece);
                }
                Current::Drop => {}
            }
            self.body_left -= take;
            bytes = &bytes[take..];
            if matches!(self.current, Current::Sniff(_)) {
                self.sniffed(out, self.body_left == 0)?;
            }
            if self.body_left == 0 {
                self.end_packet(out)?;
            }
        }
        Ok(())
    }

    /// The header of a command packet is in and `first` is its command byte (not consumed).
    fn start_command(&mut self, first: u8, out: &mut Filtered) -> Result<(), WireError> {
        let len = le24(&self.header);
        self.current = match first {
            command::QUERY => Current::Sniff(self.header.to_vec()),
            command::STMT_PREPARE => Current::Record {
                kind: first,
                text: Vec::new(),
                overflow: false,
            },
            command::INIT_DB => {
                if len > MAX_INIT_DB_BYTES {
                    return Err(WireError::TooLong {
                        what: "COM_INIT_DB",
                        len,
                    });
                }
                Current::Hold {
                    held: self.header.to_vec(),
                    kind: command::INIT_DB,
                }
            }
            command::CHANGE_USER => {
                let message = "jaunt: COM_CHANGE_USER is not allowed: a session logs in as \
                               the database user it dialed; connect again with --db-user";
                out.to_client.push(packet(
                    1,
                    &err_packet(code::NOT_SUPPORTED, Some("42000"), message),
                ));
                out.refused.push(message.to_owned());
                Current::Drop
            }
            _ => Current::Forward,
        };
        if !matches!(
            self.current,
            Current::Hold { .. } | Current::Sniff(_) | Current::Drop
        ) {
            out.to_server.extend_from_slice(&self.header);
        }
        Ok(())
    }

    /// A COM_QUERY's first bytes are in (`finished`: all of it): a `USE` is held whole to be
    /// checked like a COM_INIT_DB; anything else is forwarded and recorded from here on.
    /// Only leading white space is skipped: a comment before `USE` hides it, as does a
    /// qualified name in any statement (the server's grants govern those).
    fn sniffed(&mut self, out: &mut Filtered, finished: bool) -> Result<(), WireError> {
        let Current::Sniff(held) = &mut self.current else {
            return Ok(());
        };
        let text = held.get(5..).unwrap_or_default();
        let lead = text.iter().take_while(|b| b.is_ascii_whitespace()).count();
        let trimmed = &text[lead..];
        if !finished && trimmed.len() < 4 && held.len() < MAX_INIT_DB_BYTES {
            return Ok(());
        }
        let use_statement = is_use(trimmed);
        let held = std::mem::take(held);
        if use_statement {
            if held.len() > MAX_INIT_DB_BYTES + 4 {
                return Err(WireError::TooLong {
                    what: "USE statement",
                    len: held.len() - 4 + self.body_left,
                });
            }
            self.current = Current::Hold {
                held,
                kind: command::QUERY,
            };
            return Ok(());
        }
        out.to_server.extend_from_slice(&held);
        let payload = held.get(4..).unwrap_or_default();
        let keep = payload.len().min(MAX_RECORDED_QUERY_BYTES + 1);
        self.current = Current::Record {
            kind: command::QUERY,
            text: payload[..keep].to_vec(),
            overflow: keep < payload.len(),
        };
        Ok(())
    }

    /// A packet that is not a command's first: it follows whatever its payload belongs to.
    fn continue_packet(&mut self, out: &mut Filtered) {
        match &mut self.current {
            Current::Hold { held, .. } | Current::Sniff(held) => {
                held.extend_from_slice(&self.header)
            }
            Current::Drop => {}
            Current::Forward | Current::Record { .. } => {
                out.to_server.extend_from_slice(&self.header)
            }
        }
    }

    fn flush_held(&mut self, out: &mut Filtered) {
        match &mut self.current {
            Current::Hold { held, .. } | Current::Sniff(held) => {
                held.extend_from_slice(&self.header)
            }
            Current::Drop => {}
            _ => out.to_server.extend_from_slice(&self.header),
        }
    }

    /// Answers a command that would switch to database `name`, which is not allowed.
    fn refuse_db(&self, name: &str, out: &mut Filtered) {
        let message = format!(
            "jaunt: access denied: your Jaunt identity does not allow database {name:?} \
             (allowed: {}); ask an administrator for it (jaunt users add|update --db-names)",
            listed(&self.allowed_db_names)
        );
        out.to_client.push(packet(
            1,
            &err_packet(code::DB_ACCESS_DENIED, Some("42000"), &message),
        ));
        out.refused.push(message);
    }

    fn end_packet(&mut self, out: &mut Filtered) -> Result<(), WireError> {
        let full = le24(&self.header) == MAX_PACKET_PAYLOAD;
        self.header_len = 0;
        self.continues = full;
        if full {
            // The payload goes on in the next packet: keep the state.
            if let Current::Hold { .. } = self.current {
                return Err(WireError::TooLong {
                    what: "COM_INIT_DB",
                    len: MAX_PACKET_PAYLOAD,
                });
            }
            // A 16 MiB query is no USE (sniffed long before): it is recorded as it goes on.
            return self.sniffed(out, true);
        }
        match std::mem::replace(&mut self.current, Current::Forward) {
            Current::Record {
                kind,
                text,
                overflow,
            } => out.queries.push(recorded(kind, &text, overflow)),
            Current::Sniff(_) => {
                // Sniffed at its last piece already; nothing can be left here.
            }
            Current::Hold {
                held,
                kind: command::INIT_DB,
            } => {
                let name = held.get(5..).unwrap_or_default();
                let name = utf8(name, "database name")?;
                if allowed(&self.allowed_db_names, name) {
                    out.to_server.extend_from_slice(&held);
                    out.init_db.push(name.to_owned());
                } else {
                    self.refuse_db(name, out);
                }
            }
            Current::Hold { held, .. } => {
                // A `USE name` query: refused like a COM_INIT_DB, else forwarded and recorded.
                let payload = held.get(4..).unwrap_or_default();
                match use_target(payload.get(1..).unwrap_or_default()) {
                    Some(name) if !allowed(&self.allowed_db_names, &name) => {
                        self.refuse_db(&name, out);
                    }
                    target => {
                        out.to_server.extend_from_slice(&held);
                        out.queries.push(recorded(command::QUERY, payload, false));
                        out.init_db.extend(target);
                    }
                }
            }
            Current::Forward | Current::Drop => {}
        }
        Ok(())
    }
}

/// Whether a statement (leading white space gone) is a `USE` (case-insensitive, then white
/// space, a backquote, or the end).
fn is_use(text: &[u8]) -> bool {
    text.get(..3)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"use"))
        && text
            .get(3)
            .is_none_or(|&b| b.is_ascii_whitespace() || b == b'`')
}

/// The database a `USE name` / ``USE `name` `` statement switches to (`text` is the query,
/// leading white space allowed); `None` if it names none readably (the server will refuse it).
fn use_target(text: &[u8]) -> Option<String> {
    let lead = text.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let rest = text.get(lead + 3..)?;
    let lead = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let rest = &rest[lead..];
    let mut name = Vec::new();
    if let Some(quoted) = rest.strip_prefix(b"`") {
        let mut i = 0;
        loop {
            match (quoted.get(i), quoted.get(i + 1)) {
                (Some(b'`'), Some(b'`')) => {
                    name.push(b'`');
                    i += 2;
                }
                (Some(b'`'), _) => break,
                (Some(&b), _) => {
                    name.push(b);
                    i += 1;
                }
                (None, _) => return None,
            }
        }
    } else {
        name.extend(
            rest.iter()
                .take_while(|&&b| !b.is_ascii_whitespace() && b != b';'),
        );
    }
    let name = String::from_utf8(name).ok()?;
    (!name.is_empty()).then_some(name)
}

/// The recorded form of a COM_QUERY or COM_STMT_PREPARE payload (command byte first).
fn recorded(kind: u8, payload: &[u8], overflow: bool) -> ClientQuery {
    let sql = payload.get(1..).unwrap_or_default();
    let keep = sql.len().min(MAX_RECORDED_QUERY_BYTES);
    let mut text = String::from_utf8_lossy(&sql[..keep]).into_owned();
    let truncated = overflow || keep < sql.len();
    if truncated && text.ends_with('\u{FFFD}') {
        // A character cut in half at the bound.
        text.pop();
    }
    ClientQuery {
        kind: if kind == command::QUERY {
            QueryKind::Simple
        } else {
            QueryKind::Prepare
        },
        text,
        truncated,
    }
}

/// The `*` principal: any database name.
const WILDCARD: &str = "*";

/// Whether `name` is in `list` (or the list has `*`).
pub fn allowed(list: &[String], name: &str) -> bool {
    list.iter().any(|a| a == name || a == WILDCARD)
}

fn listed(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

/// The server → client direction: only packet boundaries are tracked, so a refusal is never
/// written into the middle of a server packet.
#[derive(Debug, Default)]
pub struct Boundary {
    header: [u8; 4],
    header_len: usize,
    body_left: usize,
}

impl Boundary {
    /// Consumes `bytes`.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.header_len < 4 {
                let take = (4 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == 4 {
                    self.body_left = le24(&self.header);
                    if self.body_left == 0 {
                        self.header_len = 0;
                    }
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            self.body_left -= take;
            bytes = &bytes[take..];
            if self.body_left == 0 {
                self.header_len = 0;
            }
        }
    }

    /// True between packets.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0
    }
}

/// Fuzz entry point: every parser of client and server bytes over `data`, which must never
/// panic whatever it holds. The first byte picks how the rest is split into pieces for the
/// stateful filters, so splits are fuzzed too.
pub fn fuzz_parse(data: &[u8]) {
    let (split, rest) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => (1, data),
    };
    if let Ok(Some((p, used))) = parse_packet(rest, MAX_HANDSHAKE_PACKET_BYTES, "packet") {
        debug_assert!(used <= rest.len());
        if let Ok(g) = Greeting::parse(p.payload) {
            let again = Greeting::parse(&g.encode());
            debug_assert!(again.is_ok());
        }
        if let Ok(ClientHandshake::Response(r)) = HandshakeResponse::parse(p.payload) {
            let _ = HandshakeResponse::parse(&r.encode());
        }
        let _ = AuthReply::parse(p.payload);
        let _ = ErrPacket::parse(p.payload);
    }
    let _ = Greeting::parse(rest);
    let _ = HandshakeResponse::parse(rest);
    let mut filter = CommandFilter::new(vec!["app".to_owned()]);
    let mut out = Filtered::default();
    let mut boundary = Boundary::default();
    for piece in rest.chunks(split) {
        if filter.feed(piece, &mut out).is_err() {
            break;
        }
        debug_assert!(out.to_server.len() <= rest.len());
        boundary.feed(piece);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn greeting() -> Greeting {
        Greeting {
            server_version: "8.0.0-Jaunt".into(),
            connection_id: 0,
            capabilities: OFFERED_CAPABILITIES,
            charset: DEFAULT_CHARSET,
            status: STATUS_AUTOCOMMIT,
            scramble: (1..=20).collect(),
            auth_plugin: NATIVE_PASSWORD.into(),
        }
    }

    #[test]
    fn greeting_round_trips() {
        let g = greeting();
        let bytes = g.encode();
        assert_eq!(bytes[0], 10);
        assert_eq!(Greeting::parse(&bytes).unwrap(), g);
    }

    /// A MariaDB 10.11 greeting as captured from the server.
    #[test]
    fn a_real_mariadb_greeting_parses() {
        let mut payload = vec![10];
        payload.extend_from_slice(b"5.5.5-10.11.19-MariaDB-0+deb12u1\0");
        payload.extend_from_slice(&7u32.to_le_bytes());
        payload.extend_from_slice(b"abcdefgh\0");
        let caps: u32 = 0xf7fe_fffe & !caps::LONG_PASSWORD;
        payload.extend_from_slice(&(caps as u16).to_le_bytes());
        payload.push(45);
        payload.extend_from_slice(&2u16.to_le_bytes());
        payload.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        payload.push(21);
        payload.extend_from_slice(&[0; 6]);
        payload.extend_from_slice(&[0x1d, 0, 0, 0]); // MariaDB extended capabilities
        payload.extend_from_slice(b"ijklmnopqrst\0");
        payload.extend_from_slice(b"mysql_native_password\0");
        let g = Greeting::parse(&payload).unwrap();
        assert_eq!(g.server_version, "5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(g.connection_id, 7);
        assert_eq!(g.scramble, b"abcdefghijklmnopqrst");
        assert_eq!(g.auth_plugin, NATIVE_PASSWORD);
        assert_eq!(g.capabilities, caps);
    }

    fn response(db: Option<&str>) -> HandshakeResponse {
        let mut capabilities = caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
            | caps::CONNECT_ATTRS
            | caps::MULTI_RESULTS
            | caps::LONG_PASSWORD;
        if db.is_some() {
            capabilities |= caps::CONNECT_WITH_DB;
        }
        HandshakeResponse {
            capabilities,
            max_packet: 16 << 20,
            charset: 33,
            user: "alice".into(),
            auth_response: vec![],
            database: db.map(Into::into),
            auth_plugin: Some(NATIVE_PASSWORD.into()),
            attrs: Some(b"\x04_pid\x0242\x07program\x07mariadb".to_vec()),
        }
    }

    #[test]
    fn handshake_responses_round_trip_with_and_without_optional_parts() {
        for r in [response(Some("app")), response(None)] {
            let bytes = r.encode();
            assert_eq!(
                HandshakeResponse::parse(&bytes).unwrap(),
                ClientHandshake::Response(r.clone())
            );
        }
        // Old-style 1-byte auth length, no plugin, no attributes.
        let mut r = response(Some("app"));
        r.capabilities &=
            !(caps::PLUGIN_AUTH_LENENC_CLIENT_DATA | caps::PLUGIN_AUTH | caps::CONNECT_ATTRS);
        r.auth_plugin = None;
        r.attrs = None;
        r.auth_response = vec![9; 20];
        assert_eq!(
            HandshakeResponse::parse(&r.encode()).unwrap(),
            ClientHandshake::Response(r)
        );
    }

    #[test]
    fn an_attribute_is_appended_to_the_clients() {
        let mut r = response(None);
        r.attrs = Some(with_attr(r.attrs.as_deref(), "jaunt_user", "alice"));
        let ClientHandshake::Response(back) = HandshakeResponse::parse(&r.encode()).unwrap() else {
            panic!()
        };
        assert!(back.attrs.unwrap().ends_with(b"\x0ajaunt_user\x05alice"));
        assert_eq!(with_attr(None, "k", "v"), b"\x01k\x01v");
    }

    #[test]
    fn an_ssl_request_is_recognized() {
        let bytes = ssl_request(caps::PROTOCOL_41 | caps::SECURE_CONNECTION, 1 << 24, 45);
        assert_eq!(bytes.len(), 32);
        assert_eq!(
            HandshakeResponse::parse(&bytes).unwrap(),
            ClientHandshake::SslRequest {
                capabilities: caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::SSL
            }
        );
    }

    #[test]
    fn malformed_handshake_responses_are_refused() {
        let good = response(Some("app")).encode();
        // Every truncation is an error (never a panic), except those that end at an optional
        // part's start.
        for cut in 0..good.len() {
            let _ = HandshakeResponse::parse(&good[..cut]);
        }
        assert_eq!(
            HandshakeResponse::parse(&good[..20]),
            Err(WireError::Truncated("reserved"))
        );
        let mut extra = good.clone();
        extra.push(1);
        assert!(HandshakeResponse::parse(&extra).is_err());
        let mut old = good.clone();
        old[1] &= !((caps::PROTOCOL_41 >> 8) as u8);
        assert!(matches!(
            HandshakeResponse::parse(&old),
            Err(WireError::Capabilities(_))
        ));
        let mut bad_user = response(None);
        bad_user.user = "\u{e9}".into();
        let mut bytes = bad_user.encode();
        let at = bytes.iter().position(|&b| b == 0xc3).unwrap();
        bytes[at] = 0xff;
        assert_eq!(
            HandshakeResponse::parse(&bytes),
            Err(WireError::NotUtf8("user name"))
        );
        // An attribute block whose inner lengths overrun it.
        let mut r = response(None);
        r.attrs = Some(b"\x09_pid".to_vec());
        assert!(HandshakeResponse::parse(&r.encode()).is_err());
    }

    #[test]
    fn capabilities_are_negotiated_strictly() {
        let c = response(None).capabilities;
        assert_eq!(negotiate(c, OFFERED_CAPABILITIES), Ok(c));
        assert!(negotiate(c | caps::SSL, OFFERED_CAPABILITIES)
            .unwrap_err()
            .to_string()
            .contains("TLS"));
        assert!(negotiate(c & !caps::SECURE_CONNECTION, OFFERED_CAPABILITIES).is_err());
        // A format capability it was not offered: refused; others are masked.
        assert!(negotiate(c | caps::DEPRECATE_EOF, c).is_err());
        assert_eq!(negotiate(c | caps::COMPRESS, OFFERED_CAPABILITIES), Ok(c));
        assert_eq!(negotiate(c | (1 << 26), OFFERED_CAPABILITIES), Ok(c));
    }

    #[test]
    fn packets_are_framed_and_bounded() {
        let bytes = packet(3, b"hello");
        for cut in 0..bytes.len() {
            assert_eq!(parse_packet(&bytes[..cut], 10, "p"), Ok(None));
        }
        let (p, used) = parse_packet(&bytes, 10, "p").unwrap().unwrap();
        assert_eq!((p.seq, p.payload, used), (3, &b"hello"[..], 9));
        assert_eq!(
            parse_packet(&[0xff, 0xff, 0xff, 0], 10, "p"),
            Err(WireError::TooLong {
                what: "p",
                len: MAX_PACKET_PAYLOAD
            })
        );
    }

    #[test]
    fn auth_replies_parse() {
        assert_eq!(AuthReply::parse(&[0, 0, 0, 2, 0, 0, 0]), Ok(AuthReply::Ok));
        assert_eq!(
            AuthReply::parse(b"\xfemysql_native_password\0abc"),
            Ok(AuthReply::Switch {
                plugin: NATIVE_PASSWORD.into(),
                data: b"abc"
            })
        );
        assert_eq!(
            AuthReply::parse(&FAST_AUTH_SUCCESS),
            Ok(AuthReply::MoreData(&[3]))
        );
        let err = err_packet(1045, Some("28000"), "Access denied");
        assert_eq!(
            AuthReply::parse(&err),
            Ok(AuthReply::Err(ErrPacket {
                code: 1045,
                sqlstate: Some("28000".into()),
                message: "Access denied".into()
            }))
        );
        assert!(AuthReply::parse(&[]).is_err());
        assert!(AuthReply::parse(&[7]).is_err());
        assert_eq!(
            auth_switch(NATIVE_PASSWORD, &[1, 2]),
            b"\xfemysql_native_password\0\x01\x02\0"
        );
    }

    #[test]
    fn err_packets_read_as_the_servers_write_them() {
        assert_eq!(
            err_packet(1045, Some("28000"), "no"),
            b"\xff\x15\x04#28000no"
        );
        assert_eq!(err_packet(1130, None, "no"), b"\xff\x6a\x04no");
        let long = "\u{e9}".repeat(MAX_ERROR_MESSAGE_BYTES);
        let bytes = err_packet(1, Some("bad"), &long);
        assert!(bytes.len() <= MAX_ERROR_MESSAGE_BYTES + 9);
        assert!(std::str::from_utf8(&bytes[9..]).is_ok());
        assert_eq!(&bytes[3..9], b"#HY000");
        let e = ErrPacket::parse(&err_packet(1130, None, "blocked")).unwrap();
        assert_eq!(
            (e.code, e.sqlstate.clone(), e.message.as_str()),
            (1130, None, "blocked")
        );
        assert_eq!(e.encode(true), err_packet(1130, None, "blocked"));
    }

    fn command(cmd: u8, body: &[u8]) -> Vec<u8> {
        let mut payload = vec![cmd];
        payload.extend_from_slice(body);
        packet(0, &payload)
    }

    fn run(stream: &[u8], piece: usize) -> Filtered {
        let mut filter = CommandFilter::new(vec!["app".into()]);
        let mut out = Filtered::default();
        for p in stream.chunks(piece) {
            filter.feed(p, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn commands_are_recorded_checked_and_forwarded_at_every_split() {
        let mut stream = command(command::QUERY, b"select 1");
        stream.extend(command(command::INIT_DB, b"app"));
        stream.extend(command(command::STMT_PREPARE, b"select ?"));
        stream.extend(command(0x17, &[1, 0, 0, 0, 0, 1, 0, 0, 0])); // COM_STMT_EXECUTE
        let allowed = stream.clone();
        stream.extend(command(command::INIT_DB, b"otherdb"));
        stream.extend(command(command::CHANGE_USER, b"root\0\0"));
        let tail = command(command::QUIT, b"");
        stream.extend(tail.clone());
        let mut forwarded = allowed;
        forwarded.extend(tail);
        for piece in [1, 2, 3, 4, 5, 7, 64, stream.len()] {
            let out = run(&stream, piece);
            assert_eq!(out.to_server, forwarded, "pieces of {piece}");
            let texts: Vec<(&str, &str)> = out
                .queries
                .iter()
                .map(|q| (q.kind.as_str(), q.text.as_str()))
                .collect();
            assert_eq!(texts, [("query", "select 1"), ("prepare", "select ?")]);
            assert_eq!(out.init_db, ["app"]);
            assert_eq!(out.to_client.len(), 2, "pieces of {piece}");
            let denied = String::from_utf8_lossy(&out.to_client[0]).into_owned();
            assert!(
                denied.contains("#42000") && denied.contains("\"otherdb\" (allowed: app)"),
                "{denied}"
            );
            assert_eq!(out.to_client[0][3], 1, "sequence id of the answer");
            assert!(String::from_utf8_lossy(&out.to_client[1]).contains("COM_CHANGE_USER"));
            assert_eq!(out.refused.len(), 2);
        }
    }

    #[test]
    fn use_statements_are_checked_like_init_db_at_every_split() {
        let cases: [(&[u8], Option<&str>); 12] = [
            (b"use app", Some("app")),
            (b"  USE `app`;", Some("app")),
            (b"Use\n\tapp ; ", Some("app")),
            (b"use otherdb", None),
            (b"USE `other``db`", None),
            (b"use`otherdb`", None),
            (b"use otherdb; select 1", None),
            (b"select 1", Some("")),
            (b"user_defined()", Some("")),
            (b"use", Some("")),
            (b"us", Some("")),
            (b"  ", Some("")),
        ];
        for (sql, verdict) in cases {
            let mut stream = command(command::QUERY, sql);
            stream.extend(command(command::QUERY, b"select 2"));
            for piece in [1, 2, 3, 5, 8, stream.len()] {
                let out = run(&stream, piece);
                let what = format!("{:?} in pieces of {piece}", String::from_utf8_lossy(sql));
                let texts: Vec<&str> = out.queries.iter().map(|q| q.text.as_str()).collect();
                match verdict {
                    Some(db) => {
                        assert_eq!(out.to_server, stream, "{what}");
                        assert_eq!(texts[0], String::from_utf8_lossy(sql), "{what}");
                        assert!(out.to_client.is_empty(), "{what}");
                        let switched: Vec<&str> = out.init_db.iter().map(String::as_str).collect();
                        let want: &[&str] = if db.is_empty() { &[] } else { &[db] };
                        assert_eq!(switched, want, "{what}");
                    }
                    None => {
                        assert_eq!(
                            out.to_server,
                            command(command::QUERY, b"select 2"),
                            "{what}"
                        );
                        assert_eq!(texts, ["select 2"], "{what}");
                        assert_eq!(out.to_client.len(), 1, "{what}");
                        assert!(
                            out.refused[0].contains("otherdb")
                                || out.refused[0].contains("other`db"),
                            "{what}"
                        );
                    }
                }
            }
        }
        // A USE longer than the bound ends the connection; a long query that is no USE passes.
        let mut filter = CommandFilter::new(vec!["app".into()]);
        let long_use = format!("use {}", "a".repeat(MAX_INIT_DB_BYTES + 1));
        assert!(matches!(
            filter.feed(
                &command(command::QUERY, long_use.as_bytes()),
                &mut Filtered::default()
            ),
            Err(WireError::TooLong {
                what: "USE statement",
                ..
            })
        ));
        let spaces = format!("{}select 1", " ".repeat(3 * MAX_INIT_DB_BYTES));
        let out = run(&command(command::QUERY, spaces.as_bytes()), 100);
        assert_eq!(out.queries[0].text, spaces);
    }

    #[test]
    fn large_queries_pass_whole_and_are_recorded_truncated() {
        // A 16 MiB query: two packets (0xffffff + rest), the second with sequence id 1.
        let sql = vec![b'x'; MAX_PACKET_PAYLOAD + 9];
        let mut payload = vec![command::QUERY];
        payload.extend_from_slice(&sql);
        let mut stream = Vec::new();
        stream.extend_from_slice(&[0xff, 0xff, 0xff, 0]);
        stream.extend_from_slice(&payload[..MAX_PACKET_PAYLOAD]);
        stream.extend(packet(1, &payload[MAX_PACKET_PAYLOAD..]));
        stream.extend(command(command::QUERY, b"select 2"));
        let mut filter = CommandFilter::new(vec![]);
        let mut out = Filtered::default();
        let mut forwarded = 0;
        for p in stream.chunks(1 << 20) {
            filter.feed(p, &mut out).unwrap();
            forwarded += out.to_server.len();
            out.to_server.clear();
            assert!(filter_memory(&filter) <= MAX_RECORDED_QUERY_BYTES + 1);
        }
        assert_eq!(forwarded, stream.len());
        assert_eq!(out.queries.len(), 2);
        assert!(out.queries[0].truncated);
        assert_eq!(out.queries[0].text.len(), MAX_RECORDED_QUERY_BYTES);
        assert_eq!(out.queries[1].text, "select 2");
        assert!(!out.queries[1].truncated);
    }

    fn filter_memory(f: &CommandFilter) -> usize {
        match &f.current {
            Current::Record { text, .. } => text.len(),
            Current::Hold { held, .. } | Current::Sniff(held) => held.len(),
            _ => 0,
        }
    }

    #[test]
    fn an_oversized_init_db_ends_the_connection() {
        let mut filter = CommandFilter::new(vec!["*".into()]);
        let mut out = Filtered::default();
        let big = command(command::INIT_DB, &vec![b'a'; MAX_INIT_DB_BYTES + 1]);
        assert!(matches!(
            filter.feed(&big, &mut out),
            Err(WireError::TooLong {
                what: "COM_INIT_DB",
                ..
            })
        ));
        assert!(out.to_server.is_empty());
        // Not UTF-8.
        let mut filter = CommandFilter::new(vec!["*".into()]);
        assert_eq!(
            filter.feed(&command(command::INIT_DB, b"\xff"), &mut out),
            Err(WireError::NotUtf8("database name"))
        );
        // A wildcard allows any name.
        let mut filter = CommandFilter::new(vec!["*".into()]);
        let mut out = Filtered::default();
        filter
            .feed(&command(command::INIT_DB, b"x"), &mut out)
            .unwrap();
        assert_eq!(out.init_db, ["x"]);
    }

    #[test]
    fn boundaries_are_tracked_at_every_split() {
        let mut stream = packet(1, b"abc");
        stream.extend(packet(2, b""));
        stream.extend(packet(3, &[7; 300]));
        for piece in 1..10 {
            let mut b = Boundary::default();
            let mut ends = 0;
            for (i, byte) in stream.chunks(piece).enumerate() {
                b.feed(byte);
                if b.at_boundary() {
                    ends += 1;
                }
                let _ = i;
            }
            assert!(b.at_boundary());
            assert!(ends >= 1);
        }
        let mut b = Boundary::default();
        b.feed(&stream[..5]);
        assert!(!b.at_boundary());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        fuzz_parse(b"");
        fuzz_parse(&[0xff; 300]);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let good = [
            packet(0, &greeting().encode()),
            packet(1, &response(Some("app")).encode()),
            command(command::INIT_DB, b"app"),
        ];
        for round in 0..6000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bytes = good[round % good.len()].clone();
            bytes.insert(0, (seed % 7) as u8 + 1);
            let flips = (seed >> 8) % 4;
            for f in 0..flips {
                let at = ((seed >> (16 + f * 8)) as usize) % bytes.len();
                bytes[at] ^= (seed >> (f * 5)) as u8;
            }
            let cut = ((seed >> 40) as usize) % (bytes.len() + 1);
            fuzz_parse(&bytes[..cut]);
            fuzz_parse(&bytes);
        }
    }
}
