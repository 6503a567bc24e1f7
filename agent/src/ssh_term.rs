//! SSH termination at the agent (issue 10; Teleport's "recording proxy" against a stock
//! OpenSSH node): for a session whose role says `record_session: best_effort|strict`, the agent
//! is the SSH server the user's `ssh` talks to and an SSH client of the node's sshd, relays the
//! connection protocol between the two and records the session channels.
//!
//! One stream, in order (everything before the stream is accepted is a readable refusal):
//! 1. the agent's host key and certificate ([`SshState::host_key`]: an ed25519 key made here,
//!    a host certificate for the node's name from the host CA, through the
//!    [`crate::SshCertProvider`] hook, cached until two thirds of its life);
//! 2. a login certificate for this session: a fresh ed25519 key, a user certificate from the user
//!    CA for the dialed login only, short-lived (control checks the user's forwarded X.509
//!    certificate carries the login);
//! 3. TCP to sshd, SSH client handshake (sunset, relay mode): sshd's host key must be a
//!    certificate from the cluster's host CA naming the node; publickey login with (2);
//! 4. the stream is accepted; SSH server handshake with the user's `ssh` (sunset, relay mode),
//!    presenting (1) as `ssh-ed25519-cert-v01@openssh.com` (so the `@cert-authority` line the
//!    user already has accepts it); only publickey, only an OpenSSH user certificate of the
//!    user CA, valid now, for this login as principal, of this user (key id), for the SSH user
//!    name the engine authorized;
//! 5. relay: every message 80-100 from one side is handed to [`channels::Channels`] (which
//!    records) and sent to the other side as is, one message in flight per direction (so
//!    memory stays bounded and flow control stays end to end between `ssh` and sshd).
//!
//! With `best_effort` a failure to get the certificates (1, 2) falls back to the splice, which
//! is not recorded (logged with reason `unrecorded`); `strict` refuses the session then, and
//! ends a live one whose recording cannot be written ([`crate::recording::STRICT_WRITE_GRACE`]).
//! A malformed or hostile peer (bad packets, a wrong certificate, too many channels) ends its
//! own connection only; each refusal is logged with a stable `reason` label ([`Fail::label`]).
//!
//! The web terminal (`/web/terminal/<node>/<login>`) has no user `ssh`: `terminal.rs` logs in to
//! sshd the same way (steps 2-3) and bridges terminal frames to one session channel.
//!
//! Not here: the recording format and spool (`recording/`), per-channel
//! RBAC re-checks (a lock ends the whole session, through `policy.rs`). Port forwarding
//! (`ssh -L`/`-R`) and agent forwarding (`ssh -A`) are refused here unless the roles permit them
//! (`channels.rs`), and by sshd as well (the login certificate carries the user's extensions).

mod channels;
mod sftp;
mod terminal;
mod watch;

pub(crate) use terminal::serve_terminal;

pub use watch::LiveSessions;

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use jaunt_config::wire::dial::StreamHeader;
use jaunt_engine::tunnel::Incoming;
use sunset::ed25519_dalek::SigningKey;
use sunset::{CliEvent, Event, Runner, ServEvent, SignKey};

use crate::error::{describe_io, Blame};
use crate::hooks::{AgentHooks, SshRecording, SshUserCertRequest};
use crate::issue_cache::{IssueCache, Limits};
use crate::net;
use crate::policy::ClusterPolicy;
use crate::recording::{RecordingMode, RecordingPolicy};
use crate::serve::LocalTarget;
use crate::settings::Prepared;
use channels::{Channels, Verdict, Who};

/// How long the user's `ssh` may take to authenticate, and sshd to let the agent in.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent waits for control to issue a certificate.
const CERT_TIMEOUT: Duration = Duration::from_secs(15);
/// Most host certificate requests in flight per executor.
const MAX_PENDING_CERTS: usize = 64;
/// Most login certificate requests (one per session) in flight per executor: a fleet's fan-out
/// opens hundreds of sessions at once, and one over this goes unrecorded (best_effort) or is
/// refused (strict). Each is a thread blocked on control for at most [`CERT_TIMEOUT`].
const MAX_PENDING_LOGIN_CERTS: usize = 512;
/// Read buffer per side (allocated while the side is busy, see [`IDLE_RELEASE`]).
const READ_BUF: usize = 16 << 10;
/// A relayed session with no traffic for this long frees its read buffers and sunset's packet
/// buffers (about 100 KiB a session, `Link::release_idle`); they come back on the next byte.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// How long the last messages may take to reach the user once the node closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's host key with its certificate (the certificate blob, OpenSSH wire format).
#[derive(Clone)]
pub(crate) struct HostKey {
    key: SigningKey,
    cert: Vec<u8>,
}

/// The executor's SSH termination state: the hook, the host key and the request bounds.
pub(crate) struct SshState {
    rec: Option<SshRecording>,
    host: IssueCache<u8, Arc<HostKey>>,
    logins: IssueCache<u64, Arc<(SigningKey, Vec<u8>)>>,
    next: Cell<u64>,
    /// Where exec commands, file transfers and session ends go (the audit log).
    events: Arc<dyn crate::hooks::SshEventRecorder>,
}

