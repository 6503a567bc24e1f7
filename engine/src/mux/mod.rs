//! The tunnel multiplexer: many user streams inside one agent↔engine TLS connection.
//!
//! An agent dials out to every engine shard and keeps one TLS connection (a *tunnel*) to each;
//! this module carries many user streams (SSH, PostgreSQL, TCP, HTTP) inside it. What lives here
//! is the **sans-IO core** only: [`Conn`] owns no socket and reads no clock. It is driven with the
//! bytes that arrived and the current time, and hands back bytes to write, events and the next
//! deadline, in the style of `quinn-proto`. The glommio shell that owns the TLS socket, and the
//! splicing of user connections into streams, live elsewhere.
//!
//! # Driving a `Conn`
//!
//! ```text
//! loop {
//!     read from the socket        → conn.handle_input(&bytes, now)?   (partial frames are kept)
//!       or, zero-copy:              n = read(conn.input_buf()); conn.input_commit(n, now)?
//!     while let Some(ev) = conn.poll_event() { … }                    (drain after every input)
//!     stream operations           → conn.open_stream / open_result / send / recv / finish / reset
//!       or, zero-copy:              n = read(user, conn.send_buf(id, max)?); conn.send_commit(id, n)
//!                                   n = write(user, conn.read_buf(id)?); conn.consume(id, n)?
//!     conn.poll_transmit(&mut buf); write buf to the socket; buf.clear()
//!       or, zero-copy:              n = write(sock, conn.transmit_buf()); conn.transmit_advance(n)
//!     sleep until conn.poll_timeout(), then conn.handle_timeout(now)
//! }
//! ```
//!
//! * [`Conn::new`]`(role, config, now)`; [`Role::Server`] is the engine (the TLS server, and the
//!   side that opens streams), [`Role::Client`] the agent.
//! * [`Conn::handle_input`]`(&[u8], now) -> Result<(), MuxError>` consumes every byte it is given;
//!   a frame split across reads is reassembled, and DATA payload is copied straight into the
//!   stream's receive buffer as it arrives (one copy in, one copy out by [`Conn::recv`]).
//! * Zero-copy alternative: [`Conn::input_buf`]`() -> &mut [u8]`, read the socket into it, then
//!   [`Conn::input_commit`]`(n, now)`. Inside a large DATA payload the buffer is the stream's own
//!   receive buffer, so the read is the payload's only copy on the way in.
//! * [`Conn::transmit_buf`]`() -> &[u8]` hands out the next batch of frames straight from the
//!   core's queue — control frames first, then window updates, then data in the order it was
//!   sent — so many small frames share one write and one TLS record; report what the socket took
//!   with [`Conn::transmit_advance`]`(n)`. A batch is finished before the next one starts, so a
//!   partial write never cuts a frame. [`Conn::poll_transmit`]`(&mut Vec<u8>) -> usize` does the
//!   same by appending (copying) everything ready into the caller's buffer.
//! * Zero-copy send: [`Conn::send_buf`]`(id, max) -> &mut [u8]` is room for the stream's next
//!   bytes inside the transmit queue, after a frame header reserved in place; read the user's
//!   socket into it and [`Conn::send_commit`]`(id, n)`. With `read_buf`/`consume` on the other
//!   side and `input_buf`/`transmit_buf` on the tunnel socket, a payload byte is copied by the
//!   mux's caller only: user socket → queue → tunnel socket, tunnel socket → stream buffer →
//!   user socket.
//! * [`Conn::poll_event`] yields [`Event`]s: `StreamOpened`, `OpenResult`, `Readable`, `Writable`,
//!   `StreamFinished`, `StreamReset`, `Pong`, `GoAway`, `Closed`. `Readable` and `Writable` are
//!   edge-triggered: after `Readable`, read until [`Conn::recv`] returns 0; after a short
//!   [`Conn::send`] (or an empty [`Conn::send_buf`]), wait for `Writable`. `StreamFinished`
//!   (peer half-closed) comes only once every byte before the FIN has been read. The shell must
//!   drain events after every `handle_input`.
//! * [`Conn::poll_timeout`] / [`Conn::handle_timeout`]: a keepalive PING after
//!   [`Config::keepalive_interval`] of silence from the peer, and the tunnel closes with
//!   [`CloseReason::Timeout`] after [`Config::dead_peer_timeout`] of silence.
//! * Stream operations: [`Conn::open_stream`] (with a dial header of at most
//!   [`MAX_DIAL_HEADER_LEN`]), [`Conn::open_result`] (accept or refuse a peer's open),
//!   [`Conn::send`] (takes at most the available credit and returns how much it took) or
//!   [`Conn::send_buf`] + [`Conn::send_commit`],
//!   [`Conn::recv`] or [`Conn::read_buf`] + [`Conn::consume`] (zero-copy peek for splicing),
//!   [`Conn::finish`] (half-close), [`Conn::reset`] (abort both directions), [`Conn::go_away`]
//!   (drain), [`Conn::close`] (abort the tunnel), [`Conn::ping`].
//!
//! After [`Event::Closed`], keep calling `poll_transmit` until it returns 0, or `transmit_buf`
//! until it is empty (a final GOAWAY, the rest of a batch being written, or the last data of a
//! drained tunnel may still be queued), then close the socket. Every other call returns
//! [`MuxError::Closed`].
//!
//! # Wire format
//!
//! Every frame is a 12-byte header followed by `length` bytes of payload; all integers are
//! big-endian.
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +---------------------------------------------------------------+
//! |                    length (u32, payload bytes)                |
//! +---------------+---------------+-------------------------------+
//! |   type (u8)   |  flags (u8)   |     reserved (u16, zero)      |
//! +---------------+---------------+-------------------------------+
//! |                       stream id (u32)                         |
//! +---------------------------------------------------------------+
//! |                     payload (length bytes) ...                |
//! ```
//!
//! | type | name          | stream id | flags        | payload                                      |
//! |------|---------------|-----------|--------------|----------------------------------------------|
//! | 0x0  | DATA          | ≠ 0       | 0x1 FIN      | 0..=[`MAX_FRAME_PAYLOAD`] bytes of stream data |
//! | 0x1  | OPEN          | ≠ 0, new  | —            | dial header, 0..=[`MAX_DIAL_HEADER_LEN`] bytes |
//! | 0x2  | OPEN_RESULT   | ≠ 0       | 0x1 OK       | OK: empty; refused: UTF-8 reason, ≤ [`MAX_OPEN_ERROR_LEN`] |
//! | 0x3  | WINDOW_UPDATE | 0 = tunnel| —            | u32 credit increment, > 0                    |
//! | 0x4  | RESET         | ≠ 0       | —            | u32 error code                               |
//! | 0x5  | PING          | 0         | 0x1 ACK=pong | 8 opaque bytes, echoed in the pong           |
//! | 0x6  | GOAWAY        | 0         | —            | u32 last stream id, u32 error code, UTF-8 message ≤ [`MAX_GOAWAY_MESSAGE_LEN`] |
//!
//! A receiver rejects unknown types, flags a type does not define, a non-zero reserved field, a
//! length outside the type's range and a stream id the type may not use. The reserved field is
//! there for a future version negotiated by ALPN, not for silent extension.
//!
//! # Streams
//!
//! Ids are never reused. The engine ([`Role::Server`]) opens odd ids (1, 3, 5, …), the agent
//! ([`Role::Client`]) even ids (2, 4, …), so either side may open streams without coordination;
//! today only the engine does. Id 0 is the tunnel itself. A peer's OPEN must use the peer's parity
//! and a higher id than any it opened before: a frame naming an id that was opened and has since
//! closed is ignored (it may have crossed a RESET on the wire), a frame naming an id that was
//! never opened is a protocol error.
//!
//! The opener may send DATA right after OPEN, before the OPEN_RESULT (the acceptor buffers it
//! within the stream window); the acceptor may send only after answering OK. A refusing
//! OPEN_RESULT closes the stream. FIN half-closes one direction; a stream is gone once both
//! directions are finished and its data has been read, or at once on RESET (either direction).
//!
//! # Flow control
//!
//! Credit-based, per stream and per tunnel, as in HTTP/2 and QUIC. Each stream starts with
//! [`INITIAL_STREAM_WINDOW`] bytes of credit in each direction and the tunnel with
//! [`CONN_WINDOW`]; DATA consumes both. The receiver returns stream credit with a WINDOW_UPDATE
//! once the application has read half a window, so a stream whose reader stalls stops at one
//! window while the others keep flowing. When the peer has used up most of its credit and the
//! reader has taken everything (the window limits the stream, not the reader), the update also
//! doubles the stream's window, up to [`MAX_STREAM_WINDOW`]. Tunnel credit comes back the same
//! way, and eagerly (on every transmit) once less than half of it is left, so the tunnel window
//! only bounds memory: it is exhausted only when [`CONN_WINDOW`] / [`INITIAL_STREAM_WINDOW`] (64)
//! streams are all stalled with full buffers (32 with grown windows). Exceeding either window is
//! a protocol error.
//!
//! # Bounds and errors
//!
//! Everything the peer can make us hold has a named bound below. A peer that breaks the protocol
//! (see [`ProtocolError`]) closes only its own tunnel: the core queues a GOAWAY carrying the error
//! code, emits [`Event::Closed`] and returns [`MuxError::Protocol`]; it never panics on input.
//! Application misuse (an unknown stream, sending after `finish`, …) returns a [`MuxError`]
//! whose [`MuxError::blame`] is [`Blame::Local`] and leaves the tunnel alone.

