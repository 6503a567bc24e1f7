//! The web terminal at the agent (`/web/terminal/<node>/<login>`): a stream whose header is
//! marked [`terminal`](jaunt_config::wire::dial::StreamHeader::terminal) carries terminal frames
//! ([`jaunt_config::wire::term`]) from the browser, through the engine, instead of a user's SSH.
//! The agent is the only SSH party on the user's side: it logs in to sshd as for a recorded
//! `jaunt ssh` (a short-lived login certificate for this session, sshd's host certificate
//! checked), opens one session channel with a PTY of the browser's size and a shell, and
//! bridges: input frames → channel data, resize frames → `window-change`, channel output →
//! the stream. The channel is recorded as a `shell` recording when the roles record sessions
//! (the same [`RecordingPolicy`] as SSH), and observers of `jaunt join` see its output.
//!
//! The stream was authorized by `serve.rs` before this runs (the agent's own check of the
//! forwarded certificate, as for SSH), and a lock or `jaunt sessions kill` ends it the same way.
//! A malformed frame ends this stream only.
//!
//! sunset's own channel layer is used here (no relay mode): its 1000-byte window and packets
//! are plenty for a terminal's keystrokes and screens. A key re-exchange sshd starts
//! (`RekeyLimit`) checks sshd's host certificate again, as the recorded relay does.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use jaunt_config::wire::dial::StreamHeader;
use jaunt_config::wire::term::{split_term_frame, TermInput, MAX_TERM_MESSAGE_BYTES};
use jaunt_engine::tunnel::Incoming;
use sunset::{ChanData, ChanHandle, CliEvent, CliSessionExit, Event, Runner};

use super::{node_handshake, Fail, Link, Terminate, HANDSHAKE_TIMEOUT};
use crate::error::{describe_io, Blame};
use crate::net;
use crate::recording::{CastRecorder, RecordingEnd, RecordingKind, RecordingMeta, RecordingMode};
use crate::serve::LocalTarget;
use crate::settings::Prepared;

/// How long the browser has to send its first frame (its size) once the stream is accepted;
/// without one the terminal starts at 80x24.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The terminal type sshd is told.
const TERM: &str = "xterm-256color";

