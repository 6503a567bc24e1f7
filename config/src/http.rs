//! HTTP/1.1 heads for the three HTTP servers of the tree (control's API server,
//! `control/src/http.rs`; the engine's web route, `engine/src/server/http.rs`; the agent's web
//! app proxy, `agent/src/http_app/wire.rs`): one tokenizer ([`parse_request`],
//! [`parse_response`]), one head encoder ([`HeadWriter`]) with one reason-phrase table
//! ([`reason_phrase`]), and one reading of `Content-Length` ([`content_length`]), so that the
//! three agree on the bytes request smuggling hides in. Pure functions, no I/O.
//!
//! The tokenizer is httparse, configured as strictly as it goes (CRLF or LF line ends but no bare
//! CR, no whitespace before a field's colon, no obs-fold, no invalid field lines skipped, single
//! spaces in the start line; these are its defaults, spelled out so that a change of default
//! cannot loosen them), plus what httparse leaves to its caller: the [`Bounds`] (head bytes,
//! field count; httparse never sees more than the byte bound), field values and the reason
//! phrase free of control characters, HTTP/1.0 or 1.1 only, a status code from 100. Errors come
//! in typed classes ([`HeadError`], [`Malformed`]) with stable labels.
//!
//! What a head *means* stays with each server (ARCHITECTURE.md says how they differ): which
//! status a refusal gets and in which words, how values are decoded (control wants UTF-8 and a
//! percent-decoded path, the engine keeps lossy text, the app proxy forwards bytes), and the
//! framing rules each enforces on top of [`content_length`].

use std::fmt;

/// The most fields any caller may bound a head to ([`Bounds::fields`] above it counts as this):
/// the tokenizer keeps that many slots on the stack.
pub const MAX_FIELDS: usize = 128;

/// How large a head may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Most bytes of the start line and fields, line ends included: a longer head is
    /// [`HeadError::TooLarge`], and the tokenizer reads no byte past this.
    pub head_bytes: usize,
    /// Most fields (at most [`MAX_FIELDS`]): more is [`HeadError::TooManyFields`].
    pub fields: usize,
}

/// One header field as received: the name (a token, as sent), the value (field text, trimmed of
/// OWS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'b> {
    pub name: &'b str,
    pub value: &'b [u8],
}

/// A request head, tokenized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedRequest<'b> {
    /// The method (a token).
    pub method: &'b str,
    /// The request target as sent (httparse lets obs-text through; see [`check_target`]).
    pub target: &'b str,
    /// HTTP/1.`minor`: 0 or 1.
    pub minor: u8,
    /// The fields, in order.
    pub fields: Vec<Field<'b>>,
    /// Bytes of the head, the empty line that ends it included.
    pub len: usize,
}

/// A response head, tokenized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedResponse<'b> {
    /// HTTP/1.`minor`: 0 or 1.
    pub minor: u8,
    /// Status code, 100 to 999.
    pub status: u16,
    /// The reason phrase as sent (field text; empty when missing or not UTF-8).
    pub reason: &'b [u8],
    /// The fields, in order.
    pub fields: Vec<Field<'b>>,
    /// Bytes of the head, the empty line that ends it included.
    pub len: usize,
}

/// Why a head cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Longer than [`Bounds::head_bytes`] (`limit`).
    TooLarge { limit: usize },
    /// More than [`Bounds::fields`] (`limit`) fields.
    TooManyFields { limit: usize },
    /// Not an HTTP/1.x head: which part is wrong.
    Malformed(Malformed),
}

/// Which part of a head is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A request line that is not METHOD TARGET VERSION (a method that is not a token, a target
    /// with characters a URI cannot have, more than one space).
    RequestLine,
    /// A status line whose code is not three digits (or is missing).
    StatusLine,
    /// A status code below 100.
    StatusCode,
    /// Not HTTP/1.0 or HTTP/1.1.
    Version,
    /// A field line whose name is not a token: whitespace before its colon, a folded line
    /// (obs-fold), no colon.
    FieldName,
    /// A control character in a field value.
    FieldValue,
    /// A bare CR or a malformed line end.
    LineEnd,
    /// A control character in the reason phrase.
    Reason,
    /// A request target that is empty or has bytes a URI cannot have ([`check_target`]).
    Target,
}

