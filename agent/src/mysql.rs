//! MySQL and MariaDB access: one user stream of kind `db` to a database whose protocol is
//! `mysql`, from the agent's handshake to the end of the session with the real server.
//!
//! ```text
//! client (mariadb) ─ plain MySQL ─▶ jaunt proxy db ─ TLS ─▶ engine ─ tunnel ─▶ agent ─ TLS ─▶ server
//! ```
//!
//! 1. Accept the stream and greet the client as a server would (HandshakeV10, with
//!    [`wire::OFFERED_CAPABILITIES`], `mysql_native_password` and a random scramble). The
//!    client's password, if any, is not checked: who the user is was settled by the user
//!    certificate at the engine, as for PostgreSQL.
//! 2. Read the client's HandshakeResponse ([`wire::HandshakeResponse::parse`], bounded by
//!    [`wire::MAX_HANDSHAKE_PACKET_BYTES`] and [`STARTUP_TIMEOUT`]), check its capabilities
//!    ([`wire::negotiate`]) and the db user/database against the stream header (`authorize`).
//!    A refusal is an ERR packet the client prints: `ERROR 1045 (28000): jaunt: access
//!    denied: ...`. A client whose plugin is not `mysql_native_password` is switched to it
//!    (`caching_sha2_password` is told "fast auth succeeded" instead).
//! 3. Get a client certificate for the database user from the db CA (shared with PostgreSQL:
//!    `crate::postgres::DbState`), connect to the server, read its greeting, send an
//!    SSLRequest, TLS (verified against the db CA), then a HandshakeResponse as the database
//!    user with an empty password and the client's own capabilities, character set and
//!    connection attributes. The server must require the certificate (`REQUIRE X509` or
//!    `REQUIRE SUBJECT`); an AuthSwitchRequest is answered with empty data and
//!    `caching_sha2_password`'s full authentication with an empty password (over TLS).
//! 4. Relay the server's OK (or ERR) to the client, then splice. The client → server direction
//!    goes through a `Tap` that runs a [`wire::CommandFilter`]: every COM_QUERY and
//!    COM_STMT_PREPARE goes to the [`QueryRecorder`], COM_INIT_DB (`USE db` in the CLI
//!    clients) and a COM_QUERY that starts with `USE` (JDBC, GUI tools) are checked against the
//!    allowed database names, COM_CHANGE_USER is refused.
//!
//! Not here: qualified names (`otherdb.t`), and a `USE` behind a comment or another
//! statement, are the server's grants' business: `db_names` governs the database a session
//! opens and switches to, not every schema a statement names.

pub mod wire;

use std::collections::VecDeque;
use std::future::Future;
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
use glommio::timer::Timer;
use jaunt_config::wire::dial::StreamHeader;
use jaunt_engine::tunnel::{splice, Incoming, MuxStream};
use rustls_pki_types::ServerName;

use crate::error::{describe_io, Blame};
use crate::hooks::{AccessDenial, DbSession, DenialRecorder, QueryRecorder};
use crate::net;
use crate::serve::LocalTarget;
use crate::settings::Prepared;
use wire::{caps, code, AuthReply, ClientHandshake, ErrPacket, Greeting, HandshakeResponse};

/// How long a client has to answer the handshake.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The server version announced before the agent has met the real server; afterwards the real
/// server's own version string is announced (clients adapt to it).
pub const DEFAULT_SERVER_VERSION: &str = "8.0.0-Jaunt";
/// After refusing a client, how long to wait for it to close before dropping the stream (so
/// the ERR packet is read before any reset).
const LINGER_AFTER_REFUSAL: Duration = Duration::from_secs(2);
/// Read size on the client side of the relay.
const TAP_READ_BYTES: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// Authorization (pure)

/// What a session logs in as, once allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MysqlLogin {
    pub(crate) db_user: String,
    /// The database to open: the client's, else the dialed one; `None` opens none.
    pub(crate) database: Option<String>,
}

/// A refusal: the MySQL error code, SQLSTATE and the reason (after `access denied: `).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) code: u16,
    pub(crate) sqlstate: &'static str,
    pub(crate) reason: String,
}

