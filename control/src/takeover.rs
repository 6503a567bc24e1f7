//! `jaunt start --takeover`: a new process of the same configuration takes the listening
//! sockets over from the running daemon, so that an upgrade (or a rollback: the old binary
//! taking over again) refuses no connection.
//!
//! Every daemon listens on `DATA_DIR/takeover.sock` (a unix socket, mode 0600 in the data
//! directory). The exchange, one line of JSON each way, then file descriptors:
//!
//! 1. new → old: [`Hello`] (its pid, addresses, shard count, the drain timeout it asks for);
//! 2. old → new: [`Offer`] with, by SCM_RIGHTS, the data directory's lock file (the same open
//!    file, so the `flock` never lapses), this unix listener, the control API's listener, one
//!    listening socket per engine shard and the diag endpoint's; or a refusal (another
//!    configuration). The old process still accepts;
//! 3. the new process boots on those sockets with its accept loops paused, then sends
//!    `ready`; an exchange that ends before `ready` (the new process failed to boot) leaves the
//!    old one as it was;
//! 4. old: stops accepting without leaving a connection in the sockets' queues (each acceptor
//!    stops at a marker connection, see `jaunt_engine::server::listen`), answers `stopped`,
//!    then drains: connections accepted before get to dial, agents are sent a GOAWAY (they
//!    open tunnels to the port again, which is the new process now, and keep the old tunnel
//!    for its live streams), live sessions go on until they end or the drain timeout passes;
//! 5. new: starts accepting; for [`AGENT_GRACE`] a dial whose agent has not moved over yet
//!    waits for its tunnel instead of being refused.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};

/// The socket's name in the data directory.
pub const SOCKET: &str = "takeover.sock";

/// Version of the exchange; both sides must speak the same.
pub const VERSION: u32 = 1;

/// How long a new engine lets dials wait for agents moving over from the old process.
pub const AGENT_GRACE: Duration = Duration::from_secs(10);

/// How long the old process waits for `ready` (the new one opens the store, may migrate it,
/// issues certificates).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long each side waits for the other's line otherwise.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest line either side sends.
const MAX_LINE: usize = 64 * 1024;

/// Most descriptors an offer carries: lock, unix listener, control listener, shards, diag.
const MAX_FDS: usize = 4 + jaunt_engine::server::MAX_SHARDS;

/// What the new process says first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub pid: u32,
    /// `engine.listen_addr` as configured.
    pub public_listen: String,
    /// `control.listen_addr` as configured.
    pub control_listen: String,
    pub shards: usize,
    /// `engine.diag_addr` as configured.
    #[serde(default)]
    pub diag_addr: Option<String>,
    /// How long the old process lets its live sessions and tunnels go on.
    pub drain_timeout_secs: u64,
}

/// The old process's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Offer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pid: u32,
    /// Engine shard sockets among the descriptors (after lock, unix listener, control).
    pub shards: usize,
    /// Whether the diag endpoint's socket comes last.
    #[serde(default)]
    pub diag: bool,
}

/// What the old process hands over, in the order the descriptors travel.
pub struct Sockets {
    pub lock: OwnedFd,
    pub takeover: OwnedFd,
    pub control: OwnedFd,
    pub shards: Vec<OwnedFd>,
    pub diag: Option<OwnedFd>,
}

/// What a new process received.
pub struct Inherited {
    /// The data directory's lock: the same open file as the old process's, so held throughout.
    pub lock: std::fs::File,
    pub takeover: UnixListener,
    pub control: TcpListener,
    pub shards: Vec<TcpListener>,
    pub diag: Option<TcpListener>,
    pub old_pid: u32,
    conn: UnixStream,
}

impl Inherited {
    /// Tells the old process this one is ready, and waits until it has stopped accepting.
    pub fn ready(&mut self) -> anyhow::Result<()> {
        self.conn.write_all(b"ready\n")?;
        self.conn.set_read_timeout(Some(LINE_TIMEOUT))?;
        let line = read_line(&mut self.conn).context("waiting for the old process to stop")?;
        match line.as_str() {
            "stopped" => Ok(()),
            other => bail!(
                "the running jaunt (pid {}) could not stop accepting: {other}",
                self.old_pid
            ),
        }
    }
}

