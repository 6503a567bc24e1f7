//! What control signs for databases, and the checks both sides share: the identity of a
//! database client certificate (`POST /v1/db/cert`, for an agent; handler in
//! `service/agent.rs`) and of a database server certificate (`POST /v1/ca/sign-db`, for an
//! admin; handler in `service/certs.rs`, client `jaunt ca sign-db` in `db_cmd.rs`), their
//! lifetimes, and the database user and host names they may carry.
//!
//! Pure functions, no I/O; no other module of this crate is used here.

use std::net::IpAddr;

use jaunt_config::identity::{Identity, IdentityKind};

/// Default lifetime of a database client certificate: the agent caches it and asks for a new one
/// after two thirds of it; a session outlives its certificate (it is checked at login only).
pub const DB_CLIENT_CERT_TTL_SECS: u64 = 3600;
/// Longest database client certificate control issues.
pub const MAX_DB_CLIENT_CERT_TTL_SECS: u64 = 12 * 3600;
/// Longest database server certificate (`jaunt ca sign-db --ttl`).
pub const MAX_DB_SERVER_CERT_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// PostgreSQL truncates identifiers to 63 bytes (NAMEDATALEN − 1): a longer user name could
/// never be the one the server checks the certificate's CN against.
pub const MAX_DB_USER_BYTES: usize = 63;

/// Checks a database user name: non-empty, at most [`MAX_DB_USER_BYTES`], no control
/// characters (it becomes a certificate's CN and appears in the audit log).
pub fn valid_db_user(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("db_user is empty".into());
    }
    if name.len() > MAX_DB_USER_BYTES {
        return Err(format!(
            "db_user {name:?} is longer than PostgreSQL's {MAX_DB_USER_BYTES}-byte identifiers"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("db_user {name:?} contains control characters"));
    }
    Ok(())
}

/// The identity of a database client certificate: CN = the database user (what PostgreSQL's
/// `cert` authentication compares with the user name), valid `ttl_secs` from `now`.
pub fn db_client_identity(cluster: &str, db_user: &str, now: u64, ttl_secs: u64) -> Identity {
    Identity {
        db_users: vec![db_user.to_string()],
        ..Identity::issued(IdentityKind::User, db_user, cluster, now, ttl_secs)
    }
}

/// The subject alternative names of a database server certificate for `hosts`: each must be a
/// DNS name or an IP address; `localhost` also covers `127.0.0.1` and `::1` (a db URI usually
/// names the loopback address, and the agent checks the certificate against the URI's host).
pub fn db_server_names(hosts: &[String]) -> Result<Vec<String>, String> {
    if hosts.is_empty() {
        return Err("give at least one host name".into());
    }
    let mut names: Vec<String> = Vec::new();
    let mut push = |name: String| {
        if !names.contains(&name) {
            names.push(name);
        }
    };
    for host in hosts {
        let host = host.trim();
        let ok = host.parse::<IpAddr>().is_ok()
            || (!host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if !ok {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        push(host.to_ascii_lowercase());
        if host.eq_ignore_ascii_case("localhost") {
            push("127.0.0.1".into());
            push("::1".into());
        }
    }
    Ok(names)
}

/// The identity of a database server certificate (a host identity, so it carries ServerAuth).
pub fn db_server_identity(cluster: &str, names: &[String], now: u64, ttl_secs: u64) -> Identity {
    let name = names.first().map(String::as_str).unwrap_or_default();
    Identity {
        roles: vec!["db-server".into()],
        logins: names.to_vec(),
        ..Identity::issued(IdentityKind::Host, name, cluster, now, ttl_secs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn server_names_cover_loopback_for_localhost() {
        assert_eq!(
            db_server_names(&["localhost".into()]).unwrap(),
            ["localhost", "127.0.0.1", "::1"]
        );
        assert_eq!(
            db_server_names(&[
                "db.internal".into(),
                "10.0.0.5".into(),
                "DB.internal".into()
            ])
            .unwrap(),
            ["db.internal", "10.0.0.5"]
        );
        assert!(db_server_names(&[]).is_err());
        for bad in ["", "bad name", "a..b", "x/y", "[::1]"] {
            assert!(db_server_names(&[bad.into()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn db_users_are_checked() {
        assert!(valid_db_user("alice").is_ok());
        assert!(valid_db_user("Alice Smith").is_ok());
        assert!(valid_db_user("").is_err());
        assert!(valid_db_user(&"a".repeat(64)).is_err());
        assert!(valid_db_user("a\nb").is_err());
    }

    #[test]
    fn client_identity_names_the_db_user() {
        let id = db_client_identity("c", "alice", 1000, 3600);
        assert_eq!(
            (id.name.as_str(), id.expires, id.not_before),
            ("alice", 4600, 940)
        );
        assert_eq!(id.kind, IdentityKind::User);
        let server = db_server_identity("c", &["localhost".into(), "::1".into()], 1000, 60);
        assert_eq!(server.name, "localhost");
        assert_eq!(server.kind, IdentityKind::Host);
    }
}
