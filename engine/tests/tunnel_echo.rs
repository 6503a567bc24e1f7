//! The tunnel shell over real loopback TCP and TLS (rustls with the ring provider, throwaway
//! rcgen certificates): the engine side ([`Role::Server`]) opens streams, the agent side
//! ([`Role::Client`]) accepts them and echoes, refuses or holds them by dial header.
//!
//! What is checked here: bulk echo integrity (100 MiB on one stream, 64 concurrent streams),
//! per-stream flow control isolation (a stalled reader does not block another stream),
//! half-close, refusal, the peer dying under open streams, `splice` byte counts with half-close
//! through two splices, ping, and that tunnels end by a graceful drain when the engine lets go.
//! The sans-IO core has its own simulation tests in `mux_sim.rs`.
//!
//! Stream contents are a deterministic pattern (a pseudo-random block with a prime period,
//! offset per stream); the receiver compares every byte against it at its offset, which is
//! stricter than comparing checksums at the end. No test orders events with sleeps: every wait
//! is on the event itself, bounded by a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::{TlsAcceptor, TlsConnector};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use glommio::task::JoinHandle;
use glommio::{LocalExecutorBuilder, Placement};
use jaunt_engine::mux::{self, Role, INITIAL_STREAM_WINDOW};
use jaunt_engine::tunnel::{splice, CloseReason, Incoming, MuxStream, OpenError, Spliced, Tunnel};
use jaunt_testkit::pattern::{pattern_block, PATTERN_CHUNK as CHUNK, PATTERN_PERIOD as PERIOD};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const MIB: u64 = 1024 * 1024;

/// Bound on anything a test waits for; generous for a loaded 2-core debug build.
const DEADLINE: Duration = Duration::from_secs(60);

/// Bound on noticing that the peer died: no keepalive is involved, only the transport's EOF.
const DEATH_NOTICED_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Stream contents
// ---------------------------------------------------------------------------------------------

/// The `len` (≤ [`CHUNK`]) bytes of stream `seed`'s pattern at `offset`.
fn pattern(seed: u64, offset: u64, len: usize) -> &'static [u8] {
    assert!(len <= CHUNK);
    let start = ((offset + seed.wrapping_mul(7919)) % PERIOD as u64) as usize;
    &pattern_block()[start..start + len]
}

/// Writes `total` bytes of stream `seed`'s pattern in chunks of varying size (so frames and TLS
/// records fall everywhere), then half-closes.
async fn write_pattern<W: AsyncWrite + Unpin>(
    mut w: W,
    seed: u64,
    total: u64,
    progress: Option<&Cell<u64>>,
) {
    const SIZES: [usize; 6] = [CHUNK, 1000, 16 * 1024, 7, 40_000, CHUNK - 1];
    let mut offset = 0u64;
    let mut i = 0;
    while offset < total {
        let len = SIZES[i % SIZES.len()].min((total - offset) as usize);
        i += 1;
        w.write_all(pattern(seed, offset, len))
            .await
            .expect("write");
        offset += len as u64;
        if let Some(p) = progress {
            p.set(offset);
        }
    }
    w.close().await.expect("close");
}

/// Reads to EOF, checking every byte against stream `seed`'s pattern; returns the count.
async fn read_pattern<R: AsyncRead + Unpin>(mut r: R, seed: u64) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            return offset;
        }
        assert!(
            buf[..n] == *pattern(seed, offset, n),
            "stream {seed}: corrupt data in {n} bytes at offset {offset}"
        );
        offset += n as u64;
    }
}

/// Writes `total` pattern bytes and reads the echo back concurrently; checks both counts.
async fn echo_roundtrip(stream: &MuxStream, seed: u64, total: u64) {
    let (_, echoed) = future::zip(
        write_pattern(stream, seed, total, None),
        read_pattern(stream, seed),
    )
    .await;
    assert_eq!(echoed, total, "stream {seed}: echoed byte count");
}

// ---------------------------------------------------------------------------------------------
// Agent behaviour, chosen by dial header
// ---------------------------------------------------------------------------------------------