mod conn;
pub(crate) mod copy;
mod error;
mod frame;
mod hash;
mod pool;
mod stream;
mod tx;

use std::fmt;
use std::time::Duration;

pub use conn::Conn;
pub use error::{Blame, CloseReason, MuxError, ProtocolError};
pub use frame::{encode, ControlFrame, FrameType, Header, FLAG_ACK, FLAG_FIN, FLAG_OK, HEADER_LEN};

/// Largest DATA payload: big enough that framing costs < 0.02 % of the bytes, small enough that
/// one stream's frame delays another's by at most ~50 µs at 10 Gbit/s.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;

/// Largest dial header in an OPEN frame: the wire contract's bound on a stream header.
pub const MAX_DIAL_HEADER_LEN: usize = jaunt_config::wire::MAX_DIAL_HEADER_LEN;

/// Largest reason in a refusing OPEN_RESULT.
pub const MAX_OPEN_ERROR_LEN: usize = 1024;

/// Largest message in a GOAWAY frame.
pub const MAX_GOAWAY_MESSAGE_LEN: usize = 256;

/// Largest payload of any frame other than DATA; also the size of the reassembly buffer for them.
pub const MAX_CONTROL_PAYLOAD: usize = MAX_DIAL_HEADER_LEN;

/// Size of the internal read buffer [`Conn::input_buf`] hands out outside large DATA payloads:
/// one full DATA frame plus its header fits.
pub const INPUT_BUF_LEN: usize = 64 * 1024;

