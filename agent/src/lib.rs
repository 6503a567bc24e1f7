//! Jaunt's agent: runs next to private resources, dials OUT to the engine's public port (TLS,
//! ALPN `jaunt-tunnel`, its host certificate), keeps one tunnel per engine shard, and serves the
//! user streams the engine opens on those tunnels.
//!
//! What lives here: the runtime ([`run`], [`AgentCommand`]), its settings ([`AgentSettings`],
//! [`client_config`]), the reconnect schedule ([`backoff`]), the shard covering logic
//! ([`coverage`]), the stream handlers (`serve`, `http_app` for web apps, [`postgres`] and
//! [`mysql`] for databases, `ssh_term` for recorded SSH sessions, [`recording`] their spool) and the hooks the caller plugs in ([`AgentHooks`]: database certificates, app
//! JWTs, query and app-request recording). What does not:
//! joining and certificate renewal (the `jaunt agent` command in the control crate drives those
//! and hands the results in), the mux and the wire formats (`jaunt_engine::mux`,
//! `jaunt_engine::tunnel`, `jaunt_config::wire::dial`, `jaunt_config::wire::agent_hello`).
//!
//! # Protocol, agent side
//!
//! ```text
//! agent → engine   TCP connect to proxy_addr, TLS (SNI server_name, ALPN jaunt-tunnel,
//!                  client certificate = host certificate)
//! engine → agent   TunnelHello {"version":1,"shards":N,"shard":i}      (u16 length + JSON)
//! agent            shard i already has a tunnel?  → close_notify, close; dial again
//!                  shard count ≠ N (engine restarted)? → keep this one, drain the others
//! agent → engine   AgentHello {"version":1,"name":..,"labels":..,"resources":[..]}
//! both             mux (engine Role::Server opens streams; agent Role::Client accepts)
//! engine → agent   OPEN with a StreamHeader {"kind":"ssh","target":"node1","user":..}
//! agent            verify the forwarded user certificate and re-authorize (`policy`), then
//!                  connect to the local service, accept and splice — or refuse with a reason
//!                  (db: accept, read the client's StartupMessage (PostgreSQL) or greet it and
//!                  read its HandshakeResponse (MySQL, [`mysql`]), log in to the server with a
//!                  db-CA certificate for the database user, relay and record queries;
//!                  app: accept, reverse-proxy HTTP/1.1 with the user's JWT added)
//! agent → engine   OPEN "jaunt-heartbeat/1" (once per tunnel, after the first interval or at a
//!                  reload): then u64 sequence + AgentHello frame, every 30 s and on change
//! ```
//!
//! Dialing repeats (bounded per round) until every shard `0..N` has a tunnel; failures and lost
//! tunnels back off with full jitter ([`backoff`]).

pub mod backoff;
pub mod coverage;
mod dial;
mod error;
mod hooks;
mod http_app;
mod issue_cache;
pub mod metrics;
pub mod mysql;
mod net;
mod placement;
pub mod policy;
pub mod postgres;
pub mod recording;
mod runtime;
mod serve;
mod settings;
mod ssh_term;

pub use backoff::{
    BackoffConfig, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_HEALTHY_AFTER,
};
pub use error::{AgentError, Blame, TunnelError};
pub use hooks::{
    AccessDenial, AgentHooks, AppRequest, AppRequestRecorder, AppSession, AppToken,
    AppTokenProvider, DbCertProvider, DbClientCert, DbSession, DenialRecorder, IgnoreDenials,
    LogAppRequests, LogQueries, LogSshEvents, QueryRecorder, SshCert, SshCertProvider, SshEvent,
    SshEventRecorder, SshRecording, SshSession, SshUserCertRequest, MAX_AUDITED_COMMAND_BYTES,
    MAX_AUDITED_PATH_BYTES,
};
pub use net::MAX_CONCURRENT_LOOKUPS;

/// Entry points for the fuzz targets in `fuzz/` (see the README's "Fuzzing" section): each takes
/// arbitrary bytes and checks its parser's invariants with `debug_assert!`. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// The app proxy's HTTP/1.1 head parsing, planning and rewriting.
    pub fn http_head(data: &[u8]) {
        crate::http_app::wire::fuzz_parse(data);
    }

    /// The PostgreSQL first message and the query scanner.
    pub fn postgres(data: &[u8]) {
        crate::postgres::wire::fuzz_parse(data);
    }

    /// The MySQL handshake, command and result parsers, with fuzzed splits.
    pub fn mysql(data: &[u8]) {
        crate::mysql::wire::fuzz_parse(data);
    }
}
pub use placement::CpuPlacement;
pub use policy::{ClusterPolicy, PolicyMode};
pub use runtime::{run, run_with_hooks, run_with_policy, AgentCommand, AGENT_IO_MEMORY};
pub use settings::{
    client_config, AgentSettings, Timeouts, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_LOCAL_CONNECT_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
};
pub use ssh_term::fuzz_relay as fuzz_ssh_relay;
pub use ssh_term::LiveSessions;
