//! The web terminal's WebSocket (`GET /webapi/terminal/<node>/<login>` with `Upgrade:
//! websocket`, on the public host's web route): the page's xterm.js talks to it, and the engine
//! connects it to the node as an SSH session of the web session's user.
//!
//! 1. The upgrade request is checked: same origin (`Origin` is `https://` + `Host`, and `Host`
//!    names the public host, so neither another site nor an app host can open it), WebSocket
//!    version 13 and a key; anything else is answered with an HTTP error and closed.
//! 2. `101 Switching Protocols`; from here on tungstenite frames the messages (server role,
//!    messages bounded by [`MAX_TERM_MESSAGE_BYTES`]), driven over two in-memory buffers by
//!    [`WsStream`]: glommio's TLS stream fills the input buffer and drains the output buffer,
//!    so tungstenite never blocks and needs no runtime.
//! 3. The FIRST message authenticates: a text [`TermAuth`] with the one-time ticket the page got
//!    from `POST /webapi/terminal/<node>/<login>/ticket` (CSRF-protected, web session).
//!    [`WebBackend::terminal_access`](crate::server::WebBackend::terminal_access) redeems it
//!    (with the upgrade request's session cookie, which must be the ticket's session) into the
//!    identity and a user certificate control made for it. No token is ever in the URL.
//! 4. The dial is an SSH dial of that identity to that node and login, through [`connect`]: the
//!    engine's authorization, the audit events, the live session registry (`jaunt sessions ls`,
//!    `jaunt sessions kill`, locks), the stream to the agent — all as for `jaunt ssh`. The
//!    stream's header is marked [`terminal`](jaunt_config::wire::dial::StreamHeader::terminal):
//!    the agent logs in to sshd itself, records, and exchanges terminal frames with us.
//! 5. Browser messages are checked ([`TermInput::parse`]) and framed for the agent; the
//!    agent's bytes go back as binary messages.
//!
//! An observer's page (`/web/sessions/<id>/join`) opens `GET /webapi/join/<id>` the same way
//! (ticket from `POST /webapi/sessions/<id>/join/ticket`); its grant names the watched session,
//! and the dial is `jaunt join`'s (role rule `session`/`join`, audited `session.join`, a live
//! session of its own). Its checked input is dropped here: nothing it types leaves the engine. A bad message (unknown type, a bad size, text
//!    after the ticket, a protocol error) ends this connection only, with a `refused` notice
//!    and a close frame.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use jaunt_config::wire::dial::{DialKind, DialRequest};
use jaunt_config::wire::term::{TermAuth, TermInput, TermNotice, MAX_TERM_MESSAGE_BYTES};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::session::{connect, Answer, EndNotice, UserStream};
use super::{write_and_close, ConnError, Ctx, End, Tls};
use crate::server::http::{RequestHead, Response};
use crate::server::io::with_deadline;
use crate::server::metrics::Refusal;
use crate::server::web::{WebRequest, WebUi};

/// How long the page has to send its ticket after the upgrade.
const TICKET_TIMEOUT: Duration = Duration::from_secs(15);

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Output queued for the browser beyond which writes wait (backpressure towards the agent).
const MAX_QUEUED_OUTPUT: usize = 256 * 1024;