/// Smallest DATA payload rest that [`Conn::input_buf`] hands out in place (in the stream's own
/// buffer): below it, a separate read for the payload costs more than the copy it saves.
pub const DIRECT_INPUT_MIN: usize = 4 * 1024;

/// Most streams alive in one tunnel at once (both directions together). A peer's OPEN beyond it
/// is refused with RESET [`ErrorCode::REFUSED_STREAM`]; a local open fails with
/// [`MuxError::TooManyStreams`].
pub const MAX_STREAMS: usize = 4096;

/// Credit each stream starts with in each direction, and so the most bytes a stream buffers on
/// receive until its window grows ([`MAX_STREAM_WINDOW`]): 256 KiB covers a 1 Gbit/s × 2 ms
/// bandwidth-delay product per stream.
pub const INITIAL_STREAM_WINDOW: u32 = 256 * 1024;

/// Largest receive window a stream grows to. A receiver whose reader keeps up while the peer
/// uses up its credit (a bulk transfer: the window, not the reader, limits the stream) returns
/// the credit with a WINDOW_UPDATE that also doubles the window, up to this. With the initial
/// 256 KiB a bulk transfer stops once per window for the update's round trip (about 4,000 waits
/// and wake-ups of both ends per GiB); with more credit in flight it keeps flowing. Only the
/// receiver's own accounting changes: the peer just sees larger WINDOW_UPDATEs. 512 KiB and
/// not more: with 1 MiB the sender's batches (up to a window of plaintext, and as much again of
/// TLS records) outgrow a core's 1 MiB L2 cache here, and the bulk load test on a busy machine
/// measured lower throughput and no lower CPU than with 512 KiB (BENCHMARKS.md, issue 14).
pub const MAX_STREAM_WINDOW: u32 = 512 * 1024;

