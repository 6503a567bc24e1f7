//! The HTTP/1.1 of the app proxy, sans-IO: bounded request and response head parsing
//! ([`parse_request`], [`parse_response`]), how a message's body is delimited ([`plan_request`],
//! [`plan_response`]), the header rewriting in each direction ([`rewrite_request`],
//! [`rewrite_response`]), the incremental chunked-framing scanner ([`ChunkedScanner`]) and the
//! agent's own error responses ([`error_response`]).
//!
//! Heads are tokenized by the tokenizer the three HTTP servers share
//! ([`jaunt_config::http::parse_request`], [`jaunt_config::http::parse_response`]: httparse as
//! strict as it goes, where leniency lets two parsers disagree (request smuggling), with the
//! bounds [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`], no control characters in values or the reason
//! phrase, only HTTP/1.0 and 1.1) and written by its [`HeadWriter`]. What a proxy that forwards
//! heads needs on top is here: a target of visible ASCII, and the framing (one Host, valid and
//! agreeing Content-Lengths, never both Content-Length and Transfer-Encoding in a request).

use std::fmt;

use jaunt_config::http::{Bounds, HeadWriter};

pub(crate) use jaunt_config::http::HeadError;

/// Largest request or response head (start line and headers, with line ends).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 100;
/// Fields the proxy may add to a forwarded request (Host, framing, Connection, Upgrade, three
/// `X-Forwarded-*`, the JWT): a request is refused when the app would get more than
/// [`MAX_HEADERS`] fields, so what is forwarded stays within the bounds the proxy itself
/// accepts.
const ADDED_FIELDS: usize = 8;
/// Bytes the proxy may add to a forwarded request's head (the added fields, the JWT among them).
const ADDED_HEAD_BYTES: usize = 8 * 1024;
/// Longest chunk-size line (size and extensions).
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// The request header that carries the user's signed identity to the app.
pub const JWT_HEADER: &str = "Jaunt-Jwt-Assertion";

/// Header fields that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// framing ones the proxy writes itself.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the proxy sets itself; what the user sent in them is dropped.
const PROXY_SET: [&str; 5] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
];

// ---------------------------------------------------------------------------------------------
// Heads

/// One header field as received (name checked to be a token, value trimmed of OWS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) name: String,
    pub(crate) value: Vec<u8>,
}

impl Header {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// A request line and its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    /// The request target as sent.
    pub(crate) target: String,
    /// HTTP/1.`minor` (0 or 1).
    pub(crate) minor: u8,
    pub(crate) headers: Vec<Header>,
}

/// A status line and its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    pub(crate) minor: u8,
    pub(crate) status: u16,
    pub(crate) reason: Vec<u8>,
    pub(crate) headers: Vec<Header>,
}

/// The bounds of a head, in either direction.
const BOUNDS: Bounds = Bounds {
    head_bytes: MAX_HEAD_BYTES,
    fields: MAX_HEADERS,
};

/// The fields copied out of a tokenized head.
fn owned(fields: &[jaunt_config::http::Field<'_>]) -> Vec<Header> {
    fields
        .iter()
        .map(|field| Header {
            name: field.name.to_owned(),
            value: field.value.to_vec(),
        })
        .collect()
}

/// Parses the request head at the front of `buf`: `Ok(None)` until it is complete, then the
/// head and how many bytes it used. Empty lines before the request line are skipped (RFC 9112
/// §2.2).
pub(crate) fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let Some(request) = jaunt_config::http::parse_request(buf, BOUNDS)? else {
        return Ok(None);
    };
    // httparse lets obs-text through in the target; a URI has none.
    jaunt_config::http::check_target(request.target)?;
    Ok(Some((
        RequestHead {
            method: request.method.to_owned(),
            target: request.target.to_owned(),
            minor: request.minor,
            headers: owned(&request.fields),
        },
        request.len,
    )))
}

/// Parses the response head at the front of `buf`, as [`parse_request`].
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let Some(response) = jaunt_config::http::parse_response(buf, BOUNDS)? else {
        return Ok(None);
    };
    Ok(Some((
        ResponseHead {
            minor: response.minor,
            status: response.status,
            reason: response.reason.to_vec(),
            headers: owned(&response.fields),
        },
        response.len,
    )))
}

// ---------------------------------------------------------------------------------------------
// Framing

/// How a message body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// There is none.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding (forwarded as chunked; [`ChunkedScanner`] finds its end).
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

fn values<'a>(headers: &'a [Header], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.is(name))
        .map(|h| h.value.as_slice())
}

/// The comma-separated elements of every `name` field, trimmed and lowercased; empty ones
/// skipped.
fn list(headers: &[Header], name: &str) -> Vec<String> {
    values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(jaunt_config::http::trim_ows)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e).to_ascii_lowercase())
        .collect()
}

