//! One daemon per data directory and per public port.
//!
//! - [`lock_data_dir`]: an exclusive `flock` on `DATA_DIR/jaunt.lock`, held for the life of the
//!   process (the kernel drops it when the process dies, even on `kill -9`). A second
//!   `jaunt start` or `jaunt agent` on the same directory is refused with the holder's pid.
//! - [`check_port_free`]: before the engine binds the public port with `SO_REUSEPORT` (which
//!   would let it silently join another process's listener and take a share of its
//!   connections), a plain bind probes the port; if another process listens there, start-up is
//!   refused naming the port and, where `/proc` tells, the process.
//!
//! Not here: binding the engine's listeners (engine `listen.rs`), and the deliberate takeover
//! of the lock and the sockets from a running daemon (`takeover.rs`), which skips the probe.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = "jaunt.lock";

/// Holds the data directory's lock until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
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
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(DataDirLock { _file: file, path })
    }
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
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
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
    // The holder's pid, for the message a second daemon prints.
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(DataDirLock { _file: file, path })
}

/// How long [`check_port_free`] waits for a listening socket that no process holds (a daemon
/// killed a moment ago) to be released by the kernel.
const ORPHAN_LISTENER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuses `addr` if another process already listens on it (see the module doc). Port 0 is
/// always free. `key` names the setting for the message (`--public-addr`, `engine.listen_addr`).
pub fn check_port_free(addr: SocketAddr, key: &str) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    match TcpListener::bind(addr) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // The probe also collides with connections that outlive their listener: a daemon
            // killed with `kill -9` leaves its accepted sockets (flagged SO_REUSEPORT, not
            // SO_REUSEADDR) in FIN_WAIT or CLOSE_WAIT for a while. They do not stop the
            // engine's SO_REUSEPORT bind and take no new connections; only a listener does.
            if nobody_listens(addr.port()) {
                return Ok(());
            }
            // A listener no process holds is one a killed daemon's io_uring still references:
            // the kernel releases it shortly after the process is gone (about 250 ms seen
            // here). Joining it with SO_REUSEPORT would hand new connections to a socket that
            // nobody accepts on, so wait for it to go, bounded.
            let deadline = std::time::Instant::now() + ORPHAN_LISTENER_WAIT;
            let mut holder = listener_process(addr.port());
            while holder.is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if nobody_listens(addr.port()) {
                    return Ok(());
                }
                holder = listener_process(addr.port());
            }
            let who = holder
                .map(|(pid, name)| format!("{name} (pid {pid})"))
                .unwrap_or_else(|| "another process".to_string());
            bail!(
                "the public port {addr} is already in use by {who}: stop it, or choose another \
                 port with {key}"
            )
        }
        Err(e) => Err(e).with_context(|| format!("{key} {addr}: cannot listen")),
    }
}

/// True when `/proc/net/tcp{,6}` can be read and neither lists a listening socket on `port`
/// (if neither can be read, nothing is known, and the answer is false).
fn nobody_listens(port: u16) -> bool {
    let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    !tables.is_empty() && tables.iter().all(|t| listening_inodes(t, port).is_empty())
}

/// The pid and command name of a process listening on TCP `port`, from `/proc` (Linux; only
/// processes whose file descriptors this user may read).
pub fn listener_process(port: u16) -> Option<(u32, String)> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| listening_inodes(&text, port))
        .collect();
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
        let held = lock_data_dir(dir.path(), "jaunt start").unwrap();
        let err = lock_data_dir(dir.path(), "jaunt start")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "in use by another jaunt (pid {})",
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
        let err = check_port_free(addr, "--public-addr")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        assert!(err.contains("--public-addr"), "{err}");
        drop(listener);
        check_port_free(addr, "--public-addr").unwrap();
        check_port_free("127.0.0.1:0".parse().unwrap(), "--public-addr").unwrap();
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
        assert!(check_port_free(addr, "--public-addr").is_err());
        drop(listener);
        // The plain bind still collides with the accepted socket...
        assert_eq!(
            TcpListener::bind(addr).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        // ...but nobody listens, so the port is free for the daemon.
        check_port_free(addr, "--public-addr").unwrap();
        drop((client, accepted));
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
