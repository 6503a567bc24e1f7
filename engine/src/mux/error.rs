//! Errors of the tunnel multiplexer: what the peer did wrong ([`ProtocolError`]), why a tunnel
//! closed ([`CloseReason`]) and what a call into [`super::Conn`] returns ([`MuxError`]).

use super::frame::FrameType;
use super::{ErrorCode, StreamId};

/// The peer broke the tunnel protocol. Closes only this tunnel; see [`super::Conn::handle_input`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame type this version does not define.
    #[error("unknown frame type {kind:#04x}")]
    UnknownFrameType {
        /// The type byte.
        kind: u8,
    },
    /// Flags the frame type does not define.
    #[error("{kind:?} frame with undefined flags {flags:#04x}")]
    BadFlags {
        /// The frame type.
        kind: FrameType,
        /// The flags byte.
        flags: u8,
    },
    /// The reserved header field was not zero.
    #[error("reserved header field is {value:#06x}, not zero")]
    ReservedField {
        /// The field.
        value: u16,
    },
    /// A payload length outside the frame type's range.
    #[error("{kind:?} frame of {len} bytes, allowed {min}..={max}")]
    BadLength {
        /// The frame type.
        kind: FrameType,
        /// The length in the header.
        len: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// Stream id 0 on a stream frame, or a stream id on a tunnel frame.
    #[error("{kind:?} frame may not name stream {id}")]
    BadStreamId {
        /// The frame type.
        kind: FrameType,
        /// The id.
        id: u32,
    },
    /// The peer opened a stream with our parity.
    #[error("peer opened stream {id}, which has our parity")]
    WrongParity {
        /// The id.
        id: u32,
    },
    /// The peer opened a stream at or below one it opened before.
    #[error("peer opened stream {id}, not above its last one {last}")]
    DuplicateOpen {
        /// The id.
        id: u32,
        /// The highest id the peer opened before.
        last: u32,
    },
    /// The peer opened a stream after it sent GOAWAY.
    #[error("peer opened stream {id} after its GOAWAY")]
    OpenAfterGoAway {
        /// The id.
        id: u32,
    },
    /// A frame for a stream that was never opened.
    #[error("{kind:?} frame for stream {id}, which was never opened")]
    StreamNotOpened {
        /// The frame type.
        kind: FrameType,
        /// The id.
        id: u32,
    },
    /// More DATA than the stream's credit.
    #[error("stream {id}: {len} bytes of data with {window} bytes of credit")]
    StreamWindowExceeded {
        /// The stream.
        id: u32,
        /// Payload length.
        len: u32,
        /// Credit left.
        window: u32,
    },
    /// More DATA than the tunnel's credit.
    #[error("{len} bytes of data with {window} bytes of tunnel credit")]
    ConnWindowExceeded {
        /// Payload length.
        len: u32,
        /// Credit left.
        window: u32,
    },
    /// A WINDOW_UPDATE raising a window above [`super::MAX_WINDOW`].
    #[error("window update overflows the window of stream {id} (0 = tunnel)")]
    WindowOverflow {
        /// The stream, 0 for the tunnel.
        id: u32,
    },
    /// A WINDOW_UPDATE of zero.
    #[error("zero window update on stream {id} (0 = tunnel)")]
    ZeroWindowIncrement {
        /// The stream, 0 for the tunnel.
        id: u32,
    },
    /// DATA after the peer's FIN on the same stream.
    #[error("data on stream {id} after its FIN")]
    DataAfterFin {
        /// The stream.
        id: u32,
    },
    /// DATA from the acceptor before it answered the OPEN.
    #[error("data on stream {id} before its OPEN_RESULT")]
    DataBeforeOpenResult {
        /// The stream.
        id: u32,
    },
    /// An OPEN_RESULT for a stream that is not awaiting one.
    #[error("OPEN_RESULT for stream {id}, which is not awaiting one")]
    UnexpectedOpenResult {
        /// The stream.
        id: u32,
    },
    /// A text field (refusal reason, GOAWAY message) that is not UTF-8.
    #[error("{kind:?} frame carries text that is not UTF-8")]
    NotUtf8 {
        /// The frame type.
        kind: FrameType,
    },
    /// A second graceful GOAWAY with another last stream id than the first.
    #[error("GOAWAY changed the last stream id from {previous} to {last}")]
    GoAwayChanged {
        /// The earlier last stream id.
        previous: u32,
        /// The new one.
        last: u32,
    },
    /// The peer made us queue more than [`super::MAX_QUEUED_CONTROL_FRAMES`] control frames.
    #[error("peer made us queue more than the control frame bound")]
    ControlFlood,
    /// More than [`super::MAX_QUEUED_EVENTS`] events queued (the shell is not draining them).
    #[error("event queue overflow")]
    EventOverflow,
}

