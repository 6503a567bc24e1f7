//! Jaunt's shared contract: what every process agrees on.
//!
//! - [`file`]: the `jaunt.yaml` schema (serde-facing `File*` types) and its validated form.
//! - [`resource`]: dynamic resources in Teleport-like YAML (`kind`, `version`, `metadata`, `spec`).
//! - [`yaml`]: YAML loading with errors that name the file, line, column and key path.
//! - [`identity`]: the [`identity::Identity`] carried in certificates, and its X.509 and OpenSSH
//!   encodings (one decoding function for engine and agent alike).
//! - [`rbac`]: the per-connection authorization decision (roles, labels, traits, locks) that
//!   engine and agent call before a stream is opened or served.
//! - [`api`]: request and response bodies of the control API.
//! - [`wire`]: the wire contract of the public port and the tunnels (ALPN ids, dial request and
//!   response, tunnel hello, stream header, agent hello) that client, engine and agent share.
//! - [`http`]: HTTP/1.1 pieces the control, engine and agent HTTP servers share (reason
//!   phrases).
//! - [`duration`]: human durations (`30m`, `12h`, `1h30m`).
//! - [`pgconn`]: PostgreSQL connection strings (URI and keyword forms), password redacted.
//!
//! No I/O beyond reading a file, no runtime.

pub mod api;
pub mod duration;
pub mod file;
pub mod http;
pub mod identity;
pub mod pgconn;
pub mod rbac;
pub mod resource;
pub mod wire;
pub mod yaml;
