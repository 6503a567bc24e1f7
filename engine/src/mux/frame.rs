//! Frame layout of the tunnel protocol: the 12-byte [`Header`], its validation, the parsed
//! [`ControlFrame`]s, and the [`encode`] functions that append frames to a buffer.
//!
//! Pure functions of bytes; no stream or connection state lives here (that is `conn.rs`). DATA
//! payload is never parsed as a unit: the connection streams it into the stream's buffer.

use super::error::ProtocolError;
use super::{
    ErrorCode, MAX_CONTROL_PAYLOAD, MAX_DIAL_HEADER_LEN, MAX_FRAME_PAYLOAD, MAX_GOAWAY_MESSAGE_LEN,
    MAX_OPEN_ERROR_LEN,
};

/// Bytes in every frame header: u32 length, u8 type, u8 flags, u16 reserved, u32 stream id.
pub const HEADER_LEN: usize = 12;

/// DATA: the sender finishes (half-closes) the stream after this payload.
pub const FLAG_FIN: u8 = 0x1;
/// OPEN_RESULT: the stream is accepted (payload empty); without it, refused (payload = reason).
pub const FLAG_OK: u8 = 0x1;
/// PING: this is the pong answering a PING with the same opaque bytes.
pub const FLAG_ACK: u8 = 0x1;

/// The frame types; the numbers are the wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Stream bytes.
    Data = 0,
    /// Open a stream with a dial header.
    Open = 1,
    /// Accept or refuse an OPEN.
    OpenResult = 2,
    /// Return credit for a stream, or for the tunnel on id 0.
    WindowUpdate = 3,
    /// Abort a stream in both directions.
    Reset = 4,
    /// Liveness probe, and its answer with [`FLAG_ACK`].
    Ping = 5,
    /// No new streams; with an error code, the tunnel is closing.
    GoAway = 6,
}

impl FrameType {
    /// The type for a wire byte, if this version defines it.
    pub const fn from_u8(byte: u8) -> Option<FrameType> {
        Some(match byte {
            0 => FrameType::Data,
            1 => FrameType::Open,
            2 => FrameType::OpenResult,
            3 => FrameType::WindowUpdate,
            4 => FrameType::Reset,
            5 => FrameType::Ping,
            6 => FrameType::GoAway,
            _ => return None,
        })
    }

    /// Inclusive range of payload lengths this type may carry.
    pub const fn payload_bounds(self) -> (u32, u32) {
        match self {
            FrameType::Data => (0, MAX_FRAME_PAYLOAD as u32),
            FrameType::Open => (0, MAX_DIAL_HEADER_LEN as u32),
            FrameType::OpenResult => (0, MAX_OPEN_ERROR_LEN as u32),
            FrameType::WindowUpdate | FrameType::Reset => (4, 4),
            FrameType::Ping => (8, 8),
            FrameType::GoAway => (8, 8 + MAX_GOAWAY_MESSAGE_LEN as u32),
        }
    }

    /// Flags this type defines.
    pub const fn allowed_flags(self) -> u8 {
        match self {
            FrameType::Data => FLAG_FIN,
            FrameType::OpenResult => FLAG_OK,
            FrameType::Ping => FLAG_ACK,
            FrameType::Open | FrameType::WindowUpdate | FrameType::Reset | FrameType::GoAway => 0,
        }
    }

    /// Whether the stream id field must be 0 (`Some(true)`), non-zero (`Some(false)`), or may be
    /// either (`None`: WINDOW_UPDATE, where 0 is the tunnel).
    pub const fn wants_zero_id(self) -> Option<bool> {
        match self {
            FrameType::Ping | FrameType::GoAway => Some(true),
            FrameType::WindowUpdate => None,
            FrameType::Data | FrameType::Open | FrameType::OpenResult | FrameType::Reset => {
                Some(false)
            }
        }
    }
}

/// A frame header. [`Header::decode`] only yields headers that pass every static check: known
/// type, defined flags, zero reserved field, length within the type's bounds, legal stream id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Payload bytes after the header.
    pub len: u32,
    /// Frame type.
    pub kind: FrameType,
    /// Flags, a subset of [`FrameType::allowed_flags`].
    pub flags: u8,
    /// Stream id; 0 is the tunnel.
    pub stream: u32,
}

