//! One daemon per data directory and per public port.
//!
//! - [`lock_data_dir`]: an exclusive `flock` on `DATA_DIR/jaunt.lock`, held for the life of the
//!   process (the kernel drops it when the process dies, even on `kill -9`). A second
//!   `jaunt start` or `jaunt agent` on the same directory is refused with the holder's pid. The
//!   file's first line is the holder's pid; `jaunt start` adds a `listeners:` line with the
//!   socket inodes of its public port ([`DataDirLock::record_listeners`]), which the next start
//!   on the directory reads.
//! - [`check_port_free`]: before the engine binds the public port with `SO_REUSEPORT` (which
//!   would let it silently join another process's listener and take a share of its
//!   connections), a plain bind probes the port; if another process listens there, start-up is
//!   refused naming the port and, where `/proc` tells, the process. Listeners no process holds
//!   (a daemon killed a moment ago) are joined or waited out ([`PortState`]); those the
//!   directory's previous daemon recorded are known to be its own without walking every
//!   process's file descriptors.
//!
//! Not here: binding the engine's listeners (engine `listen.rs`), and the deliberate takeover
//! of the lock and the sockets from a running daemon (`takeover.rs`), which skips the probe.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = "jaunt.lock";

/// Holds the data directory's lock until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
    /// The public port's listener inodes the directory's previous holder recorded (empty if
    /// none): that process is gone or has let go of the lock, so those of them still listening
    /// are its orphans.
    pub previous_listeners: Vec<u64>,
}

impl DataDirLock {
    /// The lock file, for the process that takes this daemon over (`jaunt start --takeover`):
    /// the same open file, so the lock never lapses between the two.
    pub fn share(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self._file.try_clone().map(Into::into)
    }

    /// The lock a replaced daemon handed over (already held by this open file); records this
    /// process's pid in it.
    pub fn inherited(mut file: File, dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = dir.join(LOCK_FILE);
        write_holder(&mut file, &path, &[])?;
        Ok(DataDirLock {
            _file: file,
            path,
            previous_listeners: Vec::new(),
        })
    }

    /// Records this process's public-port listeners (their socket inodes) after its pid, for
    /// the next `jaunt start` on the directory (see [`check_port_free`]).
    pub fn record_listeners(&mut self, inodes: &[u64]) -> anyhow::Result<()> {
        write_holder(&mut self._file, &self.path, inodes)
    }
}

