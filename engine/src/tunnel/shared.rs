//! State shared by one tunnel's driver and its handles ([`super::Tunnel`], [`super::MuxStream`],
//! [`super::Incoming`]) inside one executor: the mux [`Conn`], one [`Slot`] of wakers and flags
//! per stream handle, and the queues that turn core events into wake-ups.
//!
//! Every call into the `Conn` is followed by [`Shared::after_op`], which drains the core's
//! events (the core asks for that after every input, and operations such as `recv` or
//! `poll_transmit` emit events too) and wakes the driver when there is something to write.
//! Wakers are woken while the `RefCell` is borrowed: a glommio waker only queues its task, so
//! no user code runs inside the borrow.

use std::collections::{HashMap, VecDeque};
use std::task::Waker;
use std::time::Duration;

use super::error::CloseReason;
use crate::mux::{self, Conn, ErrorCode, Event, StreamId};

/// A control operation that found the core's control queue full
/// ([`mux::MuxError::ControlQueueFull`]); the driver retries it right after the next
/// `poll_transmit`, which empties that queue. At most one per live stream plus one GOAWAY.
#[derive(Debug)]
pub(crate) enum Deferred {
    Accept(StreamId),
    Refuse(StreamId, String),
    Reset(StreamId, ErrorCode),
    GoAway,
}

/// What the handles of one stream wait on. Created when the stream is opened (either way) and
/// removed when its last handle ([`super::Incoming`] or [`super::MuxStream`]) drops.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Our open: `None` until the peer's OPEN_RESULT.
    pub(crate) open_result: Option<Result<(), String>>,
    pub(crate) open_waker: Option<Waker>,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    /// `StreamFinished` seen: the peer's FIN arrived and every byte before it was read.
    pub(crate) fin_received: bool,
    /// We queued our FIN (`poll_close`).
    pub(crate) send_finished: bool,
    /// The peer reset the stream (or refused it by RESET).
    pub(crate) reset: Option<ErrorCode>,
    /// A peer open still in [`Shared::incoming`], not yet handed out by `accept`.
    pub(crate) queued: bool,
    /// Accepted locally while the control queue was full: the OPEN_RESULT is deferred and
    /// sending must wait for it.
    pub(crate) accept_pending: bool,
}

