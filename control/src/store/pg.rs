//! A blocking PostgreSQL client for the store: protocol 3.0 over `std::net` (TCP or a unix
//! socket), TLS by rustls (ring), SCRAM-SHA-256 with ring's PBKDF2 and HMAC, the extended query
//! protocol with text parameters and text results. No tokio: the `postgres` crate runs a tokio
//! runtime inside, and control is plain threads (ARCHITECTURE.md says why not libpq).
//!
//! Message framing reuses the agent's sans-IO wire code (`jaunt_agent::postgres::wire`:
//! StartupMessage, SSLRequest, frontend messages); what a client needs beyond it (backend
//! messages, SCRAM, results) is here.
//!
//! Settings follow libpq: the connection string ([`jaunt_config::pgconn`]) first, then the
//! `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGPASSFILE` (and `~/.pgpass`),
//! `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGCONNECT_TIMEOUT` and
//! `PGAPPNAME` environment variables, then libpq's defaults (`sslmode=prefer`, port 5432, the
//! OS user). A password never appears in an error or a log line.
//!
//! Not here: SQL of the store (`postgres.rs`), connection pooling policy beyond a small idle
//! list, GSSAPI, md5 password authentication (refused with a message naming scram-sha-256),
//! SCRAM channel binding, several hosts in one string.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use jaunt_agent::postgres::wire;
use jaunt_config::pgconn::ConnInfo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Largest backend message accepted (a DataRow of the audit log is far smaller).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// How long one query may wait for the server before the connection is given up.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;

/// A client failure. Messages name the server and the user, never the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL settings: {0}")]
    Config(String),
    #[error("cannot reach PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("PostgreSQL at {target} refused the login of user {user:?}: {message}")]
    Login {
        target: String,
        user: String,
        message: String,
    },
    #[error("PostgreSQL: {severity} {code}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("PostgreSQL connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL protocol: {0}")]
    Protocol(String),
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, PgError>;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `allow` and `prefer`: TLS when the server offers it, unverified.
    Prefer,
    /// TLS required; the certificate is checked only when a root certificate file exists (as
    /// libpq does).
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where and how to connect, every default applied.
#[derive(Clone)]
pub struct PgConfig {
    /// A host name or IP, or a directory holding the server's unix socket.
    pub host: String,
    /// Connect to this address instead of resolving `host` (libpq's `hostaddr`).
    pub hostaddr: Option<String>,
    pub port: u16,
    pub user: String,
    password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub application_name: String,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgConfig({})", self.target())
    }
}

