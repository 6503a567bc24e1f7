//! The relayed SSH connection protocol as a terminating agent sees it, sans-IO: every message
//! 80-100 that passes between the user's `ssh` and the node's sshd goes through
//! [`Channels::on_user`] or [`Channels::on_node`], which keep a table of the session
//! channels the user opened and feed each one's recording (a [`CastRecorder`] from the spool):
//! `pty-req`/`window-change` → size and `r` resizes, `shell`/`exec`/`subsystem` → the recording
//! starts (exec: an `exec` note with the command line), node data and stderr → `o` output, user
//! data → `i` input (recorded only with `record_input`), `exit-status`/`exit-signal` → an `exit`
//! note and the end status, `CHANNEL_CLOSE` → the recording is finished.
//!
//! Messages are relayed unchanged (channel numbers, windows and flow control stay end to end
//! between `ssh` and sshd) except the node's `hostkeys-00@openssh.com` announcement, which is
//! dropped: it names sshd's keys, not the agent's, and the user's ssh could not verify them
//! against its session with the agent.
//!
//! A malformed message is a [`Malformed`] error: the driver ends that connection. The table is
//! bounded ([`MAX_CHANNELS`]); more session channels are refused the same way.
//!
//! sftp channels record their byte counts and, through `sftp.rs`, their file operations as
//! `sftp` notes. Observers of `jaunt join` get the terminal output ([`Channels::tap`]) and the
//! user a notice when one joins ([`Channels::inject`]).
//!
//! Not here: the SSH transport (sunset, driven by `ssh_term.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::hooks::{
    SshEvent, SshEventRecorder, SshSession, MAX_AUDITED_COMMAND_BYTES, MAX_AUDITED_PATH_BYTES,
};

use crate::recording::{
    CastRecorder, RecordingEnd, RecordingError, RecordingId, RecordingKind, RecordingMeta,
    RecordingPolicy,
};

/// Most channels tracked per connection (OpenSSH's own limit per session is far higher, but a
/// user opens a handful).
pub(crate) const MAX_CHANNELS: usize = 256;

const MSG_GLOBAL_REQUEST: u8 = 80;
const MSG_REQUEST_FAILURE: u8 = 82;
const MSG_CHANNEL_OPEN: u8 = 90;
const MSG_CHANNEL_OPEN_CONFIRMATION: u8 = 91;
const MSG_CHANNEL_OPEN_FAILURE: u8 = 92;
const MSG_CHANNEL_WINDOW_ADJUST: u8 = 93;
const MSG_CHANNEL_DATA: u8 = 94;
const MSG_CHANNEL_EXTENDED_DATA: u8 = 95;
const MSG_CHANNEL_CLOSE: u8 = 97;
const MSG_CHANNEL_REQUEST: u8 = 98;
const MSG_CHANNEL_FAILURE: u8 = 100;

/// What the user's terminal is told when the agent refuses `ssh -A` (on stderr).
pub(crate) const AGENT_FORWARDING_REFUSED: &str =
    "[jaunt] agent forwarding is not permitted by your roles (permit_agent_forwarding)\r\n";

/// A message that does not parse; ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl Malformed {
    /// Its label on the agent's metrics ([`crate::metrics::SSH_REFUSALS`]).
    pub(crate) fn label(&self) -> &'static str {
        match self.0 {
            "too many channels" => "channel_flood",
            "window overflow" => "window_overflow",
            _ => "malformed_packet",
        }
    }
}

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Forward,
    Drop,
    /// Send this instead (a window adjust less what an injected notice used).
    Replace(Vec<u8>),
    /// Do not forward it; send the sender these instead (a refusal, a notice).
    Reply(Vec<Vec<u8>>),
}

/// Who a connection's recordings are of.
#[derive(Clone, Debug)]
pub(crate) struct Who {
    pub(crate) session_id: String,
    pub(crate) user: String,
    pub(crate) login: String,
    pub(crate) node: String,
}

/// Starts a recording (the spool, or a test's stand-in).
pub(crate) trait Starter {
    fn start(&mut self, meta: RecordingMeta) -> Result<CastRecorder, RecordingError>;
}

impl Starter for crate::recording::Spool {
    fn start(&mut self, meta: RecordingMeta) -> Result<CastRecorder, RecordingError> {
        crate::recording::Spool::start(self, meta)
    }
}

struct Chan {
    /// The user's number for it (what the node's messages carry).
    user_id: u32,
    /// The node's number (what the user's messages carry), once confirmed.
    node_id: Option<u32>,
    session: bool,
    width: u32,
    height: u32,
    recorder: Option<CastRecorder>,
    started: bool,
    /// An sftp channel: a binary protocol, so its data is counted, not recorded.
    binary: bool,
    /// An sftp channel's file operations, decoded for the recording.
    sftp: Option<Box<super::sftp::Sftp>>,
    /// The user asked for a terminal (`pty-req`): observers' notices go to it.
    pty: bool,
    /// The window the user's ssh granted for sshd's data on this channel, as it stands.
    user_window: u64,
    /// The window sshd granted for the user's data, as it stands: the user's ssh sending more
    /// is a window overflow, which ends the connection.
    node_window: u64,
    /// Bytes of notices the agent wrote into the channel that sshd does not know of: taken off
    /// the user's next window adjusts, so sshd's idea of the window stays true.
    owed: u64,
    exit_status: Option<i32>,
    exit_signal: Option<String>,
    /// What the channel runs (set by `shell`/`exec`/`subsystem`), for its audit event.
    kind: Option<RecordingKind>,
    command: Option<String>,
    /// Its end was recorded and audited.
    reported: bool,
    bytes_in: u64,
    bytes_out: u64,
    user_closed: bool,
    node_closed: bool,
}