/// Credit the tunnel starts with, and so the most received bytes one tunnel buffers across all of
/// its streams: 64 full stream windows.
pub const CONN_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest credit a WINDOW_UPDATE may raise a window to (as in HTTP/2); above it is a protocol
/// error.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Most DATA payload bytes queued for [`Conn::poll_transmit`] / [`Conn::transmit_buf`]:
/// [`Conn::send`] and [`Conn::send_buf`] take no more, so a writer that does not drain the core
/// stalls its senders instead of growing memory. Also bounds one batch of `transmit_buf` to about
/// this many bytes; the core holds at most two such batches (the one being written and the one
/// filling).
pub const MAX_SEND_QUEUE_BYTES: usize = 1024 * 1024;

/// Most control frames (OPEN, OPEN_RESULT, RESET, PING, GOAWAY) queued for
/// [`Conn::poll_transmit`]. A local operation beyond it fails with
/// [`MuxError::ControlQueueFull`]; a peer that makes us queue more (opening streams we refuse
/// faster than we write) is a protocol error ([`ProtocolError::ControlFlood`]).
pub const MAX_QUEUED_CONTROL_FRAMES: usize = 1024;

/// Most events queued for [`Conn::poll_event`]. One `handle_input` of 64 KiB produces at most a
/// few thousand; going past this means the shell stopped draining events, and the tunnel closes
/// ([`ProtocolError::EventOverflow`]) rather than grow without bound.
pub const MAX_QUEUED_EVENTS: usize = 16 * 1024;

/// Default keepalive: agents sit behind NATs and firewalls that forget idle flows after 30–60 s.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Default dead-peer timeout: three keepalive intervals without a byte from the peer.
pub const DEFAULT_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(45);

/// Which end of the tunnel this is; decides the parity of the stream ids it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The engine: the TLS server, the side that opens streams. Opens odd ids.
    Server,
    /// The agent: the TLS client. Opens even ids.
    Client,
}

impl Role {
    /// Id of the first stream this role opens.
    pub const fn first_stream_id(self) -> u32 {
        match self {
            Role::Server => 1,
            Role::Client => 2,
        }
    }

    /// Whether `id` (non-zero) belongs to streams opened by this role.
    pub const fn opens(self, id: u32) -> bool {
        id != 0 && (id % 2 == 1) == matches!(self, Role::Server)
    }
}

/// Timers of one tunnel. The flow-control windows are protocol constants, not configuration,
/// because both ends must agree on the initial ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Send a PING after this long without a byte from the peer.
    pub keepalive_interval: Duration,
    /// Close the tunnel ([`CloseReason::Timeout`]) after this long without a byte from the peer.
    pub dead_peer_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            dead_peer_timeout: DEFAULT_DEAD_PEER_TIMEOUT,
        }
    }
}

/// A stream inside one tunnel. Never 0 (that is the tunnel itself), never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u32);

impl StreamId {
    /// The id as carried on the wire.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Wraps a wire id; `None` for 0, which names the tunnel rather than a stream.
    pub const fn new(id: u32) -> Option<StreamId> {
        if id == 0 {
            None
        } else {
            Some(StreamId(id))
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An error code carried by RESET and GOAWAY. Codes below 0x100 are the tunnel's own; the
/// application may use the rest in RESET (e.g. to say why a dial failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Graceful: GOAWAY for a drain.
    pub const NO_ERROR: ErrorCode = ErrorCode(0);
    /// The peer broke the framing or stream rules.
    pub const PROTOCOL: ErrorCode = ErrorCode(1);
    /// The peer sent more than its credit or overflowed a window.
    pub const FLOW_CONTROL: ErrorCode = ErrorCode(2);
    /// A frame's length was outside its type's range.
    pub const FRAME_SIZE: ErrorCode = ErrorCode(3);
    /// The peer made us queue more than a bound allows.
    pub const RESOURCE_LIMIT: ErrorCode = ErrorCode(4);
    /// No byte from the peer for the dead-peer timeout.
    pub const TIMEOUT: ErrorCode = ErrorCode(5);
    /// A bug or local failure.
    pub const INTERNAL: ErrorCode = ErrorCode(6);
    /// RESET: the stream was not processed (stream limit or GOAWAY); safe to retry elsewhere.
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(7);
    /// RESET: the application gave up on the stream.
    pub const CANCEL: ErrorCode = ErrorCode(8);
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            ErrorCode::NO_ERROR => "no error",
            ErrorCode::PROTOCOL => "protocol error",
            ErrorCode::FLOW_CONTROL => "flow control error",
            ErrorCode::FRAME_SIZE => "frame size error",
            ErrorCode::RESOURCE_LIMIT => "resource limit",
            ErrorCode::TIMEOUT => "timeout",
            ErrorCode::INTERNAL => "internal error",
            ErrorCode::REFUSED_STREAM => "refused stream",
            ErrorCode::CANCEL => "cancelled",
            ErrorCode(code) => return write!(f, "code {code:#x}"),
        };
        f.write_str(name)
    }
}