/// The Content-Length, if any: the one reading the three HTTP servers share
/// ([`jaunt_config::http::content_length`]).
fn content_length(headers: &[Header]) -> Result<Option<u64>, &'static str> {
    jaunt_config::http::content_length(values(headers, "content-length")).map_err(|e| e.as_str())
}

/// The transfer codings, in order, if the message has Transfer-Encoding.
fn transfer_codings(headers: &[Header]) -> Option<Vec<String>> {
    headers
        .iter()
        .any(|h| h.is("transfer-encoding"))
        .then(|| list(headers, "transfer-encoding"))
}

/// A request the proxy answers itself instead of forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    pub(crate) status: u16,
    pub(crate) message: String,
}

fn reject(status: u16, message: impl Into<String>) -> Reject {
    Reject {
        status,
        message: message.into(),
    }
}

/// What the proxy does with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestPlan {
    pub(crate) body: BodyKind,
    /// The Content-Length as received (forwarded normalized, even when 0).
    pub(crate) content_length: Option<u64>,
    /// The protocol asked for when the request asks to upgrade (`Connection: upgrade` and an
    /// `Upgrade` field): forwarded, with `Connection: Upgrade`.
    pub(crate) upgrade: Option<Vec<u8>>,
    /// The client waits for `100 Continue` before sending its body.
    pub(crate) expect_continue: bool,
    /// The user's connection ends after this exchange.
    pub(crate) close: bool,
    /// A HEAD request: the response has no body whatever its fields say.
    pub(crate) head_only: bool,
    /// The Host the user sent (or the authority of an absolute-form target), for
    /// `X-Forwarded-Host`.
    pub(crate) original_host: Option<Vec<u8>>,
    /// The target in origin form (absolute form reduced to path and query).
    pub(crate) origin_target: String,
}

/// Splits an absolute-form target (`http://host/path?q`) into its authority and origin form.
fn absolute_form(target: &str) -> Option<(&str, String)> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        target.get(7..)?
    } else if lower.starts_with("https://") {
        target.get(8..)?
    } else {
        return None;
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let origin = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    Some((authority, origin))
}

/// Checks a request and decides how its body is framed and whether the connection survives it.
pub(crate) fn plan_request(head: &RequestHead) -> Result<RequestPlan, Reject> {
    if head.method == "CONNECT" {
        return Err(reject(405, "CONNECT is not supported by the app proxy"));
    }
    if head.headers.len() > MAX_HEADERS - ADDED_FIELDS {
        return Err(reject(
            431,
            format!(
                "more than {} header fields (the proxy adds up to {ADDED_FIELDS})",
                MAX_HEADERS - ADDED_FIELDS
            ),
        ));
    }
    let head_bytes: usize = head.method.len()
        + head.target.len()
        + head
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum::<usize>();
    if head_bytes > MAX_HEAD_BYTES - ADDED_HEAD_BYTES {
        return Err(reject(
            431,
            format!(
                "the request head is larger than {} bytes",
                MAX_HEAD_BYTES - ADDED_HEAD_BYTES
            ),
        ));
    }
    let hosts: Vec<&[u8]> = values(&head.headers, "host").collect();
    if hosts.len() > 1 {
        return Err(reject(400, "the request has more than one Host header"));
    }
    if head.minor == 1 && hosts.is_empty() {
        return Err(reject(400, "the HTTP/1.1 request has no Host header"));
    }
    let codings = transfer_codings(&head.headers);
    let length = content_length(&head.headers).map_err(|why| reject(400, why))?;
    let body = match (&codings, length) {
        (Some(_), Some(_)) => {
            return Err(reject(
                400,
                "the request has both Content-Length and Transfer-Encoding (a request \
                 smuggling pattern)",
            ))
        }
        (Some(_), None) if head.minor == 0 => {
            return Err(reject(400, "Transfer-Encoding in an HTTP/1.0 request"))
        }
        (Some(codings), None) => match codings.last().map(String::as_str) {
            Some("chunked") if codings.len() == 1 => BodyKind::Chunked,
            Some("chunked") => {
                return Err(reject(
                    501,
                    format!(
                        "transfer coding {:?} is not supported (only chunked)",
                        codings.join(", ")
                    ),
                ))
            }
            _ => {
                return Err(reject(
                    400,
                    "the request's Transfer-Encoding does not end with chunked, so its length \
                     cannot be determined",
                ))
            }
        },
        (None, Some(0)) | (None, None) => BodyKind::None,
        (None, Some(n)) => BodyKind::Length(n),
    };
    let connection = list(&head.headers, "connection");
    let close = head.minor == 0 || connection.iter().any(|t| t == "close");
    let upgrade = if head.minor == 1 && connection.iter().any(|t| t == "upgrade") {
        let offered: Vec<&[u8]> = values(&head.headers, "upgrade").collect();
        match offered.as_slice() {
            [one] if !one.is_empty() => Some(one.to_vec()),
            _ => None,
        }
    } else {
        None
    };
    let expect_continue = head.minor == 1
        && body != BodyKind::None
        && values(&head.headers, "expect").any(|v| v.eq_ignore_ascii_case(b"100-continue"));
    let (original_host, origin_target) = match absolute_form(&head.target) {
        Some((authority, origin)) => (Some(authority.as_bytes().to_vec()), origin),
        None => (hosts.first().map(|h| h.to_vec()), head.target.clone()),
    };
    Ok(RequestPlan {
        body,
        content_length: length,
        upgrade,
        expect_continue,
        close,
        head_only: head.method == "HEAD",
        original_host,
        origin_target,
    })
}