impl PgConfig {
    /// Applies the environment (`env`, normally `std::env::var`) and libpq's defaults to a
    /// parsed connection string.
    pub fn resolve(info: &ConnInfo, env: &dyn Fn(&str) -> Option<String>) -> Result<PgConfig> {
        let get = |key: &str, var: &str| -> Option<String> {
            info.get(key)
                .map(str::to_string)
                .or_else(|| env(var))
                .filter(|v| !v.is_empty())
        };
        let home = env("HOME").map(PathBuf::from);
        let host = get("host", "PGHOST").unwrap_or_else(|| "/var/run/postgresql".into());
        let port = match get("port", "PGPORT") {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| PgError::Config(format!("port {p:?} is not a port number")))?,
            None => 5432,
        };
        let user = get("user", "PGUSER")
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .ok_or_else(|| PgError::Config("no user: set one in conn_string or PGUSER".into()))?;
        let dbname = get("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
        let sslmode = match get("sslmode", "PGSSLMODE").as_deref() {
            None | Some("prefer") | Some("allow") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require") => SslMode::Require,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("verify-full") => SslMode::VerifyFull,
            Some(other) => {
                return Err(PgError::Config(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        let default_file = |name: &str| -> Option<PathBuf> {
            let p = home.as_ref()?.join(".postgresql").join(name);
            p.exists().then_some(p)
        };
        let sslrootcert = get("sslrootcert", "PGSSLROOTCERT")
            .map(PathBuf::from)
            .or_else(|| default_file("root.crt"));
        let sslcert = get("sslcert", "PGSSLCERT")
            .map(PathBuf::from)
            .or_else(|| default_file("postgresql.crt"));
        let sslkey = get("sslkey", "PGSSLKEY")
            .map(PathBuf::from)
            .or_else(|| default_file("postgresql.key"));
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => Duration::from_secs(t.parse::<u64>().map_err(|_| {
                PgError::Config(format!("connect_timeout {t:?} is not a number of seconds"))
            })?)
            .max(Duration::from_secs(2)),
            None => Duration::from_secs(10),
        };
        let mut cfg = PgConfig {
            hostaddr: get("hostaddr", "PGHOSTADDR"),
            host,
            port,
            user,
            password: None,
            dbname,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            connect_timeout,
            application_name: get("application_name", "PGAPPNAME")
                .unwrap_or_else(|| "jaunt".into()),
        };
        cfg.password = match get("password", "PGPASSWORD") {
            Some(p) => Some(p),
            None => {
                let passfile = get("passfile", "PGPASSFILE")
                    .map(PathBuf::from)
                    .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
                passfile.and_then(|f| cfg.password_from_file(&f))
            }
        };
        Ok(cfg)
    }

    /// `host:port/dbname` (or the socket path): what errors name.
    pub fn target(&self) -> String {
        if self.is_unix() {
            format!(
                "{}/.s.PGSQL.{} (database {})",
                self.host, self.port, self.dbname
            )
        } else {
            format!("{}:{}/{}", self.host, self.port, self.dbname)
        }
    }

    fn is_unix(&self) -> bool {
        self.hostaddr.is_none() && self.host.starts_with('/')
    }

    /// A password file line `host:port:db:user:password` (`*` matches anything, `\` escapes).
    fn password_from_file(&self, path: &Path) -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let host = if self.is_unix() {
            "localhost"
        } else {
            &self.host
        };
        let port = self.port.to_string();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let fields = split_passfile_line(line);
            if fields.len() != 5 {
                continue;
            }
            let matches = |f: &str, v: &str| f == "*" || f == v;
            if matches(&fields[0], host)
                && matches(&fields[1], &port)
                && matches(&fields[2], &self.dbname)
                && matches(&fields[3], &self.user)
            {
                return Some(fields[4].clone());
            }
        }
        None
    }
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    if let Some(f) = fields.last_mut() {
                        f.push(n);
                    }
                }
            }
            ':' => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A query parameter in text form (`None` is SQL NULL).
pub type Param = Option<String>;

/// Conversions to [`Param`].
pub trait ToParam {
    fn to_param(&self) -> Param;
}

impl ToParam for str {
    fn to_param(&self) -> Param {
        Some(self.to_string())
    }
}
impl ToParam for String {
    fn to_param(&self) -> Param {
        Some(self.clone())
    }
}
impl ToParam for i64 {
    fn to_param(&self) -> Param {
        Some(self.to_string())
    }
}
impl ToParam for u64 {
    fn to_param(&self) -> Param {
        Some(i64::try_from(*self).unwrap_or(i64::MAX).to_string())
    }
}
impl ToParam for usize {
    fn to_param(&self) -> Param {
        Some(i64::try_from(*self).unwrap_or(i64::MAX).to_string())
    }
}
impl ToParam for bool {
    fn to_param(&self) -> Param {
        Some(if *self { "true" } else { "false" }.to_string())
    }
}
impl<T: ToParam + ?Sized> ToParam for &T {
    fn to_param(&self) -> Param {
        (**self).to_param()
    }
}
impl<T: ToParam> ToParam for Option<T> {
    fn to_param(&self) -> Param {
        self.as_ref().and_then(ToParam::to_param)
    }
}

/// One result row: text values by column index.
#[derive(Clone, Debug)]
pub struct Row(Vec<Option<String>>);

impl Row {
    fn col(&self, i: usize) -> Result<&Option<String>> {
        self.0
            .get(i)
            .ok_or_else(|| PgError::Protocol(format!("row has no column {i}")))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.col(i)?.clone())
    }

    pub fn text(&self, i: usize) -> Result<String> {
        self.col(i)?
            .clone()
            .ok_or_else(|| PgError::Protocol(format!("column {i} is NULL")))
    }

    pub fn i64(&self, i: usize) -> Result<i64> {
        let t = self.text(i)?;
        t.parse()
            .map_err(|_| PgError::Protocol(format!("column {i} is not a number: {t:?}")))
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>> {
        match self.col(i)? {
            None => Ok(None),
            Some(_) => self.i64(i).map(Some),
        }
    }

    /// A non-negative integer column (times, counts).
    pub fn u64(&self, i: usize) -> Result<u64> {
        Ok(self.i64(i)?.max(0) as u64)
    }

    pub fn bool(&self, i: usize) -> Result<bool> {
        Ok(self.text(i)? == "t")
    }
}

