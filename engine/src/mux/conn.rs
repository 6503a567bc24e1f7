//! [`Conn`]: the sans-IO state machine of one tunnel: frame reassembly, stream table, flow
//! control, the transmit queues, keepalive and the tunnel's phases (open → draining → closed).
//!
//! The wire format and the rules are documented in `mod.rs`; the byte layout of frames lives in
//! `frame.rs`, per-stream state in `stream.rs` and the transmit queue in `tx.rs`. No socket, no
//! clock, no allocation per DATA frame: payload goes straight from the input slice (or the
//! socket, through `input_buf`) into the stream's buffer, and sends are encoded once, in place,
//! into a queue that the writer takes batches from (`transmit_buf`) without another copy.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::error::{CloseReason, MuxError, ProtocolError};
use super::frame::{encode, ControlFrame, FrameType, Header, FLAG_FIN, HEADER_LEN};
use super::hash::IdHashBuilder;
use super::stream::{OpenState, Stream};
use super::tx::{Reservation, TxQueue};
use super::{
    Config, ErrorCode, Event, Role, StreamId, CONN_WINDOW, DIRECT_INPUT_MIN, INPUT_BUF_LEN,
    MAX_DIAL_HEADER_LEN, MAX_OPEN_ERROR_LEN, MAX_QUEUED_CONTROL_FRAMES, MAX_QUEUED_EVENTS,
    MAX_SEND_QUEUE_BYTES, MAX_STREAMS, MAX_STREAM_WINDOW, MAX_WINDOW,
};
// Only the invariant checks (debug builds) and the tests use it.
#[cfg(any(debug_assertions, test))]
use super::{INITIAL_STREAM_WINDOW, MAX_FRAME_PAYLOAD};

/// One tunnel's multiplexer state. See the module docs of [`crate::mux`] for how to drive it.
#[derive(Debug)]
pub struct Conn {
    role: Role,
    config: Config,
    /// `Some` once closed; every later call except the transmit calls and `poll_event` fails
    /// with it.
    closed: Option<CloseReason>,
    streams: HashMap<u32, Stream, IdHashBuilder>,
    /// Next id we open (u64 so that running past `u32::MAX` is visible).
    next_local_id: u64,
    /// Highest id the peer opened; 0 before its first OPEN.
    max_peer_id: u32,
    /// We sent a graceful GOAWAY: we refuse the peer's new streams and open none.
    goaway_sent: bool,
    /// The peer's graceful GOAWAY, with the last of our ids it processed.
    goaway_recv: Option<u32>,

    /// Tunnel credit the peer gave us.
    conn_send_credit: u32,
    /// Tunnel credit we gave the peer (as we see it).
    conn_recv_window: u32,
    /// Received bytes read or discarded, not yet returned in a tunnel WINDOW_UPDATE.
    conn_recv_unacked: u32,
    /// Sum of all streams' receive buffers.
    conn_buffered: usize,

    rx: Rx,
    rx_header: [u8; HEADER_LEN],
    rx_header_len: usize,
    /// Reassembly of the current non-DATA payload (≤ `MAX_CONTROL_PAYLOAD`), reused.
    rx_control: Vec<u8>,
    /// What the last `input_buf` handed out, until `input_commit`.
    input_target: Option<InputTarget>,
    /// Read buffer of `input_buf` (taken from the thread's pool on use; given back while idle).
    input_scratch: Vec<u8>,
    /// The last DATA frame was big: `input_buf` reads the next header alone so that the payload
    /// after it lands straight in its stream.
    expect_bulk: bool,

    /// Encoded control frames, written before anything else.
    control_out: Vec<u8>,
    control_frames: usize,
    /// DATA frames in send order, and the batch being written.
    tx: TxQueue,
    /// What the last `send_buf` handed out, until `send_commit`.
    send_target: Option<Reservation>,
    /// Streams with a WINDOW_UPDATE due (materialized by `poll_transmit`; may hold closed ids).
    window_updates: Vec<u32>,
    /// Pong to send, answering the peer's latest PING (one slot: a ping flood costs nothing).
    pong: Option<[u8; 8]>,
    /// Our PING to send (sequence number).
    ping_out: Option<u64>,
    /// Streams whose last send was short, awaiting `Writable` (may hold closed ids).
    blocked: Vec<u32>,
    events: VecDeque<Event>,

    last_input: Instant,
    /// The peer has been silent for a keepalive interval: the next time the driver sleeps,
    /// buffers grown by bulk (transmit queue, empty receive buffers) are freed, not kept at
    /// their high-water mark. Cleared by input.
    release_large: bool,
    /// Our PING in flight: sequence number and when it was queued.
    ping_outstanding: Option<(u64, Instant)>,
    ping_seq: u64,
}

/// Where the bytes of the pending `input_buf` go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputTarget {
    /// In place, at the end of stream `id`'s receive buffer (part of the current DATA payload).
    Stream { id: u32, len: usize },
    /// Into `input_scratch[..len]`, then decoded like `handle_input`.
    Scratch { len: usize },
}

/// Where the decoder is in the input byte stream.
#[derive(Clone, Copy, Debug)]
enum Rx {
    /// Collecting a header (`rx_header[..rx_header_len]`).
    Header,
    /// Streaming a DATA payload into stream `id` (discarded if the stream is gone).
    Data { id: u32, remaining: u32, fin: bool },
    /// Collecting a control payload into `rx_control`.
    Control { header: Header, remaining: u32 },
}

impl Conn {
    /// A new tunnel. `now` starts the keepalive and dead-peer timers.
    pub fn new(role: Role, config: Config, now: Instant) -> Conn {
        let conn = Conn {
            role,
            config,
            closed: None,
            streams: HashMap::default(),
            next_local_id: u64::from(role.first_stream_id()),
            max_peer_id: 0,
            goaway_sent: false,
            goaway_recv: None,
            conn_send_credit: CONN_WINDOW,
            conn_recv_window: CONN_WINDOW,
            conn_recv_unacked: 0,
            conn_buffered: 0,
            rx: Rx::Header,
            rx_header: [0; HEADER_LEN],
            rx_header_len: 0,
            rx_control: Vec::new(),
            input_target: None,
            input_scratch: Vec::new(),
            expect_bulk: false,
            control_out: Vec::new(),
            control_frames: 0,
            tx: TxQueue::default(),
            send_target: None,
            window_updates: Vec::new(),
            pong: None,
            ping_out: None,
            blocked: Vec::new(),
            events: VecDeque::new(),
            last_input: now,
            release_large: false,
            ping_outstanding: None,
            ping_seq: 0,
        };
        conn.check_invariants();
        conn
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Why the tunnel closed, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// Whether the tunnel has closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Live streams (both directions).
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Feeds bytes read from the socket. Consumes all of them; a trailing partial frame is kept
    /// for the next call. On a protocol error the tunnel closes: a GOAWAY with the error code is
    /// queued, [`Event::Closed`] is emitted and the error is returned. Drain
    /// [`Conn::poll_event`] after every call.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) -> Result<(), MuxError> {
        self.ensure_open()?;
        self.input_target = None;
        if !bytes.is_empty() {
            self.last_input = now;
            self.release_large = false;
        }
        let result = self.process_input(bytes, now);
        self.finish_input(result)
    }

    /// Zero-copy input, the alternative to [`Conn::handle_input`]: a buffer to read socket (or
    /// TLS plaintext) bytes into, followed by [`Conn::input_commit`] with the count read. Never
    /// empty. Inside a DATA payload of at least [`DIRECT_INPUT_MIN`] bytes it *is* the free tail
    /// of the stream's receive buffer (at most the rest of the payload), so the read is the
    /// payload's only copy on the way in. While the peer sends large DATA frames, the tail of a
    /// short payload and the next header are read exactly, so that the next payload lines up
    /// for a direct read; otherwise it is an internal [`INPUT_BUF_LEN`] buffer, decoded like
    /// `handle_input`. Call `input_commit` next: any other call except `poll_event` and the
    /// getters voids the buffer.
    pub fn input_buf(&mut self) -> &mut [u8] {
        let target = match self.rx {
            Rx::Data { id, remaining, .. } => {
                let remaining = remaining as usize;
                if remaining >= DIRECT_INPUT_MIN && self.streams.contains_key(&id) {
                    InputTarget::Stream { id, len: remaining }
                } else if self.expect_bulk {
                    InputTarget::Scratch {
                        len: remaining.min(INPUT_BUF_LEN),
                    }
                } else {
                    InputTarget::Scratch { len: INPUT_BUF_LEN }
                }
            }
            Rx::Header if self.expect_bulk => InputTarget::Scratch {
                len: HEADER_LEN - self.rx_header_len,
            },
            Rx::Header | Rx::Control { .. } => InputTarget::Scratch { len: INPUT_BUF_LEN },
        };
        self.input_target = Some(target);
        self.send_target = None;
        match target {
            InputTarget::Stream { id, len } => match self.streams.get_mut(&id) {
                Some(s) => s.recv.spare(len),
                None => &mut [],
            },
            InputTarget::Scratch { len } => {
                if self.input_scratch.len() < INPUT_BUF_LEN {
                    self.input_scratch = super::pool::take(INPUT_BUF_LEN);
                }
                self.input_scratch.get_mut(..len).unwrap_or(&mut [])
            }
        }
    }

    /// The driver has nothing to read or write now and goes to sleep: the internal input
    /// buffer, and transmit buffers at their smallest, go back to the thread's pool (an idle
    /// tunnel then holds neither; the next use takes them back without allocating). Once the
    /// peer has been silent for a keepalive interval, larger transmit buffers (grown by bulk)
    /// and the streams' empty receive buffers are freed too, so a tunnel that carried bulk does
    /// not keep its high-water mark while idle; a busy tunnel keeps them (no allocation or
    /// zeroing per wake-up). Voids a
    /// pending [`Conn::input_buf`] and [`Conn::send_buf`] like any other call.
    pub fn release_idle_buffers(&mut self) {
        self.input_target = None;
        self.send_target = None;
        super::pool::give(&mut self.input_scratch);
        if self.tx.release_idle(self.release_large) && self.release_large {
            self.release_large = false;
            for s in self.streams.values_mut() {
                s.recv.release_if_empty();
            }
        }
    }

