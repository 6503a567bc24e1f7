//! Errors of the tunnel shell: why a tunnel ended ([`CloseReason`]), why an open failed
//! ([`OpenError`]) and why accepting a peer's stream failed ([`AcceptError`]).
//!
//! Stream I/O errors are plain `std::io::Error`s (that is what `AsyncRead`/`AsyncWrite` carry);
//! their kinds are listed on [`super::MuxStream`].

use std::io;

use crate::mux::{self, Blame, ErrorCode, MuxError};

/// Why a tunnel ended: the mux core closed it, or the transport under it failed first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The mux core closed the tunnel: drained, protocol error, peer GOAWAY with an error,
    /// dead-peer timeout or a local [`super::Tunnel::close`].
    #[error("{0}")]
    Mux(mux::CloseReason),
    /// The peer closed the transport (TLS close_notify) without draining the tunnel first.
    #[error("peer closed the connection without GOAWAY")]
    PeerEof,
    /// Reading or writing the transport failed (reset, unclean TLS EOF, bad record, ...).
    #[error("transport error ({kind:?}): {message}")]
    Io {
        /// The I/O error's kind.
        kind: io::ErrorKind,
        /// The I/O error's text.
        message: String,
    },
    /// The driver future was dropped (its task cancelled) before the tunnel ended.
    #[error("tunnel driver stopped")]
    DriverStopped,
}

impl CloseReason {
    pub(crate) fn io(err: &io::Error) -> CloseReason {
        CloseReason::Io {
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// Who is to blame: metrics and logs tell a bad agent from a local bug this way.
    pub fn blame(&self) -> Blame {
        match self {
            CloseReason::Mux(reason) => MuxError::Closed(reason.clone()).blame(),
            CloseReason::PeerEof | CloseReason::Io { .. } => Blame::Peer,
            CloseReason::DriverStopped => Blame::Local,
        }
    }

    /// Whether the tunnel ended gracefully (a drain both ends agreed on).
    pub fn is_graceful(&self) -> bool {
        matches!(self, CloseReason::Mux(mux::CloseReason::Drained))
    }
}

/// Why [`super::Tunnel::open`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The peer answered the OPEN with a refusal (e.g. no route, not authorized on its side).
    #[error("peer refused the stream: {message}")]
    Refused {
        /// The peer's reason, as it sent it.
        message: String,
    },
    /// The peer reset the stream before answering; [`ErrorCode::REFUSED_STREAM`] (its stream
    /// limit or its GOAWAY) means it was not processed and is safe to retry on another tunnel.
    #[error("peer reset the stream: {code}")]
    Reset {
        /// The peer's code.
        code: ErrorCode,
    },
    /// A GOAWAY went one way or the other: this tunnel takes no new streams.
    #[error("tunnel is going away")]
    GoingAway,
    /// [`mux::MAX_STREAMS`] streams are alive in this tunnel.
    #[error("too many streams in this tunnel")]
    TooManyStreams,
    /// The tunnel has ended.
    #[error("tunnel closed: {0}")]
    Closed(CloseReason),
    /// A local misuse the core rejected (dial header too long, stream ids exhausted).
    #[error("{0}")]
    Local(MuxError),
}

impl OpenError {
    /// Whether the same open may succeed on another tunnel to the same peer (or this one later).
    pub fn retry_elsewhere(&self) -> bool {
        match self {
            OpenError::Reset { code } => *code == ErrorCode::REFUSED_STREAM,
            OpenError::GoingAway | OpenError::TooManyStreams | OpenError::Closed(_) => true,
            OpenError::Refused { .. } | OpenError::Local(_) => false,
        }
    }
}

/// Why [`super::Incoming::accept`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The opener reset the stream before we answered.
    #[error("peer reset the stream: {code}")]
    Reset {
        /// The peer's code.
        code: ErrorCode,
    },
    /// The tunnel has ended.
    #[error("tunnel closed: {0}")]
    Closed(CloseReason),
}