/// Rewrites the lock file: this process's pid on the first line (what a refused second daemon
/// prints), then, if there are any, the public port's listener inodes on a `listeners:` line.
fn write_holder(file: &mut File, path: &Path, listeners: &[u64]) -> anyhow::Result<()> {
    let mut content = format!("{}\n", std::process::id());
    if !listeners.is_empty() {
        let list: Vec<String> = listeners.iter().map(u64::to_string).collect();
        content.push_str(&format!("{LISTENERS_LINE} {}\n", list.join(" ")));
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(content.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The lock file's line that lists the holder's public-port listener inodes.
const LISTENERS_LINE: &str = "listeners:";

/// The inodes on the lock file's `listeners:` line (none if it has none).
fn recorded_listeners(content: &str) -> Vec<u64> {
    content
        .lines()
        .find_map(|l| l.strip_prefix(LISTENERS_LINE))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|i| i.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Locks `dir` for this process, or explains who holds it. `what` names the daemon for the
/// message (`jaunt start`, `jaunt agent`).
pub fn lock_data_dir(dir: &Path, what: &str) -> anyhow::Result<DataDirLock> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut content = String::new();
            let _ = file.read_to_string(&mut content);
            let holder = content.lines().next().unwrap_or_default().trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("another jaunt (pid {holder})")
            };
            bail!(
                "the data directory {} is in use by {who}: stop it first, or give {what} another \
                 --data-dir",
                dir.display()
            );
        }
        Err(e) => {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    // What the previous holder recorded, then this holder's pid, for the message a second
    // daemon prints.
    let mut previous = String::new();
    let _ = file.read_to_string(&mut previous);
    write_holder(&mut file, &path, &[])?;
    Ok(DataDirLock {
        _file: file,
        path,
        previous_listeners: recorded_listeners(&previous),
    })
}

/// How long [`check_port_free`] waits for listeners that no process holds (a daemon killed a
/// moment ago) to be released by the kernel, when they cannot hand their queued connections on.
const ORPHAN_LISTENER_WAIT: Duration = Duration::from_secs(5);

/// How often it looks again meanwhile: one `sock_diag` request, which walks only the kernel's
/// table of listening sockets.
const ORPHAN_POLL: Duration = Duration::from_millis(5);

/// What [`check_port_free`] found on a port the engine may bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Nothing listens there (connections a killed listener accepted may linger; they take no
    /// new ones).
    Free,
    /// `count` listeners no process holds were open: a daemon killed a moment ago, whose
    /// io_uring the kernel tears down after the process is gone (it held the listeners'
    /// accepts; 14-47 ms in the storms logged here). With `joined`, the engine binds beside
    /// them and `net.ipv4.tcp_migrate_req = 1` hands it their queued connections when they close;
    /// otherwise they were waited out for `waited`, so that no connection the new daemon's
    /// banner invites lands in a queue nobody accepts from.
    Orphans {
        count: usize,
        joined: bool,
        waited: Duration,
    },
}

/// Refuses `addr` if another process already listens on it (see the module doc). Port 0 is
/// always free. `key` names the setting for the message (`--public-addr`, `engine.listen_addr`).
/// `ours`: the listener inodes the data directory's previous daemon recorded
/// ([`DataDirLock::previous_listeners`]); listeners among them need no search for a holder.
pub fn check_port_free(addr: SocketAddr, key: &str, ours: &[u64]) -> anyhow::Result<PortState> {
    let migrate = jaunt_engine::server::listen::tcp_migrate_req() == Some(1);
    check_port_free_with(addr, key, ours, migrate, ORPHAN_LISTENER_WAIT)
}

/// [`check_port_free`] with the kernel's `tcp_migrate_req` and the wait for orphans given.
fn check_port_free_with(
    addr: SocketAddr,
    key: &str,
    ours: &[u64],
    migrate: bool,
    orphan_wait: Duration,
) -> anyhow::Result<PortState> {
    if addr.port() == 0 {
        return Ok(PortState::Free);
    }
    match TcpListener::bind(addr) {
        Ok(probe) => {
            drop(probe);
            Ok(PortState::Free)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let in_use = |who: &str| {
                anyhow::anyhow!(
                    "the public port {addr} is already in use by {who}: stop it, or choose \
                     another port with {key}"
                )
            };
            // The probe also collides with connections that outlive their listener: a daemon
            // killed with `kill -9` leaves its accepted sockets (flagged SO_REUSEPORT, not
            // SO_REUSEADDR) in FIN_WAIT or CLOSE_WAIT for a while. They do not stop the
            // engine's SO_REUSEPORT bind and take no new connections; only a listener does.
            let Some(listeners) = listening_sockets(addr.port()) else {
                return Err(in_use("another process"));
            };
            if listeners.is_empty() {
                return Ok(PortState::Free);
            }
            // Walking every process's file descriptors costs 0.3 s and more on a host with
            // tens of thousands of them; the previous daemon's own listeners need no walk.
            let unknown: Vec<u64> = listeners
                .iter()
                .copied()
                .filter(|i| !ours.contains(i))
                .collect();
            if let Some((pid, name)) = listener_process(&unknown) {
                return Err(in_use(&format!("{name} (pid {pid})")));
            }
            // Listeners no process holds. Joining them with SO_REUSEPORT hands them a share of
            // new connections, which the kernel resets when they close, unless it may move them.
            let count = listeners.len();
            if migrate {
                return Ok(PortState::Orphans {
                    count,
                    joined: true,
                    waited: Duration::ZERO,
                });
            }
            let start = std::time::Instant::now();
            loop {
                std::thread::sleep(ORPHAN_POLL);
                if listening_sockets(addr.port()).is_some_and(|l| l.is_empty()) {
                    return Ok(PortState::Orphans {
                        count,
                        joined: false,
                        waited: start.elapsed(),
                    });
                }
                if start.elapsed() >= orphan_wait {
                    let holder = listening_sockets(addr.port())
                        .and_then(|l| listener_process(&l))
                        .map(|(pid, name)| format!("{name} (pid {pid})"))
                        .unwrap_or_else(|| {
                            format!(
                                "a listener no process holds (still open after {} ms)",
                                orphan_wait.as_millis()
                            )
                        });
                    return Err(in_use(&holder));
                }
            }
        }
        Err(e) => Err(e).with_context(|| format!("{key} {addr}: cannot listen")),
    }
}

/// The inodes of the TCP sockets (IPv4 and IPv6) listening on `port`, or `None` if the kernel
/// cannot tell. Asked through `sock_diag`, which walks only the listening table; read from
/// `/proc/net/tcp{,6}` when netlink is unavailable (those list every socket of the host: 0.3-0.5
/// s to read with 47,000 of them during a reconnect storm here, once per look).
pub fn listening_sockets(port: u16) -> Option<Vec<u64>> {
    match diag_listeners(port) {
        Ok(inodes) => Some(inodes),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net/tcp");
            let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .filter_map(|f| std::fs::read_to_string(f).ok())
                .collect();
            (!tables.is_empty()).then(|| {
                tables
                    .iter()
                    .flat_map(|t| listening_inodes(t, port))
                    .collect()
            })
        }
    }
}

