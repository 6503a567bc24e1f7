//! Serving the streams the engine opens on a tunnel: read the [`StreamHeader`], pick the local
//! service ([`route`], a pure function), connect to it, accept the stream and splice the two.
//! Anything that cannot be served is refused on the stream, with a message the user will read
//! ("cannot reach sshd at 127.0.0.1:22: connection refused"); nothing here panics or takes the
//! tunnel down.
//!
//! Served: `ssh` (to the configured sshd: terminated and recorded by `ssh_term.rs` when the
//! session's role records it, else spliced, the bytes end-to-end SSH), `tcp` apps (spliced), web apps (`app`: an HTTP/1.1 reverse proxy that adds the
//! user's `Jaunt-Jwt-Assertion`, see `http_app.rs`) and databases (`db`: protocol-aware, see
//! `postgres.rs` and `mysql.rs`; the service's protocol picks which).
//!
//! Before anything local is touched, the agent checks the stream itself (`policy.rs`): the
//! user certificate the engine forwarded, verified against the cluster's user CA, must be the
//! header's user, and `rbac::authorize` must allow it on the resource with the labels this
//! agent announces; a refusal carries the rule's message. An admitted session stays in the
//! executor's registry, and a lock in a newer policy that matches it ends it.

use std::fmt;
use std::rc::Rc;

use jaunt_config::file::{AgentServices, AppProtocol, DbProtocol, HostPort};
use jaunt_config::wire::dial::{DialKind, StreamHeader};
use jaunt_engine::tunnel::{splice, Incoming, Side, SpliceError, Spliced};
use tracing::Instrument;

use crate::error::{describe_io, Blame};
use crate::net;
use crate::policy::{announced_labels, Ended, Guard};
use crate::settings::Prepared;
use jaunt_config::identity::unix_now;

/// Where a stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LocalTarget {
    /// What to call it in messages: `sshd`, `app redis`.
    pub(crate) what: String,
    pub(crate) addr: HostPort,
}

/// Connects to `local` within the settings' `local_connect` bound. The error is the message
/// for the user, naming the service and its address; it is logged here as the local service's
/// fault, with `reason` as its stable label.
pub(crate) async fn connect_local(
    local: &LocalTarget,
    prepared: &Prepared,
    reason: &'static str,
) -> Result<glommio::net::TcpStream, String> {
    let bound = prepared.timeouts.local_connect;
    let connected = async {
        let addrs = net::resolve(&local.addr.host, local.addr.port).await?;
        net::connect(&addrs, bound).await
    };
    let message = match net::timeout(bound, connected).await {
        Some(Ok(tcp)) => return Ok(tcp),
        Some(Err(e)) => format!(
            "cannot reach {} at {}: {}",
            local.what,
            local.addr,
            describe_io(&e)
        ),
        None => format!(
            "cannot reach {} at {}: no answer within {bound:?}",
            local.what, local.addr
        ),
    };
    tracing::warn!(blame = %Blame::LocalService, reason, error = %message, "stream refused");
    Err(message)
}

/// Why a stream is not served: each says what the user (or operator) can do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The header is not a StreamHeader.
    BadHeader(String),
    /// SSH asked of an agent with no `services.ssh`.
    NoSsh { node: String },
    /// SSH for another node name.
    WrongNode { node: String, target: String },
    /// No app of that name.
    NoSuchApp { node: String, target: String },
    /// The app exists but speaks HTTP(S).
    HttpApp {
        target: String,
        protocol: AppProtocol,
    },
    /// No database of that name.
    NoSuchDb { node: String, target: String },
    /// The database exists, but the agent runs without a way to get database client
    /// certificates (no [`crate::DbCertProvider`] hook).
    DbNoCertificates { target: String },
}

impl Refusal {
    /// Who is to blame: a stream for something this agent never announced was misrouted by
    /// the engine; a bad header is the engine's too.
    pub(crate) fn blame(&self) -> Blame {
        match self {
            Refusal::HttpApp { .. } | Refusal::DbNoCertificates { .. } => Blame::Agent,
            _ => Blame::Engine,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadHeader(e) => write!(f, "the agent could not read the stream header: {e}"),
            Refusal::NoSsh { node } => write!(
                f,
                "node {node} does not serve SSH (agent.services.ssh is not configured)"
            ),
            Refusal::WrongNode { node, target } => {
                write!(f, "this agent is node {node}, not {target}")
            }
            Refusal::NoSuchApp { node, target } => {
                write!(f, "node {node} serves no TCP app named {target}")
            }
            Refusal::HttpApp { target, protocol } => write!(
                f,
                "app {target} is an {} app, and HTTP apps are not supported by this agent yet",
                match protocol {
                    AppProtocol::Http => "http",
                    AppProtocol::Https => "https",
                    AppProtocol::Tcp => "tcp",
                }
            ),
            Refusal::NoSuchDb { node, target } => {
                write!(f, "node {node} serves no database named {target}")
            }
            Refusal::DbNoCertificates { target } => write!(
                f,
                "database {target}: this agent cannot get database client certificates (it runs \
                 without a certificate provider; `jaunt agent` has one)"
            ),
        }
    }
}