/// What the proxy adds to each request it forwards.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Forwarding<'a> {
    /// The app's `host:port`, the new Host.
    pub(crate) host: &'a str,
    /// The signed JWT for [`JWT_HEADER`].
    pub(crate) jwt: &'a str,
    /// The user's IP address for `X-Forwarded-For`, if known.
    pub(crate) client_ip: Option<&'a str>,
}

/// Whether a field is dropped on the way through: hop-by-hop ones, those the `Connection`
/// field names, and those the proxy sets itself (`also`).
fn dropped(header: &Header, connection: &[String], also: &[&str]) -> bool {
    let name = header.name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&name.as_str())
        || also.contains(&name.as_str())
        || name == "content-length"
        || connection.contains(&name)
}

/// The request head the app receives: every `Jaunt-*` field the user sent removed, hop-by-hop
/// fields removed (but an upgrade's `Connection: Upgrade` + `Upgrade` kept), Host set to the
/// app's address with the user's Host in `X-Forwarded-Host`, `X-Forwarded-For` and
/// `X-Forwarded-Proto: https` set, the JWT added, the body's framing restated.
pub(crate) fn rewrite_request(head: &RequestHead, plan: &RequestPlan, fwd: &Forwarding) -> Vec<u8> {
    let connection = list(&head.headers, "connection");
    let mut out = HeadWriter::request(&head.method, &plan.origin_target, head.minor);
    out.field("Host", fwd.host);
    for header in &head.headers {
        let jaunt = header
            .name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("jaunt-"));
        if jaunt || dropped(header, &connection, &PROXY_SET) {
            continue;
        }
        out.field(&header.name, &header.value);
    }
    match plan.body {
        BodyKind::Chunked => {
            out.field("Transfer-Encoding", "chunked");
        }
        _ => {
            if let Some(n) = plan.content_length {
                out.field("Content-Length", n.to_string());
            }
        }
    }
    if let Some(protocol) = &plan.upgrade {
        out.field("Connection", "Upgrade");
        out.field("Upgrade", protocol);
    } else if plan.close && head.minor == 1 {
        out.field("Connection", "close");
    }
    if let Some(host) = &plan.original_host {
        out.field("X-Forwarded-Host", host);
    }
    if let Some(ip) = fwd.client_ip {
        out.field("X-Forwarded-For", ip);
    }
    out.field("X-Forwarded-Proto", "https");
    out.field(JWT_HEADER, fwd.jwt);
    out.finish(b"")
}

/// How a response is relayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResponsePlan {
    pub(crate) body: BodyKind,
    /// The transfer codings to restate when the body is chunked (`chunked`, or e.g.
    /// `gzip, chunked`).
    pub(crate) codings: Option<String>,
    /// The Content-Length to restate (also for HEAD and 304, where it describes a body not
    /// sent).
    pub(crate) content_length: Option<u64>,
    /// The app's connection cannot carry another request after this response.
    pub(crate) app_closes: bool,
}

