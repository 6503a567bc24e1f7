//! The public port's listening sockets, made here rather than by glommio so that the daemon can
//! hand them to the process that replaces it (`jaunt start --takeover`, SCM_RIGHTS) and a
//! replacing process can serve sockets it received; and the stop that leaves no connection
//! behind.
//!
//! **Stopping without losing a connection.** glommio accepts through io_uring: cancelling an
//! accept that the kernel has just completed leaks the accepted socket (the result is dropped
//! with the request), so an accept loop cannot simply be cancelled while another process goes
//! on accepting from the same socket. Instead each shard is told to stop at its *marker*: the
//! engine handle connects to the port from loopback addresses it records, the kernel hashes
//! each marker to one shard's socket (as it does every connection), and a shard that accepts a
//! marker stops without arming another accept; what it accepted before is served as usual, and
//! what arrives after waits in the socket's queue for the next process. Markers that land on a
//! shard that already stopped are closed unread and reach the next process as empty
//! connections, which it drops.
//!
//! Also here: the kernel settings that bound the public port's queues (`somaxconn`,
//! `tcp_migrate_req`) and the advice logged when they fall short. Not here: deciding whether
//! the port is free to bind at start-up (control's `exclusive.rs`).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// Listen backlog asked for each shard's socket; the kernel caps it at `net.core.somaxconn`
/// (4096 by default since Linux 5.4). Connections wait there while a takeover hands the sockets
/// over, and while a shard is at its bound of handshakes in flight (`admission.rs`): after an
/// engine restart every agent reconnects at once, and a connection that finds the queue full
/// has its SYN dropped and retried by the client's kernel only after 1 s, then 3 s.
pub const LISTEN_BACKLOG: i32 = 65_535;

/// An integer kernel setting, by its path under `/proc/sys`, if readable.
fn sysctl(path: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The kernel's cap on listen backlogs (`net.core.somaxconn`), if readable.
pub fn somaxconn() -> Option<u32> {
    sysctl("net/core/somaxconn")
}

/// `net.ipv4.tcp_migrate_req` (Linux 5.14 and later), if readable: at 1, a closing listener's
/// queued connections move to another listener of its `SO_REUSEPORT` group instead of being
/// reset (control's `exclusive.rs` starts the engine beside a killed daemon's listeners then).
pub fn tcp_migrate_req() -> Option<u32> {
    sysctl("net/ipv4/tcp_migrate_req")
}

/// What to tell the operator about the backlog the public port gets, if it is below what the
/// engine asks for: `None` when the kernel grants all of [`LISTEN_BACKLOG`] (or cannot say).
pub fn backlog_advice(somaxconn: Option<u32>, shards: usize) -> Option<String> {
    let cap = somaxconn?;
    if i64::from(cap) >= i64::from(LISTEN_BACKLOG) {
        return None;
    }
    Some(format!(
        "net.core.somaxconn is {cap}, so each shard's listen queue holds {cap} connections \
         ({} for {shards} shards): when more agents than that reconnect at once (after an engine \
         restart), the kernel drops their SYNs and they retry only after 1 s, then 3 s, then 7 s; \
         raise it to {LISTEN_BACKLOG} (config/examples/jaunt-sysctl.conf, into /etc/sysctl.d/)",
        u64::from(cap) * shards as u64
    ))
}

/// A TCP socket bound to `addr` with `SO_REUSEPORT`, listening.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let family = if addr.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        Some(rustix::net::ipproto::TCP),
    )?;
    rustix::net::sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, LISTEN_BACKLOG)?;
    Ok(std::net::TcpListener::from(fd))
}

/// Where to connect to reach a listener bound to `local`: a wildcard becomes loopback.
pub fn reach_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// The stop markers' source addresses (see the module doc).
#[derive(Debug, Default)]
pub struct Markers(Mutex<HashSet<SocketAddr>>);

impl Markers {
    /// Whether a connection from `peer` is one of the markers.
    pub fn contains(&self, peer: &SocketAddr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer)
    }

    /// Connects one marker to `target`: its source address is recorded before the connection
    /// exists, so the shard that accepts it always recognizes it. The caller keeps the stream
    /// open until the shards have stopped.
    pub fn connect(&self, target: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        let family = if target.is_ipv6() {
            AddressFamily::INET6
        } else {
            AddressFamily::INET
        };
        let fd = rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            Some(rustix::net::ipproto::TCP),
        )?;
        // Bound first (to the listener's own address: it is local), so the source address is
        // known before the connection exists.
        rustix::net::bind(&fd, &SocketAddr::new(target.ip(), 0))?;
        let bound = SocketAddr::try_from(rustix::net::getsockname(&fd)?)
            .map_err(|_| std::io::Error::other("marker socket has no IP address"))?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(bound);
        rustix::net::connect(&fd, &target)?;
        Ok(std::net::TcpStream::from(fd))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn backlog_advice_only_below_what_the_engine_asks_for() {
        assert_eq!(backlog_advice(None, 2), None);
        assert_eq!(backlog_advice(Some(65_535), 2), None);
        assert_eq!(backlog_advice(Some(1 << 20), 2), None);
        let advice = backlog_advice(Some(4096), 2).unwrap();
        assert!(advice.contains("net.core.somaxconn is 4096"), "{advice}");
        assert!(advice.contains("8192 for 2 shards"), "{advice}");
        assert!(advice.contains("jaunt-sysctl.conf"), "{advice}");
    }

    #[test]
    fn the_shipped_sysctl_file_grants_the_whole_backlog() {
        // The file the advice names must be enough to silence it.
        let file = include_str!("../../../config/examples/jaunt-sysctl.conf");
        let value = |key: &str| -> u32 {
            file.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == key).then(|| v.trim().parse().unwrap())
                })
                .expect("every key the test asks for is set")
        };
        assert_eq!(backlog_advice(Some(value("net.core.somaxconn")), 64), None);
        assert!(i64::from(value("net.ipv4.tcp_max_syn_backlog")) >= i64::from(LISTEN_BACKLOG));
    }

    #[test]
    fn sockets_share_a_port_and_markers_are_recognized() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_reuseport(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        let markers = Markers::default();
        let _marker = markers.connect(reach_addr(addr)).unwrap();
        let plain = std::net::TcpStream::connect(addr).unwrap();
        first.set_nonblocking(true).unwrap();
        second.set_nonblocking(true).unwrap();
        let mut seen = Vec::new();
        for listener in [&first, &second] {
            while let Ok((_, peer)) = listener.accept() {
                seen.push(markers.contains(&peer));
            }
        }
        seen.sort();
        assert_eq!(seen, [false, true]);
        drop(plain);
        assert_eq!(
            reach_addr("0.0.0.0:443".parse().unwrap()),
            "127.0.0.1:443".parse().unwrap()
        );
    }
}