/// Picks the local service for a stream, or says why there is none.
pub(crate) fn route(
    services: &AgentServices,
    node: &str,
    header: &StreamHeader,
) -> Result<LocalTarget, Refusal> {
    let target = header.target.as_str();
    match header.kind {
        DialKind::Ssh => {
            let Some(ssh) = &services.ssh else {
                return Err(Refusal::NoSsh { node: node.into() });
            };
            if target != node {
                return Err(Refusal::WrongNode {
                    node: node.into(),
                    target: target.into(),
                });
            }
            Ok(LocalTarget {
                what: "sshd".into(),
                addr: ssh.addr.clone(),
            })
        }
        DialKind::Tcp => {
            let Some(app) = services.apps.iter().find(|a| a.name == target) else {
                return Err(Refusal::NoSuchApp {
                    node: node.into(),
                    target: target.into(),
                });
            };
            if app.protocol != AppProtocol::Tcp {
                return Err(Refusal::HttpApp {
                    target: target.into(),
                    protocol: app.protocol,
                });
            }
            Ok(LocalTarget {
                what: format!("app {target}"),
                addr: app.addr.clone(),
            })
        }
        DialKind::App => {
            let Some(app) = services.apps.iter().find(|a| a.name == target) else {
                return Err(Refusal::NoSuchApp {
                    node: node.into(),
                    target: target.into(),
                });
            };
            if app.protocol == AppProtocol::Tcp {
                return Err(Refusal::NoSuchApp {
                    node: node.into(),
                    target: target.into(),
                });
            }
            Ok(LocalTarget {
                what: format!("app {target}"),
                addr: app.addr.clone(),
            })
        }
        DialKind::Db => {
            let Some(db) = services.dbs.iter().find(|d| d.name == target) else {
                return Err(Refusal::NoSuchDb {
                    node: node.into(),
                    target: target.into(),
                });
            };
            Ok(LocalTarget {
                what: format!("database {target}"),
                addr: db.addr.clone(),
            })
        }
    }
}

/// Serves one stream the engine opened on the tunnel to `shard`, start to end. Logs the
/// session (who, what, from where, bytes) for the agent's side of the audit trail.
pub(crate) async fn serve(
    incoming: Incoming,
    prepared: Rc<Prepared>,
    policy: Rc<Guard>,
    shard: usize,
) {
    let stream_id = incoming.id().get();
    let (header, client_cert) = match StreamHeader::parse_with_client_cert(&incoming.header) {
        Ok(parsed) => parsed,
        Err(e) => {
            let refusal = Refusal::BadHeader(e.to_string());
            tracing::warn!(shard, stream = stream_id, blame = %refusal.blame(), %refusal,
                "stream refused");
            incoming.refuse(&refusal.to_string());
            return;
        }
    };
    // `instrument`, not `enter`: an entered guard held across an await would leak the span
    // into whatever else the executor runs meanwhile.
    let span = tracing::info_span!(
        "stream",
        shard,
        stream = stream_id,
        kind = header.kind.as_str(),
        target = %header.target,
        user = %header.user,
        client = %header.client_addr,
    );
    serve_routed(incoming, header, client_cert, prepared, policy)
        .instrument(span)
        .await;
}