/// Checks a client's login against what was dialed and what the user's identity allows: the
/// same rules as PostgreSQL's (`crate::postgres::authorize`), except that a session may open
/// no database at all (MySQL has no default database per user).
pub(crate) fn authorize(
    header: &StreamHeader,
    user: &str,
    database: Option<&str>,
) -> Result<MysqlLogin, Refused> {
    let denied = |reason: String| Refused {
        code: code::ACCESS_DENIED,
        sqlstate: "28000",
        reason,
    };
    if let Some(dialed) = header.db_user.as_deref() {
        if user != dialed {
            return Err(denied(format!(
                "db user {user:?} is not the one you dialed ({dialed})"
            )));
        }
    }
    let db_user = crate::postgres::authorize_db_user(header).map_err(denied)?;
    let database = match (database, header.db_name.as_deref()) {
        (Some(db), Some(dialed)) if db != dialed => {
            return Err(Refused {
                code: code::DB_ACCESS_DENIED,
                sqlstate: "42000",
                reason: format!("database {db:?} is not the one you dialed ({dialed})"),
            })
        }
        (Some(db), _) | (None, Some(db)) => Some(db),
        (None, None) => None,
    };
    if let Some(db) = database {
        if !wire::allowed(&header.allowed_db_names, db) {
            return Err(Refused {
                code: code::DB_ACCESS_DENIED,
                sqlstate: "42000",
                reason: format!(
                    "your Jaunt identity ({}) does not allow database {db:?} (allowed: {}); ask \
                     an administrator for it (jaunt users add|update --db-names)",
                    header.user,
                    if header.allowed_db_names.is_empty() {
                        "none".to_owned()
                    } else {
                        header.allowed_db_names.join(", ")
                    }
                ),
            });
        }
    }
    Ok(MysqlLogin {
        db_user: db_user.to_owned(),
        database: database.map(str::to_owned),
    })
}

// ---------------------------------------------------------------------------------------------
// Packet I/O

/// Reads whole packets from a stream, keeping what arrives after one for the next.
struct PacketReader {
    buf: Vec<u8>,
}

