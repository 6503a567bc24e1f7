//! The harness Jaunt's engine and agent integration tests share: a throwaway test PKI with Jaunt
//! identities ([`pki`]), rustls clients and the dial / tunnel hello framing ([`net`]), bounded
//! waits ([`wait`]), local std services ([`services`]), and both ends of a tunnel: a stand-in
//! engine that accepts the agent, and the agent side's connect ([`tunnel`]), plus agent settings
//! ([`agent`]).
//!
//! Integration tests use it as a dev-dependency: they link the same `jaunt_engine` and
//! `jaunt_agent` libraries as this crate, so the types match. Unit tests inside `src/` must not.
//!
//! Nothing here orders events with a sleep: every wait is for a condition, with a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

pub mod agent;
pub mod engine;
pub mod net;
pub mod pattern;
pub mod pki;
pub mod services;
pub mod tunnel;
pub mod wait;

use std::time::Duration;

/// The name the test servers' certificates carry and the clients check.
pub const PUBLIC_HOST: &str = "localhost";

/// The default bound on a wait for a condition; generous for a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);