impl ProtocolError {
    /// The code sent in the GOAWAY that closes the tunnel.
    pub fn code(&self) -> ErrorCode {
        use ProtocolError::*;
        match self {
            BadLength { .. } => ErrorCode::FRAME_SIZE,
            StreamWindowExceeded { .. }
            | ConnWindowExceeded { .. }
            | WindowOverflow { .. }
            | ZeroWindowIncrement { .. } => ErrorCode::FLOW_CONTROL,
            ControlFlood | EventOverflow => ErrorCode::RESOURCE_LIMIT,
            UnknownFrameType { .. }
            | BadFlags { .. }
            | ReservedField { .. }
            | BadStreamId { .. }
            | WrongParity { .. }
            | DuplicateOpen { .. }
            | OpenAfterGoAway { .. }
            | StreamNotOpened { .. }
            | DataAfterFin { .. }
            | DataBeforeOpenResult { .. }
            | UnexpectedOpenResult { .. }
            | NotUtf8 { .. }
            | GoAwayChanged { .. } => ErrorCode::PROTOCOL,
        }
    }
}

/// Why a tunnel closed ([`super::Event::Closed`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// Graceful: a GOAWAY went one way or the other and the last stream closed.
    #[error("drained")]
    Drained,
    /// The peer broke the protocol; we sent GOAWAY with [`ProtocolError::code`].
    #[error("peer protocol error: {0}")]
    Protocol(ProtocolError),
    /// The peer sent GOAWAY with an error code.
    #[error("peer closed the tunnel: {code}: {message}")]
    PeerError {
        /// The peer's code.
        code: ErrorCode,
        /// The peer's message.
        message: String,
    },
    /// No byte from the peer for [`super::Config::dead_peer_timeout`].
    #[error("peer silent past the dead-peer timeout")]
    Timeout,
    /// The application called [`super::Conn::close`].
    #[error("closed locally: {code}")]
    Local {
        /// The code we sent.
        code: ErrorCode,
    },
}

/// Who is to blame for an error, so metrics and logs can tell a bad agent from a bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The far end of the tunnel (a broken or hostile peer, or a dead one).
    Peer,
    /// The application driving this `Conn` (misuse of the API, or a local limit it hit).
    Local,
    /// Nobody: the tunnel closed gracefully.
    Nobody,
}

/// What a call into [`super::Conn`] returns on failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The peer broke the protocol; the tunnel is now closed.
    #[error("tunnel protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The tunnel was already closed.
    #[error("tunnel closed: {0}")]
    Closed(CloseReason),
    /// No such live stream (never opened, or already closed or reset).
    #[error("unknown stream {0}")]
    UnknownStream(StreamId),
    /// The stream is not awaiting our answer to its OPEN.
    #[error("stream {0} is not awaiting an open result")]
    NotAwaitingAnswer(StreamId),
    /// Sending on a stream the peer opened before answering it with `open_result(Ok)`.
    #[error("stream {0} is not accepted yet")]
    NotAccepted(StreamId),
    /// Sending on, or finishing, a stream after `finish`.
    #[error("stream {0} is already finished for sending")]
    SendFinished(StreamId),
    /// [`super::MAX_STREAMS`] streams are alive.
    #[error("too many streams in this tunnel")]
    TooManyStreams,
    /// Every stream id of our parity is used; open a new tunnel.
    #[error("stream ids exhausted")]
    StreamIdsExhausted,
    /// A GOAWAY went one way or the other: no new streams.
    #[error("tunnel is going away")]
    GoingAway,
    /// A dial header, refusal reason or GOAWAY message over its bound.
    #[error("{what} of {len} bytes exceeds {max}")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// `input_commit` of bytes without a pending `input_buf` (another call voided it).
    #[error("input_commit without a pending input_buf")]
    NoInputBuf,
    /// `send_commit` of bytes without a pending `send_buf` on that stream (another call voided
    /// it).
    #[error("send_commit without a pending send_buf")]
    NoSendBuf,
    /// [`super::MAX_QUEUED_CONTROL_FRAMES`] are queued; call `poll_transmit`, then retry.
    #[error("control frame queue full")]
    ControlQueueFull,
}

impl MuxError {
    /// Who caused it.
    pub fn blame(&self) -> Blame {
        match self {
            MuxError::Protocol(_) => Blame::Peer,
            MuxError::Closed(reason) => match reason {
                CloseReason::Drained => Blame::Nobody,
                CloseReason::Protocol(_) | CloseReason::PeerError { .. } | CloseReason::Timeout => {
                    Blame::Peer
                }
                CloseReason::Local { .. } => Blame::Local,
            },
            _ => Blame::Local,
        }
    }

    /// Whether the same call may succeed later on this tunnel (after `poll_transmit` or after
    /// streams close); a closed tunnel never recovers.
    pub fn retry_helps(&self) -> bool {
        matches!(self, MuxError::TooManyStreams | MuxError::ControlQueueFull)
    }
}