/// The unix socket's path in `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds `DATA_DIR/takeover.sock` afresh (a stale one from a process that died is removed: the
/// caller holds the data directory's lock, so no live daemon owns it).
pub fn bind(data_dir: &Path) -> anyhow::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// New process: asks the daemon running on `data_dir` for its sockets.
pub fn request(data_dir: &Path, hello: &Hello) -> anyhow::Result<Inherited> {
    let path = socket_path(data_dir);
    let mut conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "--takeover: cannot reach the running jaunt at {} (is it a version without \
             takeover, or not a `jaunt start`?)",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(LINE_TIMEOUT))?;
    conn.set_write_timeout(Some(LINE_TIMEOUT))?;
    let mut line = serde_json::to_vec(hello)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    let (line, fds) = recv_line_with_fds(&conn).context("--takeover: reading the offer")?;
    let offer: Offer = serde_json::from_str(&line)
        .map_err(|e| anyhow!("--takeover: the running jaunt answered {line:?}: {e}"))?;
    if !offer.ok {
        bail!(
            "the running jaunt (pid {}) refused the takeover: {}",
            offer.pid,
            offer.error.as_deref().unwrap_or("no reason given")
        );
    }
    let expected = 3 + offer.shards + usize::from(offer.diag);
    if fds.len() != expected {
        bail!(
            "--takeover: expected {expected} sockets from the running jaunt, got {}",
            fds.len()
        );
    }
    let mut fds = fds.into_iter();
    let (Some(lock), Some(takeover), Some(control)) = (fds.next(), fds.next(), fds.next()) else {
        bail!("--takeover: the offer lacks sockets");
    };
    let lock = std::fs::File::from(lock);
    // The same open file description holds the lock: taking it again succeeds at once.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(std::io::Error::from)
        .context("--takeover: the inherited lock file is not locked by this open file")?;
    let shards = fds
        .by_ref()
        .take(offer.shards)
        .map(TcpListener::from)
        .collect();
    Ok(Inherited {
        lock,
        takeover: UnixListener::from(takeover),
        control: TcpListener::from(control),
        shards,
        diag: fds.next().map(TcpListener::from),
        old_pid: offer.pid,
        conn,
    })
}

/// Old process: a request for its sockets that the new process confirmed with `ready`; the
/// daemon answers on `stopped` once it stopped accepting (or why it could not).
pub struct Handover {
    pub hello: Hello,
    pub stopped: crossbeam_channel::Sender<anyhow::Result<()>>,
}

/// Old process: serves takeover requests on `listener`, one at a time, until one completes
/// (then returns true; false if the listener fails for good). `offer` checks a request against
/// this daemon's configuration and gathers the sockets to send.
pub fn serve(
    listener: &UnixListener,
    offer: &dyn Fn(&Hello) -> anyhow::Result<Sockets>,
    handover: &crossbeam_channel::Sender<Handover>,
) -> bool {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "takeover socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match serve_one(conn, offer, handover) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "takeover abandoned: still serving");
                eprintln!("takeover abandoned, this jaunt goes on serving: {e:#}");
            }
        }
    }
    false
}

