//! The `jaunt.yaml` schema: which roles this host runs (`control`, `engine`, `agent`) and how.
//!
//! Two of the three config layers of STYLE.md live here:
//! - `File*` types mirror the YAML one to one (`deny_unknown_fields`, everything optional so
//!   that defaults and "required" are decided in one place, with a helpful message);
//! - the validated runtime types ([`Config`], [`EngineConfig`], ...) are built from them by a
//!   conversion that applies the named `DEFAULT_*` constants and returns a [`ConfigError`] naming
//!   the key and its line.
//!
//! The third layer, the snapshots the engine consumes, belongs to the engine and control.
//! Value types with their own syntax ([`HostPort`], [`Shards`], [`ByteSize`], [`CaPin`], and
//! [`Duration`]) deserialize with messages that say what was expected in plain words.
//!
//! Entry points: [`load`] and [`parse`]; [`Config::dev`] for the embedded dev cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::net::Ipv6Addr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::Duration;
use crate::resource::validate_name;
use crate::yaml::{self, ConfigError, Invalid, Source};

// ---- defaults --------------------------------------------------------------------------------

/// The only config schema version so far; `version:` may be omitted.
pub const CONFIG_VERSION: &str = "v1";

/// Where control keeps its store, CA keys and recordings, and where an agent keeps its joined
/// identity: the FHS place for a daemon's variable state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/jaunt";

/// Loopback: in the single-host install the engine reaches control locally, and everyone else
/// reaches the control API through the engine's public port (ALPN `jaunt-control`), so it need
/// not be exposed. 3025 is the port Teleport operators already know for this role.
pub const DEFAULT_CONTROL_LISTEN_ADDR: &str = "127.0.0.1:3025";

/// A working day: users log in once a day. Roles' `max_session_ttl` caps it further.
pub const DEFAULT_USER_CERT_TTL: Duration = Duration::from_hours(12);

/// 30 days: hosts renew long before expiry without anyone noticing, and a stolen host key is
/// useful for a month at most.
pub const DEFAULT_HOST_CERT_TTL: Duration = Duration::from_days(30);

/// An unprivileged port, so a first start works without `CAP_NET_BIND_SERVICE`; production
/// installs set `0.0.0.0:443`.
pub const DEFAULT_ENGINE_LISTEN_ADDR: &str = "0.0.0.0:3080";

/// glommio registers this much memory per shard with io_uring for its DMA file I/O. The proxy
/// moves bytes over TCP, which does not use those registered buffers, so 64 KiB is plenty and
/// keeps the `RLIMIT_MEMLOCK` need of many shards small (glommio's own default is 10 MiB each).
pub const DEFAULT_IO_MEMORY_BYTES: u64 = 64 * KIB;

/// Prometheus `/metrics`, `/healthz`, `/readyz` on loopback: scraped locally, never public.
/// Port 3079, next to the public 3080: no common service uses it (3000 was Grafana's, the very
/// app a Jaunt agent often serves on the same host).
pub const DEFAULT_DIAG_ADDR: &str = "127.0.0.1:3079";
/// The port of [`DEFAULT_DIAG_ADDR`].
pub const DEFAULT_DIAG_PORT: u16 = 3079;

/// Enough for a TLS handshake over a slow mobile link; short enough that clients that connect
/// and stall cannot hold a shard's connection slots for long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle SSH and database sessions are normal for an hour; roles' `client_idle_timeout` can be
/// stricter.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_hours(1);

/// Bounds a shard's buffer memory (buffers are per connection) while leaving, on a 48-core
/// host, most of the unit's 1M file descriptors for connections. The engine's own default
/// (`jaunt_engine::server::DEFAULT_MAX_CONNECTIONS_PER_SHARD`, which a daemon started without
/// a config file uses) is the same; control's tests hold them equal.
pub const DEFAULT_MAX_CONNECTIONS_PER_SHARD: u32 = 20_000;

/// `engine.max_handshakes_per_shard` when unset: the engine's own default
/// (`jaunt_engine::server::DEFAULT_MAX_HANDSHAKES_PER_SHARD`; control's tests hold them equal).
pub const DEFAULT_MAX_HANDSHAKES_PER_SHARD: u32 = 128;

/// Audit events waiting for the store: a few seconds of bursts at high connection rates, and a
/// bounded memory cost (events are a few hundred bytes).
pub const DEFAULT_AUDIT_QUEUE_CAPACITY: usize = 65_536;

/// Rotate the JSON-lines audit file at 100 MiB: small enough to ship and grep.
pub const DEFAULT_AUDIT_FILE_MAX_SIZE_BYTES: u64 = 100 * MIB;

/// Ten rotated files: about 1 GiB of audit history on disk before the oldest goes.
pub const DEFAULT_AUDIT_FILE_MAX_FILES: u32 = 10;

/// Audit events older than this are removed from the store: a year, as Teleport keeps its
/// audit log by default. The store's size is then bounded by a year of traffic.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_days(365);

/// The local OpenSSH server an agent forwards SSH sessions to.
pub const DEFAULT_SSH_ADDR: &str = "127.0.0.1:22";

/// Cluster name of [`Config::dev`]: `.local` makes clear it is not a public name.
pub const DEV_CLUSTER_NAME: &str = "dev.jaunt.local";

// ---- bounds ----------------------------------------------------------------------------------

/// More shards than this is a typo, not a machine.
pub const SHARDS_MAX: usize = 1024;
/// Per-shard registered memory above 1 GiB would exhaust locked memory on most hosts.
pub const IO_MEMORY_BYTES_MAX: u64 = 1024 * MIB;
/// A shard cannot hold more connections than a process has file descriptors.
pub const MAX_CONNECTIONS_PER_SHARD_MAX: u32 = 1 << 20;

/// The largest `engine.max_handshakes_per_shard` accepted.
pub const MAX_HANDSHAKES_PER_SHARD_MAX: u32 = 1 << 16;
/// Audit queue entries: 16M events is already gigabytes of memory.
pub const AUDIT_QUEUE_CAPACITY_MAX: usize = 1 << 24;
/// Rotated audit files kept: each rotation renames them all, so thousands would make every
/// rotation slow.
pub const AUDIT_FILE_MAX_FILES_MAX: u32 = 1000;
/// A config file larger than this is not a config file.
pub const CONFIG_FILE_BYTES_MAX: u64 = MIB;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

// ---- public entry points ---------------------------------------------------------------------

/// Reads and validates a `jaunt.yaml`. The file name in errors is `path` as given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file_name = path.display().to_string();
    let text = read_text(path, &file_name)?;
    parse(&file_name, &text)
}

/// Validates config `text`; `file_name` is only used in error messages.
pub fn parse(file_name: &str, text: &str) -> Result<Config, ConfigError> {
    parse_with_hostname(file_name, text, system_hostname)
}

// ---- validated types -------------------------------------------------------------------------

/// A validated `jaunt.yaml`. The sections present say which roles this host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// As written; always `Some` when `control` is (then equal to `control.cluster_name`).
    pub cluster_name: Option<String>,
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub control: Option<ControlConfig>,
    pub engine: Option<EngineConfig>,
    /// Always present: audit settings apply to whichever role produces events.
    pub audit: AuditConfig,
    pub agent: Option<AgentConfig>,
    /// Where control keeps session recordings (`recordings:`; `file` in `data_dir` by default).
    pub recordings: RecordingsConfig,
    /// Where control keeps cluster state and audit (`storage:`); SQLite in `data_dir` unless
    /// set.
    pub storage: StorageConfig,
}

/// `recordings:`: the recordings storage backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RecordingsConfig {
    /// `type: file`: `data_dir/recordings/`.
    #[default]
    File,
    /// `type: s3`: any S3-compatible object store.
    S3(S3Config),
}

/// `recordings:` with `type: s3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host[:port]`; `None`: AWS's regional endpoint `https://s3.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    pub region: String,
    /// Address the bucket in the path (`endpoint/bucket/key`) rather than as a host name
    /// (`bucket.endpoint/key`); most self-hosted stores want `true`.
    pub path_style: bool,
    /// An AWS-style credentials file (`[default]` with `aws_access_key_id`,
    /// `aws_secret_access_key`, optional `aws_session_token`); `None`: the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    pub credentials_file: Option<PathBuf>,
    /// Key prefix of every object (e.g. `recordings/`).
    pub prefix: String,
}