impl HeadError {
    /// A stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            HeadError::TooLarge { .. } => "head_too_large",
            HeadError::TooManyFields { .. } => "too_many_fields",
            HeadError::Malformed(m) => m.label(),
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge { limit } => write!(f, "the head is larger than {limit} bytes"),
            HeadError::TooManyFields { limit } => write!(f, "more than {limit} header fields"),
            HeadError::Malformed(m) => f.write_str(m.explain()),
        }
    }
}

impl std::error::Error for HeadError {}

impl Malformed {
    /// A stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Malformed::RequestLine => "bad_request_line",
            Malformed::StatusLine => "bad_status_line",
            Malformed::StatusCode => "bad_status_code",
            Malformed::Version => "bad_version",
            Malformed::FieldName => "bad_field_name",
            Malformed::FieldValue => "bad_field_value",
            Malformed::LineEnd => "bad_line_end",
            Malformed::Reason => "bad_reason",
            Malformed::Target => "bad_target",
        }
    }

    /// The class in a few words (httparse's own, where it has them): what control's API says
    /// after "malformed request: ".
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::RequestLine | Malformed::Target => "invalid token",
            Malformed::StatusLine | Malformed::StatusCode | Malformed::Reason => {
                "invalid response status"
            }
            Malformed::Version => "invalid HTTP version",
            Malformed::FieldName => "invalid header name",
            Malformed::FieldValue => "invalid header value",
            Malformed::LineEnd => "invalid new line",
        }
    }

    /// The class as a sentence a person can act on (what the app proxy says).
    pub fn explain(self) -> &'static str {
        match self {
            Malformed::RequestLine => {
                "the request line is not METHOD TARGET VERSION (a method that is not a token, or \
                 a target with characters a URI cannot have)"
            }
            Malformed::StatusLine => {
                "a malformed status line (the status code is not three digits)"
            }
            Malformed::StatusCode => "the status code is below 100",
            Malformed::Version => "not HTTP/1.0 or HTTP/1.1",
            Malformed::FieldName => {
                "a header line whose name is not a token (whitespace before its colon, a folded \
                 line (obs-fold is not accepted) or no colon)"
            }
            Malformed::FieldValue => "a control character in a header value",
            Malformed::LineEnd => "a bare CR or a malformed line end in the head",
            Malformed::Reason => "a control character in the reason phrase",
            Malformed::Target => "the request target is empty or has characters a URI cannot have",
        }
    }
}

/// Field-value and reason-phrase bytes: HTAB, SP, VCHAR, obs-text.
fn is_field_text(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

/// httparse as strict as it goes (its defaults, spelled out).
fn parser_config() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config
        .allow_spaces_after_header_name_in_responses(false)
        .allow_obsolete_multiline_headers_in_responses(false)
        .allow_multiple_spaces_in_request_line_delimiters(false)
        .allow_multiple_spaces_in_response_status_delimiters(false)
        .allow_space_before_first_header_name(false)
        .ignore_invalid_headers_in_requests(false)
        .ignore_invalid_headers_in_responses(false);
    config
}

/// The class of what httparse refused.
fn parse_error(e: httparse::Error, bounds: Bounds) -> HeadError {
    HeadError::Malformed(match e {
        httparse::Error::TooManyHeaders => {
            return HeadError::TooManyFields {
                limit: bounds.fields,
            }
        }
        httparse::Error::HeaderName => Malformed::FieldName,
        httparse::Error::HeaderValue => Malformed::FieldValue,
        httparse::Error::NewLine => Malformed::LineEnd,
        httparse::Error::Status => Malformed::StatusLine,
        httparse::Error::Token => Malformed::RequestLine,
        httparse::Error::Version => Malformed::Version,
    })
}

/// What httparse may read of `buf`: no more than the byte bound.
fn within(buf: &[u8], bounds: Bounds) -> &[u8] {
    buf.get(..bounds.head_bytes).unwrap_or(buf)
}

