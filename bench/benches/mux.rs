//! Tunnel multiplexer throughput: Jaunt's sans-IO `mux::Conn` against the `yamux` crate on the
//! same workload, the same application I/O and the same in-memory pipe.
//!
//! Workload: 64 MiB from the opening side to the accepting side, either on one stream or spread
//! over 64 interleaved streams (1 MiB each), every stream half-closed at the end and read to
//! EOF. Each iteration sets up a fresh pair of endpoints, so stream open and window ramp-up are
//! included. Groups `single_stream` and `64_streams`, throughput in payload bytes.
//!
//! What both muxes do per byte, as the engine does when it splices a user's connection into a
//! tunnel:
//!
//! * The sending application reads its bytes from a [`Source`] (a user's socket) in reads of
//!   16 KiB (a TLS record), and the receiving application writes them to a [`Sink`] (the
//!   user's socket on the other side) in writes of up to 64 KiB. A source read copies the bytes
//!   into the buffer the application offers, a sink write copies them out, as the kernel does.
//! * The two muxes talk through the [`Pipe`]: one byte queue per direction, a write copies into
//!   it and a read copies out, as a socket or a TLS stream does.
//!
//! Each mux uses its best API for that:
//!
//! * `jaunt`: reads the source straight into the send queue (`Conn::send_buf` +
//!   `send_commit`), writes the queue's batches straight to the pipe (`transmit_buf` +
//!   `transmit_advance`), reads the pipe straight into the buffer the core asks for
//!   (`input_buf` + `input_commit`: the stream's own receive buffer inside large payloads), and
//!   writes the sink straight from the receive buffer (`read_buf` + `consume`). Four copies per
//!   byte: source → queue → pipe → stream buffer → sink.
//! * `yamux`: a task per stream end on `futures::executor::LocalPool` (no tokio) plus one per
//!   connection; the writer reads the source into a 16 KiB buffer and `write_all`s it, the
//!   reader `read`s into a 64 KiB buffer and writes that to the sink; yamux frames each write
//!   into its own buffer and reads each frame body into a fresh one, then into the caller's.
//!   Six copies per byte: source → app buffer → frame → pipe → frame body → app buffer → sink.
//!   Default configuration (256 KiB stream window, 16 KiB frames).
//! * `jaunt_copy_api`: Jaunt through its copying calls (`send` from and `recv` into the same
//!   application buffers as yamux, the pipe still in place), the way `tunnel::splice` drives a
//!   `MuxStream` today: the same six copies as yamux, so the difference is framing, buffering
//!   and flow control alone.
//!
//! No encryption on either side. A run first moves one iteration of each with every byte
//! checked against the source at the sink; the timed iterations skip the check.
//!
//! Copies of 2 KiB and more on AMD Zen 3/4 with a glibc lacking the fix for its bug 30994 (the
//! bench host: AMD EPYC, Debian 12, glibc 2.36) go through `rep movsb`, which is ~20× slower
//! when the destination is 1..=31 bytes past the source modulo 64. The harness's own copies
//! (source, sink, pipe) avoid that layout the way the Jaunt core does (`copy` below), so that
//! neither mux's result depends on where the allocator put the harness's buffers; yamux's
//! internal copies are left as they are, and on such a host some of them hit it. Running with
//! `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4294967295` takes `rep movsb` out of every
//! copy, yamux's included (what fixed glibc does on those CPUs): the comparison where nobody
//! hits it, and the stricter one for Jaunt.
//!
//! `cargo bench -p jaunt-bench --bench mux -- --warm-up-time 1 --measurement-time 4`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::OnceLock;
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
/// Application read size from the source.
const WRITE: usize = 16 * 1024;
/// Application write size to the sink (and yamux's application read buffer).
const READ: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// What both muxes share: copies, the user's sockets, the pipe
// ---------------------------------------------------------------------------------------------

/// The harness's copy (the kernel's or TLS's, in real life), the same for both muxes: a plain
/// `memcpy`, in 2 KiB pieces when the layout would send a large one down glibc's slow
/// `rep movsb` case (see the module docs).
fn copy(dst: &mut [u8], src: &[u8]) {
    const CHUNK: usize = 2048;
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    let skew = (dst.as_ptr() as usize).wrapping_sub(src.as_ptr() as usize) % 64;
    if n <= CHUNK || !(1..32).contains(&skew) {
        dst.copy_from_slice(src);
    } else {
        for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
            d.copy_from_slice(s);
        }
    }
}

/// Period of the source pattern: a prime, so no buffer or frame size lines up with it.
const PERIOD: usize = 1_048_573;

/// The pattern all sources read from, followed by the first read's worth of it again, so that
/// any read is one slice.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut out = Vec::with_capacity(PERIOD + READ + 8);
        while out.len() < PERIOD {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(PERIOD);
        out.extend_from_within(..READ);
        out
    })
}