/// What the test agent does with a stream, by dial header:
/// `echo` echoes until EOF then half-closes; `refuse` refuses with [`REFUSAL`];
/// `count` reads to EOF checking pattern seed 0, then replies `got N` and half-closes.
async fn serve(tunnel: Tunnel) {
    while let Some(incoming) = tunnel.accept().await {
        glommio::spawn_local(handle(incoming)).detach();
    }
}

const REFUSAL: &str = "no route to db-7";

async fn handle(incoming: Incoming) {
    match incoming.header.as_slice() {
        b"echo" => echo(incoming.accept().expect("accept")).await,
        b"refuse" => incoming.refuse(REFUSAL),
        b"count" => count_and_reply(incoming.accept().expect("accept")).await,
        other => panic!(
            "unexpected dial header {:?}",
            String::from_utf8_lossy(other)
        ),
    }
}

async fn echo(stream: MuxStream) {
    let mut buf = vec![0u8; CHUNK];
    let mut s = &stream;
    loop {
        let n = s.read(&mut buf).await.expect("echo read");
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await.expect("echo write");
    }
    s.close().await.expect("echo close");
    // Keep the stream until the engine has read everything: dropping it first would be a
    // reset only if the engine had not finished, and it has (we saw its FIN), so this is clean.
}

async fn count_and_reply(stream: MuxStream) {
    let n = read_pattern(&stream, 0).await;
    let mut s = &stream;
    s.write_all(format!("got {n}").as_bytes())
        .await
        .expect("reply");
    s.close().await.expect("close");
}

// ---------------------------------------------------------------------------------------------
// Harness: TLS, executors, tunnels
// ---------------------------------------------------------------------------------------------

fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_der: CertificateDer<'static> = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .unwrap();
    server.alpn_protocols = vec![b"jaunt-tunnel".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"jaunt-tunnel".to_vec()];
    (Arc::new(server), Arc::new(client))
}

fn executor(name: &str) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name(name)
        .io_memory(64 << 10)
}

fn config() -> mux::Config {
    mux::Config::default()
}

type Driver = JoinHandle<CloseReason>;

async fn engine_side(listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> (Tunnel, Driver) {
    let tcp = listener.accept().await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = TlsAcceptor::from(tls).accept(tcp).await.unwrap();
    Tunnel::spawn(EofWatch(tls), Role::Server, config())
}

thread_local! {
    /// Whether the engine's transport (on this executor's thread) has returned EOF, and who
    /// waits for it.
    static ENGINE_EOF: RefCell<(bool, Option<Waker>)> = const { RefCell::new((false, None)) };
}

/// The engine's transport, reporting its EOF to [`engine_saw_eof`]: lets a test wait for the
/// driver to have seen the peer's close, instead of sleeping.
struct EofWatch<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for EofWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.0).poll_read(cx, buf);
        if let Poll::Ready(Ok(0)) = result {
            ENGINE_EOF.with_borrow_mut(|(seen, waker)| {
                *seen = true;
                if let Some(w) = waker.take() {
                    w.wake();
                }
            });
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EofWatch<S> {
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

/// Resolves once the engine's driver has read EOF from its transport.
async fn engine_saw_eof() {
    future::poll_fn(|cx| {
        ENGINE_EOF.with_borrow_mut(|(seen, waker)| {
            if *seen {
                Poll::Ready(())
            } else {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    })
    .await
}

async fn agent_side(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> (Tunnel, Driver) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    Tunnel::spawn(tls, Role::Client, config())
}

/// The engine and the agent in two executors on two threads, joined by one TLS tunnel.
fn two_executors<E, EF, ET, A, AF, AT>(engine: E, agent: A) -> (ET, AT)
where
    E: FnOnce(Tunnel, Driver) -> EF + Send + 'static,
    EF: Future<Output = ET> + 'static,
    ET: Send + 'static,
    A: FnOnce(Tunnel, Driver) -> AF + Send + 'static,
    AF: Future<Output = AT> + 'static,
    AT: Send + 'static,
{
    let (server_tls, client_tls) = tls_configs();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let engine = executor("engine")
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let (tunnel, driver) = engine_side(listener, server_tls).await;
            within(DEADLINE, engine(tunnel, driver)).await
        })
        .unwrap();
    let addr = addr_rx.recv().unwrap();
    let agent = executor("agent")
        .spawn(move || async move {
            let (tunnel, driver) = agent_side(addr, client_tls).await;
            within(DEADLINE, agent(tunnel, driver)).await
        })
        .unwrap();
    let engine_out = engine.join().expect("engine executor panicked");
    let agent_out = agent.join().expect("agent executor panicked");
    (engine_out, agent_out)
}

/// Engine and agent as tasks of one executor.
fn one_executor<F, Fut>(body: F)
where
    F: FnOnce((Tunnel, Driver), (Tunnel, Driver)) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (server_tls, client_tls) = tls_configs();
    executor("tunnel")
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let engine = glommio::spawn_local(engine_side(listener, server_tls));
            let agent = agent_side(addr, client_tls).await;
            let engine = engine.await;
            within(DEADLINE, body(engine, agent)).await;
        })
        .unwrap()
        .join()
        .expect("executor panicked");
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    glommio::timer::timeout(limit, async { Ok(fut.await) })
        .await
        .unwrap_or_else(|_| panic!("not done within {limit:?}"))
}

