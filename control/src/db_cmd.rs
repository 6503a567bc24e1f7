//! Database access (PostgreSQL, MySQL/MariaDB), the client side: `jaunt ca sign-db`,
//! `jaunt proxy db` and `jaunt db connect`. What control signs for databases is `db_certs.rs`;
//! the API bodies are [`jaunt_config::api::DbCertRequest`] and the rest; the agent's side is
//! `agent_host/certs.rs`.
//!
//! The user's client speaks plain PostgreSQL or MySQL to a local listener on 127.0.0.1; every
//! connection becomes one dial (kind `db`, ALPN `jaunt-postgres` whatever the database's
//! protocol: the engine only routes it) through the engine to the agent, which logs in to the
//! server with a certificate for the database user. Which protocol a database speaks comes
//! from the inventory (`GET /v1/inventory`, as `jaunt ls dbs` shows it): it picks the client
//! `jaunt db connect` runs (`psql`, else `mariadb` or `mysql`) and the language of local
//! refusals. When the dial itself is refused, the listener answers the client in its protocol
//! (PostgreSQL: an ErrorResponse after its startup message; MySQL: an ERR packet in place of
//! the server's greeting), so the client prints the reason (`FATAL:  jaunt: ...`,
//! `ERROR 1045 (HY000): jaunt: ...`) instead of "server closed the connection".

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use jaunt_agent::mysql::wire as mysql_wire;
use jaunt_agent::postgres::wire::{self, FirstMessage};
use jaunt_config::api::{DbCertResponse, SignDbRequest};
use jaunt_config::identity::Identity;
use jaunt_config::wire::dial::{DialKind, DialRequest};

use crate::access::{self, Dialer};
use crate::client::{Client, Trust};
use crate::db_certs::{db_server_names, valid_db_user};
use crate::profile::{self, Profile};

/// How long the local listener waits for a refused client's startup message.
const LOCAL_REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

// ---- jaunt ca sign-db ----

/// `jaunt ca sign-db --host H[,H2..] --out DIR`: a key made here, a server certificate from the
/// db CA; writes `DIR/H.crt`, `DIR/H.key` (0600) and `DIR/jaunt-db-ca.crt`.
pub fn sign_db(
    client: &Client,
    hosts: &str,
    out: &Path,
    ttl_secs: Option<u64>,
) -> anyhow::Result<()> {
    let hosts: Vec<String> = hosts
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    let names = db_server_names(&hosts).map_err(|e| anyhow!("--host: {e}"))?;
    let file_stem = names.first().cloned().unwrap_or_default().replace(':', "_");
    let key = rcgen::KeyPair::generate()?;
    let resp: DbCertResponse = client.post_json(
        "/v1/ca/sign-db",
        &SignDbRequest {
            hosts,
            tls_public_key: key.public_key_pem(),
            ttl_secs,
        },
    )?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cert_path = out.join(format!("{file_stem}.crt"));
    let key_path = out.join(format!("{file_stem}.key"));
    let ca_path = out.join("jaunt-db-ca.crt");
    profile::write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, &resp.tls_cert)?;
    write_public(&ca_path, &resp.db_ca)?;
    println!(
        "Wrote {} and {} (valid until {}; names: {}), and the db CA to {}.",
        cert_path.display(),
        key_path.display(),
        crate::audit::rfc3339(resp.expires),
        names.join(", "),
        ca_path.display()
    );
    println!("For postgresql.conf (the key must belong to the server's user: chown postgres):");
    println!("  ssl = on");
    println!("  ssl_cert_file = '{}'", cert_path.display());
    println!("  ssl_key_file = '{}'", key_path.display());
    println!(
        "  ssl_ca_file = '{}'   # also: jaunt ca export --type db",
        ca_path.display()
    );
    println!("For pg_hba.conf (agents log in with certificates whose CN is the database user):");
    println!("  hostssl all all 127.0.0.1/32 cert");
    println!(
        "For MySQL/MariaDB ([mariadbd] or [mysqld] in my.cnf; the key must be readable by the \
         server's user: chown mysql):"
    );
    println!("  ssl_cert = {}", cert_path.display());
    println!("  ssl_key = {}", key_path.display());
    println!(
        "  ssl_ca = {}   # also: jaunt ca export --type db",
        ca_path.display()
    );
    println!(
        "and for each database user (no password; agents log in with a certificate whose CN is \
         the user):"
    );
    println!(
        "  CREATE USER 'alice'@'%' REQUIRE SUBJECT '{}';   -- or REQUIRE X509",
        db_client_subject(&cluster_of(&resp.tls_cert), "alice")
    );
    Ok(())
}

