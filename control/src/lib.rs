//! Jaunt's control plane: the slow path, and the `jaunt` binary's library.
//!
//! - [`store`]: the store interface, SQLite (default) and PostgreSQL (shared by several
//!   controls) — users, roles, tokens, locks, CAs, hosts, audit.
//! - [`ca`]: the user, host and database certificate authorities (X.509 + SSH).
//! - [`rotation`]: phased CA rotation (`jaunt ca rotate`), its grace thread and guards.
//! - [`auth`]: password hashing, TOTP, the failed-login limiter.
//! - [`rbac`]: what a role grants at login and for admin verbs.
//! - [`audit`]: audit events with stable codes.
//! - [`service`]: the control API's handlers.
//! - [`jwt`]: app-access JWTs (ES256) and their JWK Set.
//! - [`http`] / [`client`]: the API's transport (HTTP/1.1 + JSON over TLS, plain threads).
//! - [`daemon`]: `jaunt start`.
//! - [`exclusive`]: one daemon per data directory (flock) and per public port.
//! - [`profile`]: the user's `$JAUNT_HOME` (keys and certificates after `jaunt login`).
//! - [`access`]: the user's side of resource access (dial through the engine, carry bytes).
//! - [`agent_host`]: the agent host's side (`jaunt agent`): joining, renewal, the policy poll,
//!   and every call the agent makes to control, through one host client.
//! - [`agent_audit`], [`agent_ssh`]: control's side of agents' audit events and of SSH
//!   termination (what it checks and signs).
//! - [`db_certs`]: what control signs for databases (client and server certificates).
//! - [`db_cmd`]: database access from the user's side: `jaunt ca sign-db`, `jaunt proxy db`,
//!   `jaunt db connect`.
//! - [`web`]: the web UI on the public host (login, resources, audit), served through the engine.
//! - [`cli`]: the `jaunt` command line.

pub mod access;
pub mod agent_audit;
pub mod agent_host;
pub mod agent_metrics;
pub mod agent_ssh;
pub mod audit;
pub mod audit_file;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod db_certs;
pub mod db_cmd;
pub mod exclusive;
pub mod http;
pub mod jwt;
mod memcpy;
pub mod profile;
pub mod rbac;
pub mod recordings;
pub mod rotation;
pub mod service;
pub mod ssh_cmd;
pub mod store;
pub mod takeover;
mod thp;
pub mod web;
