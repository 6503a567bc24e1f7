//! PostgreSQL access: one user stream of kind `db`, from the client's first byte to the end of
//! its session with the real server.
//!
//! ```text
//! client (psql) ─ plain PG ─▶ jaunt proxy db ─ TLS ─▶ engine ─ tunnel ─▶ agent ─ TLS ─▶ server
//! ```
//!
//! 1. Accept the stream, then read the client's first message ([`wire::parse_first`], bounded
//!    by [`wire::MAX_STARTUP_BYTES`] and [`STARTUP_TIMEOUT`]). An SSLRequest or GSSENCRequest
//!    is answered `N`: the hop is already TLS through the engine, and the agent, not the
//!    client, authenticates to the server.
//! 2. Check the StartupMessage against the stream header ([`authorize`]): the user must be the
//!    database user that was dialed, the database the one dialed (if any), and both must be
//!    allowed by the user's certificate (the engine copies its `db_users` and `db_names` into
//!    the header). A refusal is a PostgreSQL ErrorResponse, which the client prints:
//!    `FATAL:  jaunt: access denied: ...`.
//! 3. Get a client certificate for that database user from the db CA ([`DbState`]: through the
//!    [`DbCertProvider`] hook, on a thread, cached per database user until two thirds of its
//!    life has passed; concurrent sessions for the same user share one request).
//! 4. Connect to the server: TCP, SSLRequest, TLS verified against the db CA (the server's
//!    certificate comes from `jaunt ca sign-db`), client certificate whose CN is the database
//!    user (`hostssl ... cert` in `pg_hba.conf`); forward the StartupMessage as it arrived.
//! 5. Splice both ways; the client → server direction goes through a [`Tap`] that frames the
//!    messages ([`wire::QueryScanner`]) and hands every Query and Parse to the
//!    [`QueryRecorder`] hook.
//!
//! A CancelRequest (psql's Ctrl-C arrives on a new connection) is forwarded the same way, over
//! TLS, after the same check of the dialed database user.

pub mod wire;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use jaunt_config::file::HostPort;
use jaunt_config::identity::unix_now;
use jaunt_config::wire::dial::StreamHeader;
use jaunt_engine::tunnel::{splice, Incoming, MuxStream};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{describe_io, Blame};
use crate::hooks::{AgentHooks, DbCertProvider, DbClientCert, DbSession, QueryRecorder};
use crate::issue_cache::{IssueCache, Limits};
use crate::net;
use crate::serve::LocalTarget;
use crate::settings::{Prepared, Timeouts};
use wire::{ClientQuery, FirstMessage, QueryScanner, Startup, WireError};

/// How long a client has to send its StartupMessage (SSL negotiation included).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a certificate request to control may take before the sessions waiting on it are
/// told so (the control client's own connect and read bounds are 10 s and 30 s).
pub const CERT_ISSUE_TIMEOUT: Duration = Duration::from_secs(45);
/// Most certificate requests in flight at once (each is a thread): distinct database users,
/// since sessions for the same user share one request.
pub const MAX_PENDING_CERT_REQUESTS: usize = 8;
/// Most database users whose certificates are cached.
pub const MAX_CACHED_DB_USERS: usize = 256;
/// After refusing a client, how long to wait for it to close before dropping the stream (so
/// the ErrorResponse is read before any reset).
const LINGER_AFTER_REFUSAL: Duration = Duration::from_secs(2);
/// The `*` principal: any database user or name.
const WILDCARD: &str = "*";

// ---------------------------------------------------------------------------------------------
// Authorization (pure)

/// What a session logs in as, once allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DbLogin {
    pub(crate) db_user: String,
    pub(crate) database: String,
}

fn allowed(list: &[String], value: &str) -> bool {
    list.iter().any(|a| a == value || a == WILDCARD)
}