/// `storage:`: the cluster store's backend.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StorageConfig {
    /// `jaunt.db` in `data_dir` (the default; one control host).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by every control host (`type: postgres`). The password,
    /// if the string has one, never shows in `Debug`.
    Postgres {
        conn_string: crate::pgconn::ConnInfo,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: LogLevel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub cluster_name: String,
    /// The control API (mTLS).
    pub listen_addr: HostPort,
    pub second_factor: SecondFactor,
    /// Lifetime of user certificates, capped by the user's roles' `max_session_ttl`.
    pub user_cert_ttl: Duration,
    pub host_cert_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// What users and agents dial; may differ from `listen_addr` behind NAT or a balancer.
    pub public_addr: HostPort,
    pub listen_addr: HostPort,
    pub shards: Shards,
    /// glommio registered io_uring memory per shard.
    pub io_memory_bytes: u64,
    pub diag_addr: HostPort,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections_per_shard: u32,
    /// TLS handshakes one shard runs at once; more connections wait in the listen backlog.
    pub max_handshakes_per_shard: u32,
    /// Certificate for the public port; `None` means one issued by the cluster's host CA.
    pub tls: Option<TlsFiles>,
    /// Where control is, for an engine host that does not run control; `None` when it does.
    pub control_addr: Option<HostPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub on_overflow: AuditOverflow,
    pub queue_capacity: usize,
    pub file: Option<AuditFileConfig>,
    /// Events older than this are removed from the store (in bounded batches).
    pub retention: Duration,
}

/// A JSON-lines audit sink, rotated by size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFileConfig {
    pub path: PathBuf,
    pub max_size_bytes: u64,
    pub max_files: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub proxy_addr: HostPort,
    /// `None` is valid only when the agent has already joined (an identity in `data_dir`);
    /// the agent checks that at start-up.
    pub token: Option<TokenSource>,
    pub ca_pin: Option<CaPin>,
    /// Node name; the hostname unless set.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub services: AgentServices,
    /// Where the agent serves its own Prometheus `/metrics` (plain HTTP, unauthenticated: a
    /// loopback or private address); none by default.
    pub metrics_addr: Option<HostPort>,
    /// Whether the agent's executor runs beside a local engine's busy shard.
    pub cpu_placement: CpuPlacement,
}

/// Whether the agent's executor follows the engine's shard CPU (`agent.cpu_placement`). Only
/// an engine on the same host matters: the agent pins its executor thread beside the shard that
/// carries its traffic, so a request's wake-ups stay on one CPU (`jaunt_agent`'s `placement.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuPlacement {
    /// `follow-engine`: pin beside a local engine's busy shard while the traffic is small
    /// requests through one shard; unpinned otherwise. Saves CPU per request when the host's
    /// CPUs are busy with other work, costs latency when they are idle (BENCHMARKS.md).
    FollowEngine,
    /// `off` (the default): never pin; the scheduler places the executor.
    #[default]
    Off,
}

/// The join token, inline or in a file (kept out of the config, e.g. a systemd credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Value(String),
    File(PathBuf),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentServices {
    pub ssh: Option<SshService>,
    pub apps: Vec<AppService>,
    pub dbs: Vec<DbService>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshService {
    /// The local sshd that trusts the cluster's user CA.
    pub addr: HostPort,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppService {
    /// A DNS label: the app is reached at `<name>.<public host>`.
    pub name: String,
    /// As written, e.g. `http://127.0.0.1:3000/grafana`.
    pub uri: String,
    pub protocol: AppProtocol,
    /// Host and port of `uri`, with the scheme's default port filled in.
    pub addr: HostPort,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbService {
    pub name: String,
    pub uri: String,
    pub protocol: DbProtocol,
    pub addr: HostPort,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http,
    Https,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbProtocol {
    /// PostgreSQL (`postgres://`, `postgresql://`; default port 5432).
    Postgres,
    /// MySQL or MariaDB (`mysql://`, `mariadb://`; default port 3306).
    Mysql,
}

impl DbProtocol {
    /// Stable label, as `jaunt ls dbs` shows it: `postgres` or `mysql`.
    pub fn as_str(self) -> &'static str {
        match self {
            DbProtocol::Postgres => "postgres",
            DbProtocol::Mysql => "mysql",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecondFactor {
    /// TOTP codes (RFC 6238) at login.
    Otp,
    /// Password only: for dev clusters and tests.
    Off,
}

/// What the audit writer does when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOverflow {
    /// Refuse new sessions until the queue drains: no unaudited access (the default).
    Reject,
    /// Drop events and count them: availability over completeness.
    Drop,
}

impl Config {
    /// The embedded dev cluster: control and engine on this host, second factor off, the
    /// engine listening on loopback at `public_addr`'s port, defaults elsewhere.
    pub fn dev(data_dir: impl Into<PathBuf>, public_addr: HostPort) -> Config {
        let listen_addr = HostPort {
            host: "127.0.0.1".to_string(),
            port: public_addr.port,
        };
        Config {
            cluster_name: Some(DEV_CLUSTER_NAME.to_string()),
            data_dir: data_dir.into(),
            log: LogConfig {
                level: LogLevel::Info,
            },
            control: Some(ControlConfig {
                cluster_name: DEV_CLUSTER_NAME.to_string(),
                listen_addr: default_addr(DEFAULT_CONTROL_LISTEN_ADDR, 3025),
                second_factor: SecondFactor::Off,
                user_cert_ttl: DEFAULT_USER_CERT_TTL,
                host_cert_ttl: DEFAULT_HOST_CERT_TTL,
            }),
            engine: Some(EngineConfig {
                public_addr,
                listen_addr,
                shards: Shards::Auto,
                io_memory_bytes: DEFAULT_IO_MEMORY_BYTES,
                diag_addr: default_addr(DEFAULT_DIAG_ADDR, DEFAULT_DIAG_PORT),
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                max_connections_per_shard: DEFAULT_MAX_CONNECTIONS_PER_SHARD,
                max_handshakes_per_shard: DEFAULT_MAX_HANDSHAKES_PER_SHARD,
                tls: None,
                control_addr: None,
            }),
            audit: AuditConfig::default(),
            agent: None,
            recordings: RecordingsConfig::File,
            storage: StorageConfig::Sqlite,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            on_overflow: AuditOverflow::Reject,
            queue_capacity: DEFAULT_AUDIT_QUEUE_CAPACITY,
            file: None,
            retention: DEFAULT_AUDIT_RETENTION,
        }
    }
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AppProtocol {
    fn default_port(self) -> Option<u16> {
        match self {
            AppProtocol::Http => Some(80),
            AppProtocol::Https => Some(443),
            AppProtocol::Tcp => None,
        }
    }
}

// ---- value types -----------------------------------------------------------------------------

/// `host:port` where host is a DNS name or an IP address (IPv6 in brackets) and port is
/// numeric. Display gives the form to bind or dial (`[::1]:3025` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

/// Why a `host:port` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("the port is missing")]
    MissingPort,
    #[error("the host is missing")]
    MissingHost,
    #[error("port {0:?} is not a number from 0 to 65535")]
    BadPort(String),
    #[error("{0:?} is not a host name or IP address")]
    BadHost(String),
    #[error("write IPv6 addresses in brackets, such as [::1]:3025")]
    UnbracketedIpv6,
    #[error("leave out the scheme")]
    Scheme,
}

/// How many engine shards (executors pinned one per core) to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Shards {
    /// One per CPU available to the process.
    #[default]
    Auto,
    Count(NonZeroUsize),
}

/// A byte count written as `65536`, `64KiB`, `10MiB` or `1GiB` (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

/// The SHA-256 of the cluster CA's public key (SubjectPublicKeyInfo), written
/// `sha256:<64 hex>`: an agent joining for the first time trusts only a CA with this hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin(pub [u8; 32]);

const EXPECTED_ADDR: &str = "expected host:port such as proxy.example.com:443";
const EXPECTED_SHARDS: &str = "expected a number or \"auto\"";
const EXPECTED_SIZE: &str = "expected a size in bytes such as 65536, 64KiB or 10MiB";
const EXPECTED_CA_PIN: &str = "expected \"sha256:\" followed by 64 hex characters";

impl HostPort {
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        if text.contains("://") {
            return Err(AddrError::Scheme);
        }
        if let Some(bracketed) = text.strip_prefix('[') {
            let (host, port) = bracketed.split_once("]:").ok_or(AddrError::MissingPort)?;
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(AddrError::BadHost(host.to_string()));
            }
            return Ok(HostPort {
                host: host.to_string(),
                port: parse_port(port)?,
            });
        }
        let (host, port) = text.rsplit_once(':').ok_or(AddrError::MissingPort)?;
        if host.contains(':') {
            return Err(AddrError::UnbracketedIpv6);
        }
        validate_host(host)?;
        Ok(HostPort {
            host: host.to_string(),
            port: parse_port(port)?,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        HostPort::parse(text)
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(StrVisitor {
            expecting: "host:port such as proxy.example.com:443",
            parse: |text| {
                HostPort::parse(text).map_err(|error| format!("{EXPECTED_ADDR} ({error})"))
            },
        })
    }
}

impl Shards {
    /// The number of shards to start given the CPUs available to the process.
    pub fn resolve(self, available_cpus: usize) -> NonZeroUsize {
        match self {
            Shards::Count(count) => count,
            Shards::Auto => {
                NonZeroUsize::new(available_cpus.min(SHARDS_MAX)).unwrap_or(NonZeroUsize::MIN)
            }
        }
    }

    fn from_count(count: u64) -> Result<Self, String> {
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        if count > SHARDS_MAX {
            return Err(format!("{EXPECTED_SHARDS} (at most {SHARDS_MAX})"));
        }
        NonZeroUsize::new(count)
            .map(Shards::Count)
            .ok_or_else(|| "expected a number >= 1 or \"auto\"".to_string())
    }
}

impl fmt::Display for Shards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shards::Auto => f.write_str("auto"),
            Shards::Count(count) => write!(f, "{count}"),
        }
    }
}

impl Serialize for Shards {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Shards::Auto => serializer.serialize_str("auto"),
            Shards::Count(count) => serializer.serialize_u64(count.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShardsVisitor)
    }
}