impl Slot {
    fn wake_all(&mut self) {
        for waker in [
            &mut self.open_waker,
            &mut self.read_waker,
            &mut self.write_waker,
        ] {
            if let Some(w) = waker.take() {
                w.wake();
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) conn: Conn,
    pub(crate) slots: HashMap<StreamId, Slot>,
    /// Peer opens not yet taken by [`super::Tunnel::accept`]; bounded by [`mux::MAX_STREAMS`]
    /// because each is a live stream in the core.
    pub(crate) incoming: VecDeque<(StreamId, Vec<u8>)>,
    pub(crate) deferred: VecDeque<Deferred>,
    /// A GOAWAY went one way or the other: no new streams.
    pub(crate) going_away: bool,
    /// The transport delivered a clean EOF: nothing more will arrive. Streams keep what they
    /// buffered (a drained peer closes as soon as its side is done, possibly before we have
    /// read its last bytes); a read that needs more than that fails.
    pub(crate) read_closed: bool,
    /// That EOF came without a GOAWAY first: report [`CloseReason::PeerEof`], not `Drained`.
    pub(crate) eof_without_goaway: bool,
    /// Set once, when the tunnel ends; handles fail with it from then on.
    pub(crate) end: Option<CloseReason>,
    driver_waker: Option<Waker>,
    /// The driver is inside its own `poll`: it needs no wake-up to see what it is about to do.
    pub(crate) driver_active: bool,
    accept_wakers: Vec<Waker>,
    control_wakers: Vec<Waker>,
    end_wakers: Vec<Waker>,
    ping_wakers: Vec<Waker>,
    /// Pongs received so far and the latest round-trip time.
    pub(crate) pongs: u64,
    pub(crate) last_rtt: Option<Duration>,
}

impl Shared {
    pub(crate) fn new(conn: Conn) -> Shared {
        Shared {
            conn,
            slots: HashMap::new(),
            incoming: VecDeque::new(),
            deferred: VecDeque::new(),
            going_away: false,
            read_closed: false,
            eof_without_goaway: false,
            end: None,
            driver_waker: None,
            driver_active: false,
            accept_wakers: Vec::new(),
            control_wakers: Vec::new(),
            end_wakers: Vec::new(),
            ping_wakers: Vec::new(),
            pongs: 0,
            last_rtt: None,
        }
    }

    /// After every call into the `Conn`: dispatch its events, then wake the driver if the core
    /// has frames to write.
    pub(crate) fn after_op(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            self.dispatch(event);
        }
        if self.conn.has_pending_transmit() || !self.deferred.is_empty() {
            self.wake_driver();
        }
    }

    pub(crate) fn wake_driver(&mut self) {
        if self.driver_active {
            return;
        }
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
    }

    pub(crate) fn set_driver_waker(&mut self, waker: &Waker) {
        register(&mut self.driver_waker, waker);
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::StreamOpened { id, dial_header } => {
                self.slots.insert(
                    id,
                    Slot {
                        queued: true,
                        ..Slot::default()
                    },
                );
                self.incoming.push_back((id, dial_header));
                wake_list(&mut self.accept_wakers);
            }
            Event::OpenResult { id, result } => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.open_result = Some(result);
                    slot.wake_all();
                }
            }
            Event::Readable { id } => {
                if let Some(w) = self.slots.get_mut(&id).and_then(|s| s.read_waker.take()) {
                    w.wake();
                }
            }
            Event::Writable { id } => {
                if let Some(w) = self.slots.get_mut(&id).and_then(|s| s.write_waker.take()) {
                    w.wake();
                }
            }
            Event::StreamFinished { id } => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.fin_received = true;
                    slot.wake_all();
                }
            }
            Event::StreamReset { id, code } => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.reset = Some(code);
                    slot.wake_all();
                    if slot.queued {
                        // Not accepted yet: forget it now, or a peer that opens and resets
                        // while nobody accepts would grow the queue without bound.
                        self.slots.remove(&id);
                        self.incoming.retain(|(queued, _)| *queued != id);
                    }
                }
            }
            Event::Pong { rtt } => {
                self.pongs += 1;
                self.last_rtt = Some(rtt);
                wake_list(&mut self.ping_wakers);
            }
            Event::GoAway { .. } => {
                self.going_away = true;
                wake_list(&mut self.accept_wakers);
            }
            Event::Closed { reason } => {
                let reason = match reason {
                    mux::CloseReason::Drained if self.eof_without_goaway => CloseReason::PeerEof,
                    reason => CloseReason::Mux(reason),
                };
                self.set_end(reason);
            }
        }
    }

    /// Records why the tunnel ended (the first reason wins) and wakes everything that waits.
    pub(crate) fn set_end(&mut self, reason: CloseReason) {
        if self.end.is_none() {
            self.end = Some(reason);
        }
        self.going_away = true;
        // Queued peer opens died with the core; their slots go with them.
        for (id, _) in self.incoming.drain(..) {
            self.slots.remove(&id);
        }
        self.deferred.clear();
        self.wake_everything();
        self.wake_driver();
    }

    /// Wakes every handle so it re-checks the tunnel's state (end, read-closed).
    pub(crate) fn wake_everything(&mut self) {
        for slot in self.slots.values_mut() {
            slot.wake_all();
        }
        wake_list(&mut self.accept_wakers);
        wake_list(&mut self.control_wakers);
        wake_list(&mut self.end_wakers);
        wake_list(&mut self.ping_wakers);
    }

    /// Retries control operations that found the queue full; stops when it is full again.
    pub(crate) fn run_deferred(&mut self) {
        while let Some(op) = self.deferred.front() {
            let result = match op {
                Deferred::Accept(id) => self.conn.open_result(*id, Ok(())),
                Deferred::Refuse(id, message) => self.conn.open_result(*id, Err(message)),
                Deferred::Reset(id, code) => self.conn.reset(*id, *code),
                Deferred::GoAway => self.conn.go_away(),
            };
            if matches!(result, Err(mux::MuxError::ControlQueueFull)) {
                break;
            }
            // Other errors mean the stream or the tunnel is already gone: nothing left to do.
            if let Some(Deferred::Accept(id)) = self.deferred.pop_front() {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.accept_pending = false;
                    slot.wake_all();
                }
            }
        }
        wake_list(&mut self.control_wakers);
    }

    pub(crate) fn wait_accept(&mut self, waker: &Waker) {
        register_list(&mut self.accept_wakers, waker);
    }

    pub(crate) fn wait_control(&mut self, waker: &Waker) {
        register_list(&mut self.control_wakers, waker);
    }

    pub(crate) fn wait_end(&mut self, waker: &Waker) {
        register_list(&mut self.end_wakers, waker);
    }

    pub(crate) fn wait_pong(&mut self, waker: &Waker) {
        register_list(&mut self.ping_wakers, waker);
    }
}

/// Stores `waker` in `slot` unless it already wakes the same task.
pub(crate) fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// Adds `waker` to a wait list unless it is already there. A list holds one entry per task
/// waiting at once, and is emptied on every wake-up.
fn register_list(list: &mut Vec<Waker>, waker: &Waker) {
    if !list.iter().any(|w| w.will_wake(waker)) {
        list.push(waker.clone());
    }
}

fn wake_list(list: &mut Vec<Waker>) {
    for w in list.drain(..) {
        w.wake();
    }
}
