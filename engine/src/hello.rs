//! Sans-IO ClientHello inspector for the public port.
//!
//! The connection shell accumulates the first bytes of a connection (peeked or read, and kept:
//! a `jaunt-control` connection is replayed byte for byte to control) and calls [`parse`] after
//! every read until it returns [`Parse::Done`] or [`Parse::Invalid`]; [`crate::route::decide`]
//! then picks the route. Nothing here does I/O or panics on any input; [`parse`] allocates
//! nothing.
//!
//! What is extracted: legacy_version, SNI host_name (ext 0, validated ASCII, lower-cased), the
//! ALPN list (ext 16), supported_versions (ext 43), and whether a session ticket (ext 35) or a
//! pre_shared_key (ext 41) is offered. Everything else is length-checked and skipped.
//!
//! Bounds and strictness:
//! - the records carrying the ClientHello, headers included, fit in [`MAX_CLIENT_HELLO_BYTES`];
//!   so [`Parse::NeedMore`] is only ever returned for a buffer shorter than that bound;
//! - a ClientHello may be fragmented over several handshake records (RFC 8446 §5.1) and the
//!   buffer may end at any byte; the answer for a prefix is either `NeedMore` or final, and a
//!   final answer never changes when more bytes arrive;
//! - every length field must agree with its container; bytes after the extensions, a record that
//!   carries bytes past the ClientHello, zero-length or non-handshake records inside it and
//!   duplicate extensions of the kinds we read are [`RejectReason::Malformed`].
//!
//! The parsed [`ClientHello`] owns bounded inline copies of the SNI, the ALPN list and
//! supported_versions instead of borrowing from the buffer: the SNI has to be lower-cased anyway,
//! and a fragmented ClientHello (reassembled in a stack scratch buffer, the cold path) has no
//! contiguous bytes to borrow. It is about 1 KiB, is built in place and lives on the stack.
//! Not handled: Encrypted ClientHello (the outer, public SNI is what we see), SSLv2-compatible
//! hellos (rejected as not TLS), QUIC.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::route::{decide, RejectReason};

/// Upper bound on the bytes (record headers included) a ClientHello may occupy. Real hellos are
/// 200–2000 bytes (a post-quantum key share adds ~1.2 KiB); 16 KiB leaves room for large PSK
/// identities while bounding what one connection can make a shard buffer before routing. A
/// legal but full 2^14-byte record does not fit with its header: that is `HelloTooLarge`.
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;

/// Longest ALPN protocol_name_list we keep (ext 16 body minus its length prefix). Real clients
/// send under 32 bytes (`h2`, `http/1.1`); a longer list is refused rather than truncated.
pub const MAX_ALPN_LIST_BYTES: usize = 512;

/// Longest SNI host name: the textual limit of a DNS name (RFC 1035), without the trailing dot.
pub const MAX_HOST_NAME_BYTES: usize = 253;

/// Longest supported_versions list: `ProtocolVersion versions<2..254>` (RFC 8446 §4.2.1).
pub const MAX_SUPPORTED_VERSIONS_BYTES: usize = 254;

/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
const MAX_RECORD_PAYLOAD_BYTES: usize = 1 << 14;
const RECORD_HEADER_BYTES: usize = 5;
const HANDSHAKE_HEADER_BYTES: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_BYTES: usize = 63;

/// Per byte of an SNI host name: its lower-case form, or 0 where a DNS name may not have it.
/// Underscores are allowed (service labels such as `_acme` appear in the wild).
const HOST_NAME_BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => b,
            b'A'..=b'Z' => b.to_ascii_lowercase(),
            _ => 0,
        };
        i += 1;
    }
    table
};

/// Result of one [`parse`] call over the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "the ClientHello lives on the stack for one routing decision; boxing would \
              allocate per connection"
)]
pub enum Parse {
    /// Not enough bytes yet: read more (the buffer is shorter than `MAX_CLIENT_HELLO_BYTES`).
    NeedMore,
    /// A complete, well-formed ClientHello.
    Done(ClientHello),
    /// Refuse the connection; more bytes cannot change this.
    Invalid(RejectReason),
}

/// The parts of a ClientHello the router and the metrics look at.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientHello {
    legacy_version: u16,
    // The three lists below are filled in place (no moves of ~1 KiB per field); an empty one was
    // not sent, since a sent one is never empty.
    server_name: HostName,
    alpn: InlineBytes<MAX_ALPN_LIST_BYTES>,
    supported_versions: InlineBytes<MAX_SUPPORTED_VERSIONS_BYTES>,
    offers_session_ticket: bool,
    offers_psk: bool,
    records: usize,
    record_bytes: usize,
}

impl ClientHello {
    const EMPTY: ClientHello = ClientHello {
        legacy_version: 0,
        server_name: HostName {
            bytes: InlineBytes::EMPTY,
            ip_literal: false,
        },
        alpn: InlineBytes::EMPTY,
        supported_versions: InlineBytes::EMPTY,
        offers_session_ticket: false,
        offers_psk: false,
        records: 0,
        record_bytes: 0,
    };

    /// `legacy_version` (0x0303 from every TLS 1.2+ client).
    pub fn legacy_version(&self) -> u16 {
        self.legacy_version
    }

    /// SNI host name, ASCII lower-case, without a trailing dot.
    pub fn server_name(&self) -> Option<&HostName> {
        (!self.server_name.bytes.is_empty()).then_some(&self.server_name)
    }

    /// Whether the ALPN extension was sent (it is then never empty).
    pub fn alpn_offered(&self) -> bool {
        !self.alpn.is_empty()
    }

    /// The ALPN protocol ids in client preference order (empty when not offered).
    pub fn alpn(&self) -> AlpnProtocols<'_> {
        AlpnProtocols {
            rest: self.alpn.as_bytes(),
        }
    }

    /// supported_versions in client order (empty when not offered, i.e. a TLS 1.2-only client).
    pub fn supported_versions(&self) -> SupportedVersions<'_> {
        SupportedVersions {
            rest: self.supported_versions.as_bytes(),
        }
    }

    /// Whether TLS 1.3 (0x0304) is among supported_versions.
    pub fn offers_tls13(&self) -> bool {
        self.supported_versions().any(|v| v == 0x0304)
    }

    /// A non-empty session_ticket extension: TLS 1.2 ticket resumption attempt.
    pub fn offers_session_ticket(&self) -> bool {
        self.offers_session_ticket
    }

    /// A pre_shared_key extension: TLS 1.3 resumption attempt.
    pub fn offers_psk(&self) -> bool {
        self.offers_psk
    }

    /// Number of TLS records the ClientHello was fragmented into (1 for almost every client).
    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes at the start of the buffer taken by the ClientHello's records. Bytes after them
    /// (a change_cipher_spec, early data) belong to the connection too: a pass-through route
    /// replays the whole buffer, a terminating route feeds it all to TLS.
    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }
}