struct ShardsVisitor;

impl Visitor<'_> for ShardsVisitor {
    type Value = Shards;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or \"auto\"")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Shards, E> {
        Shards::from_count(value).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Shards, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::custom(EXPECTED_SHARDS)),
        }
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shards, E> {
        Err(E::custom(EXPECTED_SHARDS))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Shards, E> {
        if value == "auto" {
            return Ok(Shards::Auto);
        }
        match value.parse::<u64>() {
            Ok(count) => self.visit_u64(count),
            Err(_) => Err(E::custom(EXPECTED_SHARDS)),
        }
    }
}

impl ByteSize {
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let (number, suffix) = text.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let unit = match suffix.trim_start().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" => KIB,
            "mib" => MIB,
            "gib" => GIB,
            _ => return None,
        };
        number.checked_mul(unit).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (unit, suffix) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
            if bytes != 0 && bytes.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", bytes / unit);
            }
        }
        write!(f, "{bytes}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size in bytes such as 65536, 64KiB or 10MiB")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
        u64::try_from(value)
            .map(ByteSize)
            .map_err(|_| E::custom(EXPECTED_SIZE))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<ByteSize, E> {
        Err(E::custom(EXPECTED_SIZE))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<ByteSize, E> {
        ByteSize::parse(value).ok_or_else(|| E::custom(EXPECTED_SIZE))
    }
}

impl CaPin {
    pub fn parse(text: &str) -> Option<Self> {
        let hex_part = text.strip_prefix("sha256:")?;
        if hex_part.len() != 64 {
            return None;
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut digest).ok()?;
        Some(CaPin(digest))
    }

    /// The pin of a CA given its DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        CaPin(out)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPin({self})")
    }
}

impl FromStr for CaPin {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        CaPin::parse(text).ok_or_else(|| EXPECTED_CA_PIN.to_string())
    }
}

impl Serialize for CaPin {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CaPin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(StrVisitor {
            expecting: "\"sha256:\" followed by 64 hex characters",
            parse: |text| CaPin::parse(text).ok_or_else(|| EXPECTED_CA_PIN.to_string()),
        })
    }
}

/// A visitor for values written as one string, with a plain-words error of our own.
struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        (self.parse)(value).map_err(E::custom)
    }
}

// ---- File* types: the YAML as written --------------------------------------------------------

/// `jaunt.yaml` as written. A section given with no body (`control:`) is present with
/// defaults, unlike a section left out.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub version: Option<String>,
    pub cluster_name: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "present")]
    pub log: Option<FileLog>,
    #[serde(default, deserialize_with = "present")]
    pub control: Option<FileControl>,
    #[serde(default, deserialize_with = "present")]
    pub engine: Option<FileEngine>,
    #[serde(default, deserialize_with = "present")]
    pub audit: Option<FileAudit>,
    #[serde(default, deserialize_with = "present")]
    pub agent: Option<FileAgent>,
    #[serde(default, deserialize_with = "present")]
    pub recordings: Option<FileRecordings>,
    #[serde(default, deserialize_with = "present")]
    pub storage: Option<FileStorage>,
}

/// `recordings:` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecordings {
    /// `file` (default) or `s3`.
    #[serde(rename = "type")]
    pub r#type: Option<String>,
    pub bucket: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub credentials_file: Option<PathBuf>,
    pub prefix: Option<String>,
}