async fn serve_routed(
    incoming: Incoming,
    header: StreamHeader,
    client_cert: Option<Vec<u8>>,
    prepared: Rc<Prepared>,
    policy: Rc<Guard>,
) {
    let local = match route(&prepared.services, &prepared.name, &header) {
        Ok(local) => local,
        Err(refusal) => {
            tracing::info!(blame = %refusal.blame(), %refusal, "stream refused");
            incoming.refuse(&refusal.to_string());
            return;
        }
    };
    // `jaunt join`: an observer of a live terminated session, read-only (role rule
    // `session`/`join`, checked here again against the forwarded certificate).
    if let Some(joined) = header.join.clone() {
        if let Err(refused) = policy.admit_rule(
            &header,
            client_cert.as_deref(),
            "session",
            "join",
            unix_now(),
        ) {
            tracing::warn!(reason = refused.reason, error = %refused.message,
                "join refused by the agent's authorization check");
            incoming.refuse(&refused.message);
            return;
        }
        crate::ssh_term::watch_session(incoming, &joined, &header.user, &prepared).await;
        return;
    }
    // The agent's own authorization check, before anything local is touched: the certificate
    // the engine forwarded, verified against the user CA, under the cluster's roles and locks.
    let labels = announced_labels(&prepared.labels, &prepared.services, &header);
    let session = match policy.admit(&header, client_cert.as_deref(), labels, unix_now()) {
        Ok(session) => session,
        Err(refused) => {
            tracing::warn!(
                reason = refused.reason,
                login = header.login.as_deref().unwrap_or(""),
                db_user = header.db_user.as_deref().unwrap_or(""),
                error = %refused.message,
                "stream refused by the agent's authorization check"
            );
            prepared.denials.0.record(&crate::hooks::AccessDenial {
                user: header.user.clone(),
                roles: header.roles.clone(),
                kind: header.kind.as_str().to_string(),
                target: header.target.clone(),
                login: header.login.clone(),
                db_user: header.db_user.clone(),
                client_addr: header.client_addr.clone(),
                reason: refused.message.clone(),
            });
            incoming.refuse(&refused.message);
            return;
        }
    };
    // The web terminal: the agent is the SSH client of sshd (`ssh_term/terminal.rs`).
    if header.terminal {
        let Some(admitted) = &session else {
            let message = "the web terminal needs the agent to check sessions against the \
                           cluster's roles, and this agent runs without them";
            tracing::warn!(reason = "no_policy", "web terminal refused");
            incoming.refuse(message);
            return;
        };
        let term = crate::ssh_term::Terminate {
            recording: admitted.recording,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            policy: admitted.policy.clone(),
            client_cert: client_cert.unwrap_or_default(),
        };
        let served = crate::ssh_term::serve_terminal(incoming, header, local, prepared, term);
        futures_lite::future::or(served, async {
            match admitted.ended().await {
                Ended::Locked => tracing::info!("web terminal ended: a lock matches it"),
                Ended::Revoked => {
                    tracing::info!("web terminal ended: a role change took the user's access away")
                }
                Ended::CertificateExpired => {
                    tracing::info!("web terminal ended: the user's certificate expired")
                }
            }
        })
        .await;
        return;
    }
    // A session whose role records it is terminated here (`ssh_term.rs`), when it can be.
    let terminate = match (&session, header.kind) {
        (Some(session), DialKind::Ssh) if session.recording.records() => {
            if !prepared.ssh.available()
                && session.recording.mode == crate::recording::RecordingMode::Strict
            {
                let message = "this session must be recorded (record_session: strict), and \
                               this agent does not record SSH sessions";
                tracing::warn!(reason = "unrecordable", "stream refused");
                incoming.refuse(message);
                return;
            }
            prepared
                .ssh
                .available()
                .then(|| crate::ssh_term::Terminate {
                    recording: session.recording,
                    permit_port_forwarding: session.permit_port_forwarding,
                    permit_agent_forwarding: session.permit_agent_forwarding,
                    policy: session.policy.clone(),
                    client_cert: client_cert.clone().unwrap_or_default(),
                })
        }
        _ => None,
    };
    drop(client_cert);
    let served = async move {
        let incoming = match terminate {
            Some(term) => {
                match crate::ssh_term::serve(
                    incoming,
                    header.clone(),
                    local.clone(),
                    prepared.clone(),
                    term,
                )
                .await
                {
                    Ok(()) => return,
                    Err(incoming) => incoming,
                }
            }
            None => incoming,
        };
        serve_local(incoming, header, local, prepared).await;
    };
    let Some(session) = session else {
        served.await;
        return;
    };
    // A lock or a role change that arrives with a newer policy, or the certificate's expiry when a role sets
    // `disconnect_expired_cert`, ends the session: dropping `served` resets the user's stream
    // and closes the local connection.
    futures_lite::future::or(served, async {
        match session.ended().await {
            Ended::Locked => tracing::info!("session ended: a lock matches it"),
            Ended::Revoked => {
                tracing::info!("session ended: a role change took the user's access away")
            }
            Ended::CertificateExpired => {
                tracing::info!("session ended: the user's certificate expired")
            }
        }
    })
    .await;
}