/// The subject of the db client certificates control issues for `db_user`, as MySQL and
/// MariaDB spell it in `REQUIRE SUBJECT` (`/CN=user/O=cluster`, in certificate order).
pub fn db_client_subject(cluster: &str, db_user: &str) -> String {
    format!("/CN={db_user}/O={cluster}")
}

/// The cluster a certificate from control was issued by (its `O=`); `CLUSTER` if unreadable.
fn cluster_of(cert_pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .ok()
        .and_then(|der| Identity::from_x509_der(&der).ok())
        .map_or_else(|| "CLUSTER".to_string(), |id| id.cluster)
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    profile::write_private(path, text.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", path.display()))
}

// ---- jaunt proxy db, jaunt db connect ----

/// The dial of a database session.
pub fn db_request(name: &str, db_user: &str, db_name: Option<&str>) -> anyhow::Result<DialRequest> {
    let request = DialRequest {
        join: None,
        kind: DialKind::Db,
        target: name.to_string(),
        login: None,
        db_user: Some(db_user.to_string()),
        db_name: db_name.map(str::to_string),
    };
    request.validate().map_err(|e| anyhow!("{e}"))?;
    valid_db_user(db_user).map_err(|e| anyhow!("--db-user: {e}"))?;
    Ok(request)
}

/// The wire protocol of a database, as the local listener and the client must speak it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbWire {
    Postgres,
    Mysql,
}

/// The protocol of database `name`, from the inventory. A database the inventory does not list
/// (not connected, or a typo) reads as PostgreSQL: the dial will be refused and the refusal
/// says why.
pub fn db_wire(profile: &Profile, name: &str) -> DbWire {
    let lookup = || -> anyhow::Result<Vec<jaunt_config::api::ResourceInfo>> {
        let Some(info) = profile.load()? else {
            return Ok(Vec::new());
        };
        let client = Client::new(
            &info.proxy,
            Trust::Roots(profile.host_ca()?),
            Some(profile.tls_identity(&info.user)?),
        )?;
        Ok(client.get_json("/v1/inventory")?)
    };
    match lookup() {
        Ok(all) => match all.iter().find(|r| r.kind == "db" && r.name == name) {
            Some(r) if r.protocol == "mysql" => DbWire::Mysql,
            _ => DbWire::Postgres,
        },
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "no inventory; assuming PostgreSQL");
            DbWire::Postgres
        }
    }
}

/// `jaunt proxy db NAME [--port P] --db-user U [--db-name D]`: a local listener for any
/// PostgreSQL or MySQL client, as the database speaks (no TLS from the client: the hop to the
/// cluster is TLS already; psql's default `prefer` works, and MySQL clients are offered none).
/// Runs until killed.
pub fn proxy(name: &str, port: u16, db_user: &str, db_name: Option<&str>) -> anyhow::Result<()> {
    let profile = Profile::user_default();
    let (dialer, _) = Dialer::from_profile(&profile)?;
    let request = db_request(name, db_user, db_name)?;
    let wire = db_wire(&profile, name);
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let port = listener.local_addr()?.port();
    println!("Proxying {name} on 127.0.0.1:{port}");
    match wire {
        DbWire::Postgres => {
            let database = db_name.unwrap_or(db_user);
            println!("  psql \"{}\"", conninfo(port, db_user, Some(database)));
        }
        DbWire::Mysql => println!("  mariadb {}", mysql_args(port, db_user, db_name).join(" ")),
    }
    let _ = std::io::stdout().flush();
    serve_local(listener, Arc::new(dialer), request, false, wire)
}