impl std::fmt::Debug for SshState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshState")
            .field("recording", &self.rec.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for SshState {
    fn default() -> Self {
        SshState::new(&AgentHooks::default())
    }
}

/// Why a terminated session failed; [`Fail::label`] is stable (logs, metrics).
#[derive(Debug)]
pub(crate) enum Fail {
    /// No certificate from control (host or login).
    Certificate(String),
    /// sshd's host key is not a host certificate of the cluster naming the node.
    NodeHostKey(String),
    /// sshd refused the agent's login, or its handshake failed.
    NodeLogin(String),
    /// The user's `ssh` did not authenticate (wrong, expired or foreign certificate, other
    /// user name: the label is [`check_user_cert`]'s; `user_auth` when it left without
    /// offering a key at all) or broke the handshake.
    UserAuth(&'static str, String),
    /// A malformed SSH packet or message from either side, a window overflow or a channel
    /// flood (the label is one of [`crate::metrics::SSH_REFUSALS`]).
    Protocol(&'static str, String),
    /// Strict mode: the recording cannot be written.
    Recording(String),
    /// A side's connection failed.
    Io(String),
    /// The handshake took too long.
    Timeout(&'static str),
}

impl Fail {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Fail::Certificate(_) => "certificate",
            Fail::NodeHostKey(_) => "node_host_key",
            Fail::NodeLogin(_) => "node_login",
            Fail::UserAuth(label, _) | Fail::Protocol(label, _) => label,
            Fail::Recording(_) => "recording",
            Fail::Io(_) => "io",
            Fail::Timeout(_) => "timeout",
        }
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Certificate(e)
            | Fail::NodeHostKey(e)
            | Fail::NodeLogin(e)
            | Fail::UserAuth(_, e)
            | Fail::Protocol(_, e)
            | Fail::Recording(e)
            | Fail::Io(e) => f.write_str(e),
            Fail::Timeout(what) => write!(f, "{what} took longer than {HANDSHAKE_TIMEOUT:?}"),
        }
    }
}

fn protocol(e: sunset::Error) -> Fail {
    Fail::Protocol("malformed_packet", format!("SSH: {e}"))
}

impl Fail {
    /// Counts the failure on the agent's metrics if it is bad input from a peer (not an I/O
    /// error, a missing certificate from control or a client that just left).
    fn count(&self) {
        match self {
            Fail::UserAuth("user_auth", _) => {}
            Fail::UserAuth(label, _) | Fail::Protocol(label, _) => {
                crate::metrics::ssh_refused(label)
            }
            _ => {}
        }
    }
}

impl SshState {
    pub(crate) fn new(hooks: &AgentHooks) -> SshState {
        let limits = |what, thread, max| Limits {
            max_pending: max,
            max_cached: max,
            timeout: CERT_TIMEOUT,
            what,
            thread,
        };
        SshState {
            rec: hooks.ssh.clone(),
            host: IssueCache::new(limits(
                "host certificate",
                "jaunt-agent-sshhost",
                MAX_PENDING_CERTS,
            )),
            logins: IssueCache::new(limits(
                "login certificate",
                "jaunt-agent-sshlogin",
                MAX_PENDING_LOGIN_CERTS,
            )),
            next: Cell::new(0),
            events: hooks.ssh_events.clone(),
        }
    }

    /// Whether this agent can terminate SSH at all (it has the hook and a spool).
    pub(crate) fn available(&self) -> bool {
        self.rec.is_some()
    }

    /// The host key and its certificate, cached.
    async fn host_key(&self) -> Result<Arc<HostKey>, Fail> {
        let Some(rec) = self.rec.clone() else {
            return Err(Fail::Certificate("this agent cannot terminate SSH".into()));
        };
        let key = new_key().map_err(Fail::Certificate)?;
        let public = openssh_public(&key);
        let issued = self
            .host
            .get(
                &0,
                move || rec.certs.host_cert(&public),
                move |issued| {
                    let cert = issued?;
                    let blob = cert_blob(&cert.cert)?;
                    tracing::info!(expires = cert.expires, "SSH host certificate issued");
                    Ok((
                        Arc::new(HostKey { key, cert: blob }),
                        crate::postgres::refresh_at(
                            jaunt_config::identity::unix_now(),
                            cert.expires,
                        ),
                    ))
                },
            )
            .await;
        issued.map_err(Fail::Certificate)
    }

    /// A key and login certificate for one session.
    async fn login_cert(
        &self,
        login: &str,
        user_cert_der: Vec<u8>,
        session_id: Option<String>,
    ) -> Result<Arc<(SigningKey, Vec<u8>)>, Fail> {
        let Some(rec) = self.rec.clone() else {
            return Err(Fail::Certificate("this agent cannot terminate SSH".into()));
        };
        let key = new_key().map_err(Fail::Certificate)?;
        let request = SshUserCertRequest {
            login: login.to_string(),
            user_cert_der,
            public_key: openssh_public(&key),
            session_id,
        };
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        self.logins
            .get(
                &n,
                move || rec.certs.user_cert(&request),
                move |issued| {
                    let blob = cert_blob(&issued?.cert)?;
                    // never cached: one per session
                    Ok((Arc::new((key, blob)), 0))
                },
            )
            .await
            .map_err(Fail::Certificate)
    }
}

fn new_key() -> Result<SigningKey, String> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| "no randomness for an SSH key".to_string())?;
    Ok(SigningKey::from_bytes(&seed))
}

fn openssh_public(key: &SigningKey) -> String {
    let public = ssh_key::public::Ed25519PublicKey(key.verifying_key().to_bytes());
    ssh_key::PublicKey::from(public)
        .to_openssh()
        .unwrap_or_default()
}

fn cert_blob(line: &str) -> Result<Vec<u8>, String> {
    ssh_key::Certificate::from_openssh(line.trim())
        .and_then(|c| c.to_bytes())
        .map_err(|e| format!("control sent a certificate that does not parse: {e}"))
}

