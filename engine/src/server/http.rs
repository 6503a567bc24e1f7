//! The engine's own HTTP/1.1, on a TLS stream the engine terminated: the web API's
//! `GET /webapi/ping` and the JWK Set, which the engine answers itself; every other request on
//! the public host goes to the web UI's backend when there is one (`web.rs`), else 404.
//!
//! Sans-IO pieces ([`parse_head`], [`Response::encode`], [`web_response`]) plus one small async
//! loop ([`serve`]) that reads request heads and `Content-Length` bodies with bounds
//! ([`MAX_REQUEST_HEAD_BYTES`], [`MAX_REQUEST_BODY_BYTES`]), answers, and keeps the connection
//! alive between requests up to the idle timeout. A chunked request body is answered 411 and a
//! larger one 413, and the connection closed. Not here: the diag endpoint's HTTP (`diag.rs`,
//! blocking, plain TCP), the web UI's pages (control's `web` module).

use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;

use crate::server::io::with_deadline;
use crate::server::shard::Signal;

/// Largest request head (request line and headers): browsers send 1–3 KiB; more is refused
/// with 431 rather than buffered.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;

/// Most headers in one request.
pub const MAX_REQUEST_HEADERS: usize = 48;

/// Largest request body: the web UI posts small JSON forms (a login is under 1 KiB).
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;

/// What the engine needs from a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// Whether the client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// Whether the request announces a body.
    pub has_body: bool,
    /// `Content-Length`, when given and valid.
    pub content_length: Option<usize>,
    /// Whether the body is chunked (not supported: answered 411).
    pub chunked: bool,
    /// Every header, names lower-cased, values as sent (lossy UTF-8), in order.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first header named `name` (lower case).
    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request head was refused (the client's fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Longer than [`MAX_REQUEST_HEAD_BYTES`].
    #[error("request head exceeds {MAX_REQUEST_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// Not HTTP/1.x, more than [`MAX_REQUEST_HEADERS`] headers, or a bad `Content-Length`.
    #[error("malformed request head")]
    Malformed,
    /// A `Content-Length` above [`MAX_REQUEST_BODY_BYTES`].
    #[error("request body exceeds {MAX_REQUEST_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// A chunked request body (not supported).
    #[error("a request body needs a Content-Length")]
    LengthRequired,
}

/// Parses a request head from the front of `buf`: `Ok(None)` until complete, then the head and
/// the bytes it used. The tokenizer is the one the three HTTP servers share
/// ([`jaunt_config::http::parse_request`]); a head over [`MAX_REQUEST_HEAD_BYTES`] is
/// [`HttpError::HeadTooLarge`], anything else it refuses (more than [`MAX_REQUEST_HEADERS`]
/// fields among it) [`HttpError::Malformed`].
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    use jaunt_config::http::{self, HeadError};
    let bounds = http::Bounds {
        head_bytes: MAX_REQUEST_HEAD_BYTES,
        fields: MAX_REQUEST_HEADERS,
    };
    let request = match http::parse_request(buf, bounds) {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(None),
        Err(HeadError::TooLarge { .. }) => return Err(HttpError::HeadTooLarge),
        Err(HeadError::TooManyFields { .. } | HeadError::Malformed(_)) => {
            return Err(HttpError::Malformed)
        }
    };
    let used = request.len;
    let mut keep_alive = request.minor >= 1;
    let mut has_body = false;
    let mut chunked = false;
    let mut headers = Vec::with_capacity(request.fields.len());
    for header in &request.fields {
        headers.push((
            header.name.to_ascii_lowercase(),
            String::from_utf8_lossy(header.value).trim().to_owned(),
        ));
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
            chunked = true;
        }
    }
    // Two different lengths, or one that is not digits: request smuggling bait. The reading is
    // the one all three HTTP servers share.
    let lengths = request
        .fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value);
    let content_length = match jaunt_config::http::content_length(lengths) {
        Ok(None) => None,
        Ok(Some(n)) => Some(usize::try_from(n).map_err(|_| HttpError::Malformed)?),
        Err(_) => return Err(HttpError::Malformed),
    };
    has_body |= content_length.is_some_and(|n| n != 0);
    if has_body && content_length.is_none() && !chunked {
        return Err(HttpError::Malformed);
    }
    Ok(Some((
        RequestHead {
            method: request.method.to_owned(),
            path: request.target.to_owned(),
            keep_alive: keep_alive && !chunked,
            has_body,
            content_length,
            chunked,
            headers,
        },
        used,
    )))
}