/// Lets go of the tunnel (a drain) and waits for its driver; returns why it ended.
async fn finish(tunnel: Tunnel, driver: Driver) -> CloseReason {
    drop(tunnel);
    within(DEADLINE, driver)
        .await
        .expect("driver task cancelled")
}

/// The agent's side of most tests: serve until the engine drains, then report the end.
async fn agent_serves(tunnel: Tunnel, driver: Driver) -> CloseReason {
    serve(tunnel).await;
    within(DEADLINE, driver)
        .await
        .expect("driver task cancelled")
}

fn assert_drained(reason: &CloseReason) {
    assert!(reason.is_graceful(), "tunnel did not drain: {reason}");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// (1) One stream echoes 100 MiB intact, engine and agent on two executors; then the engine lets
/// go and both ends drain gracefully. Prints the throughput.
#[test]
fn one_stream_echoes_100_mib() {
    let total = 100 * MIB;
    let (engine, agent) = two_executors(
        move |tunnel, driver| async move {
            let stream = tunnel.open(b"echo").await.unwrap();
            let start = Instant::now();
            echo_roundtrip(&stream, 1, total).await;
            let elapsed = start.elapsed();
            drop(stream);
            (elapsed, finish(tunnel, driver).await)
        },
        agent_serves,
    );
    let (elapsed, engine_end) = engine;
    let mib_s = (total / MIB) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "tunnel echo: 100 MiB each way through TLS + mux in {:.2} s = {mib_s:.0} MiB/s each way",
        elapsed.as_secs_f64()
    );
    assert_drained(&engine_end);
    assert_drained(&agent);
}

/// (2) 64 concurrent streams each echo 2 MiB intact (engine and agent in one executor).
#[test]
fn concurrent_streams_echo_intact() {
    const STREAMS: u64 = 64;
    one_executor(
        |(engine, engine_driver), (agent, agent_driver)| async move {
            let server = glommio::spawn_local(agent_serves(agent, agent_driver));
            let tasks: Vec<_> = (0..STREAMS)
                .map(|seed| {
                    let engine = engine.clone();
                    glommio::spawn_local(async move {
                        let stream = engine.open(b"echo").await.unwrap();
                        echo_roundtrip(&stream, seed, 2 * MIB).await;
                    })
                })
                .collect();
            assert!(engine.stream_count() <= STREAMS as usize);
            for task in tasks {
                task.await;
            }
            assert_drained(&finish(engine, engine_driver).await);
            assert_drained(&server.await);
        },
    );
}

