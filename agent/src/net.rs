//! Small network helpers on the agent's glommio executor: name resolution that does not block
//! the executor, connect to the first address that answers, and a timeout combinator.
//!
//! glommio's `TcpStream::connect` resolves with the blocking std resolver on the executor
//! thread (and panics when a name resolves to nothing), so the agent resolves first and
//! connects to `SocketAddr`s only. An IP literal needs no lookup; a host name is looked up on a
//! short-lived thread whose answer comes back through a oneshot channel (glommio wakes a task
//! from another thread). Lookups in flight are bounded per executor thread.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpStream;
use glommio::timer::Timer;

/// Most name lookups in flight at once on one executor: a burst of user streams to a service
/// configured by host name must not turn into a burst of threads.
pub const MAX_CONCURRENT_LOOKUPS: usize = 8;

thread_local! {
    static LOOKUPS: Cell<usize> = const { Cell::new(0) };
}

/// Resolves `host` (a name or an IP literal, IPv6 without brackets) and `port`.
pub(crate) async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let _slot = LookupSlot::take()?;
    let (tx, rx) = futures::channel::oneshot::channel();
    let name = host.to_owned();
    std::thread::Builder::new()
        .name("jaunt-agent-dns".into())
        .spawn(move || {
            let result = (name.as_str(), port)
                .to_socket_addrs()
                .map(|addrs| addrs.collect::<Vec<_>>());
            // The agent may have stopped waiting; nothing to do then.
            let _ = tx.send(result);
        })?;
    let addrs = rx
        .await
        .map_err(|_| io::Error::other("the name lookup thread stopped without an answer"))??;
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no addresses"),
        ));
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that accepts within `timeout` each; the error is the last
/// address's.
pub(crate) async fn connect(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for addr in addrs {
        match TcpStream::connect_timeout(*addr, timeout).await {
            Ok(stream) => {
                // Interactive sessions (SSH keystrokes) and small mux frames: no Nagle delay.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// Runs `fut` for at most `after`; `None` if the time ran out first (the future is dropped).
pub(crate) async fn timeout<F: Future>(after: Duration, fut: F) -> Option<F::Output> {
    future::or(async { Some(fut.await) }, async {
        Timer::new(after).await;
        None
    })
    .await
}

/// One of the [`MAX_CONCURRENT_LOOKUPS`] slots, given back on drop.
struct LookupSlot;

impl LookupSlot {
    fn take() -> io::Result<LookupSlot> {
        LOOKUPS.with(|n| {
            if n.get() >= MAX_CONCURRENT_LOOKUPS {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{MAX_CONCURRENT_LOOKUPS} name lookups are already in flight"),
                ));
            }
            n.set(n.get() + 1);
            Ok(LookupSlot)
        })
    }
}

impl Drop for LookupSlot {
    fn drop(&mut self) {
        LOOKUPS.with(|n| n.set(n.get().saturating_sub(1)));
    }
}