impl Header {
    /// The header's 12 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let len = self.len.to_be_bytes();
        let id = self.stream.to_be_bytes();
        [
            len[0],
            len[1],
            len[2],
            len[3],
            self.kind as u8,
            self.flags,
            0,
            0,
            id[0],
            id[1],
            id[2],
            id[3],
        ]
    }

    /// Parses and validates a header.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let [l0, l1, l2, l3, kind, flags, r0, r1, s0, s1, s2, s3] = *bytes;
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let stream = u32::from_be_bytes([s0, s1, s2, s3]);
        let reserved = u16::from_be_bytes([r0, r1]);
        let kind = FrameType::from_u8(kind).ok_or(ProtocolError::UnknownFrameType { kind })?;
        if reserved != 0 {
            return Err(ProtocolError::ReservedField { value: reserved });
        }
        if flags & !kind.allowed_flags() != 0 {
            return Err(ProtocolError::BadFlags { kind, flags });
        }
        let (min, max) = kind.payload_bounds();
        if len < min || len > max {
            return Err(ProtocolError::BadLength {
                kind,
                len,
                min,
                max,
            });
        }
        // OK carries no reason: an accepted stream has nothing to explain.
        if kind == FrameType::OpenResult && flags & FLAG_OK != 0 && len != 0 {
            return Err(ProtocolError::BadLength {
                kind,
                len,
                min: 0,
                max: 0,
            });
        }
        match kind.wants_zero_id() {
            Some(true) if stream != 0 => {
                return Err(ProtocolError::BadStreamId { kind, id: stream })
            }
            Some(false) if stream == 0 => {
                return Err(ProtocolError::BadStreamId { kind, id: stream })
            }
            _ => {}
        }
        Ok(Header {
            len,
            kind,
            flags,
            stream,
        })
    }
}

/// A parsed frame other than DATA, borrowing its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlFrame<'a> {
    /// OPEN.
    Open {
        /// New stream.
        id: u32,
        /// Dial header.
        dial_header: &'a [u8],
    },
    /// OPEN_RESULT.
    OpenResult {
        /// The stream.
        id: u32,
        /// Accepted, or refused with a reason.
        result: Result<(), &'a str>,
    },
    /// WINDOW_UPDATE.
    WindowUpdate {
        /// The stream, 0 for the tunnel.
        id: u32,
        /// Credit added.
        increment: u32,
    },
    /// RESET.
    Reset {
        /// The stream.
        id: u32,
        /// Why.
        code: ErrorCode,
    },
    /// PING, or its pong when `ack`.
    Ping {
        /// Whether this is the answer.
        ack: bool,
        /// Echoed bytes.
        opaque: [u8; 8],
    },
    /// GOAWAY.
    GoAway {
        /// Highest stream id of the receiver's parity that the sender processed.
        last_stream_id: u32,
        /// [`ErrorCode::NO_ERROR`] for a drain.
        code: ErrorCode,
        /// Free text for logs.
        message: &'a str,
    },
}

impl<'a> ControlFrame<'a> {
    /// Parses the payload of a validated non-DATA header. `payload` must be exactly
    /// `header.len` bytes; a DATA header or a short payload is reported as a bad length.
    pub fn parse(header: &Header, payload: &'a [u8]) -> Result<ControlFrame<'a>, ProtocolError> {
        debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        let kind = header.kind;
        let id = header.stream;
        let bad_len = || ProtocolError::BadLength {
            kind,
            len: header.len,
            min: kind.payload_bounds().0,
            max: kind.payload_bounds().1,
        };
        if payload.len() != header.len as usize {
            return Err(bad_len());
        }
        Ok(match kind {
            FrameType::Data => return Err(bad_len()),
            FrameType::Open => ControlFrame::Open {
                id,
                dial_header: payload,
            },
            FrameType::OpenResult => {
                let result = if header.flags & FLAG_OK != 0 {
                    Ok(())
                } else {
                    Err(std::str::from_utf8(payload)
                        .map_err(|_| ProtocolError::NotUtf8 { kind })?)
                };
                ControlFrame::OpenResult { id, result }
            }
            FrameType::WindowUpdate => {
                let increment = be_u32(payload).ok_or_else(bad_len)?;
                ControlFrame::WindowUpdate { id, increment }
            }
            FrameType::Reset => {
                let code = ErrorCode(be_u32(payload).ok_or_else(bad_len)?);
                ControlFrame::Reset { id, code }
            }
            FrameType::Ping => {
                let opaque: [u8; 8] = payload.try_into().map_err(|_| bad_len())?;
                ControlFrame::Ping {
                    ack: header.flags & FLAG_ACK != 0,
                    opaque,
                }
            }
            FrameType::GoAway => {
                let (fixed, message) = payload.split_at_checked(8).ok_or_else(bad_len)?;
                let (last, code) = fixed.split_at_checked(4).ok_or_else(bad_len)?;
                let last_stream_id = be_u32(last).ok_or_else(bad_len)?;
                let code = ErrorCode(be_u32(code).ok_or_else(bad_len)?);
                let message =
                    std::str::from_utf8(message).map_err(|_| ProtocolError::NotUtf8 { kind })?;
                ControlFrame::GoAway {
                    last_stream_id,
                    code,
                    message,
                }
            }
        })
    }
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    let array: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(array))
}

