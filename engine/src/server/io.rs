//! Byte-moving helpers of the connection shell: [`Prefixed`] (replay the bytes read while
//! routing, then read the socket in large reads), [`Counted`] (report a socket's bytes, for metrics and the
//! idle timeout), [`idle_timeout`], [`with_deadline`] and [`proxy_v2_header`]. Splicing itself is
//! [`crate::tunnel::splice`], shared with the agent.
//!
//! The wrappers are runtime-agnostic `futures_lite` I/O adapters; only the timers come from
//! glommio.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};

pub use crate::tunnel::ReadAhead;

/// The deadline passed before the future completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// Runs `fut` until `deadline`; `Err(TimedOut)` if the deadline comes first (then `fut` is
/// dropped). Must run on a glommio executor.
pub async fn with_deadline<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, TimedOut> {
    let timer = async {
        let left = deadline.saturating_duration_since(Instant::now());
        glommio::timer::Timer::new(left).await;
        Err(TimedOut)
    };
    futures_lite::future::or(async { Ok(fut.await) }, timer).await
}

/// The stream a TLS acceptor gets: it first yields `prefix` (the ClientHello the router has
/// already read from the socket), then reads the socket in large reads ([`ReadAhead`]: rustls
/// asks for at most 4 KiB at a time). Writes go straight to the socket.
pub type Prefixed<S> = ReadAhead<S>;

/// Something that wants to hear about the bytes of one socket.
pub trait ByteSink {
    /// `n` bytes were read from (`from_peer`) or written to the socket.
    fn bytes(&self, from_peer: bool, n: usize);
}

/// Wraps the client's socket and reports every byte read or written to `sink`, so byte metrics
/// count what crossed the wire (TLS records included) the same way for every route, and the
/// idle timeout sees activity in either direction.
#[derive(Debug)]
pub struct Counted<S, K> {
    inner: S,
    sink: K,
}

impl<S, K: ByteSink> Counted<S, K> {
    /// Counts `inner`'s bytes into `sink`.
    pub fn new(inner: S, sink: K) -> Counted<S, K> {
        Counted { inner, sink }
    }

    /// The wrapped socket (for its addresses); bytes moved through it directly are not counted.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Where the bytes are counted.
    pub fn sink(&self) -> &K {
        &self.sink
    }
}

/// A PROXY protocol v2 header (command PROXY, TCP) naming `source` (the client) and `destination`
/// (the engine's local address), sent to control before the passed-through bytes so that control
/// sees the client's real address. Mixed families are sent as IPv6 (IPv4-mapped). Without both
/// addresses, a LOCAL header: control then keeps the TCP peer.
pub fn proxy_v2_header(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    use ppp::v2::{AddressFamily, Builder, Command, Protocol, Version};
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let built = match addresses {
        Some((source, destination)) => {
            let pair = if source.is_ipv4() == destination.is_ipv4() {
                (source, destination)
            } else {
                (mapped(source), mapped(destination))
            };
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, pair).build()
        }
        None => Builder::new(
            Version::Two | Command::Local,
            AddressFamily::Unspecified | Protocol::Unspecified,
        )
        .build(),
    };
    // Building into a Vec cannot fail: the only error source is the writer.
    built.unwrap_or_default()
}

impl<S: AsyncRead + Unpin, K: ByteSink + Unpin> AsyncRead for Counted<S, K> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.sink.bytes(true, n);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin, K: ByteSink + Unpin> AsyncWrite for Counted<S, K> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.sink.bytes(false, n);
        Poll::Ready(Ok(n))
    }

    /// Forwarded, so rustls' queued records reach the socket in one gathering write (the
    /// patched glommio's `TcpStream` sends them with one `sendmsg`, vendor/glommio patch 3).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.sink.bytes(false, n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Completes once `last_activity` is older than `idle`: the idle timeout of a splice, raced
/// against it. Whoever moves bytes refreshes `last_activity` (see [`Counted`]).
pub async fn idle_timeout(last_activity: &Cell<Instant>, idle: Duration) {
    loop {
        let due = last_activity.get() + idle;
        let now = Instant::now();
        if now >= due {
            return;
        }
        glommio::timer::Timer::new(due - now).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write (vectored or not) as one write.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.get_mut().0.push(all);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Sums what it is told.
    #[derive(Default)]
    struct Tally(Cell<usize>);

    impl ByteSink for &Tally {
        fn bytes(&self, from_peer: bool, n: usize) {
            assert!(!from_peer);
            self.0.set(self.0.get() + n);
        }
    }

    #[test]
    fn counted_hands_vectored_writes_on_whole_and_counts_them() {
        let tally = Tally::default();
        let mut counted = Counted::new(Writes::default(), &tally);
        let big = vec![7u8; 16 * 1024];
        let bufs = [IoSlice::new(b"ab"), IoSlice::new(&big), IoSlice::new(b"c")];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let wrote = Pin::new(&mut counted).poll_write_vectored(&mut cx, &bufs);
        assert!(matches!(wrote, Poll::Ready(Ok(n)) if n == big.len() + 3));
        assert_eq!(tally.0.get(), big.len() + 3);
        let writes = &counted.get_ref().0;
        assert_eq!(writes.len(), 1, "one write for the three buffers");
        assert_eq!(writes[0].len(), big.len() + 3);
    }

    #[test]
    #[allow(clippy::expect_used, clippy::panic, reason = "tests")]
    fn proxy_v2_header_round_trips() {
        let parse = |bytes: &[u8]| ppp::v2::Header::try_from(bytes).map(|h| h.to_owned());
        let v4 = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let header = proxy_v2_header(Some((v4("203.0.113.7:5555"), v4("127.0.0.1:443"))));
        let parsed = parse(&header).expect("parses");
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
        assert_eq!(
            parsed.addresses,
            ppp::v2::IPv4::new([203, 0, 113, 7], [127, 0, 0, 1], 5555, 443).into()
        );
        assert_eq!(parsed.len(), header.len());

        let mixed = proxy_v2_header(Some((v4("203.0.113.7:5555"), v4("[::1]:443"))));
        let ppp::v2::Addresses::IPv6(a) = parse(&mixed).expect("parses").addresses else {
            panic!("mixed families go as IPv6");
        };
        assert_eq!(
            a.source_address.to_ipv4_mapped(),
            Some([203, 0, 113, 7].into())
        );
        assert_eq!(a.source_port, 5555);

        let local = parse(&proxy_v2_header(None)).expect("parses");
        assert_eq!(local.command, ppp::v2::Command::Local);
    }
}