/// `storage:` as written.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStorage {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub conn_string: Option<String>,
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection string may carry a password.
        f.debug_struct("FileStorage")
            .field("kind", &self.kind)
            .field("conn_string", &self.conn_string.as_ref().map(|_| "***"))
            .finish()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub level: Option<LogLevel>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileControl {
    pub listen_addr: Option<HostPort>,
    pub second_factor: Option<SecondFactor>,
    pub user_cert_ttl: Option<Duration>,
    pub host_cert_ttl: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngine {
    pub public_addr: Option<HostPort>,
    pub listen_addr: Option<HostPort>,
    pub shards: Option<Shards>,
    pub io_memory: Option<ByteSize>,
    pub diag_addr: Option<HostPort>,
    pub handshake_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_connections_per_shard: Option<u32>,
    pub max_handshakes_per_shard: Option<u32>,
    pub tls: Option<FileTls>,
    pub control_addr: Option<HostPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAudit {
    pub on_overflow: Option<AuditOverflow>,
    pub queue_capacity: Option<usize>,
    pub file: Option<FileAuditFile>,
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuditFile {
    pub path: Option<PathBuf>,
    pub max_size: Option<ByteSize>,
    pub max_files: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgent {
    pub proxy_addr: Option<HostPort>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_pin: Option<CaPin>,
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub services: FileServices,
    pub metrics_addr: Option<HostPort>,
    #[serde(default)]
    pub cpu_placement: CpuPlacement,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServices {
    #[serde(default, deserialize_with = "present")]
    pub ssh: Option<FileSsh>,
    #[serde(default)]
    pub apps: Vec<FileApp>,
    #[serde(default)]
    pub dbs: Vec<FileDb>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSsh {
    pub addr: Option<HostPort>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApp {
    pub name: String,
    pub uri: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDb {
    pub name: String,
    pub uri: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `key:` with no value means "present, all defaults"; an absent key stays `None` through
/// `#[serde(default)]`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

// ---- conversion: File* → validated -----------------------------------------------------------

fn parse_with_hostname(
    file_name: &str,
    text: &str,
    hostname: fn() -> Option<String>,
) -> Result<Config, ConfigError> {
    let file: FileConfig = yaml::from_str(file_name, text)?;
    let source = Source::new(file_name, text);
    validate(file, hostname).map_err(|invalid| source.invalid(invalid))
}

fn validate(file: FileConfig, hostname: fn() -> Option<String>) -> Result<Config, Invalid> {
    if let Some(version) = &file.version {
        if version != CONFIG_VERSION {
            return Err(Invalid::new(
                "version",
                format!("unsupported version {version:?} (expected {CONFIG_VERSION})"),
            ));
        }
    }
    if file.control.is_none() && file.engine.is_none() && file.agent.is_none() {
        return Err(Invalid::new(
            "",
            "nothing to run: add a control, engine or agent section",
        ));
    }
    if let Some(name) = &file.cluster_name {
        validate_dns_name(name).map_err(|why| {
            Invalid::new(
                "cluster_name",
                format!("expected a DNS-style name such as example.com ({why})"),
            )
        })?;
    }
    let data_dir = file
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if data_dir.as_os_str().is_empty() {
        return Err(Invalid::new("data_dir", "must not be empty"));
    }
    let log = LogConfig {
        level: file.log.and_then(|log| log.level).unwrap_or(LogLevel::Info),
    };
    let control = match file.control {
        Some(control) => {
            let cluster_name = file.cluster_name.clone().ok_or_else(|| {
                Invalid::new(
                    "cluster_name",
                    "required when this host runs control (a DNS-style name such as example.com)",
                )
            })?;
            Some(validate_control(control, cluster_name)?)
        }
        None => None,
    };
    let engine = match file.engine {
        Some(engine) => Some(validate_engine(engine, control.is_some())?),
        None => None,
    };
    let audit = validate_audit(file.audit.unwrap_or_default())?;
    let agent = match file.agent {
        Some(agent) => Some(validate_agent(agent, hostname)?),
        None => None,
    };
    let recordings = validate_recordings(file.recordings.unwrap_or_default())?;
    let storage = validate_storage(file.storage)?;
    Ok(Config {
        cluster_name: file.cluster_name,
        data_dir,
        log,
        control,
        engine,
        audit,
        agent,
        recordings,
        storage,
    })
}

fn validate_recordings(file: FileRecordings) -> Result<RecordingsConfig, Invalid> {
    let s3_only = [
        ("recordings.bucket", file.bucket.is_some()),
        ("recordings.endpoint", file.endpoint.is_some()),
        ("recordings.region", file.region.is_some()),
        ("recordings.path_style", file.path_style.is_some()),
        (
            "recordings.credentials_file",
            file.credentials_file.is_some(),
        ),
        ("recordings.prefix", file.prefix.is_some()),
    ];
    match file.r#type.as_deref().unwrap_or("file") {
        "file" => {
            if let Some((key, _)) = s3_only.iter().find(|(_, set)| *set) {
                return Err(Invalid::new(
                    *key,
                    "only for `type: s3` (recordings of `type: file` live in data_dir/recordings)",
                ));
            }
            Ok(RecordingsConfig::File)
        }
        "s3" => {
            let bucket = file.bucket.ok_or_else(|| {
                Invalid::new("recordings.bucket", "required when recordings.type is s3")
            })?;
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                })
                && !bucket.starts_with(['.', '-'])
                && !bucket.ends_with(['.', '-']);
            if !valid_bucket {
                return Err(Invalid::new(
                    "recordings.bucket",
                    "expected an S3 bucket name: 3 to 63 characters of a-z, 0-9, '.' and '-'",
                ));
            }
            let region = file.region.ok_or_else(|| {
                Invalid::new(
                    "recordings.region",
                    "required when recordings.type is s3 (such as us-east-1)",
                )
            })?;
            if region.is_empty()
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(Invalid::new(
                    "recordings.region",
                    "expected a region name such as us-east-1",
                ));
            }
            if let Some(endpoint) = &file.endpoint {
                let rest = endpoint
                    .strip_prefix("https://")
                    .or_else(|| endpoint.strip_prefix("http://"));
                let ok = rest.is_some_and(|r| {
                    let r = r.trim_end_matches('/');
                    !r.is_empty() && !r.contains(['/', '?', '@', ' '])
                });
                if !ok {
                    return Err(Invalid::new(
                        "recordings.endpoint",
                        "expected http(s)://HOST[:PORT] with no path, such as https://s3.example.com",
                    ));
                }
            }
            let prefix = file.prefix.unwrap_or_default();
            if prefix.starts_with('/') || prefix.contains("..") {
                return Err(Invalid::new(
                    "recordings.prefix",
                    "expected a relative key prefix such as recordings/",
                ));
            }
            Ok(RecordingsConfig::S3(S3Config {
                bucket,
                endpoint: file.endpoint,
                region,
                path_style: file.path_style.unwrap_or(false),
                credentials_file: file.credentials_file,
                prefix,
            }))
        }
        other => Err(Invalid::new(
            "recordings.type",
            format!("unknown recordings storage {other:?} (expected file or s3)"),
        )),
    }
}

fn validate_storage(file: Option<FileStorage>) -> Result<StorageConfig, Invalid> {
    let Some(file) = file else {
        return Ok(StorageConfig::Sqlite);
    };
    match file.kind.as_deref() {
        None | Some("sqlite") => {
            if file.conn_string.is_some() {
                return Err(Invalid::new(
                    "storage.conn_string",
                    "only for type: postgres (sqlite keeps jaunt.db in data_dir)",
                ));
            }
            Ok(StorageConfig::Sqlite)
        }
        Some("postgres") => {
            let text = file.conn_string.ok_or_else(|| {
                Invalid::new(
                    "storage.conn_string",
                    "required for type: postgres, such as \
                     postgres://jaunt@db.example.com:5432/jaunt?sslmode=verify-full",
                )
            })?;
            let conn_string = crate::pgconn::parse(&text)
                .map_err(|why| Invalid::new("storage.conn_string", why))?;
            Ok(StorageConfig::Postgres { conn_string })
        }
        Some(other) => Err(Invalid::new(
            "storage.type",
            format!("unknown storage type {other:?} (expected sqlite or postgres)"),
        )),
    }
}

fn validate_control(file: FileControl, cluster_name: String) -> Result<ControlConfig, Invalid> {
    let user_cert_ttl = file.user_cert_ttl.unwrap_or(DEFAULT_USER_CERT_TTL);
    non_zero(user_cert_ttl, "control.user_cert_ttl")?;
    let host_cert_ttl = file.host_cert_ttl.unwrap_or(DEFAULT_HOST_CERT_TTL);
    non_zero(host_cert_ttl, "control.host_cert_ttl")?;
    Ok(ControlConfig {
        cluster_name,
        listen_addr: file
            .listen_addr
            .unwrap_or_else(|| default_addr(DEFAULT_CONTROL_LISTEN_ADDR, 3025)),
        second_factor: file.second_factor.unwrap_or(SecondFactor::Otp),
        user_cert_ttl,
        host_cert_ttl,
    })
}

fn validate_engine(file: FileEngine, runs_control: bool) -> Result<EngineConfig, Invalid> {
    let public_addr = file.public_addr.ok_or_else(|| {
        Invalid::new(
            "engine.public_addr",
            "required: the host:port users and agents dial, such as proxy.example.com:443",
        )
    })?;
    // Port 0 in public_addr means "advertise whatever port the listener gets", which only makes
    // sense when the listener binds port 0 too (tests, throwaway clusters).
    let listen_port_zero = file.listen_addr.as_ref().is_some_and(|a| a.port == 0);
    if !listen_port_zero {
        dialable(&public_addr, "engine.public_addr")?;
    }
    let control_addr = match file.control_addr {
        Some(addr) => {
            dialable(&addr, "engine.control_addr")?;
            Some(addr)
        }
        None if runs_control => None,
        None => {
            return Err(Invalid::new(
                "engine.control_addr",
                "required when this host does not run control: where the engine reaches \
                 control, such as control.example.com:3025",
            ))
        }
    };
    let io_memory_bytes = file
        .io_memory
        .map_or(DEFAULT_IO_MEMORY_BYTES, |size| size.0);
    if io_memory_bytes > IO_MEMORY_BYTES_MAX {
        return Err(Invalid::new(
            "engine.io_memory",
            format!("at most {} per shard", ByteSize(IO_MEMORY_BYTES_MAX)),
        ));
    }
    let handshake_timeout = file.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
    non_zero(handshake_timeout, "engine.handshake_timeout")?;
    let idle_timeout = file.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    non_zero(idle_timeout, "engine.idle_timeout")?;
    let max_connections_per_shard = file
        .max_connections_per_shard
        .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_SHARD);
    one_to(
        max_connections_per_shard,
        MAX_CONNECTIONS_PER_SHARD_MAX,
        "engine.max_connections_per_shard",
    )?;
    let max_handshakes_per_shard = file
        .max_handshakes_per_shard
        .unwrap_or(DEFAULT_MAX_HANDSHAKES_PER_SHARD);
    one_to(
        max_handshakes_per_shard,
        MAX_HANDSHAKES_PER_SHARD_MAX,
        "engine.max_handshakes_per_shard",
    )?;
    let tls = match file.tls {
        None
        | Some(FileTls {
            cert_file: None,
            key_file: None,
        }) => None,
        Some(FileTls {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
        }) => Some(TlsFiles {
            cert_file,
            key_file,
        }),
        Some(FileTls {
            cert_file: Some(_),
            key_file: None,
        }) => {
            return Err(Invalid::new(
                "engine.tls.key_file",
                "required with cert_file (set both or neither)",
            ))
        }
        Some(FileTls {
            cert_file: None,
            key_file: Some(_),
        }) => {
            return Err(Invalid::new(
                "engine.tls.cert_file",
                "required with key_file (set both or neither)",
            ))
        }
    };
    Ok(EngineConfig {
        public_addr,
        listen_addr: file
            .listen_addr
            .unwrap_or_else(|| default_addr(DEFAULT_ENGINE_LISTEN_ADDR, 3080)),
        shards: file.shards.unwrap_or_default(),
        io_memory_bytes,
        diag_addr: file
            .diag_addr
            .unwrap_or_else(|| default_addr(DEFAULT_DIAG_ADDR, DEFAULT_DIAG_PORT)),
        handshake_timeout,
        idle_timeout,
        max_connections_per_shard,
        max_handshakes_per_shard,
        tls,
        control_addr,
    })
}

fn validate_audit(file: FileAudit) -> Result<AuditConfig, Invalid> {
    let queue_capacity = file.queue_capacity.unwrap_or(DEFAULT_AUDIT_QUEUE_CAPACITY);
    one_to(
        queue_capacity,
        AUDIT_QUEUE_CAPACITY_MAX,
        "audit.queue_capacity",
    )?;
    let file_sink = match file.file {
        None => None,
        Some(sink) => {
            let path = sink.path.ok_or_else(|| {
                Invalid::new(
                    "audit.file.path",
                    "required: where to write JSON-lines audit events",
                )
            })?;
            let max_size_bytes = sink
                .max_size
                .map_or(DEFAULT_AUDIT_FILE_MAX_SIZE_BYTES, |s| s.0);
            if max_size_bytes == 0 {
                return Err(Invalid::new(
                    "audit.file.max_size",
                    "must be more than 0 bytes",
                ));
            }
            let max_files = sink.max_files.unwrap_or(DEFAULT_AUDIT_FILE_MAX_FILES);
            one_to(max_files, AUDIT_FILE_MAX_FILES_MAX, "audit.file.max_files")?;
            Some(AuditFileConfig {
                path,
                max_size_bytes,
                max_files,
            })
        }
    };
    let retention = file.retention.unwrap_or(DEFAULT_AUDIT_RETENTION);
    non_zero(retention, "audit.retention")?;
    Ok(AuditConfig {
        on_overflow: file.on_overflow.unwrap_or(AuditOverflow::Reject),
        queue_capacity,
        file: file_sink,
        retention,
    })
}

fn validate_agent(
    file: FileAgent,
    hostname: fn() -> Option<String>,
) -> Result<AgentConfig, Invalid> {
    let proxy_addr = file.proxy_addr.ok_or_else(|| {
        Invalid::new(
            "agent.proxy_addr",
            "required: the engine's public address, such as proxy.example.com:443",
        )
    })?;
    dialable(&proxy_addr, "agent.proxy_addr")?;
    let token = match (file.token, file.token_file) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                "agent.token_file",
                "set token or token_file, not both",
            ))
        }
        (Some(token), None) if token.trim().is_empty() => {
            return Err(Invalid::new("agent.token", "must not be empty"))
        }
        (Some(token), None) => Some(TokenSource::Value(token)),
        (None, Some(path)) if path.as_os_str().is_empty() => {
            return Err(Invalid::new("agent.token_file", "must not be empty"))
        }
        (None, Some(path)) => Some(TokenSource::File(path)),
        (None, None) => None,
    };
    let name = match file.name {
        Some(name) => {
            validate_name(&name).map_err(|why| Invalid::new("agent.name", why))?;
            name
        }
        None => {
            let name = hostname().ok_or_else(|| {
                Invalid::new(
                    "agent.name",
                    "not set and the hostname could not be read: set agent.name",
                )
            })?;
            validate_name(&name).map_err(|why| {
                Invalid::new(
                    "agent.name",
                    format!("not set, and the hostname is not usable ({why})"),
                )
            })?;
            name
        }
    };
    validate_labels(&file.labels, "agent.labels")?;
    let services = validate_services(file.services)?;
    Ok(AgentConfig {
        proxy_addr,
        token,
        ca_pin: file.ca_pin,
        name,
        labels: file.labels,
        services,
        metrics_addr: file.metrics_addr,
        cpu_placement: file.cpu_placement,
    })
}