/// Appenders: each writes one whole frame at the end of `out`. Callers keep payloads within the
/// bounds of [`FrameType::payload_bounds`] (debug-asserted); these never fail.
pub mod encode {
    use super::{FrameType, Header, FLAG_ACK, FLAG_FIN, FLAG_OK};
    use crate::mux::{ErrorCode, MAX_GOAWAY_MESSAGE_LEN};

    /// A header alone (for DATA, the payload follows).
    #[inline]
    pub fn header(out: &mut Vec<u8>, len: usize, kind: FrameType, flags: u8, stream: u32) {
        debug_assert!(len <= kind.payload_bounds().1 as usize);
        let header = Header {
            len: len as u32,
            kind,
            flags,
            stream,
        };
        out.extend_from_slice(&header.to_bytes());
    }

    /// DATA, optionally with FIN.
    pub fn data(out: &mut Vec<u8>, id: u32, fin: bool, payload: &[u8]) {
        debug_assert!(id != 0);
        let flags = if fin { FLAG_FIN } else { 0 };
        header(out, payload.len(), FrameType::Data, flags, id);
        out.extend_from_slice(payload);
    }

    /// OPEN with its dial header.
    pub fn open(out: &mut Vec<u8>, id: u32, dial_header: &[u8]) {
        debug_assert!(id != 0);
        header(out, dial_header.len(), FrameType::Open, 0, id);
        out.extend_from_slice(dial_header);
    }

    /// OPEN_RESULT: accepted, or refused with a reason.
    pub fn open_result(out: &mut Vec<u8>, id: u32, result: Result<(), &str>) {
        debug_assert!(id != 0);
        match result {
            Ok(()) => header(out, 0, FrameType::OpenResult, FLAG_OK, id),
            Err(reason) => {
                header(out, reason.len(), FrameType::OpenResult, 0, id);
                out.extend_from_slice(reason.as_bytes());
            }
        }
    }

    /// WINDOW_UPDATE for a stream, or the tunnel with id 0.
    pub fn window_update(out: &mut Vec<u8>, id: u32, increment: u32) {
        debug_assert!(increment != 0);
        header(out, 4, FrameType::WindowUpdate, 0, id);
        out.extend_from_slice(&increment.to_be_bytes());
    }

    /// RESET.
    pub fn reset(out: &mut Vec<u8>, id: u32, code: ErrorCode) {
        debug_assert!(id != 0);
        header(out, 4, FrameType::Reset, 0, id);
        out.extend_from_slice(&code.0.to_be_bytes());
    }

    /// PING, or its pong with `ack`.
    pub fn ping(out: &mut Vec<u8>, ack: bool, opaque: [u8; 8]) {
        let flags = if ack { FLAG_ACK } else { 0 };
        header(out, 8, FrameType::Ping, flags, 0);
        out.extend_from_slice(&opaque);
    }

    /// GOAWAY; a message over [`MAX_GOAWAY_MESSAGE_LEN`] is cut at a character boundary.
    pub fn go_away(out: &mut Vec<u8>, last_stream_id: u32, code: ErrorCode, message: &str) {
        let mut end = message.len().min(MAX_GOAWAY_MESSAGE_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = message.get(..end).unwrap_or("");
        header(out, 8 + message.len(), FrameType::GoAway, 0, 0);
        out.extend_from_slice(&last_stream_id.to_be_bytes());
        out.extend_from_slice(&code.0.to_be_bytes());
        out.extend_from_slice(message.as_bytes());
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::type_complexity,
    reason = "tests"
)]
mod tests {
    use super::*;

    fn split(frame: &[u8]) -> (Header, &[u8]) {
        let (head, payload) = frame.split_at(HEADER_LEN);
        let head: &[u8; HEADER_LEN] = head.try_into().unwrap();
        (Header::decode(head).unwrap(), payload)
    }