/// Serves one web terminal stream (see the module doc).
pub(crate) async fn serve_terminal(
    incoming: Incoming,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
    term: Terminate,
) {
    let state = &prepared.ssh;
    let Some(rec) = state.rec.clone() else {
        incoming.refuse(
            "this agent cannot serve the web terminal: it does not terminate SSH sessions \
             (`jaunt agent` does)",
        );
        return;
    };
    let login = header.login.clone().unwrap_or_default();
    let node_login = match state
        .login_cert(&login, term.client_cert.clone(), header.session_id.clone())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(reason = e.label(), error = %e, "web terminal refused");
            incoming.refuse(&format!(
                "the agent cannot log in to {} as {login}: {e}",
                local.what
            ));
            return;
        }
    };
    let tcp = match crate::serve::connect_local(&local, &prepared, "node_unreachable").await {
        Ok(tcp) => tcp,
        Err(message) => {
            incoming.refuse(&message);
            return;
        }
    };
    // sunset's channel layer, not relay mode: the agent is the client.
    let mut node = Link {
        io: tcp,
        runner: Runner::new_client_owned(),
        buf: Vec::new(),
        pos: 0,
        len: 0,
        eof: false,
    };
    if let Err(e) = node.runner.offer_host_certificate() {
        incoming.refuse(&format!("the agent's SSH client: {e}"));
        return;
    }
    let (key, cert) = &*node_login;
    let handshake = node_handshake(
        &mut node,
        &login,
        key,
        cert,
        &prepared.name,
        term.policy.ssh_host_cas(),
    );
    match net::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            tracing::warn!(blame = %Blame::LocalService, reason = e.label(), error = %e, "web terminal refused");
            incoming.refuse(&format!("cannot log in to {}: {e}", local.what));
            return;
        }
        None => {
            let e = Fail::Timeout("logging in to sshd");
            tracing::warn!(blame = %Blame::LocalService, reason = e.label(), error = %e, "web terminal refused");
            incoming.refuse(&e.to_string());
            return;
        }
    }
    let mut stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return;
        }
    };
    let mut bridge = Bridge {
        input: Vec::new(),
        pending_in: Vec::new(),
        output: Vec::new(),
        output_at: 0,
        cols: 80,
        rows: 24,
        opened: false,
        exit_status: None,
        user_eof: false,
        recorder: None,
        bytes_in: 0,
        bytes_out: 0,
        tap: None,
    };
    // The first frame is normally the terminal's size: the PTY starts at it.
    let first = net::timeout(
        FIRST_FRAME_TIMEOUT,
        futures_lite::future::poll_fn(|cx| bridge.poll_first_frame(cx, &mut stream)),
    )
    .await;
    if let Some(Err(e)) = first {
        tracing::info!(blame = "user", reason = e.label(), error = %e, "web terminal ended");
        return;
    }
    let chan = match node.runner.open_client_session() {
        Ok(chan) => chan,
        Err(e) => {
            tracing::warn!(reason = "protocol", error = %e, "web terminal: cannot open a session");
            return;
        }
    };
    let session_id = header.session_id.clone().unwrap_or_default();
    if term.recording.records() {
        let meta = RecordingMeta {
            session_id: session_id.clone(),
            user: header.user.clone(),
            login: login.clone(),
            node: prepared.name.clone(),
            kind: RecordingKind::Shell,
            width: bridge.cols,
            height: bridge.rows,
            command: None,
            started: jaunt_config::identity::unix_now(),
            record_input: term.recording.record_input,
        };
        match rec.spool.start(meta) {
            Ok(recorder) => bridge.recorder = Some(recorder),
            Err(e) if term.recording.mode == RecordingMode::Strict => {
                tracing::warn!(reason = "recording", error = %e, "web terminal ended (strict recording)");
                return;
            }
            Err(e) => {
                tracing::warn!(reason = "unrecorded", error = %e, "web terminal goes on unrecorded");
            }
        }
    }
    let registered = (!session_id.is_empty()).then(|| rec.live.register(&session_id));
    bridge.tap = registered.as_ref().map(|r| r.live.clone());
    tracing::info!(login = %login, recording = ?term.recording.mode, local = %local.addr,
        "web terminal open");
    let host = (prepared.name.as_str(), term.policy.ssh_host_cas());
    let ended = futures_lite::future::poll_fn(|cx| {
        bridge.poll_run(cx, &mut node, &chan, &mut stream, host)
    })
    .await;
    drop(registered);
    let recording = bridge.recorder.take().map(|recorder| {
        recorder.finish(RecordingEnd {
            exit_status: bridge.exit_status,
            bytes_in: bridge.bytes_in,
            bytes_out: bridge.bytes_out,
        })
    });
    let recording = match recording {
        Some(Ok(id)) => id.as_str().to_owned(),
        Some(Err(e)) => format!("failed: {e}"),
        None => String::new(),
    };
    node.drain_and_close().await;
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
    match ended {
        Ok(why) => tracing::info!(why, recording, "web terminal closed"),
        Err(e) => {
            tracing::info!(reason = e.label(), error = %e, recording, "web terminal ended with an error")
        }
    }
}

/// The state of one bridged terminal.
struct Bridge {
    /// Bytes from the stream not yet parsed into frames.
    input: Vec<u8>,
    /// Input for sshd not yet taken by the channel (its window).
    pending_in: Vec<u8>,
    /// Output for the stream not yet written.
    output: Vec<u8>,
    output_at: usize,
    cols: u16,
    rows: u16,
    /// The session channel is open (PTY and shell requested).
    opened: bool,
    exit_status: Option<i32>,
    user_eof: bool,
    recorder: Option<CastRecorder>,
    bytes_in: u64,
    bytes_out: u64,
    tap: Option<std::sync::Arc<super::watch::Live>>,
}