/// (3) A stream whose reader stalls holds at most one window and does not block another stream,
/// which echoes 8 MiB meanwhile; released, the stalled one completes intact.
#[test]
fn stalled_reader_does_not_block_other_streams() {
    one_executor(
        |(engine, engine_driver), (agent, agent_driver)| async move {
            let gate = Rc::new(Semaphore::new(0));
            let agent_gate = gate.clone();
            let server = glommio::spawn_local(async move {
                while let Some(incoming) = agent.accept().await {
                    if incoming.header == b"stall" {
                        let gate = agent_gate.clone();
                        glommio::spawn_local(async move {
                            let stream = incoming.accept().unwrap();
                            gate.acquire(1).await.unwrap();
                            count_and_reply(stream).await;
                        })
                        .detach();
                    } else {
                        glommio::spawn_local(handle(incoming)).detach();
                    }
                }
                within(DEADLINE, agent_driver).await.unwrap()
            });

            let stalled = Rc::new(engine.open(b"stall").await.unwrap());
            let written = Rc::new(Cell::new(0u64));
            let writer = {
                let (stalled, written) = (stalled.clone(), written.clone());
                glommio::spawn_local(async move {
                    write_pattern(&*stalled, 0, 4 * MIB, Some(&written)).await;
                })
            };
            let flowing = engine.open(b"echo").await.unwrap();
            echo_roundtrip(&flowing, 7, 8 * MIB).await;
            let held = written.get();
            assert!(
                held <= u64::from(INITIAL_STREAM_WINDOW),
                "the stalled stream took {held} bytes, more than its window"
            );
            assert!(
                held < 4 * MIB,
                "the stalled stream's writer was never blocked"
            );

            gate.signal(1);
            writer.await;
            let mut reply = String::new();
            (&*stalled).read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, format!("got {}", 4 * MIB));
            drop((flowing, stalled));
            assert_drained(&finish(engine, engine_driver).await);
            assert_drained(&server.await);
        },
    );
}

/// (4) Half-close: the agent sees EOF after the engine finishes writing and can still reply.
/// Also: ping measures a round trip.
#[test]
fn half_close_lets_the_peer_reply() {
    let (engine_end, agent_end) = two_executors(
        |tunnel, driver| async move {
            let rtt = tunnel.ping().await.unwrap();
            assert!(rtt < DEADLINE);
            let stream = tunnel.open(b"count").await.unwrap();
            write_pattern(&stream, 0, 1000, None).await;
            let mut reply = String::new();
            (&stream).read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, "got 1000");
            // Finished both ways and fully read: the stream is gone from the core.
            assert_eq!(tunnel.stream_count(), 0);
            drop(stream);
            finish(tunnel, driver).await
        },
        agent_serves,
    );
    assert_drained(&engine_end);
    assert_drained(&agent_end);
}

/// (4b) The drain race: the agent finishes its side, drains and closes the transport while the
/// engine has not yet read the agent's last bytes. The engine still reads them and the FIN, then
/// drains too.
#[test]
fn drained_peer_closing_first_loses_no_data() {
    one_executor(
        |(engine, engine_driver), (agent, agent_driver)| async move {
            let server = glommio::spawn_local(agent_serves(agent, agent_driver));
            let stream = engine.open(b"count").await.unwrap();
            write_pattern(&stream, 0, 5000, None).await;
            engine.go_away();
            // The agent reads our FIN, replies, finishes: its last stream is done, it drains and
            // closes. Only then do we read.
            engine_saw_eof().await;
            let mut reply = String::new();
            (&stream).read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, "got 5000");
            drop(stream);
            assert_drained(&finish(engine, engine_driver).await);
            assert_drained(&server.await);
        },
    );
}