/// [`listening_sockets`] through a `NETLINK_SOCK_DIAG` dump of listening TCP sockets.
fn diag_listeners(port: u16) -> std::io::Result<Vec<u64>> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use rustix::net::{netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    let kernel = netlink::SocketAddrNetlink::new(0, 0);
    let mut inodes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut out = vec![0u8; request.buffer_len()];
        request.serialize(&mut out);
        rustix::net::sendto(&fd, &out, SendFlags::empty(), &kernel)?;
        'dump: loop {
            let (len, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
            let mut rest = buf.get(..len).unwrap_or_default();
            while !rest.is_empty() {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                    .map_err(|e| std::io::Error::other(format!("sock_diag reply: {e}")))?;
                let size = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(std::io::Error::other(format!("sock_diag: {e}")))
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                        if r.header.socket_id.source_port == port =>
                    {
                        inodes.push(u64::from(r.header.inode));
                    }
                    _ => {}
                }
                // A zero or overlong length would loop or overrun: the reply is malformed.
                if size == 0 || size > rest.len() {
                    return Err(std::io::Error::other("sock_diag reply: bad message length"));
                }
                // Messages are 4-byte aligned within a datagram.
                rest = rest.get(size.next_multiple_of(4)..).unwrap_or_default();
            }
        }
    }
    Ok(inodes)
}

/// The pid and command name of a process holding one of the sockets `inodes` (from
/// [`listening_sockets`]), from `/proc` (Linux; only processes whose file descriptors this user
/// may read).
pub fn listener_process(inodes: &[u64]) -> Option<(u32, String)> {
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                let name = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|n| n.trim().to_string())
                    .unwrap_or_else(|_| "a process".to_string());
                return Some((pid, name));
            }
        }
    }
    None
}

