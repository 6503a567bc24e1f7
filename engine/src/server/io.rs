//! Byte-moving helpers of the connection shell: [`Prefixed`] (replay the bytes read while
//! routing, then read the socket), [`Counted`] (report a socket's bytes, for metrics and the
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

/// A stream that first yields `prefix` (bytes already read from `inner` while routing) and then
/// reads `inner`. Writes go straight to `inner`. Used to hand a TLS acceptor a ClientHello the
/// router has already consumed.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix`, then reads `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            this.at += n;
            if this.at == this.prefix.len() {
                // The ClientHello is not needed any more: give its memory back.
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Largest write [`poll_write_coalesced`] assembles from several buffers (on the stack).
pub const COALESCE_BYTES: usize = 4 * 1024;

/// A vectored write for a transport without one (glommio's `TcpStream` writes only the first
/// buffer of a vectored write, so rustls' records would each cost a `send`: a TLS 1.3 server
/// flight is 5-6 records, the session tickets 2 more). Small buffers are copied into one
/// stack buffer of at most [`COALESCE_BYTES`] and written with one `poll_write`; a first buffer
/// of that size or more (bulk data: 16 KiB records) is written on its own, uncopied.
pub fn poll_write_coalesced<S: AsyncWrite + Unpin>(
    io: Pin<&mut S>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
    let Some(first) = nonempty.next() else {
        return io.poll_write(cx, &[]);
    };
    let second = nonempty.next();
    match second {
        Some(second) if first.len() + second.len() <= COALESCE_BYTES => {}
        _ => return io.poll_write(cx, first),
    }
    let mut scratch = [0u8; COALESCE_BYTES];
    let mut filled = 0;
    for buf in bufs.iter().filter(|b| !b.is_empty()) {
        let Some(room) = scratch.get_mut(filled..filled + buf.len()) else {
            break;
        };
        room.copy_from_slice(buf);
        filled += buf.len();
    }
    io.poll_write(cx, &scratch[..filled])
}

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

    /// Coalesced (see [`poll_write_coalesced`]): the client's socket is a glommio `TcpStream`.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(poll_write_coalesced(Pin::new(&mut this.inner), cx, bufs))?;
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
    use futures_lite::io::{AsyncReadExt, Cursor};

    use super::*;

    #[test]
    fn prefixed_replays_then_reads_inner() {
        futures_lite::future::block_on(async {
            let mut stream = Prefixed::new(b"hello ".to_vec(), Cursor::new(b"world".to_vec()));
            let mut small = [0u8; 4];
            assert_eq!(stream.read(&mut small).await.ok(), Some(4));
            assert_eq!(&small, b"hell");
            let mut rest = Vec::new();
            assert_eq!(stream.read_to_end(&mut rest).await.ok(), Some(7));
            assert_eq!(rest, b"o world");
        });
    }

    #[test]
    fn prefixed_with_empty_prefix_is_transparent() {
        futures_lite::future::block_on(async {
            let mut stream = Prefixed::new(Vec::new(), Cursor::new(b"abc".to_vec()));
            let mut all = Vec::new();
            assert_eq!(stream.read_to_end(&mut all).await.ok(), Some(3));
            assert_eq!(all, b"abc");
        });
    }

    /// Records each `poll_write` as one write.
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
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn coalesced(writes: &mut Writes, bufs: &[&[u8]]) -> usize {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_write_coalesced(Pin::new(writes), &mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => unreachable!("{other:?}"),
        }
    }

    #[test]
    fn small_buffers_coalesce_into_one_write() {
        let mut writes = Writes::default();
        assert_eq!(coalesced(&mut writes, &[b"ab", b"", b"cde", b"f"]), 6);
        assert_eq!(writes.0, vec![b"abcdef".to_vec()]);
    }

    #[test]
    fn coalescing_stops_at_the_bound_and_large_buffers_go_alone() {
        let big = vec![7u8; COALESCE_BYTES];
        let mut writes = Writes::default();
        // A first buffer at the bound is written on its own, uncopied.
        assert_eq!(coalesced(&mut writes, &[&big, b"x"]), COALESCE_BYTES);
        // Buffers are taken whole while they fit.
        let half = vec![1u8; COALESCE_BYTES / 2];
        assert_eq!(
            coalesced(&mut writes, &[&half, &half, b"y"]),
            COALESCE_BYTES
        );
        // Two that do not fit together: the first alone.
        assert_eq!(coalesced(&mut writes, &[b"z", &big]), 1);
        assert_eq!(coalesced(&mut writes, &[b"", b""]), 0);
        let sizes: Vec<usize> = writes.0.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![COALESCE_BYTES, COALESCE_BYTES, 1, 0]);
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