/// Told each recording id as its recording starts ([`Channels::on_started`]).
pub(crate) type OnRecordingStarted = Box<dyn FnMut(&RecordingId)>;

/// See the module doc.
pub(crate) struct Channels<S: Starter> {
    who: Who,
    policy: RecordingPolicy,
    starter: S,
    chans: Vec<Chan>,
    /// Recording ids of the channels finished so far (for `session.end`).
    pub(crate) finished: Vec<RecordingId>,
    /// The first recording failure (a best-effort session goes on without it).
    pub(crate) failure: Option<&'static str>,
    /// Recording failures counted, by label.
    pub(crate) failures: BTreeMap<&'static str, u64>,
    /// Where terminal output also goes: the observers of `jaunt join`.
    pub(crate) tap: Option<std::sync::Arc<super::watch::Live>>,
    /// The roles permit port forwarding: `direct-tcpip` channels (`ssh -L`) and `tcpip-forward`
    /// requests (`ssh -R`) are refused here otherwise, whatever sshd would do.
    pub(crate) permit_port_forwarding: bool,
    /// The roles permit agent forwarding: `auth-agent-req@openssh.com` (`ssh -A`) is refused
    /// here otherwise, and sshd's `auth-agent@openssh.com` channels too.
    pub(crate) permit_agent_forwarding: bool,
    /// Where exec commands and file transfers are reported for the audit log (`None`: only in
    /// the recording).
    pub(crate) audit: Option<Arc<dyn SshEventRecorder>>,
    /// Channel data bytes from the user, and to the user, over all channels.
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// Told each recording id as its recording starts (the engine names them in the session's
    /// `session.end`).
    pub(crate) on_started: Option<OnRecordingStarted>,
}