impl fmt::Debug for ClientHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHello")
            .field(
                "legacy_version",
                &format_args!("{:#06x}", self.legacy_version),
            )
            .field("server_name", &self.server_name().map(HostName::as_str))
            .field(
                "alpn",
                &self.alpn_offered().then(|| {
                    self.alpn()
                        .map(|id| id.escape_ascii().to_string())
                        .collect::<Vec<_>>()
                }),
            )
            .field(
                "supported_versions",
                &self
                    .supported_versions()
                    .map(|v| format!("{v:#06x}"))
                    .collect::<Vec<_>>(),
            )
            .field("offers_session_ticket", &self.offers_session_ticket)
            .field("offers_psk", &self.offers_psk)
            .field("records", &self.records)
            .field("record_bytes", &self.record_bytes)
            .finish()
    }
}

/// A validated SNI host name: 1..=253 ASCII bytes, lower-case, no trailing dot; either a DNS name
/// (letters, digits, `-`, `_`, labels of 1..=63 bytes) or an IPv4/IPv6 literal (which RFC 6066
/// forbids but some clients send).
#[derive(Clone, PartialEq, Eq)]
pub struct HostName {
    bytes: InlineBytes<MAX_HOST_NAME_BYTES>,
    ip_literal: bool,
}

impl HostName {
    pub fn as_str(&self) -> &str {
        // Validated ASCII on construction; the fallback is unreachable.
        std::str::from_utf8(self.bytes.as_bytes()).unwrap_or("")
    }

    pub fn is_ip_literal(&self) -> bool {
        self.ip_literal
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Iterator over ALPN protocol ids, borrowed from a [`ClientHello`].
#[derive(Clone, Debug)]
pub struct AlpnProtocols<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AlpnProtocols<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // The list was validated when parsed; a short read just ends the iteration.
        let (&len, rest) = self.rest.split_first()?;
        let (id, rest) = rest.split_at_checked(usize::from(len))?;
        self.rest = rest;
        Some(id)
    }
}

/// Iterator over supported_versions, borrowed from a [`ClientHello`].
#[derive(Clone, Debug)]
pub struct SupportedVersions<'a> {
    rest: &'a [u8],
}

impl Iterator for SupportedVersions<'_> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        let (version, rest) = self.rest.split_first_chunk::<2>()?;
        self.rest = rest;
        Some(u16::from_be_bytes(*version))
    }
}

/// Parse the ClientHello at the start of `buf` (the connection's first bytes so far).
///
/// Cost: a few ns for `NeedMore` and for non-TLS input, ~150 ns for a typical single-record
/// ClientHello (see `bench/benches/hello.rs`). Match the result by reference
/// (`match &parse(buf)`): binding the ClientHello by value copies it.
pub fn parse(buf: &[u8]) -> Parse {
    let framing = match locate(buf) {
        Located::NeedMore => {
            debug_assert!(buf.len() < MAX_CLIENT_HELLO_BYTES);
            return Parse::NeedMore;
        }
        Located::Invalid(reason) => return Parse::Invalid(reason),
        Located::Complete(framing) => framing,
    };
    // Built in the return value so the ~1 KiB ClientHello is not moved (measured: moves were
    // half the cost of a parse).
    let mut out = Parse::Done(ClientHello::EMPTY);
    if let Parse::Done(hello) = &mut out {
        hello.records = framing.records;
        hello.record_bytes = framing.record_bytes;
        let parsed = if framing.records == 1 {
            let start = RECORD_HEADER_BYTES + HANDSHAKE_HEADER_BYTES;
            buf.get(start..framing.record_bytes)
                .ok_or(RejectReason::Malformed)
                .and_then(|body| parse_body(body, hello))
        } else {
            parse_fragmented(buf, framing, hello)
        };
        if let Err(reason) = parsed {
            return Parse::Invalid(reason);
        }
        debug_assert!(hello.record_bytes <= buf.len());
        debug_assert!(hello.record_bytes <= MAX_CLIENT_HELLO_BYTES);
    }
    out
}

/// Fuzz entry point: parse and route arbitrary bytes, checking the parser's invariants with
/// `debug_assert!` (cargo-fuzz builds keep debug assertions on).
pub fn fuzz_parse(data: &[u8]) {
    const FUZZ_PUBLIC_HOST: &str = "jaunt.example.com:443";
    match parse(data) {
        Parse::Done(hello) => {
            let route = decide(&hello, FUZZ_PUBLIC_HOST);
            std::hint::black_box(route.as_str());
            // The hello's own records parse to the same hello: trailing bytes never matter.
            debug_assert!(
                data.get(..hello.record_bytes()).map(parse) == Some(Parse::Done(hello.clone()))
            );
        }
        Parse::NeedMore => debug_assert!(data.len() < MAX_CLIENT_HELLO_BYTES),
        Parse::Invalid(reason) => {
            std::hint::black_box(reason.as_str());
        }
    }
}

/// Where the ClientHello's records end, once all of them are in the buffer.
#[derive(Clone, Copy, Debug)]
struct Framing {
    /// Handshake message length (header included).
    message_bytes: usize,
    records: usize,
    record_bytes: usize,
}

enum Located {
    NeedMore,
    Invalid(RejectReason),
    Complete(Framing),
}