fn validate_services(file: FileServices) -> Result<AgentServices, Invalid> {
    let ssh = match file.ssh {
        Some(ssh) => {
            validate_labels(&ssh.labels, "agent.services.ssh.labels")?;
            let addr = ssh
                .addr
                .unwrap_or_else(|| default_addr(DEFAULT_SSH_ADDR, 22));
            dialable(&addr, "agent.services.ssh.addr")?;
            Some(SshService {
                addr,
                labels: ssh.labels,
            })
        }
        None => None,
    };
    let mut apps = Vec::with_capacity(file.apps.len());
    let mut seen = BTreeSet::new();
    for (index, app) in file.apps.into_iter().enumerate() {
        let at = format!("agent.services.apps[{index}]");
        validate_dns_label(&app.name).map_err(|why| {
            Invalid::new(
                format!("{at}.name"),
                format!(
                    "{why} (app names are DNS labels: the app is reached at <name>.<public host>)"
                ),
            )
        })?;
        if !seen.insert(app.name.clone()) {
            return Err(Invalid::new(
                format!("{at}.name"),
                format!("duplicate app name {:?}", app.name),
            ));
        }
        let (protocol, addr) =
            parse_app_uri(&app.uri).map_err(|why| Invalid::new(format!("{at}.uri"), why))?;
        validate_labels(&app.labels, &format!("{at}.labels"))?;
        apps.push(AppService {
            name: app.name,
            uri: app.uri,
            protocol,
            addr,
            labels: app.labels,
        });
    }
    let mut dbs = Vec::with_capacity(file.dbs.len());
    let mut seen = BTreeSet::new();
    for (index, db) in file.dbs.into_iter().enumerate() {
        let at = format!("agent.services.dbs[{index}]");
        validate_name(&db.name).map_err(|why| Invalid::new(format!("{at}.name"), why))?;
        if !seen.insert(db.name.clone()) {
            return Err(Invalid::new(
                format!("{at}.name"),
                format!("duplicate db name {:?}", db.name),
            ));
        }
        let (protocol, addr) =
            parse_db_uri(&db.uri).map_err(|why| Invalid::new(format!("{at}.uri"), why))?;
        validate_labels(&db.labels, &format!("{at}.labels"))?;
        dbs.push(DbService {
            name: db.name,
            uri: db.uri,
            protocol,
            addr,
            labels: db.labels,
        });
    }
    Ok(AgentServices { ssh, apps, dbs })
}

fn parse_app_uri(uri: &str) -> Result<(AppProtocol, HostPort), String> {
    const EXPECTED: &str = "expected a URI starting with http://, https:// or tcp://";
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| EXPECTED.to_string())?;
    let protocol = match scheme {
        "http" => AppProtocol::Http,
        "https" => AppProtocol::Https,
        "tcp" => AppProtocol::Tcp,
        _ => return Err(format!("{EXPECTED} (found {scheme}://)")),
    };
    let (authority, path) = split_authority(rest);
    if protocol == AppProtocol::Tcp && !path.is_empty() {
        return Err("a tcp:// URI has no path: write tcp://host:port".to_string());
    }
    let addr = parse_authority(authority, protocol.default_port())
        .map_err(|why| format!("expected a URI such as http://127.0.0.1:3000 ({why})"))?;
    Ok((protocol, addr))
}

fn parse_db_uri(uri: &str) -> Result<(DbProtocol, HostPort), String> {
    const EXPECTED: &str = "expected a URI starting with postgres:// or mysql://";
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| EXPECTED.to_string())?;
    let (protocol, port, example) = match scheme {
        "postgres" | "postgresql" => (DbProtocol::Postgres, 5432, "postgres://127.0.0.1:5432"),
        "mysql" | "mariadb" => (DbProtocol::Mysql, 3306, "mysql://127.0.0.1:3306"),
        _ => return Err(format!("{EXPECTED} (found {scheme}://)")),
    };
    let (authority, _database) = split_authority(rest);
    let addr = parse_authority(authority, Some(port))
        .map_err(|why| format!("expected a URI such as {example} ({why})"))?;
    Ok((protocol, addr))
}

/// `host:port/path?query` → (`host:port`, `/path?query`).
fn split_authority(rest: &str) -> (&str, &str) {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.split_at(end)
}

fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<HostPort, AddrError> {
    if authority.contains('@') {
        return Err(AddrError::BadHost(authority.to_string()));
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    };
    match (has_port, default_port) {
        (true, _) => HostPort::parse(authority),
        (false, Some(port)) => {
            let host = authority.trim_start_matches('[').trim_end_matches(']');
            if authority.starts_with('[') {
                host.parse::<Ipv6Addr>()
                    .map_err(|_| AddrError::BadHost(host.to_string()))?;
            } else {
                validate_host(host)?;
            }
            Ok(HostPort {
                host: host.to_string(),
                port,
            })
        }
        (false, None) => Err(AddrError::MissingPort),
    }
}

fn default_addr(text: &str, port: u16) -> HostPort {
    HostPort::parse(text).unwrap_or(HostPort {
        host: "127.0.0.1".to_string(),
        port,
    })
}

fn dialable(addr: &HostPort, path: &str) -> Result<(), Invalid> {
    if addr.port == 0 {
        return Err(Invalid::new(
            path,
            "port 0 cannot be dialed: give the real port",
        ));
    }
    Ok(())
}

/// A count that must be from 1 to `max`; the error names the key and the range.
fn one_to<T>(value: T, max: T, path: &str) -> Result<(), Invalid>
where
    T: PartialOrd + From<u8> + std::fmt::Display,
{
    if value < T::from(1) || value > max {
        return Err(Invalid::new(
            path,
            format!("expected a number from 1 to {max}"),
        ));
    }
    Ok(())
}

fn non_zero(duration: Duration, path: &str) -> Result<(), Invalid> {
    if duration.is_zero() {
        return Err(Invalid::new(path, "must be longer than 0s"));
    }
    Ok(())
}

fn parse_port(port: &str) -> Result<u16, AddrError> {
    if port.is_empty() {
        return Err(AddrError::MissingPort);
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError::BadPort(port.to_string()));
    }
    port.parse()
        .map_err(|_| AddrError::BadPort(port.to_string()))
}

fn validate_host(host: &str) -> Result<(), AddrError> {
    if host.is_empty() {
        return Err(AddrError::MissingHost);
    }
    let ok = host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(AddrError::BadHost(host.to_string()))
    }
}

fn validate_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_string());
    }
    if name.len() > 253 {
        return Err("longer than 253 characters".to_string());
    }
    for label in name.split('.') {
        validate_dns_label(&label.to_ascii_lowercase())?;
    }
    Ok(())
}

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
fn validate_dns_label(label: &str) -> Result<(), String> {
    let valid = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{label:?} is not a DNS label (1 to 63 lowercase letters, digits and '-', \
             not starting or ending with '-')"
        ))
    }
}