/// Where stream `stream`'s bytes start in the pattern.
fn start_of(stream: usize) -> usize {
    stream * 7919 % PERIOD
}

/// A user's socket on the sending side: `len` bytes of the pattern, handed out by copy.
struct Source {
    pos: usize,
    left: usize,
}

impl Source {
    fn new(stream: usize, len: usize) -> Source {
        Source {
            pos: start_of(stream),
            left: len,
        }
    }

    /// Reads up to `buf.len()` bytes (at most [`READ`]); 0 at the end.
    fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.left).min(READ);
        copy(&mut buf[..n], &pattern()[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % PERIOD;
        self.left -= n;
        n
    }
}

/// A user's socket on the receiving side: a write copies the bytes into the socket's buffer
/// (one per tunnel side, reused), and, in the checking run, compares them with the source.
struct Sink {
    buf: Rc<RefCell<Vec<u8>>>,
    pos: usize,
    received: u64,
    check: bool,
}

impl Sink {
    fn new(buf: &Rc<RefCell<Vec<u8>>>, stream: usize, check: bool) -> Sink {
        Sink {
            buf: buf.clone(),
            pos: start_of(stream),
            received: 0,
            check,
        }
    }

    /// Writes up to [`READ`] bytes of `data`; returns how many it took.
    fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(READ);
        let mut buf = self.buf.borrow_mut();
        copy(&mut buf[..n], &data[..n]);
        if self.check {
            assert!(
                buf[..n] == pattern()[self.pos..self.pos + n],
                "wrong bytes at offset {}",
                self.received
            );
        }
        self.pos = (self.pos + n) % PERIOD;
        self.received += n as u64;
        n
    }
}

fn sink_buffer() -> Rc<RefCell<Vec<u8>>> {
    Rc::new(RefCell::new(vec![0u8; READ]))
}

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
        // `copy`'s layout rule, appending (no zeroing first).
        self.buf.reserve(bytes.len());
        let dst = self.buf.as_ptr() as usize + self.buf.len();
        let skew = dst.wrapping_sub(bytes.as_ptr() as usize) % 64;
        if bytes.len() <= 2048 || !(1..32).contains(&skew) {
            self.buf.extend_from_slice(bytes);
        } else {
            for chunk in bytes.chunks(2048) {
                self.buf.extend_from_slice(chunk);
            }
        }
    }

    fn read(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.buf.len() - self.start);
        copy(&mut out[..n], &self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }
}

// ---------------------------------------------------------------------------------------------
// Jaunt
// ---------------------------------------------------------------------------------------------

/// How the Jaunt applications move their bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum JauntApi {
    /// `send_buf`/`send_commit` from the source, `read_buf`/`consume` to the sink.
    ZeroCopy,
    /// `send` from and `recv` into application buffers, as `splice` over `MuxStream` does.
    Copying,
}

