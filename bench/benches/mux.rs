//! Tunnel multiplexer throughput: Jaunt's sans-IO `mux::Conn` against the `yamux` crate on the
//! same workload and the same in-memory pipe.
//!
//! Workload: 64 MiB from the opening side to the accepting side in 16 KiB application writes,
//! either on one stream or spread over 64 interleaved streams (1 MiB each), every stream
//! half-closed at the end and read to EOF by a 64 KiB application read buffer. Each iteration
//! sets up a fresh pair of endpoints, so stream open and window ramp-up are included.
//!
//! The pipe: one unbounded byte queue per direction. A write copies into it and a read copies
//! out, as a socket or a TLS buffer would; each side reads into the buffer it chooses (yamux:
//! its frame buffers; Jaunt: `Conn::input_buf`, which is the stream's own receive buffer inside
//! large DATA payloads). So on both sides a payload byte is copied four times: into the frame
//! queue, into the pipe, out of the pipe, out to the application's 64 KiB read buffer.
//!
//! Jaunt is driven by a plain loop (it is sans-IO) shaped like an event-loop tick: one 16 KiB
//! write per stream that has credit, one `poll_transmit` flush, then the reader drains. yamux is
//! driven by `futures::executor::LocalPool` (the `block_on` family, no tokio) with one task per
//! stream end plus one per connection. yamux runs with its default configuration (256 KiB initial stream
//! window, 16 KiB frames). No encryption on either side: this measures framing, buffering and
//! flow control only.
//!
//! `cargo bench -p jaunt-bench --bench mux -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::channel::mpsc;
use futures::executor::LocalPool;
use futures::future::poll_fn;
use futures::task::LocalSpawnExt;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use jaunt_engine::mux::{Config, Conn, Event, Role, StreamId};

/// Bytes moved per iteration.
const TOTAL: usize = 64 * 1024 * 1024;
/// Application write size.
const WRITE: usize = 16 * 1024;
/// Application read size.
const READ: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// The pipe shared by both implementations
// ---------------------------------------------------------------------------------------------

/// FIFO of bytes: appends at the end, reads from `start`, compacts when the dead prefix is large.
#[derive(Default)]
struct ByteQueue {
    buf: Vec<u8>,
    start: usize,
}

impl ByteQueue {
    fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.is_empty() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn read(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.buf.len() - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }
}

// ---------------------------------------------------------------------------------------------
// Jaunt
// ---------------------------------------------------------------------------------------------