/// The encoded blob of a public key sunset handed over (a certificate's exact bytes).
fn pubkey_blob(key: &sunset::PubKey<'_>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 16 << 10];
    let n = sunset::sshwire::write_ssh(&mut buf, key).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Checks a certificate blob: an OpenSSH certificate of one of `cas`, valid at `now`, of
/// `cert_type`, naming `principal`. Returns the certificate, or why not with its metric label
/// (`not_a_certificate`, `cert_untrusted`, `cert_expired`, `wrong_login`).
fn check_cert(
    blob: &[u8],
    cas: &[ssh_key::Fingerprint],
    cert_type: ssh_key::certificate::CertType,
    principal: &str,
    now: u64,
) -> Result<ssh_key::Certificate, (&'static str, String)> {
    let cert = ssh_key::Certificate::from_bytes(blob).map_err(|e| {
        (
            "not_a_certificate",
            format!("not an OpenSSH certificate: {e}"),
        )
    })?;
    if cas.is_empty() {
        return Err((
            "cert_untrusted",
            "the cluster's policy carries no SSH CA key (control is older)".into(),
        ));
    }
    let signer = cert.signature_key();
    if !cas
        .iter()
        .any(|ca| signer.fingerprint(ca.algorithm()) == *ca)
    {
        return Err((
            "cert_untrusted",
            "the certificate is not from the cluster's CA".into(),
        ));
    }
    if now < cert.valid_after() || now >= cert.valid_before() {
        return Err((
            "cert_expired",
            format!(
                "the certificate is valid from {} to {} (unix seconds), not now ({now})",
                cert.valid_after(),
                cert.valid_before()
            ),
        ));
    }
    cert.validate_at(now, cas).map_err(|e| {
        (
            "cert_untrusted",
            format!("certificate not valid now or not from the cluster's CA: {e}"),
        )
    })?;
    if cert.cert_type() != cert_type {
        return Err((
            "not_a_certificate",
            format!(
                "a {:?} certificate where a {cert_type:?} one was expected",
                cert.cert_type()
            ),
        ));
    }
    if !cert.valid_principals().iter().any(|p| p == principal) {
        return Err((
            "wrong_login",
            format!("the certificate does not name {principal:?}"),
        ));
    }
    Ok(cert)
}

/// Checks the user's SSH certificate (the blob their `ssh` authenticated with) for `header`.
pub(crate) fn check_user_cert(
    blob: &[u8],
    user_cas: &[ssh_key::Fingerprint],
    header: &StreamHeader,
    ssh_user: &str,
    now: u64,
) -> Result<(), (&'static str, String)> {
    let login = header.login.as_deref().unwrap_or("");
    if ssh_user != login {
        return Err((
            "wrong_login",
            format!("ssh asked for user {ssh_user:?}, the dial was for login {login:?}"),
        ));
    }
    let cert = check_cert(
        blob,
        user_cas,
        ssh_key::certificate::CertType::User,
        login,
        now,
    )?;
    if cert.key_id() != header.user {
        return Err((
            "wrong_user",
            format!(
                "the certificate is {:?}'s, the session {:?}'s",
                cert.key_id(),
                header.user
            ),
        ));
    }
    Ok(())
}

// ---- one side's transport ----

/// One SSH connection: its socket, its sunset runner, its read buffer.
struct Link<S, CS: sunset::CliServ> {
    io: S,
    runner: Runner<'static, CS>,
    /// Empty (unallocated) while idle: see [`Link::release_idle`].
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin, CS: sunset::CliServ> Link<S, CS> {
    fn new(io: S, mut runner: Runner<'static, CS>) -> Self {
        runner.set_relay();
        Link {
            io,
            runner,
            buf: Vec::new(),
            pos: 0,
            len: 0,
            eof: false,
        }
    }

    /// Moves bytes between the socket and the runner without waiting: `Ready(Ok(true))` if any
    /// moved, `Ready(Ok(false))` if none (the sockets that would block have `cx` registered).
    fn poll_io(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut moved = false;
        loop {
            let out = self.runner.output_buf();
            if out.is_empty() {
                break;
            }
            match Pin::new(&mut self.io).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.runner.consume_output(n);
                    moved = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if moved {
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.io).poll_flush(cx) {
                return Err(e);
            }
        }
        loop {
            if self.pos < self.len {
                if !self.runner.is_input_ready() {
                    break;
                }
                let n = self
                    .runner
                    .input(&self.buf[self.pos..self.len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if n == 0 {
                    break;
                }
                self.pos += n;
                moved = true;
                continue;
            }
            if self.eof {
                break;
            }
            if self.buf.is_empty() {
                self.buf = vec![0u8; READ_BUF];
            }
            match Pin::new(&mut self.io).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.eof = true;
                    self.runner.close_input();
                    moved = true;
                    break;
                }
                Poll::Ready(Ok(n)) => {
                    self.pos = 0;
                    self.len = n;
                    moved = true;
                }
                Poll::Pending => break,
            }
        }
        Ok(moved)
    }

    /// Frees the read buffer and sunset's packet buffers while they hold nothing (an idle
    /// session then costs no buffers; the next byte brings them back).
    fn release_idle(&mut self) {
        if self.pos >= self.len {
            self.buf = Vec::new();
            self.pos = 0;
            self.len = 0;
        }
        self.runner.release_idle_buffers();
    }

    /// Waits until some bytes moved.
    async fn step(&mut self) -> Result<(), Fail> {
        futures_lite::future::poll_fn(|cx| match self.poll_io(cx) {
            Ok(true) => Poll::Ready(Ok(())),
            Ok(false) => Poll::Pending,
            Err(e) => Poll::Ready(Err(Fail::Io(describe_io(&e)))),
        })
        .await
    }

    /// Writes what the runner still has to send, bounded by [`DRAIN_TIMEOUT`], then closes.
    async fn drain_and_close(&mut self) {
        let drained = async {
            while !self.runner.output_buf().is_empty() {
                let out = self.runner.output_buf();
                match futures::AsyncWriteExt::write(&mut self.io, out).await {
                    Ok(n) if n > 0 => self.runner.consume_output(n),
                    _ => return,
                }
            }
            let _ = futures::AsyncWriteExt::close(&mut self.io).await;
        };
        let _ = net::timeout(DRAIN_TIMEOUT, drained).await;
    }
}

// ---- handshakes ----

/// Logs in to sshd as `login` with `key`+`cert`, checking sshd's host certificate names `node`.
async fn node_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Link<S, sunset::Client>,
    login: &str,
    key: &SigningKey,
    cert: &[u8],
    node: &str,
    host_cas: &[ssh_key::Fingerprint],
) -> Result<(), Fail> {
    let mut offered = false;
    loop {
        loop {
            match link
                .runner
                .progress()
                .map_err(|e| Fail::NodeLogin(format!("SSH: {e}")))?
            {
                Event::Cli(CliEvent::Hostkey(h)) => {
                    check_host_key(h, node, host_cas, HostKeyAt::Login)?
                }
                Event::Cli(CliEvent::Username(u)) => u.username(login).map_err(protocol)?,
                Event::Cli(CliEvent::Pubkey(p)) => {
                    if offered {
                        p.skip().map_err(protocol)?;
                    } else {
                        offered = true;
                        let signkey = SignKey::ed25519_with_cert(key.clone(), cert.to_vec())
                            .map_err(|e| Fail::Certificate(format!("login certificate: {e}")))?;
                        p.pubkey(signkey).map_err(protocol)?;
                    }
                }
                Event::Cli(CliEvent::Password(p)) => p.skip().map_err(protocol)?,
                Event::Cli(CliEvent::AgentSign(s)) => s.skip().map_err(protocol)?,
                Event::Cli(CliEvent::Authenticated) => return Ok(()),
                Event::Cli(CliEvent::Defunct) | Event::Serv(ServEvent::Defunct) => {
                    return Err(Fail::NodeLogin(format!(
                        "sshd refused the agent's login as {login} (does sshd trust the user CA \
                         through TrustedUserCAKeys, and does {login} exist?)"
                    )))
                }
                Event::None => break,
                _ => {}
            }
        }
        link.step().await.map_err(|e| match e {
            Fail::Io(e) => Fail::NodeLogin(format!("sshd closed the connection: {e}")),
            other => other,
        })?;
    }
}

/// Authenticates the user's `ssh`.
async fn user_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Link<S, sunset::Server>,
    host: &HostKey,
    policy: &ClusterPolicy,
    header: &StreamHeader,
) -> Result<(), Fail> {
    let hostkey = SignKey::ed25519_with_cert(host.key.clone(), host.cert.clone())
        .map_err(|e| Fail::Certificate(format!("host certificate: {e}")))?;
    let mut refused: Option<(&'static str, String)> = None;
    loop {
        loop {
            match link.runner.progress().map_err(protocol)? {
                Event::Serv(ServEvent::Hostkeys(h)) => h.hostkeys(&[&hostkey]).map_err(protocol)?,
                Event::Serv(ServEvent::FirstAuth(mut a)) => {
                    a.set_auth_methods(false, true).map_err(protocol)?;
                    a.reject().map_err(protocol)?;
                }
                Event::Serv(ServEvent::PasswordAuth(a)) => a.reject().map_err(protocol)?,
                Event::Serv(ServEvent::PubkeyAuth(a)) => {
                    let user = a.username().unwrap_or("").to_string();
                    let checked = match a.pubkey().ok().and_then(|k| pubkey_blob(&k)) {
                        Some(blob) => check_user_cert(
                            &blob,
                            policy.ssh_user_cas(),
                            header,
                            &user,
                            jaunt_config::identity::unix_now(),
                        ),
                        None => Err(("not_a_certificate", "not a key the agent can read".into())),
                    };
                    match checked {
                        Ok(()) => a.allow().map_err(protocol)?,
                        Err(why) => {
                            // ssh offers the certificate and then its plain key: what was wrong
                            // with a certificate is the reason that counts.
                            if refused
                                .as_ref()
                                .is_none_or(|(label, _)| *label == "not_a_certificate")
                            {
                                refused = Some(why);
                            }
                            a.reject().map_err(protocol)?;
                        }
                    }
                }
                Event::Serv(ServEvent::Authenticated) => return Ok(()),
                Event::Serv(ServEvent::Defunct) | Event::Cli(CliEvent::Defunct) => {
                    return Err(match refused {
                        Some((label, why)) => Fail::UserAuth(label, format!("{label}: {why}")),
                        None => Fail::UserAuth(
                            "user_auth",
                            "the user's ssh left before it authenticated".into(),
                        ),
                    })
                }
                Event::None => break,
                _ => {}
            }
        }
        if let Err(e) = link.step().await {
            return Err(match refused {
                Some((label, why)) => Fail::UserAuth(label, format!("{label}: {why}")),
                None => Fail::UserAuth(
                    "user_auth",
                    format!("the user's ssh left before it authenticated ({e})"),
                ),
            });
        }
    }
}

// ---- relay ----

/// What a runner's `progress()` gave, without its borrow.
enum Step {
    Relay,
    Defunct,
    Idle,
    Other,
}

/// What a re-exchange of keys (OpenSSH rekeys after about a GiB, `RekeyLimit`) asks of the
/// relay once the session runs: the agent's host key again on the user's side, and on sshd's
/// side the same check of sshd's host certificate as at the start.
struct Rekey<'k> {
    hostkey: &'k SignKey,
    node: &'k str,
    host_cas: &'k [ssh_key::Fingerprint],
}