/// Moves `TOTAL` bytes over `streams` streams from engine to agent; returns bytes received.
/// The pipe is driven in place (`transmit_buf`, `input_buf`) either way.
fn run_jaunt(streams: usize, api: JauntApi, check: bool) -> u64 {
    let now = Instant::now();
    let mut engine = Conn::new(Role::Server, Config::default(), now);
    let mut agent = Conn::new(Role::Client, Config::default(), now);
    let (mut to_agent, mut to_engine) = (ByteQueue::default(), ByteQueue::default());
    let per_stream = TOTAL / streams;
    let ids: Vec<StreamId> = (0..streams)
        .map(|_| engine.open_stream(b"bench").unwrap())
        .collect();
    let mut sources: Vec<Source> = (0..streams).map(|i| Source::new(i, per_stream)).collect();
    let sink_buf = sink_buffer();
    let mut sinks: Vec<Sink> = (0..streams)
        .map(|i| Sink::new(&sink_buf, i, check))
        .collect();
    let mut finished = vec![false; streams];
    // The copying API's application buffers (the same sizes as yamux's).
    let mut write_buf = vec![0u8; WRITE];
    let mut read_buf = vec![0u8; READ];
    let mut eofs = 0;
    while eofs < streams {
        // Engine application, one event-loop tick: one 16 KiB source read on every stream that
        // has data and credit (a readable user socket), then the writes to the tunnel socket.
        for (i, &id) in ids.iter().enumerate() {
            if finished[i] {
                continue;
            }
            if sources[i].left == 0 {
                engine.finish(id).unwrap();
                finished[i] = true;
                continue;
            }
            let want = WRITE.min(sources[i].left);
            match api {
                JauntApi::ZeroCopy => {
                    let room = engine.send_buf(id, want).unwrap();
                    if room.is_empty() {
                        continue;
                    }
                    let n = sources[i].read(room);
                    engine.send_commit(id, n).unwrap();
                }
                JauntApi::Copying => {
                    // Read only what the stream takes, as a splice that waits for `Writable`
                    // before reading its socket.
                    let want = want.min(engine.send_capacity(id).unwrap());
                    if want == 0 {
                        continue;
                    }
                    let n = sources[i].read(&mut write_buf[..want]);
                    assert_eq!(engine.send(id, &write_buf[..n]).unwrap(), n);
                }
            }
        }
        transmit(&mut engine, &mut to_agent);
        // Agent: tunnel socket reads into the buffer the core asks for, then the application
        // drains readable streams into their sinks.
        loop {
            let n = to_agent.read(agent.input_buf());
            if n == 0 {
                break;
            }
            agent.input_commit(n, now).unwrap();
            while let Some(event) = agent.poll_event() {
                match event {
                    Event::StreamOpened { id, .. } => agent.open_result(id, Ok(())).unwrap(),
                    Event::Readable { id } => {
                        let sink = &mut sinks[(id.get() / 2) as usize];
                        match api {
                            JauntApi::ZeroCopy => loop {
                                let data = agent.read_buf(id).unwrap();
                                if data.is_empty() {
                                    break;
                                }
                                let n = sink.write(data);
                                agent.consume(id, n).unwrap();
                            },
                            JauntApi::Copying => loop {
                                let n = agent.recv(id, &mut read_buf).unwrap();
                                if n == 0 {
                                    break;
                                }
                                assert_eq!(sink.write(&read_buf[..n]), n);
                            },
                        }
                    }
                    Event::StreamFinished { id } => {
                        agent.finish(id).unwrap();
                        eofs += 1;
                    }
                    _ => {}
                }
            }
        }
        transmit(&mut agent, &mut to_engine);
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
    sinks.iter().map(|s| s.received).sum()
}

/// Writes everything `conn` has queued to `pipe`, straight from the core's queue.
fn transmit(conn: &mut Conn, pipe: &mut ByteQueue) {
    loop {
        let batch = conn.transmit_buf();
        if batch.is_empty() {
            break;
        }
        let n = batch.len();
        pipe.write(batch);
        conn.transmit_advance(n);
    }
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
fn run_yamux(streams: usize, check: bool) -> u64 {
    let (client_io, server_io) = duplex();
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let (done_tx, mut done_rx) = mpsc::unbounded::<u64>();
    let per_stream = TOTAL / streams;
    let sink_buf = sink_buffer();

    let server_spawner = spawner.clone();
    spawner
        .spawn_local(async move {
            let mut conn =
                yamux::Connection::new(server_io, yamux::Config::default(), yamux::Mode::Server);
            while let Some(Ok(mut stream)) = poll_fn(|cx| conn.poll_next_inbound(cx)).await {
                let done = done_tx.clone();
                // The client's ids are 1, 3, 5, … in the order it opened the streams.
                let index = (stream.id().val() / 2) as usize;
                let mut sink = Sink::new(&sink_buf, index, check);
                server_spawner
                    .spawn_local(async move {
                        let mut buf = vec![0u8; READ];
                        loop {
                            let n = stream.read(&mut buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            assert_eq!(sink.write(&buf[..n]), n);
                        }
                        done.unbounded_send(sink.received).unwrap();
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
            for i in 0..streams {
                let mut stream = poll_fn(|cx| conn.poll_new_outbound(cx)).await.unwrap();
                client_spawner
                    .spawn_local(async move {
                        let mut source = Source::new(i, per_stream);
                        let mut buf = vec![0u8; WRITE];
                        loop {
                            let n = source.read(&mut buf);
                            if n == 0 {
                                break;
                            }
                            stream.write_all(&buf[..n]).await.unwrap();
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
    for (group_name, streams) in [("single_stream", 1usize), ("64_streams", 64)] {
        // Every byte of one iteration of each, checked at the sink, before timing.
        assert_eq!(run_jaunt(streams, JauntApi::ZeroCopy, true), TOTAL as u64);
        assert_eq!(run_jaunt(streams, JauntApi::Copying, true), TOTAL as u64);
        assert_eq!(run_yamux(streams, true), TOTAL as u64);

        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Bytes(TOTAL as u64));
        group.sample_size(10);
        group.bench_with_input(BenchmarkId::new("jaunt", streams), &streams, |b, &s| {
            b.iter(|| assert_eq!(run_jaunt(s, JauntApi::ZeroCopy, false), TOTAL as u64))
        });
        group.bench_with_input(BenchmarkId::new("yamux", streams), &streams, |b, &s| {
            b.iter(|| assert_eq!(run_yamux(s, false), TOTAL as u64))
        });
        group.bench_with_input(
            BenchmarkId::new("jaunt_copy_api", streams),
            &streams,
            |b, &s| b.iter(|| assert_eq!(run_jaunt(s, JauntApi::Copying, false), TOTAL as u64)),
        );
        group.finish();
    }
}

criterion_group!(benches, mux_throughput);
criterion_main!(benches);