/// What a statement returned.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// Rows affected (the last number of the command tag; 0 when it has none).
    pub affected: u64,
}

/// One connection. Not shared: the [`Pool`] hands it to one caller at a time.
pub struct Conn {
    stream: Stream,
    /// Set by an I/O or protocol failure: the connection is dropped, not reused.
    broken: bool,
    /// The last ReadyForQuery's transaction status (`I` idle, `T` in a transaction, `E` failed).
    status: u8,
}

impl Conn {
    /// Connects, negotiates TLS as `sslmode` says and logs in.
    pub fn connect(cfg: &PgConfig) -> Result<Conn> {
        let target = cfg.target();
        let connect_err = |message: String| PgError::Connect {
            target: target.clone(),
            message,
        };
        let stream = if cfg.is_unix() {
            let path = Path::new(&cfg.host).join(format!(".s.PGSQL.{}", cfg.port));
            let s = UnixStream::connect(&path).map_err(|e| connect_err(e.to_string()))?;
            s.set_read_timeout(Some(QUERY_TIMEOUT))?;
            s.set_write_timeout(Some(QUERY_TIMEOUT))?;
            Stream::Unix(s)
        } else {
            let host = cfg.hostaddr.as_deref().unwrap_or(&cfg.host);
            let addrs: Vec<_> = (host, cfg.port)
                .to_socket_addrs()
                .map_err(|e| connect_err(format!("cannot resolve {host}: {e}")))?
                .collect();
            let mut last = String::from("no address");
            let mut tcp = None;
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, cfg.connect_timeout) {
                    Ok(s) => {
                        tcp = Some(s);
                        break;
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            let tcp = tcp.ok_or_else(|| connect_err(last))?;
            tcp.set_nodelay(true)?;
            // The login itself must finish within connect_timeout.
            tcp.set_read_timeout(Some(cfg.connect_timeout))?;
            tcp.set_write_timeout(Some(cfg.connect_timeout))?;
            negotiate_tls(cfg, tcp).map_err(|e| match e {
                PgError::Io(io) => connect_err(io.to_string()),
                other => other,
            })?
        };
        let mut conn = Conn {
            stream,
            broken: false,
            status: b'I',
        };
        conn.login(cfg).map_err(|e| match e {
            PgError::Server {
                severity,
                code,
                message,
            } => PgError::Login {
                target: target.clone(),
                user: cfg.user.clone(),
                message: format!("{severity} {code}: {message}"),
            },
            PgError::Io(io) => connect_err(io.to_string()),
            other => other,
        })?;
        conn.set_timeouts(QUERY_TIMEOUT)?;
        Ok(conn)
    }

    fn set_timeouts(&mut self, t: Duration) -> Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
            Stream::Tls(s) => {
                s.sock.set_read_timeout(Some(t))?;
                s.sock.set_write_timeout(Some(t))?;
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
        }
        Ok(())
    }