/// The `mariadb`/`mysql` arguments for the local listener (no password: none is checked).
pub fn mysql_args(port: u16, db_user: &str, db_name: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--protocol=TCP".to_string(),
        "--host=127.0.0.1".to_string(),
        format!("--port={port}"),
        format!("--user={db_user}"),
    ];
    if let Some(db) = db_name {
        args.push(format!("--database={db}"));
    }
    args
}

/// `jaunt db connect NAME --db-user U [--db-name D] [-- CLIENT ARGS]`: a listener on
/// 127.0.0.1:0 and the database's client connected to it (`psql`; `mariadb`, else `mysql`);
/// exits with the client's exit code.
pub fn connect(
    name: &str,
    db_user: &str,
    db_name: Option<&str>,
    client_args: &[String],
) -> anyhow::Result<ExitCode> {
    let profile = Profile::user_default();
    let (dialer, _) = Dialer::from_profile(&profile)?;
    let request = db_request(name, db_user, db_name)?;
    let wire = db_wire(&profile, name);
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot listen on 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    let dialer = Arc::new(dialer);
    std::thread::Builder::new()
        .name("jaunt-db-listener".into())
        .spawn(move || serve_local(listener, dialer, request, true, wire))
        .context("cannot start the local listener")?;
    // Ctrl-C is psql's (it cancels the running query through a new connection to the listener):
    // this process must outlive it, so SIGINT only sets a flag nobody reads.
    signal_hook::flag::register(
        signal_hook::consts::SIGINT,
        Arc::new(AtomicBool::new(false)),
    )
    .context("installing the SIGINT handler")?;
    let status = match wire {
        DbWire::Postgres => {
            let mut cmd = std::process::Command::new("psql");
            cmd.arg("-d").arg(conninfo(port, db_user, db_name));
            cmd.args(client_args);
            cmd.status().context(
                "cannot run psql: is the PostgreSQL client installed (apt-get install \
                 postgresql-client)?",
            )?
        }
        DbWire::Mysql => {
            // MariaDB's client, whose --skip-ssl keeps newer versions from insisting on TLS to
            // the local listener (the hop to the cluster is TLS); else MySQL's, which falls
            // back to plain TCP when no TLS is offered.
            let mut cmd = std::process::Command::new("mariadb");
            cmd.args(mysql_args(port, db_user, db_name))
                .arg("--skip-ssl")
                .args(client_args);
            match cmd.status() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut cmd = std::process::Command::new("mysql");
                    cmd.args(mysql_args(port, db_user, db_name))
                        .args(client_args);
                    cmd.status().context(
                        "cannot run mariadb or mysql: is a MySQL client installed (apt-get \
                         install mariadb-client)?",
                    )?
                }
                other => other.context("cannot run mariadb")?,
            }
        }
    };
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}

/// A libpq connection string for the local listener: plain TCP (the hop to the cluster is TLS),
/// no GSSAPI.
pub fn conninfo(port: u16, db_user: &str, db_name: Option<&str>) -> String {
    let mut out = format!(
        "host=127.0.0.1 port={port} user={}",
        conninfo_value(db_user)
    );
    if let Some(db) = db_name {
        out.push_str(&format!(" dbname={}", conninfo_value(db)));
    }
    out.push_str(" sslmode=disable gssencmode=disable");
    out
}

