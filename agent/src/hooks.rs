//! What the agent's caller plugs in besides its settings: [`AgentHooks`]. The agent library has
//! no control-API client of its own (the `jaunt agent` command owns joining, renewal and every
//! call to control), so anything a stream needs from control comes in through a hook:
//!
//! - [`DbCertProvider`]: a client certificate for a database user, from the cluster's db CA
//!   (PostgreSQL and MySQL streams log in to the server with it). Blocking; the agent runs each call on a
//!   thread of its own and caches the result per database user.
//! - [`QueryRecorder`]: where the queries of database sessions go (today a log line; the audit
//!   issue plugs in the control API).
//! - [`AppTokenProvider`]: the signed JWT (`Jaunt-Jwt-Assertion`) the HTTP app proxy adds to
//!   each request, from control's JWT key (the key never leaves control). Blocking, like the db
//!   certificate provider; the agent caches each token until shortly before it expires.
//! - [`AppRequestRecorder`]: where each HTTP request of an app session goes, for the audit log.

use std::fmt;
use std::sync::Arc;

use crate::postgres::wire::ClientQuery;

/// A client certificate for one database user, issued by the cluster's db CA.
#[derive(Clone)]
pub struct DbClientCert {
    /// The certificate (PEM; leaf first if a chain). Its CN is the database user.
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8), made on this host.
    pub key_pem: String,
    /// The db CA (PEM): the database server's certificate must chain to it.
    pub ca_pem: String,
    /// When the certificate expires (unix seconds).
    pub expires: u64,
}

impl fmt::Debug for DbClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbClientCert")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Gets database client certificates (the `jaunt agent` command asks control's
/// `POST /v1/db/cert` with the agent's host identity).
pub trait DbCertProvider: Send + Sync {
    /// A certificate for `db_user`, requested on behalf of the Jaunt user `requested_by` (for
    /// control's audit log). Blocking: called on a thread of its own, never on the executor.
    /// The error is shown to the user who dialed, after `jaunt: cannot get a certificate ...`.
    fn issue(&self, db_user: &str, requested_by: &str) -> Result<DbClientCert, String>;
}

/// Who is in a database session, for the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbSession {
    /// The Jaunt user (the certificate's name).
    pub user: String,
    /// The database service's name (what the user dialed).
    pub service: String,
    /// The database user the session logged in as.
    pub db_user: String,
    /// The database it opened.
    pub database: String,
    /// The user's address as the engine saw it.
    pub client_addr: String,
    /// The engine's session id (its `session.start`/`session.end` events carry the same);
    /// empty if the engine did not send one.
    pub session_id: String,
}

/// Receives every query a client sends (PostgreSQL: simple `Q` and extended-protocol `P`;
/// MySQL: COM_QUERY and COM_STMT_PREPARE), in order, as the agent forwards it. Called on the agent's executor thread: it must not block (queue to a
/// thread of its own for anything slow).
pub trait QueryRecorder: Send + Sync {
    /// One query of `session`.
    fn record(&self, session: &DbSession, query: &ClientQuery);
}

/// The default [`QueryRecorder`]: one `tracing` event at info level per query,
/// `jaunt db query user=.. db_user=.. db=.. service=.. kind=.. query=".."`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogQueries;

impl QueryRecorder for LogQueries {
    fn record(&self, session: &DbSession, query: &ClientQuery) {
        let statement = match &query.kind {
            crate::postgres::wire::QueryKind::Parse { statement } => statement.as_str(),
            crate::postgres::wire::QueryKind::Simple
            | crate::postgres::wire::QueryKind::Prepare => "",
        };
        tracing::info!(
            user = %session.user,
            db_user = %session.db_user,
            db = %session.database,
            service = %session.service,
            kind = query.kind.as_str(),
            statement,
            query = ?query.text,
            truncated = query.truncated,
            session = %session.session_id,
            "jaunt db query"
        );
    }
}

/// A signed JWT for one user of one app, as control issued it.
#[derive(Clone)]
pub struct AppToken {
    /// The compact JWS (`header.claims.signature`, ES256).
    pub jwt: String,
    /// When it expires (unix seconds, the `exp` claim).
    pub expires: u64,
}

impl fmt::Debug for AppToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppToken")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Gets app-access JWTs (the `jaunt agent` command asks control's `POST /v1/app/jwt` with the
/// agent's host identity).
pub trait AppTokenProvider: Send + Sync {
    /// A token asserting that `user` with `roles` uses the app `app` served at `uri`.
    /// Blocking: called on a thread of its own, never on the executor. The error is shown to
    /// the user (as an HTTP 502 body).
    fn issue(&self, user: &str, roles: &[String], app: &str, uri: &str)
        -> Result<AppToken, String>;
}