fn serve_one(
    mut conn: UnixStream,
    offer: &dyn Fn(&Hello) -> anyhow::Result<Sockets>,
    handover: &crossbeam_channel::Sender<Handover>,
) -> anyhow::Result<bool> {
    conn.set_read_timeout(Some(LINE_TIMEOUT))?;
    conn.set_write_timeout(Some(LINE_TIMEOUT))?;
    let line = read_line(&mut conn).context("reading the request")?;
    let hello: Hello = match serde_json::from_str(&line) {
        Ok(hello) => hello,
        Err(e) => {
            refuse(&mut conn, &format!("not a takeover request ({e})"));
            return Ok(false);
        }
    };
    if hello.version != VERSION {
        refuse(
            &mut conn,
            &format!("takeover version {} here, {} asked", VERSION, hello.version),
        );
        return Ok(false);
    }
    let sockets = match offer(&hello) {
        Ok(sockets) => sockets,
        Err(e) => {
            refuse(&mut conn, &format!("{e:#}"));
            return Ok(false);
        }
    };
    tracing::info!(
        pid = hello.pid,
        "takeover requested: handing over the sockets"
    );
    let answer = Offer {
        ok: true,
        error: None,
        pid: std::process::id(),
        shards: sockets.shards.len(),
        diag: sockets.diag.is_some(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = vec![
        sockets.lock.as_fd(),
        sockets.takeover.as_fd(),
        sockets.control.as_fd(),
    ];
    fds.extend(sockets.shards.iter().map(|s| s.as_fd()));
    fds.extend(sockets.diag.iter().map(|s| s.as_fd()));
    let mut line = serde_json::to_vec(&answer)?;
    line.push(b'\n');
    send_with_fds(&conn, &line, &fds).context("sending the sockets")?;
    drop(sockets);
    conn.set_read_timeout(Some(READY_TIMEOUT))?;
    match read_line(&mut conn) {
        Ok(line) if line == "ready" => {}
        Ok(line) => bail!("the new process (pid {}) said {line:?}", hello.pid),
        Err(e) => bail!("the new process (pid {}) did not get ready: {e}", hello.pid),
    }
    let (stopped_tx, stopped_rx) = crossbeam_channel::bounded(1);
    let pid = hello.pid;
    handover
        .send(Handover {
            hello,
            stopped: stopped_tx,
        })
        .map_err(|_| anyhow!("this daemon is stopping"))?;
    let result = stopped_rx
        .recv()
        .unwrap_or_else(|_| Err(anyhow!("the daemon did not answer")));
    match result {
        Ok(()) => {
            conn.write_all(b"stopped\n")?;
            tracing::info!(pid, "taken over: draining");
            Ok(true)
        }
        Err(e) => {
            let _ = conn.write_all(format!("{e:#}\n").as_bytes());
            Err(e.context("stopping the accept loops"))
        }
    }
}

fn refuse(conn: &mut UnixStream, why: &str) {
    tracing::warn!(why, "takeover refused");
    let answer = Offer {
        ok: false,
        error: Some(why.to_string()),
        pid: std::process::id(),
        shards: 0,
        diag: false,
    };
    if let Ok(mut line) = serde_json::to_vec(&answer) {
        line.push(b'\n');
        let _ = conn.write_all(&line);
    }
}

/// Reads one line (without its newline), at most [`MAX_LINE`] bytes.
fn read_line(conn: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the other process closed the connection",
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
    }
    String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Sends `bytes` with `fds` attached to the first byte.
fn send_with_fds(conn: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        bail!("too many sockets for one message");
    }
    let sent = rustix::net::sendmsg(
        conn,
        &[IoSlice::new(bytes)],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )
    .map_err(std::io::Error::from)?;
    let mut writer = conn;
    writer.write_all(bytes.get(sent..).unwrap_or_default())?;
    Ok(())
}

/// Receives one line and the descriptors that came with it.
fn recv_line_with_fds(conn: &UnixStream) -> anyhow::Result<(String, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut chunk = vec![0u8; 4096];
    loop {
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            conn,
            &mut [IoSliceMut::new(&mut chunk)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for message in ancillary.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            bail!("too many sockets in the offer");
        }
        if received.bytes == 0 {
            bail!("the running jaunt closed the connection");
        }
        let got = chunk.get(..received.bytes).unwrap_or_default();
        if let Some(end) = got.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(got.get(..end).unwrap_or_default());
            break;
        }
        line.extend_from_slice(got);
        if line.len() > MAX_LINE {
            bail!("the offer is too long");
        }
    }
    let line = String::from_utf8(line).map_err(|_| anyhow!("the offer is not UTF-8"))?;
    Ok((line, fds))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_travel_with_the_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = OwnedFd::from(listener);
        send_with_fds(&a, b"{\"x\":1}\n", &[fd.as_fd()]).unwrap();
        let (line, fds) = recv_line_with_fds(&b).unwrap();
        assert_eq!(line, "{\"x\":1}");
        assert_eq!(fds.len(), 1);
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
    }
}