/// Socket inodes in a `/proc/net/tcp` table that listen (state `0A`) on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9))
        else {
            continue;
        };
        let Some((_, hex_port)) = local.rsplit_once(':') else {
            continue;
        };
        if *state == "0A" && u16::from_str_radix(hex_port, 16) == Ok(port) {
            if let Ok(inode) = inode.parse() {
                out.push(inode);
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_data_dir_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut held = lock_data_dir(dir.path(), "jaunt start").unwrap();
        // The listeners' line after the pid stays out of the message.
        held.record_listeners(&[41, 42]).unwrap();
        let err = lock_data_dir(dir.path(), "jaunt start")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "in use by another jaunt (pid {}): stop it first",
                std::process::id()
            )),
            "{err}"
        );
        drop(held);
        lock_data_dir(dir.path(), "jaunt start").unwrap();
    }

    #[test]
    fn a_port_another_process_listens_on_is_refused_by_name() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let err = check_port_free(addr, "--public-addr", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        assert!(err.contains("--public-addr"), "{err}");
        drop(listener);
        check_port_free(addr, "--public-addr", &[]).unwrap();
        check_port_free("127.0.0.1:0".parse().unwrap(), "--public-addr", &[]).unwrap();
    }

    /// A daemon killed with `kill -9` leaves accepted connections behind (SO_REUSEPORT
    /// listener, no SO_REUSEADDR): they collide with the probe's plain bind, yet nothing
    /// listens, so a restart on the same port must go ahead (loadtest `--restart crash`).
    #[test]
    fn connections_left_by_a_dead_listener_do_not_hold_the_port() {
        use rustix::net::{sockopt, AddressFamily, SocketType};
        let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        sockopt::set_socket_reuseport(&fd, true).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        rustix::net::bind(&fd, &any).unwrap();
        rustix::net::listen(&fd, 8).unwrap();
        let listener = TcpListener::from(fd);
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // While it listens, the port is refused.
        assert!(check_port_free(addr, "--public-addr", &[]).is_err());
        drop(listener);
        // The plain bind still collides with the accepted socket...
        assert_eq!(
            TcpListener::bind(addr).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        // ...but nobody listens, so the port is free for the daemon.
        check_port_free(addr, "--public-addr", &[]).unwrap();
        drop((client, accepted));
    }

    fn inode(fd: &impl std::os::fd::AsFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    /// `sock_diag` lists the listener on the port, and not the connections beside it.
    #[test]
    fn sock_diag_lists_the_ports_listeners_only() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let six = TcpListener::bind("[::1]:0").ok();
        let found = diag_listeners(port).unwrap();
        assert_eq!(found, vec![inode(&listener)]);
        assert_eq!(listening_sockets(port), Some(found));
        if let Some(six) = six {
            let port6 = six.local_addr().unwrap().port();
            assert_eq!(diag_listeners(port6).unwrap(), vec![inode(&six)]);
        }
        drop(listener);
        assert_eq!(diag_listeners(port).unwrap(), Vec::<u64>::new());
        drop((client, accepted));
    }

    /// The lock file keeps the holder's listeners for the next holder.
    #[test]
    fn the_lock_file_hands_the_listeners_to_the_next_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut held = lock_data_dir(dir.path(), "jaunt start").unwrap();
        assert!(held.previous_listeners.is_empty());
        held.record_listeners(&[41, 42]).unwrap();
        drop(held);
        let next = lock_data_dir(dir.path(), "jaunt start").unwrap();
        assert_eq!(next.previous_listeners, vec![41, 42]);
        drop(next);
        // The next holder recorded nothing: the one after it finds nothing.
        assert!(lock_data_dir(dir.path(), "jaunt start")
            .unwrap()
            .previous_listeners
            .is_empty());
    }

    /// A listener the directory's previous daemon recorded is taken for its orphan: with
    /// `tcp_migrate_req` the engine joins it at once; without, it is waited out, and one
    /// still open at the end of the wait is refused naming whoever holds it.
    #[test]
    fn the_previous_daemons_listeners_are_joined_or_waited_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ours = [inode(&listener)];
        assert_eq!(
            check_port_free_with(addr, "--public-addr", &ours, true, Duration::ZERO).unwrap(),
            PortState::Orphans {
                count: 1,
                joined: true,
                waited: Duration::ZERO
            }
        );
        let err = check_port_free_with(
            addr,
            "--public-addr",
            &ours,
            false,
            Duration::from_millis(20),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        // Not recorded: the holder is searched for and named at once, whatever the kernel does.
        let err = check_port_free_with(addr, "--public-addr", &[], true, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
    }

    #[test]
    fn proc_net_tcp_rows_are_read() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0C08 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0\n\
   1: 0100007F:0C08 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 3080), vec![12345]);
        assert!(listening_inodes(table, 3081).is_empty());
        assert!(listening_inodes("garbage\nmore garbage", 3080).is_empty());
    }
}