/// Cuts `text` to at most `max` bytes on a character boundary; says whether it was cut.
fn bounded(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// An sftp note (`sftp.rs`) as a file-transfer audit event.
fn file_event(note: &serde_json::Value) -> Option<SshEvent> {
    let operation = note.get("op")?.as_str()?.to_string();
    let (path, cut) = bounded(
        note.get("path")?.as_str()?.to_string(),
        MAX_AUDITED_PATH_BYTES,
    );
    let to = note
        .get("to")
        .and_then(|t| t.as_str())
        .map(|t| bounded(t.to_string(), MAX_AUDITED_PATH_BYTES));
    Some(SshEvent::FileTransfer {
        operation,
        path,
        truncated: cut || to.as_ref().is_some_and(|t| t.1),
        to: to.map(|t| t.0),
        bytes: note.get("bytes").and_then(|b| b.as_u64()),
    })
}

impl Who {
    fn session(&self) -> SshSession {
        SshSession {
            session_id: self.session_id.clone(),
            user: self.user.clone(),
            login: self.login.clone(),
            node: self.node.clone(),
        }
    }
}

/// Why a session must end because of its recording (strict mode).
#[derive(Debug)]
pub(crate) struct MustEnd(pub(crate) RecordingError);

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn u8(&mut self) -> Result<u8, Malformed> {
        let (&b, rest) = self.0.split_first().ok_or(Malformed("truncated"))?;
        self.0 = rest;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        if self.0.len() < 4 {
            return Err(Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        Ok(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }
    fn string(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return Err(Malformed("string longer than its message"));
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(s)
    }
    fn bool(&mut self) -> Result<bool, Malformed> {
        Ok(self.u8()? != 0)
    }
}

impl<S: Starter> Channels<S> {
    pub(crate) fn new(who: Who, policy: RecordingPolicy, starter: S) -> Channels<S> {
        Channels {
            who,
            policy,
            starter,
            chans: Vec::new(),
            finished: Vec::new(),
            failure: None,
            failures: BTreeMap::new(),
            tap: None,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            audit: None,
            bytes_in: 0,
            bytes_out: 0,
            on_started: None,
        }
    }

    fn by_node_id(&mut self, id: u32) -> Option<&mut Chan> {
        self.chans.iter_mut().find(|c| c.node_id == Some(id))
    }

    fn by_user_id(&mut self, id: u32) -> Option<&mut Chan> {
        self.chans.iter_mut().find(|c| c.user_id == id)
    }

    /// A message from the user's ssh, about to go to the node.
    pub(crate) fn on_user(
        &mut self,
        payload: &[u8],
    ) -> Result<Result<Verdict, MustEnd>, Malformed> {
        let mut r = Rd(payload);
        let kind = r.u8()?;
        let mut outcome = Ok(());
        match kind {
            MSG_CHANNEL_OPEN => {
                let ty = r.string()?;
                let sender = r.u32()?;
                let window = r.u32()?;
                let forwarding = matches!(ty, b"direct-tcpip" | b"direct-streamlocal@openssh.com");
                if forwarding && !self.permit_port_forwarding {
                    let why =
                        b"port forwarding is not permitted by your roles (permit_port_forwarding)";
                    let mut reply = vec![MSG_CHANNEL_OPEN_FAILURE];
                    reply.extend_from_slice(&sender.to_be_bytes());
                    reply.extend_from_slice(&1u32.to_be_bytes()); // administratively prohibited
                    reply.extend_from_slice(&(why.len() as u32).to_be_bytes());
                    reply.extend_from_slice(why);
                    reply.extend_from_slice(&0u32.to_be_bytes()); // language tag
                    return Ok(Ok(Verdict::Reply(vec![reply])));
                }
                if self.chans.len() >= MAX_CHANNELS {
                    return Err(Malformed("too many channels"));
                }
                if self.chans.iter().any(|c| c.user_id == sender) {
                    return Err(Malformed("channel number reused while open"));
                }
                self.chans.push(Chan {
                    user_id: sender,
                    node_id: None,
                    session: ty == b"session",
                    width: 80,
                    height: 24,
                    recorder: None,
                    started: false,
                    binary: false,
                    sftp: None,
                    pty: false,
                    user_window: u64::from(window),
                    node_window: 0,
                    owed: 0,
                    exit_status: None,
                    exit_signal: None,
                    kind: None,
                    command: None,
                    reported: false,
                    bytes_in: 0,
                    bytes_out: 0,
                    user_closed: false,
                    node_closed: false,
                });
            }
            MSG_CHANNEL_DATA | MSG_CHANNEL_EXTENDED_DATA => {
                let id = r.u32()?;
                if kind == MSG_CHANNEL_EXTENDED_DATA {
                    let _code = r.u32()?;
                }
                let data = r.string()?;
                let mut notes = Vec::new();
                if let Some(c) = self.by_node_id(id) {
                    if data.len() as u64 > c.node_window {
                        return Err(Malformed("window overflow"));
                    }
                    c.node_window -= data.len() as u64;
                    if kind == MSG_CHANNEL_EXTENDED_DATA {
                        return Ok(Ok(Verdict::Forward));
                    }
                    c.bytes_in += data.len() as u64;
                    if let Some(rec) = c.recorder.as_mut().filter(|_| !c.binary) {
                        outcome = rec.input(data);
                    }
                    if let Some(sftp) = c.sftp.as_mut() {
                        notes = sftp.on_user(data);
                        if let Some(rec) = c.recorder.as_mut() {
                            for note in &notes {
                                outcome = outcome.and(rec.note("sftp", note));
                            }
                        }
                    }
                }
                self.bytes_in += data.len() as u64;
                self.report_files(&notes);
            }
            MSG_GLOBAL_REQUEST => {
                let name = r.string()?;
                let want_reply = r.bool()?;
                let forwarding =
                    matches!(name, b"tcpip-forward" | b"streamlocal-forward@openssh.com");
                if forwarding && !self.permit_port_forwarding {
                    return Ok(Ok(if want_reply {
                        Verdict::Reply(vec![vec![MSG_REQUEST_FAILURE]])
                    } else {
                        Verdict::Drop
                    }));
                }
            }
            MSG_CHANNEL_WINDOW_ADJUST => {
                let id = r.u32()?;
                let add = r.u32()?;
                if let Some(c) = self.by_node_id(id) {
                    c.user_window = c.user_window.saturating_add(u64::from(add));
                    if c.owed > 0 {
                        let paid = c.owed.min(u64::from(add));
                        c.owed -= paid;
                        let left = u64::from(add) - paid;
                        if left == 0 {
                            return Ok(Ok(Verdict::Drop));
                        }
                        let mut msg = vec![MSG_CHANNEL_WINDOW_ADJUST];
                        msg.extend_from_slice(&id.to_be_bytes());
                        msg.extend_from_slice(&(left as u32).to_be_bytes());
                        return Ok(Ok(Verdict::Replace(msg)));
                    }
                }
            }
            MSG_CHANNEL_REQUEST => {
                let id = r.u32()?;
                let ty = r.string()?;
                let want_reply = r.bool()?;
                let agent = matches!(ty, b"auth-agent-req@openssh.com" | b"auth-agent-req");
                if agent && !self.permit_agent_forwarding {
                    return Ok(Ok(self.refuse_agent_forwarding(id, want_reply)));
                }
                outcome = self.user_request(id, ty, &mut r)?;
            }
            MSG_CHANNEL_CLOSE => {
                let id = r.u32()?;
                if let Some(c) = self.by_node_id(id) {
                    c.user_closed = true;
                }
                outcome = self.reap();
            }
            _ => {}
        }
        Ok(self.judge(outcome).map(|()| Verdict::Forward))
    }

    /// The user's `auth-agent-req` on the node's channel `id`, which the roles do not permit:
    /// not forwarded; the user's terminal is told on stderr (if the window has room) and a
    /// `CHANNEL_FAILURE` answers a request that wants a reply.
    fn refuse_agent_forwarding(&mut self, id: u32, want_reply: bool) -> Verdict {
        tracing::info!(
            reason = "agent_forwarding",
            user = %self.who.user,
            "SSH agent forwarding refused: the roles do not permit it"
        );
        let Some(c) = self.by_node_id(id) else {
            return Verdict::Drop;
        };
        let text = AGENT_FORWARDING_REFUSED.as_bytes();
        let len = text.len() as u64;
        let mut out = Vec::new();
        if c.user_window >= len && !c.user_closed && !c.node_closed {
            c.user_window -= len;
            c.owed += len;
            let mut msg = vec![MSG_CHANNEL_EXTENDED_DATA];
            msg.extend_from_slice(&c.user_id.to_be_bytes());
            msg.extend_from_slice(&1u32.to_be_bytes()); // stderr
            msg.extend_from_slice(&(text.len() as u32).to_be_bytes());
            msg.extend_from_slice(text);
            out.push(msg);
        }
        if want_reply {
            let mut msg = vec![MSG_CHANNEL_FAILURE];
            msg.extend_from_slice(&c.user_id.to_be_bytes());
            out.push(msg);
        }
        if out.is_empty() {
            Verdict::Drop
        } else {
            Verdict::Reply(out)
        }
    }

    fn user_request(
        &mut self,
        id: u32,
        ty: &[u8],
        r: &mut Rd<'_>,
    ) -> Result<Result<(), RecordingError>, Malformed> {
        let who = self.who.clone();
        let policy = self.policy;
        let Some(idx) = self.chans.iter().position(|c| c.node_id == Some(id)) else {
            return Ok(Ok(()));
        };
        if !self.chans[idx].session {
            return Ok(Ok(()));
        }
        match ty {
            b"pty-req" => {
                let _term = r.string()?;
                let (w, h) = (r.u32()?, r.u32()?);
                let c = &mut self.chans[idx];
                c.width = w.clamp(1, 10_000);
                c.height = h.clamp(1, 10_000);
                c.pty = true;
                Ok(Ok(()))
            }
            b"window-change" => {
                let (w, h) = (r.u32()?, r.u32()?);
                let c = &mut self.chans[idx];
                c.width = w.clamp(1, 10_000);
                c.height = h.clamp(1, 10_000);
                let (w, h) = (c.width, c.height);
                Ok(match c.recorder.as_mut() {
                    Some(rec) => rec.resize(w, h),
                    None => Ok(()),
                })
            }
            b"shell" | b"exec" | b"subsystem" => {
                if self.chans[idx].started {
                    return Ok(Ok(()));
                }
                self.chans[idx].started = true;
                let (kind, command) = match ty {
                    b"shell" => (RecordingKind::Shell, None),
                    b"exec" => (
                        RecordingKind::Exec,
                        Some(String::from_utf8_lossy(r.string()?).into_owned()),
                    ),
                    _ => {
                        let name = String::from_utf8_lossy(r.string()?).into_owned();
                        let kind = if name == "sftp" {
                            RecordingKind::Sftp
                        } else {
                            RecordingKind::Exec
                        };
                        (kind, Some(format!("subsystem {name}")))
                    }
                };
                self.chans[idx].binary = kind == RecordingKind::Sftp;
                self.chans[idx].kind = Some(kind);
                self.chans[idx].command = command.clone();
                if kind == RecordingKind::Sftp {
                    self.chans[idx].sftp = Some(Box::default());
                }
                let c = &self.chans[idx];
                let meta = RecordingMeta {
                    session_id: who.session_id,
                    user: who.user,
                    login: who.login,
                    node: who.node,
                    kind,
                    width: u16::try_from(c.width).unwrap_or(u16::MAX),
                    height: u16::try_from(c.height).unwrap_or(u16::MAX),
                    command: command.clone(),
                    started: jaunt_config::identity::unix_now(),
                    record_input: policy.record_input,
                };
                let mut started = self.starter.start(meta);
                if let (Ok(rec), Some(cmd)) = (started.as_mut(), command.as_ref()) {
                    let _ = rec.note("exec", &serde_json::json!({ "command": cmd }));
                }
                Ok(match started {
                    Ok(rec) => {
                        if let Some(tell) = self.on_started.as_mut() {
                            tell(rec.id());
                        }
                        self.chans[idx].recorder = Some(rec);
                        Ok(())
                    }
                    Err(e) => Err(e),
                })
            }
            _ => Ok(Ok(())),
        }
    }

    /// A message from the node's sshd, about to go to the user.
    pub(crate) fn on_node(
        &mut self,
        payload: &[u8],
    ) -> Result<Result<Verdict, MustEnd>, Malformed> {
        let mut r = Rd(payload);
        let kind = r.u8()?;
        let mut outcome = Ok(());
        match kind {
            MSG_GLOBAL_REQUEST if r.string()? == b"hostkeys-00@openssh.com" => {
                return Ok(Ok(Verdict::Drop));
            }
            MSG_CHANNEL_OPEN if !self.permit_agent_forwarding => {
                // sshd opens one per use of a forwarded agent; refused if `ssh -A` got through
                // somehow (the request is refused first).
                let ty = r.string()?;
                let sender = r.u32()?;
                if matches!(ty, b"auth-agent@openssh.com" | b"auth-agent") {
                    let why = b"agent forwarding is not permitted by the user's roles";
                    let mut reply = vec![MSG_CHANNEL_OPEN_FAILURE];
                    reply.extend_from_slice(&sender.to_be_bytes());
                    reply.extend_from_slice(&1u32.to_be_bytes()); // administratively prohibited
                    reply.extend_from_slice(&(why.len() as u32).to_be_bytes());
                    reply.extend_from_slice(why);
                    reply.extend_from_slice(&0u32.to_be_bytes());
                    return Ok(Ok(Verdict::Reply(vec![reply])));
                }
            }
            MSG_CHANNEL_OPEN_CONFIRMATION => {
                let recipient = r.u32()?;
                let sender = r.u32()?;
                let window = r.u32()?;
                if let Some(c) = self.by_user_id(recipient) {
                    c.node_id = Some(sender);
                    c.node_window = u64::from(window);
                }
            }
            MSG_CHANNEL_WINDOW_ADJUST => {
                let recipient = r.u32()?;
                let add = r.u32()?;
                if let Some(c) = self.by_user_id(recipient) {
                    c.node_window = c.node_window.saturating_add(u64::from(add));
                }
            }
            MSG_CHANNEL_OPEN_FAILURE => {
                let recipient = r.u32()?;
                self.chans
                    .retain(|c| !(c.user_id == recipient && c.node_id.is_none()));
            }
            MSG_CHANNEL_DATA | MSG_CHANNEL_EXTENDED_DATA => {
                let id = r.u32()?;
                if kind == MSG_CHANNEL_EXTENDED_DATA {
                    let _code = r.u32()?;
                }
                let data = r.string()?;
                self.bytes_out += data.len() as u64;
                if let Some(i) = self.chans.iter().position(|c| c.user_id == id) {
                    let c = &mut self.chans[i];
                    c.bytes_out += data.len() as u64;
                    c.user_window = c.user_window.saturating_sub(data.len() as u64);
                    // sftp is binary protocol, not a terminal: only its byte counts are kept.
                    if let Some(tap) = self.tap.as_ref().filter(|_| c.started && !c.binary) {
                        tap.output(data);
                    }
                    if let Some(rec) = c.recorder.as_mut().filter(|_| !c.binary) {
                        outcome = rec.output(data);
                    }
                    if let Some(sftp) = c.sftp.as_mut().filter(|_| kind == MSG_CHANNEL_DATA) {
                        sftp.on_node(data);
                    }
                }
            }
            MSG_CHANNEL_REQUEST => {
                let id = r.u32()?;
                let ty = r.string()?;
                let _want_reply = r.bool()?;
                if let Some(c) = self.by_user_id(id) {
                    match ty {
                        b"exit-status" => {
                            let status = r.u32()?;
                            c.exit_status = Some(status as i32);
                            if let Some(rec) = c.recorder.as_mut() {
                                outcome =
                                    rec.note("exit", &serde_json::json!({ "status": status }));
                            }
                        }
                        b"exit-signal" => {
                            let signal = String::from_utf8_lossy(r.string()?).into_owned();
                            c.exit_status.get_or_insert(255);
                            c.exit_signal = Some(bounded(signal.clone(), 64).0);
                            if let Some(rec) = c.recorder.as_mut() {
                                outcome =
                                    rec.note("exit", &serde_json::json!({ "signal": signal }));
                            }
                        }
                        _ => {}
                    }
                }
            }
            MSG_CHANNEL_CLOSE => {
                let id = r.u32()?;
                if let Some(c) = self.by_user_id(id) {
                    c.node_closed = true;
                }
                outcome = self.reap();
            }
            _ => {}
        }
        Ok(self.judge(outcome).map(|()| Verdict::Forward))
    }

    /// Finishes the recordings of channels the node closed, and forgets channels both sides
    /// closed.
    fn reap(&mut self) -> Result<(), RecordingError> {
        let mut outcome = Ok(());
        let mut events = Vec::new();
        for c in &mut self.chans {
            if !(c.node_closed || c.user_closed) || c.reported {
                continue;
            }
            c.reported = true;
            let notes = c.sftp.as_mut().map(|s| s.finish()).unwrap_or_default();
            let mut recording_id = None;
            if let Some(mut rec) = c.recorder.take() {
                for note in &notes {
                    let _ = rec.note("sftp", note);
                }
                match rec.finish(RecordingEnd {
                    exit_status: c.exit_status,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                }) {
                    Ok(id) => {
                        recording_id = Some(id.0.clone());
                        self.finished.push(id);
                    }
                    Err(e) => outcome = Err(e),
                }
            }
            events.extend(notes.iter().filter_map(file_event));
            if let (Some(RecordingKind::Exec), Some(command)) = (c.kind, c.command.take()) {
                let (command, truncated) = bounded(command, MAX_AUDITED_COMMAND_BYTES);
                events.push(SshEvent::Exec {
                    command,
                    truncated,
                    exit_status: c.exit_status.filter(|_| c.exit_signal.is_none()),
                    exit_signal: c.exit_signal.take(),
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                    recording_id,
                });
            }
        }
        self.chans.retain(|c| !(c.node_closed && c.user_closed));
        self.report(&events);
        outcome
    }

    fn report(&self, events: &[SshEvent]) {
        if let (Some(audit), false) = (self.audit.as_ref(), events.is_empty()) {
            let session = self.who.session();
            for event in events {
                audit.record(&session, event);
            }
        }
    }

    fn report_files(&self, notes: &[serde_json::Value]) {
        if !notes.is_empty() {
            let events: Vec<SshEvent> = notes.iter().filter_map(file_event).collect();
            self.report(&events);
        }
    }

    /// The session's end for the audit log (after [`Channels::close_all`]): its recordings.
    pub(crate) fn report_closed(&self, recording_ids: Vec<String>) {
        self.report(&[SshEvent::Closed {
            recording_ids,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            recording_failure: self.failure.map(str::to_string),
        }]);
    }

    /// Counts a recording failure; says whether the session must end for it.
    fn judge(&mut self, outcome: Result<(), RecordingError>) -> Result<(), MustEnd> {
        let Err(e) = outcome else {
            return Ok(());
        };
        let label = e.as_str();
        *self.failures.entry(label).or_insert(0) += 1;
        if self.failure.is_none() {
            self.failure = Some(label);
            tracing::warn!(reason = label, error = %e, mode = ?self.policy.mode,
                "session recording failed");
        }
        if self.policy.must_end(&e, Instant::now()) {
            return Err(MustEnd(e));
        }
        Ok(())
    }

    /// The messages that write `notice` into the user's terminal: one `CHANNEL_DATA` for each
    /// open session channel with a terminal whose window has room (the room is taken, and
    /// given back to sshd's view through [`Chan::owed`]); each such channel's recording gets
    /// an `observer` note.
    pub(crate) fn inject(&mut self, notice: &super::watch::Notice) -> Vec<Vec<u8>> {
        let text = notice.text();
        let len = text.len() as u64;
        let mut out = Vec::new();
        for c in &mut self.chans {
            if !(c.session && c.pty && c.started && !c.binary)
                || c.node_id.is_none()
                || c.user_closed
                || c.node_closed
                || c.user_window < len
            {
                continue;
            }
            c.user_window -= len;
            c.owed += len;
            let mut msg = vec![MSG_CHANNEL_DATA];
            msg.extend_from_slice(&c.user_id.to_be_bytes());
            msg.extend_from_slice(&(text.len() as u32).to_be_bytes());
            msg.extend_from_slice(text.as_bytes());
            out.push(msg);
            if let Some(rec) = c.recorder.as_mut() {
                let what = if notice.joined { "joined" } else { "left" };
                let _ = rec.note("observer", &serde_json::json!({ what: notice.observer }));
            }
        }
        out
    }

    /// Finishes every recording still open (the connection ended); returns the ids of all the
    /// connection's recordings.
    pub(crate) fn close_all(&mut self) -> Vec<RecordingId> {
        for c in &mut self.chans {
            c.node_closed = true;
            c.user_closed = true;
        }
        let _ = self.reap();
        std::mem::take(&mut self.finished)
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
    use crate::recording::{cast, RecordingMode, Spool, SpoolLimits};

    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }
    fn msg(kind: u8, parts: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![kind];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    }
    fn u(n: u32) -> Vec<u8> {
        n.to_be_bytes().to_vec()
    }

    fn channels(dir: &std::path::Path, input: bool) -> Channels<Spool> {
        let spool = Spool::open(dir, SpoolLimits::default()).unwrap();
        Channels::new(
            Who {
                session_id: "s1".into(),
                user: "alice".into(),
                login: "root".into(),
                node: "node1".into(),
            },
            RecordingPolicy {
                mode: RecordingMode::BestEffort,
                record_input: input,
            },
            spool,
        )
    }

    #[derive(Default)]
    struct Collect(std::sync::Mutex<Vec<SshEvent>>);

    impl SshEventRecorder for Collect {
        fn record(&self, session: &SshSession, event: &SshEvent) {
            assert_eq!(session.session_id, "s1");
            self.0.lock().unwrap().push(event.clone());
        }
    }

    #[test]
    fn exec_commands_and_file_operations_are_audit_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        let events = Arc::new(Collect::default());
        ch.audit = Some(events.clone());
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(0), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(0), u(4), u(1000), u(1000)])));
        let long = "x".repeat(MAX_AUDITED_COMMAND_BYTES + 10);
        fwd(ch.on_user(&msg(98, &[u(4), s(b"exec"), vec![1], s(long.as_bytes())])));
        fwd(ch.on_node(&msg(94, &[u(0), s(b"out")])));
        fwd(ch.on_node(&msg(98, &[u(0), s(b"exit-signal"), vec![0], s(b"KILL")])));
        fwd(ch.on_node(&msg(97, &[u(0)])));
        // an sftp channel: a mkdir request
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(1), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(1), u(5), u(1000), u(1000)])));
        fwd(ch.on_user(&msg(98, &[u(5), s(b"subsystem"), vec![1], s(b"sftp")])));
        let mut mkdir = vec![14u8];
        mkdir.extend_from_slice(&u(9));
        mkdir.extend_from_slice(&s(b"/tmp/d"));
        mkdir.extend_from_slice(&u(0));
        let mut packet = u(mkdir.len() as u32);
        packet.extend_from_slice(&mkdir);
        fwd(ch.on_user(&msg(94, &[u(5), s(&packet)])));
        let ids = ch.close_all();
        ch.report_closed(ids.iter().map(|i| i.0.clone()).collect());
        let got = events.0.lock().unwrap().clone();
        assert!(
            got.iter().any(
                |e| matches!(e, SshEvent::FileTransfer { operation, path, .. }
                if operation == "mkdir" && path == "/tmp/d")
            ),
            "{got:?}"
        );
        let Some(SshEvent::Exec {
            command,
            truncated,
            exit_status,
            exit_signal,
            bytes_out,
            recording_id,
            ..
        }) = got.iter().find(|e| matches!(e, SshEvent::Exec { .. }))
        else {
            panic!("no exec event: {got:?}");
        };
        assert!(*truncated && command.len() == MAX_AUDITED_COMMAND_BYTES);
        assert_eq!((*exit_status, exit_signal.as_deref()), (None, Some("KILL")));
        assert_eq!(*bytes_out, 3);
        assert!(ids.iter().any(|i| Some(&i.0) == recording_id.as_ref()));
        let Some(SshEvent::Closed {
            recording_ids,
            bytes_out,
            ..
        }) = got.last()
        else {
            panic!("no end: {got:?}");
        };
        assert_eq!(recording_ids.len(), 2);
        assert_eq!(*bytes_out, 3);
    }

    fn fwd(r: Result<Result<Verdict, MustEnd>, Malformed>) -> Verdict {
        r.unwrap().unwrap()
    }

    #[test]
    fn an_exec_channel_is_recorded_with_command_output_and_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), true);
        // user opens channel 3; node confirms as 7
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(3), u(1 << 20), u(32768)])));
        fwd(ch.on_node(&msg(91, &[u(3), u(7), u(1 << 20), u(32768)])));
        fwd(ch.on_user(&msg(
            98,
            &[
                u(7),
                s(b"pty-req"),
                vec![1],
                s(b"xterm"),
                u(100),
                u(30),
                u(0),
                u(0),
                s(b""),
            ],
        )));
        fwd(ch.on_user(&msg(98, &[u(7), s(b"exec"), vec![1], s(b"echo hello")])));
        fwd(ch.on_user(&msg(94, &[u(7), s(b"typed")])));
        fwd(ch.on_user(&msg(
            98,
            &[
                u(7),
                s(b"window-change"),
                vec![0],
                u(120),
                u(40),
                u(0),
                u(0),
            ],
        )));
        fwd(ch.on_node(&msg(94, &[u(3), s(b"hello\r\n")])));
        fwd(ch.on_node(&msg(95, &[u(3), u(1), s(b"oops\n")])));
        fwd(ch.on_node(&msg(98, &[u(3), s(b"exit-status"), vec![0], u(3)])));
        assert_eq!(fwd(ch.on_node(&msg(97, &[u(3)]))), Verdict::Forward);
        fwd(ch.on_user(&msg(97, &[u(7)])));
        assert!(ch.chans.is_empty(), "both closes forget the channel");
        let ids = ch.close_all();
        assert_eq!(ids.len(), 1);
        let text = std::fs::read_to_string(dir.path().join(format!("{}.cast", ids[0]))).unwrap();
        let parsed = cast::parse(&text).unwrap();
        assert_eq!((parsed.header.width, parsed.header.height), (100, 30));
        let codes: Vec<(&str, &str)> = parsed
            .events
            .iter()
            .map(|e| (e.code.as_str(), e.data.as_str()))
            .collect();
        assert!(
            codes
                .iter()
                .any(|(c, d)| *c == "m" && d.contains("echo hello")),
            "{codes:?}"
        );
        assert!(codes.contains(&("i", "typed")), "{codes:?}");
        assert!(codes.contains(&("r", "120x40")), "{codes:?}");
        assert!(codes.contains(&("o", "hello\r\n")), "{codes:?}");
        assert!(codes.contains(&("o", "oops\n")), "{codes:?}");
        assert!(
            codes
                .iter()
                .any(|(c, d)| *c == "m" && d.contains("\"status\":3")),
            "{codes:?}"
        );
        let meta = std::fs::read_to_string(dir.path().join(format!("{}.json", ids[0]))).unwrap();
        assert!(
            meta.contains("\"exit_status\":3") && meta.contains("\"login\":\"root\""),
            "{meta}"
        );
    }

    #[test]
    fn input_is_not_recorded_without_record_input_and_hostkeys_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(0), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(0), u(0), u(1000), u(1000)])));
        fwd(ch.on_user(&msg(98, &[u(0), s(b"shell"), vec![1]])));
        fwd(ch.on_user(&msg(94, &[u(0), s(b"secret")])));
        let hostkeys = msg(80, &[s(b"hostkeys-00@openssh.com"), vec![0], s(b"key")]);
        assert_eq!(fwd(ch.on_node(&hostkeys)), Verdict::Drop);
        let ids = ch.close_all();
        let text = std::fs::read_to_string(dir.path().join(format!("{}.cast", ids[0]))).unwrap();
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn an_observer_notice_goes_to_terminals_and_its_bytes_come_off_the_next_window_adjust() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        // channel 0: a shell with a pty; channel 1: an exec without one
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(0), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(0), u(5), u(1000), u(1000)])));
        fwd(ch.on_user(&msg(
            98,
            &[
                u(5),
                s(b"pty-req"),
                vec![1],
                s(b"xterm"),
                u(80),
                u(24),
                u(0),
                u(0),
                s(b""),
            ],
        )));
        fwd(ch.on_user(&msg(98, &[u(5), s(b"shell"), vec![1]])));
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(1), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(1), u(6), u(1000), u(1000)])));
        fwd(ch.on_user(&msg(98, &[u(6), s(b"exec"), vec![1], s(b"ls")])));
        let notice = crate::ssh_term::watch::Notice {
            observer: "bob".into(),
            joined: true,
        };
        let text = notice.text();
        let injected = ch.inject(&notice);
        assert_eq!(injected.len(), 1, "only the terminal gets it");
        assert_eq!(injected[0], msg(94, &[u(0), s(text.as_bytes())]));
        // The user's ssh gives the window back for what it consumed, the notice included:
        // sshd hears only of its own bytes.
        let n = text.len() as u32;
        assert_eq!(fwd(ch.on_user(&msg(93, &[u(5), u(n - 10)]))), Verdict::Drop);
        assert_eq!(
            fwd(ch.on_user(&msg(93, &[u(5), u(100)]))),
            Verdict::Replace(msg(93, &[u(5), u(90)]))
        );
        assert_eq!(fwd(ch.on_user(&msg(93, &[u(5), u(7)]))), Verdict::Forward);
        // A window with no room for it: nothing is sent.
        fwd(ch.on_node(&msg(94, &[u(0), s(&vec![b'x'; 1000])])));
        let small = ch.inject(&notice);
        assert!(small.len() <= 1);
        let ids = ch.close_all();
        let shell = ids
            .iter()
            .map(|id| std::fs::read_to_string(dir.path().join(format!("{id}.cast"))).unwrap())
            .find(|t| t.contains("observer"))
            .expect("the shell's recording notes the observer");
        assert!(shell.contains(r#"\"joined\":\"bob\""#), "{shell}");
    }

    #[test]
    fn port_forwarding_is_refused_unless_the_roles_permit_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        let open = msg(
            90,
            &[
                s(b"direct-tcpip"),
                u(4),
                u(1000),
                u(1000),
                s(b"127.0.0.1"),
                u(7),
                s(b"::1"),
                u(5),
            ],
        );
        let Verdict::Reply(reply) = fwd(ch.on_user(&open)) else {
            panic!("not refused");
        };
        assert_eq!(&reply[0][..9], &msg(92, &[u(4), u(1)])[..]);
        assert!(String::from_utf8_lossy(&reply[0]).contains("permit_port_forwarding"));
        assert!(ch.chans.is_empty());
        let remote = msg(80, &[s(b"tcpip-forward"), vec![1], s(b""), u(8080)]);
        assert_eq!(fwd(ch.on_user(&remote)), Verdict::Reply(vec![vec![82]]));
        ch.permit_port_forwarding = true;
        assert_eq!(fwd(ch.on_user(&open)), Verdict::Forward);
        assert_eq!(fwd(ch.on_user(&remote)), Verdict::Forward);
    }

    #[test]
    fn agent_forwarding_is_refused_unless_the_roles_permit_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(2), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(2), u(8), u(1000), u(1000)])));
        let req = msg(98, &[u(8), s(b"auth-agent-req@openssh.com"), vec![1]]);
        let Verdict::Reply(out) = fwd(ch.on_user(&req)) else {
            panic!("forwarded");
        };
        let text = AGENT_FORWARDING_REFUSED.as_bytes();
        assert_eq!(out[0], msg(95, &[u(2), u(1), s(text)]));
        assert_eq!(out[1], msg(100, &[u(2)]));
        // sshd's agent channel is refused back to sshd.
        let open = msg(90, &[s(b"auth-agent@openssh.com"), u(11), u(1000), u(1000)]);
        let Verdict::Reply(back) = fwd(ch.on_node(&open)) else {
            panic!("forwarded");
        };
        assert_eq!(&back[0][..9], &msg(92, &[u(11), u(1)])[..]);
        // The notice's bytes come off the user's next window adjust.
        let n = text.len() as u32;
        assert_eq!(
            fwd(ch.on_user(&msg(93, &[u(8), u(n + 5)]))),
            Verdict::Replace(msg(93, &[u(8), u(5)]))
        );
        ch.permit_agent_forwarding = true;
        assert_eq!(fwd(ch.on_user(&req)), Verdict::Forward);
        assert_eq!(fwd(ch.on_node(&open)), Verdict::Forward);
    }

    #[test]
    fn user_data_beyond_the_window_sshd_granted_is_a_window_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        fwd(ch.on_user(&msg(90, &[s(b"session"), u(0), u(1000), u(1000)])));
        fwd(ch.on_node(&msg(91, &[u(0), u(3), u(10), u(1000)])));
        fwd(ch.on_user(&msg(94, &[u(3), s(&[b'x'; 10])])));
        fwd(ch.on_node(&msg(93, &[u(0), u(5)])));
        fwd(ch.on_user(&msg(95, &[u(3), u(1), s(&[b'y'; 4])])));
        fwd(ch.on_user(&msg(94, &[u(3), s(b"z")])));
        let over = ch.on_user(&msg(94, &[u(3), s(b"!")])).err();
        assert_eq!(over.map(|m| m.label()), Some("window_overflow"));
        assert_eq!(Malformed("too many channels").label(), "channel_flood");
        assert_eq!(Malformed("truncated").label(), "malformed_packet");
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = channels(dir.path(), false);
        let good = [
            msg(90, &[s(b"session"), u(0), u(1000), u(1000)]),
            msg(98, &[u(0), s(b"exec"), vec![1], s(b"ls")]),
            msg(94, &[u(0), s(b"data")]),
        ];
        for m in &good {
            for n in 0..m.len() {
                let _ = ch.on_user(&m[..n]);
                let _ = ch.on_node(&m[..n]);
            }
        }
        assert_eq!(
            ch.on_user(&msg(94, &[u(0), u(u32::MAX)])).err(),
            Some(Malformed("string longer than its message"))
        );
        for i in 0..MAX_CHANNELS as u32 {
            let _ = ch.on_user(&msg(90, &[s(b"x"), u(1000 + i), u(0), u(0)]));
        }
        assert!(ch
            .on_user(&msg(90, &[s(b"x"), u(99_999), u(0), u(0)]))
            .is_err());
    }
}