fn step_of(event: Result<Event<'_, '_>, sunset::Error>, rekey: &Rekey<'_>) -> Result<Step, Fail> {
    Ok(match event.map_err(protocol)? {
        Event::Relay => Step::Relay,
        Event::Serv(ServEvent::Hostkeys(h)) => {
            h.hostkeys(&[rekey.hostkey]).map_err(protocol)?;
            Step::Other
        }
        Event::Cli(CliEvent::Hostkey(h)) => {
            check_host_key(h, rekey.node, rekey.host_cas, HostKeyAt::Rekey)?;
            Step::Other
        }
        Event::Serv(ServEvent::Defunct) | Event::Cli(CliEvent::Defunct) => Step::Defunct,
        Event::None => Step::Idle,
        _ => Step::Other,
    })
}

/// When sshd shows its host key: at login, or in a key re-exchange once a session runs.
#[derive(Clone, Copy)]
enum HostKeyAt {
    Login,
    Rekey,
}

/// sshd's host key (at login; in a key re-exchange, the relay's and the web terminal's) must be
/// a host certificate of this cluster for `node`. Answers sunset either way: it waits for the
/// answer, so an unanswered one would stall the connection.
fn check_host_key(
    h: sunset::event::CheckHostkey<'_, '_>,
    node: &str,
    host_cas: &[ssh_key::Fingerprint],
    at: HostKeyAt,
) -> Result<(), Fail> {
    let checked = h
        .hostkey()
        .ok()
        .and_then(|k| pubkey_blob(&k))
        .ok_or_else(|| "sshd presented a plain host key".to_string())
        .and_then(|blob| {
            check_cert(
                &blob,
                host_cas,
                ssh_key::certificate::CertType::Host,
                node,
                jaunt_config::identity::unix_now(),
            )
            .map_err(|(_, e)| e)
        });
    match checked {
        Ok(_) => h.accept().map_err(protocol),
        Err(e) => {
            let _ = h.reject();
            Err(Fail::NodeHostKey(match at {
                HostKeyAt::Login => format!(
                    "sshd's host key is not a host certificate of this cluster for {node}: {e} \
                     (sign it with `jaunt ca sign-host --host {node}`)"
                ),
                HostKeyAt::Rekey => format!(
                    "sshd's host key changed in a key re-exchange and is not a host \
                     certificate of this cluster for {node}: {e}"
                ),
            }))
        }
    }
}