/// A complete response with a small in-memory body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// Send `Connection: close` and close after writing.
    pub close: bool,
    /// Other headers (`Set-Cookie`, `Location`, security headers). A name or value with CR,
    /// LF or NUL is not written.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &impl Serialize) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
            close: false,
            headers: Vec::new(),
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, text: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{text}\n").into_bytes(),
            close: false,
            headers: Vec::new(),
        }
    }

    /// The response bytes; `head_only` omits the body (for `HEAD`).
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        use jaunt_config::http::{could_split, HeadWriter};
        let extra: Vec<&(String, String)> = self
            .headers
            .iter()
            .filter(|(name, value)| {
                !name.is_empty() && !could_split(name.as_bytes()) && !could_split(value.as_bytes())
            })
            .collect();
        let mut head = HeadWriter::response(self.status);
        head.field("content-type", self.content_type)
            .field("content-length", self.body.len().to_string());
        if !extra
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("cache-control"))
        {
            head.field("cache-control", "no-store");
        }
        for (name, value) in extra {
            head.field(name, value);
        }
        if self.close {
            head.field("connection", "close");
        }
        head.finish(if head_only { b"" } else { &self.body })
    }
}

/// Body of `GET /webapi/ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PingBody {
    /// Cluster name.
    pub cluster: String,
    /// Engine version.
    pub version: &'static str,
    /// The public address clients use.
    pub public_addr: String,
}

/// Where the cluster's JWK Set is served (RFC 8615 well-known location).
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// The engine's own answer to a web request, or `None` for a path the engine leaves to the
/// web UI's backend (404 without one); `jwks` is the snapshot's JWK Set (JSON).
pub fn web_response(head: &RequestHead, ping: &PingBody, jwks: &str) -> Option<Response> {
    let path = head.path.split('?').next().unwrap_or("");
    Some(match (head.method.as_str(), path) {
        ("GET" | "HEAD", "/webapi/ping") => Response::json(200, ping),
        (_, "/webapi/ping") => Response::text(405, "method not allowed"),
        ("GET" | "HEAD", JWKS_PATH) if !jwks.is_empty() => Response {
            status: 200,
            content_type: "application/json",
            body: jwks.as_bytes().to_vec(),
            close: false,
            headers: Vec::new(),
        },
        (_, JWKS_PATH) if !jwks.is_empty() => Response::text(405, "method not allowed"),
        _ => return None,
    })
}

/// A stream that can take a connection's last response into its own buffer without writing
/// it, so that the response and the end of stream that `close` then adds leave in one write (on
/// TLS: the response record and the close_notify alert in one segment instead of two).
pub trait BufferFinal {
    /// Takes a prefix of `bytes` into the stream's buffer; returns its length (0: none, write
    /// as usual). The caller writes the rest, then closes.
    fn buffer_final(&mut self, _bytes: &[u8]) -> usize {
        0
    }

    /// What is written from now on is the connection's last, and the close follows.
    fn closing(&mut self) {}
}

/// The transport under a TLS stream, told by [`BufferFinal::closing`] that the connection's last
/// bytes (the closing response and close_notify) come next and then its close, so that it can
/// send them with the end of stream in one segment.
pub trait FinalSend {
    fn final_send(&mut self) {}
}

/// Most bytes [`BufferFinal`] hands to rustls at once (far below rustls' own buffer limit).
const BUFFER_FINAL_BYTES: usize = 4 * 1024;