/// Something the application learns from [`Conn::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream; answer with [`Conn::open_result`].
    StreamOpened {
        /// The new stream.
        id: StreamId,
        /// The dial header from the OPEN frame.
        dial_header: Vec<u8>,
    },
    /// The peer answered an [`Conn::open_stream`]; on `Err` (the peer's reason) the stream is gone.
    OpenResult {
        /// The stream we opened.
        id: StreamId,
        /// `Ok` when accepted, else the peer's reason.
        result: Result<(), String>,
    },
    /// Data arrived on a stream whose receive buffer was empty; read until `recv` returns 0.
    Readable {
        /// The stream.
        id: StreamId,
    },
    /// A stream whose last `send` was short (or whose `send_buf` was empty) has credit and queue
    /// space again.
    Writable {
        /// The stream.
        id: StreamId,
    },
    /// The peer half-closed the stream and every byte before its FIN has been read.
    StreamFinished {
        /// The stream.
        id: StreamId,
    },
    /// The peer reset the stream (or refused it: [`ErrorCode::REFUSED_STREAM`]); it is gone.
    StreamReset {
        /// The stream.
        id: StreamId,
        /// The peer's code.
        code: ErrorCode,
    },
    /// The peer answered our PING.
    Pong {
        /// Time from queueing the PING to handling the pong.
        rtt: Duration,
    },
    /// The peer is draining: no new streams either way; streams we opened above `last_stream_id`
    /// were not processed and have been reset with [`ErrorCode::REFUSED_STREAM`].
    GoAway {
        /// The highest of our stream ids the peer processed.
        last_stream_id: u32,
    },
    /// The tunnel is closed; flush `poll_transmit`, then close the socket.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// Fuzz entry point: arbitrary bytes from a hostile peer, fed to a [`Conn`] of either role.
///
/// The first byte picks the role and how the input is cut into reads; the rest is the peer's
/// byte stream. Every opened stream is accepted, every readable stream drained, and the core's
/// transmit queue written out after each read, so the fuzzer reaches the data, window and close
/// paths and not only the header parser. [`Conn::check_invariants`] runs after each step (it is
/// live in cargo-fuzz builds, which keep debug assertions). A protocol error is a normal result:
/// what must never happen is a panic, an invariant failure or unbounded growth.
pub fn fuzz_input(data: &[u8]) {
    let Some((&control, peer_bytes)) = data.split_first() else {
        return;
    };
    let role = if control & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let chunk = 1 + usize::from(control >> 1) * 13;
    let start = std::time::Instant::now();
    let mut conn = Conn::new(role, Config::default(), start);
    let mut out = Vec::new();
    let mut scratch = [0u8; 4096];
    for (step, piece) in peer_bytes.chunks(chunk).enumerate() {
        let now = start + Duration::from_millis(step as u64);
        if conn.handle_input(piece, now).is_err() {
            conn.check_invariants();
            return;
        }
        while let Some(event) = conn.poll_event() {
            match event {
                Event::StreamOpened { id, .. } => {
                    let _ = conn.open_result(id, Ok(()));
                }
                Event::Readable { id } => {
                    while matches!(conn.recv(id, &mut scratch), Ok(n) if n > 0) {}
                }
                Event::StreamFinished { id } => {
                    let _ = conn.finish(id);
                }
                _ => {}
            }
        }
        conn.check_invariants();
        out.clear();
        conn.poll_transmit(&mut out);
        debug_assert!(
            out.len() <= 2 * MAX_SEND_QUEUE_BYTES + MAX_QUEUED_CONTROL_FRAMES * 64 * 1024
        );
        conn.handle_timeout(now);
        conn.check_invariants();
    }
}