/// How the relay ended.
enum Ended {
    User,
    Node,
}

/// Relays messages 80-100 both ways until one side ends; records through `channels`.
async fn relay<U, N, St>(
    user: &mut Link<U, sunset::Server>,
    node: &mut Link<N, sunset::Client>,
    channels: &mut Channels<St>,
    live: Option<&watch::Live>,
    rekey: &Rekey<'_>,
) -> Result<Ended, Fail>
where
    U: AsyncRead + AsyncWrite + Unpin,
    N: AsyncRead + AsyncWrite + Unpin,
    St: channels::Starter,
{
    let mut to_node: Option<Vec<u8>> = None;
    let mut to_user: Option<Vec<u8>> = None;
    let mut user_done = false;
    let mut node_done = false;
    // Messages of the agent's own for the user's ssh (notices that an observer joined or left,
    // refusals of forwarding the roles do not permit), waiting for `to_user`.
    let mut notices: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    // Refusals of the agent's own for sshd (an agent-forwarding channel the roles do not
    // permit), waiting for `to_node`.
    let mut node_replies: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    // Idle for IDLE_RELEASE: the buffers go (checked by one timer at a time, so a busy session
    // makes a timer at most once per IDLE_RELEASE).
    let mut last_moved = std::time::Instant::now();
    let mut idle_timer: Option<glommio::timer::Timer> = None;
    let mut released = false;
    futures_lite::future::poll_fn(|cx| loop {
        let mut moved = false;
        if let Some(live) = live {
            for notice in live.poll_notices(cx) {
                notices.extend(channels.inject(&notice));
            }
        }
        if to_user.is_none() {
            if let Some(m) = notices.pop_front() {
                to_user = Some(m);
                moved = true;
            }
        }
        if to_node.is_none() {
            if let Some(m) = node_replies.pop_front() {
                to_node = Some(m);
                moved = true;
            }
        }
        if let Some(p) = &to_node {
            if node.runner.relay_send(p).map_err(protocol)? {
                to_node = None;
                moved = true;
            }
        }
        if let Some(p) = &to_user {
            if user.runner.relay_send(p).map_err(protocol)? {
                to_user = None;
                moved = true;
            }
        }
        while to_node.is_none() && !user_done {
            match step_of(user.runner.progress(), rekey)? {
                Step::Relay => {
                    let Some(p) = user.runner.relay_payload() else {
                        continue;
                    };
                    match channels.on_user(p) {
                        Err(m) => {
                            return Poll::Ready(Err(Fail::Protocol(
                                m.label(),
                                format!("from the user: {}", m.0),
                            )))
                        }
                        Ok(Err(end)) => {
                            return Poll::Ready(Err(Fail::Recording(end.0.to_string())))
                        }
                        Ok(Ok(Verdict::Forward)) => to_node = Some(p.to_vec()),
                        Ok(Ok(Verdict::Replace(m))) => to_node = Some(m),
                        Ok(Ok(Verdict::Reply(m))) => notices.extend(m),
                        Ok(Ok(Verdict::Drop)) => {}
                    }
                    moved = true;
                }
                Step::Defunct => user_done = true,
                Step::Idle => {
                    // Closed and everything it sent handled: done (sunset does not always
                    // say Defunct here).
                    user_done = user.eof && user.pos >= user.len;
                    break;
                }
                Step::Other => moved = true,
            }
        }
        while to_user.is_none() && !node_done {
            match step_of(node.runner.progress(), rekey)? {
                Step::Relay => {
                    let Some(p) = node.runner.relay_payload() else {
                        continue;
                    };
                    match channels.on_node(p) {
                        Err(m) => {
                            return Poll::Ready(Err(Fail::Protocol(
                                m.label(),
                                format!("from sshd: {}", m.0),
                            )))
                        }
                        Ok(Err(end)) => {
                            return Poll::Ready(Err(Fail::Recording(end.0.to_string())))
                        }
                        Ok(Ok(Verdict::Forward)) => to_user = Some(p.to_vec()),
                        Ok(Ok(Verdict::Replace(m))) => to_user = Some(m),
                        Ok(Ok(Verdict::Reply(m))) => node_replies.extend(m),
                        Ok(Ok(Verdict::Drop)) => {}
                    }
                    moved = true;
                }
                Step::Defunct => node_done = true,
                Step::Idle => {
                    node_done = node.eof && node.pos >= node.len;
                    break;
                }
                Step::Other => moved = true,
            }
        }
        if user_done {
            return Poll::Ready(Ok(Ended::User));
        }
        if node_done && to_user.is_none() {
            return Poll::Ready(Ok(Ended::Node));
        }
        match user.poll_io(cx) {
            Ok(m) => moved |= m,
            Err(e) => return Poll::Ready(Err(Fail::Io(format!("user side: {}", describe_io(&e))))),
        }
        match node.poll_io(cx) {
            Ok(m) => moved |= m,
            Err(e) => return Poll::Ready(Err(Fail::Io(format!("sshd side: {}", describe_io(&e))))),
        }
        if moved {
            released = false;
            last_moved = std::time::Instant::now();
            continue;
        }
        if !released {
            let timer = idle_timer.get_or_insert_with(|| glommio::timer::Timer::new(IDLE_RELEASE));
            if futures_lite::FutureExt::poll(timer, cx).is_ready() {
                idle_timer = None;
                if last_moved.elapsed() >= IDLE_RELEASE {
                    user.release_idle();
                    node.release_idle();
                    released = true;
                } else {
                    // Traffic since the timer was set: set another.
                    continue;
                }
            }
        }
        return Poll::Pending;
    })
    .await
}