/// The GUID of RFC 6455 §1.3 for `Sec-WebSocket-Accept`.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Serves one upgrade request of the web terminal (see the module doc). `early` holds bytes the
/// client sent after the request head.
pub(super) async fn serve(
    ctx: &Ctx<'_>,
    mut stream: Tls,
    head: RequestHead,
    early: Vec<u8>,
    backend: Option<WebUi>,
) -> End {
    let shard = ctx.shard;
    let Some(backend) = backend else {
        return http_refuse(&mut stream, 404, "not found").await;
    };
    let accept = match check_upgrade(&head, &shard.config.public_host) {
        Ok(accept) => accept,
        Err((status, why)) => {
            tracing::info!(shard = shard.index, peer = %ctx.peer, why, "web terminal upgrade refused");
            return http_refuse(&mut stream, status, why).await;
        }
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    );
    let written = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await
    };
    if let Err(e) = written.await {
        return End::Failed(ConnError::Client(e));
    }
    let mut ws = WsStream::new(stream, early);

    // The first message: the ticket.
    let first = with_deadline(Instant::now() + TICKET_TIMEOUT, ws.next_message()).await;
    let ticket = match first {
        Err(_) => {
            return ws
                .refuse_with("bad_ticket", "no ticket within 15 s: reload the page")
                .await
        }
        Ok(Err(e)) => return End::Failed(ConnError::Client(e)),
        Ok(Ok(None)) => return End::Done,
        Ok(Ok(Some(Message::Text(text)))) => match serde_json::from_str::<TermAuth>(&text) {
            Ok(auth) if auth.ticket.len() <= 256 => auth.ticket,
            _ => {
                return ws
                    .refuse_with("bad_message", "the first message must be {\"ticket\": ...}")
                    .await
            }
        },
        Ok(Ok(Some(_))) => {
            return ws
                .refuse_with(
                    "bad_message",
                    "the first message must be the ticket, as text",
                )
                .await
        }
    };
    let request = WebRequest {
        method: head.method.clone(),
        path: head.path.clone(),
        headers: head.headers.clone(),
        body: Vec::new(),
        peer: ctx.peer.parse().ok(),
    };
    let granted = glommio::executor()
        .spawn_blocking(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                backend.0.terminal_access(&request, &ticket)
            }))
            .unwrap_or_else(|_| Err("internal error".to_owned()))
        })
        .await;
    let grant = match granted {
        Ok(grant) => grant,
        Err(why) => {
            tracing::info!(shard = shard.index, peer = %ctx.peer, why, "web terminal ticket refused");
            return ws.refuse_with("bad_ticket", &why).await;
        }
    };
    // An observer (`/webapi/join/<id>`) reads only: what its page sends goes nowhere.
    ws.read_only = grant.join.is_some();
    let dial = DialRequest {
        kind: DialKind::Ssh,
        target: grant.node,
        login: Some(grant.login),
        db_user: None,
        db_name: None,
        join: grant.join,
    };
    if let Err(e) = dial.validate() {
        return ws
            .refuse_user(
                Answer::Terminal,
                Refusal::BadDialRequest,
                &format!("bad terminal request: {e}"),
            )
            .await;
    }
    connect(
        ctx,
        ws,
        grant.identity,
        dial,
        Vec::new(),
        Answer::Terminal,
        Some(grant.cert_der),
    )
    .await
}

/// Answers an HTTP error and closes.
async fn http_refuse(stream: &mut Tls, status: u16, why: &str) -> End {
    let mut response = Response::text(status, why);
    response.close = true;
    write_and_close(stream, &response.encode(false)).await;
    End::Refused(Refusal::BadHttpRequest)
}

/// Checks an upgrade request; the `Sec-WebSocket-Accept` value, or the status and why not.
fn check_upgrade(head: &RequestHead, public_host: &str) -> Result<String, (u16, &'static str)> {
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let host = header("host").unwrap_or("");
    let name = |h: &str| {
        h.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h, |(name, _)| name)
            .to_ascii_lowercase()
    };
    if host.is_empty() || name(host) != name(public_host) {
        return Err((403, "the web terminal is served on the public host only"));
    }
    let origin = header("origin").unwrap_or("");
    if !origin.eq_ignore_ascii_case(&format!("https://{host}")) {
        return Err((403, "cross-origin WebSocket refused"));
    }
    let upgrade_token = header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade_token || header("sec-websocket-version") != Some("13") {
        return Err((
            400,
            "a WebSocket upgrade needs Connection: Upgrade and version 13",
        ));
    }
    let key = header("sec-websocket-key").unwrap_or("");
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if !decoded.is_ok_and(|k| k.len() == 16) {
        return Err((400, "bad Sec-WebSocket-Key"));
    }
    Ok(accept_key(key))
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2).
fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// The two in-memory buffers tungstenite reads from and writes to: reads that would need
/// bytes not yet received answer `WouldBlock`; writes always succeed (bounded by the caller).
#[derive(Default)]
struct Buffers {
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
}

impl Read for Buffers {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.input[self.at..];
        if left.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.at += n;
        if self.at == self.input.len() {
            self.input.clear();
            self.at = 0;
        }
        Ok(n)
    }
}

