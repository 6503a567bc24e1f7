//! The wire contract of the public port and the tunnels: what the client (`jaunt proxy`, `jaunt
//! db connect`, ...), the engine and the agent say to each other, in one place so that all three
//! build and read the same bytes.
//!
//! - The ALPN identifiers Jaunt speaks ([`ALPN_TUNNEL`], [`ALPN_SSH`], ...) and which one a
//!   [`DialKind`] arrives with ([`DialKind::alpn`]).
//! - [`dial`]: the user's [`DialRequest`] and the engine's [`DialResponse`] (user → engine), the
//!   [`TunnelHello`] (engine → agent) and the [`StreamHeader`] of every stream the engine opens
//!   on a tunnel (engine → agent).
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

pub use agent_hello::{AgentHello, Heartbeat, Resource, ResourceProtocol};
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