    /// Takes in the first `n` bytes written into the buffer of the last [`Conn::input_buf`]
    /// (clamped to its length); otherwise as [`Conn::handle_input`]. Fails with
    /// [`MuxError::NoInputBuf`] when no `input_buf` is pending (and `n > 0`).
    pub fn input_commit(&mut self, n: usize, now: Instant) -> Result<(), MuxError> {
        self.ensure_open()?;
        let Some(target) = self.input_target.take() else {
            return if n == 0 {
                Ok(())
            } else {
                Err(MuxError::NoInputBuf)
            };
        };
        if n > 0 {
            self.last_input = now;
            self.release_large = false;
        }
        let result = match target {
            InputTarget::Stream { id, len } => {
                self.deliver(id, n.min(len), None);
                if self.events.len() > MAX_QUEUED_EVENTS {
                    Err(ProtocolError::EventOverflow)
                } else {
                    Ok(())
                }
            }
            InputTarget::Scratch { len } => {
                let scratch = std::mem::take(&mut self.input_scratch);
                let input = scratch.get(..n.min(len)).unwrap_or(&[]);
                let result = self.process_input(input, now);
                self.input_scratch = scratch;
                result
            }
        };
        self.finish_input(result)
    }

    fn finish_input(&mut self, result: Result<(), ProtocolError>) -> Result<(), MuxError> {
        if let Err(err) = result {
            self.fail(err.clone());
            self.settle();
            return Err(MuxError::Protocol(err));
        }
        self.settle();
        Ok(())
    }