/// Decides how the body of a response to a request with `plan` is delimited. 1xx responses
/// have no body (101 is handled by the caller). A response with both Content-Length and
/// Transfer-Encoding, or an invalid Content-Length, is malformed.
pub(crate) fn plan_response(
    head: &ResponseHead,
    request: &RequestPlan,
) -> Result<ResponsePlan, &'static str> {
    let codings = transfer_codings(&head.headers);
    let no_body = request.head_only || head.status < 200 || matches!(head.status, 204 | 304);
    let length = match content_length(&head.headers) {
        Ok(length) => length,
        Err(_) if no_body => None,
        Err(why) => return Err(why),
    };
    let (body, codings) = if no_body {
        (BodyKind::None, None)
    } else {
        match (codings, length) {
            (Some(_), Some(_)) => {
                return Err("both Content-Length and Transfer-Encoding in a response")
            }
            (Some(codings), None) if codings.last().map(String::as_str) == Some("chunked") => {
                (BodyKind::Chunked, Some(codings.join(", ")))
            }
            (Some(codings), None) => (BodyKind::Close, Some(codings.join(", "))),
            (None, Some(n)) => (BodyKind::Length(n), None),
            (None, None) => (BodyKind::Close, None),
        }
    };
    let connection = list(&head.headers, "connection");
    let app_closes = body == BodyKind::Close
        || connection.iter().any(|t| t == "close")
        || (head.minor == 0 && !connection.iter().any(|t| t == "keep-alive"));
    Ok(ResponsePlan {
        body,
        codings,
        content_length: length,
        app_closes,
    })
}

/// The response head the user receives: hop-by-hop fields removed, the framing restated,
/// `Connection: close` when the user's connection ends after it, `Connection: Upgrade` +
/// `Upgrade` on a 101.
pub(crate) fn rewrite_response(head: &ResponseHead, plan: &ResponsePlan, close: bool) -> Vec<u8> {
    let connection = list(&head.headers, "connection");
    let mut out = HeadWriter::response_with_reason(head.status, &head.reason);
    for header in &head.headers {
        if dropped(header, &connection, &[]) {
            continue;
        }
        out.field(&header.name, &header.value);
    }
    if head.status == 101 {
        out.field("Connection", "Upgrade");
        if let Some(protocol) = values(&head.headers, "upgrade").next() {
            out.field("Upgrade", protocol);
        }
    } else {
        if let Some(n) = plan.content_length {
            if plan.body != BodyKind::Chunked {
                out.field("Content-Length", n.to_string());
            }
        }
        if plan.body == BodyKind::Chunked {
            let codings = plan.codings.as_deref().unwrap_or("chunked");
            out.field("Transfer-Encoding", codings);
        }
        if close && head.status >= 200 {
            out.field("Connection", "close");
        }
    }
    out.finish(b"")
}

/// An interim (1xx) response as the user receives it: the status line and the end-to-end
/// fields.
pub(crate) fn rewrite_interim(head: &ResponseHead) -> Vec<u8> {
    let plan = ResponsePlan {
        body: BodyKind::None,
        codings: None,
        content_length: None,
        app_closes: false,
    };
    rewrite_response(head, &plan, false)
}

// ---------------------------------------------------------------------------------------------
// Chunked framing

/// Why chunked framing could not be followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChunkError {
    /// A chunk size that is not hex, or missing.
    BadSize,
    /// A chunk size above 2^64 - 1.
    SizeOverflow,
    /// A chunk-size line longer than [`MAX_CHUNK_LINE`] or trailers longer than
    /// [`MAX_TRAILER_BYTES`].
    TooLong,
    /// A missing CRLF after a chunk's data or a line.
    BadFraming,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkError::BadSize => "a chunk size that is not hexadecimal",
            ChunkError::SizeOverflow => "a chunk size that overflows 64 bits",
            ChunkError::TooLong => "a chunk-size line or trailer section that is too long",
            ChunkError::BadFraming => "a chunk not followed by CRLF",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits; `digits` so far.
    Size {
        digits: u8,
    },
    /// After the digits: whitespace or an extension, up to CR.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// In a chunk's data.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Follows chunked framing (RFC 9112 §7.1) incrementally, to find where a chunked body ends
/// without buffering it: [`ChunkedScanner::scan`] takes bytes as they arrive. Strict: CRLF
/// everywhere, hex sizes that fit 64 bits, bounded size lines and trailers.
#[derive(Clone, Debug)]
pub(crate) struct ChunkedScanner {
    state: ChunkState,
    size: u64,
    remaining: u64,
    line: usize,
    trailer: usize,
    data: u64,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner::new()
    }
}

impl ChunkedScanner {
    pub(crate) fn new() -> ChunkedScanner {
        ChunkedScanner {
            state: ChunkState::Size { digits: 0 },
            size: 0,
            remaining: 0,
            line: 0,
            trailer: 0,
            data: 0,
        }
    }