fn listed(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

/// The dialed database user, if the user's identity allows it. The reasons follow `access
/// denied: ` in what the client prints.
pub(crate) fn authorize_db_user(header: &StreamHeader) -> Result<&str, String> {
    let Some(dialed) = header.db_user.as_deref() else {
        return Err(
            "the dial named no database user (jaunt db connect NAME --db-user USER)".into(),
        );
    };
    if !allowed(&header.allowed_db_users, dialed) {
        return Err(format!(
            "your Jaunt identity ({}) does not allow db user {dialed:?} (allowed: {}); ask an \
             administrator for it (jaunt users add|update --db-users)",
            header.user,
            listed(&header.allowed_db_users)
        ));
    }
    Ok(dialed)
}

/// Checks a StartupMessage against what was dialed and what the user's identity allows.
pub(crate) fn authorize(header: &StreamHeader, startup: &Startup) -> Result<DbLogin, String> {
    let user = startup.user();
    if let Some(dialed) = header.db_user.as_deref() {
        if user != dialed {
            return Err(format!(
                "db user {user:?} is not the one you dialed ({dialed})"
            ));
        }
    }
    let db_user = authorize_db_user(header)?;
    let database = startup.database();
    if let Some(dialed) = header.db_name.as_deref() {
        if database != dialed {
            return Err(format!(
                "database {database:?} is not the one you dialed ({dialed})"
            ));
        }
    }
    if !allowed(&header.allowed_db_names, database) {
        return Err(format!(
            "your Jaunt identity ({}) does not allow database {database:?} (allowed: {}); ask an \
             administrator for it (jaunt users add|update --db-names)",
            header.user,
            listed(&header.allowed_db_names)
        ));
    }
    Ok(DbLogin {
        db_user: db_user.to_owned(),
        database: database.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// The agent's database state on its executor: the hooks and the certificate cache.
pub(crate) struct DbState {
    provider: Option<Arc<dyn DbCertProvider>>,
    recorder: Arc<dyn QueryRecorder>,
    certs: IssueCache<String, Arc<ClientConfig>>,
    /// MySQL services' server version strings, as their servers last announced them (the
    /// agent greets MySQL clients before it meets the server).
    mysql_versions: RefCell<HashMap<String, String>>,
}

type Issued = crate::issue_cache::Issued<Arc<ClientConfig>>;

impl std::fmt::Debug for DbState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbState")
            .field("provider", &self.provider.is_some())
            .field("cached", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl Default for DbState {
    fn default() -> Self {
        DbState::new(&AgentHooks::default())
    }
}

/// When a certificate valid until `expires`, received at `now`, should be replaced: after two
/// thirds of its remaining life (at once if it is already expired).
pub(crate) fn refresh_at(now: u64, expires: u64) -> u64 {
    now + expires.saturating_sub(now) * 2 / 3
}

impl DbState {
    pub(crate) fn new(hooks: &AgentHooks) -> DbState {
        DbState {
            provider: hooks.db_certs.clone(),
            recorder: hooks.db_queries.clone(),
            certs: IssueCache::new(Limits {
                max_pending: MAX_PENDING_CERT_REQUESTS,
                max_cached: MAX_CACHED_DB_USERS,
                timeout: CERT_ISSUE_TIMEOUT,
                what: "certificate",
                thread: "jaunt-agent-dbcert",
            }),
            mysql_versions: RefCell::new(HashMap::new()),
        }
    }

    /// Where queries go.
    pub(crate) fn recorder(&self) -> Arc<dyn QueryRecorder> {
        self.recorder.clone()
    }

    /// The version the MySQL service `service`'s server last announced.
    pub(crate) fn mysql_version(&self, service: &str) -> Option<String> {
        self.mysql_versions.borrow().get(service).cloned()
    }

    /// Remembers `version` for `service` (bounded: a full map is cleared first).
    pub(crate) fn remember_mysql_version(&self, service: &str, version: &str) {
        let mut map = self.mysql_versions.borrow_mut();
        if map.get(service).map(String::as_str) == Some(version) {
            return;
        }
        if map.len() >= MAX_CACHED_DB_USERS && !map.contains_key(service) {
            map.clear();
        }
        map.insert(service.to_owned(), version.to_owned());
    }

    /// Drops every cached client certificate (a CA rotation, see
    /// [`crate::AgentCommand::ForgetDbCerts`]); returns how many.
    pub(crate) fn forget_certificates(&self) -> usize {
        self.certs.forget()
    }

    pub(crate) fn has_provider(&self) -> bool {
        self.provider.is_some()
    }

    /// A TLS client configuration for `db_user`: cached, or issued now (shared with the other
    /// sessions waiting for the same user). Must run on a glommio executor.
    pub(crate) async fn client_config(&self, db_user: &str, requested_by: &str) -> Issued {
        let Some(provider) = self.provider.clone() else {
            return Err("this agent has no database certificate provider".into());
        };
        let (user, by) = (db_user.to_owned(), requested_by.to_owned());
        let logged = db_user.to_owned();
        self.certs
            .get(
                &db_user.to_owned(),
                move || provider.issue(&user, &by),
                move |issued| {
                    let result = issued.and_then(|cert| {
                        let config = client_config(&cert)?;
                        Ok((config, cert.expires))
                    });
                    match &result {
                        Ok((_, expires)) => tracing::info!(
                            db_user = %logged,
                            expires,
                            "database client certificate issued"
                        ),
                        Err(e) => tracing::warn!(
                            blame = %Blame::Config,
                            db_user = %logged,
                            error = %e,
                            "no database client certificate"
                        ),
                    }
                    result.map(|(config, expires)| (config, refresh_at(unix_now(), expires)))
                },
            )
            .await
    }
}

/// The TLS client configuration for a database server: ring, TLS 1.2 and 1.3, the db CA as the
/// only root, the database user's certificate as client certificate, no ALPN (PostgreSQL's
/// SSLRequest negotiation does not use it).
pub(crate) fn client_config(cert: &DbClientCert) -> Result<Arc<ClientConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the issued certificate is not PEM: {e:?}"))?;
    if chain.is_empty() {
        return Err("the issued certificate is empty".into());
    }
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| format!("the certificate's key is not PEM: {e:?}"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(cert.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| format!("the db CA is not PEM: {e:?}"))?;
        roots
            .add(ca)
            .map_err(|e| format!("the db CA is not usable: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no db CA came with the certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the issued certificate or key is not usable: {e}"))?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Serving a stream

/// What the client opened with.
enum Opening {
    Startup { startup: Startup, early: Vec<u8> },
    Cancel(wire::CancelRequest),
}

#[derive(Debug)]
enum OpenError {
    Io(io::Error),
    Closed,
    Wire(WireError),
    /// Bytes after an SSLRequest before its answer (the server refuses these too).
    Pipelined,
    TooManyRequests,
}

/// Serves one `db` stream for the database `local` (already routed: it exists on this agent).
pub(crate) async fn serve(
    incoming: Incoming,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
) {
    let mut client = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return;
        }
    };
    let opening = net::timeout(STARTUP_TIMEOUT, read_opening(&mut client)).await;
    let opening = match opening {
        None => {
            let message = format!("jaunt: no startup message within {STARTUP_TIMEOUT:?}");
            tracing::info!(blame = %Blame::Engine, "db stream: {message}");
            refuse(client, wire::SQLSTATE_PROTOCOL_VIOLATION, &message).await;
            return;
        }
        Some(Ok(opening)) => opening,
        Some(Err(OpenError::Closed)) => {
            tracing::debug!("db stream closed before a startup message");
            return;
        }
        Some(Err(OpenError::Io(e))) => {
            tracing::debug!(error = %e, "db stream failed before a startup message");
            return;
        }
        Some(Err(e)) => {
            let message = match e {
                OpenError::Wire(e) => format!("jaunt: {e}"),
                OpenError::Pipelined => {
                    "jaunt: received unencrypted data after SSL request".to_owned()
                }
                _ => "jaunt: too many encryption requests before the startup message".to_owned(),
            };
            tracing::info!(error = %message, "db stream refused");
            refuse(client, wire::SQLSTATE_PROTOCOL_VIOLATION, &message).await;
            return;
        }
    };
    match opening {
        Opening::Startup { startup, early } => {
            session(client, header, local, prepared, startup, early).await;
        }
        Opening::Cancel(cancel) => forward_cancel(client, header, local, prepared, cancel).await,
    }
}

/// Reads up to the StartupMessage or CancelRequest, answering encryption requests with `N`.
async fn read_opening(client: &mut MuxStream) -> Result<Opening, OpenError> {
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let mut negotiations = 0;
    loop {
        match wire::parse_first(&buf).map_err(OpenError::Wire)? {
            Some((FirstMessage::SslRequest | FirstMessage::GssEncRequest, used)) => {
                negotiations += 1;
                if negotiations > 2 {
                    return Err(OpenError::TooManyRequests);
                }
                if buf.len() > used {
                    return Err(OpenError::Pipelined);
                }
                buf.clear();
                client
                    .write_all(&[wire::NO_ENCRYPTION])
                    .await
                    .map_err(OpenError::Io)?;
                client.flush().await.map_err(OpenError::Io)?;
                continue;
            }
            Some((FirstMessage::Cancel(cancel), _)) => return Ok(Opening::Cancel(cancel)),
            Some((FirstMessage::Startup(startup), used)) => {
                let early = buf.split_off(used);
                return Ok(Opening::Startup { startup, early });
            }
            None => {}
        }
        // parse_first refused any length above the bound, so `buf` stays below it plus a chunk.
        let n = client.read(&mut chunk).await.map_err(OpenError::Io)?;
        if n == 0 {
            return Err(OpenError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes a FATAL ErrorResponse, half-closes, and waits (briefly) for the client to go.
async fn refuse(mut client: MuxStream, code: &str, message: &str) {
    let sent = async {
        client
            .write_all(&wire::error_response("FATAL", code, message))
            .await?;
        client.flush().await?;
        client.close().await
    };
    if sent.await.is_err() {
        return;
    }
    let _ = net::timeout(LINGER_AFTER_REFUSAL, async {
        let mut sink = [0u8; 1024];
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn session(
    client: MuxStream,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
    startup: Startup,
    early: Vec<u8>,
) {
    let login = match authorize(&header, &startup) {
        Ok(login) => login,
        Err(why) => {
            tracing::info!(
                db_user = startup.user(),
                database = startup.database(),
                reason = %why,
                "db session refused"
            );
            let message = format!("jaunt: access denied: {why}");
            refuse(client, wire::SQLSTATE_ACCESS_DENIED, &message).await;
            return;
        }
    };
    let server = match connect_as(&login.db_user, &header, &local, &prepared).await {
        Ok(server) => server,
        Err(message) => {
            tracing::warn!(
                blame = %Blame::LocalService,
                db_user = %login.db_user,
                error = %message,
                "db session refused"
            );
            refuse(client, wire::SQLSTATE_CONNECTION_FAILURE, &message).await;
            return;
        }
    };
    let mut server = server;
    let mut forwarded = startup.raw;
    forwarded.extend_from_slice(&early);
    let sent = async {
        server.write_all(&forwarded).await?;
        server.flush().await
    };
    if let Err(e) = sent.await {
        let message = format!(
            "jaunt: the database server at {} closed the connection: {}",
            local.addr,
            describe_io(&e)
        );
        refuse(client, wire::SQLSTATE_CONNECTION_FAILURE, &message).await;
        return;
    }
    let session = DbSession {
        user: header.user.clone(),
        service: header.target.clone(),
        db_user: login.db_user.clone(),
        database: login.database.clone(),
        client_addr: header.client_addr.clone(),
        session_id: header.session_id.clone().unwrap_or_default(),
    };
    let mut tap = Tap::new(client, session, prepared.db.recorder.clone());
    // Anything the client sent right behind its StartupMessage went out with it: record it too.
    tap.scan(&early);
    tracing::info!(
        db_user = %login.db_user,
        database = %login.database,
        local = %local.addr,
        "db session open"
    );
    crate::serve::log_splice_outcome(splice(tap, server).await, "db session");
}

async fn forward_cancel(
    mut client: MuxStream,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
    cancel: wire::CancelRequest,
) {
    // Nothing is ever answered to a CancelRequest; the client only sees the connection close.
    let _ = client.close().await;
    let db_user = match authorize_db_user(&header) {
        Ok(db_user) => db_user.to_owned(),
        Err(why) => {
            tracing::info!(reason = %why, "db cancel request refused");
            return;
        }
    };
    match connect_as(&db_user, &header, &local, &prepared).await {
        Ok(mut server) => {
            let sent = async {
                server.write_all(&cancel.encode()).await?;
                server.flush().await?;
                server.close().await
            };
            match net::timeout(prepared.timeouts.handshake, sent).await {
                Some(Ok(())) => tracing::info!(pid = cancel.pid, "db cancel request forwarded"),
                Some(Err(e)) => tracing::info!(error = %e, "db cancel request not forwarded"),
                None => tracing::info!("db cancel request not forwarded: timed out"),
            }
        }
        Err(message) => tracing::info!(error = %message, "db cancel request not forwarded"),
    }
}

/// A certificate for `db_user`, then a TLS connection to the server with it. The error is the
/// text the client reads.
async fn connect_as(
    db_user: &str,
    header: &StreamHeader,
    local: &LocalTarget,
    prepared: &Prepared,
) -> Result<TlsStream<TcpStream>, String> {
    let config = prepared
        .db
        .client_config(db_user, &header.user)
        .await
        .map_err(|e| {
            format!("jaunt: cannot get a database certificate for db user {db_user:?}: {e}")
        })?;
    connect_server(&local.addr, config, &prepared.timeouts)
        .await
        .map_err(|e| format!("jaunt: cannot reach {} at {}: {e}", local.what, local.addr))
}

/// TCP, SSLRequest, TLS: a connection ready for the StartupMessage.
pub(crate) async fn connect_server(
    addr: &HostPort,
    config: Arc<ClientConfig>,
    timeouts: &Timeouts,
) -> Result<TlsStream<TcpStream>, String> {
    let connected = async {
        let addrs = net::resolve(&addr.host, addr.port).await?;
        net::connect(&addrs, timeouts.local_connect).await
    };
    let mut tcp = match net::timeout(timeouts.local_connect, connected).await {
        Some(Ok(tcp)) => tcp,
        Some(Err(e)) => return Err(describe_io(&e)),
        None => return Err(format!("no answer within {:?}", timeouts.local_connect)),
    };
    let server_name = ServerName::try_from(addr.host.clone())
        .map_err(|e| format!("{:?} is not a server name: {e}", addr.host))?;
    let negotiated = async {
        tcp.write_all(&wire::SSL_REQUEST).await?;
        tcp.flush().await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        Ok::<u8, io::Error>(answer[0])
    };
    match net::timeout(timeouts.handshake, negotiated).await {
        Some(Ok(wire::WILL_TLS)) => {}
        Some(Ok(wire::NO_ENCRYPTION)) => {
            return Err(
                "the server does not accept TLS: set ssl = on in postgresql.conf, with \
                        ssl_cert_file and ssl_key_file from `jaunt ca sign-db`"
                    .to_owned(),
            )
        }
        Some(Ok(other)) => {
            return Err(format!(
                "the server answered the SSLRequest with {:?}: is this a PostgreSQL server?",
                char::from(other)
            ))
        }
        Some(Err(e)) => return Err(format!("SSL negotiation failed: {}", describe_io(&e))),
        None => {
            return Err(format!(
                "no answer to the SSLRequest within {:?}",
                timeouts.handshake
            ))
        }
    }
    let handshake = TlsConnector::from(config).connect(server_name, tcp);
    match net::timeout(timeouts.handshake, handshake).await {
        Some(Ok(tls)) => Ok(tls),
        Some(Err(e)) => Err(tls_failure(&e)),
        None => Err(format!(
            "the TLS handshake did not finish within {:?}",
            timeouts.handshake
        )),
    }
}

fn tls_failure(e: &io::Error) -> String {
    let inner = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "TLS: the server's certificate is not trusted ({why:?}): give the server a \
             certificate from `jaunt ca sign-db --host NAME` for the host name in the db URI"
        ),
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "TLS: the server refused the handshake ({alert:?}): does its ssl_ca_file hold the \
             cluster's db CA (`jaunt ca export --type db`)?"
        ),
        _ => format!("TLS: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Recording

/// The client's end of a session: reads pass through a [`QueryScanner`], whose queries go to
/// the recorder as they are read (before the server sees them); writes pass through untouched.
struct Tap {
    inner: MuxStream,
    scanner: QueryScanner,
    found: Vec<ClientQuery>,
    session: DbSession,
    recorder: Arc<dyn QueryRecorder>,
    lost_reported: bool,
}

impl Tap {
    fn new(inner: MuxStream, session: DbSession, recorder: Arc<dyn QueryRecorder>) -> Tap {
        Tap {
            inner,
            scanner: QueryScanner::new(),
            found: Vec::new(),
            session,
            recorder,
            lost_reported: false,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        self.scanner.feed(bytes, &mut self.found);
        for query in self.found.drain(..) {
            self.recorder.record(&self.session, &query);
        }
        if self.scanner.lost() && !self.lost_reported {
            self.lost_reported = true;
            tracing::warn!(
                blame = %Blame::Engine,
                "db session: the client's messages cannot be framed; queries are no longer recorded"
            );
        }
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.scan(buf.get(..n).unwrap_or_default());
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use jaunt_config::wire::dial::DialKind;

    use super::*;

    fn header(
        db_user: &str,
        db_name: Option<&str>,
        users: &[&str],
        names: &[&str],
    ) -> StreamHeader {
        StreamHeader {
            join: None,
            terminal: false,
            kind: DialKind::Db,
            target: "pg1".into(),
            login: None,
            db_user: Some(db_user.into()),
            db_name: db_name.map(Into::into),
            user: "alice".into(),
            roles: vec!["access".into()],
            client_addr: "192.0.2.1:5555".into(),
            allowed_db_users: users.iter().map(|s| (*s).to_owned()).collect(),
            allowed_db_names: names.iter().map(|s| (*s).to_owned()).collect(),
            session_id: None,
        }
    }

    fn startup(params: &[(&str, &str)]) -> Startup {
        match wire::parse_first(&Startup::encode(params)) {
            Ok(Some((FirstMessage::Startup(s), _))) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_dialed_and_allowed_login_passes() {
        let h = header("alice", Some("postgres"), &["alice"], &["postgres"]);
        let s = startup(&[("user", "alice"), ("database", "postgres")]);
        assert_eq!(
            authorize(&h, &s),
            Ok(DbLogin {
                db_user: "alice".into(),
                database: "postgres".into()
            })
        );
        // Wildcards, and no database named at the dial: the startup's database is checked.
        let h = header("alice", None, &["*"], &["*"]);
        let s = startup(&[("user", "alice")]);
        assert_eq!(authorize(&h, &s).unwrap().database, "alice");
    }

    #[test]
    fn refusals_name_the_user_or_database() {
        let cases = [
            (
                header("alice", None, &["alice"], &["*"]),
                startup(&[("user", "bob")]),
                r#"db user "bob" is not the one you dialed (alice)"#,
            ),
            (
                header("bob", None, &["alice"], &["*"]),
                startup(&[("user", "bob")]),
                r#"your Jaunt identity (alice) does not allow db user "bob" (allowed: alice)"#,
            ),
            (
                header("bob", None, &[], &["*"]),
                startup(&[("user", "bob")]),
                r#"does not allow db user "bob" (allowed: none)"#,
            ),
            (
                header("alice", Some("app"), &["alice"], &["*"]),
                startup(&[("user", "alice"), ("database", "postgres")]),
                r#"database "postgres" is not the one you dialed (app)"#,
            ),
            (
                header("alice", None, &["alice"], &["app"]),
                startup(&[("user", "alice"), ("database", "postgres")]),
                r#"does not allow database "postgres" (allowed: app)"#,
            ),
            (
                header("alice", None, &["alice"], &["app"]),
                startup(&[("user", "alice")]),
                r#"does not allow database "alice" (allowed: app)"#,
            ),
        ];
        for (h, s, want) in cases {
            let got = authorize(&h, &s).unwrap_err();
            assert!(got.contains(want), "{got}\nwanted: {want}");
        }
        let mut h = header("alice", None, &["alice"], &["*"]);
        h.db_user = None;
        assert!(authorize_db_user(&h).unwrap_err().contains("--db-user"));
    }

    #[test]
    fn certificates_are_refreshed_after_two_thirds_of_their_life() {
        assert_eq!(refresh_at(1000, 1000 + 3600), 1000 + 2400);
        assert_eq!(refresh_at(1000, 900), 1000);
    }

    #[test]
    fn client_config_refuses_what_it_cannot_use() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["alice".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let good = DbClientCert {
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: ca.pem(),
            expires: unix_now() + 3600,
        };
        assert!(client_config(&good).is_ok());
        let mut bad = good.clone();
        bad.ca_pem = String::new();
        assert!(client_config(&bad).unwrap_err().contains("db CA"));
        let mut bad = good.clone();
        bad.cert_pem = "garbage".into();
        assert!(client_config(&bad).is_err());
        let mut bad = good;
        bad.key_pem = "garbage".into();
        assert!(client_config(&bad).unwrap_err().contains("key"));
    }
}
