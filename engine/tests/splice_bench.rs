//! The splice path itself, measured: a user's socket → engine `splice` → tunnel stream → the
//! tunnel (two drivers over an in-memory pipe) → agent `splice` → a backend socket, 64 MiB per
//! run, against the same path with the tunnel streams wrapped so that `splice` cannot see they
//! are [`MuxStream`]s (the copying path through a 32 KiB buffer, as before the copy-free one).
//! Same run, alternating, so the ratio is what counts on a loaded machine.
//!
//! The "sockets" are in-memory: the user's hands out 16 KiB reads (a TLS record) from a pattern
//! by copy, the backend's takes writes by copy into a scratch buffer; the pipe between the two
//! tunnel drivers copies in and out (as a socket or TLS would) and holds at most 256 KiB, so
//! backpressure is real. No TLS, so the splice and the mux are most of what is measured.
//!
//! ```sh
//! cargo test -p jaunt-engine --test splice_bench --profile bench -- --ignored --nocapture
//! ```
//!
//! The non-ignored test runs both paths once with every byte checked.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;

use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::{LocalExecutorBuilder, Placement};
use jaunt_engine::mux::{self, Role};
use jaunt_engine::tunnel::{splice, MuxStream, Spliced, Tunnel};
use jaunt_testkit::pattern::{pattern_block, PATTERN_PERIOD as PERIOD};

const MIB: usize = 1024 * 1024;
/// A user socket's read: one TLS record.
const SOURCE_READ: usize = 16 * 1024;
/// The in-memory pipe's capacity, each way.
const PIPE_BYTES: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// The pipe between the two tunnel drivers
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Wire {
    bytes: Vec<u8>,
    read: usize,
    reader: Option<Waker>,
    writer: Option<Waker>,
    closed: bool,
}

struct PipeEnd {
    rx: Rc<RefCell<Wire>>,
    tx: Rc<RefCell<Wire>>,
}

fn pipe() -> (PipeEnd, PipeEnd) {
    let (a, b) = (
        Rc::<RefCell<Wire>>::default(),
        Rc::<RefCell<Wire>>::default(),
    );
    (
        PipeEnd {
            rx: a.clone(),
            tx: b.clone(),
        },
        PipeEnd { rx: b, tx: a },
    )
}