#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Closed,
    Wire(wire::WireError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl PacketReader {
    fn new() -> PacketReader {
        PacketReader {
            buf: Vec::with_capacity(512),
        }
    }

    /// The next packet (sequence id and payload), at most `max` bytes of payload.
    async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        max: usize,
        what: &'static str,
    ) -> Result<(u8, Vec<u8>), ReadError> {
        let mut chunk = [0u8; 2048];
        loop {
            if let Some((p, used)) =
                wire::parse_packet(&self.buf, max, what).map_err(ReadError::Wire)?
            {
                let out = (p.seq, p.payload.to_vec());
                self.buf.drain(..used);
                return Ok(out);
            }
            // parse_packet refused any length above `max`, so `buf` stays below it plus a chunk.
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Like [`Self::read`], and the sequence id must be `seq`.
    async fn expect<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        seq: u8,
        what: &'static str,
    ) -> Result<Vec<u8>, ReadError> {
        let (got, payload) = self
            .read(stream, wire::MAX_HANDSHAKE_PACKET_BYTES, what)
            .await?;
        if got != seq {
            return Err(ReadError::Wire(wire::WireError::Sequence {
                want: seq,
                got,
            }));
        }
        Ok(payload)
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, seq: u8, payload: &[u8]) -> io::Result<()> {
    stream.write_all(&wire::packet(seq, payload)).await?;
    stream.flush().await
}

// ---------------------------------------------------------------------------------------------
// Serving a stream

/// The client's side of the connection phase, as far as the agent has taken it.
struct ClientSide {
    stream: MuxStream,
    reader: PacketReader,
    /// The sequence id of the next packet to the client.
    seq: u8,
    /// The client speaks 4.1 (ERR packets carry a SQLSTATE).
    protocol_41: bool,
}

impl ClientSide {
    /// Writes an ERR packet, half-closes, and waits (briefly) for the client to go.
    async fn refuse(mut self, code: u16, sqlstate: &str, message: &str) {
        let state = Some(sqlstate).filter(|_| self.protocol_41);
        let payload = wire::err_packet(code, state, message);
        let sent = async {
            send(&mut self.stream, self.seq, &payload).await?;
            self.stream.close().await
        };
        if sent.await.is_err() {
            return;
        }
        let _ = net::timeout(LINGER_AFTER_REFUSAL, async {
            let mut sink = [0u8; 1024];
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    async fn relay_err(self, err: &ErrPacket) {
        let state = err.sqlstate.clone().unwrap_or_else(|| "HY000".to_owned());
        self.refuse(err.code, &state, &err.message).await;
    }
}

/// Serves one `db` stream for the MySQL database `local` (already routed and admitted).
pub(crate) async fn serve(
    incoming: Incoming,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
) {
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return;
        }
    };
    let mut client = ClientSide {
        stream,
        reader: PacketReader::new(),
        seq: 0,
        protocol_41: false,
    };
    let mut scramble = [0u8; wire::SCRAMBLE_LEN];
    random_scramble(&mut scramble);
    let greeting = Greeting {
        server_version: prepared
            .db
            .mysql_version(&header.target)
            .unwrap_or_else(|| DEFAULT_SERVER_VERSION.to_owned()),
        // Not the server's thread id (unknown yet): 0 is no thread, so a client's
        // `KILL QUERY <id>` on Ctrl-C fails instead of hitting someone else's thread.
        connection_id: 0,
        capabilities: wire::OFFERED_CAPABILITIES,
        charset: wire::DEFAULT_CHARSET,
        status: wire::STATUS_AUTOCOMMIT,
        scramble: scramble.to_vec(),
        auth_plugin: wire::NATIVE_PASSWORD.to_owned(),
    };
    if send(&mut client.stream, 0, &greeting.encode())
        .await
        .is_err()
    {
        return;
    }
    let answer = net::timeout(STARTUP_TIMEOUT, async {
        client
            .reader
            .expect(&mut client.stream, 1, "handshake response")
            .await
    })
    .await;
    client.seq = 2;
    let payload = match answer {
        None => {
            let message = format!("jaunt: no handshake response within {STARTUP_TIMEOUT:?}");
            tracing::info!("db stream: {message}");
            client
                .refuse(code::HANDSHAKE_ERROR, "08S01", &message)
                .await;
            return;
        }
        Some(Ok(payload)) => payload,
        Some(Err(ReadError::Closed)) => {
            tracing::debug!("db stream closed before a handshake response");
            return;
        }
        Some(Err(ReadError::Io(e))) => {
            tracing::debug!(error = %e, "db stream failed before a handshake response");
            return;
        }
        Some(Err(ReadError::Wire(e))) => {
            refuse_bad_input(client, &e).await;
            return;
        }
    };
    let response = match HandshakeResponse::parse(&payload) {
        Ok(ClientHandshake::Response(r)) => r,
        Ok(ClientHandshake::SslRequest { capabilities }) => {
            let e = wire::negotiate(capabilities, wire::OFFERED_CAPABILITIES)
                .err()
                .unwrap_or(wire::WireError::Malformed(
                    "an SSLRequest without CLIENT_SSL",
                ));
            refuse_bad_input(client, &e).await;
            return;
        }
        Err(e) => {
            refuse_bad_input(client, &e).await;
            return;
        }
    };
    client.protocol_41 = true;
    let capabilities = match wire::negotiate(response.capabilities, wire::OFFERED_CAPABILITIES) {
        Ok(c) => c,
        Err(e) => {
            refuse_bad_input(client, &e).await;
            return;
        }
    };
    let login = match authorize(&header, &response.user, response.database.as_deref()) {
        Ok(login) => login,
        Err(refused) => {
            tracing::info!(
                db_user = %response.user,
                database = response.database.as_deref().unwrap_or(""),
                reason = %refused.reason,
                "db session refused"
            );
            let message = format!("jaunt: access denied: {}", refused.reason);
            client
                .refuse(refused.code, refused.sqlstate, &message)
                .await;
            return;
        }
    };
    // Finish the client's authentication exchange before logging in to the server, so the
    // server's OK (or ERR) is the answer the client is waiting for.
    if let Err(e) = finish_client_auth(&mut client, &response).await {
        tracing::debug!(error = ?e, "db stream: the client's authentication exchange failed");
        if let ReadError::Wire(e) = e {
            refuse_bad_input(client, &e).await;
        }
        return;
    }
    let (server, reader, ok) =
        match login_to_server(&header, &local, &prepared, &login, &response, capabilities).await {
            Ok(done) => done,
            Err(ServerRefusal::Err(err)) => {
                tracing::info!(
                    db_user = %login.db_user,
                    code = err.code,
                    error = %err.message,
                    "db session refused by the server"
                );
                client.relay_err(&err).await;
                return;
            }
            Err(ServerRefusal::Failed(message)) => {
                tracing::warn!(
                    blame = %Blame::LocalService,
                    db_user = %login.db_user,
                    error = %message,
                    "db session refused"
                );
                client.refuse(code::CANNOT_CONNECT, "HY000", &message).await;
                return;
            }
        };
    let mut out = wire::packet(client.seq, &ok);
    // Whatever the server sent right behind its OK belongs to the client too.
    out.extend_from_slice(&reader.buf);
    let ClientSide {
        stream: mut client_stream,
        reader: client_reader,
        ..
    } = client;
    let sent = async {
        client_stream.write_all(&out).await?;
        client_stream.flush().await
    };
    if sent.await.is_err() {
        return;
    }
    let session = DbSession {
        user: header.user.clone(),
        service: header.target.clone(),
        db_user: login.db_user.clone(),
        database: login.database.clone().unwrap_or_default(),
        client_addr: header.client_addr.clone(),
        session_id: header.session_id.clone().unwrap_or_default(),
    };
    let mut tap = Tap::new(
        client_stream,
        session,
        &header,
        prepared.db.recorder(),
        prepared.denials.0.clone(),
    );
    // Anything the client sent right behind its handshake goes through the filter first.
    tap.feed_client(&client_reader.buf);
    tracing::info!(
        db_user = %login.db_user,
        database = login.database.as_deref().unwrap_or(""),
        local = %local.addr,
        "db session open"
    );
    crate::serve::log_splice_outcome(splice(tap, server).await, "db session");
}

fn random_scramble(out: &mut [u8]) {
    let provider = rustls::crypto::ring::default_provider();
    if provider.secure_random.fill(out).is_err() {
        // Never used to check anything (the agent ignores the client's password); a fixed
        // scramble only makes the client's answer predictable.
        out.fill(b'j');
    }
    // A scramble holds no NUL (clients read its second part up to one).
    for b in out.iter_mut() {
        *b = (*b % 94) + 33;
    }
}

async fn refuse_bad_input(client: ClientSide, e: &wire::WireError) {
    let message = format!("jaunt: {e}");
    tracing::info!(error = %message, "db stream refused");
    let code = match e {
        wire::WireError::TooLong { .. } => code::PACKET_TOO_LARGE,
        _ => code::HANDSHAKE_ERROR,
    };
    client.refuse(code, "08S01", &message).await;
}

/// Takes the client through to "authenticated" as far as the agent is concerned: its password
/// is not checked (the user certificate was), but its plugin must be answered in kind.
async fn finish_client_auth(
    client: &mut ClientSide,
    response: &HandshakeResponse,
) -> Result<(), ReadError> {
    if response.capabilities & caps::PLUGIN_AUTH == 0 {
        return Ok(());
    }
    match response.auth_plugin.as_deref() {
        None | Some("") | Some(wire::NATIVE_PASSWORD) => Ok(()),
        Some(wire::CACHING_SHA2_PASSWORD) => {
            // "Fast authentication succeeded": the client then waits for OK.
            send(&mut client.stream, client.seq, &wire::FAST_AUTH_SUCCESS).await?;
            client.seq = client.seq.wrapping_add(1);
            Ok(())
        }
        Some(_) => {
            let mut scramble = [0u8; wire::SCRAMBLE_LEN];
            random_scramble(&mut scramble);
            let switch = wire::auth_switch(wire::NATIVE_PASSWORD, &scramble);
            send(&mut client.stream, client.seq, &switch).await?;
            let want = client.seq.wrapping_add(1);
            let answer = net::timeout(
                STARTUP_TIMEOUT,
                client
                    .reader
                    .expect(&mut client.stream, want, "auth switch response"),
            )
            .await
            .ok_or_else(|| ReadError::Io(io::ErrorKind::TimedOut.into()))?;
            answer?;
            client.seq = want.wrapping_add(1);
            Ok(())
        }
    }
}

/// Why the server side did not come up.
enum ServerRefusal {
    /// The server refused (its ERR, relayed to the client).
    Err(ErrPacket),
    /// The agent could not get there; the text the client reads.
    Failed(String),
}

/// Certificate, TCP, greeting, SSLRequest, TLS, HandshakeResponse, authentication: a logged-in
/// connection, the reader's leftovers, and the server's OK payload.
async fn login_to_server(
    header: &StreamHeader,
    local: &LocalTarget,
    prepared: &Prepared,
    login: &MysqlLogin,
    response: &HandshakeResponse,
    client_caps: u32,
) -> Result<(TlsStream<TcpStream>, PacketReader, Vec<u8>), ServerRefusal> {
    let failed = |what: String| {
        ServerRefusal::Failed(format!(
            "jaunt: cannot log in to {} at {}: {what}",
            local.what, local.addr
        ))
    };
    let config = prepared
        .db
        .client_config(&login.db_user, &header.user)
        .await
        .map_err(|e| {
            ServerRefusal::Failed(format!(
                "jaunt: cannot get a database certificate for db user {:?}: {e}",
                login.db_user
            ))
        })?;
    let timeouts = &prepared.timeouts;
    let connected = async {
        let addrs = net::resolve(&local.addr.host, local.addr.port).await?;
        net::connect(&addrs, timeouts.local_connect).await
    };
    let mut tcp = match net::timeout(timeouts.local_connect, connected).await {
        Some(Ok(tcp)) => tcp,
        Some(Err(e)) => return Err(failed(describe_io(&e))),
        None => {
            return Err(failed(format!(
                "no answer within {:?}",
                timeouts.local_connect
            )))
        }
    };
    let mut reader = PacketReader::new();
    let greeting = net::timeout(
        timeouts.handshake,
        reader.expect(&mut tcp, 0, "server greeting"),
    )
    .await
    .ok_or_else(|| failed(format!("no greeting within {:?}", timeouts.handshake)))?
    .map_err(|e| failed(read_failure(&e)))?;
    if greeting.first() == Some(&0xff) {
        return Err(ServerRefusal::Err(
            ErrPacket::parse(&greeting).map_err(|e| failed(e.to_string()))?,
        ));
    }
    let greeting = Greeting::parse(&greeting)
        .map_err(|e| failed(format!("{e}: is this a MySQL or MariaDB server?")))?;
    prepared
        .db
        .remember_mysql_version(&header.target, &greeting.server_version);
    if greeting.capabilities & caps::SSL == 0 {
        return Err(failed(
            "the server does not accept TLS: set ssl_cert, ssl_key and ssl_ca (from `jaunt ca \
             sign-db` and `jaunt ca export --type db`) in its [mariadbd] / [mysqld] section"
                .to_owned(),
        ));
    }
    let missing = client_caps & wire::FORMAT_CAPABILITIES & !greeting.capabilities;
    if missing != 0 {
        return Err(failed(format!(
            "the server lacks capabilities the client uses (0x{missing:08x}); use a newer \
             server (MySQL 5.7+, MariaDB 10.2+)"
        )));
    }
    let mut capabilities = (client_caps & greeting.capabilities)
        | caps::PROTOCOL_41
        | caps::SECURE_CONNECTION
        | caps::SSL;
    capabilities &= !(caps::CONNECT_WITH_DB
        | caps::PLUGIN_AUTH
        | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
        | caps::CONNECT_ATTRS);
    if login.database.is_some() {
        capabilities |= caps::CONNECT_WITH_DB;
    }
    capabilities |=
        greeting.capabilities & (caps::PLUGIN_AUTH | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA);
    // The server sees the client's connection attributes plus who the Jaunt user is.
    let attrs = (greeting.capabilities & caps::CONNECT_ATTRS != 0).then(|| {
        capabilities |= caps::CONNECT_ATTRS;
        wire::with_attr(response.attrs.as_deref(), "jaunt_user", &header.user)
    });
    let ssl = wire::ssl_request(capabilities, response.max_packet, response.charset);
    match net::timeout(timeouts.handshake, send(&mut tcp, 1, &ssl)).await {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(failed(describe_io(&e))),
        None => return Err(failed("the server does not read".to_owned())),
    }
    let server_name = ServerName::try_from(local.addr.host.clone())
        .map_err(|e| failed(format!("{:?} is not a server name: {e}", local.addr.host)))?;
    let mut tls = match net::timeout(
        timeouts.handshake,
        TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    {
        Some(Ok(tls)) => tls,
        Some(Err(e)) => return Err(failed(tls_failure(&e))),
        None => {
            return Err(failed(format!(
                "the TLS handshake did not finish within {:?}",
                timeouts.handshake
            )))
        }
    };
    let login_packet = HandshakeResponse {
        capabilities,
        max_packet: response.max_packet,
        charset: response.charset,
        user: login.db_user.clone(),
        auth_response: Vec::new(),
        database: login.database.clone(),
        auth_plugin: Some(greeting.auth_plugin.clone()).filter(|p| !p.is_empty()),
        attrs,
    };
    let mut reader = PacketReader::new();
    let authenticated =
        async {
            send(&mut tls, 2, &login_packet.encode()).await?;
            let mut seq = 3u8;
            for _ in 0..wire::MAX_AUTH_ROUNDS {
                let payload = reader.expect(&mut tls, seq, "authentication reply").await?;
                let reply: Option<Vec<u8>> =
                    match AuthReply::parse(&payload).map_err(ReadError::Wire)? {
                        AuthReply::Ok => return Ok(Ok(payload)),
                        AuthReply::Err(err) => return Ok(Err(ServerRefusal::Err(err))),
                        // Any plugin: the account has no password, and empty data says so.
                        AuthReply::Switch { .. } => Some(Vec::new()),
                        AuthReply::MoreData(data) => match data.first() {
                            // caching_sha2_password: fast auth succeeded, OK follows.
                            Some(3) => None,
                            // caching_sha2_password: send the (empty) password, in clear over TLS.
                            Some(&wire::PERFORM_FULL_AUTH) => Some(vec![0]),
                            _ => return Ok(Err(failed(
                                "the server asked for an authentication exchange the agent does \
                             not speak: create the user with no password and REQUIRE X509 \
                             (or REQUIRE SUBJECT)"
                                    .to_owned(),
                            ))),
                        },
                    };
                seq = seq.wrapping_add(1);
                if let Some(data) = reply {
                    send(&mut tls, seq, &data).await?;
                    seq = seq.wrapping_add(1);
                }
            }
            Ok::<_, ReadError>(Err(failed(
                "the server's authentication exchange did not end".to_owned(),
            )))
        };
    match net::timeout(timeouts.handshake, authenticated).await {
        Some(Ok(Ok(ok))) => Ok((tls, reader, ok)),
        Some(Ok(Err(refusal))) => Err(refusal),
        Some(Err(e)) => Err(failed(read_failure(&e))),
        None => Err(failed(format!(
            "the login did not finish within {:?}",
            timeouts.handshake
        ))),
    }
}

fn read_failure(e: &ReadError) -> String {
    match e {
        ReadError::Io(e) => describe_io(e),
        ReadError::Closed => "the server closed the connection".to_owned(),
        ReadError::Wire(e) => e.to_string(),
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
            "TLS: the server refused the handshake ({alert:?}): does its ssl_ca hold the \
             cluster's db CA (`jaunt ca export --type db`)?"
        ),
        _ => format!("TLS: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Relay

/// The client's end of a session, as the splice sees it: reads return what the
/// [`wire::CommandFilter`] forwards (queries recorded, COM_INIT_DB checked); writes (the
/// server's bytes) pass through, and the filter's refusals are written to the client between
/// server packets.
struct Tap {
    inner: MuxStream,
    filter: wire::CommandFilter,
    filtered: wire::Filtered,
    /// Filtered bytes not yet handed to the splice.
    to_server: Vec<u8>,
    to_server_at: usize,
    /// Refusals not yet written to the client.
    to_client: VecDeque<u8>,
    boundary: wire::Boundary,
    /// Set when the client sent something unusable: once `to_client` (its ERR) is written,
    /// reads end.
    failed: Option<String>,
    /// The client's stream is closed for writing (after a failure).
    write_closed: bool,
    /// How long a failed session still drains the client's input.
    linger: Option<Timer>,
    scratch: Vec<u8>,
    session: DbSession,
    denial: AccessDenial,
    recorder: Arc<dyn QueryRecorder>,
    denials: Arc<dyn DenialRecorder>,
}

impl Tap {
    fn new(
        inner: MuxStream,
        session: DbSession,
        header: &StreamHeader,
        recorder: Arc<dyn QueryRecorder>,
        denials: Arc<dyn DenialRecorder>,
    ) -> Tap {
        Tap {
            inner,
            filter: wire::CommandFilter::new(header.allowed_db_names.clone()),
            filtered: wire::Filtered::default(),
            to_server: Vec::new(),
            to_server_at: 0,
            to_client: VecDeque::new(),
            boundary: wire::Boundary::default(),
            failed: None,
            write_closed: false,
            linger: None,
            scratch: vec![0; TAP_READ_BYTES],
            session,
            denial: AccessDenial {
                user: header.user.clone(),
                roles: header.roles.clone(),
                kind: header.kind.as_str().to_owned(),
                target: header.target.clone(),
                login: None,
                db_user: header.db_user.clone(),
                client_addr: header.client_addr.clone(),
                reason: String::new(),
            },
            recorder,
            denials,
        }
    }

    /// Runs `bytes` from the client through the filter.
    fn feed_client(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.filtered.clear();
        let result = self.filter.feed(bytes, &mut self.filtered);
        if self.to_server_at == self.to_server.len() {
            self.to_server.clear();
            self.to_server_at = 0;
        }
        self.to_server.extend_from_slice(&self.filtered.to_server);
        for packet in self.filtered.to_client.drain(..) {
            self.to_client.extend(packet);
        }
        for query in self.filtered.queries.drain(..) {
            self.recorder.record(&self.session, &query);
        }
        for db in self.filtered.init_db.drain(..) {
            self.session.database = db;
        }
        for reason in self.filtered.refused.drain(..) {
            tracing::info!(reason = %reason, "db command refused");
            self.denial.reason = reason;
            self.denials.record(&self.denial);
        }
        if let Err(e) = result {
            let message = format!("jaunt: {e}");
            tracing::info!(error = %message, "db session: the client sent an unusable packet");
            let code = match e {
                wire::WireError::TooLong { .. } => code::PACKET_TOO_LARGE,
                _ => code::HANDSHAKE_ERROR,
            };
            self.to_client.extend(wire::packet(
                1,
                &wire::err_packet(code, Some("08S01"), &message),
            ));
            self.failed = Some(message);
        }
    }

    /// Writes pending refusals to the client if no server packet is half written.
    fn poll_refusals(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.to_client.is_empty() && self.boundary.at_boundary() {
            let (front, _) = self.to_client.as_slices();
            match Pin::new(&mut self.inner).poll_write(cx, front) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.to_client.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Tap {
    /// After the ERR for an unusable packet is out: close the client's stream, then read and
    /// drop what it still sends until it closes too (at most [`LINGER_AFTER_REFUSAL`]), so no
    /// unread input turns the close into a reset that could destroy the ERR on its way. Then
    /// report the end of the client's input: the splice closes the server side.
    fn poll_wind_down(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if !self.write_closed {
            match Pin::new(&mut self.inner).poll_close(cx) {
                Poll::Ready(_) => self.write_closed = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let linger = self
            .linger
            .get_or_insert_with(|| Timer::new(LINGER_AFTER_REFUSAL));
        loop {
            match Pin::new(&mut self.inner).poll_read(cx, &mut self.scratch) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => break,
            }
        }
        match Pin::new(linger).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(0)),
            Poll::Pending => Poll::Pending,
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
        loop {
            if let Poll::Ready(Err(e)) = this.poll_refusals(cx) {
                return Poll::Ready(Err(e));
            }
            if this.to_server_at < this.to_server.len() {
                let pending = &this.to_server[this.to_server_at..];
                let n = pending.len().min(buf.len());
                buf[..n].copy_from_slice(&pending[..n]);
                this.to_server_at += n;
                return Poll::Ready(Ok(n));
            }
            if this.failed.is_some() {
                if this.to_client.is_empty() {
                    return this.poll_wind_down(cx);
                }
                // Wait for the ERR to go out (poll_refusals registered the wake-up, or a
                // server packet is finishing).
                return Poll::Pending;
            }
            let mut scratch = std::mem::take(&mut this.scratch);
            let read = Pin::new(&mut this.inner).poll_read(cx, &mut scratch);
            let result = match read {
                Poll::Ready(Ok(0)) => Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => {
                    this.feed_client(scratch.get(..n).unwrap_or_default());
                    Poll::Pending
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    this.scratch = scratch;
                    return Poll::Pending;
                }
            };
            this.scratch = scratch;
            if let Poll::Ready(r) = result {
                return Poll::Ready(r);
            }
        }
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_refusals(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.boundary.feed(buf.get(..n).unwrap_or_default());
                // A refusal waiting for this packet's end goes out now; if it cannot yet, the
                // read side retries it.
                let _ = this.poll_refusals(cx);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
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
            target: "my1".into(),
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

    #[test]
    fn logins_follow_the_dial_and_the_identity() {
        let h = header("alice", Some("app"), &["alice"], &["app"]);
        assert_eq!(
            authorize(&h, "alice", None),
            Ok(MysqlLogin {
                db_user: "alice".into(),
                database: Some("app".into())
            })
        );
        assert_eq!(
            authorize(&h, "alice", Some("app"))
                .unwrap()
                .database
                .as_deref(),
            Some("app")
        );
        // No database at all: allowed (the server's grants decide what it may read).
        let h = header("alice", None, &["alice"], &[]);
        assert_eq!(authorize(&h, "alice", None).unwrap().database, None);
        let cases = [
            (
                header("alice", None, &["alice"], &["*"]),
                "bob",
                None,
                1045,
                "is not the one you dialed",
            ),
            (
                header("bob", None, &["alice"], &["*"]),
                "bob",
                None,
                1045,
                r#"does not allow db user "bob""#,
            ),
            (
                header("alice", Some("app"), &["alice"], &["*"]),
                "alice",
                Some("x"),
                1044,
                r#"database "x" is not the one you dialed (app)"#,
            ),
            (
                header("alice", None, &["alice"], &["app"]),
                "alice",
                Some("otherdb"),
                1044,
                r#"does not allow database "otherdb" (allowed: app)"#,
            ),
            (
                header("alice", Some("otherdb"), &["alice"], &[]),
                "alice",
                None,
                1044,
                "(allowed: none)",
            ),
        ];
        for (h, user, db, code, want) in cases {
            let got = authorize(&h, user, db).unwrap_err();
            assert_eq!(got.code, code, "{}", got.reason);
            assert!(got.reason.contains(want), "{}\nwanted: {want}", got.reason);
        }
    }

    #[test]
    fn scrambles_hold_no_nul() {
        let mut s = [0u8; wire::SCRAMBLE_LEN];
        for _ in 0..100 {
            random_scramble(&mut s);
            assert!(s.iter().all(|&b| (33..127).contains(&b)));
        }
    }
}