impl<S: FinalSend> BufferFinal for futures_rustls::server::TlsStream<S> {
    fn buffer_final(&mut self, bytes: &[u8]) -> usize {
        let session = self.get_mut().1;
        // Only behind nothing unwritten (the flight, tickets and earlier responses are out) and
        // on an established session, so the bytes are encrypted into records right away.
        if bytes.len() > BUFFER_FINAL_BYTES || session.is_handshaking() || session.wants_write() {
            return 0;
        }
        std::io::Write::write(&mut session.writer(), bytes).unwrap_or(0)
    }

    fn closing(&mut self) {
        self.get_mut().0.final_send();
    }
}

/// How a [`serve`] loop ended.
#[derive(Debug)]
pub enum ServeEnd {
    /// The client closed, asked to close, or the server was draining.
    Closed,
    /// No request within the idle timeout.
    Idle,
    /// The request head was refused (an error response was sent).
    BadRequest(HttpError),
    /// Reading or writing failed.
    Io(std::io::Error),
    /// A WebSocket upgrade of the web terminal ([`is_terminal_upgrade`]): nothing was answered;
    /// the caller takes the stream over. The bytes are what the client sent after the head.
    Upgrade(RequestHead, Vec<u8>),
}

/// Where the web terminal's WebSocket lives: `/webapi/terminal/<node>/<login>`.
pub const TERMINAL_WS_PREFIX: &str = "/webapi/terminal/";

/// Where an observer's WebSocket lives (`/web/sessions/<id>/join`): `/webapi/join/<id>`.
pub const JOIN_WS_PREFIX: &str = "/webapi/join/";