impl AsyncRead for PipeEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut wire = self.rx.borrow_mut();
        let wire = &mut *wire;
        let available = wire.bytes.len() - wire.read;
        if available == 0 {
            if wire.closed {
                return Poll::Ready(Ok(0));
            }
            wire.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = available.min(buf.len());
        buf[..n].copy_from_slice(&wire.bytes[wire.read..wire.read + n]);
        wire.read += n;
        if wire.read == wire.bytes.len() {
            wire.bytes.clear();
            wire.read = 0;
        }
        if let Some(w) = wire.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut wire = self.tx.borrow_mut();
        let held = wire.bytes.len() - wire.read;
        if held >= PIPE_BYTES {
            wire.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(PIPE_BYTES - held);
        wire.bytes.extend_from_slice(&buf[..n]);
        if let Some(w) = wire.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wire = self.tx.borrow_mut();
        wire.closed = true;
        if let Some(w) = wire.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------------
// The user's socket (a source) and the backend's (a sink)
// ---------------------------------------------------------------------------------------------

/// Reads hand out `left` bytes of the pattern, 16 KiB at most per read; writes are refused
/// (nothing comes back in this workload).
struct UserSocket {
    pos: usize,
    left: usize,
}

impl AsyncRead for UserSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(self.left).min(SOURCE_READ);
        buf[..n].copy_from_slice(&pattern_block()[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % PERIOD;
        self.left -= n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for UserSocket {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::other("nothing comes back in this workload")))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads are at EOF at once; writes copy into a 64 KiB scratch buffer (the kernel's copy) and,
/// when `check`, are compared with the pattern.
struct BackendSocket {
    scratch: Vec<u8>,
    pos: usize,
    received: Rc<RefCell<usize>>,
    check: bool,
}

impl AsyncRead for BackendSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(0))
    }
}

impl AsyncWrite for BackendSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = buf.len().min(this.scratch.len());
        this.scratch[..n].copy_from_slice(&buf[..n]);
        if this.check {
            for (i, &b) in buf[..n].iter().enumerate() {
                assert_eq!(
                    b,
                    pattern_block()[(this.pos + i) % PERIOD],
                    "byte {}",
                    this.pos + i
                );
            }
        }
        this.pos += n;
        *this.received.borrow_mut() += n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A tunnel stream `splice` does not recognize: it takes the copying path.
struct Opaque(MuxStream);

impl AsyncRead for Opaque {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Opaque {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    CopyFree,
    Copying,
}

/// Moves `total` bytes over `streams` concurrent sessions (each `total / streams`) through both
/// splices; returns the time from the first open to the last byte at the backends.
async fn run(path: Path, streams: usize, total: usize, check: bool) -> Duration {
    let (a, b) = pipe();
    let (engine, engine_driver) = Tunnel::spawn(a, Role::Server, mux::Config::default());
    let (agent, agent_driver) = Tunnel::spawn(b, Role::Client, mux::Config::default());
    let per_stream = total / streams;
    let received = Rc::new(RefCell::new(0usize));
    let started = Instant::now();
    let agent_side = {
        let received = received.clone();
        glommio::spawn_local(async move {
            let mut sessions = Vec::new();
            for _ in 0..streams {
                let stream = agent.accept().await.unwrap().accept().unwrap();
                let backend = BackendSocket {
                    scratch: vec![0u8; 64 * 1024],
                    pos: 0,
                    received: received.clone(),
                    check,
                };
                sessions.push(glommio::spawn_local(async move {
                    match path {
                        Path::CopyFree => splice(stream, backend).await.unwrap(),
                        Path::Copying => splice(Opaque(stream), backend).await.unwrap(),
                    }
                }));
            }
            for session in sessions {
                let spliced = session.await;
                assert_eq!(spliced.a_to_b, per_stream as u64);
            }
            agent
        })
    };
    let mut sessions = Vec::new();
    for _ in 0..streams {
        let stream = engine.open(b"bench").await.unwrap();
        let user = UserSocket {
            pos: 0,
            left: per_stream,
        };
        sessions.push(glommio::spawn_local(async move {
            match path {
                Path::CopyFree => splice(user, stream).await.unwrap(),
                Path::Copying => splice(user, Opaque(stream)).await.unwrap(),
            }
        }));
    }
    for session in sessions {
        assert_eq!(
            session.await,
            Spliced {
                a_to_b: per_stream as u64,
                b_to_a: 0
            }
        );
    }
    let agent = agent_side.await;
    let elapsed = started.elapsed();
    assert_eq!(*received.borrow(), per_stream * streams);
    drop((engine, agent));
    engine_driver.await;
    agent_driver.await;
    elapsed
}

#[test]
fn both_paths_move_every_byte() {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(|| async move {
            for path in [Path::CopyFree, Path::Copying] {
                for streams in [1, 8] {
                    run(path, streams, 4 * MIB + 8 * 12_345, true).await;
                }
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
#[ignore = "a measurement: run with --profile bench -- --ignored --nocapture"]
fn measure_splice_paths() {
    const TOTAL: usize = 64 * MIB;
    const RUNS: usize = 7;
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(|| async move {
            for streams in [1usize, 16] {
                let (mut free, mut copying) = (Vec::new(), Vec::new());
                // One warm-up of each, then alternate.
                run(Path::CopyFree, streams, TOTAL, false).await;
                run(Path::Copying, streams, TOTAL, false).await;
                for _ in 0..RUNS {
                    free.push(run(Path::CopyFree, streams, TOTAL, false).await);
                    copying.push(run(Path::Copying, streams, TOTAL, false).await);
                }
                free.sort_unstable();
                copying.sort_unstable();
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let ratios: Vec<String> = free
                    .iter()
                    .zip(&copying)
                    .map(|(f, c)| format!("{:.2}", c.as_secs_f64() / f.as_secs_f64()))
                    .collect();
                println!(
                    "splice, {streams} stream(s), 64 MiB: copy-free median {:.1} ms \
                     ({:.0} MiB/s), copying median {:.1} ms ({:.0} MiB/s); ratio copying / \
                     copy-free, sorted pairs: [{}], of medians {:.2}x",
                    ms(free[RUNS / 2]),
                    64.0 / free[RUNS / 2].as_secs_f64(),
                    ms(copying[RUNS / 2]),
                    64.0 / copying[RUNS / 2].as_secs_f64(),
                    ratios.join(", "),
                    copying[RUNS / 2].as_secs_f64() / free[RUNS / 2].as_secs_f64()
                );
            }
        })
        .unwrap()
        .join()
        .unwrap();
}