/// Walk the record headers until the records carrying the whole ClientHello are in `buf`.
/// Every decision depends only on bytes already present, so a final answer is stable as more
/// bytes arrive; bounds are checked from the length fields, before waiting for the bytes.
fn locate(buf: &[u8]) -> Located {
    let mut offset = 0; // start of the current record in `buf`
    let mut handshake_before = 0; // handshake bytes in the records before it
    let mut head = [0u8; HANDSHAKE_HEADER_BYTES];
    let mut head_len = 0;
    let mut message_bytes: Option<usize> = None;
    let mut records = 0;
    loop {
        // A further record needs a header and at least one byte.
        if offset + RECORD_HEADER_BYTES + 1 > MAX_CLIENT_HELLO_BYTES {
            return Located::Invalid(RejectReason::HelloTooLarge);
        }
        let first = offset == 0;
        let foreign = if first {
            RejectReason::NotTls
        } else {
            RejectReason::Malformed
        };
        // Check the header byte by byte so that an HTTP request or an SSH banner is refused on
        // its first byte.
        match buf.get(offset) {
            None => return Located::NeedMore,
            Some(&CONTENT_TYPE_HANDSHAKE) => {}
            Some(_) => return Located::Invalid(foreign),
        }
        match buf.get(offset + 1) {
            None => return Located::NeedMore,
            Some(3) => {}
            Some(_) => return Located::Invalid(foreign),
        }
        let Some(&[_, _, _, len_hi, len_lo]) = buf
            .get(offset..)
            .and_then(|b| b.first_chunk::<RECORD_HEADER_BYTES>())
        else {
            return Located::NeedMore;
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len > MAX_RECORD_PAYLOAD_BYTES {
            return Located::Invalid(RejectReason::RecordTooLarge);
        }
        if len == 0 {
            // RFC 8446 §5.1: no zero-length handshake fragments.
            return Located::Invalid(RejectReason::Malformed);
        }
        let payload_start = offset + RECORD_HEADER_BYTES;
        let record_end = payload_start + len;
        if record_end > MAX_CLIENT_HELLO_BYTES {
            return Located::Invalid(RejectReason::HelloTooLarge);
        }
        records += 1;

        if message_bytes.is_none() {
            let available = buf.get(payload_start..).unwrap_or(&[]);
            for &byte in available.iter().take(len) {
                let Some(slot) = head.get_mut(head_len) else {
                    break;
                };
                *slot = byte;
                head_len += 1;
            }
            if head_len == HANDSHAKE_HEADER_BYTES {
                let [msg_type, l0, l1, l2] = head;
                if msg_type != HANDSHAKE_TYPE_CLIENT_HELLO {
                    return Located::Invalid(RejectReason::Malformed);
                }
                let total = HANDSHAKE_HEADER_BYTES
                    + (usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2));
                // The rest of the message needs at least this record's header.
                let rest = total.saturating_sub(handshake_before);
                if payload_start + rest > MAX_CLIENT_HELLO_BYTES {
                    return Located::Invalid(RejectReason::HelloTooLarge);
                }
                message_bytes = Some(total);
            }
        }
        let handshake_after = handshake_before + len;
        if let Some(total) = message_bytes {
            if handshake_after > total {
                // The record carries bytes past the ClientHello: no other handshake message may
                // follow it before the server answers.
                return Located::Invalid(RejectReason::Malformed);
            }
            if handshake_after == total {
                if buf.len() < record_end {
                    return Located::NeedMore;
                }
                return Located::Complete(Framing {
                    message_bytes: total,
                    records,
                    record_bytes: record_end,
                });
            }
        }
        if buf.len() < record_end {
            return Located::NeedMore;
        }
        handshake_before = handshake_after;
        offset = record_end;
    }
}

/// Reassemble a fragmented ClientHello on the stack and parse it. Cold: real clients send one
/// record; kept out of line so the common path has a small stack frame.
#[cold]
#[inline(never)]
fn parse_fragmented(
    buf: &[u8],
    framing: Framing,
    hello: &mut ClientHello,
) -> Result<(), RejectReason> {
    let mut scratch = [0u8; MAX_CLIENT_HELLO_BYTES];
    let mut filled = 0;
    let mut records = Cursor::new(
        buf.get(..framing.record_bytes)
            .ok_or(RejectReason::Malformed)?,
    );
    while !records.is_empty() {
        records.skip(3)?; // type and version, checked by `locate`
        let payload = records.vec_u16()?.rest;
        let dst = scratch
            .get_mut(filled..filled + payload.len())
            .ok_or(RejectReason::HelloTooLarge)?;
        dst.copy_from_slice(payload);
        filled += payload.len();
    }
    debug_assert_eq!(filled, framing.message_bytes);
    let body = scratch
        .get(HANDSHAKE_HEADER_BYTES..framing.message_bytes)
        .ok_or(RejectReason::Malformed)?;
    parse_body(body, hello)
}

/// Parse a ClientHello body (after the 4-byte handshake header), RFC 8446 §4.1.2.
fn parse_body(body: &[u8], hello: &mut ClientHello) -> Result<(), RejectReason> {
    let mut c = Cursor::new(body);
    hello.legacy_version = c.u16()?;
    c.skip(32)?; // random
    let session_id = c.vec_u8()?;
    if session_id.len() > 32 {
        return Err(RejectReason::Malformed);
    }
    let cipher_suites = c.vec_u16()?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(RejectReason::Malformed);
    }
    if c.vec_u8()?.is_empty() {
        return Err(RejectReason::Malformed); // compression methods
    }
    if c.is_empty() {
        // Extensions are optional before TLS 1.3 (RFC 5246 §7.4.1.2).
        return Ok(());
    }
    let mut extensions = c.vec_u16()?;
    c.finish()?;

    let mut seen_session_ticket = false;
    while !extensions.is_empty() {
        let ext_type = extensions.u16()?;
        let mut data = extensions.vec_u16()?;
        if hello.offers_psk {
            // RFC 8446 §4.2.11: pre_shared_key must be the last extension.
            return Err(RejectReason::Malformed);
        }
        match ext_type {
            EXT_SERVER_NAME => {
                if hello.server_name().is_some() {
                    return Err(RejectReason::Malformed);
                }
                parse_server_name(&mut data, &mut hello.server_name)?;
            }
            EXT_ALPN => {
                if hello.alpn_offered() {
                    return Err(RejectReason::Malformed);
                }
                parse_alpn(&mut data, &mut hello.alpn)?;
            }
            EXT_SUPPORTED_VERSIONS => {
                if !hello.supported_versions.is_empty() {
                    return Err(RejectReason::Malformed);
                }
                let versions = data.vec_u8()?;
                if versions.len() < 2 || versions.len() % 2 != 0 {
                    return Err(RejectReason::Malformed);
                }
                hello
                    .supported_versions
                    .set(versions.rest)
                    .ok_or(RejectReason::Malformed)?;
            }
            EXT_SESSION_TICKET => {
                if seen_session_ticket {
                    return Err(RejectReason::Malformed);
                }
                seen_session_ticket = true;
                // An empty ticket only says "I support tickets".
                hello.offers_session_ticket = !data.is_empty();
                data.skip(data.len())?;
            }
            EXT_PRE_SHARED_KEY => {
                check_pre_shared_key(&mut data)?;
                hello.offers_psk = true;
            }
            _ => data.skip(data.len())?,
        }
        data.finish()?;
    }
    Ok(())
}

/// server_name extension (RFC 6066 §3): a non-empty list of (name_type, name); exactly one
/// host_name. Other name types (none are defined) are skipped with a u16 length, as rustls does.
fn parse_server_name(data: &mut Cursor<'_>, host: &mut HostName) -> Result<(), RejectReason> {
    let mut list = data.vec_u16()?;
    if list.is_empty() {
        return Err(RejectReason::Malformed);
    }
    while !list.is_empty() {
        let name_type = list.u8()?;
        let name = list.vec_u16()?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if !host.bytes.is_empty() {
            return Err(RejectReason::Malformed);
        }
        set_host_name(name.rest, host)?;
    }
    if host.bytes.is_empty() {
        return Err(RejectReason::BadSni);
    }
    Ok(())
}