/// Whether `head` asks to upgrade to the web terminal's WebSocket (or an observer's): a `GET`
/// under [`TERMINAL_WS_PREFIX`] or [`JOIN_WS_PREFIX`] with `Upgrade: websocket`.
pub fn is_terminal_upgrade(head: &RequestHead) -> bool {
    head.method == "GET"
        && (head.path.starts_with(TERMINAL_WS_PREFIX) || head.path.starts_with(JOIN_WS_PREFIX))
        && head.headers.iter().any(|(n, v)| {
            n == "upgrade"
                && v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
}

/// Serves requests on `stream` with `respond` until the client closes, `idle` passes without a
/// request, a head or body is refused, or the shard drains (`draining` fired: the response in
/// progress is finished with `connection: close`, and a connection waiting for its next request
/// is closed at once). The first request must arrive before `first_deadline`; a body must
/// arrive within `idle` of its head.
pub async fn serve<S, F, Fut>(
    stream: &mut S,
    first_deadline: Instant,
    idle: Duration,
    draining: &Signal,
    respond: F,
) -> ServeEnd
where
    S: AsyncRead + AsyncWrite + Unpin + BufferFinal,
    F: Fn(RequestHead, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let mut buf = Vec::with_capacity(1024);
    let mut deadline = first_deadline;
    loop {
        let between_requests = buf.is_empty();
        let next = futures_lite::future::or(
            with_deadline(deadline, read_head(stream, &mut buf)),
            async {
                if between_requests {
                    draining.wait().await;
                    Ok(Ok(None))
                } else {
                    std::future::pending().await
                }
            },
        );
        let refuse = |status: u16, text: &str| {
            let mut response = Response::text(status, text);
            response.close = true;
            response.encode(false)
        };
        let head = match next.await {
            Err(_) => return ServeEnd::Idle,
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return ServeEnd::Closed,
            Ok(Err(ReadError::Http(e))) => {
                let status = match e {
                    HttpError::HeadTooLarge => 431,
                    HttpError::Malformed => 400,
                    HttpError::BodyTooLarge => 413,
                    HttpError::LengthRequired => 411,
                };
                let _ = stream.write_all(&refuse(status, &e.to_string())).await;
                let _ = stream.close().await;
                return ServeEnd::BadRequest(e);
            }
            Ok(Err(ReadError::Io(e))) => return ServeEnd::Io(e),
        };
        if is_terminal_upgrade(&head) && !head.has_body {
            return ServeEnd::Upgrade(head, std::mem::take(&mut buf));
        }
        let refused = if head.chunked {
            Some(HttpError::LengthRequired)
        } else if head.content_length.unwrap_or(0) > MAX_REQUEST_BODY_BYTES {
            Some(HttpError::BodyTooLarge)
        } else {
            None
        };
        if let Some(e) = refused {
            let status = if head.chunked { 411 } else { 413 };
            let _ = stream.write_all(&refuse(status, &e.to_string())).await;
            let _ = stream.close().await;
            return ServeEnd::BadRequest(e);
        }
        let body_deadline = Instant::now() + idle;
        let body = match with_deadline(
            body_deadline,
            read_body(stream, &mut buf, head.content_length.unwrap_or(0)),
        )
        .await
        {
            Err(_) => return ServeEnd::Idle,
            Ok(Err(e)) => return ServeEnd::Io(e),
            Ok(Ok(body)) => body,
        };
        let head_only = head.method == "HEAD";
        let keep_alive = head.keep_alive;
        let mut response = respond(head, body).await;
        response.close |= !keep_alive || draining.is_fired();
        let bytes = response.encode(head_only);
        if response.close {
            // The last response: buffered where the stream allows, it leaves in one write with
            // the end of stream that `close` adds, and in one TCP segment with the FIN.
            stream.closing();
            let taken = stream.buffer_final(&bytes);
            if let Err(e) = stream.write_all(&bytes[taken..]).await {
                return ServeEnd::Io(e);
            }
            if taken == 0 {
                if let Err(e) = stream.flush().await {
                    return ServeEnd::Io(e);
                }
                let _ = stream.close().await;
            } else if let Err(e) = stream.close().await {
                return ServeEnd::Io(e);
            }
            return ServeEnd::Closed;
        }
        if let Err(e) = stream.write_all(&bytes).await {
            return ServeEnd::Io(e);
        }
        if let Err(e) = stream.flush().await {
            return ServeEnd::Io(e);
        }
        deadline = Instant::now() + idle;
    }
}

/// Takes a body of `len` bytes: what `buf` already holds after the head, then reads for the
/// rest. Bytes after the body (a pipelined request) stay in `buf`.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    debug_assert!(len <= MAX_REQUEST_BODY_BYTES);
    let have = buf.len().min(len);
    let mut body: Vec<u8> = buf.drain(..have).collect();
    if body.len() < len {
        let start = body.len();
        body.resize(len, 0);
        stream.read_exact(&mut body[start..]).await?;
    }
    Ok(body)
}

enum ReadError {
    Http(HttpError),
    Io(std::io::Error),
}

/// Reads until one request head is complete; keeps bytes after it (pipelining) in `buf`.
/// `Ok(None)` on a clean EOF before any byte of a request.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<RequestHead>, ReadError> {
    let mut chunk = [0u8; 2048];
    loop {
        if !buf.is_empty() {
            match parse_head(buf) {
                Ok(Some((head, used))) => {
                    buf.drain(..used);
                    return Ok(Some(head));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Http(e)),
            }
        }
        let room = MAX_REQUEST_HEAD_BYTES
            .saturating_sub(buf.len())
            .min(chunk.len());
        if room == 0 {
            return Err(ReadError::Http(HttpError::HeadTooLarge));
        }
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Http(HttpError::Malformed))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping() -> PingBody {
        PingBody {
            cluster: "c".into(),
            version: "0.1.0",
            public_addr: "jaunt.test:3080".into(),
        }
    }

    #[test]
    fn parses_heads_incrementally() {
        let req = b"GET /webapi/ping HTTP/1.1\r\nHost: x\r\n\r\nGET /next";
        for cut in 0..38 {
            assert_eq!(parse_head(&req[..cut]), Ok(None), "cut {cut}");
        }
        let (head, used) = parse_head(req)
            .ok()
            .flatten()
            .unwrap_or_else(|| unreachable!());
        assert_eq!(used, 38);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/webapi/ping");
        assert!(head.keep_alive);
        assert!(!head.has_body);
    }

    #[test]
    fn connection_semantics() {
        let close = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(close.map(|h| h.map(|h| h.0.keep_alive)), Ok(Some(false)));
        let old = parse_head(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(old.map(|h| h.map(|h| h.0.keep_alive)), Ok(Some(false)));
        let body = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(
            body.map(|h| h.map(|h| (h.0.has_body, h.0.keep_alive, h.0.content_length))),
            Ok(Some((true, true, Some(5))))
        );
        let chunked = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            chunked.map(|h| h.map(|h| (h.0.chunked, h.0.keep_alive))),
            Ok(Some((true, false)))
        );
        // Conflicting or non-numeric lengths are refused (request smuggling).
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        // A sign is refused here as by control and the agent (one shared reading); agreeing
        // list elements are one length.
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"),
            Err(HttpError::Malformed)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello")
                .map(|h| h.map(|h| h.0.content_length)),
            Ok(Some(Some(5)))
        );
        let cookie = parse_head(b"GET / HTTP/1.1\r\nCookie: a=b\r\n\r\n");
        assert_eq!(
            cookie.map(|h| h.map(|h| h.0.header("cookie").map(str::to_owned))),
            Ok(Some(Some("a=b".to_owned())))
        );
    }

    #[test]
    fn refuses_garbage_and_oversized_heads() {
        assert_eq!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST_HEAD_BYTES, b'a');
        assert_eq!(parse_head(&big), Err(HttpError::HeadTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_REQUEST_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(HttpError::Malformed));
    }

    #[test]
    fn web_routes() {
        let head = |method: &str, path: &str| RequestHead {
            method: method.into(),
            path: path.into(),
            keep_alive: true,
            has_body: false,
            content_length: None,
            chunked: false,
            headers: Vec::new(),
        };
        let web_response = |head: &RequestHead, ping: &PingBody, jwks: &str| {
            web_response(head, ping, jwks).unwrap_or_else(|| Response::text(404, "backend"))
        };
        let ok = web_response(&head("GET", "/webapi/ping?x=1"), &ping(), "");
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.body,
            b"{\"cluster\":\"c\",\"version\":\"0.1.0\",\"public_addr\":\"jaunt.test:3080\"}\n"
        );
        assert_eq!(
            web_response(&head("POST", "/webapi/ping"), &ping(), "").status,
            405
        );
        assert_eq!(web_response(&head("GET", "/"), &ping(), "").status, 404);
        // The JWK Set, once control has sent one.
        assert_eq!(
            web_response(&head("GET", JWKS_PATH), &ping(), "").status,
            404
        );
        let jwks = web_response(&head("GET", JWKS_PATH), &ping(), "{\"keys\":[]}");
        assert_eq!((jwks.status, jwks.content_type), (200, "application/json"));
        assert_eq!(jwks.body, b"{\"keys\":[]}");
        assert_eq!(
            web_response(&head("POST", JWKS_PATH), &ping(), "{}").status,
            405
        );
        assert_eq!(
            web_response(&head("GET", "/webapi/pingx"), &ping(), "").status,
            404
        );
    }

    #[test]
    fn response_encoding() {
        let mut response = Response::text(404, "not found");
        response.close = true;
        let text = String::from_utf8(response.encode(false)).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("content-length: 10\r\n"));
        assert!(text.contains("connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nnot found\n"));
        let head_only = String::from_utf8(response.encode(true)).unwrap_or_default();
        assert!(head_only.ends_with("\r\n\r\n"));
        // Extra headers are written unless they could split the response.
        response.headers = vec![
            ("set-cookie".into(), "a=b".into()),
            ("x-evil".into(), "a\r\nset-cookie: c=d".into()),
            ("cache-control".into(), "max-age=60".into()),
        ];
        let text = String::from_utf8(response.encode(true)).unwrap_or_default();
        assert!(text.contains("\r\nset-cookie: a=b\r\n"));
        assert!(!text.contains("c=d"));
        assert!(!text.contains("no-store"));
        assert!(text.contains("cache-control: max-age=60\r\n"));
    }
}