/// A conninfo value: bare if it is plain, else single-quoted with `\` and `'` escaped.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Dials `request` for every accepted connection (a thread each) and carries the bytes; a
/// refused dial is answered in the database's protocol so the client shows why. `quiet`: do
/// not also print the refusal here (the client prints it).
pub fn serve_local(
    listener: TcpListener,
    dialer: Arc<Dialer>,
    request: DialRequest,
    quiet: bool,
    wire: DbWire,
) -> anyhow::Result<()> {
    for conn in listener.incoming() {
        let local = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("jaunt: accept failed: {e}");
                continue;
            }
        };
        let _ = local.set_nodelay(true);
        let dialer = dialer.clone();
        let request = request.clone();
        std::thread::spawn(move || match dialer.dial(&request) {
            Ok(session) => {
                if let Err(e) = access::pipe_tcp(session, local) {
                    eprintln!("jaunt: connection to {} ended: {e:#}", request.target);
                }
            }
            Err(e) => {
                if !quiet {
                    eprintln!("jaunt: cannot connect to {}: {e:#}", request.target);
                }
                let message = format!("jaunt: {e:#}");
                match wire {
                    DbWire::Postgres => refuse_locally(local, &message),
                    DbWire::Mysql => refuse_locally_mysql(local, &message),
                }
            }
        });
    }
    Ok(())
}

/// Answers a local client whose dial was refused: `N` to encryption requests, then a FATAL
/// ErrorResponse once its startup message is in (bounded in time and size).
pub fn refuse_locally(mut local: TcpStream, message: &str) {
    let _ = local.set_read_timeout(Some(LOCAL_REFUSAL_TIMEOUT));
    let _ = local.set_write_timeout(Some(LOCAL_REFUSAL_TIMEOUT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut negotiations = 0;
    loop {
        match wire::parse_first(&buf) {
            Ok(Some((FirstMessage::SslRequest | FirstMessage::GssEncRequest, used))) => {
                negotiations += 1;
                if negotiations > 2 || local.write_all(&[wire::NO_ENCRYPTION]).is_err() {
                    return;
                }
                buf.drain(..used);
            }
            Ok(Some((FirstMessage::Cancel(_), _))) => return,
            Ok(Some((FirstMessage::Startup(_), _))) | Err(_) => {
                let reply =
                    wire::error_response("FATAL", wire::SQLSTATE_CONNECTION_FAILURE, message);
                let _ = local.write_all(&reply);
                let _ = local.flush();
                let _ = local.shutdown(std::net::Shutdown::Write);
                // Let the client read the reply and close first.
                let _ = local.read(&mut chunk);
                return;
            }
            Ok(None) => match local.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
        }
    }
}

/// Answers a local MySQL client whose dial was refused: an ERR packet where the server's
/// greeting would be (as a server that refuses a host does), code 1045 for a refusal and 1429
/// (cannot connect) for anything else.
pub fn refuse_locally_mysql(mut local: TcpStream, message: &str) {
    let _ = local.set_write_timeout(Some(LOCAL_REFUSAL_TIMEOUT));
    let _ = local.set_read_timeout(Some(LOCAL_REFUSAL_TIMEOUT));
    let code = if message.contains("denied") {
        mysql_wire::code::ACCESS_DENIED
    } else {
        mysql_wire::code::CANNOT_CONNECT
    };
    let reply = mysql_wire::packet(0, &mysql_wire::err_packet(code, None, message));
    let _ = local.write_all(&reply);
    let _ = local.flush();
    let _ = local.shutdown(std::net::Shutdown::Write);
    // Let the client read the reply and close first.
    let _ = local.read(&mut [0u8; 256]);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quotes_what_needs_it() {
        assert_eq!(
            conninfo(5432, "alice", Some("postgres")),
            "host=127.0.0.1 port=5432 user=alice dbname=postgres sslmode=disable gssencmode=disable"
        );
        assert_eq!(
            conninfo(1, "o'neil smith", None),
            r"host=127.0.0.1 port=1 user='o\'neil smith' sslmode=disable gssencmode=disable"
        );
    }

    #[test]
    fn a_refused_dial_reads_as_a_postgres_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            refuse_locally(conn, "jaunt: no such database \"pg9\"");
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(&wire::SSL_REQUEST).unwrap();
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], b'N');
        client
            .write_all(&wire::Startup::encode(&[("user", "alice")]))
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        server.join().unwrap();
        assert_eq!(reply[0], b'E');
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.contains("SFATAL") && text.contains("no such database \"pg9\""),
            "{text}"
        );
    }
}