/// The checks httparse leaves to its caller once it answered: complete or not (a partial head
/// as long as the bound is too large), the fields copied out with values that are field text
/// (checked here as well, so that the rule does not rest on httparse's internals), trimmed of
/// OWS.
fn finish<'b>(
    status: httparse::Status<usize>,
    buf_len: usize,
    bounds: Bounds,
    parsed: &[httparse::Header<'b>],
) -> Result<Option<(Vec<Field<'b>>, usize)>, HeadError> {
    let len = match status {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf_len >= bounds.head_bytes => {
            return Err(HeadError::TooLarge {
                limit: bounds.head_bytes,
            })
        }
        httparse::Status::Partial => return Ok(None),
    };
    let mut fields = Vec::with_capacity(parsed.len());
    for field in parsed {
        let value = trim_ows(field.value);
        if !value.iter().all(|&b| is_field_text(b)) {
            return Err(HeadError::Malformed(Malformed::FieldValue));
        }
        fields.push(Field {
            name: field.name,
            value,
        });
    }
    Ok(Some((fields, len)))
}

fn minor(version: Option<u8>) -> Result<u8, HeadError> {
    match version {
        Some(minor @ (0 | 1)) => Ok(minor),
        _ => Err(HeadError::Malformed(Malformed::Version)),
    }
}

/// A start line as httparse left it (a request's method, target and version, or a response's
/// version, code and reason).
#[derive(Default)]
struct Start<'b> {
    method: Option<&'b str>,
    target: Option<&'b str>,
    version: Option<u8>,
    code: Option<u16>,
    reason: Option<&'b str>,
}

/// httparse on what it may read of `buf` (a response head when `response`), with the field
/// slots of `bounds` on the stack, then [`finish`]: once complete, the start line, the fields
/// and the head's length.
#[allow(clippy::type_complexity, reason = "a private helper's tuple")]
fn tokenize(
    buf: &[u8],
    bounds: Bounds,
    response: bool,
) -> Result<Option<(Start<'_>, Vec<Field<'_>>, usize)>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let slots = slots
        .get_mut(..bounds.fields.min(MAX_FIELDS))
        .unwrap_or_default();
    let readable = within(buf, bounds);
    let mut start = Start::default();
    let (status, count) = if response {
        let mut parsed = httparse::Response::new(slots);
        let status = parser_config().parse_response(&mut parsed, readable);
        (start.version, start.code, start.reason) = (parsed.version, parsed.code, parsed.reason);
        (status, parsed.headers.len())
    } else {
        let mut parsed = httparse::Request::new(slots);
        let status = parser_config().parse_request(&mut parsed, readable);
        (start.version, start.method, start.target) = (parsed.version, parsed.method, parsed.path);
        (status, parsed.headers.len())
    };
    let status = status.map_err(|e| parse_error(e, bounds))?;
    let parsed = slots.get(..count).unwrap_or_default();
    Ok(finish(status, buf.len(), bounds, parsed)?.map(|(fields, len)| (start, fields, len)))
}

/// Tokenizes the request head at the front of `buf`: `Ok(None)` until it is complete (and
/// within `bounds`), then the head. Empty lines before the request line are skipped (RFC 9112
/// §2.2).
pub fn parse_request(buf: &[u8], bounds: Bounds) -> Result<Option<ParsedRequest<'_>>, HeadError> {
    let Some((start, fields, len)) = tokenize(buf, bounds, false)? else {
        return Ok(None);
    };
    let (Some(method), Some(target)) = (start.method, start.target) else {
        return Err(HeadError::Malformed(Malformed::RequestLine));
    };
    Ok(Some(ParsedRequest {
        method,
        target,
        minor: minor(start.version)?,
        fields,
        len,
    }))
}

/// Tokenizes the response head at the front of `buf`, as [`parse_request`].
pub fn parse_response(buf: &[u8], bounds: Bounds) -> Result<Option<ParsedResponse<'_>>, HeadError> {
    let Some((start, fields, len)) = tokenize(buf, bounds, true)? else {
        return Ok(None);
    };
    let Some(code) = start.code else {
        return Err(HeadError::Malformed(Malformed::StatusLine));
    };
    if code < 100 {
        return Err(HeadError::Malformed(Malformed::StatusCode));
    }
    let reason = start.reason.unwrap_or_default().as_bytes();
    if !reason.iter().all(|&b| is_field_text(b)) {
        return Err(HeadError::Malformed(Malformed::Reason));
    }
    Ok(Some(ParsedResponse {
        minor: minor(start.version)?,
        status: code,
        reason,
        fields,
        len,
    }))
}