/// Validate and lower-case an SNI host name.
fn set_host_name(raw: &[u8], host: &mut HostName) -> Result<(), RejectReason> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() {
        return Err(RejectReason::BadSni);
    }
    let bytes = host.bytes.set(raw).ok_or(RejectReason::BadSni)?;
    // Table-driven and branch-light: this loop was the largest single cost of a parse.
    let mut invalid = false;
    let mut label_start = 0;
    for (i, byte) in bytes.iter_mut().enumerate() {
        let mapped = HOST_NAME_BYTES[usize::from(*byte)];
        invalid |= mapped == 0;
        *byte = mapped;
        if mapped == b'.' {
            invalid |= !(1..=MAX_LABEL_BYTES).contains(&(i - label_start));
            label_start = i + 1;
        }
    }
    invalid |= !(1..=MAX_LABEL_BYTES).contains(&(raw.len() - label_start));
    if invalid {
        return set_ipv6_literal(raw, host);
    }
    // A name ending in a digit may be an IPv4 literal (no TLD is all-numeric).
    host.ip_literal = raw.last().is_some_and(u8::is_ascii_digit)
        && std::str::from_utf8(raw).is_ok_and(|s| s.parse::<Ipv4Addr>().is_ok());
    Ok(())
}

/// Not a DNS name: an IPv6 literal is the only other thing we accept (RFC 6066 forbids it, some
/// clients send it anyway). Out of line: the common path never gets here.
#[cold]
fn set_ipv6_literal(raw: &[u8], host: &mut HostName) -> Result<(), RejectReason> {
    let is_ipv6 = std::str::from_utf8(raw).is_ok_and(|s| s.parse::<Ipv6Addr>().is_ok());
    if !is_ipv6 {
        return Err(RejectReason::BadSni);
    }
    host.bytes
        .set(raw)
        .ok_or(RejectReason::BadSni)?
        .make_ascii_lowercase();
    host.ip_literal = true;
    Ok(())
}

/// ALPN extension (RFC 7301 §3.1): `ProtocolName protocol_name_list<2..2^16-1>`,
/// `opaque ProtocolName<1..2^8-1>`.
fn parse_alpn(
    data: &mut Cursor<'_>,
    alpn: &mut InlineBytes<MAX_ALPN_LIST_BYTES>,
) -> Result<(), RejectReason> {
    let list = data.vec_u16()?;
    if list.is_empty() {
        return Err(RejectReason::Malformed);
    }
    let mut ids = list.clone();
    while !ids.is_empty() {
        if ids.vec_u8()?.is_empty() {
            return Err(RejectReason::Malformed);
        }
    }
    alpn.set(list.rest).ok_or(RejectReason::AlpnTooLong)?;
    Ok(())
}

/// pre_shared_key (RFC 8446 §4.2.11): `PskIdentity identities<7..2^16-1>` (identity<1..2^16-1>
/// + u32 age), `PskBinderEntry binders<33..2^16-1>` (opaque<32..255>), one binder per identity.
fn check_pre_shared_key(data: &mut Cursor<'_>) -> Result<(), RejectReason> {
    let mut identities = data.vec_u16()?;
    let mut binders = data.vec_u16()?;
    if identities.is_empty() || binders.is_empty() {
        return Err(RejectReason::Malformed);
    }
    let mut count = 0usize;
    while !identities.is_empty() {
        if identities.vec_u16()?.is_empty() {
            return Err(RejectReason::Malformed);
        }
        identities.skip(4)?;
        count += 1;
    }
    while !binders.is_empty() {
        if binders.vec_u8()?.len() < 32 {
            return Err(RejectReason::Malformed);
        }
        count = count.checked_sub(1).ok_or(RejectReason::Malformed)?;
    }
    if count != 0 {
        return Err(RejectReason::Malformed);
    }
    Ok(())
}

/// A fixed-capacity inline byte string.
#[derive(Clone, PartialEq, Eq)]
struct InlineBytes<const N: usize> {
    len: usize,
    buf: [u8; N],
}

impl<const N: usize> InlineBytes<N> {
    const EMPTY: Self = InlineBytes {
        len: 0,
        buf: [0; N],
    };

    /// Replace the contents with `src` and return them for in-place edits; `None` if `src` is
    /// longer than `N` (callers pick the reason).
    fn set(&mut self, src: &[u8]) -> Option<&mut [u8]> {
        let dst = self.buf.get_mut(..src.len())?;
        dst.copy_from_slice(src);
        self.len = src.len();
        Some(dst)
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

/// Checked big-endian reader: every read that would run past the end is `Malformed`.
#[derive(Clone)]
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn len(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RejectReason> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(RejectReason::Malformed)?;
        self.rest = rest;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> Result<(), RejectReason> {
        self.take(n).map(drop)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RejectReason> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(RejectReason::Malformed)?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, RejectReason> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Result<u16, RejectReason> {
        self.array().map(u16::from_be_bytes)
    }

    /// A vector with a one-byte length prefix, as a sub-cursor.
    fn vec_u8(&mut self) -> Result<Cursor<'a>, RejectReason> {
        let len = self.u8()?;
        self.take(usize::from(len)).map(Cursor::new)
    }

    /// A vector with a two-byte length prefix, as a sub-cursor.
    fn vec_u16(&mut self) -> Result<Cursor<'a>, RejectReason> {
        let len = self.u16()?;
        self.take(usize::from(len)).map(Cursor::new)
    }

    /// The container must be fully consumed: trailing bytes are `Malformed`.
    fn finish(&self) -> Result<(), RejectReason> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(RejectReason::Malformed)
        }
    }
}

