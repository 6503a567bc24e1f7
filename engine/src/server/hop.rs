//! The cross-shard hop: a user stream whose shard has no tunnel to the target's agent (the
//! agent is reconnecting, or has not covered every shard yet) is served through a shard that
//! has one.
//!
//! The user's shard keeps everything that is the user's: TLS, the dial request, authorization,
//! the session registry (locks, certificate expiry), the idle timeout, audit and byte counts.
//! It asks the tunnel's shard to open the stream ([`Frame::Open`] with the same
//! `StreamHeader`); that shard opens it on its tunnel and splices it with its end of the hop.
//! From then on the bytes travel between the two executors in chunks.
//!
//! # Channels
//!
//! One bounded glommio `shared_channel` per ordered shard pair, made at boot
//! ([`mesh`]) and connected by each shard's two tasks per peer: a *pump* that moves this
//! shard's outgoing [`HopMsg`]s into the channel to that peer, and a *demux* that hands the
//! peer's messages to the hop ends they name. Every hop between two shards shares their pair
//! of channels, so a hop costs no channel set-up and no `connect` rendezvous, and the
//! channels' wakers stay one per task (glommio appends a waker per pending poll; a task that
//! is polled only when its channel wakes it keeps that list at one entry). The SPSC ring is
//! lock-free; no `Mutex` anywhere on the data path.
//!
//! # Bounds and flow control
//!
//! Each direction of a hop has [`HOP_WINDOW_CHUNKS`] chunks of at most [`HOP_CHUNK_BYTES`] in
//! flight: a writer spends a credit per chunk and waits (`Pending`) without one; the reader
//! returns a credit ([`Frame::Credit`]) when it has consumed a chunk. So a hop holds at most
//! 2 × 4 × 32 KiB of data, and the outgoing queue of a pump holds at most a few messages per
//! live hop (its chunks, the credits it owes, open/answer/FIN/RESET), whatever the channel's
//! state: bounded by the connections of both shards. The channel's own capacity
//! ([`PAIR_CHANNEL_SLOTS`]) only decides when a pump waits.
//!
//! Half-close travels as [`Frame::Fin`] after the last chunk (`poll_close` on a [`HopStream`]),
//! a failure or an abandoned end as [`Frame::Reset`] (dropping a [`HopStream`] before both
//! directions finished). A peer shard that stops (its channel closes) resets every hop with it.
//!
//! # Which shard has the tunnel
//!
//! The user's shard asks the engine-wide directory (`inventory.rs`), which it already consults
//! on every dial that finds no tunnel on its own shard: it returns the shards the agent has a
//! tunnel to. The answer is a hint, not a promise: the tunnel's shard checks its own table when
//! the [`Frame::Open`] arrives and answers [`HopRefusal::NoTunnel`] if the tunnel is gone, and
//! the user's shard then tries the next candidate. Alternatives considered: a per-shard
//! read-only copy of "who has which tunnel", updated by messages, costs every shard a message
//! per tunnel up or down (shards × changes in a reconnect storm, exactly when hops happen) to
//! save one lock on a path that runs only while an agent reconnects; asking shards in turn
//! costs a round trip per shard that does not have it. The directory's `Mutex` stays off every
//! dial that finds its tunnel locally.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{GlommioError, ResourceType};

use crate::server::io::with_deadline;
use crate::tunnel::{self, Lend, OpenError, Tunnel};

/// What the hops need from their shard: its hop state, its index, and its tunnel to an agent
/// while it takes new streams. The shard (`shard.rs`) implements it, so that this module does
/// not depend on the shard's type (the shard holds the [`Hops`]).
pub(crate) trait HopShard: 'static {
    /// The shard's hop state.
    fn hops(&self) -> &Rc<Hops>;
    /// The shard's index, for logs.
    fn index(&self) -> usize;
    /// This shard's usable tunnel to agent `host_id`, unless the shard is draining.
    fn serving_tunnel(&self, host_id: &str) -> Option<Tunnel>;
    /// Serves a connection another shard accepted and handed over ([`Hops::hand_over`]).
    fn adopt(self: &Rc<Self>, adopted: Adopted);
}