fn validate_labels(labels: &BTreeMap<String, String>, path: &str) -> Result<(), Invalid> {
    for key in labels.keys() {
        let valid = !key.is_empty()
            && key.len() <= 253
            && key.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b':')
            });
        if !valid {
            return Err(Invalid::new(
                yaml::join_path(path, key),
                "label keys are letters, digits and . - _ / : (at most 253)",
            ));
        }
    }
    Ok(())
}

fn read_text(path: &Path, file_name: &str) -> Result<String, ConfigError> {
    let file = std::fs::File::open(path)
        .map_err(|error| ConfigError::file(file_name, format!("cannot open: {error}")))?;
    let mut bytes = Vec::new();
    file.take(CONFIG_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| ConfigError::file(file_name, format!("cannot read: {error}")))?;
    if bytes.len() as u64 > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::file(
            file_name,
            format!(
                "larger than {}: not a config file",
                ByteSize(CONFIG_FILE_BYTES_MAX)
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|error| {
        ConfigError::file(
            file_name,
            format!(
                "not UTF-8 text (at byte {})",
                error.utf8_error().valid_up_to()
            ),
        )
    })
}

/// The kernel's hostname (reading a file, like the rest of this crate's I/O).
fn system_hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            let name = std::fs::read_to_string(path).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn node1() -> Option<String> {
        Some("node1".to_string())
    }

    fn no_hostname() -> Option<String> {
        None
    }

    fn config(text: &str) -> Config {
        parse_with_hostname("jaunt.yaml", text, node1).unwrap()
    }

    fn error(text: &str) -> String {
        parse_with_hostname("jaunt.yaml", text, node1)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn storage_section_selects_the_backend() {
        let base =
            "cluster_name: example.com\ncontrol:\nengine:\n  public_addr: p.example.com:443\n";
        assert_eq!(config(base).storage, StorageConfig::Sqlite);
        let pg = config(&format!(
            "{base}storage:\n  type: postgres\n  conn_string: postgres://jaunt:SECRET@db.example.com:5432/jaunt?sslmode=verify-full\n"
        ));
        let StorageConfig::Postgres { conn_string } = &pg.storage else {
            panic!("expected postgres: {pg:?}");
        };
        assert_eq!(conn_string.get("host"), Some("db.example.com"));
        assert!(!format!("{pg:?}").contains("SECRET"));
        assert_eq!(
            error(&format!("{base}storage:\n  type: etcd\n")),
            "jaunt.yaml:6:3: storage.type: unknown storage type \"etcd\" (expected sqlite or postgres)"
        );
        let e = error(&format!("{base}storage:\n  type: postgres\n"));
        assert!(
            e.starts_with("jaunt.yaml:5:") && e.contains("storage.conn_string: required"),
            "{e}"
        );
        let e = error(&format!(
            "{base}storage:\n  type: postgres\n  conn_string: postgres://u:SECRET@h?sslmode=sure\n"
        ));
        assert!(
            e.starts_with("jaunt.yaml:7:") && e.contains("sslmode") && !e.contains("SECRET"),
            "{e}"
        );
    }

    #[test]
    fn single_host_defaults() {
        let config = config(
            "cluster_name: example.com\ncontrol:\nengine:\n  public_addr: proxy.example.com:443\n",
        );
        assert_eq!(config.cluster_name.as_deref(), Some("example.com"));
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.log.level, LogLevel::Info);
        let control = config.control.unwrap();
        assert_eq!(control.cluster_name, "example.com");
        assert_eq!(control.listen_addr.to_string(), DEFAULT_CONTROL_LISTEN_ADDR);
        assert_eq!(control.second_factor, SecondFactor::Otp);
        assert_eq!(control.user_cert_ttl, Duration::from_hours(12));
        assert_eq!(control.host_cert_ttl, Duration::from_hours(720));
        let engine = config.engine.unwrap();
        assert_eq!(
            engine.public_addr,
            HostPort {
                host: "proxy.example.com".into(),
                port: 443
            }
        );
        assert_eq!(engine.listen_addr.to_string(), DEFAULT_ENGINE_LISTEN_ADDR);
        assert_eq!(engine.shards, Shards::Auto);
        assert_eq!(engine.io_memory_bytes, 65_536);
        assert_eq!(engine.diag_addr.to_string(), DEFAULT_DIAG_ADDR);
        assert_eq!(engine.handshake_timeout, Duration::from_secs(10));
        assert_eq!(engine.idle_timeout, Duration::from_hours(1));
        assert_eq!(engine.max_connections_per_shard, 20_000);
        assert_eq!(
            engine.max_handshakes_per_shard,
            DEFAULT_MAX_HANDSHAKES_PER_SHARD
        );
        assert_eq!(engine.tls, None);
        assert_eq!(engine.control_addr, None);
        assert_eq!(config.audit, AuditConfig::default());
        assert_eq!(config.agent, None);
    }

    #[test]
    fn every_engine_setting_is_read() {
        let engine = config(
            "engine:
  public_addr: proxy.example.com:443
  listen_addr: 0.0.0.0:443
  shards: 4
  io_memory: 1MiB
  diag_addr: '[::1]:3000'
  handshake_timeout: 5s
  idle_timeout: 30m
  max_connections_per_shard: 1000
  max_handshakes_per_shard: 64
  tls: { cert_file: /etc/jaunt/tls.crt, key_file: /etc/jaunt/tls.key }
  control_addr: control.internal:3025
",
        )
        .engine
        .unwrap();
        assert_eq!(engine.listen_addr.port, 443);
        assert_eq!(engine.shards, Shards::Count(NonZeroUsize::new(4).unwrap()));
        assert_eq!(engine.io_memory_bytes, MIB);
        assert_eq!(
            engine.diag_addr,
            HostPort {
                host: "::1".into(),
                port: 3000
            }
        );
        assert_eq!(engine.diag_addr.to_string(), "[::1]:3000");
        assert_eq!(engine.handshake_timeout, Duration::from_secs(5));
        assert_eq!(engine.idle_timeout, Duration::from_mins(30));
        assert_eq!(engine.max_connections_per_shard, 1000);
        assert_eq!(engine.max_handshakes_per_shard, 64);
        assert_eq!(
            engine.tls.unwrap().key_file,
            PathBuf::from("/etc/jaunt/tls.key")
        );
        assert_eq!(
            engine.control_addr.unwrap().to_string(),
            "control.internal:3025"
        );
    }

    #[test]
    fn agent_services_are_validated_and_resolved() {
        let agent = config(
            "agent:
  proxy_addr: proxy.example.com:443
  token_file: /etc/jaunt/token
  ca_pin: sha256:0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef
  labels: { env: prod, tier: 2 }
  services:
    ssh:
    apps:
      - { name: grafana, uri: 'http://127.0.0.1:3000/dash' }
      - { name: web, uri: 'https://intranet.local' }
      - { name: redis, uri: 'tcp://10.0.0.5:6379', labels: { team: cache } }
    dbs: [ { name: pg1, uri: 'postgres://127.0.0.1/app' } ]
",
        )
        .agent
        .unwrap();
        assert_eq!(agent.name, "node1");
        assert_eq!(
            agent.token,
            Some(TokenSource::File("/etc/jaunt/token".into()))
        );
        assert_eq!(
            agent.ca_pin.unwrap().to_string(),
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
        assert_eq!(agent.labels.get("tier").map(String::as_str), Some("2"));
        assert_eq!(
            agent.services.ssh.unwrap().addr.to_string(),
            DEFAULT_SSH_ADDR
        );
        let apps = &agent.services.apps;
        assert_eq!(
            (apps[0].protocol, apps[0].addr.to_string()),
            (AppProtocol::Http, "127.0.0.1:3000".into())
        );
        assert_eq!(
            (apps[1].protocol, apps[1].addr.to_string()),
            (AppProtocol::Https, "intranet.local:443".into())
        );
        assert_eq!(
            (apps[2].protocol, apps[2].addr.port),
            (AppProtocol::Tcp, 6379)
        );
        assert_eq!(agent.services.dbs[0].addr.to_string(), "127.0.0.1:5432");
    }

    #[test]
    fn recordings_storage_is_validated_with_key_and_line() {
        let base = "cluster_name: a.example\ncontrol: {}\nrecordings:\n";
        let ok = parse(
            "jaunt.yaml",
            &format!(
                "{base}  type: s3\n  bucket: jaunt-rec\n  region: us-east-1\n  \
                 endpoint: http://127.0.0.1:9000\n  path_style: true\n  prefix: rec/\n"
            ),
        )
        .unwrap();
        let RecordingsConfig::S3(s3) = ok.recordings else {
            panic!("expected s3")
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.region.as_str(), s3.path_style),
            ("jaunt-rec", "us-east-1", true)
        );
        assert_eq!(
            parse("jaunt.yaml", "cluster_name: a.example\ncontrol: {}\n")
                .unwrap()
                .recordings,
            RecordingsConfig::File
        );
        assert_eq!(
            error(&format!("{base}  type: s3\n  region: us-east-1\n")),
            "jaunt.yaml:3:1: recordings.bucket: required when recordings.type is s3"
        );
        assert_eq!(
            error(&format!("{base}  type: s3\n  bucket: b_B\n  region: r\n")),
            "jaunt.yaml:5:3: recordings.bucket: expected an S3 bucket name: 3 to 63 \
             characters of a-z, 0-9, '.' and '-'"
        );
        assert_eq!(
            error(&format!(
                "{base}  type: s3\n  bucket: bkt\n  region: r\n  endpoint: s3.example.com\n"
            )),
            "jaunt.yaml:7:3: recordings.endpoint: expected http(s)://HOST[:PORT] with no \
             path, such as https://s3.example.com"
        );
        assert_eq!(
            error(&format!("{base}  type: tape\n")),
            "jaunt.yaml:4:3: recordings.type: unknown recordings storage \"tape\" (expected file or s3)"
        );
        assert!(error(&format!("{base}  bukket: x\n")).starts_with("jaunt.yaml:4:3: "));
    }

    #[test]
    fn errors_name_key_and_line() {
        assert_eq!(
            error("engine:\n  public_addr: p:443\n  control_addr: c:1\n  max_handshakes_per_shard: 0\n"),
            format!(
                "jaunt.yaml:4:3: engine.max_handshakes_per_shard: expected a number from 1 to {MAX_HANDSHAKES_PER_SHARD_MAX}"
            )
        );
        assert_eq!(
            error("engine:\n  public_addr: p:443\n  control_addr: c:1\n  shards: lots\n"),
            "jaunt.yaml:4:11: engine.shards: expected a number or \"auto\""
        );
        assert_eq!(
            error("engine:\n  public_addr: p:443\n  control_addr: c:1\n  shards: 0\n"),
            "jaunt.yaml:4:11: engine.shards: expected a number >= 1 or \"auto\""
        );
        assert_eq!(
            error("engine:\n  public_addr: p:443\n  control_addr: c:1\n  shards: [1]\n"),
            "jaunt.yaml:4:11: engine.shards: expected a number or \"auto\", found a list"
        );
        assert_eq!(
            error("engine:\n  public_addr: p:443\n  control_addr: c:1\n  io_memory: 64KB\n"),
            "jaunt.yaml:4:14: engine.io_memory: expected a size in bytes such as 65536, 64KiB or 10MiB"
        );
        assert_eq!(
            error("cluster_name: x\ncontrol:\n  user_cert_ttl: 12\n"),
            "jaunt.yaml:3:18: control.user_cert_ttl: expected a duration such as 30m or 12h \
             (add a unit to 12, such as 12s)"
        );
        assert_eq!(
            error("engine:\n  public_addr: https://proxy\n"),
            "jaunt.yaml:2:16: engine.public_addr: expected host:port such as \
             proxy.example.com:443 (leave out the scheme)"
        );
        assert_eq!(
            error("engine:\n  public_addr: proxy\n"),
            "jaunt.yaml:2:16: engine.public_addr: expected host:port such as \
             proxy.example.com:443 (the port is missing)"
        );
        assert_eq!(
            error("log: { level: loud }\ncontrol: {}\ncluster_name: a\n"),
            "jaunt.yaml:1:15: log.level: unknown value \"loud\" (expected one of: error, warn, info, debug, trace)"
        );
    }

    #[test]
    fn validation_errors_are_located() {
        assert_eq!(
            error("version: v2\n"),
            "jaunt.yaml:1:1: version: unsupported version \"v2\" (expected v1)"
        );
        assert_eq!(
            error("# nothing\ndata_dir: /tmp\n"),
            "jaunt.yaml:2:1: nothing to run: add a control, engine or agent section"
        );
        assert_eq!(
            error("control:\n  second_factor: off\n"),
            "jaunt.yaml:1:1: cluster_name: required when this host runs control \
             (a DNS-style name such as example.com)"
        );
        assert_eq!(
            error("cluster_name: x\ncontrol:\nengine:\n  listen_addr: 0.0.0.0:443\n"),
            "jaunt.yaml:3:1: engine.public_addr: required: the host:port users and agents dial, \
             such as proxy.example.com:443"
        );
        assert_eq!(
            error("engine:\n  public_addr: p:443\n"),
            "jaunt.yaml:1:1: engine.control_addr: required when this host does not run control: \
             where the engine reaches control, such as control.example.com:3025"
        );
        assert_eq!(
            error("cluster_name: x\ncontrol:\nengine:\n  public_addr: p:0\n"),
            "jaunt.yaml:4:3: engine.public_addr: port 0 cannot be dialed: give the real port"
        );
        assert!(parse(
            "jaunt.yaml",
            "cluster_name: x\ncontrol:\nengine:\n  public_addr: p:0\n  listen_addr: 127.0.0.1:0\n"
        )
        .is_ok());
        assert_eq!(
            error("cluster_name: x\ncontrol:\nengine:\n  public_addr: p:1\n  tls:\n    cert_file: /c\n"),
            "jaunt.yaml:5:3: engine.tls.key_file: required with cert_file (set both or neither)"
        );
        assert_eq!(
            error("agent:\n  proxy_addr: p:443\n  token: abc\n  token_file: /t\n"),
            "jaunt.yaml:4:3: agent.token_file: set token or token_file, not both"
        );
        assert_eq!(
            error("agent:\n  proxy_addr: p:443\n  services:\n    apps:\n      - {name: Bad_Name, uri: 'http://x'}\n"),
            "jaunt.yaml:5:10: agent.services.apps[0].name: \"Bad_Name\" is not a DNS label \
             (1 to 63 lowercase letters, digits and '-', not starting or ending with '-') \
             (app names are DNS labels: the app is reached at <name>.<public host>)"
        );
        assert_eq!(
            error("agent:\n  proxy_addr: p:443\n  services:\n    dbs:\n      - name: pg\n        uri: redis://x\n"),
            "jaunt.yaml:6:9: agent.services.dbs[0].uri: expected a URI starting with postgres:// or mysql:// (found redis://)"
        );
        assert_eq!(
            error("audit:\n  file: { max_files: 3 }\nagent: { proxy_addr: 'p:1' }\n"),
            "jaunt.yaml:2:3: audit.file.path: required: where to write JSON-lines audit events"
        );
    }

    #[test]
    fn audit_file_settings_parse_and_bad_values_name_the_key() {
        let base = "agent: { proxy_addr: 'p:1' }\n";
        let c = config(&format!(
            "{base}audit:\n  file: {{ path: /var/log/jaunt/audit.jsonl, max_size: 10MiB, max_files: 3 }}\n"
        ));
        assert_eq!(
            c.audit.file,
            Some(AuditFileConfig {
                path: PathBuf::from("/var/log/jaunt/audit.jsonl"),
                max_size_bytes: 10 * MIB,
                max_files: 3,
            })
        );
        let c = config(&format!("{base}audit:\n  file:\n    path: a.jsonl\n"));
        let file = c.audit.file.unwrap();
        assert_eq!(
            (file.max_size_bytes, file.max_files),
            (
                DEFAULT_AUDIT_FILE_MAX_SIZE_BYTES,
                DEFAULT_AUDIT_FILE_MAX_FILES
            )
        );
        assert_eq!(config(base).audit.file, None);
        let bad = |file: &str| error(&format!("{base}audit:\n  file:\n    path: a.jsonl\n{file}"));
        assert_eq!(
            bad("    max_size: lots\n"),
            "jaunt.yaml:5:15: audit.file.max_size: expected a size in bytes such as 65536, 64KiB or 10MiB"
        );
        assert_eq!(
            bad("    max_size: 100MB\n"),
            "jaunt.yaml:5:15: audit.file.max_size: expected a size in bytes such as 65536, 64KiB or 10MiB"
        );
        assert_eq!(
            bad("    max_size: 0\n"),
            "jaunt.yaml:5:5: audit.file.max_size: must be more than 0 bytes"
        );
        assert_eq!(
            bad("    max_files: 0\n"),
            "jaunt.yaml:5:5: audit.file.max_files: expected a number from 1 to 1000"
        );
        assert_eq!(
            bad("    max_files: 1001\n"),
            "jaunt.yaml:5:5: audit.file.max_files: expected a number from 1 to 1000"
        );
        assert_eq!(
            bad("    max_files: -1\n"),
            "jaunt.yaml:5:16: audit.file.max_files: expected a whole number, found -1"
        );
        assert_eq!(
            bad("    max_sise: 1\n"),
            "jaunt.yaml:5:5: audit.file.max_sise: unknown key (expected one of: path, max_size, max_files)"
        );
    }

    #[test]
    fn audit_retention_parses_and_bad_values_name_the_key() {
        let base = "agent: { proxy_addr: 'p:1' }\n";
        assert_eq!(config(base).audit.retention, DEFAULT_AUDIT_RETENTION);
        assert_eq!(
            config(&format!("{base}audit:\n  retention: 30d\n"))
                .audit
                .retention,
            Duration::from_days(30)
        );
        assert_eq!(
            error(&format!("{base}audit:\n  retention: 0s\n")),
            "jaunt.yaml:3:3: audit.retention: must be longer than 0s"
        );
        assert_eq!(
            error(&format!("{base}audit:\n  retention: forever\n")),
            "jaunt.yaml:3:14: audit.retention: expected a duration such as 30m or 12h"
        );
        assert_eq!(
            error(&format!("{base}audit:\n  retension: 30d\n")),
            "jaunt.yaml:3:3: audit.retension: unknown key (expected one of: on_overflow, queue_capacity, file, retention)"
        );
    }

    #[test]
    fn agent_cpu_placement_defaults_to_off_and_names_a_bad_value() {
        let agent = |text: &str| config(text).agent.unwrap().cpu_placement;
        assert_eq!(agent("agent: { proxy_addr: 'p:443' }\n"), CpuPlacement::Off);
        assert_eq!(
            agent("agent:\n  proxy_addr: p:443\n  cpu_placement: off\n"),
            CpuPlacement::Off
        );
        assert_eq!(
            agent("agent:\n  proxy_addr: p:443\n  cpu_placement: follow-engine\n"),
            CpuPlacement::FollowEngine
        );
        let bad = error("agent:\n  proxy_addr: p:443\n  cpu_placement: pinned\n");
        assert!(
            bad.starts_with("jaunt.yaml:3:") && bad.contains("agent.cpu_placement"),
            "{bad}"
        );
        assert!(
            bad.contains("follow-engine") && bad.contains("off"),
            "{bad}"
        );
    }

    #[test]
    fn agent_name_falls_back_to_the_hostname() {
        let text = "agent: { proxy_addr: 'p:443' }\n";
        let error = parse_with_hostname("jaunt.yaml", text, no_hostname).unwrap_err();
        assert_eq!(
            error.to_string(),
            "jaunt.yaml:1:1: agent.name: not set and the hostname could not be read: set agent.name"
        );
        let named = parse_with_hostname(
            "jaunt.yaml",
            "agent: { proxy_addr: 'p:443', name: n2 }\n",
            no_hostname,
        );
        assert_eq!(named.unwrap().agent.unwrap().name, "n2");
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            HostPort::parse("a.example.com:443").unwrap().to_string(),
            "a.example.com:443"
        );
        assert_eq!(
            HostPort::parse("[2001:db8::1]:22").unwrap().host,
            "2001:db8::1"
        );
        assert_eq!(HostPort::parse("localhost:0").unwrap().port, 0);
        assert_eq!(HostPort::parse("a"), Err(AddrError::MissingPort));
        assert_eq!(HostPort::parse("a:"), Err(AddrError::MissingPort));
        assert_eq!(HostPort::parse(":443"), Err(AddrError::MissingHost));
        assert_eq!(
            HostPort::parse("a:http"),
            Err(AddrError::BadPort("http".into()))
        );
        assert_eq!(
            HostPort::parse("a:70000"),
            Err(AddrError::BadPort("70000".into()))
        );
        assert_eq!(
            HostPort::parse("a:+1"),
            Err(AddrError::BadPort("+1".into()))
        );
        assert_eq!(HostPort::parse("::1:22"), Err(AddrError::UnbracketedIpv6));
        assert_eq!(
            HostPort::parse("[zz]:22"),
            Err(AddrError::BadHost("zz".into()))
        );
        assert_eq!(
            HostPort::parse("a b:22"),
            Err(AddrError::BadHost("a b".into()))
        );
        assert_eq!(HostPort::parse("tcp://a:1"), Err(AddrError::Scheme));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("65536"), Some(ByteSize(65_536)));
        assert_eq!(ByteSize::parse("64KiB"), Some(ByteSize(65_536)));
        assert_eq!(ByteSize::parse("10 MiB"), Some(ByteSize(10 * MIB)));
        assert_eq!(ByteSize::parse("1gib"), Some(ByteSize(GIB)));
        assert_eq!(ByteSize::parse("64KB"), None);
        assert_eq!(ByteSize::parse("KiB"), None);
        assert_eq!(ByteSize::parse("99999999999999GiB"), None);
        assert_eq!(ByteSize(65_536).to_string(), "64KiB");
        assert_eq!(ByteSize(100 * MIB).to_string(), "100MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(0).to_string(), "0");
    }

    #[test]
    fn shards_resolve() {
        assert_eq!(Shards::Auto.resolve(8).get(), 8);
        assert_eq!(Shards::Auto.resolve(0).get(), 1);
        assert_eq!(
            Shards::Count(NonZeroUsize::new(3).unwrap())
                .resolve(8)
                .get(),
            3
        );
        let parsed: Shards = serde_json::from_str("\"auto\"").unwrap();
        assert_eq!(parsed, Shards::Auto);
        let parsed: Shards = serde_json::from_str("\"2\"").unwrap();
        assert_eq!(parsed.to_string(), "2");
        assert!(serde_json::from_str::<Shards>("2000").is_err());
    }

    #[test]
    fn ca_pins() {
        let hex64 = "ab".repeat(32);
        assert!(CaPin::parse(&format!("sha256:{hex64}")).is_some());
        assert!(CaPin::parse(&hex64).is_none());
        assert!(CaPin::parse(&format!("sha256:{}", &hex64[..62])).is_none());
        assert!(CaPin::parse(&format!("sha256:{}zz", &hex64[..62])).is_none());
        let pin = CaPin::of_spki(b"spki");
        assert_eq!(CaPin::parse(&pin.to_string()), Some(pin));
    }

    #[test]
    fn uris() {
        assert_eq!(
            parse_app_uri("http://[::1]").unwrap().1.to_string(),
            "[::1]:80"
        );
        assert!(parse_app_uri("tcp://host").is_err());
        assert!(parse_app_uri("tcp://host:1/path").is_err());
        assert!(parse_app_uri("ftp://host")
            .unwrap_err()
            .contains("found ftp://"));
        assert!(parse_app_uri("http://user@host").is_err());
        assert_eq!(
            parse_db_uri("postgresql://db.internal:6432/x?sslmode=require")
                .unwrap()
                .1
                .port,
            6432
        );
        let (protocol, addr) = parse_db_uri("mysql://127.0.0.1").unwrap();
        assert_eq!((protocol, addr.port), (DbProtocol::Mysql, 3306));
        let (protocol, addr) = parse_db_uri("mariadb://db.internal:3307/app").unwrap();
        assert_eq!((protocol, addr.port), (DbProtocol::Mysql, 3307));
    }

    #[test]
    fn dev_config() {
        let public = HostPort::parse("localhost:3080").unwrap();
        let dev = Config::dev("/tmp/jaunt-dev", public.clone());
        assert_eq!(dev.cluster_name.as_deref(), Some(DEV_CLUSTER_NAME));
        let control = dev.control.unwrap();
        assert_eq!(control.second_factor, SecondFactor::Off);
        let engine = dev.engine.unwrap();
        assert_eq!(engine.public_addr, public);
        assert_eq!(engine.listen_addr.to_string(), "127.0.0.1:3080");
        assert_eq!(dev.data_dir, PathBuf::from("/tmp/jaunt-dev"));
    }

    #[test]
    fn load_reports_unreadable_files_without_position() {
        let error = load(Path::new("/nonexistent/jaunt.yaml")).unwrap_err();
        assert_eq!(error.line, 0);
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/jaunt.yaml: cannot open:"),
            "{error}"
        );
    }

    #[test]
    fn defaults_parse() {
        for addr in [
            DEFAULT_CONTROL_LISTEN_ADDR,
            DEFAULT_ENGINE_LISTEN_ADDR,
            DEFAULT_DIAG_ADDR,
            DEFAULT_SSH_ADDR,
        ] {
            assert!(HostPort::parse(addr).is_ok(), "{addr}");
        }
    }

    /// Issue 15: the diagnostics port was 3000, Grafana's (the README's own example app), so a
    /// host running Grafana could not start Jaunt with the defaults.
    #[test]
    fn the_default_diag_port_is_no_common_service_port() {
        let diag = HostPort::parse(DEFAULT_DIAG_ADDR).unwrap();
        assert_eq!(diag.port, DEFAULT_DIAG_PORT);
        assert_eq!(diag.host, "127.0.0.1", "diagnostics stay on loopback");
        // Ports dev tools and sidecars commonly take on the same host, and Jaunt's own.
        let common = [
            22, 80, 443, 3000, 3001, 3306, 5000, 5432, 6379, 8000, 8080, 8081, 8443, 8888, 9000,
            9090, 9091, 9093, 9100, 9200, 27017,
        ];
        assert!(!common.contains(&diag.port), "{}", diag.port);
        let public = HostPort::parse(DEFAULT_ENGINE_LISTEN_ADDR).unwrap();
        let control = HostPort::parse(DEFAULT_CONTROL_LISTEN_ADDR).unwrap();
        assert_ne!(diag.port, public.port);
        assert_ne!(diag.port, control.port);
    }
}