    /// Whether the body (last chunk and trailers) is complete.
    pub(crate) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Payload bytes (the chunks' data) seen so far.
    pub(crate) fn data_bytes(&self) -> u64 {
        self.data
    }

    /// Scans `input`; returns how many of its bytes belong to the body (all of them unless the
    /// body ended inside it).
    pub(crate) fn scan(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            if self.state == ChunkState::Data {
                let available = (input.len() - i) as u64;
                let take = available.min(self.remaining);
                // `take` ≤ the input's length, so it fits a usize.
                i += usize::try_from(take).unwrap_or(input.len() - i);
                self.remaining -= take;
                self.data += take;
                if self.remaining == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            let b = input.get(i).copied().unwrap_or_default();
            i += 1;
            self.step(b)?;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            ChunkState::Size { digits } => {
                self.line += 1;
                if let Some(d) = char::from(b).to_digit(16) {
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(d)))
                        .ok_or(ChunkError::SizeOverflow)?;
                    self.state = ChunkState::Size {
                        digits: digits.saturating_add(1),
                    };
                    if self.line > MAX_CHUNK_LINE {
                        return Err(ChunkError::TooLong);
                    }
                    return Ok(());
                }
                if b == b'\n' {
                    return Err(ChunkError::BadFraming);
                }
                if digits == 0 {
                    return Err(ChunkError::BadSize);
                }
                match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                    _ => return Err(ChunkError::BadSize),
                }
            }
            ChunkState::Extension => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(ChunkError::TooLong);
                }
                match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => return Err(ChunkError::BadFraming),
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {}
                    _ => return Err(ChunkError::BadFraming),
                }
            }
            ChunkState::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadFraming);
                }
                self.line = 0;
                if self.size == 0 {
                    self.state = ChunkState::TrailerStart;
                } else {
                    self.remaining = self.size;
                    self.size = 0;
                    self.state = ChunkState::Data;
                }
            }
            ChunkState::Data => {}
            ChunkState::DataCr => {
                if b != b'\r' {
                    return Err(ChunkError::BadFraming);
                }
                self.state = ChunkState::DataLf;
            }
            ChunkState::DataLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadFraming);
                }
                self.state = ChunkState::Size { digits: 0 };
            }
            ChunkState::TrailerStart | ChunkState::Trailer => {
                self.trailer += 1;
                if self.trailer > MAX_TRAILER_BYTES {
                    return Err(ChunkError::TooLong);
                }
                match (self.state, b) {
                    (ChunkState::TrailerStart, b'\r') => self.state = ChunkState::EndLf,
                    (_, b'\r') => self.state = ChunkState::TrailerLf,
                    (_, b'\n') => return Err(ChunkError::BadFraming),
                    _ => self.state = ChunkState::Trailer,
                }
            }
            ChunkState::TrailerLf => {
                self.trailer += 1;
                if b != b'\n' {
                    return Err(ChunkError::BadFraming);
                }
                self.state = ChunkState::TrailerStart;
            }
            ChunkState::EndLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadFraming);
                }
                self.state = ChunkState::Done;
            }
            ChunkState::Done => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy's own responses

/// A complete plain-text response from the proxy itself, closing the connection (no body for a
/// HEAD request).
pub(crate) fn error_response(status: u16, message: &str, head_only: bool) -> Vec<u8> {
    let body = format!("{message}\n");
    let mut head = HeadWriter::response(status);
    head.field("Content-Type", "text/plain; charset=utf-8")
        .field("Content-Length", body.len().to_string())
        .field("Cache-Control", "no-store")
        .field("Connection", "close");
    head.finish(if head_only { b"" } else { body.as_bytes() })
}