/// A request target a proxy can forward: not empty, visible ASCII only (httparse lets obs-text
/// through; a URI has none).
pub fn check_target(target: &str) -> Result<(), HeadError> {
    if target.is_empty() || !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(HeadError::Malformed(Malformed::Target));
    }
    Ok(())
}

/// Whether `bytes` hold CR, LF or NUL: a name or value that could end a line early, split a head
/// or end a C string. A writer leaves such a field out.
pub fn could_split(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0))
}

/// Writes one head: the start line ([`HeadWriter::response`], [`HeadWriter::request`]), fields
/// in order ([`HeadWriter::field`]), then the empty line and a body ([`HeadWriter::finish`]).
/// It writes what it is given: the caller leaves out what must not be sent (see
/// [`could_split`]).
#[derive(Clone, Debug)]
pub struct HeadWriter {
    out: Vec<u8>,
}

impl HeadWriter {
    /// `HTTP/1.1 <status> <reason>`, the reason from [`reason_phrase`].
    pub fn response(status: u16) -> HeadWriter {
        HeadWriter::response_with_reason(status, reason_phrase(status).as_bytes())
    }

    /// `HTTP/1.1 <status> <reason>` with the reason given (a relayed response's, as received).
    pub fn response_with_reason(status: u16, reason: &[u8]) -> HeadWriter {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
        HeadWriter { out }
    }

    /// `<method> <target> HTTP/1.<minor>` (minor 1, or 0 for anything else).
    pub fn request(method: &str, target: &str, minor: u8) -> HeadWriter {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(if minor == 1 {
            b" HTTP/1.1\r\n"
        } else {
            b" HTTP/1.0\r\n"
        });
        HeadWriter { out }
    }

    /// `<name>: <value>`.
    pub fn field(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut HeadWriter {
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value.as_ref());
        self.out.extend_from_slice(b"\r\n");
        self
    }

    /// The head, ended by its empty line, then `body`.
    pub fn finish(mut self, body: &[u8]) -> Vec<u8> {
        self.out.reserve(2 + body.len());
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
        self.out
    }
}

/// The reason phrase of `status` (RFC 9110's names). Clients ignore it; people reading a
/// response do not. A status without a name here gets its class's name.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_statuses_and_classes() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(299), "Success");
        assert_eq!(reason_phrase(418), "Client Error");
        assert_eq!(reason_phrase(599), "Server Error");
        // A name wins over its class; a class covers the rest of its hundred.
        assert_eq!(reason_phrase(101), "Switching Protocols");
        assert_eq!(reason_phrase(199), "Informational");
        assert_eq!(reason_phrase(307), "Temporary Redirect");
        assert_eq!(reason_phrase(399), "Redirection");
        assert_eq!(reason_phrase(504), "Gateway Timeout");
    }
}

/// Why a message's `Content-Length` fields cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentLengthError {
    /// An element that is not 1 to 19 ASCII digits (a sign, a space inside, empty, too long).
    Invalid,
    /// Two elements or fields that do not agree.
    Conflicting,
}

impl ContentLengthError {
    /// A short reason for a 400 answer.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentLengthError::Invalid => "an invalid Content-Length",
            ContentLengthError::Conflicting => "conflicting Content-Length values",
        }
    }
}

impl std::fmt::Display for ContentLengthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ContentLengthError {}