    fn login(&mut self, cfg: &PgConfig) -> Result<()> {
        let startup = wire::Startup::encode(&[
            ("user", &cfg.user),
            ("database", &cfg.dbname),
            ("application_name", &cfg.application_name),
            ("client_encoding", "UTF8"),
        ]);
        self.send(&startup)?;
        let mut scram: Option<Scram> = None;
        loop {
            let (kind, body) = self.recv()?;
            match kind {
                b'R' => {
                    let code = be_u32(&body, 0)?;
                    let rest = &body[4..];
                    match code {
                        0 => {}
                        3 => {
                            let password = need_password(cfg)?;
                            let mut msg = password.as_bytes().to_vec();
                            msg.push(0);
                            self.send(&wire::message(b'p', &msg))?;
                        }
                        5 => {
                            return Err(PgError::Login {
                                target: cfg.target(),
                                user: cfg.user.clone(),
                                message: "the server asks for md5 password authentication, which \
                                          jaunt does not implement: store the password as \
                                          scram-sha-256 (password_encryption = scram-sha-256, then \
                                          set it again)"
                                    .into(),
                            })
                        }
                        10 => {
                            let mechanisms: Vec<&[u8]> =
                                rest.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                            if !mechanisms.contains(&&b"SCRAM-SHA-256"[..]) {
                                return Err(PgError::Protocol(format!(
                                    "the server offers no SASL mechanism jaunt implements ({})",
                                    mechanisms
                                        .iter()
                                        .map(|m| String::from_utf8_lossy(m).into_owned())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )));
                            }
                            let password = need_password(cfg)?;
                            let s = Scram::new(password, random_nonce()?);
                            let first = s.client_first();
                            let mut msg = b"SCRAM-SHA-256\0".to_vec();
                            msg.extend_from_slice(&(first.len() as u32).to_be_bytes());
                            msg.extend_from_slice(first.as_bytes());
                            self.send(&wire::message(b'p', &msg))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                PgError::Protocol("SASLContinue before SASL started".into())
                            })?;
                            let server_first = std::str::from_utf8(rest)
                                .map_err(|_| PgError::Protocol("SCRAM message not UTF-8".into()))?;
                            let final_msg = s.client_final(server_first)?;
                            self.send(&wire::message(b'p', final_msg.as_bytes()))?;
                        }
                        12 => {
                            let s = scram.as_ref().ok_or_else(|| {
                                PgError::Protocol("SASLFinal before SASL started".into())
                            })?;
                            let server_final = std::str::from_utf8(rest)
                                .map_err(|_| PgError::Protocol("SCRAM message not UTF-8".into()))?;
                            s.verify_server_final(server_final)?;
                        }
                        other => {
                            return Err(PgError::Protocol(format!(
                                "the server asks for authentication method {other}, which jaunt does not implement"
                            )))
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => {
                    self.status = body.first().copied().unwrap_or(b'I');
                    return Ok(());
                }
                // ParameterStatus, BackendKeyData, NoticeResponse, NegotiateProtocolVersion.
                _ => {}
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let r = self
            .stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush());
        if r.is_err() {
            self.broken = true;
        }
        Ok(r?)
    }

    /// Reads one backend message: type byte and body.
    fn recv(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        if let Err(e) = self.stream.read_exact(&mut head) {
            self.broken = true;
            return Err(e.into());
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=MAX_MESSAGE_BYTES).contains(&len) {
            self.broken = true;
            return Err(PgError::Protocol(format!(
                "message length {len} out of bounds"
            )));
        }
        let mut body = vec![0u8; len - 4];
        if let Err(e) = self.stream.read_exact(&mut body) {
            self.broken = true;
            return Err(e.into());
        }
        Ok((head[0], body))
    }

    /// Runs one or more statements without parameters (simple query protocol).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        let mut q = sql.as_bytes().to_vec();
        q.push(0);
        self.send(&wire::message(b'Q', &q))?;
        self.until_ready().map(|_| ())
    }

    /// Runs one statement with text parameters `$1..$n` (extended query protocol).
    pub fn query(&mut self, sql: &str, params: &[Param]) -> Result<Outcome> {
        let mut out = Vec::with_capacity(sql.len() + 64);
        // Parse: unnamed statement, parameter types left to the server.
        let mut parse = vec![0u8];
        parse.extend_from_slice(sql.as_bytes());
        parse.push(0);
        parse.extend_from_slice(&0u16.to_be_bytes());
        out.extend(wire::message(b'P', &parse));
        // Bind: unnamed portal and statement, all parameters and results in text.
        let n = u16::try_from(params.len())
            .map_err(|_| PgError::Protocol("more than 65535 parameters".into()))?;
        let mut bind = vec![0u8, 0u8];
        bind.extend_from_slice(&0u16.to_be_bytes());
        bind.extend_from_slice(&n.to_be_bytes());
        for p in params {
            match p {
                None => bind.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    bind.extend_from_slice(v.as_bytes());
                }
            }
        }
        bind.extend_from_slice(&0u16.to_be_bytes());
        out.extend(wire::message(b'B', &bind));
        out.extend(wire::message(b'E', &[0, 0, 0, 0, 0]));
        out.extend(wire::message(b'S', &[]));
        self.send(&out)?;
        self.until_ready()
    }