impl Write for Buffers {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The web terminal's WebSocket as a byte stream for [`connect`]'s splice: reading gives the
/// browser's checked messages as tunnel frames, writing sends binary messages.
pub(super) struct WsStream {
    inner: Tls,
    ws: WebSocket<Buffers>,
    /// A frame for the agent not yet read, and how far it was.
    frame: Vec<u8>,
    frame_at: usize,
    /// The browser closed (or the socket ended).
    eof: bool,
    /// An observer's page: its checked input is dropped here, never framed for the agent.
    read_only: bool,
    /// Why the session was ended (a kill, a lock), once it was: sent as the close frame's
    /// reason, after which reads end and output is dropped.
    end_notice: EndNotice,
    /// That close frame is queued.
    ended: bool,
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl WsStream {
    fn new(inner: Tls, early: Vec<u8>) -> WsStream {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_TERM_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_TERM_MESSAGE_BYTES));
        let buffers = Buffers {
            input: early,
            ..Buffers::default()
        };
        WsStream {
            inner,
            ws: WebSocket::from_raw_socket(buffers, Role::Server, Some(config)),
            frame: Vec::new(),
            frame_at: 0,
            eof: false,
            read_only: false,
            end_notice: EndNotice::default(),
            ended: false,
        }
    }

    /// Writes what tungstenite queued to the socket; `Ready` once all of it is out.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.ws.flush();
        let mut wrote = false;
        loop {
            let out = &self.ws.get_ref().output;
            if out.is_empty() {
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.ws.get_mut().output.drain(..n);
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if wrote {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Poll::Ready(Ok(()))
    }

    /// The next data message (`None` once the browser closed), answering pings on the way.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Message>>> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            if self.eof {
                return Poll::Ready(Ok(None));
            }
            match self.ws.read() {
                Ok(Message::Close(_)) => {
                    // tungstenite queued the answering close frame.
                    let _ = self.poll_output(cx);
                    self.eof = true;
                }
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => return Poll::Ready(Ok(Some(m))),
                Ok(_) => {
                    // A ping's pong is queued.
                    if let Poll::Ready(Err(e)) = self.poll_output(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) if would_block(&e) => {
                    if let Poll::Ready(Err(e)) = self.poll_output(cx) {
                        return Poll::Ready(Err(e));
                    }
                    match Pin::new(&mut self.inner).poll_read(cx, &mut chunk) {
                        Poll::Ready(Ok(0)) => self.eof = true,
                        Poll::Ready(Ok(n)) => {
                            self.ws.get_mut().input.extend_from_slice(&chunk[..n])
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    self.eof = true
                }
                Err(e) => {
                    let why = format!("bad WebSocket data: {e}");
                    self.queue_refusal("bad_message", &why);
                    let _ = self.poll_output(cx);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
                }
            }
        }
    }

    async fn next_message(&mut self) -> io::Result<Option<Message>> {
        futures_lite::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// Queues a `refused` notice and a close frame.
    fn queue_refusal(&mut self, reason: &str, message: &str) {
        let notice = TermNotice::Refused {
            reason: reason.to_owned(),
            message: message.to_owned(),
        };
        let text = serde_json::to_string(&notice).unwrap_or_default();
        let _ = self.ws.write(Message::text(text));
        let close = CloseFrame {
            code: CloseCode::Policy,
            reason: reason.into(),
        };
        let _ = self.ws.close(Some(close));
    }

    /// Sends a refusal, closes, and ends the connection as refused.
    async fn refuse_with(&mut self, reason: &str, message: &str) -> End {
        self.queue_refusal(reason, message);
        let deadline = Instant::now() + Duration::from_secs(2);
        let _ = with_deadline(deadline, async {
            futures_lite::future::poll_fn(|cx| self.poll_output(cx)).await?;
            self.inner.close().await
        })
        .await;
        End::Refused(Refusal::BadHttpRequest)
    }
}

impl UserStream for WsStream {
    fn client_cert(&self) -> Option<Vec<u8>> {
        None
    }

    async fn refuse_user(&mut self, _answer: Answer, refusal: Refusal, message: &str) -> End {
        let _ = self.refuse_with(refusal.as_str(), message).await;
        End::Refused(refusal)
    }

    fn end_notice(&self) -> Option<EndNotice> {
        Some(self.end_notice.clone())
    }

    async fn connected(&mut self, _answer: Answer, session_id: &str) -> io::Result<()> {
        let notice = TermNotice::Ready {
            session_id: session_id.to_owned(),
        };
        let text = serde_json::to_string(&notice).unwrap_or_default();
        let _ = self.ws.write(Message::text(text));
        futures_lite::future::poll_fn(|cx| self.poll_output(cx)).await
    }
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.ended {
            let why = this.end_notice.borrow_mut().take();
            if let Some(why) = why {
                // Ended from outside: the page learns why from the close frame.
                this.ended = true;
                let _ = this.ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: close_reason(&why).into(),
                }));
                if let Poll::Ready(Err(e)) = this.poll_output(cx) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        if this.ended {
            return Poll::Ready(Ok(0));
        }
        loop {
            if this.frame_at < this.frame.len() {
                let n = (this.frame.len() - this.frame_at).min(buf.len());
                buf[..n].copy_from_slice(&this.frame[this.frame_at..this.frame_at + n]);
                this.frame_at += n;
                return Poll::Ready(Ok(n));
            }
            let message = match this.poll_message(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(Some(m))) => m,
            };
            let refused = match &message {
                Message::Binary(bytes) => match TermInput::parse(bytes) {
                    Ok(_) if this.read_only => continue,
                    Ok(input) => {
                        this.frame = input.frame();
                        this.frame_at = 0;
                        continue;
                    }
                    Err(e) => e.to_string(),
                },
                _ => "only binary messages may follow the ticket".to_owned(),
            };
            this.queue_refusal("bad_message", &refused);
            let _ = this.poll_output(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused)));
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.ended {
            // The close frame is queued: nothing may follow it.
            return Poll::Ready(Ok(buf.len()));
        }
        if this.ws.get_ref().output.len() >= MAX_QUEUED_OUTPUT {
            match this.poll_output(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.len().min(MAX_TERM_MESSAGE_BYTES);
        if let Err(e) = this.ws.write(Message::binary(buf[..n].to_vec())) {
            return Poll::Ready(Err(io::Error::other(e.to_string())));
        }
        if let Poll::Ready(Err(e)) = this.poll_output(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_output(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ws.can_write() {
            // No reason: the session ended by itself (the shell, sshd, the watched session).
            let _ = this.ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }));
        }
        match this.poll_output(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}

/// `why` cut to what a close frame's reason may hold (123 bytes), on a character boundary.
fn close_reason(why: &str) -> &str {
    let mut end = why.len().min(123);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    &why[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(close_reason("ended by alice"), "ended by alice");
        let long = "é".repeat(100);
        assert_eq!(close_reason(&long).len(), 122);
    }

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            path: "/webapi/terminal/node1/root".into(),
            keep_alive: true,
            has_body: false,
            content_length: None,
            chunked: false,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn accept_key_is_rfc6455s() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrades_must_be_same_origin_on_the_public_host() {
        let good = [
            ("host", "jaunt.test:3080"),
            ("origin", "https://jaunt.test:3080"),
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(crate::server::http::is_terminal_upgrade(&head(&good)));
        let mut join = head(&good);
        join.path = "/webapi/join/18f-0-7".into();
        assert!(crate::server::http::is_terminal_upgrade(&join));
        join.path = "/webapi/sessions".into();
        assert!(!crate::server::http::is_terminal_upgrade(&join));
        assert_eq!(
            check_upgrade(&head(&good), "jaunt.test:3080"),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_owned())
        );
        let with = |name: &str, value: &str| {
            let mut h: Vec<(&str, &str)> =
                good.iter().filter(|(n, _)| *n != name).copied().collect();
            h.push((name, value));
            check_upgrade(&head(&h), "jaunt.test").map_err(|e| e.0)
        };
        assert_eq!(with("origin", "https://evil.example"), Err(403));
        assert_eq!(with("origin", "http://jaunt.test:3080"), Err(403));
        assert_eq!(with("origin", ""), Err(403));
        assert_eq!(with("host", "grafana.jaunt.test:3080"), Err(403));
        assert_eq!(with("sec-websocket-version", "8"), Err(400));
        assert_eq!(with("sec-websocket-key", "short"), Err(400));
        assert_eq!(with("connection", "keep-alive"), Err(400));
    }
}