/// A connection accepted by one shard and handed to another: an agent's tunnel connection
/// whose ClientHello asked for that shard (`jaunt_config::wire::parse_shard_hint`). The
/// accepting shard read the ClientHello and nothing else; the adopting shard serves it from
/// there as if it had accepted it.
#[derive(Debug)]
pub(crate) struct Adopted {
    /// The socket (a duplicate of the accepting shard's descriptor, which it closed).
    pub stream: std::net::TcpStream,
    /// The bytes read so far: the complete ClientHello.
    pub hello: Vec<u8>,
    /// When the accepting shard accepted it: its handshake deadline counts from here.
    pub accepted_at: Instant,
}

/// Most bytes in one chunk: two TLS records, half a mux DATA frame.
pub const HOP_CHUNK_BYTES: usize = 32 * 1024;

/// Chunks in flight per direction of a hop (sent, not yet consumed by the other end).
pub const HOP_WINDOW_CHUNKS: u32 = 4;

/// Messages a pair channel holds; a pump with more to send waits for room.
pub const PAIR_CHANNEL_SLOTS: usize = 256;

/// One message between two shards about one hop.
#[derive(Debug)]
pub(crate) struct HopMsg {
    /// Chosen by the opening shard, unique among its hops.
    id: u64,
    /// The message is for the opener's end (else for the serving end).
    to_opener: bool,
    frame: Frame,
}

/// What a [`HopMsg`] says.
#[derive(Debug)]
pub(crate) enum Frame {
    /// Opener → server: open a stream on your tunnel to `host_id` with this header, answer by
    /// `deadline`.
    Open {
        host_id: String,
        header: Vec<u8>,
        deadline: Instant,
    },
    /// Server → opener: the stream is open; bytes may flow.
    Opened,
    /// Server → opener: no stream.
    Refused(HopRefusal),
    /// `buf[..len]` is the stream's next `len` (> 0) bytes; costs the sender a credit. `buf` is
    /// a [`HOP_CHUNK_BYTES`] chunk, read into in place by the sender.
    Data { buf: Vec<u8>, len: usize },
    /// One chunk was consumed: the receiver of this message may send another, and may reuse
    /// `buf` (the chunk, handed back) for it.
    Credit { buf: Option<Vec<u8>> },
    /// No more data this way (after the last chunk).
    Fin,
    /// The hop is over, both ways.
    Reset,
    /// Not about a hop: a connection handed over to the receiving shard (its `id` and
    /// `to_opener` mean nothing). The pair channels are the only shard-to-shard path, so
    /// hand-overs take them rather than a second mesh.
    Adopt(Adopted),
}

/// Why the serving shard opened no stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HopRefusal {
    /// It has no usable tunnel to the agent (any more).
    NoTunnel,
    /// The tunnel could not take a new stream (closing, going away, full).
    Unavailable(String),
    /// The agent refused the stream (it could not reach the target).
    Refused(String),
    /// The agent did not answer in time.
    TimedOut,
    /// The shard is gone or the hop was reset meanwhile.
    Gone,
}