    /// Reads results until ReadyForQuery; the first ErrorResponse is the answer.
    fn until_ready(&mut self) -> Result<Outcome> {
        let mut outcome = Outcome::default();
        let mut error = None;
        loop {
            let (kind, body) = self.recv()?;
            match kind {
                b'D' => outcome.rows.push(data_row(&body)?),
                b'C' => {
                    let tag = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body))
                        .into_owned();
                    outcome.affected = tag
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
                b'E' if error.is_none() => error = Some(server_error(&body)),
                b'Z' => {
                    self.status = body.first().copied().unwrap_or(b'I');
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(outcome),
                    };
                }
                // ParseComplete, BindComplete, NoData, EmptyQuery, notices, notifications,
                // parameter status.
                _ => {}
            }
        }
    }

    /// Runs `f` in a transaction: committed when it returns Ok, rolled back otherwise.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        self.batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                if !self.broken {
                    let _ = self.batch("ROLLBACK");
                }
                Err(e)
            }
        }
    }
}

fn need_password(cfg: &PgConfig) -> Result<&str> {
    cfg.password.as_deref().ok_or_else(|| PgError::Login {
        target: cfg.target(),
        user: cfg.user.clone(),
        message: "the server asks for a password and none is set (conn_string, PGPASSWORD or \
                  a password file)"
            .into(),
    })
}

fn be_u32(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| PgError::Protocol("message too short".into()))
}

fn data_row(body: &[u8]) -> Result<Row> {
    let n = body
        .get(..2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
        .ok_or_else(|| PgError::Protocol("DataRow too short".into()))?;
    let mut at = 2;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = be_u32(body, at)? as i32;
        at += 4;
        if len < 0 {
            cols.push(None);
            continue;
        }
        let len = len as usize;
        let v = body
            .get(at..at + len)
            .ok_or_else(|| PgError::Protocol("DataRow column past its end".into()))?;
        cols.push(Some(String::from_utf8(v.to_vec()).map_err(|_| {
            PgError::Protocol("a text column is not UTF-8".into())
        })?));
        at += len;
    }
    Ok(Row(cols))
}

/// Severity, SQLSTATE and message of an ErrorResponse.
fn server_error(body: &[u8]) -> PgError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        let Some((&kind, text)) = field.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(text).into_owned();
        match kind {
            b'S' => severity = text,
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    PgError::Server {
        severity,
        code,
        message,
    }
}

fn negotiate_tls(cfg: &PgConfig, mut tcp: TcpStream) -> Result<Stream> {
    if cfg.sslmode == SslMode::Disable {
        return Ok(Stream::Tcp(tcp));
    }
    tcp.write_all(&wire::SSL_REQUEST)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)?;
    if answer[0] != wire::WILL_TLS {
        if cfg.sslmode == SslMode::Prefer {
            return Ok(Stream::Tcp(tcp));
        }
        return Err(PgError::Connect {
            target: cfg.target(),
            message: "the server does not offer TLS, and sslmode requires it".into(),
        });
    }
    let config = tls_config(cfg)?;
    let name_host = cfg.host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(name_host.to_string()).map_err(|_| {
        PgError::Config(format!(
            "host {:?} is not a valid TLS server name",
            cfg.host
        ))
    })?;
    let conn =
        ClientConnection::new(config, name).map_err(|e| PgError::Config(format!("TLS: {e}")))?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| PgError::Connect {
                target: cfg.target(),
                message: format!("TLS handshake: {e}"),
            })?;
    }
    Ok(Stream::Tls(Box::new(tls)))
}

