//! What the agent's caller plugs in besides its settings: [`AgentHooks`]. The agent library has
//! no control-API client of its own (the `jaunt agent` command owns joining, renewal and every
//! call to control), so anything a stream needs from control comes in through a hook:
//!
//! - [`DbCertProvider`]: a client certificate for a database user, from the cluster's db CA
//!   (PostgreSQL streams log in to the server with it). Blocking; the agent runs each call on a
//!   thread of its own and caches the result per database user.
//! - [`QueryRecorder`]: where the queries of database sessions go (today a log line; the audit
//!   issue plugs in the control API).

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
}

/// Receives every query (simple `Q` and extended-protocol `P`) a client sends, in order, as the
/// agent forwards it. Called on the agent's executor thread: it must not block (queue to a
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
            crate::postgres::wire::QueryKind::Simple => "",
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
            "jaunt db query"
        );
    }
}

/// The hooks [`crate::run_with_hooks`] takes. The default has no certificate provider (database
/// streams are refused with a reason) and logs queries with [`LogQueries`].
#[derive(Clone)]
pub struct AgentHooks {
    /// Database client certificates; `None` refuses database streams.
    pub db_certs: Option<Arc<dyn DbCertProvider>>,
    /// Where database queries are recorded.
    pub db_queries: Arc<dyn QueryRecorder>,
}

impl Default for AgentHooks {
    fn default() -> Self {
        AgentHooks {
            db_certs: None,
            db_queries: Arc::new(LogQueries),
        }
    }
}

impl fmt::Debug for AgentHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentHooks")
            .field("db_certs", &self.db_certs.as_ref().map(|_| "provider"))
            .finish_non_exhaustive()
    }
}
