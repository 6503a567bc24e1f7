//! The wire contract of the public port and the tunnels: what the client (`jaunt proxy`, `jaunt
//! db connect`, ...), the engine and the agent say to each other, in one place so that all three
//! build and read the same bytes.
//!
//! - The ALPN identifiers Jaunt speaks ([`ALPN_TUNNEL`], [`ALPN_SSH`], ...) and which one a
//!   [`DialKind`] arrives with ([`DialKind::alpn`]).
//! - [`dial`]: the user's [`DialRequest`] and the engine's [`DialResponse`] (user → engine), the
//!   [`TunnelHello`] (engine → agent) and the [`StreamHeader`] of every stream the engine opens
//!   on a tunnel (engine → agent).
//! - [`term`]: the web terminal's frames (browser → engine → agent) and its WebSocket messages.
//! - [`agent_hello`]: the [`AgentHello`] an agent announces its resources with, and its
//!   heartbeats.
//! - The one mapping from what a user dials to what is authorized: [`DialKind::resource_kind`]
//!   gives the [`ResourceKind`] that both [`crate::rbac::authorize`] and the agents' resource
//!   announcements use.
//!
//! What is not here: the tunnel multiplexer's frames (`jaunt_engine::mux`, which bounds a
//! stream's dial header by [`MAX_DIAL_HEADER_LEN`]), the ClientHello parser and routing
//! (`jaunt_engine::hello`, `jaunt_engine::route`), the control API's bodies ([`crate::api`]).
//! Sans-IO: pure functions of bytes.

pub mod agent_hello;
pub mod dial;
pub mod term;

pub use agent_hello::{AgentHello, Heartbeat, RecordingNote, Resource, ResourceProtocol};
pub use dial::{DialError, DialKind, DialRequest, DialResponse, StreamHeader, TunnelHello};

pub use crate::rbac::ResourceKind;

/// Agent reverse tunnel (terminate TLS, mTLS with a host certificate).
pub const ALPN_TUNNEL: &[u8] = b"jaunt-tunnel";
/// Control API (TLS passed through untouched to control).
pub const ALPN_CONTROL: &[u8] = crate::api::ALPN_CONTROL.as_bytes();
/// User SSH stream to a node (terminate, mTLS user certificate).
pub const ALPN_SSH: &[u8] = b"jaunt-ssh";
/// User PostgreSQL (or MySQL) session (terminate, mTLS user certificate).
pub const ALPN_POSTGRES: &[u8] = b"jaunt-postgres";
/// User TCP app (terminate, mTLS user certificate).
pub const ALPN_TCP: &[u8] = b"jaunt-tcp";
/// User web app named by a dial request rather than by SNI (terminate, mTLS user certificate;
/// then HTTP/1.1 as on an `<app>.<public host>` connection).
pub const ALPN_APP: &[u8] = b"jaunt-app";
/// Web UI, its API and web apps.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// HTTP/2: accepted only alongside `http/1.1` (we then negotiate `http/1.1`).
pub const ALPN_H2: &[u8] = b"h2";

/// Largest dial header of a tunnel stream (the mux OPEN frame's payload, so the bound of a
/// [`StreamHeader`]): a target, a login, a few names and the user's certificate fit.
pub const MAX_DIAL_HEADER_LEN: usize = 4 * 1024;

/// Most shards one engine runs (and so the largest shard count a [`TunnelHello`] may name).
pub const MAX_SHARDS: usize = 1024;

/// Prefix of the shard hint an agent offers after [`ALPN_TUNNEL`]: `jaunt-shard.<k>` asks the
/// engine to serve this tunnel on shard `k` ([`shard_hint_alpn`], [`parse_shard_hint`]).
///
/// The hint rides in the ALPN list because it is the only part of the ClientHello an agent can
/// fill that the engine reads before choosing who terminates TLS, and it survives NAT (a source
/// port chosen to steer a `SO_REUSEPORT` BPF program does not). It is never selected: the
/// engine selects [`ALPN_TUNNEL`], and an engine that does not know the hint skips it as an
/// unknown protocol, so old engines and new agents still talk.
pub const ALPN_SHARD_HINT_PREFIX: &[u8] = b"jaunt-shard.";

/// The ALPN entry asking for shard `shard`.
pub fn shard_hint_alpn(shard: usize) -> Vec<u8> {
    let mut id = ALPN_SHARD_HINT_PREFIX.to_vec();
    id.extend_from_slice(shard.to_string().as_bytes());
    id
}

/// The shard a `jaunt-shard.<k>` ALPN entry asks for: `None` for any other entry, a `k` with
/// leading zeros, a sign, or a `k` of [`MAX_SHARDS`] or more.
pub fn parse_shard_hint(id: &[u8]) -> Option<usize> {
    let digits = id.strip_prefix(ALPN_SHARD_HINT_PREFIX)?;
    if digits.is_empty() || digits.len() > 4 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return None;
    }
    let shard = digits
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    (shard < MAX_SHARDS).then_some(shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_hints_round_trip_and_refuse_what_is_not_one() {
        for shard in [0, 1, 9, 10, 63, 1023] {
            assert_eq!(parse_shard_hint(&shard_hint_alpn(shard)), Some(shard));
        }
        for id in [
            &b"jaunt-shard."[..],
            b"jaunt-shard.01",
            b"jaunt-shard.+1",
            b"jaunt-shard.-1",
            b"jaunt-shard.1024",
            b"jaunt-shard.99999999999999999999",
            b"jaunt-shard.1a",
            b"jaunt-tunnel",
            b"jaunt-shard1",
        ] {
            assert_eq!(
                parse_shard_hint(id),
                None,
                "{:?}",
                String::from_utf8_lossy(id)
            );
        }
    }
}