/// Serves an admitted stream with the local service `local`.
async fn serve_local(
    incoming: Incoming,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
) {
    if header.kind == DialKind::Db {
        if !prepared.db.has_provider() {
            let refusal = Refusal::DbNoCertificates {
                target: header.target.clone(),
            };
            tracing::warn!(blame = %refusal.blame(), %refusal, "stream refused");
            incoming.refuse(&refusal.to_string());
            return;
        }
        // Databases are spoken, not spliced: the agent logs in to the server itself.
        let protocol = prepared
            .services
            .dbs
            .iter()
            .find(|d| d.name == header.target)
            .map(|d| d.protocol);
        match protocol {
            Some(DbProtocol::Mysql) => {
                crate::mysql::serve(incoming, header, local, prepared).await;
            }
            _ => crate::postgres::serve(incoming, header, local, prepared).await,
        }
        return;
    }
    if header.kind == DialKind::App {
        // HTTP apps are spoken, not spliced: the agent's reverse proxy reads each request and
        // adds the user's JWT (an upgrade is spliced after the app's 101).
        crate::http_app::serve(incoming, header, local, prepared).await;
        return;
    }
    let tcp = match crate::serve::connect_local(&local, &prepared, "local_unreachable").await {
        Ok(tcp) => tcp,
        Err(message) => {
            incoming.refuse(&message);
            return;
        }
    };
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            // The user gave up (or the tunnel ended) while we connected.
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return;
        }
    };
    tracing::info!(
        login = header.login.as_deref().unwrap_or(""),
        local = %local.addr,
        "stream open"
    );
    log_splice_outcome(splice(stream, tcp).await, "stream");
}

/// Logs how a session's splice ended (`what`: "stream", "db session"), blaming the engine side
/// (A) or the local service (B) for an error.
pub(crate) fn log_splice_outcome(outcome: Result<Spliced, SpliceError>, what: &'static str) {
    match outcome {
        Ok(moved) => tracing::info!(
            session = what,
            bytes_to_local = moved.a_to_b,
            bytes_to_user = moved.b_to_a,
            "closed"
        ),
        Err(e) => {
            let blame = match e.side {
                Side::A => Blame::Engine,
                Side::B => Blame::LocalService,
            };
            tracing::info!(
                session = what,
                %blame,
                bytes_to_local = e.spliced.a_to_b,
                bytes_to_user = e.spliced.b_to_a,
                error = %e.source,
                op = e.op,
                "ended with an error"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::collections::BTreeMap;

    use jaunt_config::file::{AppService, DbService, SshService};

    use super::*;

    fn services(ssh: bool) -> AgentServices {
        let app = |name: &str, protocol, addr: &str| AppService {
            name: name.into(),
            uri: String::new(),
            protocol,
            addr: addr.parse().unwrap(),
            labels: BTreeMap::new(),
        };
        AgentServices {
            ssh: ssh.then(|| SshService {
                addr: "127.0.0.1:22".parse().unwrap(),
                labels: BTreeMap::new(),
            }),
            apps: vec![
                app("redis", AppProtocol::Tcp, "127.0.0.1:6379"),
                app("grafana", AppProtocol::Http, "127.0.0.1:3000"),
            ],
            dbs: vec![DbService {
                name: "pg".into(),
                uri: String::new(),
                protocol: DbProtocol::Postgres,
                addr: "127.0.0.1:5432".parse().unwrap(),
                labels: BTreeMap::new(),
            }],
        }
    }

    fn header(kind: DialKind, target: &str) -> StreamHeader {
        StreamHeader {
            join: None,
            terminal: false,
            kind,
            target: target.into(),
            login: Some("root".into()),
            db_user: None,
            db_name: None,
            user: "alice".into(),
            roles: vec!["access".into()],
            client_addr: "192.0.2.1:5555".into(),
            allowed_db_users: Vec::new(),
            allowed_db_names: Vec::new(),
            session_id: None,
        }
    }

    fn refusal(services: &AgentServices, kind: DialKind, target: &str) -> String {
        route(services, "node1", &header(kind, target))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn routes_ssh_and_tcp_apps() {
        let s = services(true);
        let ssh = route(&s, "node1", &header(DialKind::Ssh, "node1")).unwrap();
        assert_eq!(
            (ssh.what.as_str(), ssh.addr.to_string().as_str()),
            ("sshd", "127.0.0.1:22")
        );
        let tcp = route(&s, "node1", &header(DialKind::Tcp, "redis")).unwrap();
        assert_eq!(tcp.what, "app redis");
        assert_eq!(tcp.addr.port, 6379);
        let db = route(&s, "node1", &header(DialKind::Db, "pg")).unwrap();
        assert_eq!(
            (db.what.as_str(), db.addr.to_string().as_str()),
            ("database pg", "127.0.0.1:5432")
        );
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let s = services(true);
        assert_eq!(
            refusal(&services(false), DialKind::Ssh, "node1"),
            "node node1 does not serve SSH (agent.services.ssh is not configured)"
        );
        assert_eq!(
            refusal(&s, DialKind::Ssh, "web2"),
            "this agent is node node1, not web2"
        );
        assert_eq!(
            refusal(&s, DialKind::Tcp, "nope"),
            "node node1 serves no TCP app named nope"
        );
        assert_eq!(
            refusal(&s, DialKind::Tcp, "grafana"),
            "app grafana is an http app, and HTTP apps are not supported by this agent yet"
        );
        assert_eq!(
            refusal(&s, DialKind::Db, "mysql"),
            "node node1 serves no database named mysql"
        );
    }
}