/// ClientHello generators shared by the tests of this module and of `route`.
#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    /// The first flight of a rustls client (ring provider, TLS 1.3 + 1.2): one handshake record
    /// with the ClientHello. `sni` may be a DNS name (sent as SNI) or an IP address (rustls then
    /// sends no SNI); `None` disables SNI.
    pub fn rustls_hello(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        rustls_hello_with(sni, alpn, |_| {})
    }

    pub fn rustls_hello_with(
        sni: Option<&str>,
        alpn: &[&[u8]],
        tweak: impl FnOnce(&mut ClientConfig),
    ) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
        config.enable_sni = sni.is_some();
        tweak(&mut config);
        let name = ServerName::try_from(sni.unwrap_or("placeholder.invalid").to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Split the handshake message inside a single-record flight into records of `size`.
    pub fn reframe(single_record: &[u8], size: usize) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([single_record[3], single_record[4]]));
        let message = &single_record[5..5 + len];
        frame(message, size)
    }

    /// Wrap a handshake message into handshake records of at most `size` payload bytes.
    pub fn frame(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A hand-built ClientHello for cases rustls never produces.
    #[derive(Clone)]
    pub struct Synth {
        pub legacy_version: u16,
        pub session_id: Vec<u8>,
        pub cipher_suites: Vec<u8>,
        pub compression: Vec<u8>,
        /// `None`: no extensions block at all (TLS 1.2 style).
        pub extensions: Option<Vec<(u16, Vec<u8>)>>,
        /// Bytes appended after the extensions block, inside the message.
        pub trailing: Vec<u8>,
    }

    impl Synth {
        pub fn new() -> Self {
            Synth {
                legacy_version: 0x0303,
                session_id: vec![7; 32],
                cipher_suites: vec![0x13, 0x01, 0x13, 0x02],
                compression: vec![0],
                extensions: Some(Vec::new()),
                trailing: Vec::new(),
            }
        }

        pub fn ext(mut self, ext_type: u16, data: Vec<u8>) -> Self {
            self.extensions
                .get_or_insert_with(Vec::new)
                .push((ext_type, data));
            self
        }

        pub fn sni(self, name: &[u8]) -> Self {
            let entry = [&[0u8][..], &u16be(name.len()), name].concat();
            self.ext(0, [u16be(entry.len()).to_vec(), entry].concat())
        }

        pub fn alpn(self, ids: &[&[u8]]) -> Self {
            let mut list = Vec::new();
            for id in ids {
                list.push(id.len() as u8);
                list.extend_from_slice(id);
            }
            self.ext(16, [u16be(list.len()).to_vec(), list].concat())
        }

        pub fn versions(self, versions: &[u16]) -> Self {
            let mut list = vec![(versions.len() * 2) as u8];
            for v in versions {
                list.extend_from_slice(&v.to_be_bytes());
            }
            self.ext(43, list)
        }

        pub fn psk(self, identities: &[&[u8]], binders: &[&[u8]]) -> Self {
            let mut ids = Vec::new();
            for id in identities {
                ids.extend_from_slice(&u16be(id.len()));
                ids.extend_from_slice(id);
                ids.extend_from_slice(&[0, 0, 0, 1]);
            }
            let mut bs = Vec::new();
            for b in binders {
                bs.push(b.len() as u8);
                bs.extend_from_slice(b);
            }
            let data = [u16be(ids.len()).to_vec(), ids, u16be(bs.len()).to_vec(), bs].concat();
            self.ext(41, data)
        }

        pub fn body(&self) -> Vec<u8> {
            let mut b = self.legacy_version.to_be_bytes().to_vec();
            b.extend_from_slice(&[0xab; 32]);
            b.push(self.session_id.len() as u8);
            b.extend_from_slice(&self.session_id);
            b.extend_from_slice(&u16be(self.cipher_suites.len()));
            b.extend_from_slice(&self.cipher_suites);
            b.push(self.compression.len() as u8);
            b.extend_from_slice(&self.compression);
            if let Some(exts) = &self.extensions {
                let mut block = Vec::new();
                for (t, data) in exts {
                    block.extend_from_slice(&t.to_be_bytes());
                    block.extend_from_slice(&u16be(data.len()));
                    block.extend_from_slice(data);
                }
                b.extend_from_slice(&u16be(block.len()));
                b.extend_from_slice(&block);
            }
            b.extend_from_slice(&self.trailing);
            b
        }

        /// The handshake message (header + body).
        pub fn message(&self) -> Vec<u8> {
            let body = self.body();
            let len = (body.len() as u32).to_be_bytes();
            [&[1u8, len[1], len[2], len[3]][..], &body].concat()
        }

        /// The message in one record (or several if it exceeds 2^14).
        pub fn record(&self) -> Vec<u8> {
            frame(&self.message(), 1 << 14)
        }
    }

    pub fn u16be(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]
mod tests {
    use std::sync::Arc;

    use super::test_support::{frame, reframe, rustls_hello, rustls_hello_with, Synth};
    use super::*;
    use crate::route::{ALPN_H2, ALPN_HTTP1, ALPN_TUNNEL};

    fn done(bytes: &[u8]) -> ClientHello {
        match parse(bytes) {
            Parse::Done(hello) => hello,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn alpn_of(hello: &ClientHello) -> Vec<Vec<u8>> {
        hello.alpn().map(<[u8]>::to_vec).collect()
    }

    /// Every strict prefix is NeedMore; the whole is `want`; extra bytes change nothing.
    fn check_prefixes(bytes: &[u8], want: &Parse) {
        for cut in 0..bytes.len() {
            let got = parse(&bytes[..cut]);
            assert!(got == Parse::NeedMore || got == *want, "cut {cut}: {got:?}");
            if got != Parse::NeedMore {
                // Once final, every longer prefix agrees.
                for longer in cut..=bytes.len() {
                    assert_eq!(parse(&bytes[..longer]), *want, "cut {cut} longer {longer}");
                }
                return;
            }
        }
        assert_eq!(parse(bytes), *want);
    }

    fn cases() -> Vec<(Option<&'static str>, Vec<&'static [u8]>)> {
        vec![
            (Some("jaunt.example.com"), vec![ALPN_TUNNEL]),
            (Some("jaunt.example.com"), vec![b"jaunt-control"]),
            (Some("jaunt.example.com"), vec![b"jaunt-ssh"]),
            (Some("jaunt.example.com"), vec![b"jaunt-postgres"]),
            (Some("jaunt.example.com"), vec![b"jaunt-tcp"]),
            (Some("grafana.jaunt.example.com"), vec![ALPN_H2, ALPN_HTTP1]),
            (Some("jaunt.example.com"), vec![ALPN_HTTP1]),
            (Some("jaunt.example.com"), vec![]),
            (None, vec![ALPN_HTTP1]),
            (Some("192.0.2.1"), vec![ALPN_TUNNEL]),
            (Some("Mixed.Case.Example.COM"), vec![b"x-unknown"]),
        ]
    }

    #[test]
    fn extracts_sni_alpn_and_versions_from_rustls() {
        for (sni, alpn) in cases() {
            let bytes = rustls_hello(sni, &alpn);
            let hello = done(&bytes);
            let want_sni = sni
                .filter(|s| s.parse::<std::net::IpAddr>().is_err())
                .map(str::to_ascii_lowercase);
            assert_eq!(
                hello.server_name().map(HostName::as_str),
                want_sni.as_deref()
            );
            assert_eq!(
                alpn_of(&hello),
                alpn.iter().map(|a| a.to_vec()).collect::<Vec<_>>()
            );
            assert_eq!(hello.alpn_offered(), !alpn.is_empty());
            assert_eq!(hello.legacy_version(), 0x0303);
            assert!(hello.offers_tls13());
            assert!(hello.supported_versions().any(|v| v == 0x0303));
            assert!(!hello.offers_psk());
            assert!(!hello.offers_session_ticket());
            assert_eq!(hello.records(), 1);
            assert_eq!(hello.record_bytes(), bytes.len());
        }
    }

    /// rustls's own server-side parser (Acceptor) agrees on SNI and ALPN.
    #[test]
    fn agrees_with_rustls_acceptor() {
        for (sni, alpn) in cases() {
            let bytes = rustls_hello(sni, &alpn);
            let mut acceptor = rustls::server::Acceptor::default();
            acceptor.read_tls(&mut &bytes[..]).unwrap();
            let accepted = acceptor.accept().map_err(|(e, _)| e).unwrap().unwrap();
            let theirs = accepted.client_hello();
            let ours = done(&bytes);
            assert_eq!(
                ours.server_name().map(HostName::as_str),
                theirs.server_name().map(str::to_ascii_lowercase).as_deref()
            );
            let their_alpn: Vec<Vec<u8>> = theirs
                .alpn()
                .into_iter()
                .flatten()
                .map(<[u8]>::to_vec)
                .collect();
            assert_eq!(alpn_of(&ours), their_alpn);
        }
    }

    #[test]
    fn tls12_only_client() {
        let bytes = rustls_hello_with(Some("jaunt.example.com"), &[ALPN_HTTP1], |config| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            *config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        });
        let hello = done(&bytes);
        assert!(!hello.offers_tls13());
        assert_eq!(hello.supported_versions().collect::<Vec<_>>(), [0x0303]);
        // rustls sends an empty session_ticket extension: support, not an offer.
        assert!(!hello.offers_session_ticket());
        assert_eq!(
            hello.server_name().map(HostName::as_str),
            Some("jaunt.example.com")
        );
    }

    #[test]
    fn split_at_every_byte_boundary() {
        for (sni, alpn) in cases() {
            let bytes = rustls_hello(sni, &alpn);
            let want = parse(&bytes);
            assert!(matches!(want, Parse::Done(_)));
            check_prefixes(&bytes, &want);
        }
    }

    #[test]
    fn fragmented_across_records() {
        let bytes = rustls_hello(Some("grafana.jaunt.example.com"), &[ALPN_H2, ALPN_HTTP1]);
        let reference = done(&bytes);
        let message_len = bytes.len() - 5;
        for size in 1..=message_len {
            let framed = reframe(&bytes, size);
            let hello = done(&framed);
            assert_eq!(hello.records(), message_len.div_ceil(size));
            assert_eq!(hello.record_bytes(), framed.len());
            assert_eq!(hello.server_name(), reference.server_name());
            assert_eq!(alpn_of(&hello), alpn_of(&reference));
            assert!(hello.offers_tls13());
        }
        for size in [1, 2, 3, 4, 5, 7, 64, 100] {
            let framed = reframe(&bytes, size);
            check_prefixes(&framed, &parse(&framed));
        }
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let bytes = rustls_hello(Some("jaunt.example.com"), &[b"jaunt-control"]);
        let mut more = bytes.clone();
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1]); // change_cipher_spec
        more.extend_from_slice(b"garbage");
        let hello = done(&more);
        assert_eq!(hello.record_bytes(), bytes.len());
        assert_eq!(parse(&more), parse(&bytes));
    }

    #[test]
    fn truncated_is_need_more() {
        let bytes = rustls_hello(Some("jaunt.example.com"), &[ALPN_HTTP1]);
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut]), Parse::NeedMore, "cut {cut}");
        }
    }

    #[test]
    fn non_tls_is_rejected_on_the_first_byte() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: jaunt.example.com\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"\x80\x2e\x01\x03\x01", // SSLv2-compatible ClientHello
            b"\x17\x03\x03\x00\x10", // application data first
            b"\x16\x02\x00",         // handshake byte, then not TLS
        ] {
            assert_eq!(
                parse(input),
                Parse::Invalid(RejectReason::NotTls),
                "{input:?}"
            );
            let first = if input[0] == 22 { 2 } else { 1 };
            assert_eq!(parse(&input[..first]), Parse::Invalid(RejectReason::NotTls));
        }
        assert_eq!(parse(b""), Parse::NeedMore);
        assert_eq!(parse(b"\x16"), Parse::NeedMore);
        assert_eq!(parse(b"\x16\x03"), Parse::NeedMore);
    }

    #[test]
    fn record_too_large() {
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0x01]),
            Parse::Invalid(RejectReason::RecordTooLarge)
        );
        assert_eq!(
            parse(&[22, 3, 1, 0xff, 0xff]),
            Parse::Invalid(RejectReason::RecordTooLarge)
        );
        // A full 2^14 record is legal TLS but, with its header, over our bound.
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0x00]),
            Parse::Invalid(RejectReason::HelloTooLarge)
        );
        assert_eq!(parse(&[22, 3, 1, 0x3f, 0xfb]), Parse::NeedMore);
    }

    #[test]
    fn hello_too_large() {
        // Declared by the handshake header, before the bytes arrive.
        let huge = [22, 3, 1, 0x10, 0x00, 1, 0x00, 0x40, 0x00];
        assert_eq!(parse(&huge), Parse::Invalid(RejectReason::HelloTooLarge));
        let fits = [22, 3, 1, 0x10, 0x00, 1, 0x00, 0x3f, 0xf0];
        assert_eq!(parse(&fits), Parse::NeedMore);
        // A real one, padded past the bound across two records.
        let synth = Synth::new()
            .sni(b"jaunt.example.com")
            .ext(21, vec![0; 17_000]);
        assert_eq!(
            parse(&synth.record()),
            Parse::Invalid(RejectReason::HelloTooLarge)
        );
        assert_eq!(
            parse(&synth.record()[..9]),
            Parse::Invalid(RejectReason::HelloTooLarge)
        );
        // Just under the bound in two records parses.
        let pad = MAX_CLIENT_HELLO_BYTES - 2 * 5 - Synth::new().message().len() - 4;
        let fits = frame(&Synth::new().ext(21, vec![0; pad]).message(), 10_000);
        assert_eq!(fits.len(), MAX_CLIENT_HELLO_BYTES);
        assert_eq!(done(&fits).records(), 2);
        let over = frame(&Synth::new().ext(21, vec![0; pad + 1]).message(), 10_000);
        assert_eq!(parse(&over), Parse::Invalid(RejectReason::HelloTooLarge));
        // Many tiny records: the headers count against the bound.
        let message = Synth::new().ext(21, vec![0; 3000]).message();
        let tiny = frame(&message, 1);
        assert_eq!(parse(&tiny), Parse::Invalid(RejectReason::HelloTooLarge));
        check_prefixes(&tiny, &Parse::Invalid(RejectReason::HelloTooLarge));
    }

    #[test]
    fn need_more_never_reaches_the_bound() {
        let message = Synth::new().ext(21, vec![0; 12_000]).message();
        for size in [1, 2, 100, 16_384] {
            let framed = frame(&message, size);
            for cut in (0..framed.len()).step_by(97) {
                if parse(&framed[..cut]) == Parse::NeedMore {
                    assert!(cut < MAX_CLIENT_HELLO_BYTES);
                }
            }
        }
    }

    #[test]
    fn framing_violations_are_malformed() {
        let message = Synth::new().sni(b"jaunt.example.com").message();
        // Zero-length record.
        assert_eq!(
            parse(&[22, 3, 1, 0, 0]),
            Parse::Invalid(RejectReason::Malformed)
        );
        // Not a ClientHello (a ServerHello).
        let mut server_hello = message.clone();
        server_hello[0] = 2;
        assert_eq!(
            parse(&frame(&server_hello, 1000)),
            Parse::Invalid(RejectReason::Malformed)
        );
        // A record carrying bytes past the ClientHello (another message in the same record).
        let mut two = message.clone();
        two.extend_from_slice(&[20, 0, 0, 0]);
        assert_eq!(
            parse(&frame(&two, 1000)),
            Parse::Invalid(RejectReason::Malformed)
        );
        // The record header alone already says so: no need to wait for the bytes.
        let framed = frame(&two, 1000);
        assert_eq!(parse(&framed[..9]), Parse::Invalid(RejectReason::Malformed));
        // A non-handshake record interleaved.
        let mut interleaved = frame(&message[..10], 10);
        interleaved.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(parse(&interleaved), Parse::Invalid(RejectReason::Malformed));
        // A non-TLS version inside.
        let mut bad_version = frame(&message[..10], 10);
        bad_version.extend_from_slice(&[22, 4, 1, 0, 2]);
        assert_eq!(parse(&bad_version), Parse::Invalid(RejectReason::Malformed));
    }

    #[test]
    fn body_violations_are_malformed() {
        let base = Synth::new().sni(b"jaunt.example.com").alpn(&[ALPN_HTTP1]);
        assert!(matches!(parse(&base.record()), Parse::Done(_)));
        let malformed = |synth: Synth| parse(&synth.record());
        let m = Parse::Invalid(RejectReason::Malformed);

        let mut s = base.clone();
        s.trailing = vec![0];
        assert_eq!(malformed(s), m, "trailing byte after extensions");
        let mut s = base.clone();
        s.session_id = vec![0; 33];
        assert_eq!(malformed(s), m, "session id too long");
        let mut s = base.clone();
        s.cipher_suites = vec![0x13, 0x01, 0x13];
        assert_eq!(malformed(s), m, "odd cipher suites");
        let mut s = base.clone();
        s.cipher_suites = vec![];
        assert_eq!(malformed(s), m, "no cipher suites");
        let mut s = base.clone();
        s.compression = vec![];
        assert_eq!(malformed(s), m, "no compression methods");
        assert_eq!(
            malformed(base.clone().sni(b"other.example.com")),
            m,
            "duplicate SNI ext"
        );
        assert_eq!(
            malformed(base.clone().alpn(&[ALPN_H2])),
            m,
            "duplicate ALPN ext"
        );
        assert_eq!(
            malformed(Synth::new().ext(16, vec![0, 0])),
            m,
            "empty ALPN list"
        );
        assert_eq!(
            malformed(Synth::new().ext(16, vec![0, 1, 0])),
            m,
            "empty ALPN id"
        );
        assert_eq!(
            malformed(Synth::new().ext(16, vec![0, 3, 1, b'a'])),
            m,
            "ALPN id overruns"
        );
        assert_eq!(
            malformed(Synth::new().ext(16, vec![0, 2, 1, b'a', 9])),
            m,
            "ALPN trailing"
        );
        assert_eq!(
            malformed(Synth::new().ext(0, vec![0, 0])),
            m,
            "empty server name list"
        );
        assert_eq!(malformed(Synth::new().ext(0, vec![])), m, "empty SNI ext");
        let two_names = vec![0, 8, 0, 0, 1, b'a', 0, 0, 1, b'b'];
        assert_eq!(
            malformed(Synth::new().ext(0, two_names)),
            m,
            "two host names"
        );
        assert_eq!(
            malformed(Synth::new().ext(43, vec![3, 3, 4, 3])),
            m,
            "odd versions"
        );
        assert_eq!(
            malformed(Synth::new().ext(43, vec![0])),
            m,
            "empty versions"
        );
        assert_eq!(
            malformed(Synth::new().ext(43, vec![2, 3, 4, 0])),
            m,
            "versions trailing"
        );
        // Extension block length disagreeing with its content.
        let mut body = base.body();
        let ext_len_at = 2 + 32 + 1 + 32 + 2 + 4 + 1 + 1;
        body[ext_len_at + 1] += 1;
        let message = [&[1u8, 0, 0, body.len() as u8][..], &body].concat();
        assert_eq!(parse(&frame(&message, 1000)), m, "extensions length");
        // Message length disagreeing with the body.
        let message = base.message();
        let mut short = message.clone();
        short[3] -= 1;
        short.pop();
        assert_eq!(parse(&frame(&short, 1000)), m, "message shorter than body");
        let mut long = message.clone();
        long[3] += 1;
        long.push(0);
        assert_eq!(parse(&frame(&long, 1000)), m, "message longer than body");
    }

    #[test]
    fn no_extensions_tls12_style() {
        let mut s = Synth::new();
        s.extensions = None;
        let hello = done(&s.record());
        assert!(hello.server_name().is_none());
        assert!(!hello.alpn_offered());
        assert_eq!(hello.alpn().count(), 0);
        // An empty extensions block is fine too.
        let hello = done(&Synth::new().record());
        assert!(!hello.alpn_offered());
    }

    #[test]
    fn resumption_offers() {
        let hello = done(&Synth::new().ext(35, vec![1, 2, 3]).record());
        assert!(hello.offers_session_ticket());
        assert!(!hello.offers_psk());
        let hello = done(&Synth::new().ext(35, vec![]).record());
        assert!(!hello.offers_session_ticket());

        let binder = [9u8; 32];
        let psk = Synth::new()
            .sni(b"jaunt.example.com")
            .versions(&[0x0304])
            .psk(&[b"ticket-identity"], &[&binder]);
        let hello = done(&psk.record());
        assert!(hello.offers_psk());
        assert!(hello.offers_tls13());

        let m = Parse::Invalid(RejectReason::Malformed);
        let not_last = Synth::new()
            .psk(&[b"id"], &[&binder])
            .sni(b"jaunt.example.com");
        assert_eq!(parse(&not_last.record()), m);
        let short_binder = Synth::new().psk(&[b"id"], &[&[1; 31]]);
        assert_eq!(parse(&short_binder.record()), m);
        let count_mismatch = Synth::new().psk(&[b"a", b"b"], &[&binder]);
        assert_eq!(parse(&count_mismatch.record()), m);
        let empty_identity = Synth::new().psk(&[b""], &[&binder]);
        assert_eq!(parse(&empty_identity.record()), m);
        let two = Synth::new().psk(&[b"a", b"b"], &[&binder, &binder]);
        assert!(done(&two.record()).offers_psk());
    }

    #[test]
    fn sni_validation() {
        let sni = |name: &[u8]| match parse(&Synth::new().sni(name).record()) {
            Parse::Done(hello) => Ok(hello
                .server_name()
                .map(|h| (h.as_str().to_owned(), h.is_ip_literal()))),
            Parse::Invalid(reason) => Err(reason),
            Parse::NeedMore => unreachable!(),
        };
        let ok = |s: &str, ip: bool| Ok(Some((s.to_owned(), ip)));
        assert_eq!(sni(b"Jaunt.Example.COM"), ok("jaunt.example.com", false));
        assert_eq!(sni(b"jaunt.example.com."), ok("jaunt.example.com", false));
        assert_eq!(sni(b"_acme.example.com"), ok("_acme.example.com", false));
        assert_eq!(sni(b"192.0.2.1"), ok("192.0.2.1", true));
        assert_eq!(sni(b"2001:DB8::1"), ok("2001:db8::1", true));
        assert_eq!(sni(b"1.2.3"), ok("1.2.3", false));
        let long_label = [b'a'; 63];
        assert!(sni(&long_label).is_ok());
        let longest = [
            [b'a'; 63].as_slice(),
            b".",
            &[b'b'; 63],
            b".",
            &[b'c'; 63],
            b".",
            &[b'd'; 61],
        ]
        .concat();
        assert_eq!(longest.len(), MAX_HOST_NAME_BYTES);
        assert!(sni(&longest).is_ok());
        let bad = Err(RejectReason::BadSni);
        for name in [
            &b""[..],
            b".",
            b"..",
            b".example.com",
            b"a..b",
            b"example.com..",
            b"caf\xc3\xa9.example",
            b"a b",
            b"a\0b",
            b"a/b",
            b"[::1]",
            b"host:443",
            b"1:2:3",
        ] {
            assert_eq!(sni(name), bad, "{:?}", name.escape_ascii().to_string());
        }
        assert_eq!(sni(&[b'a'; 64]), bad);
        assert_eq!(sni(&[longest.as_slice(), b"e"].concat()), bad);
        assert_eq!(sni(&[b'a'; 1000]), bad);
        // A server_name list with only a non-host_name entry.
        let other_type = vec![0, 4, 1, 0, 1, b'x'];
        assert_eq!(
            parse(&Synth::new().ext(0, other_type).record()),
            Parse::Invalid(RejectReason::BadSni)
        );
    }

    #[test]
    fn alpn_bound() {
        let a = [b'x'; 255];
        let b = [b'y'; 255];
        // Two 255-byte ids with their length bytes: exactly the bound.
        let hello = done(&Synth::new().alpn(&[&a, &b]).record());
        assert_eq!(
            hello.alpn().map(|id| id.len() + 1).sum::<usize>(),
            MAX_ALPN_LIST_BYTES
        );
        assert_eq!(
            parse(&Synth::new().alpn(&[&a, &b, b"c"]).record()),
            Parse::Invalid(RejectReason::AlpnTooLong)
        );
    }

    /// Flip, zero and saturate every byte of real and framed hellos: never a panic, and the
    /// answer for each prefix is NeedMore or the final one.
    #[test]
    fn mutations_never_panic() {
        let bytes = rustls_hello(Some("grafana.jaunt.example.com"), &[ALPN_H2, ALPN_HTTP1]);
        let framed = reframe(&bytes, 50);
        let psk = Synth::new()
            .sni(b"jaunt.example.com")
            .alpn(&[ALPN_TUNNEL])
            .versions(&[0x0304, 0x0303])
            .ext(35, vec![5; 20])
            .psk(&[b"identity"], &[&[7; 32]])
            .record();
        for input in [&bytes, &framed, &psk] {
            for pos in 0..input.len() {
                for value in [input[pos] ^ 0xff, input[pos] ^ 0x01, 0, 0xff, 0x80] {
                    let mut mutated = input.clone();
                    mutated[pos] = value;
                    fuzz_parse(&mutated);
                    let whole = parse(&mutated);
                    for cut in [pos, pos + 1, mutated.len() / 2] {
                        let got = parse(&mutated[..cut.min(mutated.len())]);
                        assert!(
                            got == Parse::NeedMore || got == whole,
                            "pos {pos} cut {cut}"
                        );
                    }
                }
            }
        }
    }

    /// Seeded random inputs behind a plausible record header.
    #[test]
    fn random_inputs_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = rustls_hello(Some("jaunt.example.com"), &[ALPN_TUNNEL]);
        for _ in 0..20_000 {
            let len = (next() % 600) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match next() % 3 {
                0 => {
                    let n = input.len().min(seed.len());
                    input[..n].copy_from_slice(&seed[..n]);
                    if !input.is_empty() {
                        let i = (next() as usize) % input.len();
                        input[i] = next() as u8;
                    }
                }
                1 if input.len() >= 9 => {
                    let body = (input.len() - 5) as u16;
                    input[..5].copy_from_slice(&[22, 3, 1, (body >> 8) as u8, body as u8]);
                    input[5] = 1;
                }
                _ => {}
            }
            fuzz_parse(&input);
        }
    }

    #[test]
    fn fuzz_parse_accepts_anything() {
        fuzz_parse(b"");
        fuzz_parse(&rustls_hello(Some("a.jaunt.example.com"), &[ALPN_HTTP1]));
        fuzz_parse(&[0xff; 20_000]);
        fuzz_parse(&[22; 20_000]);
    }

    #[test]
    fn debug_is_readable() {
        let hello = done(&rustls_hello(Some("Jaunt.Example.com"), &[ALPN_TUNNEL]));
        let text = format!("{hello:?}");
        assert!(
            text.contains(r#"server_name: Some("jaunt.example.com")"#),
            "{text}"
        );
        assert!(text.contains(r#"alpn: Some(["jaunt-tunnel"])"#), "{text}");
    }

    /// Prints the ClientHello embedded in `bench/benches/hello.rs`; regenerate with
    /// `cargo test -p jaunt-engine print_bench_hello -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn print_bench_hello() {
        let bytes = rustls_hello(Some("grafana.jaunt.example.com"), &[ALPN_H2, ALPN_HTTP1]);
        for line in bytes.chunks(16) {
            let hex: Vec<String> = line.iter().map(|b| format!("0x{b:02x},")).collect();
            println!("    {}", hex.join(" "));
        }
    }
}