fn tls_config(cfg: &PgConfig) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PgError::Config(format!("TLS: {e}")))?;
    let roots = match &cfg.sslrootcert {
        Some(path) if path.as_os_str() == "system" => {
            let mut roots = RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            Some(roots)
        }
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| PgError::Config(format!("sslrootcert {}: {e}", path.display())))?;
            let mut roots = RootCertStore::empty();
            for cert in rustls_pemfile_certs(&pem, path)? {
                roots
                    .add(cert)
                    .map_err(|e| PgError::Config(format!("sslrootcert {}: {e}", path.display())))?;
            }
            Some(roots)
        }
        None => None,
    };
    let verify = match (cfg.sslmode, &roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(PgError::Config(
                "sslmode verify-ca/verify-full needs a root certificate: set sslrootcert (or \
                 PGSSLROOTCERT, or ~/.postgresql/root.crt; sslrootcert=system for the OS's)"
                    .into(),
            ))
        }
        (SslMode::VerifyFull, Some(_)) => Verify::Full,
        (_, Some(_)) => Verify::Ca,
        (_, None) => Verify::None,
    };
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match roots {
        Some(roots) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| PgError::Config(format!("TLS roots: {e}")))?;
            Arc::new(PgVerifier {
                inner: Some(inner),
                provider,
                check_name: verify == Verify::Full,
            })
        }
        None => Arc::new(PgVerifier {
            inner: None,
            provider,
            check_name: false,
        }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&cfg.sslcert, &cfg.sslkey) {
        (Some(cert), Some(key)) if cert.exists() => {
            let chain = rustls_pemfile_certs(
                &std::fs::read(cert)
                    .map_err(|e| PgError::Config(format!("sslcert {}: {e}", cert.display())))?,
                cert,
            )?;
            let key_pem = std::fs::read(key)
                .map_err(|e| PgError::Config(format!("sslkey {}: {e}", key.display())))?;
            let key_der = {
                use rustls::pki_types::pem::PemObject;
                PrivateKeyDer::from_pem_slice(&key_pem)
            }
            .map_err(|e| PgError::Config(format!("sslkey {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| PgError::Config(format!("sslcert/sslkey: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn rustls_pemfile_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: std::result::Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| PgError::Config(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(PgError::Config(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    None,
    Ca,
    Full,
}

/// `sslmode`'s certificate checks: none (`prefer`/`require` without a root file), the chain
/// (`verify-ca`, or `require` with one, as libpq does), chain and name (`verify-full`).
#[derive(Debug)]
struct PgVerifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    check_name: bool,
}

impl rustls::client::danger::ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn random_nonce() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| PgError::Protocol("no randomness for the SCRAM nonce".into()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(raw))
}

/// SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding. The user name is sent empty, as
/// libpq does: PostgreSQL takes it from the startup message. The password is used as bytes
/// (SASLprep is the identity for ASCII passwords).
struct Scram {
    password: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    /// (salted password, auth message) once the server's first message arrived.
    state: Option<([u8; 32], String)>,
}

impl Scram {
    fn new(password: &str, nonce: String) -> Scram {
        Scram::with_user(password, "", nonce)
    }

    fn with_user(password: &str, user: &str, nonce: String) -> Scram {
        Scram {
            password: password.as_bytes().to_vec(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce,
            state: None,
        }
    }

    fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    fn client_final(&mut self, server_first: &str) -> Result<String> {
        let bad = |why: &str| PgError::Protocol(format!("SCRAM server-first-message: {why}"));
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(bad("the nonce does not extend ours"));
        }
        let salt = base64::engine::general_purpose::STANDARD
            .decode(salt.ok_or_else(|| bad("no salt"))?)
            .map_err(|_| bad("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or_else(|| bad("no iteration count"))?
            .parse()
            .map_err(|_| bad("iteration count is not a number"))?;
        let iterations = std::num::NonZeroU32::new(iterations)
            .filter(|i| i.get() <= 10_000_000)
            .ok_or_else(|| bad("iteration count out of range"))?;
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            &self.password,
            &mut salted,
        );
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = ring::digest::digest(&ring::digest::SHA256, &client_key);
        let signature = hmac(stored_key.as_ref(), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        self.state = Some((salted, auth_message));
        Ok(format!(
            "{without_proof},p={}",
            base64::engine::general_purpose::STANDARD.encode(proof)
        ))
    }

    fn verify_server_final(&self, server_final: &str) -> Result<()> {
        let (salted, auth_message) = self
            .state
            .as_ref()
            .ok_or_else(|| PgError::Protocol("SCRAM final before its first message".into()))?;
        if let Some(e) = server_final.strip_prefix("e=") {
            return Err(PgError::Protocol(format!("SCRAM: the server says {e}")));
        }
        let got = server_final
            .strip_prefix("v=")
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .ok_or_else(|| PgError::Protocol("SCRAM server-final-message malformed".into()))?;
        let server_key = hmac(salted, b"Server Key");
        let expected = hmac(&server_key, auth_message.as_bytes());
        if got != expected {
            return Err(PgError::Protocol(
                "SCRAM: the server's signature is wrong (not the server that holds the password)"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

/// A few connections to one database, made on demand and reused; a broken one is dropped.
pub struct Pool {
    cfg: PgConfig,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    /// Makes the first connection now, so a wrong password or an unreachable server is an
    /// error at start-up.
    pub fn connect(cfg: PgConfig) -> Result<Pool> {
        let first = Conn::connect(&cfg)?;
        Ok(Pool {
            cfg,
            idle: Mutex::new(vec![first]),
        })
    }

    pub fn config(&self) -> &PgConfig {
        &self.cfg
    }

    /// Runs `f` on a connection (an idle one, or a new one).
    pub fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let taken = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut conn = match taken {
            Some(c) => c,
            None => Conn::connect(&self.cfg)?,
        };
        let out = f(&mut conn);
        if !conn.broken && conn.status == b'I' {
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < MAX_IDLE {
                    idle.push(conn);
                }
            }
        }
        out
    }

    /// One statement on a pooled connection.
    pub fn query(&self, sql: &str, params: &[Param]) -> Result<Outcome> {
        self.with(|c| c.query(sql, params))
    }
}

/// Parameters from values: `params![a, b]`.
#[macro_export]
macro_rules! pg_params {
    ($($v:expr),* $(,)?) => {
        [$($crate::store::pg::ToParam::to_param(&$v)),*]
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn scram_matches_rfc_7677() {
        let mut s = Scram::with_user("pencil", "user", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(s.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first =
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            s.client_final(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s
            .verify_server_final("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_err());
    }

    #[test]
    fn scram_refuses_a_nonce_that_is_not_ours() {
        let mut s = Scram::new("pw", "abc".into());
        assert!(s.client_final("r=xyz123,s=QUJD,i=4096").is_err());
        assert!(s.client_final("r=abc,s=QUJD,i=4096").is_err());
        assert!(s.client_final("r=abcd,s=QUJD,i=0").is_err());
    }

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_connection_string_wins_over_the_environment_and_defaults_fill_the_rest() {
        let info = jaunt_config::pgconn::parse("postgres://jaunt@db:6000").unwrap();
        let env = env_of(&[
            ("PGHOST", "other"),
            ("PGPASSWORD", "from-env"),
            ("PGSSLMODE", "require"),
            ("USER", "osuser"),
        ]);
        let cfg = PgConfig::resolve(&info, &env).unwrap();
        assert_eq!(cfg.host, "db");
        assert_eq!(cfg.port, 6000);
        assert_eq!(cfg.user, "jaunt");
        assert_eq!(cfg.dbname, "jaunt");
        assert_eq!(cfg.password.as_deref(), Some("from-env"));
        assert_eq!(cfg.sslmode, SslMode::Require);
        assert!(!format!("{cfg:?}").contains("from-env"));
        let cfg = PgConfig::resolve(&ConnInfo::default(), &env_of(&[("USER", "osuser")])).unwrap();
        assert_eq!((cfg.user.as_str(), cfg.port), ("osuser", 5432));
        assert_eq!(cfg.sslmode, SslMode::Prefer);
        assert_eq!(cfg.host, "/var/run/postgresql");
    }

    #[test]
    fn password_file_lines_match_with_wildcards_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:5432:*:jaunt:nope\ndb:*:*:jaunt:se\\:cret\n",
        )
        .unwrap();
        let info =
            jaunt_config::pgconn::parse(&format!("host=db user=jaunt passfile={}", file.display()))
                .unwrap();
        let cfg = PgConfig::resolve(&info, &env_of(&[])).unwrap();
        assert_eq!(cfg.password.as_deref(), Some("se:cret"));
    }

    #[test]
    fn server_errors_and_rows_decode() {
        let e = server_error(b"SFATAL\0C28P01\0Mpassword authentication failed\0\0");
        assert_eq!(
            e.to_string(),
            "PostgreSQL: FATAL 28P01: password authentication failed"
        );
        let mut row = 2u16.to_be_bytes().to_vec();
        row.extend_from_slice(&2u32.to_be_bytes());
        row.extend_from_slice(b"42");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        let r = data_row(&row).unwrap();
        assert_eq!(r.i64(0).unwrap(), 42);
        assert_eq!(r.opt_text(1).unwrap(), None);
        assert!(data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err());
    }
}