// ---- fuzzing ----

/// Fuzz entry point for the relayed connection protocol ([`channels::Channels`]): `data` is
/// split into messages (a length byte, then the message; the length's low bit picks the
/// direction); recordings fail to start (no disk is touched). Must never panic.
pub fn fuzz_relay(data: &[u8]) {
    struct NoDisk;
    impl channels::Starter for NoDisk {
        fn start(
            &mut self,
            _meta: crate::recording::RecordingMeta,
        ) -> Result<crate::recording::CastRecorder, crate::recording::RecordingError> {
            Err(crate::recording::RecordingError::Random)
        }
    }
    let who = Who {
        session_id: String::new(),
        user: "u".into(),
        login: "l".into(),
        node: "n".into(),
    };
    let mut channels = Channels::new(who, RecordingPolicy::default(), NoDisk);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len >> 1).min(tail.len());
        let (msg, after) = tail.split_at(n);
        let _ = if len & 1 == 0 {
            channels.on_user(msg)
        } else {
            channels.on_node(msg)
        };
        rest = after;
    }
    let _ = channels.close_all();
}

// ---- one stream ----

/// What `serve.rs` hands over for a session to terminate.
pub(crate) struct Terminate {
    pub(crate) recording: RecordingPolicy,
    pub(crate) permit_port_forwarding: bool,
    pub(crate) permit_agent_forwarding: bool,
    pub(crate) policy: Arc<ClusterPolicy>,
    pub(crate) client_cert: Vec<u8>,
}

/// Names each recording of session `session_id` to the engine as it starts (a
/// `jaunt-recording/1` stream on the session's tunnel, see `jaunt_config::wire::agent_hello`),
/// for the engine's `session.end`. An engine that does not know such notes refuses them: the
/// session goes on, only its `session.end` lacks the ids (`session.recorded` has them anyway).
fn note_recordings(
    opener: jaunt_engine::tunnel::Opener,
    session_id: String,
) -> channels::OnRecordingStarted {
    Box::new(move |id| {
        let note = jaunt_config::wire::RecordingNote {
            session_id: session_id.clone(),
            recording_id: id.as_str().to_owned(),
        };
        let opener = opener.clone();
        glommio::spawn_local(async move {
            match opener.open(&note.encode()).await {
                Ok(stream) => drop(stream),
                Err(e) => tracing::info!(session = %note.session_id,
                    recording = %note.recording_id, error = %e,
                    "the engine did not note the recording (its session.end will not name it)"),
            }
        })
        .detach();
    })
}