/// The `Content-Length` of a message from the values of its `Content-Length` fields (RFC 9112
/// §6.3): `None` without one; repeated fields and comma-separated list elements must all agree;
/// each element is 1 to 19 ASCII digits after trimming spaces and tabs (no sign, so `+5`, `-1`
/// and `5 5` are refused as invalid, as a length two parsers could read differently must be).
pub fn content_length<'a, I>(values: I) -> Result<Option<u64>, ContentLengthError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut found: Option<u64> = None;
    for value in values {
        for element in value.split(|&b| b == b',') {
            let digits = trim_ows(element);
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(ContentLengthError::Invalid);
            }
            let n = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(previous) if previous != n => return Err(ContentLengthError::Conflicting),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// `bytes` without leading and trailing spaces and tabs (HTTP's optional whitespace, OWS).
pub fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let Some((b' ' | b'\t', rest)) = bytes.split_first() {
        bytes = rest;
    }
    while let Some((b' ' | b'\t', rest)) = bytes.split_last() {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod content_length_tests {
    use super::*;

    fn cl(values: &[&str]) -> Result<Option<u64>, ContentLengthError> {
        content_length(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn one_reading_of_content_length() {
        assert_eq!(cl(&[]), Ok(None));
        assert_eq!(cl(&["0"]), Ok(Some(0)));
        assert_eq!(cl(&[" 12\t"]), Ok(Some(12)));
        assert_eq!(cl(&["5", "5"]), Ok(Some(5)));
        assert_eq!(cl(&["5, 5"]), Ok(Some(5)));
        assert_eq!(
            cl(&["9999999999999999999"]),
            Ok(Some(9_999_999_999_999_999_999))
        );
        for bad in [
            "+5",
            "-1",
            "5 5",
            "",
            " ",
            "0x10",
            "1e3",
            "5,",
            "12345678901234567890",
            "\u{663}",
        ] {
            assert_eq!(cl(&[bad]), Err(ContentLengthError::Invalid), "{bad:?}");
        }
        assert_eq!(cl(&["5", "6"]), Err(ContentLengthError::Conflicting));
        assert_eq!(cl(&["5, 6"]), Err(ContentLengthError::Conflicting));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod head_tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        head_bytes: 256,
        fields: 4,
    };

    fn request(text: &str) -> Result<Option<ParsedRequest<'_>>, HeadError> {
        parse_request(text.as_bytes(), BOUNDS)
    }

    fn malformed(text: &str) -> Malformed {
        match request(text) {
            Err(HeadError::Malformed(m)) => m,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn a_request_is_tokenized_and_partial_heads_ask_for_more() {
        let text = "\r\nPOST /a?b=1 HTTP/1.1\r\nHost: h\r\nX-A:  v \t\r\n\r\nbody";
        for cut in 0..text.len() - 4 {
            assert_eq!(request(&text[..cut]), Ok(None), "cut {cut}");
        }
        let head = request(text).unwrap().unwrap();
        assert_eq!(
            (head.method, head.target, head.minor, head.len),
            ("POST", "/a?b=1", 1, text.len() - 4)
        );
        assert_eq!(
            head.fields,
            vec![
                Field {
                    name: "Host",
                    value: b"h"
                },
                Field {
                    name: "X-A",
                    value: b"v"
                }
            ]
        );
        let old = request("GET / HTTP/1.0\n\n").unwrap().unwrap();
        assert_eq!((old.minor, old.len), (0, 16));
    }

    #[test]
    fn bounds_on_bytes_and_fields() {
        // Exactly at the byte bound is fine; a byte more, complete or not, is too large.
        let at = |n: usize| format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(n - 23));
        let fits = at(BOUNDS.head_bytes);
        assert_eq!(fits.len(), BOUNDS.head_bytes);
        assert_eq!(request(&fits).unwrap().unwrap().len, BOUNDS.head_bytes);
        let over = at(BOUNDS.head_bytes + 1);
        assert_eq!(request(&over), Err(HeadError::TooLarge { limit: 256 }));
        assert_eq!(
            request(&over[..BOUNDS.head_bytes]),
            Err(HeadError::TooLarge { limit: 256 })
        );
        assert_eq!(request(&over[..BOUNDS.head_bytes - 1]), Ok(None));
        // A syntax error past the bound is not read: the head is too large first.
        let late = format!("GET / HTTP/1.1\r\nA: {}\x01\r\n\r\n", "x".repeat(300));
        assert_eq!(request(&late), Err(HeadError::TooLarge { limit: 256 }));
        // Fields: the bound is the most, one more is refused with its own class.
        let fields = |n: usize| format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(n));
        assert_eq!(request(&fields(4)).unwrap().unwrap().fields.len(), 4);
        let refused = request(&fields(5)).unwrap_err();
        assert_eq!(refused, HeadError::TooManyFields { limit: 4 });
        assert_eq!(refused.to_string(), "more than 4 header fields");
        assert_eq!(refused.label(), "too_many_fields");
        // A bound above the slots counts as the slots.
        let wide = Bounds {
            head_bytes: 4096,
            fields: 1000,
        };
        let many = fields(MAX_FIELDS);
        assert!(parse_request(many.as_bytes(), wide).unwrap().is_some());
        assert_eq!(
            parse_request(fields(MAX_FIELDS + 1).as_bytes(), wide),
            Err(HeadError::TooManyFields { limit: 1000 })
        );
    }

    #[test]
    fn obs_fold_and_bad_bytes_are_refused_by_class() {
        use Malformed::*;
        for (text, class) in [
            ("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", FieldName),
            ("GET / HTTP/1.1\r\nA : b\r\n\r\n", FieldName),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", FieldName),
            ("GET / HTTP/1.1\r\n Host: x\r\n\r\n", FieldName),
            ("GET / HTTP/1.1\r\nA: \x00\r\n\r\n", FieldValue),
            ("GET / HTTP/1.1\r\nA: x\x7f\r\n\r\n", FieldValue),
            ("GET / HTTP/1.1\r\nA: x\ry\r\n\r\n", FieldValue),
            ("GET / HTTP/1.1\rA: x\r\n\r\n", LineEnd),
            ("G(T / HTTP/1.1\r\n\r\n", RequestLine),
            ("GET / HTTP/2.0\r\n\r\n", Version),
            ("GET / http/1.1\r\n\r\n", Version),
            ("\x16\x03\x01garbage\r\n\r\n", RequestLine),
        ] {
            assert_eq!(malformed(text), class, "{text:?}");
        }
        let refused = HeadError::Malformed(Malformed::FieldName);
        assert_eq!(refused.label(), "bad_field_name");
        assert!(refused.to_string().contains("obs-fold"), "{refused}");
        assert_eq!(Malformed::FieldName.as_str(), "invalid header name");
        assert_eq!(
            check_target("/caf\u{e9}"),
            Err(HeadError::Malformed(Malformed::Target))
        );
        assert_eq!(
            check_target(""),
            Err(HeadError::Malformed(Malformed::Target))
        );
        assert_eq!(check_target("/a?b=%20"), Ok(()));
    }

    #[test]
    fn responses_are_tokenized_with_their_status_and_reason() {
        let head = parse_response(b"HTTP/1.0 404 Not Found\nA: b\n\nbody", BOUNDS)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.minor, head.status, head.reason, head.len),
            (0, 404, &b"Not Found"[..], 29)
        );
        let empty = parse_response(b"HTTP/1.1 204\r\n\r\n", BOUNDS)
            .unwrap()
            .unwrap();
        assert_eq!((empty.status, empty.reason), (204, &b""[..]));
        for (text, class) in [
            (&b"HTTP/1.1 2x0 OK\r\n\r\n"[..], Malformed::StatusLine),
            (b"HTTP/1.1 099 Low\r\n\r\n", Malformed::StatusCode),
            (b"HTTP/1.1 200 O\x01K\r\n\r\n", Malformed::StatusLine),
            (b"SSH-2.0-x\r\n\r\n", Malformed::Version),
        ] {
            assert_eq!(
                parse_response(text, BOUNDS),
                Err(HeadError::Malformed(class)),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn conflicting_lengths_in_a_tokenized_head() {
        let length = |text: &str| {
            let head = request(text).unwrap().unwrap();
            content_length(
                head.fields
                    .iter()
                    .filter(|f| f.name.eq_ignore_ascii_case("content-length"))
                    .map(|f| f.value),
            )
        };
        assert_eq!(
            length("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"),
            Ok(Some(5))
        );
        assert_eq!(
            length("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Err(ContentLengthError::Conflicting)
        );
        assert_eq!(
            length("POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n"),
            Err(ContentLengthError::Conflicting)
        );
        assert_eq!(
            length("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"),
            Err(ContentLengthError::Invalid)
        );
    }

    #[test]
    fn the_writer_writes_heads_that_parse_back() {
        let mut head = HeadWriter::response(431);
        head.field("Content-Length", "0").field("X-A", b"b");
        let out = head.finish(b"");
        assert_eq!(
            out,
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nX-A: b\r\n\r\n"
        );
        let back = parse_response(&out, BOUNDS).unwrap().unwrap();
        assert_eq!(
            (back.status, back.len, back.fields.len()),
            (431, out.len(), 2)
        );
        assert_eq!(
            HeadWriter::response_with_reason(204, b"").finish(b"x"),
            b"HTTP/1.1 204 \r\n\r\nx"
        );
        assert_eq!(
            HeadWriter::response(100).finish(b""),
            b"HTTP/1.1 100 Continue\r\n\r\n"
        );
        let mut request = HeadWriter::request("GET", "/p?q", 0);
        request.field("Host", "h");
        assert_eq!(request.finish(b""), b"GET /p?q HTTP/1.0\r\nHost: h\r\n\r\n");
        assert!(could_split(b"a\r\nb") && could_split(b"\0") && !could_split(b"a b\t"));
    }
}

/// Fuzz entry point for the shared tokenizer: the first two bytes pick the bounds, the rest is a
/// request head and, read again, a response head. A head tokenized within its bounds must be
/// no longer than the bounds and the input, tokenize the same from exactly its own bytes, be
/// incomplete one byte shorter (what lets a server parse as bytes arrive), and written again by
/// [`HeadWriter`] tokenize to the same start line and fields. Checked with `debug_assert!`,
/// live in cargo-fuzz builds.
#[doc(hidden)]
pub fn fuzz_parse(data: &[u8]) {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let bounds = Bounds {
        head_bytes: 1 + usize::from(*a) * 64,
        fields: usize::from(*b) % (MAX_FIELDS + 8),
    };
    let wide = |len: usize| Bounds {
        head_bytes: len,
        fields: MAX_FIELDS,
    };
    let written = |mut writer: HeadWriter, fields: &[Field<'_>]| {
        for field in fields {
            writer.field(field.name, field.value);
        }
        writer.finish(b"")
    };
    let request = fuzz_tokenized(rest, bounds, parse_request, |h| (h.len, h.fields.len()));
    if let Some(head) = request {
        let out = written(
            HeadWriter::request(head.method, head.target, head.minor),
            &head.fields,
        );
        let again = parse_request(&out, wide(out.len()));
        debug_assert!(
            matches!(&again, Ok(Some(h)) if h.method == head.method && h.target == head.target
                && h.minor == head.minor && h.fields == head.fields && h.len == out.len()),
            "{head:?} became {again:?}"
        );
        let _ = content_length(head.fields.iter().map(|f| f.value));
    }
    let response = fuzz_tokenized(rest, bounds, parse_response, |h| (h.len, h.fields.len()));
    if let Some(head) = response {
        let out = written(
            HeadWriter::response_with_reason(head.status, head.reason),
            &head.fields,
        );
        let again = parse_response(&out, wide(out.len()));
        debug_assert!(
            matches!(&again, Ok(Some(h)) if h.status == head.status && h.reason == head.reason
                && h.fields == head.fields && h.len == out.len()),
            "{head:?} became {again:?}"
        );
    }
}

/// [`fuzz_parse`]'s checks common to requests and responses: `parse` (with `shape` telling a
/// head's length and field count) on `rest`, and on its own bytes and one byte fewer.
fn fuzz_tokenized<'b, T: Clone + PartialEq + fmt::Debug>(
    rest: &'b [u8],
    bounds: Bounds,
    parse: impl Fn(&'b [u8], Bounds) -> Result<Option<T>, HeadError>,
    shape: impl Fn(&T) -> (usize, usize),
) -> Option<T> {
    let head = parse(rest, bounds).ok().flatten()?;
    let (len, fields) = shape(&head);
    debug_assert!(len <= bounds.head_bytes && len <= rest.len() && fields <= bounds.fields);
    let own = rest.get(..len).unwrap_or_default();
    debug_assert_eq!(parse(own, bounds), Ok(Some(head.clone())));
    let shorter = own.get(..len.saturating_sub(1)).unwrap_or_default();
    debug_assert_eq!(parse(shorter, bounds), Ok(None));
    Some(head)
}