impl Bridge {
    /// Reads from the stream into `input`: `Ready(true)` if bytes came, `Ready(false)` at EOF.
    fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
    ) -> Poll<Result<bool, Fail>> {
        let mut chunk = [0u8; 4096];
        match Pin::new(stream).poll_read(cx, &mut chunk) {
            Poll::Ready(Ok(0)) => {
                self.user_eof = true;
                Poll::Ready(Ok(false))
            }
            Poll::Ready(Ok(n)) => {
                self.input.extend_from_slice(&chunk[..n]);
                if self.input.len() > 4 * MAX_TERM_MESSAGE_BYTES {
                    return Poll::Ready(Err(Fail::Protocol(
                        "malformed_packet",
                        "the engine sent more terminal input than it may queue".into(),
                    )));
                }
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(Fail::Io(describe_io(&e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits for the first frame: a resize sets the PTY size; input is kept for the shell.
    fn poll_first_frame<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
    ) -> Poll<Result<(), Fail>> {
        loop {
            match split_term_frame(&self.input) {
                Err(e) => {
                    return Poll::Ready(Err(Fail::Protocol(
                        "malformed_packet",
                        format!("terminal frame: {e}"),
                    )))
                }
                Ok(Some((frame, used))) => {
                    match frame {
                        TermInput::Resize { cols, rows } => {
                            self.cols = cols;
                            self.rows = rows;
                        }
                        TermInput::Input(bytes) => self.pending_in.extend_from_slice(bytes),
                    }
                    self.input.drain(..used);
                    return Poll::Ready(Ok(()));
                }
                Ok(None) => {}
            }
            match self.poll_fill(cx, stream) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Runs the bridge until either side ends: `Ok(why)` for a normal end.
    fn poll_run<N, S>(
        &mut self,
        cx: &mut Context<'_>,
        node: &mut Link<N, sunset::Client>,
        chan: &ChanHandle,
        stream: &mut S,
        (node_name, host_cas): (&str, &[ssh_key::Fingerprint]),
    ) -> Poll<Result<&'static str, Fail>>
    where
        N: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let mut moved = false;
            // sshd's side: events.
            loop {
                let event = node.runner.progress().map_err(super::protocol);
                match event {
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(Event::Cli(CliEvent::SessionOpened(mut opener))) => {
                        let pty = pty(self.cols, self.rows);
                        let requested = pty
                            .and_then(|p| opener.pty(p))
                            .and_then(|()| opener.shell());
                        if let Err(e) = requested {
                            return Poll::Ready(Err(Fail::Protocol(
                                "malformed_packet",
                                format!("SSH: {e}"),
                            )));
                        }
                        self.opened = true;
                        moved = true;
                    }
                    Ok(Event::Cli(CliEvent::SessionExit(exit))) => {
                        self.exit_status = Some(match exit {
                            CliSessionExit::Status(s) => i32::try_from(s).unwrap_or(i32::MAX),
                            CliSessionExit::Signal(_) => -1,
                        });
                        moved = true;
                    }
                    Ok(Event::Cli(CliEvent::Hostkey(h))) => {
                        // A key re-exchange (sshd's RekeyLimit): the same host check as at
                        // login; unanswered, it would stall the terminal.
                        if let Err(e) =
                            super::check_host_key(h, node_name, host_cas, super::HostKeyAt::Rekey)
                        {
                            return Poll::Ready(Err(e));
                        }
                        moved = true;
                    }
                    Ok(Event::Cli(CliEvent::Defunct)) => {
                        return Poll::Ready(Ok("sshd closed the connection"));
                    }
                    Ok(Event::None) => break,
                    Ok(_) => moved = true,
                }
            }
            // Output: sshd → stream.
            if self.output_at == self.output.len() {
                self.output.clear();
                self.output_at = 0;
                if node.runner.read_channel_ready().is_some() {
                    let mut buf = [0u8; 4096];
                    match node.runner.read_channel_either(chan, &mut buf) {
                        Ok((0, _)) => {}
                        Ok((n, _)) => {
                            let data = &buf[..n];
                            self.bytes_out += n as u64;
                            if let Some(rec) = self.recorder.as_mut() {
                                let _ = rec.output(data);
                            }
                            if let Some(tap) = &self.tap {
                                tap.output(data);
                            }
                            self.output.extend_from_slice(data);
                            moved = true;
                        }
                        Err(e) => return Poll::Ready(Err(super::protocol(e))),
                    }
                }
            }
            while self.output_at < self.output.len() {
                match Pin::new(&mut *stream).poll_write(cx, &self.output[self.output_at..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Fail::Io("the engine's stream closed".into())))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.output_at += n;
                        moved = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fail::Io(describe_io(&e)))),
                    Poll::Pending => break,
                }
            }
            if self.output_at == self.output.len() && !self.output.is_empty() {
                if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                    return Poll::Ready(Err(Fail::Io(describe_io(&e))));
                }
            }
            if self.opened
                && self.output_at == self.output.len()
                && node.runner.read_channel_ready().is_none()
                && (node.runner.is_channel_eof(chan) || node.runner.is_channel_closed(chan))
            {
                return Poll::Ready(Ok("the shell ended"));
            }
            // Input: stream → sshd.
            if self.opened {
                loop {
                    if !self.pending_in.is_empty() {
                        match node
                            .runner
                            .write_channel(chan, ChanData::Normal, &self.pending_in)
                        {
                            Ok(0) => break,
                            Ok(n) => {
                                self.pending_in.drain(..n);
                                moved = true;
                                continue;
                            }
                            Err(e) => return Poll::Ready(Err(super::protocol(e))),
                        }
                    }
                    match split_term_frame(&self.input) {
                        Err(e) => {
                            return Poll::Ready(Err(Fail::Protocol(
                                "malformed_packet",
                                format!("terminal frame: {e}"),
                            )))
                        }
                        Ok(Some((frame, used))) => {
                            match frame {
                                TermInput::Input(bytes) => {
                                    self.bytes_in += bytes.len() as u64;
                                    if let Some(rec) = self.recorder.as_mut() {
                                        let _ = rec.input(bytes);
                                    }
                                    self.pending_in.extend_from_slice(bytes);
                                }
                                TermInput::Resize { cols, rows } => {
                                    self.cols = cols;
                                    self.rows = rows;
                                    let change = sunset::packets::WinChange {
                                        cols: u32::from(cols),
                                        rows: u32::from(rows),
                                        width: 0,
                                        height: 0,
                                    };
                                    if let Err(e) = node.runner.term_window_change(chan, &change) {
                                        return Poll::Ready(Err(super::protocol(e)));
                                    }
                                    if let Some(rec) = self.recorder.as_mut() {
                                        let _ = rec.resize(u32::from(cols), u32::from(rows));
                                    }
                                }
                            }
                            self.input.drain(..used);
                            moved = true;
                            continue;
                        }
                        Ok(None) => {}
                    }
                    if self.user_eof {
                        return Poll::Ready(Ok("the browser left"));
                    }
                    match self.poll_fill(cx, stream) {
                        Poll::Ready(Ok(_)) => moved = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                    break;
                }
            }
            // sshd's socket.
            match node.poll_io(cx) {
                Ok(m) => moved |= m,
                Err(e) => {
                    return Poll::Ready(Err(Fail::Io(format!("sshd side: {}", describe_io(&e)))))
                }
            }
            if !moved {
                return Poll::Pending;
            }
        }
    }
}

/// The PTY request for a terminal of `cols` x `rows`.
fn pty(cols: u16, rows: u16) -> Result<sunset::Pty, sunset::Error> {
    let request = sunset::packets::PtyReq {
        term: sunset::TextString(TERM.as_bytes()),
        cols: u32::from(cols),
        rows: u32::from(rows),
        width: 0,
        height: 0,
        modes: sunset::sshwire::BinString(&[0]),
    };
    sunset::Pty::try_from(&request)
}
