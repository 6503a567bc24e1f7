//! The web terminal's messages, sans-IO (`/web/terminal/<node>/<login>`).
//!
//! ```text
//! browser → engine  WebSocket text    {"ticket":"..."}              first message: the login
//!                   WebSocket binary  [0] input bytes               keystrokes, pastes
//!                                     [1] cols u16 BE, rows u16 BE  the terminal's size
//! engine → browser  WebSocket binary  terminal output
//!                   WebSocket text    TermNotice JSON               ready, refused (why)
//! engine → agent    tunnel stream     [u32 BE length][binary message as above], repeated
//! agent → engine    tunnel stream     terminal output bytes
//! ```
//!
//! The engine checks every browser message with [`TermInput::parse`] before it frames it for
//! the agent ([`TermInput::frame`]); the agent reads the frames back with [`split_term_frame`]
//! and checks them again. A message that does not parse ends its own connection only.

use serde::{Deserialize, Serialize};

/// Largest binary message from the browser (a paste is cut into messages of at most this).
pub const MAX_TERM_MESSAGE_BYTES: usize = 16 * 1024;

/// Largest first (ticket) message.
pub const MAX_TERM_AUTH_BYTES: usize = 1024;

/// Largest terminal side, in cells.
pub const MAX_TERM_CELLS: u16 = 1000;

/// Bytes of a tunnel frame's length prefix.
pub const TERM_FRAME_PREFIX_BYTES: usize = 4;

const INPUT: u8 = 0;
const RESIZE: u8 = 1;

/// The first WebSocket message: the one-time ticket the page got from
/// `POST /webapi/terminal/ticket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermAuth {
    /// The ticket.
    pub ticket: String,
}

/// What the engine tells the page in text messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TermNotice {
    /// Connected to the node: output follows.
    Ready {
        /// The engine's session id (as in `jaunt sessions ls`).
        session_id: String,
    },
    /// The terminal was refused or ended by the engine; `reason` is a stable label
    /// (`forbidden`, `unknown_target`, `bad_ticket`, `bad_message`, ...).
    Refused {
        /// Stable label.
        reason: String,
        /// What the user reads.
        message: String,
    },
}

/// One browser message after the ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TermInput<'a> {
    /// Bytes typed or pasted.
    Input(&'a [u8]),
    /// The terminal's size changed.
    Resize {
        /// Columns, `1..=MAX_TERM_CELLS`.
        cols: u16,
        /// Rows, `1..=MAX_TERM_CELLS`.
        rows: u16,
    },
}

/// Why a browser message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TermError {
    /// Empty, or of an unknown type.
    #[error("unknown terminal message type")]
    UnknownType,
    /// Longer than [`MAX_TERM_MESSAGE_BYTES`].
    #[error("terminal message exceeds {MAX_TERM_MESSAGE_BYTES} bytes")]
    TooLarge,
    /// A resize that is not two sizes in `1..=MAX_TERM_CELLS`.
    #[error("a resize needs columns and rows between 1 and {MAX_TERM_CELLS}")]
    BadSize,
}

impl<'a> TermInput<'a> {
    /// Reads one binary message.
    pub fn parse(message: &'a [u8]) -> Result<TermInput<'a>, TermError> {
        if message.len() > MAX_TERM_MESSAGE_BYTES {
            return Err(TermError::TooLarge);
        }
        match message.split_first() {
            Some((&INPUT, rest)) => Ok(TermInput::Input(rest)),
            Some((&RESIZE, rest)) => {
                let [c0, c1, r0, r1] = *rest else {
                    return Err(TermError::BadSize);
                };
                let (cols, rows) = (u16::from_be_bytes([c0, c1]), u16::from_be_bytes([r0, r1]));
                let ok = |n: u16| (1..=MAX_TERM_CELLS).contains(&n);
                if ok(cols) && ok(rows) {
                    Ok(TermInput::Resize { cols, rows })
                } else {
                    Err(TermError::BadSize)
                }
            }
            _ => Err(TermError::UnknownType),
        }
    }

    /// The message bytes (what the browser sends).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            TermInput::Input(bytes) => {
                let mut out = Vec::with_capacity(1 + bytes.len());
                out.push(INPUT);
                out.extend_from_slice(bytes);
                out
            }
            TermInput::Resize { cols, rows } => {
                let mut out = vec![RESIZE];
                out.extend_from_slice(&cols.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
                out
            }
        }
    }

    /// The message as a tunnel frame (length prefix, then [`TermInput::encode`]).
    pub fn frame(&self) -> Vec<u8> {
        let body = self.encode();
        let mut out = Vec::with_capacity(TERM_FRAME_PREFIX_BYTES + body.len());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Splits one tunnel frame off the front of `buf` and parses it: `Ok(None)` until complete,
/// then the message and the bytes used.
pub fn split_term_frame(buf: &[u8]) -> Result<Option<(TermInput<'_>, usize)>, TermError> {
    let Some(prefix) = buf.get(..TERM_FRAME_PREFIX_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > MAX_TERM_MESSAGE_BYTES {
        return Err(TermError::TooLarge);
    }
    let end = TERM_FRAME_PREFIX_BYTES + len;
    match buf.get(TERM_FRAME_PREFIX_BYTES..end) {
        None => Ok(None),
        Some(body) => Ok(Some((TermInput::parse(body)?, end))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_refused() {
        let input = TermInput::Input(b"echo hi\r");
        assert_eq!(TermInput::parse(&input.encode()), Ok(input.clone()));
        let resize = TermInput::Resize {
            cols: 120,
            rows: 40,
        };
        assert_eq!(resize.encode(), [1, 0, 120, 0, 40]);
        assert_eq!(TermInput::parse(&resize.encode()), Ok(resize.clone()));
        assert_eq!(TermInput::parse(&[]), Err(TermError::UnknownType));
        assert_eq!(TermInput::parse(&[7, 1]), Err(TermError::UnknownType));
        assert_eq!(TermInput::parse(&[1, 0, 80]), Err(TermError::BadSize));
        assert_eq!(TermInput::parse(&[1, 0, 0, 0, 24]), Err(TermError::BadSize));
        assert_eq!(
            TermInput::parse(&[1, 0xff, 0xff, 0, 24]),
            Err(TermError::BadSize)
        );
        let big = vec![0u8; MAX_TERM_MESSAGE_BYTES + 1];
        assert_eq!(TermInput::parse(&big), Err(TermError::TooLarge));

        let mut stream = input.frame();
        stream.extend_from_slice(&resize.frame());
        for cut in 0..TERM_FRAME_PREFIX_BYTES + 9 {
            assert_eq!(split_term_frame(&stream[..cut]), Ok(None), "cut {cut}");
        }
        let (first, used) = split_term_frame(&stream).ok().flatten().unwrap_or_else(|| {
            unreachable!("a whole frame parses");
        });
        assert_eq!(first, input);
        let (second, _) = split_term_frame(&stream[used..])
            .ok()
            .flatten()
            .unwrap_or_else(|| unreachable!("a whole frame parses"));
        assert_eq!(second, resize);
        assert_eq!(split_term_frame(&[0, 1, 0, 0]), Err(TermError::TooLarge));
        let notice = TermNotice::Refused {
            reason: "forbidden".into(),
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&notice).unwrap_or_default(),
            r#"{"type":"refused","reason":"forbidden","message":"no"}"#
        );
    }
}