/// Who is in an app session, for the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppSession {
    /// The Jaunt user (the certificate's name).
    pub user: String,
    /// The app's name (what the user dialed).
    pub app: String,
    /// The user's address as the engine saw it.
    pub client_addr: String,
}

/// One HTTP request of an app session, as the agent's reverse proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRequest {
    /// Request method (`GET`).
    pub method: String,
    /// Request target as sent (path and query; bounded by the proxy's head limit).
    pub path: String,
    /// Response status; 0 when the app sent no response (connection failed).
    pub status: u16,
    /// Request body bytes forwarded to the app.
    pub request_bytes: u64,
    /// Response body bytes forwarded to the user.
    pub response_bytes: u64,
    /// From the request head read to the response's end, in milliseconds.
    pub duration_ms: u64,
    /// Whether the request upgraded the connection (WebSocket); the session's bytes after the
    /// upgrade are not counted here.
    pub upgraded: bool,
}

/// Receives every HTTP request of app sessions, after its response ended. Called on the
/// agent's executor thread: it must not block.
pub trait AppRequestRecorder: Send + Sync {
    /// One request of `session`.
    fn record(&self, session: &AppSession, request: &AppRequest);
}

/// The default [`AppRequestRecorder`]: one `tracing` event at info level per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogAppRequests;

impl AppRequestRecorder for LogAppRequests {
    fn record(&self, session: &AppSession, request: &AppRequest) {
        tracing::info!(
            user = %session.user,
            app = %session.app,
            client = %session.client_addr,
            method = %request.method,
            path = %request.path,
            status = request.status,
            request_bytes = request.request_bytes,
            response_bytes = request.response_bytes,
            duration_ms = request.duration_ms,
            upgraded = request.upgraded,
            "jaunt app request"
        );
    }
}

/// A stream the agent's own authorization check refused (`policy.rs`), for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessDenial {
    /// The user the stream claims (the header's; the certificate may be what was wrong).
    pub user: String,
    /// Their roles, as the header says.
    pub roles: Vec<String>,
    /// The dial kind (`ssh`, `db`, `tcp`, `app`).
    pub kind: String,
    /// The node, database or app name.
    pub target: String,
    /// OS login (SSH).
    pub login: Option<String>,
    /// Database user.
    pub db_user: Option<String>,
    /// The user's address as the engine saw it.
    pub client_addr: String,
    /// What the user was told: the resource and the rule.
    pub reason: String,
}

/// Receives every stream the agent refused on its own authorization check. Called on the
/// agent's executor thread: it must not block. (The refusal is logged either way.)
pub trait DenialRecorder: Send + Sync {
    /// One refused stream.
    fn record(&self, denial: &AccessDenial);
}

/// The default [`DenialRecorder`]: nothing beyond the log line the agent writes anyway.
#[derive(Clone, Copy, Debug, Default)]
pub struct IgnoreDenials;

impl DenialRecorder for IgnoreDenials {
    fn record(&self, _denial: &AccessDenial) {}
}

/// Who a terminated SSH session is (its audit events name it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshSession {
    /// The engine's session id (as in its `session.start`/`session.end`); may be empty.
    pub session_id: String,
    /// The Jaunt user.
    pub user: String,
    /// The OS login.
    pub login: String,
    /// The node's name.
    pub node: String,
}

/// Longest command line an [`SshEvent::Exec`] carries (longer ones are cut, `truncated`).
pub const MAX_AUDITED_COMMAND_BYTES: usize = 16 << 10;
/// Longest path a [`SshEvent::FileTransfer`] carries (longer ones are cut, `truncated`).
pub const MAX_AUDITED_PATH_BYTES: usize = 4096;

/// What a terminated SSH session reports for the audit log (`ssh_term`), besides its recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SshEvent {
    /// A command channel ended (`ssh host cmd`, legacy `scp -t`/`-f`, a subsystem other than
    /// sftp): the command line, how it exited, the channel's bytes and its recording.
    Exec {
        command: String,
        truncated: bool,
        /// `None`: sshd sent no exit status (a signal, or the connection ended first).
        exit_status: Option<i32>,
        exit_signal: Option<String>,
        bytes_in: u64,
        bytes_out: u64,
        recording_id: Option<String>,
    },
    /// One file operation of an sftp channel (scp in its default SFTP mode, `sftp`):
    /// `read`/`write` (a handle closed, with the bytes moved), `open` (nothing moved),
    /// `remove`, `rename` (with `to`), `mkdir`, `rmdir`, `setstat`.
    FileTransfer {
        operation: String,
        path: String,
        to: Option<String>,
        bytes: Option<u64>,
        truncated: bool,
    },
    /// The session ended at the agent: the recordings of its channels and its channels' bytes.
    Closed {
        recording_ids: Vec<String>,
        bytes_in: u64,
        bytes_out: u64,
        /// The first recording failure (best effort went on without it), if any.
        recording_failure: Option<String>,
    },
}