impl fmt::Display for HopRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HopRefusal::NoTunnel => f.write_str("no tunnel to the agent on that shard"),
            HopRefusal::Unavailable(why) => write!(f, "the tunnel cannot take a new stream: {why}"),
            HopRefusal::Refused(message) => f.write_str(message),
            HopRefusal::TimedOut => f.write_str("the agent did not answer in time"),
            HopRefusal::Gone => f.write_str("the shard with the tunnel is gone"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Boot

/// One shard's halves of the pair channels: to each other shard and from each.
pub(crate) struct HopBoot {
    senders: Vec<(usize, SharedSender<HopMsg>)>,
    receivers: Vec<(usize, SharedReceiver<HopMsg>)>,
}

/// The pair channels of an engine of `shards` shards: one per ordered pair, handed out per
/// shard (index `i` gets its senders to and receivers from every other shard).
pub(crate) fn mesh(shards: usize) -> Vec<HopBoot> {
    let mut boots: Vec<HopBoot> = (0..shards)
        .map(|_| HopBoot {
            senders: Vec::new(),
            receivers: Vec::new(),
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from == to {
                continue;
            }
            let (tx, rx) = shared_channel::new_bounded(PAIR_CHANNEL_SLOTS);
            if let Some(boot) = boots.get_mut(from) {
                boot.senders.push((to, tx));
            }
            if let Some(boot) = boots.get_mut(to) {
                boot.receivers.push((from, rx));
            }
        }
    }
    boots
}

/// Spawns this shard's pump and demux tasks (they connect their channel halves, which waits
/// for the peer shard to connect its own). The caller cancels them when the shard stops: they
/// run until their peer goes, and an executor that returns with tasks pending never drops
/// them, which would leak the shard (and the audit and inventory senders it holds).
pub(crate) fn start<S: HopShard>(shard: &Rc<S>, boot: HopBoot) -> Vec<glommio::Task<()>> {
    let mut tasks = Vec::with_capacity(boot.senders.len() + boot.receivers.len());
    for (peer, tx) in boot.senders {
        tasks.push(glommio::spawn_local(pump(
            Rc::clone(shard.hops()),
            peer,
            tx,
        )));
    }
    for (peer, rx) in boot.receivers {
        tasks.push(glommio::spawn_local(demux(Rc::clone(shard), peer, rx)));
    }
    tasks
}

async fn pump(hops: Rc<Hops>, peer: usize, tx: SharedSender<HopMsg>) {
    let tx = tx.connect().await;
    loop {
        let msg = std::future::poll_fn(|cx| hops.next_outgoing(peer, cx)).await;
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => {
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    hops.peer_gone(peer);
}

async fn demux<S: HopShard>(shard: Rc<S>, peer: usize, rx: SharedReceiver<HopMsg>) {
    let rx = rx.connect().await;
    while let Some(msg) = rx.recv().await {
        dispatch(&shard, peer, msg);
    }
    shard.hops().peer_gone(peer);
}

// ---------------------------------------------------------------------------------------------
// Per-shard state

/// Identifies a hop end on this shard: the other shard, the opener's id, whether we opened it.
type Key = (usize, u64, bool);

/// One shard's hops: its outgoing queue per peer and its hop ends.
pub(crate) struct Hops {
    peers: Vec<Peer>,
    next_id: Cell<u64>,
    ends: RefCell<HashMap<Key, Rc<RefCell<End>>>>,
}

/// Outgoing messages to one peer shard, for its pump.
#[derive(Default)]
struct Peer {
    queue: RefCell<VecDeque<HopMsg>>,
    waker: RefCell<Option<Waker>>,
    gone: Cell<bool>,
}

/// One end of a hop.
struct End {
    /// Received chunks (buffer, length) not yet consumed, at most the window; the front one
    /// from `read_pos`.
    inbox: VecDeque<(Vec<u8>, usize)>,
    read_pos: usize,
    /// Chunks handed back with credits, for the next writes (at most the window).
    spare: Vec<Vec<u8>>,
    /// Chunks we may still send.
    credit: u32,
    fin_in: bool,
    fin_out: bool,
    /// The other end reset the hop, or its shard is gone.
    reset: bool,
    /// The opener's end: the answer to its open.
    answer: Option<Result<(), HopRefusal>>,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl End {
    fn new() -> End {
        End {
            inbox: VecDeque::new(),
            read_pos: 0,
            spare: Vec::new(),
            credit: HOP_WINDOW_CHUNKS,
            fin_in: false,
            fin_out: false,
            reset: false,
            answer: None,
            reader: None,
            writer: None,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

impl Hops {
    pub(crate) fn new(shards: usize) -> Hops {
        Hops {
            peers: (0..shards).map(|_| Peer::default()).collect(),
            next_id: Cell::new(0),
            ends: RefCell::new(HashMap::new()),
        }
    }

    /// Hands connection `adopted` to shard `peer`, which serves it from its ClientHello on
    /// ([`HopShard::adopt`]). Gives it back if that shard is gone.
    pub(crate) fn hand_over(&self, peer: usize, adopted: Adopted) -> Result<(), Adopted> {
        match self.peers.get(peer) {
            Some(p) if !p.gone.get() => {}
            _ => return Err(adopted),
        }
        let sent = self.send((peer, 0, true), Frame::Adopt(adopted));
        debug_assert!(sent, "checked just above");
        Ok(())
    }

    /// Queues `frame` for hop end `key`'s counterpart; `false` if that shard is gone.
    fn send(&self, key: Key, frame: Frame) -> bool {
        let (peer, id, opened_here) = key;
        let Some(p) = self.peers.get(peer) else {
            return false;
        };
        if p.gone.get() {
            return false;
        }
        p.queue.borrow_mut().push_back(HopMsg {
            id,
            to_opener: !opened_here,
            frame,
        });
        if let Some(w) = p.waker.borrow_mut().take() {
            w.wake();
        }
        true
    }

    fn next_outgoing(&self, peer: usize, cx: &mut Context<'_>) -> Poll<HopMsg> {
        let Some(p) = self.peers.get(peer) else {
            return Poll::Pending;
        };
        if let Some(msg) = p.queue.borrow_mut().pop_front() {
            return Poll::Ready(msg);
        }
        register(&mut p.waker.borrow_mut(), cx.waker());
        Poll::Pending
    }

    /// The channel to or from `peer` closed (that shard stopped): every hop with it is reset.
    fn peer_gone(&self, peer: usize) {
        if let Some(p) = self.peers.get(peer) {
            p.gone.set(true);
            p.queue.borrow_mut().clear();
        }
        for (key, end) in self.ends.borrow().iter() {
            if key.0 == peer {
                let mut end = end.borrow_mut();
                end.reset = true;
                end.wake();
            }
        }
    }

    fn new_end(self: &Rc<Self>, key: Key) -> HopStream {
        let end = Rc::new(RefCell::new(End::new()));
        self.ends.borrow_mut().insert(key, Rc::clone(&end));
        HopStream {
            hops: Rc::clone(self),
            key,
            end,
        }
    }

    /// Asks shard `peer` to open a stream to `host_id` with `header`; the returned stream is
    /// usable once [`HopStream::opened`] says so.
    pub(crate) fn open(
        self: &Rc<Self>,
        peer: usize,
        host_id: &str,
        header: &[u8],
        deadline: Instant,
    ) -> HopStream {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let stream = self.new_end((peer, id, true));
        let sent = self.send(
            stream.key,
            Frame::Open {
                host_id: host_id.to_owned(),
                header: header.to_vec(),
                deadline,
            },
        );
        if !sent {
            stream.end.borrow_mut().answer = Some(Err(HopRefusal::Gone));
        }
        stream
    }
}

/// A message from shard `peer`; an open is served by a task of its own.
fn dispatch<S: HopShard>(shard: &Rc<S>, peer: usize, msg: HopMsg) {
    let msg = match msg.frame {
        Frame::Adopt(adopted) => return shard.adopt(adopted),
        frame => HopMsg { frame, ..msg },
    };
    if let Some(open) = shard.hops().deliver(peer, msg) {
        let OpenRequest {
            stream,
            host_id,
            header,
            deadline,
        } = open;
        glommio::spawn_local(serve(Rc::clone(shard), stream, host_id, header, deadline)).detach();
    }
}

/// A peer's [`Frame::Open`], with the serving end made for it.
struct OpenRequest {
    stream: HopStream,
    host_id: String,
    header: Vec<u8>,
    deadline: Instant,
}

impl Hops {
    /// Hands a message from shard `peer` to the hop end it names; returns a new open for the
    /// caller to serve.
    fn deliver(self: &Rc<Self>, peer: usize, msg: HopMsg) -> Option<OpenRequest> {
        let hops = self;
        let key = (peer, msg.id, msg.to_opener);
        if let Frame::Open {
            host_id,
            header,
            deadline,
        } = msg.frame
        {
            if msg.to_opener || hops.ends.borrow().contains_key(&key) {
                return None;
            }
            return Some(OpenRequest {
                stream: hops.new_end(key),
                host_id,
                header,
                deadline,
            });
        }
        let Some(end) = hops.ends.borrow().get(&key).cloned() else {
            // Its end is gone here (and told the peer so, unless both directions had finished).
            return None;
        };
        hops.update(key, &end, msg.frame);
        None
    }

    fn update(&self, key: Key, end: &Rc<RefCell<End>>, frame: Frame) {
        let hops = self;
        let mut e = end.borrow_mut();
        match frame {
            Frame::Open { .. } => {}
            Frame::Opened => {
                if e.answer.is_none() {
                    e.answer = Some(Ok(()));
                }
            }
            Frame::Refused(refusal) => {
                if e.answer.is_none() {
                    e.answer = Some(Err(refusal));
                    // The serving end is gone already: nothing to reset.
                    e.fin_in = true;
                    e.fin_out = true;
                }
            }
            Frame::Data { buf, len } => {
                if e.fin_in
                    || e.inbox.len() >= HOP_WINDOW_CHUNKS as usize
                    || len == 0
                    || len > buf.len()
                {
                    // Past the FIN or the window: not what our own code sends; end the hop.
                    e.reset = true;
                    drop(e);
                    hops.send(key, Frame::Reset);
                    end.borrow_mut().wake();
                    return;
                }
                e.inbox.push_back((buf, len));
            }
            Frame::Credit { buf } => {
                e.credit = (e.credit + 1).min(HOP_WINDOW_CHUNKS);
                if let Some(buf) = buf {
                    if e.spare.len() < HOP_WINDOW_CHUNKS as usize && buf.len() == HOP_CHUNK_BYTES {
                        e.spare.push(buf);
                    }
                }
            }
            Frame::Fin => e.fin_in = true,
            Frame::Reset => e.reset = true,
            // Taken by `dispatch` before it gets here.
            Frame::Adopt(_) => {}
        }
        e.wake();
    }
}

/// The serving shard's side of a hop: open the stream on this shard's tunnel, answer, splice.
async fn serve<S: HopShard>(
    shard: Rc<S>,
    stream: HopStream,
    host_id: String,
    header: Vec<u8>,
    deadline: Instant,
) {
    let Some(tunnel) = shard.serving_tunnel(&host_id) else {
        return stream.answer(Err(HopRefusal::NoTunnel));
    };
    // Give up as soon as the opener does (it resets its end on its own deadline).
    let opened = futures_lite::future::or(
        async { Some(with_deadline(deadline, tunnel.open(&header)).await) },
        async {
            stream.reset_seen().await;
            None
        },
    )
    .await;
    drop(tunnel);
    let upstream = match opened {
        None => return,
        Some(Ok(Ok(upstream))) => upstream,
        Some(Ok(Err(OpenError::Refused { message }))) => {
            return stream.answer(Err(HopRefusal::Refused(message)))
        }
        Some(Ok(Err(e))) => return stream.answer(Err(HopRefusal::Unavailable(e.to_string()))),
        Some(Err(_)) => return stream.answer(Err(HopRefusal::TimedOut)),
    };
    stream.answer(Ok(()));
    if let Err(e) = tunnel::splice(stream, upstream).await {
        tracing::debug!(shard = shard.index(), %host_id, error = %e, "cross-shard hop ended");
    }
}

// ---------------------------------------------------------------------------------------------
// The stream

/// One end of a hop as a byte stream, for [`tunnel::splice`]: reads the other shard's chunks,
/// writes chunks to it (at most [`HOP_CHUNK_BYTES`] per write, `Pending` without credit),
/// `poll_close` half-closes, dropping it before both directions finished resets the hop.
/// Errors: `ConnectionReset` once the hop was reset or the other shard is gone, `BrokenPipe`
/// when writing after `poll_close`.
pub(crate) struct HopStream {
    hops: Rc<Hops>,
    key: Key,
    end: Rc<RefCell<End>>,
}

impl HopStream {
    /// The opener's end: waits for the serving shard's answer.
    pub(crate) async fn opened(&self) -> Result<(), HopRefusal> {
        std::future::poll_fn(|cx| {
            let mut end = self.end.borrow_mut();
            if let Some(answer) = &end.answer {
                return Poll::Ready(answer.clone());
            }
            if end.reset {
                return Poll::Ready(Err(HopRefusal::Gone));
            }
            register(&mut end.reader, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// The serving end: answers the open. A refusal ends the hop (the opener drops its end).
    fn answer(&self, result: Result<(), HopRefusal>) {
        let refused = result.is_err();
        let frame = match result {
            Ok(()) => Frame::Opened,
            Err(refusal) => Frame::Refused(refusal),
        };
        self.hops.send(self.key, frame);
        if refused {
            // Nothing more to say: no RESET on drop.
            let mut end = self.end.borrow_mut();
            end.fin_in = true;
            end.fin_out = true;
        }
    }

    /// Completes once the other end reset the hop (or its shard is gone).
    async fn reset_seen(&self) {
        std::future::poll_fn(|cx| {
            let mut end = self.end.borrow_mut();
            if end.reset {
                return Poll::Ready(());
            }
            register(&mut end.reader, cx.waker());
            Poll::Pending
        })
        .await;
    }
}

fn hop_reset() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "cross-shard hop reset (the stream on the other shard ended, or that shard stopped)",
    )
}

impl Lend for HopStream {
    /// Room in a chunk (a spare one handed back by the other end, or a new one) for at most
    /// `min(max, HOP_CHUNK_BYTES)` bytes; the chunk travels as it is.
    fn poll_write_with<F>(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        fill: F,
    ) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &mut [u8]) -> Poll<io::Result<usize>>,
    {
        let mut end = self.end.borrow_mut();
        if end.reset {
            return Poll::Ready(Err(hop_reset()));
        }
        if end.fin_out {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the hop was closed for writing",
            )));
        }
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        if end.credit == 0 {
            register(&mut end.writer, cx.waker());
            return Poll::Pending;
        }
        let mut buf = end
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; HOP_CHUNK_BYTES]);
        let room = max.min(buf.len());
        let filled = match buf.get_mut(..room) {
            Some(room) => fill(cx, room),
            None => Poll::Ready(Ok(0)),
        };
        match filled {
            Poll::Ready(Ok(n)) if n > 0 => {
                let len = n.min(room);
                end.credit -= 1;
                if !self.hops.send(self.key, Frame::Data { buf, len }) {
                    end.reset = true;
                    return Poll::Ready(Err(hop_reset()));
                }
                Poll::Ready(Ok(len))
            }
            other => {
                end.spare.push(buf);
                other
            }
        }
    }

    /// The front chunk's bytes; a chunk taken whole goes back to the other end with its credit.
    fn poll_read_with<F>(&mut self, cx: &mut Context<'_>, drain: F) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>>,
    {
        let mut end = self.end.borrow_mut();
        let end = &mut *end;
        if end.reset {
            return Poll::Ready(Err(hop_reset()));
        }
        let Some((buf, len)) = end.inbox.front() else {
            if end.fin_in {
                return Poll::Ready(Ok(0));
            }
            register(&mut end.reader, cx.waker());
            return Poll::Pending;
        };
        let len = *len;
        let data = buf.get(end.read_pos..len).unwrap_or_default();
        let available = data.len();
        let n = match drain(cx, data) {
            Poll::Ready(Ok(n)) => n.min(available),
            other => return other,
        };
        end.read_pos += n;
        if end.read_pos >= len {
            end.read_pos = 0;
            if let Some((buf, _)) = end.inbox.pop_front() {
                self.hops.send(self.key, Frame::Credit { buf: Some(buf) });
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for HopStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            let end = this.end.borrow();
            return Poll::Ready(if end.reset { Err(hop_reset()) } else { Ok(0) });
        }
        this.poll_read_with(cx, |_, data| {
            let n = data.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..n), data.get(..n)) {
                dst.copy_from_slice(src);
            }
            Poll::Ready(Ok(n))
        })
    }
}

impl AsyncWrite for HopStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, buf.len(), |_, room| {
            let n = room.len().min(buf.len());
            if let (Some(dst), Some(src)) = (room.get_mut(..n), buf.get(..n)) {
                dst.copy_from_slice(src);
            }
            Poll::Ready(Ok(n))
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut end = this.end.borrow_mut();
        if end.reset {
            return Poll::Ready(Err(hop_reset()));
        }
        if !end.fin_out {
            end.fin_out = true;
            this.hops.send(this.key, Frame::Fin);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for HopStream {
    fn drop(&mut self) {
        self.hops.ends.borrow_mut().remove(&self.key);
        let end = self.end.borrow();
        let finished = end.fin_in && end.fin_out;
        if !end.reset && !finished {
            self.hops.send(self.key, Frame::Reset);
        }
    }
}

impl fmt::Debug for HopStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HopStream")
            .field("peer", &self.key.0)
            .field("id", &self.key.1)
            .field("opened_here", &self.key.2)
            .finish()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Moves every message queued on `from` (shard `from_index`) for shard `to_index` into
    /// `to`; returns the opens it delivered.
    fn carry(from: &Hops, from_index: usize, to: &Rc<Hops>, to_index: usize) -> Vec<OpenRequest> {
        let msgs: Vec<HopMsg> = from.peers[to_index].queue.borrow_mut().drain(..).collect();
        msgs.into_iter()
            .filter_map(|msg| to.deliver(from_index, msg))
            .collect()
    }

    fn queued(hops: &Hops, peer: usize) -> usize {
        hops.peers[peer].queue.borrow().len()
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn write(stream: &mut HopStream, bytes: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(stream).poll_write(&mut cx(), bytes)
    }

    fn read_all(stream: &mut HopStream) -> (Vec<u8>, Poll<io::Result<usize>>) {
        let mut out = Vec::new();
        loop {
            let mut buf = [0u8; 10_000];
            match Pin::new(&mut *stream).poll_read(&mut cx(), &mut buf) {
                Poll::Ready(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                other => return (out, other),
            }
        }
    }

    /// Shard 0 opens a hop served by shard 1; both ends, after the answer.
    fn opened_pair() -> (Rc<Hops>, Rc<Hops>, HopStream, HopStream) {
        let (a, b) = (Rc::new(Hops::new(2)), Rc::new(Hops::new(2)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let opener = a.open(1, "host-1", b"header", deadline);
        let mut opens = carry(&a, 0, &b, 1);
        assert_eq!(opens.len(), 1);
        let open = opens.remove(0);
        assert_eq!(
            (open.host_id.as_str(), open.header.as_slice()),
            ("host-1", &b"header"[..])
        );
        open.stream.answer(Ok(()));
        carry(&b, 1, &a, 0);
        assert_eq!(futures_lite::future::block_on(opener.opened()), Ok(()));
        (a, b, opener, open.stream)
    }

    #[test]
    fn chunks_flow_within_the_window_and_fins_travel() {
        let (a, b, mut opener, mut served) = opened_pair();
        let big = vec![7u8; 40_000];
        for _ in 0..HOP_WINDOW_CHUNKS {
            assert!(matches!(
                write(&mut opener, &big),
                Poll::Ready(Ok(HOP_CHUNK_BYTES))
            ));
        }
        // No credit left: the writer waits, whatever the size.
        assert!(write(&mut opener, b"x").is_pending());
        assert_eq!(queued(&a, 1), HOP_WINDOW_CHUNKS as usize);
        carry(&a, 0, &b, 1);
        // A partial read returns no credit; a whole chunk does, with its buffer.
        let mut buf = vec![0u8; 1000];
        assert!(matches!(
            Pin::new(&mut served).poll_read(&mut cx(), &mut buf),
            Poll::Ready(Ok(1000))
        ));
        assert_eq!(queued(&b, 0), 0);
        let mut rest = vec![0u8; HOP_CHUNK_BYTES];
        assert!(matches!(
            Pin::new(&mut served).poll_read(&mut cx(), &mut rest),
            Poll::Ready(Ok(n)) if n == HOP_CHUNK_BYTES - 1000
        ));
        assert_eq!(queued(&b, 0), 1);
        carry(&b, 1, &a, 0);
        assert_eq!(opener.end.borrow().spare.len(), 1);
        assert!(matches!(write(&mut opener, b"tail"), Poll::Ready(Ok(4))));
        assert_eq!(
            opener.end.borrow().spare.len(),
            0,
            "the returned chunk is reused"
        );
        assert!(Pin::new(&mut opener).poll_close(&mut cx()).is_ready());
        carry(&a, 0, &b, 1);
        let (bytes, end) = read_all(&mut served);
        assert_eq!(bytes.len(), 3 * HOP_CHUNK_BYTES + 4);
        assert!(bytes.ends_with(b"tail"));
        assert!(matches!(end, Poll::Ready(Ok(0))), "EOF after the FIN");
        // The other way still flows after the half-close.
        assert!(matches!(write(&mut served, b"reply"), Poll::Ready(Ok(5))));
        assert!(Pin::new(&mut served).poll_close(&mut cx()).is_ready());
        carry(&b, 1, &a, 0);
        let (bytes, end) = read_all(&mut opener);
        assert_eq!(bytes, b"reply");
        assert!(matches!(end, Poll::Ready(Ok(0))));
        // Finished both ways: dropping either end resets nothing.
        drop((opener, served));
        assert_eq!(queued(&a, 1) + queued(&b, 0), 1, "only the last credit");
        carry(&a, 0, &b, 1);
        carry(&b, 1, &a, 0);
        assert!(a.ends.borrow().is_empty() && b.ends.borrow().is_empty());
    }

    #[test]
    fn dropping_an_end_resets_the_other() {
        let (a, b, opener, mut served) = opened_pair();
        drop(opener);
        carry(&a, 0, &b, 1);
        let (_, end) = read_all(&mut served);
        assert!(matches!(end, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset));
        assert!(write(&mut served, b"x").is_ready());
        drop(served);
        assert_eq!(queued(&b, 0), 0, "a reset end sends no reset back");
    }

    #[test]
    fn a_gone_peer_resets_its_hops_and_refuses_new_ones() {
        let (a, _b, mut opener, _served) = opened_pair();
        a.peer_gone(1);
        assert!(matches!(write(&mut opener, b"x"), Poll::Ready(Err(_))));
        let late = a.open(1, "host-1", b"header", Instant::now());
        assert_eq!(
            futures_lite::future::block_on(late.opened()),
            Err(HopRefusal::Gone)
        );
    }

    #[test]
    fn data_past_the_window_ends_the_hop() {
        let (_a, b, _opener, mut served) = opened_pair();
        for i in 0..=HOP_WINDOW_CHUNKS {
            let msg = HopMsg {
                id: served.key.1,
                to_opener: false,
                frame: Frame::Data {
                    buf: vec![0; HOP_CHUNK_BYTES],
                    len: 10,
                },
            };
            assert!(b.deliver(0, msg).is_none());
            let reset = served.end.borrow().reset;
            assert_eq!(reset, i == HOP_WINDOW_CHUNKS, "chunk {i}");
        }
        assert_eq!(queued(&b, 0), 1, "the RESET");
        let (_, end) = read_all(&mut served);
        assert!(matches!(end, Poll::Ready(Err(_))));
    }
}