/// (3b) A peer that stops reading does not stop us reading: the engine's transport writes
/// block (the peer reads nothing after our OPENs, and we have 16 MiB for it, far more than the
/// socket buffers hold), yet the 16 MiB the peer sends meanwhile is all received and read. A
/// driver that finished writing before reading again would deadlock here with the peer.
#[test]
fn blocked_transport_writes_do_not_block_reads() {
    const STREAMS: u32 = 64;
    let per_stream = u64::from(INITIAL_STREAM_WINDOW);
    let (server_tls, client_tls) = tls_configs();
    executor("tunnel")
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let engine = glommio::spawn_local(engine_side(listener, server_tls));
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut peer = TlsConnector::from(client_tls)
                .connect(name, tcp)
                .await
                .unwrap();
            let (engine, engine_driver) = engine.await;

            // The engine opens the streams and writes a full window on each.
            let written = Rc::new(Cell::new(0u64));
            let streams: Vec<_> = (0..STREAMS)
                .map(|i| {
                    let (engine, written) = (engine.clone(), written.clone());
                    glommio::spawn_local(async move {
                        let stream = Rc::new(engine.open(b"raw").await.unwrap());
                        let writer = {
                            let stream = stream.clone();
                            glommio::spawn_local(async move {
                                let mut offset = 0;
                                while offset < per_stream {
                                    let chunk = pattern(u64::from(i), offset, 16 * 1024);
                                    if (&*stream).write_all(chunk).await.is_err() {
                                        return;
                                    }
                                    offset += chunk.len() as u64;
                                    written.set(written.get() + chunk.len() as u64);
                                }
                            })
                            .detach()
                        };
                        let mut got = vec![0u8; per_stream as usize];
                        (&*stream).read_exact(&mut got).await.unwrap();
                        for (k, chunk) in got.chunks(CHUNK).enumerate() {
                            let offset = (k * CHUNK) as u64;
                            assert!(chunk == pattern(1000 + u64::from(i), offset, chunk.len()));
                        }
                        (stream, writer)
                    })
                })
                .collect();

            // The raw peer reads only our OPENs, accepts them, then sends a full window of data
            // on every stream and never reads again.
            let mut opens = Vec::new();
            while opens.len() < STREAMS as usize {
                let mut header = [0u8; mux::HEADER_LEN];
                peer.read_exact(&mut header).await.unwrap();
                let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
                let mut payload = vec![0u8; len];
                peer.read_exact(&mut payload).await.unwrap();
                if header[4] == mux::FrameType::Open as u8 {
                    opens.push(u32::from_be_bytes(header[8..12].try_into().unwrap()));
                }
            }
            let mut frames = Vec::new();
            for &id in &opens {
                mux::encode::open_result(&mut frames, id, Ok(()));
            }
            peer.write_all(&frames).await.unwrap();
            for (i, &id) in opens.iter().enumerate() {
                let seed = 1000 + (id as u64 - 1) / 2;
                assert_eq!(seed, 1000 + i as u64, "opens arrive in order");
                let mut offset = 0;
                while offset < per_stream {
                    frames.clear();
                    mux::encode::data(&mut frames, id, false, pattern(seed, offset, CHUNK));
                    peer.write_all(&frames).await.unwrap();
                    offset += CHUNK as u64;
                }
            }
            peer.flush().await.unwrap();

            let mut held = Vec::new();
            for task in streams {
                held.push(within(DEADLINE, task).await);
            }
            let stuck = written.get();
            assert!(
                stuck < u64::from(STREAMS) * per_stream,
                "all {stuck} bytes were written: the transport never blocked, test is void"
            );
            // The peer vanishes; the blocked writes fail and the tunnel ends.
            drop(peer);
            let reason = within(DEADLINE, engine_driver).await.unwrap();
            assert!(!reason.is_graceful(), "{reason}");
            drop((held, engine));
            eprintln!(
                "transport blocked with {stuck} of {} bytes written",
                u64::from(STREAMS) * per_stream
            );
        })
        .unwrap()
        .join()
        .expect("executor panicked");
}