/// Receives the audit events of terminated SSH sessions. Called on the agent's executor
/// thread: it must not block.
pub trait SshEventRecorder: Send + Sync {
    fn record(&self, session: &SshSession, event: &SshEvent);
}

/// The default [`SshEventRecorder`]: one `tracing` event at info level each.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSshEvents;

impl SshEventRecorder for LogSshEvents {
    fn record(&self, session: &SshSession, event: &SshEvent) {
        tracing::info!(
            user = %session.user,
            login = %session.login,
            session = %session.session_id,
            ?event,
            "jaunt ssh event"
        );
    }
}

/// An OpenSSH certificate as control issued it.
#[derive(Clone, Debug)]
pub struct SshCert {
    /// The OpenSSH certificate line (`ssh-ed25519-cert-v01@openssh.com AAAA...`).
    pub cert: String,
    /// When it expires (unix seconds).
    pub expires: u64,
}

/// What a terminating agent asks for to log in to its node's sshd on a user's behalf.
#[derive(Clone)]
pub struct SshUserCertRequest {
    /// The login (the certificate's only principal).
    pub login: String,
    /// The user's X.509 certificate the engine forwarded (DER): control checks it carries the
    /// login.
    pub user_cert_der: Vec<u8>,
    /// The OpenSSH public key line of the key the agent made for this session.
    pub public_key: String,
    /// The engine's session id, for the audit log.
    pub session_id: Option<String>,
}

impl fmt::Debug for SshUserCertRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshUserCertRequest")
            .field("login", &self.login)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

/// Gets the certificates an agent that terminates SSH needs (the `jaunt agent` command asks
/// control's `POST /v1/agent/ssh/host-cert` and `/user-cert` with the agent's host identity).
/// Blocking: called on a thread of its own, never on the executor.
pub trait SshCertProvider: Send + Sync {
    /// A host certificate (host CA, principals = this node's names) over `public_key`.
    fn host_cert(&self, public_key: &str) -> Result<SshCert, String>;
    /// A short-lived user certificate (user CA) for one login of one session.
    fn user_cert(&self, request: &SshUserCertRequest) -> Result<SshCert, String>;
}

/// What the agent needs to terminate and record SSH sessions (`ssh_term.rs`): certificates and
/// the recording spool. Without it every SSH session is spliced to sshd, unrecorded (a role's
/// `record_session: strict` then refuses the session).
#[derive(Clone)]
pub struct SshRecording {
    pub certs: Arc<dyn SshCertProvider>,
    pub spool: crate::recording::Spool,
    /// The live terminated sessions, for observers (`jaunt join`); one per agent process.
    pub live: crate::ssh_term::LiveSessions,
}

/// The hooks [`crate::run_with_hooks`] takes. The default has no certificate provider (database
/// streams are refused with a reason) and logs queries with [`LogQueries`].
#[derive(Clone)]
pub struct AgentHooks {
    /// Database client certificates; `None` refuses database streams.
    pub db_certs: Option<Arc<dyn DbCertProvider>>,
    /// Where database queries are recorded.
    pub db_queries: Arc<dyn QueryRecorder>,
    /// App-access JWTs; `None` refuses HTTP app streams.
    pub app_tokens: Option<Arc<dyn AppTokenProvider>>,
    /// Where HTTP app requests are recorded.
    pub app_requests: Arc<dyn AppRequestRecorder>,
    /// Where the agent's own authorization refusals are recorded.
    pub denials: Arc<dyn DenialRecorder>,
    /// SSH termination and recording; `None` splices every SSH session.
    pub ssh: Option<SshRecording>,
    /// Where the exec commands, file transfers and ends of terminated SSH sessions go.
    pub ssh_events: Arc<dyn SshEventRecorder>,
}

impl Default for AgentHooks {
    fn default() -> Self {
        AgentHooks {
            db_certs: None,
            db_queries: Arc::new(LogQueries),
            app_tokens: None,
            app_requests: Arc::new(LogAppRequests),
            denials: Arc::new(IgnoreDenials),
            ssh: None,
            ssh_events: Arc::new(LogSshEvents),
        }
    }
}

impl fmt::Debug for AgentHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentHooks")
            .field("db_certs", &self.db_certs.as_ref().map(|_| "provider"))
            .field("app_tokens", &self.app_tokens.as_ref().map(|_| "provider"))
            .field(
                "ssh",
                &self
                    .ssh
                    .as_ref()
                    .map(|s| s.spool.dir().display().to_string()),
            )
            .finish_non_exhaustive()
    }
}