    /// Appends every frame ready to go to `out` and returns how many bytes it appended: control
    /// frames first, then window updates, then DATA in send order. This copies the queued
    /// frames; [`Conn::transmit_buf`] hands them out in place. Mixing the two is fine: the rest
    /// of a batch taken with `transmit_buf` comes first.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        loop {
            let batch = self.transmit_buf();
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            out.extend_from_slice(batch);
            self.transmit_advance(n);
        }
        out.len() - start
    }

    /// Zero-copy output, the alternative to [`Conn::poll_transmit`]: the bytes to write to the
    /// socket next, straight from the core's queue; empty when nothing is due. Write what the
    /// socket takes, then report it with [`Conn::transmit_advance`]; until the batch is all
    /// written, `transmit_buf` returns the rest of it (frames are never cut by frames queued
    /// meanwhile). When a batch is done, the next one is every frame ready by then: control
    /// frames first, then window updates, then DATA in send order, so many small frames share
    /// one write and one TLS record. The queue sending more frees room for [`Conn::send`], and
    /// may emit [`Event::Writable`].
    pub fn transmit_buf(&mut self) -> &[u8] {
        if self.tx.in_flight() == 0 {
            if self.closed.is_none() {
                self.queue_due_frames();
            }
            self.tx.seal(&mut self.control_out);
            self.control_frames = 0;
            if self.closed.is_none() {
                self.wake_blocked();
            }
        }
        self.settle();
        self.tx.batch()
    }

    /// Marks the first `n` bytes of the last [`Conn::transmit_buf`] as written (clamped to what
    /// it returned); returns how many.
    pub fn transmit_advance(&mut self, n: usize) -> usize {
        let n = self.tx.advance(n);
        self.settle();
        n
    }

    /// Encodes the pong, ping and window updates that are due behind the control frames.
    fn queue_due_frames(&mut self) {
        let update_due = self.conn_update_due();
        let out = &mut self.control_out;
        if let Some(opaque) = self.pong.take() {
            encode::ping(out, true, opaque);
        }
        if let Some(seq) = self.ping_out.take() {
            encode::ping(out, false, seq.to_be_bytes());
        }
        if update_due {
            encode::window_update(out, 0, self.conn_recv_unacked);
            self.conn_recv_window += self.conn_recv_unacked;
            self.conn_recv_unacked = 0;
        }
        for id in self.window_updates.drain(..) {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.update_queued = false;
            if !s.recv_fin && s.recv_unacked > 0 {
                // The peer holds less than a quarter of the window and the reader has taken
                // everything: the window limits the stream, so it doubles (MAX_STREAM_WINDOW).
                let grow = if s.recv.is_empty() && s.recv_window < s.recv_limit / 4 {
                    s.recv_limit
                        .min(MAX_STREAM_WINDOW.saturating_sub(s.recv_limit))
                } else {
                    0
                };
                encode::window_update(out, id, s.recv_unacked + grow);
                s.recv_window += s.recv_unacked + grow;
                s.recv_limit += grow;
                s.recv_unacked = 0;
            }
        }
    }

    /// Whether [`Conn::poll_transmit`] may have something to write (conservative).
    pub fn has_pending_transmit(&self) -> bool {
        !self.control_out.is_empty()
            || self.tx.queued() > 0
            || self.tx.in_flight() > 0
            || (self.closed.is_none()
                && (self.pong.is_some()
                    || self.ping_out.is_some()
                    || !self.window_updates.is_empty()
                    || self.conn_update_due()))
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Conn::handle_timeout`] must next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let dead = self.last_input.checked_add(self.config.dead_peer_timeout);
        let keepalive = match self.ping_outstanding {
            None => self.last_input.checked_add(self.config.keepalive_interval),
            Some(_) => None,
        };
        match (dead, keepalive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers: queues a keepalive PING after [`Config::keepalive_interval`] of silence
    /// from the peer, and closes the tunnel ([`CloseReason::Timeout`], GOAWAY
    /// [`ErrorCode::TIMEOUT`]) after [`Config::dead_peer_timeout`] of silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        let dead = self.last_input.checked_add(self.config.dead_peer_timeout);
        if dead.is_some_and(|dead| now >= dead) {
            let reason = CloseReason::Timeout;
            self.close_abruptly(reason, Some((ErrorCode::TIMEOUT, "dead peer timeout")));
        } else if self.ping_outstanding.is_none() {
            let keepalive = self.last_input.checked_add(self.config.keepalive_interval);
            if keepalive.is_some_and(|at| now >= at) {
                self.queue_ping(now);
                self.release_large = true;
            }
        }
        self.settle();
    }

    /// Sends a PING now (for an RTT sample: [`Event::Pong`]); no-op while one is outstanding.
    pub fn ping(&mut self, now: Instant) -> Result<(), MuxError> {
        self.ensure_open()?;
        if self.ping_outstanding.is_none() {
            self.queue_ping(now);
        }
        self.settle();
        Ok(())
    }

    /// Opens a stream carrying `dial_header` (≤ [`MAX_DIAL_HEADER_LEN`]). Data may be sent on it
    /// at once; the peer answers with [`Event::OpenResult`].
    pub fn open_stream(&mut self, dial_header: &[u8]) -> Result<StreamId, MuxError> {
        self.ensure_open()?;
        if self.goaway_sent || self.goaway_recv.is_some() {
            return Err(MuxError::GoingAway);
        }
        if dial_header.len() > MAX_DIAL_HEADER_LEN {
            return Err(MuxError::TooLong {
                what: "dial header",
                len: dial_header.len(),
                max: MAX_DIAL_HEADER_LEN,
            });
        }
        if self.streams.len() >= MAX_STREAMS {
            return Err(MuxError::TooManyStreams);
        }
        let Ok(id) = u32::try_from(self.next_local_id) else {
            return Err(MuxError::StreamIdsExhausted);
        };
        self.reserve_control()?;
        self.next_local_id += 2;
        encode::open(&mut self.control_out, id, dial_header);
        self.streams
            .insert(id, Stream::new(OpenState::AwaitingResult));
        self.settle();
        Ok(StreamId(id))
    }

    /// Answers the peer's OPEN ([`Event::StreamOpened`]): `Ok` accepts, `Err(reason)`
    /// (≤ [`MAX_OPEN_ERROR_LEN`] bytes) refuses and forgets the stream.
    pub fn open_result(&mut self, id: StreamId, result: Result<(), &str>) -> Result<(), MuxError> {
        self.ensure_open()?;
        let s = self.streams.get(&id.0).ok_or(MuxError::UnknownStream(id))?;
        if s.open != OpenState::AwaitingAnswer {
            return Err(MuxError::NotAwaitingAnswer(id));
        }
        if let Err(reason) = result {
            if reason.len() > MAX_OPEN_ERROR_LEN {
                return Err(MuxError::TooLong {
                    what: "open refusal reason",
                    len: reason.len(),
                    max: MAX_OPEN_ERROR_LEN,
                });
            }
        }
        self.reserve_control()?;
        encode::open_result(&mut self.control_out, id.0, result);
        match result {
            Ok(()) => {
                if let Some(s) = self.streams.get_mut(&id.0) {
                    s.open = OpenState::Established;
                }
            }
            Err(_) => self.remove_stream(id.0),
        }
        self.settle();
        Ok(())
    }

    /// Queues up to `data.len()` bytes on the stream and returns how many it took: at most the
    /// stream's and the tunnel's credit and the send queue's free space. A short count (even 0)
    /// arms an [`Event::Writable`] for when more can be taken.
    pub fn send(&mut self, id: StreamId, data: &[u8]) -> Result<usize, MuxError> {
        let n = self.send_allowance(id, data.len(), data.len())?;
        if n > 0 {
            if let Some(s) = self.streams.get_mut(&id.0) {
                // n ≤ both credits, which are u32.
                s.send_credit -= n as u32;
                self.conn_send_credit -= n as u32;
                let (payload, _) = data.split_at(n);
                self.tx.push(id.0, payload);
            }
        }
        self.settle();
        Ok(n)
    }

    /// How many bytes stream `id` may queue now, at most `want`: its credit, the tunnel's credit
    /// and the send queue's free space. Arms an [`Event::Writable`] when that is below `need`.
    /// Checks what `send` and `send_buf` both refuse (closed tunnel, unknown, unanswered or
    /// finished stream).
    fn send_allowance(
        &mut self,
        id: StreamId,
        want: usize,
        need: usize,
    ) -> Result<usize, MuxError> {
        self.ensure_open()?;
        let space = self.send_space();
        let conn_credit = self.conn_send_credit as usize;
        let s = self
            .streams
            .get_mut(&id.0)
            .ok_or(MuxError::UnknownStream(id))?;
        if s.open == OpenState::AwaitingAnswer {
            return Err(MuxError::NotAccepted(id));
        }
        if s.send_finished {
            return Err(MuxError::SendFinished(id));
        }
        let n = want.min(s.send_credit as usize).min(conn_credit).min(space);
        if n < need {
            s.blocked = true;
            if !s.listed {
                s.listed = true;
                self.blocked.push(id.0);
            }
        }
        Ok(n)
    }

    /// Zero-copy send, the alternative to [`Conn::send`]: room for up to `max` bytes of the
    /// stream's data, right inside the transmit queue (after a frame header reserved in place),
    /// to read the bytes into, e.g. straight from the user's socket; then
    /// [`Conn::send_commit`] with how many were written. The room is at most the stream's and
    /// the tunnel's credit, the send queue's free space and one DATA frame's payload
    /// ([`MAX_FRAME_PAYLOAD`](super::MAX_FRAME_PAYLOAD)); call again for more. Empty room (for `max > 0`) means no credit
    /// or space: it arms an [`Event::Writable`], like a short `send`. Call `send_commit` next:
    /// any other call except `poll_event` and the getters voids the room. Errors as `send`.
    pub fn send_buf(&mut self, id: StreamId, max: usize) -> Result<&mut [u8], MuxError> {
        let want = self.send_allowance(id, max, max.min(1))?;
        self.settle();
        if want == 0 {
            return Ok(&mut []);
        }
        let r = self.tx.reserve(id.0, want, false);
        self.send_target = Some(r);
        Ok(self.tx.room(&r))
    }

    /// Queues the first `n` bytes written into the room of the last [`Conn::send_buf`] on
    /// stream `id` (clamped to its length) and returns how many. `n = 0` sends nothing. Fails
    /// with [`MuxError::NoSendBuf`] when no room on that stream is pending (and `n > 0`).
    pub fn send_commit(&mut self, id: StreamId, n: usize) -> Result<usize, MuxError> {
        self.ensure_open()?;
        let target = self.send_target.take().filter(|r| r.id == id.0);
        let n = match target {
            Some(r) => {
                let n = n.min(r.len);
                if n > 0 {
                    // Only calls that void the room can remove the stream or take its credit.
                    let Some(s) = self.streams.get_mut(&id.0) else {
                        self.settle();
                        return Err(MuxError::UnknownStream(id));
                    };
                    // n ≤ the room ≤ both credits, which are u32.
                    s.send_credit -= n as u32;
                    self.conn_send_credit -= n as u32;
                    self.tx.commit(r, n);
                }
                n
            }
            None if n == 0 => 0,
            None => {
                self.settle();
                return Err(MuxError::NoSendBuf);
            }
        };
        self.settle();
        Ok(n)
    }

    /// How many bytes [`Conn::send`] would take on this stream now.
    pub fn send_capacity(&self, id: StreamId) -> Result<usize, MuxError> {
        self.ensure_open()?;
        let s = self.streams.get(&id.0).ok_or(MuxError::UnknownStream(id))?;
        if s.open == OpenState::AwaitingAnswer || s.send_finished {
            return Ok(0);
        }
        Ok((s.send_credit.min(self.conn_send_credit) as usize).min(self.send_space()))
    }

    /// Copies received bytes into `buf` and returns how many; 0 when nothing is buffered (the end
    /// of the stream is [`Event::StreamFinished`], not a 0 here).
    pub fn recv(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, MuxError> {
        self.ensure_open()?;
        let s = self
            .streams
            .get_mut(&id.0)
            .ok_or(MuxError::UnknownStream(id))?;
        let n = s.recv.read(buf);
        self.after_read(id.0, n);
        self.settle();
        Ok(n)
    }

    /// The received bytes buffered on the stream, to write elsewhere without an extra copy;
    /// follow with [`Conn::consume`].
    pub fn read_buf(&self, id: StreamId) -> Result<&[u8], MuxError> {
        self.ensure_open()?;
        let s = self.streams.get(&id.0).ok_or(MuxError::UnknownStream(id))?;
        Ok(s.recv.as_slice())
    }

    /// Drops up to `n` bytes from the front of the stream's receive buffer (after
    /// [`Conn::read_buf`]); returns how many.
    pub fn consume(&mut self, id: StreamId, n: usize) -> Result<usize, MuxError> {
        self.ensure_open()?;
        let s = self
            .streams
            .get_mut(&id.0)
            .ok_or(MuxError::UnknownStream(id))?;
        let n = s.recv.consume(n);
        self.after_read(id.0, n);
        self.settle();
        Ok(n)
    }

    /// Half-closes the stream: FIN after the data already sent.
    pub fn finish(&mut self, id: StreamId) -> Result<(), MuxError> {
        self.ensure_open()?;
        let s = self
            .streams
            .get_mut(&id.0)
            .ok_or(MuxError::UnknownStream(id))?;
        if s.open == OpenState::AwaitingAnswer {
            return Err(MuxError::NotAccepted(id));
        }
        if s.send_finished {
            return Err(MuxError::SendFinished(id));
        }
        s.send_finished = true;
        let done = s.is_done();
        // FIN rides on the stream's newest DATA frame when nothing was queued after it.
        self.tx.finish(id.0);
        if done {
            self.remove_stream(id.0);
        }
        self.settle();
        Ok(())
    }

    /// Aborts the stream in both directions with `code`; buffered data is dropped.
    pub fn reset(&mut self, id: StreamId, code: ErrorCode) -> Result<(), MuxError> {
        self.ensure_open()?;
        if !self.streams.contains_key(&id.0) {
            return Err(MuxError::UnknownStream(id));
        }
        self.reserve_control()?;
        encode::reset(&mut self.control_out, id.0, code);
        self.remove_stream(id.0);
        self.settle();
        Ok(())
    }

    /// Starts a graceful drain: GOAWAY, no new streams either way, existing streams finish, then
    /// [`CloseReason::Drained`].
    pub fn go_away(&mut self) -> Result<(), MuxError> {
        self.ensure_open()?;
        if !self.goaway_sent {
            self.reserve_control()?;
            encode::go_away(
                &mut self.control_out,
                self.max_peer_id,
                ErrorCode::NO_ERROR,
                "draining",
            );
            self.goaway_sent = true;
        }
        self.settle();
        Ok(())
    }

    /// Aborts the tunnel: every stream is dropped, a GOAWAY with `code` (never
    /// [`ErrorCode::NO_ERROR`], which is sent as [`ErrorCode::CANCEL`]; use [`Conn::go_away`] to
    /// drain) replaces anything queued, and [`CloseReason::Local`] is emitted.
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        if self.closed.is_some() {
            return;
        }
        let code = if code == ErrorCode::NO_ERROR {
            ErrorCode::CANCEL
        } else {
            code
        };
        self.close_abruptly(CloseReason::Local { code }, Some((code, message)));
        self.settle();
    }

    /// Checks the core's invariants (debug builds only; free in release). Called after every
    /// public entry point; public so tests can call it too.
    pub fn check_invariants(&self) {
        #[cfg(debug_assertions)]
        self.check_invariants_debug();
    }

    // ----- input -----

    fn process_input(&mut self, mut input: &[u8], now: Instant) -> Result<(), ProtocolError> {
        while !input.is_empty() && self.closed.is_none() {
            match self.rx {
                Rx::Header => {
                    let header = match input.split_first_chunk::<HEADER_LEN>() {
                        Some((head, rest)) if self.rx_header_len == 0 => {
                            input = rest;
                            Header::decode(head)?
                        }
                        _ => {
                            let take = (HEADER_LEN - self.rx_header_len).min(input.len());
                            let (chunk, rest) = input.split_at(take);
                            input = rest;
                            let end = self.rx_header_len + take;
                            if let Some(dst) = self.rx_header.get_mut(self.rx_header_len..end) {
                                dst.copy_from_slice(chunk);
                            }
                            self.rx_header_len = end;
                            if end < HEADER_LEN {
                                break;
                            }
                            self.rx_header_len = 0;
                            Header::decode(&self.rx_header)?
                        }
                    };
                    self.begin_frame(header, now)?;
                }
                Rx::Data { id, remaining, .. } => {
                    let take = (remaining as usize).min(input.len());
                    let (chunk, rest) = input.split_at(take);
                    input = rest;
                    self.deliver(id, take, Some(chunk));
                }
                Rx::Control { header, remaining } => {
                    let take = (remaining as usize).min(input.len());
                    let (chunk, rest) = input.split_at(take);
                    input = rest;
                    self.rx_control.extend_from_slice(chunk);
                    let remaining = remaining - take as u32;
                    if remaining == 0 {
                        self.rx = Rx::Header;
                        self.end_control(header, now)?;
                    } else {
                        self.rx = Rx::Control { header, remaining };
                    }
                }
            }
            if self.events.len() > MAX_QUEUED_EVENTS {
                return Err(ProtocolError::EventOverflow);
            }
        }
        Ok(())
    }

    fn begin_frame(&mut self, header: Header, now: Instant) -> Result<(), ProtocolError> {
        if header.kind == FrameType::Data {
            return self.begin_data(header);
        }
        self.rx_control.clear();
        if header.len == 0 {
            self.end_control(header, now)
        } else {
            self.rx = Rx::Control {
                header,
                remaining: header.len,
            };
            Ok(())
        }
    }

    fn begin_data(&mut self, header: Header) -> Result<(), ProtocolError> {
        let (id, len, fin) = (header.stream, header.len, header.flags & FLAG_FIN != 0);
        match self.streams.get_mut(&id) {
            Some(s) => {
                if s.recv_fin {
                    return Err(ProtocolError::DataAfterFin { id });
                }
                if s.open == OpenState::AwaitingResult {
                    return Err(ProtocolError::DataBeforeOpenResult { id });
                }
                if len > s.recv_window {
                    return Err(ProtocolError::StreamWindowExceeded {
                        id,
                        len,
                        window: s.recv_window,
                    });
                }
                if len > self.conn_recv_window {
                    let window = self.conn_recv_window;
                    return Err(ProtocolError::ConnWindowExceeded { len, window });
                }
                s.recv_window -= len;
            }
            None => {
                self.check_closed_stream(FrameType::Data, id)?;
                if len > self.conn_recv_window {
                    let window = self.conn_recv_window;
                    return Err(ProtocolError::ConnWindowExceeded { len, window });
                }
            }
        }
        self.conn_recv_window -= len;
        self.expect_bulk = len as usize >= DIRECT_INPUT_MIN;
        if len == 0 {
            self.end_data(id, fin);
        } else {
            self.rx = Rx::Data {
                id,
                remaining: len,
                fin,
            };
        }
        Ok(())
    }

    /// `n` payload bytes of the current DATA frame (for stream `id`): copied from `chunk`, or
    /// already written in place after the stream's buffer (`None`, from `input_commit`). If the
    /// stream closed since the header (or before), they are dropped and their tunnel credit
    /// returned. Ends the frame when its payload is complete.
    fn deliver(&mut self, id: u32, n: usize, chunk: Option<&[u8]>) {
        let Rx::Data {
            id: rx_id,
            remaining,
            fin,
        } = self.rx
        else {
            debug_assert!(false, "payload outside a DATA frame");
            return;
        };
        debug_assert!(rx_id == id && n <= remaining as usize);
        let n = n.min(remaining as usize);
        if n > 0 {
            match self.streams.get_mut(&id) {
                Some(s) => {
                    match chunk {
                        Some(chunk) => s.recv.push(chunk),
                        None => s.recv.commit(n),
                    }
                    self.conn_buffered += n;
                    if !s.readable_signaled {
                        s.readable_signaled = true;
                        self.events.push_back(Event::Readable { id: StreamId(id) });
                    }
                }
                None => self.conn_recv_unacked += n as u32,
            }
        }
        // n ≤ remaining, a u32.
        let remaining = remaining - n as u32;
        if remaining == 0 {
            self.rx = Rx::Header;
            self.end_data(id, fin);
        } else {
            self.rx = Rx::Data { id, remaining, fin };
        }
    }

    fn end_data(&mut self, id: u32, fin: bool) {
        if !fin {
            return;
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv_fin = true;
            self.maybe_signal_fin(id);
        }
    }

    fn end_control(&mut self, header: Header, now: Instant) -> Result<(), ProtocolError> {
        let payload = std::mem::take(&mut self.rx_control);
        let result = ControlFrame::parse(&header, &payload).and_then(|f| self.on_control(f, now));
        self.rx_control = payload;
        result
    }

    fn on_control(&mut self, frame: ControlFrame<'_>, now: Instant) -> Result<(), ProtocolError> {
        match frame {
            ControlFrame::Open { id, dial_header } => self.on_open(id, dial_header),
            ControlFrame::OpenResult { id, result } => self.on_open_result(id, result),
            ControlFrame::WindowUpdate { id, increment } => self.on_window_update(id, increment),
            ControlFrame::Reset { id, code } => self.on_reset(id, code),
            ControlFrame::Ping { ack: false, opaque } => {
                self.pong = Some(opaque);
                Ok(())
            }
            ControlFrame::Ping { ack: true, opaque } => {
                if let Some((seq, sent)) = self.ping_outstanding {
                    if opaque == seq.to_be_bytes() {
                        self.ping_outstanding = None;
                        let rtt = now.saturating_duration_since(sent);
                        self.events.push_back(Event::Pong { rtt });
                    }
                }
                Ok(())
            }
            ControlFrame::GoAway {
                last_stream_id,
                code,
                message,
            } => self.on_go_away(last_stream_id, code, message),
        }
    }

    fn on_open(&mut self, id: u32, dial_header: &[u8]) -> Result<(), ProtocolError> {
        if self.role.opens(id) {
            return Err(ProtocolError::WrongParity { id });
        }
        if id <= self.max_peer_id {
            return Err(ProtocolError::DuplicateOpen {
                id,
                last: self.max_peer_id,
            });
        }
        if self.goaway_recv.is_some() {
            return Err(ProtocolError::OpenAfterGoAway { id });
        }
        self.max_peer_id = id;
        if self.goaway_sent || self.streams.len() >= MAX_STREAMS {
            if self.control_frames >= MAX_QUEUED_CONTROL_FRAMES {
                return Err(ProtocolError::ControlFlood);
            }
            self.control_frames += 1;
            encode::reset(&mut self.control_out, id, ErrorCode::REFUSED_STREAM);
            return Ok(());
        }
        self.streams
            .insert(id, Stream::new(OpenState::AwaitingAnswer));
        let dial_header = dial_header.to_vec();
        self.events.push_back(Event::StreamOpened {
            id: StreamId(id),
            dial_header,
        });
        Ok(())
    }

    fn on_open_result(&mut self, id: u32, result: Result<(), &str>) -> Result<(), ProtocolError> {
        match self.streams.get_mut(&id) {
            Some(s) if s.open == OpenState::AwaitingResult => {
                let result = match result {
                    Ok(()) => {
                        s.open = OpenState::Established;
                        Ok(())
                    }
                    Err(reason) => {
                        self.remove_stream(id);
                        Err(reason.to_owned())
                    }
                };
                self.events.push_back(Event::OpenResult {
                    id: StreamId(id),
                    result,
                });
                Ok(())
            }
            // Ours, opened and since reset by us: the answer crossed our RESET.
            None if self.role.opens(id) && u64::from(id) < self.next_local_id => Ok(()),
            _ => Err(ProtocolError::UnexpectedOpenResult { id }),
        }
    }

    fn on_window_update(&mut self, id: u32, increment: u32) -> Result<(), ProtocolError> {
        if increment == 0 {
            return Err(ProtocolError::ZeroWindowIncrement { id });
        }
        let add = |credit: u32| {
            credit
                .checked_add(increment)
                .filter(|&w| w <= MAX_WINDOW)
                .ok_or(ProtocolError::WindowOverflow { id })
        };
        if id == 0 {
            let was_exhausted = self.conn_send_credit == 0;
            self.conn_send_credit = add(self.conn_send_credit)?;
            // Only a stream that ran the tunnel credit to zero can be waiting for it, so a flood
            // of small tunnel updates costs no list walks.
            if was_exhausted {
                self.wake_blocked();
            }
            return Ok(());
        }
        let can_queue = self.conn_send_credit > 0 && self.send_space() > 0;
        match self.streams.get_mut(&id) {
            Some(s) => {
                s.send_credit = add(s.send_credit)?;
                // Wake just this stream; its list entry goes at the next sweep.
                if s.blocked && !s.send_finished && can_queue {
                    s.blocked = false;
                    self.events.push_back(Event::Writable { id: StreamId(id) });
                }
                Ok(())
            }
            None => self.check_closed_stream(FrameType::WindowUpdate, id),
        }
    }

    fn on_reset(&mut self, id: u32, code: ErrorCode) -> Result<(), ProtocolError> {
        if self.streams.contains_key(&id) {
            self.remove_stream(id);
            self.events.push_back(Event::StreamReset {
                id: StreamId(id),
                code,
            });
            Ok(())
        } else {
            self.check_closed_stream(FrameType::Reset, id)
        }
    }

    fn on_go_away(
        &mut self,
        last: u32,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), ProtocolError> {
        if code != ErrorCode::NO_ERROR {
            let reason = CloseReason::PeerError {
                code,
                message: message.to_owned(),
            };
            self.close_abruptly(reason, None);
            return Ok(());
        }
        if let Some(previous) = self.goaway_recv {
            // A repeat must say the same: a moving target would make us rescan every stream per
            // 20-byte frame.
            if last != previous {
                return Err(ProtocolError::GoAwayChanged { previous, last });
            }
            return Ok(());
        }
        self.goaway_recv = Some(last);
        self.events.push_back(Event::GoAway {
            last_stream_id: last,
        });
        let mut refused: Vec<u32> = self
            .streams
            .keys()
            .copied()
            .filter(|&id| self.role.opens(id) && id > last)
            .collect();
        refused.sort_unstable();
        for id in refused {
            self.remove_stream(id);
            let code = ErrorCode::REFUSED_STREAM;
            self.events.push_back(Event::StreamReset {
                id: StreamId(id),
                code,
            });
        }
        Ok(())
    }

    /// A frame named a stream that is not live: fine if it was opened once (the frame crossed
    /// a RESET or FIN on the wire), a protocol error if it never was.
    fn check_closed_stream(&self, kind: FrameType, id: u32) -> Result<(), ProtocolError> {
        let opened = if self.role.opens(id) {
            u64::from(id) < self.next_local_id
        } else {
            id != 0 && id <= self.max_peer_id
        };
        if opened {
            Ok(())
        } else {
            Err(ProtocolError::StreamNotOpened { kind, id })
        }
    }

    // ----- streams -----

    fn after_read(&mut self, id: u32, n: usize) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if n > 0 {
            // n ≤ bytes buffered ≤ the stream window, a u32.
            let n32 = n as u32;
            self.conn_buffered -= n;
            self.conn_recv_unacked += n32;
            s.recv_unacked += n32;
            if !s.recv_fin && !s.update_queued && s.recv_unacked >= s.recv_limit / 2 {
                s.update_queued = true;
                self.window_updates.push(id);
            }
        }
        if s.recv.is_empty() {
            s.readable_signaled = false;
            self.maybe_signal_fin(id);
        }
    }

    fn maybe_signal_fin(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.recv_fin && !s.fin_signaled && s.recv.is_empty() {
            s.fin_signaled = true;
            let done = s.is_done();
            self.events
                .push_back(Event::StreamFinished { id: StreamId(id) });
            if done {
                self.remove_stream(id);
            }
        }
    }

    /// Forgets a stream; its unread bytes return their tunnel credit. Entries on the blocked and
    /// window-update lists are dropped lazily.
    fn remove_stream(&mut self, id: u32) {
        if let Some(s) = self.streams.remove(&id) {
            let buffered = s.recv.len();
            self.conn_buffered -= buffered;
            self.conn_recv_unacked += buffered as u32;
        }
    }

    /// Bytes `send` may still queue, keeping room for one header.
    fn send_space(&self) -> usize {
        MAX_SEND_QUEUE_BYTES.saturating_sub(self.tx.queued() + HEADER_LEN)
    }

    /// Emits `Writable` for blocked streams that can send again; drops stale entries.
    fn wake_blocked(&mut self) {
        let can_queue = self.conn_send_credit > 0 && self.send_space() > 0;
        let streams = &mut self.streams;
        let events = &mut self.events;
        self.blocked.retain(|&id| {
            let Some(s) = streams.get_mut(&id) else {
                return false;
            };
            let waiting = s.blocked && !s.send_finished;
            if waiting && !(can_queue && s.send_credit > 0) {
                return true;
            }
            if waiting {
                events.push_back(Event::Writable { id: StreamId(id) });
            }
            s.blocked = false;
            s.listed = false;
            false
        });
    }

    fn conn_update_due(&self) -> bool {
        // Eager once less than half the window is left: stalled streams may be holding the rest,
        // and the flowing ones must not wait for half a window of their own reads.
        self.conn_recv_unacked > 0
            && (self.conn_recv_unacked >= CONN_WINDOW / 2
                || self.conn_recv_window < CONN_WINDOW / 2)
    }

    // ----- tunnel phases -----

    fn ensure_open(&self) -> Result<(), MuxError> {
        match &self.closed {
            Some(reason) => Err(MuxError::Closed(reason.clone())),
            None => Ok(()),
        }
    }

    fn reserve_control(&mut self) -> Result<(), MuxError> {
        if self.control_frames >= MAX_QUEUED_CONTROL_FRAMES {
            return Err(MuxError::ControlQueueFull);
        }
        self.control_frames += 1;
        Ok(())
    }

    fn queue_ping(&mut self, now: Instant) {
        self.ping_seq += 1;
        self.ping_out = Some(self.ping_seq);
        self.ping_outstanding = Some((self.ping_seq, now));
    }

    fn fail(&mut self, err: ProtocolError) {
        let message = err.to_string();
        let code = err.code();
        self.close_abruptly(CloseReason::Protocol(err), Some((code, &message)));
    }

    /// Closes now: drops every stream and everything queued, then queues `goaway` if given.
    fn close_abruptly(&mut self, reason: CloseReason, goaway: Option<(ErrorCode, &str)>) {
        self.control_out.clear();
        self.control_frames = 0;
        self.tx.clear_queued();
        if let Some((code, message)) = goaway {
            encode::go_away(&mut self.control_out, self.max_peer_id, code, message);
            self.control_frames = 1;
        }
        self.enter_closed(reason);
    }

    /// Closed: streams and per-stream lists go; queued output stays for `poll_transmit`.
    fn enter_closed(&mut self, reason: CloseReason) {
        self.streams.clear();
        self.conn_buffered = 0;
        self.window_updates.clear();
        self.blocked.clear();
        self.pong = None;
        self.ping_out = None;
        self.ping_outstanding = None;
        self.rx = Rx::Header;
        self.rx_header_len = 0;
        self.rx_control.clear();
        self.input_target = None;
        self.events.push_back(Event::Closed {
            reason: reason.clone(),
        });
        self.closed = Some(reason);
    }

    /// End of every public entry point: a drained tunnel closes, then the invariants hold.
    /// (`input_buf` is the one entry point that does not settle: its target must survive until
    /// `input_commit`; every other call voids it, so that nothing moves the buffer under it.)
    fn settle(&mut self) {
        self.input_target = None;
        self.send_target = None;
        let draining = self.goaway_sent || self.goaway_recv.is_some();
        if self.closed.is_none() && draining && self.streams.is_empty() {
            self.enter_closed(CloseReason::Drained);
        }
        self.check_invariants();
    }

    #[cfg(debug_assertions)]
    fn check_invariants_debug(&self) {
        let list_bound = MAX_STREAMS + MAX_QUEUED_CONTROL_FRAMES;
        assert!(self.control_frames <= MAX_QUEUED_CONTROL_FRAMES);
        assert_eq!(self.control_frames == 0, self.control_out.is_empty());
        self.tx.check();
        assert!(self.rx_header_len < HEADER_LEN);
        assert!(self.rx_control.len() <= super::MAX_CONTROL_PAYLOAD);
        assert!(self.streams.len() <= MAX_STREAMS);
        assert!(self.blocked.len() <= list_bound);
        assert!(self.window_updates.len() <= list_bound);
        assert!(self.conn_send_credit <= MAX_WINDOW);
        assert!(self.next_local_id % 2 == u64::from(self.role.first_stream_id()) % 2);
        assert!(self.max_peer_id == 0 || !self.role.opens(self.max_peer_id));
        assert!(self.input_target.is_none(), "settle voids the input target");
        assert!(self.send_target.is_none(), "settle voids the send room");
        assert!(self.input_scratch.is_empty() || self.input_scratch.len() == INPUT_BUF_LEN);
        if self.closed.is_some() {
            assert!(self.streams.is_empty() && self.blocked.is_empty());
            assert!(self.pong.is_none() && self.ping_out.is_none());
            assert!(matches!(self.rx, Rx::Header));
            return;
        }
        let in_flight = |id: u32| match self.rx {
            Rx::Data {
                id: rx_id,
                remaining,
                ..
            } if rx_id == id => u64::from(remaining),
            _ => 0,
        };
        let mut buffered = 0usize;
        for (&id, s) in &self.streams {
            assert!(id != 0);
            if self.role.opens(id) {
                assert!(u64::from(id) < self.next_local_id);
                assert!(s.open != OpenState::AwaitingAnswer);
                if let Some(last) = self.goaway_recv {
                    assert!(id <= last, "stream {id} above the peer's GOAWAY survived");
                }
            } else {
                assert!(id <= self.max_peer_id);
                assert!(s.open != OpenState::AwaitingResult);
            }
            let accounted = u64::from(s.recv_window)
                + s.recv.len() as u64
                + u64::from(s.recv_unacked)
                + in_flight(id);
            assert_eq!(accounted, u64::from(s.recv_limit), "stream {id} window");
            assert!((INITIAL_STREAM_WINDOW..=MAX_STREAM_WINDOW).contains(&s.recv_limit));
            assert!(s.send_credit <= MAX_WINDOW);
            assert!(!s.is_done(), "stream {id} is done but still live");
            assert!(!s.fin_signaled || (s.recv_fin && s.recv.is_empty()));
            assert!(s.recv.is_empty() || s.readable_signaled);
            assert!(!s.blocked || s.listed);
            assert!(!s.listed || self.blocked.contains(&id));
            assert!(!s.update_queued || self.window_updates.contains(&id));
            // Compaction keeps the allocation within the window plus one frame.
            assert!(s.recv.allocated() <= s.recv_limit as usize + MAX_FRAME_PAYLOAD);
            buffered += s.recv.len();
        }
        assert_eq!(buffered, self.conn_buffered);
        let live_entries = self
            .blocked
            .iter()
            .filter(|id| self.streams.contains_key(id))
            .count();
        let listed = self.streams.values().filter(|s| s.listed).count();
        assert_eq!(
            live_entries, listed,
            "the blocked list holds each listed stream once"
        );
        let rx_remaining = match self.rx {
            Rx::Data { remaining, .. } => u64::from(remaining),
            _ => 0,
        };
        let accounted = u64::from(self.conn_recv_window)
            + self.conn_buffered as u64
            + u64::from(self.conn_recv_unacked)
            + rx_remaining;
        assert_eq!(accounted, u64::from(CONN_WINDOW), "tunnel window");
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
    use std::time::Duration;

    use super::*;
    use crate::mux::frame::{FLAG_ACK, FLAG_OK};

    fn t0() -> Instant {
        Instant::now()
    }

    fn pair(now: Instant) -> (Conn, Conn) {
        let engine = Conn::new(Role::Server, Config::default(), now);
        let agent = Conn::new(Role::Client, Config::default(), now);
        (engine, agent)
    }

    /// Moves everything `from` wants to send into `to`.
    fn pump(from: &mut Conn, to: &mut Conn, now: Instant) -> Result<usize, MuxError> {
        let mut buf = Vec::new();
        from.poll_transmit(&mut buf);
        to.handle_input(&buf, now)?;
        Ok(buf.len())
    }

    fn events(conn: &mut Conn) -> Vec<Event> {
        std::iter::from_fn(|| conn.poll_event()).collect()
    }

    fn frames(bytes: &[u8]) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some((head, tail)) = rest.split_first_chunk::<HEADER_LEN>() {
            let h = Header::decode(head).unwrap();
            let (payload, tail) = tail.split_at(h.len as usize);
            out.push((h, payload.to_vec()));
            rest = tail;
        }
        assert!(rest.is_empty());
        out
    }

    /// An engine with one accepted stream (id 1) to the agent.
    fn established(now: Instant) -> (Conn, Conn, StreamId) {
        let (mut engine, mut agent) = pair(now);
        let id = engine.open_stream(b"tcp db:5432").unwrap();
        pump(&mut engine, &mut agent, now).unwrap();
        assert_eq!(
            events(&mut agent),
            vec![Event::StreamOpened {
                id,
                dial_header: b"tcp db:5432".to_vec()
            }]
        );
        agent.open_result(id, Ok(())).unwrap();
        pump(&mut agent, &mut engine, now).unwrap();
        assert_eq!(
            events(&mut engine),
            vec![Event::OpenResult { id, result: Ok(()) }]
        );
        (engine, agent, id)
    }

    #[test]
    fn stream_lifecycle() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        assert_eq!(engine.send(id, b"hello ").unwrap(), 6);
        assert_eq!(engine.send(id, b"world").unwrap(), 5);
        engine.finish(id).unwrap();
        // Two sends and the FIN coalesce into one frame.
        let mut wire = Vec::new();
        engine.poll_transmit(&mut wire);
        let fr = frames(&wire);
        assert_eq!(fr.len(), 1);
        assert_eq!(fr[0].0.flags, FLAG_FIN);
        assert_eq!(fr[0].1, b"hello world");
        agent.handle_input(&wire, now).unwrap();
        assert_eq!(events(&mut agent), vec![Event::Readable { id }]);
        let mut buf = [0u8; 64];
        assert_eq!(agent.recv(id, &mut buf).unwrap(), 11);
        assert_eq!(&buf[..11], b"hello world");
        assert_eq!(events(&mut agent), vec![Event::StreamFinished { id }]);
        assert_eq!(agent.send(id, b"bye").unwrap(), 3);
        agent.finish(id).unwrap();
        assert_eq!(agent.stream_count(), 0, "both directions done");
        pump(&mut agent, &mut engine, now).unwrap();
        assert_eq!(events(&mut engine), vec![Event::Readable { id }]);
        assert_eq!(engine.read_buf(id).unwrap(), b"bye");
        assert_eq!(engine.consume(id, 100).unwrap(), 3);
        assert_eq!(events(&mut engine), vec![Event::StreamFinished { id }]);
        assert_eq!(engine.stream_count(), 0);
        assert!(matches!(
            engine.send(id, b"x"),
            Err(MuxError::UnknownStream(_))
        ));
    }

    #[test]
    fn refused_open_forgets_the_stream() {
        let now = t0();
        let (mut engine, mut agent) = pair(now);
        let id = engine.open_stream(b"ssh nowhere").unwrap();
        // Optimistic data before the answer is allowed, and dropped on refusal.
        assert_eq!(engine.send(id, b"SSH-2.0-x\r\n").unwrap(), 11);
        pump(&mut engine, &mut agent, now).unwrap();
        assert!(matches!(
            agent.send(id, b"x"),
            Err(MuxError::NotAccepted(_))
        ));
        agent.open_result(id, Err("no route to host")).unwrap();
        assert_eq!(agent.stream_count(), 0);
        pump(&mut agent, &mut engine, now).unwrap();
        assert_eq!(
            events(&mut engine),
            vec![Event::OpenResult {
                id,
                result: Err("no route to host".into())
            }]
        );
        assert_eq!(engine.stream_count(), 0);
    }

    /// A reader that takes everything while the sender uses up its credit (bulk) doubles the
    /// stream's window with each update up to MAX_STREAM_WINDOW; the buffer never holds more.
    #[test]
    fn the_window_grows_while_the_reader_keeps_up() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        let queue_room = MAX_SEND_QUEUE_BYTES - HEADER_LEN;
        let mut credits = Vec::new();
        let mut buf = vec![0u8; MAX_STREAM_WINDOW as usize];
        for round in 0..4u8 {
            let cap = engine.send_capacity(id).unwrap();
            credits.push(cap);
            assert_eq!(engine.send(id, &vec![round; cap]).unwrap(), cap);
            assert_eq!(engine.send(id, b"x").unwrap(), 0, "no credit left");
            pump(&mut engine, &mut agent, now).unwrap();
            assert_eq!(agent.recv(id, &mut buf).unwrap(), cap);
            assert!(buf[..cap].iter().all(|&b| b == round));
            pump(&mut agent, &mut engine, now).unwrap();
            agent.check_invariants();
            engine.check_invariants();
        }
        let (w0, max) = (INITIAL_STREAM_WINDOW as usize, MAX_STREAM_WINDOW as usize);
        assert_eq!(
            credits,
            [w0, 2 * w0, queue_room.min(max), queue_room.min(max)]
        );
    }

    /// Buffers grown by bulk stay while the tunnel is busy and go once the peer has been silent
    /// for a keepalive interval; the tunnel works on after.
    #[test]
    fn a_quiet_tunnel_frees_what_bulk_grew() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        let mut buf = vec![0u8; MAX_STREAM_WINDOW as usize];
        let mut bulk = |engine: &mut Conn, agent: &mut Conn, now| {
            for _ in 0..3 {
                let cap = engine.send_capacity(id).unwrap();
                assert_eq!(engine.send(id, &vec![1u8; cap]).unwrap(), cap);
                pump(engine, agent, now).unwrap();
                assert_eq!(agent.recv(id, &mut buf).unwrap(), cap);
                pump(agent, engine, now).unwrap();
            }
        };
        bulk(&mut engine, &mut agent, now);
        let grown = 256 * 1024;
        let recv_allocated = |agent: &Conn| agent.streams[&id.get()].recv.allocated();
        engine.release_idle_buffers();
        agent.release_idle_buffers();
        assert!(
            engine.tx.allocated() > grown,
            "a busy tunnel keeps its queue"
        );
        assert!(recv_allocated(&agent) > grown);

        // Input clears the wish: the timer fired, but bytes (a PING) came in before the
        // driver slept.
        let later = now + Config::default().keepalive_interval;
        agent.handle_timeout(later);
        engine.ping(later).unwrap();
        pump(&mut engine, &mut agent, later).unwrap();
        agent.release_idle_buffers();
        assert!(recv_allocated(&agent) > grown);
        // The pings answered both ways.
        pump(&mut agent, &mut engine, later).unwrap();
        pump(&mut engine, &mut agent, later).unwrap();

        let later = later + Config::default().keepalive_interval;
        engine.handle_timeout(later);
        agent.handle_timeout(later);
        engine.release_idle_buffers();
        agent.release_idle_buffers();
        assert_eq!(engine.tx.allocated(), 0);
        assert_eq!(recv_allocated(&agent), 0);
        engine.check_invariants();
        agent.check_invariants();

        // Pings answered, bulk flows again.
        pump(&mut engine, &mut agent, later).unwrap();
        pump(&mut agent, &mut engine, later).unwrap();
        pump(&mut engine, &mut agent, later).unwrap();
        bulk(&mut engine, &mut agent, later);
        engine.check_invariants();
        agent.check_invariants();
        assert!(!engine.is_closed() && !agent.is_closed());
    }

    #[test]
    fn send_takes_at_most_the_credit_and_writable_follows_the_update() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        let big = vec![7u8; INITIAL_STREAM_WINDOW as usize + 1000];
        assert_eq!(
            engine.send(id, &big).unwrap(),
            INITIAL_STREAM_WINDOW as usize
        );
        assert_eq!(engine.send(id, b"more").unwrap(), 0);
        assert_eq!(engine.send_capacity(id).unwrap(), 0);
        pump(&mut engine, &mut agent, now).unwrap();
        let mut buf = vec![0u8; INITIAL_STREAM_WINDOW as usize / 2 - 1];
        agent.recv(id, &mut buf).unwrap();
        assert!(
            !agent.has_pending_transmit(),
            "no update before half a window is read"
        );
        agent.recv(id, &mut buf[..1]).unwrap();
        pump(&mut agent, &mut engine, now).unwrap();
        assert_eq!(events(&mut engine), vec![Event::Writable { id }]);
        assert_eq!(
            engine.send_capacity(id).unwrap(),
            INITIAL_STREAM_WINDOW as usize / 2
        );
    }

    #[test]
    fn split_input_at_every_byte_gives_the_same_result() {
        let now = t0();
        let (mut engine, _, _) = established(now);
        let id2 = engine.open_stream(&[9u8; 300]).unwrap();
        engine.send(id2, &[1u8; 70_000]).unwrap();
        engine.finish(id2).unwrap();
        engine.ping(now).unwrap();
        let mut wire = Vec::new();
        engine.poll_transmit(&mut wire);
        // Establish stream 1 on a fresh agent first, then replay the rest one byte at a time.
        let (_, mut agent_whole, _) = established(now);
        let (_, mut agent_bytes, _) = established(now);
        agent_whole.handle_input(&wire, now).unwrap();
        for b in &wire {
            agent_bytes
                .handle_input(std::slice::from_ref(b), now)
                .unwrap();
        }
        let whole = events(&mut agent_whole);
        assert_eq!(whole, events(&mut agent_bytes));
        let mut a = vec![0u8; 80_000];
        let mut b = vec![0u8; 80_000];
        assert_eq!(agent_whole.recv(id2, &mut a).unwrap(), 70_000);
        assert_eq!(agent_bytes.recv(id2, &mut b).unwrap(), 70_000);
        assert_eq!(a, b);
    }

    #[test]
    fn zero_copy_input_reads_payloads_in_place() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(engine.send(id, &data).unwrap(), 200_000);
        engine.finish(id).unwrap();
        let mut wire = Vec::new();
        engine.poll_transmit(&mut wire);
        let mut pos = 0;
        let mut reads = Vec::new();
        while pos < wire.len() {
            let buf = agent.input_buf();
            let n = buf.len().min(wire.len() - pos);
            buf[..n].copy_from_slice(&wire[pos..pos + n]);
            reads.push(n);
            agent.input_commit(n, now).unwrap();
            pos += n;
        }
        // Frames of 64 KiB, 64 KiB, 64 KiB and 3392 bytes. The first read fills the internal
        // buffer; once frames are known to be large, the payload tail and each header are read
        // exactly and every large payload in place; the small last one goes the copying way.
        assert_eq!(reads, [INPUT_BUF_LEN, 12, 12, 65536, 12, 65536, 12, 3392]);
        let mut out = vec![0u8; 250_000];
        assert_eq!(agent.recv(id, &mut out).unwrap(), 200_000);
        assert_eq!(&out[..200_000], &data[..]);
        assert_eq!(
            events(&mut agent),
            vec![Event::Readable { id }, Event::StreamFinished { id }]
        );
        // A commit without a pending buffer is local misuse, not a protocol error.
        assert_eq!(agent.input_commit(1, now), Err(MuxError::NoInputBuf));
        let _ = agent.input_buf();
        agent.poll_transmit(&mut Vec::new());
        assert_eq!(agent.input_commit(1, now), Err(MuxError::NoInputBuf));
        assert!(!agent.is_closed());
    }

    #[test]
    fn ping_is_answered_and_measured() {
        let now = t0();
        let (mut engine, mut agent) = pair(now);
        engine.ping(now).unwrap();
        pump(&mut engine, &mut agent, now).unwrap();
        let mut wire = Vec::new();
        agent.poll_transmit(&mut wire);
        let fr = frames(&wire);
        assert_eq!(fr[0].0.kind, FrameType::Ping);
        assert_eq!(fr[0].0.flags, FLAG_ACK);
        engine
            .handle_input(&wire, now + Duration::from_millis(30))
            .unwrap();
        assert_eq!(
            events(&mut engine),
            vec![Event::Pong {
                rtt: Duration::from_millis(30)
            }]
        );
    }

    #[test]
    fn refuses_opens_beyond_the_stream_limit() {
        let now = t0();
        let (mut engine, mut agent) = pair(now);
        for _ in 0..MAX_STREAMS {
            engine.open_stream(b"").unwrap();
            if engine.control_frames == MAX_QUEUED_CONTROL_FRAMES {
                pump(&mut engine, &mut agent, now).unwrap();
            }
        }
        assert!(matches!(
            engine.open_stream(b""),
            Err(MuxError::TooManyStreams)
        ));
        pump(&mut engine, &mut agent, now).unwrap();
        assert_eq!(agent.stream_count(), MAX_STREAMS);
        // A peer that ignores the limit is refused, not disconnected: hand-craft one more OPEN.
        let mut wire = Vec::new();
        encode::open(&mut wire, 2 * MAX_STREAMS as u32 + 1, b"");
        agent.handle_input(&wire, now).unwrap();
        let mut out = Vec::new();
        agent.poll_transmit(&mut out);
        let fr = frames(&out);
        assert_eq!(fr.len(), 1);
        assert_eq!(fr[0].0.kind, FrameType::Reset);
        assert_eq!(fr[0].1, ErrorCode::REFUSED_STREAM.0.to_be_bytes());
    }

    #[test]
    fn peer_goaway_with_error_closes() {
        let now = t0();
        let (mut engine, mut agent, _) = established(now);
        agent.close(ErrorCode::INTERNAL, "shutting down hard");
        assert!(matches!(
            agent.send(StreamId(1), b"x"),
            Err(MuxError::Closed(_))
        ));
        pump(&mut agent, &mut engine, now).unwrap();
        let ev = events(&mut engine);
        assert_eq!(
            ev,
            vec![Event::Closed {
                reason: CloseReason::PeerError {
                    code: ErrorCode::INTERNAL,
                    message: "shutting down hard".into()
                }
            }]
        );
        assert_eq!(engine.stream_count(), 0);
    }

    /// Feeds `wire` to `conn` and checks it closes with `expect`, emits Closed and queues a
    /// GOAWAY carrying the error's code; later input is refused.
    fn assert_protocol_error(conn: &mut Conn, wire: &[u8], expect: fn(&ProtocolError) -> bool) {
        let now = t0();
        let err = match conn.handle_input(wire, now) {
            Err(MuxError::Protocol(err)) => err,
            other => panic!("expected a protocol error, got {other:?}"),
        };
        assert!(expect(&err), "unexpected error {err:?}");
        let ev = events(conn);
        assert_eq!(
            ev.last(),
            Some(&Event::Closed {
                reason: CloseReason::Protocol(err.clone())
            })
        );
        let mut out = Vec::new();
        conn.poll_transmit(&mut out);
        let fr = frames(&out);
        assert_eq!(fr.len(), 1, "only the GOAWAY goes out");
        let frame = ControlFrame::parse(&fr[0].0, &fr[0].1).unwrap();
        match frame {
            ControlFrame::GoAway { code, .. } => assert_eq!(code, err.code()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            conn.handle_input(b"x", now),
            Err(MuxError::Closed(_))
        ));
        assert_eq!(conn.poll_transmit(&mut out), 0);
        assert!(conn.poll_timeout().is_none());
    }

    fn wire(build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        build(&mut v);
        v
    }

    #[test]
    fn malformed_input_closes_the_tunnel() {
        use ProtocolError as E;
        type Case = (&'static str, Vec<u8>, fn(&ProtocolError) -> bool);
        let raw = |len: u32, kind: u8, flags: u8, stream: u32| {
            let mut b = len.to_be_bytes().to_vec();
            b.extend_from_slice(&[kind, flags, 0, 0]);
            b.extend_from_slice(&stream.to_be_bytes());
            b
        };
        // Each case goes to an agent that has accepted engine stream 1.
        let cases: Vec<Case> = vec![
            ("unknown type", raw(0, 9, 0, 1), |e| {
                matches!(e, E::UnknownFrameType { .. })
            }),
            ("oversized", raw(1 << 20, 0, 0, 1), |e| {
                matches!(e, E::BadLength { .. })
            }),
            ("bad flags", raw(0, 0, 0x80, 1), |e| {
                matches!(e, E::BadFlags { .. })
            }),
            (
                "reserved",
                {
                    let mut b = raw(0, 0, 0, 1);
                    b[7] = 1;
                    b
                },
                |e| matches!(e, E::ReservedField { .. }),
            ),
            ("ping on a stream", raw(8, 5, 0, 1), |e| {
                matches!(e, E::BadStreamId { .. })
            }),
            (
                "open with our parity",
                wire(|w| encode::open(w, 4, b"")),
                |e| matches!(e, E::WrongParity { id: 4 }),
            ),
            ("duplicate open", wire(|w| encode::open(w, 1, b"")), |e| {
                matches!(e, E::DuplicateOpen { id: 1, .. })
            }),
            (
                "data on a never-opened stream",
                wire(|w| encode::data(w, 3, false, b"x")),
                |e| matches!(e, E::StreamNotOpened { id: 3, .. }),
            ),
            (
                "data on our never-opened stream",
                wire(|w| encode::data(w, 2, false, b"x")),
                |e| matches!(e, E::StreamNotOpened { id: 2, .. }),
            ),
            (
                "reset of a never-opened stream",
                wire(|w| encode::reset(w, 5, ErrorCode::CANCEL)),
                |e| matches!(e, E::StreamNotOpened { .. }),
            ),
            (
                "update for a never-opened stream",
                wire(|w| encode::window_update(w, 7, 1)),
                |e| matches!(e, E::StreamNotOpened { .. }),
            ),
            (
                "stream window exceeded",
                wire(|w| {
                    for _ in 0..4 {
                        encode::data(w, 1, false, &[0u8; MAX_FRAME_PAYLOAD]);
                    }
                    encode::data(w, 1, false, b"!");
                }),
                |e| matches!(e, E::StreamWindowExceeded { id: 1, .. }),
            ),
            (
                "data after fin",
                wire(|w| {
                    encode::data(w, 1, true, b"a");
                    encode::data(w, 1, false, b"b");
                }),
                |e| matches!(e, E::DataAfterFin { id: 1 }),
            ),
            (
                "zero window update",
                wire(|w| {
                    encode::header(w, 4, FrameType::WindowUpdate, 0, 1);
                    w.extend_from_slice(&0u32.to_be_bytes());
                }),
                |e| matches!(e, E::ZeroWindowIncrement { .. }),
            ),
            (
                "stream window overflow",
                wire(|w| encode::window_update(w, 1, MAX_WINDOW)),
                |e| matches!(e, E::WindowOverflow { id: 1 }),
            ),
            (
                "tunnel window overflow",
                wire(|w| encode::window_update(w, 0, MAX_WINDOW)),
                |e| matches!(e, E::WindowOverflow { id: 0 }),
            ),
            (
                "open result for the peer's own stream",
                wire(|w| encode::open_result(w, 1, Ok(()))),
                |e| matches!(e, E::UnexpectedOpenResult { id: 1 }),
            ),
            (
                "open result never asked for",
                wire(|w| encode::open_result(w, 2, Ok(()))),
                |e| matches!(e, E::UnexpectedOpenResult { id: 2 }),
            ),
            (
                "refusal not utf-8",
                wire(|w| {
                    encode::header(w, 1, FrameType::OpenResult, 0, 1);
                    w.push(0xff);
                }),
                |e| matches!(e, E::NotUtf8 { .. }),
            ),
            (
                "goaway changed",
                wire(|w| {
                    encode::go_away(w, 1, ErrorCode::NO_ERROR, "");
                    encode::go_away(w, 1, ErrorCode::NO_ERROR, "a repeat is fine");
                    encode::go_away(w, 0, ErrorCode::NO_ERROR, "");
                }),
                |e| {
                    matches!(
                        e,
                        E::GoAwayChanged {
                            previous: 1,
                            last: 0
                        }
                    )
                },
            ),
            (
                "open after goaway",
                wire(|w| {
                    encode::go_away(w, 0, ErrorCode::NO_ERROR, "");
                    encode::open(w, 3, b"");
                }),
                |e| matches!(e, E::OpenAfterGoAway { id: 3 }),
            ),
            (
                "ok with a reason",
                {
                    let mut b = raw(2, 2, FLAG_OK, 1);
                    b.extend_from_slice(b"hi");
                    b
                },
                |e| matches!(e, E::BadLength { .. }),
            ),
        ];
        for (name, bytes, expect) in cases {
            let (_, mut agent, _) = established(t0());
            eprintln!("case: {name}");
            assert_protocol_error(&mut agent, &bytes, expect);
        }
    }

    #[test]
    fn data_before_open_result_is_an_error_for_the_opener() {
        let now = t0();
        let (mut engine, _) = pair(now);
        let id = engine.open_stream(b"").unwrap();
        let bytes = wire(|w| encode::data(w, id.get(), false, b"early"));
        assert_protocol_error(&mut engine, &bytes, |e| {
            matches!(e, ProtocolError::DataBeforeOpenResult { id: 1 })
        });
    }

    #[test]
    fn tunnel_window_exceeded_is_an_error() {
        let now = t0();
        let (mut engine, mut agent) = pair(now);
        // 65 streams each filled to its window: the 65th overruns the tunnel window.
        let count = (CONN_WINDOW / INITIAL_STREAM_WINDOW) as usize + 1;
        let mut w = Vec::new();
        for _ in 0..count {
            let id = engine.open_stream(b"").unwrap();
            engine.poll_transmit(&mut w);
            for _ in 0..(INITIAL_STREAM_WINDOW as usize / MAX_FRAME_PAYLOAD) {
                encode::data(&mut w, id.get(), false, &[0u8; MAX_FRAME_PAYLOAD]);
            }
        }
        assert_protocol_error(&mut agent, &w, |e| {
            matches!(e, ProtocolError::ConnWindowExceeded { .. })
        });
    }

    #[test]
    fn refused_open_flood_is_bounded() {
        let now = t0();
        let (_, mut agent) = pair(now);
        agent.go_away().unwrap();
        // Drained at once (no streams): new input is refused outright.
        assert!(agent.is_closed());
        let (_, mut agent, _) = established(now);
        agent.go_away().unwrap();
        let mut w = Vec::new();
        for i in 0..=MAX_QUEUED_CONTROL_FRAMES as u32 {
            encode::open(&mut w, 3 + 2 * i, b"");
        }
        assert_protocol_error(&mut agent, &w, |e| matches!(e, ProtocolError::ControlFlood));
    }

    #[test]
    fn frames_for_closed_streams_are_ignored() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        // The agent resets while the engine's data and update are in flight.
        engine.send(id, b"late data").unwrap();
        agent.reset(id, ErrorCode::CANCEL).unwrap();
        let mut to_engine = Vec::new();
        agent.poll_transmit(&mut to_engine);
        pump(&mut engine, &mut agent, now).unwrap();
        agent
            .handle_input(&wire(|w| encode::window_update(w, 1, 10)), now)
            .unwrap();
        agent
            .handle_input(&wire(|w| encode::reset(w, 1, ErrorCode::CANCEL)), now)
            .unwrap();
        assert!(events(&mut agent).is_empty());
        engine.handle_input(&to_engine, now).unwrap();
        assert_eq!(
            events(&mut engine),
            vec![Event::StreamReset {
                id,
                code: ErrorCode::CANCEL
            }]
        );
        // The discarded bytes returned their tunnel credit.
        assert_eq!(agent.conn_recv_unacked, 9);
    }

    #[test]
    fn goaway_drains_then_closes() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        agent.go_away().unwrap();
        pump(&mut agent, &mut engine, now).unwrap();
        assert_eq!(
            events(&mut engine),
            vec![Event::GoAway { last_stream_id: 1 }]
        );
        assert!(matches!(engine.open_stream(b""), Err(MuxError::GoingAway)));
        engine.send(id, b"last words").unwrap();
        engine.finish(id).unwrap();
        pump(&mut engine, &mut agent, now).unwrap();
        let mut buf = [0u8; 32];
        assert_eq!(agent.recv(id, &mut buf).unwrap(), 10);
        agent.finish(id).unwrap();
        assert!(agent.is_closed());
        assert_eq!(agent.close_reason(), Some(&CloseReason::Drained));
        // The FIN still goes out after the close.
        pump(&mut agent, &mut engine, now).unwrap();
        let ev = events(&mut engine);
        assert_eq!(
            ev,
            vec![
                Event::StreamFinished { id },
                Event::Closed {
                    reason: CloseReason::Drained
                }
            ]
        );
    }

    #[test]
    fn keepalive_then_dead_peer() {
        let now = t0();
        let config = Config {
            keepalive_interval: Duration::from_secs(10),
            dead_peer_timeout: Duration::from_secs(30),
        };
        let mut engine = Conn::new(Role::Server, config, now);
        assert_eq!(engine.poll_timeout(), Some(now + Duration::from_secs(10)));
        engine.handle_timeout(now + Duration::from_secs(10));
        assert!(engine.has_pending_transmit());
        let mut out = Vec::new();
        engine.poll_transmit(&mut out);
        assert_eq!(frames(&out)[0].0.kind, FrameType::Ping);
        assert_eq!(engine.poll_timeout(), Some(now + Duration::from_secs(30)));
        engine.handle_timeout(now + Duration::from_secs(30));
        assert!(engine.is_closed());
        assert_eq!(
            events(&mut engine),
            vec![Event::Closed {
                reason: CloseReason::Timeout
            }]
        );
    }

    #[test]
    fn local_misuse_is_an_error_not_a_close() {
        let now = t0();
        let (mut engine, _, id) = established(now);
        let unknown = StreamId::new(99).unwrap();
        assert_eq!(
            engine.send(unknown, b"x"),
            Err(MuxError::UnknownStream(unknown))
        );
        assert!(matches!(
            engine.open_result(id, Ok(())),
            Err(MuxError::NotAwaitingAnswer(_))
        ));
        let long = vec![0u8; MAX_DIAL_HEADER_LEN + 1];
        assert!(matches!(
            engine.open_stream(&long),
            Err(MuxError::TooLong { .. })
        ));
        engine.finish(id).unwrap();
        assert_eq!(engine.finish(id), Err(MuxError::SendFinished(id)));
        assert_eq!(engine.send(id, b"x"), Err(MuxError::SendFinished(id)));
        assert!(!engine.is_closed());
        assert_eq!(MuxError::SendFinished(id).blame(), crate::mux::Blame::Local);
    }

    /// Takes everything `conn` has to send through `transmit_buf`, in writes of at most `chunk`
    /// bytes; returns the bytes and the batches (as seen at their first byte).
    fn drain_in_place(conn: &mut Conn, chunk: usize) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut batches = 0;
        let mut fresh = true;
        loop {
            let batch = conn.transmit_buf();
            if batch.is_empty() {
                return (out, batches);
            }
            if fresh {
                batches += 1;
            }
            let n = batch.len().min(chunk);
            out.extend_from_slice(&batch[..n]);
            fresh = n == batch.len();
            assert_eq!(conn.transmit_advance(n), n);
        }
    }

    #[test]
    fn send_buf_writes_payload_in_place_behind_a_reserved_header() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        // Two reservations on one stream share a frame; the bytes are never copied again: the
        // batch handed to the writer holds them at the very address they were written to.
        let room = engine.send_buf(id, 5).unwrap();
        assert_eq!(room.len(), 5);
        room.copy_from_slice(b"hello");
        assert_eq!(engine.send_commit(id, 5).unwrap(), 5);
        let room = engine.send_buf(id, 100).unwrap();
        assert_eq!(room.len(), 100);
        room[..6].copy_from_slice(b" world");
        let written_at = room.as_ptr() as usize;
        // A partial commit takes what was written; the rest of the room is not sent.
        assert_eq!(engine.send_commit(id, 6).unwrap(), 6);
        engine.finish(id).unwrap();
        let batch = engine.transmit_buf();
        let batch_at = batch.as_ptr() as usize;
        let fr = frames(batch);
        assert_eq!(fr.len(), 1, "one frame, FIN included");
        assert_eq!(fr[0].0.flags, FLAG_FIN);
        assert_eq!(fr[0].1, b"hello world");
        assert_eq!(
            batch_at + HEADER_LEN + 5,
            written_at,
            "payload went out in place"
        );
        let wire = batch.to_vec();
        engine.transmit_advance(wire.len());
        assert!(engine.transmit_buf().is_empty());
        agent.handle_input(&wire, now).unwrap();
        assert_eq!(agent.read_buf(id).unwrap(), b"hello world");
    }

    #[test]
    fn send_buf_respects_credit_and_frame_size_and_arms_writable() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        let window = INITIAL_STREAM_WINDOW as usize;
        let mut sent = 0;
        while sent < window {
            let room = engine.send_buf(id, usize::MAX).unwrap();
            assert!(!room.is_empty() && room.len() <= MAX_FRAME_PAYLOAD);
            for (i, b) in room.iter_mut().enumerate() {
                *b = ((sent + i) % 251) as u8;
            }
            let n = room.len();
            sent += engine.send_commit(id, n).unwrap();
        }
        assert_eq!(sent, window);
        assert_eq!(engine.send_capacity(id).unwrap(), 0);
        // No credit: empty room, and a Writable once the peer returns some.
        assert!(engine.send_buf(id, 10).unwrap().is_empty());
        assert_eq!(engine.send_commit(id, 10), Err(MuxError::NoSendBuf));
        let (wire, _) = drain_in_place(&mut engine, 10_000);
        for (h, payload) in frames(&wire) {
            assert_eq!(h.len as usize, MAX_FRAME_PAYLOAD, "full frames");
            assert_eq!(payload.len(), MAX_FRAME_PAYLOAD);
        }
        agent.handle_input(&wire, now).unwrap();
        let mut buf = vec![0u8; window];
        assert_eq!(agent.recv(id, &mut buf).unwrap(), window);
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        pump(&mut agent, &mut engine, now).unwrap();
        assert!(events(&mut engine).contains(&Event::Writable { id }));
        assert_eq!(engine.send_buf(id, 7).unwrap().len(), 7);
    }

    #[test]
    fn send_room_is_voided_by_other_calls_and_checked() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        // Another call voids the room: nothing of it is sent.
        engine.send_buf(id, 8).unwrap().copy_from_slice(b"discard!");
        assert_eq!(engine.send(id, b"kept").unwrap(), 4);
        assert_eq!(engine.send_commit(id, 8), Err(MuxError::NoSendBuf));
        engine.send_buf(id, 8).unwrap();
        let _ = engine.input_buf();
        assert_eq!(engine.send_commit(id, 8), Err(MuxError::NoSendBuf));
        // A commit of 0, or on another stream, sends nothing.
        engine.send_buf(id, 8).unwrap();
        assert_eq!(engine.send_commit(id, 0).unwrap(), 0);
        let other = StreamId::new(3).unwrap();
        engine.send_buf(id, 8).unwrap();
        assert_eq!(engine.send_commit(other, 8), Err(MuxError::NoSendBuf));
        // A commit beyond the room is clamped.
        engine.send_buf(id, 3).unwrap().copy_from_slice(b"abc");
        assert_eq!(engine.send_commit(id, 1000).unwrap(), 3);
        pump(&mut engine, &mut agent, now).unwrap();
        assert_eq!(agent.read_buf(id).unwrap(), b"keptabc");
        // The same errors as `send`.
        let unknown = StreamId::new(99).unwrap();
        assert_eq!(
            engine.send_buf(unknown, 1).err(),
            Some(MuxError::UnknownStream(unknown))
        );
        let peer_open = StreamId::new(2).unwrap();
        agent.open_stream(b"").unwrap();
        pump(&mut agent, &mut engine, now).unwrap();
        assert_eq!(
            engine.send_buf(peer_open, 1).err(),
            Some(MuxError::NotAccepted(peer_open))
        );
        engine.finish(id).unwrap();
        assert_eq!(
            engine.send_buf(id, 1).err(),
            Some(MuxError::SendFinished(id))
        );
        assert!(!engine.is_closed());
    }

    #[test]
    fn transmit_batches_never_cut_a_frame_and_put_control_first() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        assert_eq!(engine.send(id, &data).unwrap(), data.len());
        // Start writing the batch, then queue control frames and more data: the rest of the
        // batch goes first, whole, then the control frames, then the new data.
        let first = engine.transmit_buf().len();
        assert_eq!(engine.transmit_advance(1000), 1000);
        engine.ping(now).unwrap();
        let id3 = engine.open_stream(b"second").unwrap();
        assert_eq!(engine.send(id, b"tail").unwrap(), 4);
        assert_eq!(
            engine.transmit_buf().len(),
            first - 1000,
            "the rest of the batch"
        );
        let wire = engine.transmit_buf().to_vec();
        engine.transmit_advance(usize::MAX);
        let (rest, batches) = drain_in_place(&mut engine, 7);
        assert_eq!(batches, 1, "control in the headroom of the data's batch");
        let fr = frames(&rest);
        let kinds: Vec<FrameType> = fr.iter().map(|(h, _)| h.kind).collect();
        assert_eq!(
            kinds,
            [FrameType::Open, FrameType::Ping, FrameType::Data],
            "control first"
        );
        assert_eq!(fr[2].1, b"tail");
        // The peer sees the whole stream, split at arbitrary points.
        let mut full = Vec::new();
        engine.poll_transmit(&mut full);
        assert!(full.is_empty());
        let mut prefix = Vec::new();
        // Rebuild what went out: the first 1000 bytes of the batch were written before.
        let (mut e2, _, _) = established(now);
        e2.send(id, &data).unwrap();
        e2.poll_transmit(&mut prefix);
        prefix.truncate(1000);
        prefix.extend_from_slice(&wire);
        prefix.extend_from_slice(&rest);
        agent.handle_input(&prefix, now).unwrap();
        let mut got = vec![0u8; 200_000];
        let n = agent.recv(id, &mut got).unwrap();
        assert_eq!(&got[..n - 4], &data[..]);
        assert_eq!(&got[n - 4..n], b"tail");
        assert!(events(&mut agent).contains(&Event::StreamOpened {
            id: id3,
            dial_header: b"second".to_vec()
        }));
    }

    #[test]
    fn control_beyond_the_headroom_goes_alone_first() {
        let now = t0();
        let (mut engine, mut agent) = pair(now);
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(engine.open_stream(&[7u8; 100]).unwrap());
        }
        // Optimistic data on the last stream, queued behind 20 OPENs of 112 bytes.
        let last = *ids.last().unwrap();
        assert_eq!(engine.send(last, b"early").unwrap(), 5);
        let (wire, batches) = drain_in_place(&mut engine, usize::MAX);
        assert_eq!(batches, 2, "the control frames, then the data");
        let fr = frames(&wire);
        assert_eq!(fr.len(), 21);
        assert!(fr[..20].iter().all(|(h, _)| h.kind == FrameType::Open));
        assert_eq!(fr[20].0.kind, FrameType::Data);
        agent.handle_input(&wire, now).unwrap();
        for id in &ids {
            agent.open_result(*id, Ok(())).unwrap();
        }
        assert_eq!(agent.read_buf(last).unwrap(), b"early");
    }

    #[test]
    fn transmit_and_poll_transmit_send_the_same_bytes() {
        let now = t0();
        let build = || {
            let (mut engine, _, id) = established(now);
            let id2 = engine.open_stream(b"x").unwrap();
            engine.send(id, &[1u8; 100_000]).unwrap();
            engine.send(id2, &[2u8; 3_000]).unwrap();
            engine.send(id, &[3u8; 10]).unwrap();
            engine.finish(id2).unwrap();
            engine.ping(now).unwrap();
            engine
        };
        let mut copied = Vec::new();
        build().poll_transmit(&mut copied);
        let (in_place, _) = drain_in_place(&mut build(), 999);
        assert_eq!(copied, in_place);
    }

    #[test]
    fn close_keeps_the_batch_in_flight_whole() {
        let now = t0();
        let (mut engine, mut agent, id) = established(now);
        engine.send(id, &[5u8; 50_000]).unwrap();
        let batch_len = engine.transmit_buf().len();
        engine.transmit_advance(100);
        engine.send(id, &[6u8; 50_000]).unwrap();
        engine.close(ErrorCode::INTERNAL, "bye");
        // The started batch is finished (a cut frame would garble the GOAWAY), the queued data
        // is dropped, and the GOAWAY follows.
        let (rest, _) = drain_in_place(&mut engine, 4096);
        assert_eq!(rest.len() - (batch_len - 100), HEADER_LEN + 8 + 3);
        let mut whole = Vec::new();
        let (mut e2, _, _) = established(now);
        e2.send(id, &[5u8; 50_000]).unwrap();
        e2.poll_transmit(&mut whole);
        whole.truncate(100);
        whole.extend_from_slice(&rest);
        // The peer parses the whole batch and then the GOAWAY (a cut frame would make it a
        // protocol error instead).
        agent.handle_input(&whole, now).unwrap();
        assert_eq!(
            events(&mut agent),
            vec![
                Event::Readable { id },
                Event::Closed {
                    reason: CloseReason::PeerError {
                        code: ErrorCode::INTERNAL,
                        message: "bye".into()
                    }
                }
            ]
        );
    }
}