    fn raw(len: u32, kind: u8, flags: u8, reserved: u16, stream: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&len.to_be_bytes());
        b[4] = kind;
        b[5] = flags;
        b[6..8].copy_from_slice(&reserved.to_be_bytes());
        b[8..].copy_from_slice(&stream.to_be_bytes());
        b
    }

    #[test]
    fn header_layout_is_big_endian() {
        let h = Header {
            len: 0x0102_0304,
            kind: FrameType::Reset,
            flags: 0,
            stream: 0x0a0b_0c0d,
        };
        assert_eq!(
            h.to_bytes(),
            [1, 2, 3, 4, 4, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0x0d]
        );
    }

    #[test]
    fn data_round_trip() {
        let mut out = Vec::new();
        encode::data(&mut out, 7, true, b"hello");
        let (h, payload) = split(&out);
        assert_eq!(
            h,
            Header {
                len: 5,
                kind: FrameType::Data,
                flags: FLAG_FIN,
                stream: 7
            }
        );
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn control_round_trips() {
        let cases: Vec<(Vec<u8>, ControlFrame<'static>)> = vec![
            (
                {
                    let mut v = Vec::new();
                    encode::open(&mut v, 3, b"ssh node1 root");
                    v
                },
                ControlFrame::Open {
                    id: 3,
                    dial_header: b"ssh node1 root",
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::open(&mut v, 5, b"");
                    v
                },
                ControlFrame::Open {
                    id: 5,
                    dial_header: b"",
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::open_result(&mut v, 3, Ok(()));
                    v
                },
                ControlFrame::OpenResult {
                    id: 3,
                    result: Ok(()),
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::open_result(&mut v, 3, Err("connection refused: 10.0.0.1:22"));
                    v
                },
                ControlFrame::OpenResult {
                    id: 3,
                    result: Err("connection refused: 10.0.0.1:22"),
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::open_result(&mut v, 9, Err(""));
                    v
                },
                ControlFrame::OpenResult {
                    id: 9,
                    result: Err(""),
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::window_update(&mut v, 0, 123_456);
                    v
                },
                ControlFrame::WindowUpdate {
                    id: 0,
                    increment: 123_456,
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::reset(&mut v, 11, ErrorCode::CANCEL);
                    v
                },
                ControlFrame::Reset {
                    id: 11,
                    code: ErrorCode::CANCEL,
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::ping(&mut v, true, *b"12345678");
                    v
                },
                ControlFrame::Ping {
                    ack: true,
                    opaque: *b"12345678",
                },
            ),
            (
                {
                    let mut v = Vec::new();
                    encode::go_away(&mut v, 41, ErrorCode::NO_ERROR, "restart");
                    v
                },
                ControlFrame::GoAway {
                    last_stream_id: 41,
                    code: ErrorCode::NO_ERROR,
                    message: "restart",
                },
            ),
        ];
        for (bytes, expected) in cases {
            let (h, payload) = split(&bytes);
            assert_eq!(ControlFrame::parse(&h, payload).unwrap(), expected);
        }
    }

    #[test]
    fn goaway_message_is_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_GOAWAY_MESSAGE_LEN); // 2 bytes each
        let mut v = Vec::new();
        encode::go_away(&mut v, 0, ErrorCode::PROTOCOL, &long);
        let (h, payload) = split(&v);
        match ControlFrame::parse(&h, payload).unwrap() {
            ControlFrame::GoAway { message, .. } => {
                assert_eq!(message.len(), MAX_GOAWAY_MESSAGE_LEN)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn max_sized_frames_are_accepted() {
        for kind in 0..=6u8 {
            let ft = FrameType::from_u8(kind).unwrap();
            let (min, max) = ft.payload_bounds();
            let stream = if ft.wants_zero_id() == Some(true) {
                0
            } else {
                1
            };
            for len in [min, max] {
                Header::decode(&raw(len, kind, 0, 0, stream)).unwrap();
            }
        }
    }

    #[test]
    fn malformed_headers_are_rejected() {
        use ProtocolError as E;
        let cases: Vec<([u8; HEADER_LEN], fn(&ProtocolError) -> bool)> = vec![
            (raw(0, 7, 0, 0, 1), |e| {
                matches!(e, E::UnknownFrameType { kind: 7 })
            }),
            (raw(0, 0xff, 0, 0, 1), |e| {
                matches!(e, E::UnknownFrameType { kind: 0xff })
            }),
            (raw(0, 0, 0, 1, 1), |e| {
                matches!(e, E::ReservedField { value: 1 })
            }),
            (raw(0, 0, 0x2, 0, 1), |e| matches!(e, E::BadFlags { .. })),
            (raw(0, 1, 0x1, 0, 1), |e| matches!(e, E::BadFlags { .. })),
            (raw(4, 3, 0x80, 0, 1), |e| matches!(e, E::BadFlags { .. })),
            (raw(MAX_FRAME_PAYLOAD as u32 + 1, 0, 0, 0, 1), |e| {
                matches!(e, E::BadLength { .. })
            }),
            (raw(u32::MAX, 0, 0, 0, 1), |e| {
                matches!(e, E::BadLength { .. })
            }),
            (raw(MAX_DIAL_HEADER_LEN as u32 + 1, 1, 0, 0, 1), |e| {
                matches!(e, E::BadLength { .. })
            }),
            (raw(MAX_OPEN_ERROR_LEN as u32 + 1, 2, 0, 0, 1), |e| {
                matches!(e, E::BadLength { .. })
            }),
            (raw(3, 2, FLAG_OK, 0, 1), |e| {
                matches!(e, E::BadLength { .. })
            }),
            (raw(3, 3, 0, 0, 1), |e| matches!(e, E::BadLength { .. })),
            (raw(5, 4, 0, 0, 1), |e| matches!(e, E::BadLength { .. })),
            (raw(7, 5, 0, 0, 0), |e| matches!(e, E::BadLength { .. })),
            (raw(7, 6, 0, 0, 0), |e| matches!(e, E::BadLength { .. })),
            (
                raw(8 + MAX_GOAWAY_MESSAGE_LEN as u32 + 1, 6, 0, 0, 0),
                |e| matches!(e, E::BadLength { .. }),
            ),
            (raw(1, 0, 0, 0, 0), |e| matches!(e, E::BadStreamId { .. })),
            (raw(0, 1, 0, 0, 0), |e| matches!(e, E::BadStreamId { .. })),
            (raw(4, 4, 0, 0, 0), |e| matches!(e, E::BadStreamId { .. })),
            (raw(8, 5, 0, 0, 1), |e| matches!(e, E::BadStreamId { .. })),
            (raw(8, 6, 0, 0, 3), |e| matches!(e, E::BadStreamId { .. })),
        ];
        for (bytes, check) in cases {
            let err = Header::decode(&bytes).unwrap_err();
            assert!(check(&err), "{bytes:?} gave {err:?}");
        }
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        // Refusal reason and GOAWAY message must be UTF-8.
        let h = Header {
            len: 2,
            kind: FrameType::OpenResult,
            flags: 0,
            stream: 1,
        };
        assert!(matches!(
            ControlFrame::parse(&h, &[0xff, 0xfe]),
            Err(ProtocolError::NotUtf8 { .. })
        ));
        let h = Header {
            len: 9,
            kind: FrameType::GoAway,
            flags: 0,
            stream: 0,
        };
        let payload = [0, 0, 0, 1, 0, 0, 0, 0, 0xc3];
        assert!(matches!(
            ControlFrame::parse(&h, &payload),
            Err(ProtocolError::NotUtf8 { .. })
        ));
        // A payload that does not match the header, and DATA, are bad lengths, not panics.
        let h = Header {
            len: 4,
            kind: FrameType::WindowUpdate,
            flags: 0,
            stream: 1,
        };
        assert!(matches!(
            ControlFrame::parse(&h, &[0, 0]),
            Err(ProtocolError::BadLength { .. })
        ));
        let h = Header {
            len: 0,
            kind: FrameType::Data,
            flags: 0,
            stream: 1,
        };
        assert!(matches!(
            ControlFrame::parse(&h, &[]),
            Err(ProtocolError::BadLength { .. })
        ));
    }

    #[test]
    fn every_header_byte_pattern_decodes_or_errors() {
        // Exhaustive over type and flags, sampled over length and id: no panic, and whatever
        // decodes re-encodes to the same bytes.
        for kind in 0..=255u8 {
            for flags in 0..=255u8 {
                for len in [
                    0u32,
                    1,
                    4,
                    8,
                    9,
                    264,
                    265,
                    4096,
                    4097,
                    65536,
                    65537,
                    u32::MAX,
                ] {
                    for stream in [0u32, 1, 2, u32::MAX] {
                        let bytes = raw(len, kind, flags, 0, stream);
                        if let Ok(h) = Header::decode(&bytes) {
                            assert_eq!(h.to_bytes(), bytes);
                        }
                    }
                }
            }
        }
    }
}