/// Serves one SSH stream by terminating it. Gives the stream back (`Err`) when the session
/// should be spliced instead (best effort, and the certificates could not be had).
pub(crate) async fn serve(
    incoming: Incoming,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
    term: Terminate,
) -> Result<(), Incoming> {
    let state = &prepared.ssh;
    let strict = term.recording.mode == RecordingMode::Strict;
    let Some(rec) = state.rec.clone() else {
        return Err(incoming);
    };
    let login = header.login.clone().unwrap_or_default();
    let certs = async {
        let host = state.host_key().await?;
        let node_login = state
            .login_cert(&login, term.client_cert.clone(), header.session_id.clone())
            .await?;
        Ok::<_, Fail>((host, node_login))
    }
    .await;
    let (host, node_login) = match certs {
        Ok(c) => c,
        Err(e) if !strict => {
            tracing::warn!(reason = "unrecorded", cause = e.label(), error = %e,
                "SSH session spliced unrecorded: the agent cannot terminate it");
            return Err(incoming);
        }
        Err(e) => {
            tracing::warn!(reason = e.label(), error = %e, "SSH session refused (strict recording)");
            incoming.refuse(&format!(
                "this session must be recorded (record_session: strict), and the agent cannot \
                 record it: {e}"
            ));
            return Ok(());
        }
    };

    // sshd, as a client.
    let tcp = match crate::serve::connect_local(&local, &prepared, "node_unreachable").await {
        Ok(tcp) => tcp,
        Err(message) => {
            incoming.refuse(&message);
            return Ok(());
        }
    };
    let mut node = Link::new(tcp, Runner::new_client_owned());
    if let Err(e) = node.runner.offer_host_certificate() {
        incoming.refuse(&format!("the agent's SSH client: {e}"));
        return Ok(());
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
        Some(Err(e)) if !strict => {
            // best_effort: the session goes on unrecorded, end to end with sshd as before (a
            // user whose known_hosts trusts sshd's own key keeps working).
            drop(node);
            tracing::warn!(reason = "unrecorded", cause = e.label(), error = %e,
                "SSH session spliced unrecorded: the agent cannot log in to sshd");
            return Err(incoming);
        }
        Some(Err(e)) => {
            tracing::warn!(blame = %Blame::LocalService, reason = e.label(), error = %e, "stream refused");
            incoming.refuse(&format!(
                "this session must be recorded (record_session: strict), and the agent cannot \
                 log in to {}: {e}",
                local.what
            ));
            return Ok(());
        }
        None => {
            let e = Fail::Timeout("logging in to sshd");
            tracing::warn!(blame = %Blame::LocalService, reason = e.label(), error = %e, "stream refused");
            incoming.refuse(&e.to_string());
            return Ok(());
        }
    }

    // The user's ssh, as a server.
    let opener = incoming.opener();
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return Ok(());
        }
    };
    let mut user = Link::new(stream, Runner::new_server_owned());
    if let Err(e) = user.runner.offer_host_certificate() {
        tracing::warn!(reason = "protocol", error = %e, "cannot offer the host certificate");
        return Ok(());
    }
    match net::timeout(
        HANDSHAKE_TIMEOUT,
        user_handshake(&mut user, &host, &term.policy, &header),
    )
    .await
    {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            e.count();
            tracing::warn!(blame = "user", reason = e.label(), error = %e, "SSH session refused");
            user.drain_and_close().await;
            return Ok(());
        }
        None => {
            crate::metrics::ssh_refused("handshake_timeout");
            tracing::warn!(
                blame = "user",
                reason = "handshake_timeout",
                "SSH session refused: no login in time"
            );
            return Ok(());
        }
    }
    tracing::info!(login = %login, recording = ?term.recording.mode, local = %local.addr,
        "SSH session open (terminated at the agent)");

    let who = Who {
        session_id: header.session_id.clone().unwrap_or_default(),
        user: header.user.clone(),
        login: login.clone(),
        node: prepared.name.clone(),
    };
    // Observers (`jaunt join`) find the session by the engine's id.
    let registered = (!who.session_id.is_empty()).then(|| rec.live.register(&who.session_id));
    let who_session_id = who.session_id.clone();
    let mut channels = Channels::new(who, term.recording, rec.spool.clone());
    channels.tap = registered.as_ref().map(|r| r.live.clone());
    channels.permit_port_forwarding = term.permit_port_forwarding;
    channels.permit_agent_forwarding = term.permit_agent_forwarding;
    channels.audit = Some(state.events.clone());
    if !who_session_id.is_empty() {
        channels.on_started = Some(note_recordings(opener, who_session_id));
    }
    let hostkey = match SignKey::ed25519_with_cert(host.key.clone(), host.cert.clone()) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(reason = "certificate", error = %e, "host certificate unusable");
            return Ok(());
        }
    };
    let rekey = Rekey {
        hostkey: &hostkey,
        node: &prepared.name,
        host_cas: term.policy.ssh_host_cas(),
    };
    let ended = relay(
        &mut user,
        &mut node,
        &mut channels,
        registered.as_ref().map(|r| &*r.live),
        &rekey,
    )
    .await;
    drop(registered);
    match &ended {
        Ok(Ended::Node) => user.drain_and_close().await,
        Ok(Ended::User) => node.drain_and_close().await,
        Err(_) => {}
    }
    let recordings: Vec<String> = channels.close_all().into_iter().map(|r| r.0).collect();
    channels.report_closed(recordings.clone());
    match ended {
        Ok(_) => tracing::info!(
            ?recordings,
            failure = channels.failure.unwrap_or(""),
            "SSH session closed"
        ),
        Err(e) => {
            e.count();
            tracing::info!(reason = e.label(), error = %e, ?recordings,
                "SSH session ended with an error")
        }
    }
    Ok(())
}