/// Fuzz entry point: a hostile user's request head, or a hostile app's response head, and the
/// body bytes after it. The first byte picks the direction. What the proxy forwards must parse
/// again with the same framing, and a forwarded request carries exactly one `Jaunt-*` field
/// (the JWT the agent added; never one the user smuggled in). Checked with `debug_assert!`,
/// live in cargo-fuzz builds.
pub(crate) fn fuzz_parse(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let fwd = Forwarding {
        host: "10.0.0.7:8080",
        jwt: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln",
        client_ip: Some("192.0.2.1"),
    };
    let (rest, request_plan) = match parse_request(if which & 1 == 0 { bytes } else { b"" }) {
        Ok(Some((head, used))) => {
            let Ok(plan) = plan_request(&head) else {
                return;
            };
            let out = rewrite_request(&head, &plan, &fwd);
            let again = parse_request(&out);
            debug_assert!(
                matches!(again, Ok(Some((_, n))) if n == out.len()),
                "{again:?}"
            );
            if let Ok(Some((forwarded, _))) = again {
                let jaunt = forwarded
                    .headers
                    .iter()
                    .filter(|h| h.name.to_ascii_lowercase().starts_with("jaunt-"))
                    .count();
                debug_assert_eq!(jaunt, 1);
                // Planned again (as a second Jaunt hop would): the same framing, unless the
                // fields this hop added leave no room for the next hop's (431).
                let replanned = plan_request(&forwarded);
                debug_assert!(
                    matches!(&replanned, Ok(p) if p.body == plan.body)
                        || matches!(&replanned, Err(r) if r.status == 431),
                    "{plan:?} became {replanned:?}"
                );
            }
            (bytes.get(used..).unwrap_or_default(), plan)
        }
        _ => {
            let Ok(Some((head, used))) = parse_response(bytes) else {
                return;
            };
            let request = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .ok()
                .flatten()
                .and_then(|(h, _)| plan_request(&h).ok());
            let Some(request) = request else {
                return;
            };
            let Ok(plan) = plan_response(&head, &request) else {
                return;
            };
            let out = rewrite_response(&head, &plan, false);
            let again = parse_response(&out);
            debug_assert!(
                matches!(again, Ok(Some((_, n))) if n == out.len()),
                "{again:?}"
            );
            if let Ok(Some((relayed, _))) = again {
                let replanned = plan_response(&relayed, &request);
                debug_assert!(
                    matches!(&replanned, Ok(p) if p.body == plan.body),
                    "{plan:?} became {replanned:?}"
                );
            }
            (bytes.get(used..).unwrap_or_default(), request)
        }
    };
    if request_plan.body == BodyKind::Chunked || which & 2 != 0 {
        let mut scanner = ChunkedScanner::new();
        if let Ok(n) = scanner.scan(rest) {
            debug_assert!(n <= rest.len());
            debug_assert!(n == rest.len() || scanner.done());
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;

    fn request(text: &str) -> (RequestHead, usize) {
        parse_request(text.as_bytes()).unwrap().unwrap()
    }

    fn fwd() -> Forwarding<'static> {
        Forwarding {
            host: "127.0.0.1:3000",
            jwt: "the.jwt.sig",
            client_ip: Some("192.0.2.1"),
        }
    }

    fn rewritten(text: &str) -> String {
        let (head, _) = request(text);
        let plan = plan_request(&head).unwrap();
        String::from_utf8(rewrite_request(&head, &plan, &fwd())).unwrap()
    }

    #[test]
    fn heads_parse_incrementally_and_strictly() {
        let text = "\r\nGET /a?b=1 HTTP/1.1\r\nHost: grafana.example.com\r\nX-A:  v \r\n\r\nrest";
        for cut in 0..text.len() - 4 {
            assert_eq!(
                parse_request(&text.as_bytes()[..cut]).unwrap(),
                None,
                "{cut}"
            );
        }
        let (head, used) = request(text);
        assert_eq!(used, text.len() - 4);
        assert_eq!(
            (head.method.as_str(), head.target.as_str()),
            ("GET", "/a?b=1")
        );
        assert_eq!(head.headers[1].value, b"v");
        for bad in [
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \x01\r\n\r\n",
            "GET /  HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\x7f\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n",
            "GET /\u{e9} HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\rHost: x\r\n\r\n",
            "GET / HTTP/1.2\r\n\r\n",
            "GET / http/1.1\r\n\r\n",
            " GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\n Host: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(bad.as_bytes()), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            parse_request(many.as_bytes()),
            Err(HeadError::TooManyFields { limit: MAX_HEADERS })
        );
        let big = format!("GET / HTTP/1.1\r\nA: {}", "x".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            parse_request(big.as_bytes()),
            Err(HeadError::TooLarge {
                limit: MAX_HEAD_BYTES
            })
        );

        let (resp, _) = parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((resp.status, resp.reason.as_slice()), (200, &b"OK"[..]));
        let (resp, _) = parse_response(b"HTTP/1.0 204\r\n\r\n").unwrap().unwrap();
        assert_eq!((resp.status, resp.minor), (204, 0));
        // LF-only line ends are accepted; the head ends at the empty line.
        let (resp, used) = parse_response(b"HTTP/1.1 404 Not Found\nA: b\n\nbody")
            .unwrap()
            .unwrap();
        assert_eq!((resp.status, used), (404, 29));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n").unwrap(),
            None
        );
        for bad in [
            &b"HTTP/1.1 2x0 OK\r\n\r\n"[..],
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SSH-2.0-x\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 200 O\x01K\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA : b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: \x00\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(bad), Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            parse_response(many.as_bytes()),
            Err(HeadError::TooManyFields { limit: MAX_HEADERS })
        );
        let exactly = format!("HTTP/1.1 200 OK\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS));
        assert_eq!(
            parse_response(exactly.as_bytes())
                .unwrap()
                .unwrap()
                .0
                .headers
                .len(),
            MAX_HEADERS
        );
        let big = format!("HTTP/1.1 200 OK\r\nA: {}", "x".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            parse_response(big.as_bytes()),
            Err(HeadError::TooLarge {
                limit: MAX_HEAD_BYTES
            })
        );
        // A complete head just over the limit is refused too, even with all of it buffered.
        let over = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nA: {}\r\n\r\n",
            "x".repeat(MAX_HEAD_BYTES - 30)
        );
        assert!(over.len() > MAX_HEAD_BYTES);
        assert_eq!(
            parse_request(over.as_bytes()),
            Err(HeadError::TooLarge {
                limit: MAX_HEAD_BYTES
            })
        );
        let fits = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nA: {}\r\n\r\n",
            "x".repeat(MAX_HEAD_BYTES - 40)
        );
        assert!(fits.len() <= MAX_HEAD_BYTES);
        assert_eq!(
            parse_request(fits.as_bytes()).unwrap().unwrap().1,
            fits.len()
        );
    }

    #[test]
    fn requests_are_rewritten_for_the_app() {
        let out = rewritten(
            "POST /x HTTP/1.1\r\nHost: grafana.jaunt.example\r\njaunt-foo: evil\r\n\
             Jaunt-Jwt-Assertion: forged\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
             Keep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nContent-Length: 3\r\n\
             Accept: */*\r\n\r\n",
        );
        assert_eq!(
            out,
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nAccept: */*\r\nContent-Length: 3\r\n\
             X-Forwarded-Host: grafana.jaunt.example\r\nX-Forwarded-For: 192.0.2.1\r\n\
             X-Forwarded-Proto: https\r\nJaunt-Jwt-Assertion: the.jwt.sig\r\n\r\n"
        );
        // WebSocket upgrades keep Connection: Upgrade and Upgrade.
        let out = rewritten(
            "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
        );
        assert!(
            out.contains("\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Key: k\r\n"), "{out}");
        // Absolute form becomes origin form; chunked is restated; close is kept.
        let out = rewritten(
            "PUT http://app.example/p?q HTTP/1.1\r\nHost: other\r\nTransfer-Encoding: Chunked\r\n\
             Connection: close\r\n\r\n",
        );
        assert!(
            out.starts_with("PUT /p?q HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Transfer-Encoding: chunked\r\nConnection: close\r\n"),
            "{out}"
        );
        assert!(out.contains("X-Forwarded-Host: app.example\r\n"), "{out}");
    }

    #[test]
    fn request_framing_refuses_smuggling() {
        let status = |text: &str| plan_request(&request(text).0).map_err(|r| r.status);
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(400)
        );
        for bad in ["-1", "1 2", "0x10", "", "99999999999999999999", "5, 6"] {
            assert_eq!(
                status(&format!(
                    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {bad}\r\n\r\n"
                )),
                Err(400),
                "{bad:?}"
            );
        }
        assert_eq!(
            status(
                "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n"
            )
            .unwrap()
            .body,
            BodyKind::Length(5)
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(501)
        );
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(400)
        );
        assert_eq!(status("CONNECT h:1 HTTP/1.1\r\nHost: h\r\n\r\n"), Err(405));
        let plan = status("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(plan.close && plan.body == BodyKind::None);
        let plan = status(
            "PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        )
        .unwrap();
        assert!(plan.expect_continue && !plan.close);
    }

    #[test]
    fn response_framing() {
        let get = plan_request(&request("GET / HTTP/1.1\r\nHost: h\r\n\r\n").0).unwrap();
        let head = plan_request(&request("HEAD / HTTP/1.1\r\nHost: h\r\n\r\n").0).unwrap();
        let plan = |text: &str, req: &RequestPlan| {
            plan_response(&parse_response(text.as_bytes()).unwrap().unwrap().0, req)
        };
        let p = plan(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get,
        )
        .unwrap();
        assert_eq!((p.body, p.app_closes), (BodyKind::Chunked, false));
        let p = plan("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", &head).unwrap();
        assert_eq!((p.body, p.content_length), (BodyKind::None, Some(10)));
        let p = plan("HTTP/1.1 304 Not Modified\r\n\r\n", &get).unwrap();
        assert_eq!(p.body, BodyKind::None);
        let p = plan("HTTP/1.1 200 OK\r\n\r\n", &get).unwrap();
        assert_eq!((p.body, p.app_closes), (BodyKind::Close, true));
        let p = plan("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &get).unwrap();
        assert!(p.app_closes);
        assert!(plan(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get
        )
        .is_err());
        assert!(plan("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", &get).is_err());
        let (resp, _) =
            parse_response(b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 1\r\nTransfer-Encoding: chunked\r\nX-End: 2\r\n\r\n")
                .unwrap()
                .unwrap();
        let p = plan_response(&resp, &get).unwrap();
        assert_eq!(
            String::from_utf8(rewrite_response(&resp, &p, false)).unwrap(),
            "HTTP/1.1 200 OK\r\nX-End: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    fn scan_all(input: &[u8], step: usize) -> Result<(usize, bool, u64), ChunkError> {
        let mut s = ChunkedScanner::new();
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = s.scan(piece)?;
            used += n;
            if s.done() {
                break;
            }
            assert_eq!(n, piece.len());
        }
        Ok((used, s.done(), s.data_bytes()))
    }

    #[test]
    fn chunked_framing_is_followed_byte_by_byte() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(
                scan_all(body, step).unwrap(),
                (body.len() - 4, true, 15),
                "step {step}"
            );
        }
        assert_eq!(scan_all(b"0\r\n\r\n", 1).unwrap(), (5, true, 0));
        assert_eq!(scan_all(b"3\r\nab", 1).unwrap(), (5, false, 2));
    }

    #[test]
    fn chunked_framing_refuses_bad_sizes_and_framing() {
        // 17 hex digits: more than 64 bits.
        assert_eq!(
            scan_all(b"10000000000000000\r\n", 1),
            Err(ChunkError::SizeOverflow)
        );
        assert_eq!(
            scan_all(b"fffffffffffffffff\r\n", 4),
            Err(ChunkError::SizeOverflow)
        );
        // Leading zeros are fine as long as the value fits.
        assert!(
            scan_all(b"00000000000000000001\r\nx\r\n0\r\n\r\n", 1)
                .unwrap()
                .1
        );
        assert!(!scan_all(b"ffffffffffffffff\r\n", 1).unwrap().1);
        assert_eq!(scan_all(b"x\r\n", 1), Err(ChunkError::BadSize));
        assert_eq!(scan_all(b"\r\n", 1), Err(ChunkError::BadSize));
        assert_eq!(scan_all(b"-1\r\n", 1), Err(ChunkError::BadSize));
        assert_eq!(scan_all(b"1\nx\r\n", 1), Err(ChunkError::BadFraming));
        assert_eq!(scan_all(b"1\r\nxy\r\n", 1), Err(ChunkError::BadFraming));
        assert_eq!(scan_all(b"0\r\n\n", 1), Err(ChunkError::BadFraming));
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(scan_all(long.as_bytes(), 100), Err(ChunkError::TooLong));
        let trailers = format!("0\r\n{}", "T: v\r\n".repeat(MAX_TRAILER_BYTES / 6 + 1));
        assert_eq!(
            scan_all(trailers.as_bytes(), 1000),
            Err(ChunkError::TooLong)
        );
    }

    /// Found by the http_head fuzz target: a request at the parser's field limit was forwarded
    /// with the proxy's own fields on top, so the app got more fields than the proxy accepts.
    #[test]
    fn a_request_the_added_fields_would_push_past_the_limits_is_refused_with_431() {
        let at = |n: usize| {
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
                "A: b\r\n".repeat(n - 1)
            )
        };
        let (head, _) = parse_request(at(MAX_HEADERS).as_bytes()).unwrap().unwrap();
        let refused = plan_request(&head).unwrap_err();
        assert_eq!(refused.status, 431, "{refused:?}");
        assert!(refused.message.contains("header fields"), "{refused:?}");
        let (head, _) = parse_request(at(MAX_HEADERS - ADDED_FIELDS).as_bytes())
            .unwrap()
            .unwrap();
        let plan = plan_request(&head).unwrap();
        let fwd = Forwarding {
            host: "10.0.0.7:8080",
            jwt: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln",
            client_ip: Some("192.0.2.1"),
        };
        let out = rewrite_request(&head, &plan, &fwd);
        assert!(matches!(parse_request(&out), Ok(Some((_, n))) if n == out.len()));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nA: {}\r\n\r\n",
            "b".repeat(MAX_HEAD_BYTES - 1024)
        );
        let (head, _) = parse_request(big.as_bytes()).unwrap().unwrap();
        assert_eq!(plan_request(&head).unwrap_err().status, 431);
        // The fuzzer's input itself.
        fuzz_parse(include_bytes!(
            "../../../fuzz/corpus/http_head/too_many_after_rewrite"
        ));
        fuzz_parse(include_bytes!(
            "../../../fuzz/corpus/http_head/replanned_at_the_limit"
        ));
    }

    #[test]
    fn error_responses_are_plain_text_and_close() {
        let out = String::from_utf8(error_response(502, "cannot reach app x", false)).unwrap();
        assert!(out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{out}");
        assert!(out.contains("Content-Length: 19\r\n"), "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\ncannot reach app x\n"), "{out}");
        let head = String::from_utf8(error_response(502, "x", true)).unwrap();
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}