/// (5) A refused open fails with the peer's message, and the tunnel keeps working.
#[test]
fn refused_open_returns_the_peer_message() {
    one_executor(
        |(engine, engine_driver), (agent, agent_driver)| async move {
            let server = glommio::spawn_local(agent_serves(agent, agent_driver));
            match engine.open(b"refuse").await {
                Err(OpenError::Refused { message }) => assert_eq!(message, REFUSAL),
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(engine.stream_count(), 0);
            let stream = engine.open(b"echo").await.unwrap();
            echo_roundtrip(&stream, 3, 100_000).await;
            drop(stream);
            assert_drained(&finish(engine, engine_driver).await);
            assert_drained(&server.await);
        },
    );
}

/// (6) The agent's transport vanishes (its driver task is cancelled: socket closed, no GOAWAY,
/// no close_notify) under a stream blocked in read and one blocked in write: both fail with
/// `ConnectionReset` promptly, and so do new opens.
#[test]
fn peer_death_fails_open_streams_promptly() {
    let (engine_out, ()) = two_executors(
        |tunnel, driver| async move {
            // Blocked in read: the agent accepts and never writes.
            let reading = tunnel.open(b"hold").await.unwrap();
            // Blocked in write: the agent never reads, so one window fills.
            let writing = tunnel.open(b"hold").await.unwrap();
            let write_task = glommio::spawn_local(async move {
                let chunk = vec![0u8; CHUNK];
                loop {
                    if let Err(err) = (&writing).write_all(&chunk).await {
                        return err;
                    }
                }
            });
            let read_task = glommio::spawn_local(async move {
                let mut buf = [0u8; 16];
                (&reading).read(&mut buf).await.unwrap_err()
            });
            // A round trip, so the writer has likely filled its window by now (either way it
            // must fail once the agent is gone).
            tunnel.ping().await.unwrap();
            let start = Instant::now();
            let _die = tunnel.open(b"die").await;
            let read_err = within(DEATH_NOTICED_WITHIN, read_task).await;
            let write_err = within(DEATH_NOTICED_WITHIN, write_task).await;
            let noticed = start.elapsed();
            assert_eq!(
                read_err.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{read_err}"
            );
            assert_eq!(
                write_err.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{write_err}"
            );
            assert!(tunnel.is_closed());
            assert!(matches!(
                tunnel.open(b"echo").await,
                Err(OpenError::Closed(_))
            ));
            let reason = within(DEATH_NOTICED_WITHIN, driver).await.unwrap();
            assert!(!reason.is_graceful(), "{reason}");
            (noticed, reason)
        },
        |tunnel, driver| async move {
            let mut held = Vec::new();
            while let Some(incoming) = tunnel.accept().await {
                if incoming.header == b"die" {
                    // The transport goes with the driver task: fd closed, nothing sent.
                    driver.cancel();
                    assert!(driver.await.is_none());
                    break;
                }
                held.push(incoming.accept().unwrap());
            }
            drop(held);
        },
    );
    let (noticed, reason) = engine_out;
    eprintln!("peer death noticed in {noticed:?}: {reason}");
}

/// (7) splice() counts bytes each way: user ⇄ engine splice ⇄ tunnel ⇄ agent splice ⇄ backend,
/// with the user's half-close travelling to the backend and the backend's reply and EOF back.
#[test]
fn splice_counts_bytes_each_way() {
    const UP: u64 = MIB + 123;
    const DOWN: u64 = 777_777;
    one_executor(
        |(engine, engine_driver), (agent, agent_driver)| async move {
            // The backend service behind the agent: reads the request to EOF, then replies.
            let backend = TcpListener::bind("127.0.0.1:0").unwrap();
            let backend_addr = backend.local_addr().unwrap();
            let service = glommio::spawn_local(async move {
                let mut conn = backend.accept().await.unwrap();
                let got = read_pattern(&mut conn, 11).await;
                write_pattern(&mut conn, 12, DOWN, None).await;
                got
            });
            // The agent: accept the stream, dial the backend, splice.
            let agent_splice = glommio::spawn_local(async move {
                let incoming = agent.accept().await.unwrap();
                assert_eq!(incoming.header, b"tcp backend");
                let stream = incoming.accept().unwrap();
                let conn = TcpStream::connect(backend_addr).await.unwrap();
                let spliced = splice(stream, conn).await.unwrap();
                assert!(agent.accept().await.is_none());
                (spliced, within(DEADLINE, agent_driver).await.unwrap())
            });
            // The user in front of the engine, and the engine's splice.
            let front = TcpListener::bind("127.0.0.1:0").unwrap();
            let front_addr = front.local_addr().unwrap();
            let user = glommio::spawn_local(async move {
                // The backend replies only after the request's EOF, so one direction after the other.
                let mut conn = TcpStream::connect(front_addr).await.unwrap();
                write_pattern(&mut conn, 11, UP, None).await;
                read_pattern(&mut conn, 12).await
            });
            let user_conn = front.accept().await.unwrap();
            let stream = engine.open(b"tcp backend").await.unwrap();
            let engine_spliced = splice(user_conn, stream).await.unwrap();

            assert_eq!(
                engine_spliced,
                Spliced {
                    a_to_b: UP,
                    b_to_a: DOWN
                }
            );
            assert_eq!(user.await, DOWN);
            assert_eq!(service.await, UP);
            assert_drained(&finish(engine, engine_driver).await);
            let (agent_spliced, agent_end) = agent_splice.await;
            assert_eq!(
                agent_spliced,
                Spliced {
                    a_to_b: UP,
                    b_to_a: DOWN
                }
            );
            assert_drained(&agent_end);
        },
    );
}