/// Serves an observer's stream (`jaunt join`, already authorized): the live session `joined`
/// of this agent gets `observer` as a watcher (its user is told), and the stream carries the
/// session's terminal output from now on until the session or the observer ends. What the
/// observer sends is read and dropped.
pub(crate) async fn watch_session(
    incoming: Incoming,
    joined: &str,
    observer: &str,
    prepared: &Prepared,
) {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some(rec) = prepared.ssh.rec.as_ref() else {
        incoming.refuse("this agent does not terminate SSH sessions, so none can be watched");
        return;
    };
    let watching = match rec.live.join(joined, observer) {
        Ok(w) => w,
        Err(watch::JoinRefused::NoSuchSession) => {
            incoming.refuse(&format!(
                "no live recorded SSH session {joined:?} on {}: see `jaunt sessions ls`",
                prepared.name
            ));
            return;
        }
        Err(watch::JoinRefused::TooMany) => {
            incoming.refuse(&format!(
                "session {joined:?} has {} observers already",
                watch::MAX_OBSERVERS
            ));
            return;
        }
    };
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return;
        }
    };
    tracing::info!(
        session = joined,
        observer,
        "observer joined a live SSH session"
    );
    let (mut reader, mut writer) = stream.split();
    let out = async {
        loop {
            let taken = futures_lite::future::poll_fn(|cx| watching.observer.poll_take(cx)).await;
            match taken {
                Ok(bytes) => {
                    if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                        return "the observer's stream failed";
                    }
                }
                Err(why) => {
                    let _ = writer.close().await;
                    return why;
                }
            }
        }
    };
    let dropped = async {
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return "the observer left",
                Ok(_) => {}
            }
        }
    };
    let why = futures_lite::future::or(out, dropped).await;
    tracing::info!(session = joined, observer, why, "observer stopped watching");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use ssh_key::certificate::{Builder, CertType};
    use ssh_key::{Algorithm, HashAlg, PrivateKey};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519).unwrap()
    }

    fn cert(ca: &PrivateKey, ty: CertType, id: &str, principal: &str, until: u64) -> Vec<u8> {
        let user = key();
        let mut b = Builder::new_with_random_nonce(
            &mut ssh_key::rand_core::OsRng,
            user.public_key(),
            NOW - 60,
            until,
        )
        .unwrap();
        b.cert_type(ty).unwrap();
        b.key_id(id).unwrap();
        b.valid_principal(principal).unwrap();
        b.sign(ca).unwrap().to_bytes().unwrap()
    }

    fn header() -> StreamHeader {
        StreamHeader {
            join: None,
            terminal: false,
            kind: jaunt_config::wire::dial::DialKind::Ssh,
            target: "node1".into(),
            login: Some("root".into()),
            db_user: None,
            db_name: None,
            user: "alice".into(),
            roles: vec!["access".into()],
            client_addr: "192.0.2.1:5555".into(),
            allowed_db_users: Vec::new(),
            allowed_db_names: Vec::new(),
            session_id: None,
        }
    }

    #[test]
    fn user_certificates_are_checked_for_ca_validity_login_and_user() {
        let ca = key();
        let cas = [ca.public_key().fingerprint(HashAlg::Sha256)];
        let h = header();
        let good = cert(&ca, CertType::User, "alice", "root", NOW + 3600);
        check_user_cert(&good, &cas, &h, "root", NOW).unwrap();
        let label =
            |blob: &[u8], user: &str| check_user_cert(blob, &cas, &h, user, NOW).unwrap_err().0;
        assert_eq!(label(&good, "postgres"), "wrong_login");
        assert_eq!(
            label(&cert(&ca, CertType::User, "alice", "root", NOW - 1), "root"),
            "cert_expired"
        );
        assert_eq!(
            label(
                &cert(&key(), CertType::User, "alice", "root", NOW + 60),
                "root"
            ),
            "cert_untrusted"
        );
        assert_eq!(
            label(
                &cert(&ca, CertType::User, "alice", "admin", NOW + 60),
                "root"
            ),
            "wrong_login"
        );
        assert_eq!(
            label(
                &cert(&ca, CertType::Host, "alice", "root", NOW + 60),
                "root"
            ),
            "not_a_certificate"
        );
        assert_eq!(
            label(
                &cert(&ca, CertType::User, "mallory", "root", NOW + 60),
                "root"
            ),
            "wrong_user"
        );
        assert_eq!(label(b"junk", "root"), "not_a_certificate");
        assert_eq!(
            check_user_cert(&good, &[], &h, "root", NOW).unwrap_err().0,
            "cert_untrusted"
        );
        for reason in [
            "wrong_login",
            "wrong_user",
            "cert_expired",
            "cert_untrusted",
        ] {
            assert!(crate::metrics::SSH_REFUSALS.contains(&reason));
        }
    }

    #[test]
    fn fuzz_relay_survives_junk() {
        fuzz_relay(&[]);
        fuzz_relay(&[0xff; 300]);
        let mut data = Vec::new();
        for i in 0..=255u8 {
            data.extend_from_slice(&[9, 90, 0, 0, 0, 1, b'x', 0, 0, i, 0]);
        }
        fuzz_relay(&data);
    }

    #[test]
    fn node_host_certificates_must_name_the_node() {
        let ca = key();
        let cas = [ca.public_key().fingerprint(HashAlg::Sha256)];
        let host = cert(&ca, CertType::Host, "node1", "node1", NOW + 60);
        check_cert(&host, &cas, CertType::Host, "node1", NOW).unwrap();
        assert!(check_cert(&host, &cas, CertType::Host, "node2", NOW).is_err());
        assert!(check_cert(&host, &cas, CertType::User, "node1", NOW).is_err());
    }
}