/// Moves `TOTAL` bytes over `streams` streams from engine to agent; returns bytes received.
fn run_jaunt(streams: usize) -> u64 {
    let now = Instant::now();
    let mut engine = Conn::new(Role::Server, Config::default(), now);
    let mut agent = Conn::new(Role::Client, Config::default(), now);
    let (mut to_agent, mut to_engine) = (ByteQueue::default(), ByteQueue::default());
    let per_stream = TOTAL / streams;
    let ids: Vec<StreamId> = (0..streams)
        .map(|_| engine.open_stream(b"bench").unwrap())
        .collect();
    let mut sent = vec![0usize; streams];
    let mut finished = vec![false; streams];
    let payload = vec![0xa5u8; WRITE];
    let mut wire = Vec::with_capacity(1 << 20);
    let mut app_buf = vec![0u8; READ];
    let (mut received, mut eofs) = (0u64, 0usize);
    while eofs < streams {
        // Engine application, one event-loop tick: one 16 KiB write on every stream that has
        // data and credit (a readable user socket), then one flush of everything queued.
        for (i, &id) in ids.iter().enumerate() {
            if finished[i] {
                continue;
            }
            let want = WRITE.min(per_stream - sent[i]);
            if want == 0 {
                engine.finish(id).unwrap();
                finished[i] = true;
                continue;
            }
            sent[i] += engine.send(id, &payload[..want]).unwrap();
        }
        engine.poll_transmit(&mut wire);
        to_agent.write(&wire);
        wire.clear();
        // Agent: socket reads (into the buffer the core asks for: large payloads land in their
        // stream directly), then the application drains readable streams.
        loop {
            let n = to_agent.read(agent.input_buf());
            if n == 0 {
                break;
            }
            agent.input_commit(n, now).unwrap();
            while let Some(event) = agent.poll_event() {
                match event {
                    Event::StreamOpened { id, .. } => agent.open_result(id, Ok(())).unwrap(),
                    Event::Readable { id } => loop {
                        let n = agent.recv(id, &mut app_buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        received += n as u64;
                    },
                    Event::StreamFinished { id } => {
                        agent.finish(id).unwrap();
                        eofs += 1;
                    }
                    _ => {}
                }
            }
        }
        agent.poll_transmit(&mut wire);
        to_engine.write(&wire);
        wire.clear();
        loop {
            let n = to_engine.read(engine.input_buf());
            if n == 0 {
                break;
            }
            engine.input_commit(n, now).unwrap();
            // Writable events need no handling: the loop above retries every unfinished stream.
            while engine.poll_event().is_some() {}
        }
    }
    received
}

// ---------------------------------------------------------------------------------------------
// yamux
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct PipeState {
    queue: ByteQueue,
    reader: Option<Waker>,
    closed: bool,
}

/// One end of an in-memory duplex pipe, as futures `AsyncRead + AsyncWrite`.
struct PipeEnd {
    rx: Rc<RefCell<PipeState>>,
    tx: Rc<RefCell<PipeState>>,
}

fn duplex() -> (PipeEnd, PipeEnd) {
    let (a, b) = (Rc::new(RefCell::default()), Rc::new(RefCell::default()));
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
        let mut state = self.rx.borrow_mut();
        if state.queue.is_empty() {
            if state.closed {
                return Poll::Ready(Ok(0));
            }
            state.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(state.queue.read(buf)))
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.tx.borrow_mut();
        state.queue.write(buf);
        if let Some(waker) = state.reader.take() {
            waker.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.tx.borrow_mut();
        state.closed = true;
        if let Some(waker) = state.reader.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }
}

/// Same workload through yamux; returns bytes received.
fn run_yamux(streams: usize) -> u64 {
    let (client_io, server_io) = duplex();
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let (done_tx, mut done_rx) = mpsc::unbounded::<u64>();
    let per_stream = TOTAL / streams;

    let server_spawner = spawner.clone();
    spawner
        .spawn_local(async move {
            let mut conn =
                yamux::Connection::new(server_io, yamux::Config::default(), yamux::Mode::Server);
            while let Some(Ok(mut stream)) = poll_fn(|cx| conn.poll_next_inbound(cx)).await {
                let done = done_tx.clone();
                server_spawner
                    .spawn_local(async move {
                        let mut buf = vec![0u8; READ];
                        let mut received = 0u64;
                        loop {
                            let n = stream.read(&mut buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            received += n as u64;
                        }
                        done.unbounded_send(received).unwrap();
                    })
                    .unwrap();
            }
        })
        .unwrap();

    let client_spawner = spawner.clone();
    spawner
        .spawn_local(async move {
            let mut conn =
                yamux::Connection::new(client_io, yamux::Config::default(), yamux::Mode::Client);
            for _ in 0..streams {
                let mut stream = poll_fn(|cx| conn.poll_new_outbound(cx)).await.unwrap();
                client_spawner
                    .spawn_local(async move {
                        let payload = vec![0xa5u8; WRITE];
                        let mut left = per_stream;
                        while left > 0 {
                            let n = WRITE.min(left);
                            stream.write_all(&payload[..n]).await.unwrap();
                            left -= n;
                        }
                        stream.close().await.unwrap();
                    })
                    .unwrap();
            }
            // The connection only makes progress while polled.
            while let Some(result) = poll_fn(|cx| conn.poll_next_inbound(cx)).await {
                result.unwrap();
            }
        })
        .unwrap();

    pool.run_until(async {
        let mut received = 0;
        for _ in 0..streams {
            received += done_rx.next().await.unwrap();
        }
        received
    })
}

// ---------------------------------------------------------------------------------------------

fn mux_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("mux");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    for streams in [1usize, 64] {
        group.bench_with_input(BenchmarkId::new("jaunt", streams), &streams, |b, &s| {
            b.iter(|| assert_eq!(run_jaunt(s), TOTAL as u64))
        });
        group.bench_with_input(BenchmarkId::new("yamux", streams), &streams, |b, &s| {
            b.iter(|| assert_eq!(run_yamux(s), TOTAL as u64))
        });
    }
    group.finish();
}

criterion_group!(benches, mux_throughput);
criterion_main!(benches);
