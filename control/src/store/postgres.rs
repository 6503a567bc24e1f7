//! The PostgreSQL backend: cluster state and the audit log in one database that several control
//! hosts share (`storage: {type: postgres, conn_string: ...}`), through the blocking client in
//! `pg.rs`.
//!
//! - Migrations are numbered like SQLite's (index + 1 is the version, kept in
//!   `jaunt_schema`); each runs in its own transaction under a transaction-level advisory lock,
//!   so two controls starting at once apply each exactly once.
//! - The change feed: statement-level triggers on users, roles, tokens, locks, cas and keys bump
//!   the single row of `jaunt_revision` in the writer's transaction; every control polls it
//!   ([`Backend::revision`]) and publishes a new snapshot when it moved, so a change made
//!   through one control is in force on every other within the poll period plus one snapshot
//!   build.
//! - Durability: a call returns only after `COMMIT` was acknowledged, so a `kill -9` of a
//!   control loses no acknowledged write.
//!
//! Not here: connection handling and TLS (`pg.rs`), the change count (`Store`), policy.

use jaunt_config::pgconn::ConnInfo;

use super::pg::{Conn, Outcome, PgConfig, PgError, Pool, Row};
use super::{
    AuditQuery, Backend, Result, StoreError, StoredCa, StoredEvent, StoredHost, StoredLock,
    StoredMember, StoredRotation, StoredToken, StoredUser, TokenCheck,
};
use crate::pg_params as params;

/// Numbered migrations; index + 1 is the schema version they produce.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema (SQLite's version 1) plus the revision counter and its triggers.
    "CREATE TABLE cas (
        name TEXT PRIMARY KEY,
        x509_key_pem TEXT NOT NULL,
        x509_cert_pem TEXT NOT NULL,
        ssh_key TEXT NOT NULL,
        created BIGINT NOT NULL
     );
     CREATE TABLE keys (name TEXT PRIMARY KEY, pem TEXT NOT NULL, created BIGINT NOT NULL);
     CREATE TABLE users (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        otp_secret TEXT,
        created BIGINT NOT NULL
     );
     CREATE TABLE roles (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated BIGINT NOT NULL);
     CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        types TEXT NOT NULL,
        expires BIGINT NOT NULL,
        single_use BOOLEAN NOT NULL,
        created BIGINT NOT NULL
     );
     CREATE TABLE locks (id TEXT PRIMARY KEY, spec TEXT NOT NULL, expires BIGINT, created BIGINT NOT NULL);
     CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        types TEXT NOT NULL,
        joined BIGINT NOT NULL,
        last_seen BIGINT NOT NULL
     );
     CREATE TABLE resources (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        host_id TEXT,
        spec TEXT NOT NULL,
        updated BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
     );
     CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY,
        time BIGINT NOT NULL,
        code TEXT NOT NULL,
        type TEXT NOT NULL,
        \"user\" TEXT,
        event TEXT NOT NULL
     );
     CREATE INDEX audit_time ON audit (time);
     CREATE INDEX audit_type_time ON audit (type, time);
     CREATE TABLE jaunt_revision (id INT PRIMARY KEY CHECK (id = 1), rev BIGINT NOT NULL);
     INSERT INTO jaunt_revision VALUES (1, 0);
     CREATE FUNCTION jaunt_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN UPDATE jaunt_revision SET rev = rev + 1 WHERE id = 1; RETURN NULL; END $$;
     CREATE TRIGGER users_rev AFTER INSERT OR UPDATE OR DELETE ON users
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();
     CREATE TRIGGER roles_rev AFTER INSERT OR UPDATE OR DELETE ON roles
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();
     CREATE TRIGGER tokens_rev AFTER INSERT OR UPDATE OR DELETE ON tokens
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();
     CREATE TRIGGER locks_rev AFTER INSERT OR UPDATE OR DELETE ON locks
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();
     CREATE TRIGGER cas_rev AFTER INSERT OR UPDATE OR DELETE ON cas
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();
     CREATE TRIGGER keys_rev AFTER INSERT OR UPDATE OR DELETE ON keys
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();",
    // 2: leases for single-writer jobs, heartbeats of control+engine hosts.
    "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires BIGINT NOT NULL);
     CREATE TABLE members (
        id TEXT PRIMARY KEY,
        control_addr TEXT NOT NULL,
        public_addr TEXT NOT NULL,
        version TEXT NOT NULL,
        started BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        state TEXT NOT NULL
     );",
    // 3: CA rotation state (issue 13), as SQLite's version 2.
    "CREATE TABLE ca_rotation (
        name TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        seq BIGINT NOT NULL,
        next_x509_key_pem TEXT,
        next_x509_cert_pem TEXT,
        next_ssh_key TEXT,
        grace BIGINT,
        deadline BIGINT,
        updated BIGINT NOT NULL
     );
     CREATE TRIGGER ca_rotation_rev AFTER INSERT OR UPDATE OR DELETE ON ca_rotation
       FOR EACH STATEMENT EXECUTE FUNCTION jaunt_bump_revision();",
];

/// An arbitrary constant: the advisory lock key migrations take.
const MIGRATION_LOCK: i64 = 0x006a_6175_6e74;

/// The PostgreSQL store.
pub struct Postgres {
    pool: Pool,
}

impl Postgres {
    /// Connects (settings from `info`, the `PG*` environment and libpq's defaults) and brings
    /// the schema up to date. A wrong password or an unreachable server is an error here.
    pub fn connect(info: &ConnInfo) -> Result<Postgres> {
        let cfg = PgConfig::resolve(info, &|k| std::env::var(k).ok())?;
        let pool = Pool::connect(cfg)?;
        pool.with(migrate)?;
        Ok(Postgres { pool })
    }

    fn query(&self, sql: &str, params: &[Option<String>]) -> Result<Outcome> {
        Ok(self.pool.query(sql, params)?)
    }

    fn rows<T>(
        &self,
        sql: &str,
        params: &[Option<String>],
        f: impl Fn(&Row) -> std::result::Result<T, PgError>,
    ) -> Result<Vec<T>> {
        let out = self.query(sql, params)?;
        Ok(out
            .rows
            .iter()
            .map(f)
            .collect::<std::result::Result<_, _>>()?)
    }

    fn first<T>(
        &self,
        sql: &str,
        params: &[Option<String>],
        f: impl Fn(&Row) -> std::result::Result<T, PgError>,
    ) -> Result<Option<T>> {
        Ok(self.rows(sql, params, f)?.into_iter().next())
    }

    /// Connection target, for status output (never the password).
    pub fn target(&self) -> String {
        self.pool.config().target()
    }
}

fn migrate(c: &mut Conn) -> std::result::Result<(), PgError> {
    let known = MIGRATIONS.len() as i64;
    // Under the lock too: concurrent CREATE TABLE IF NOT EXISTS can fail on the type's name.
    c.transaction(|c| {
        c.query(
            "SELECT pg_advisory_xact_lock($1::bigint)",
            &params![MIGRATION_LOCK],
        )?;
        c.batch("CREATE TABLE IF NOT EXISTS jaunt_schema (version BIGINT NOT NULL)")
    })?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        let done = c.transaction(|c| {
            c.query(
                "SELECT pg_advisory_xact_lock($1::bigint)",
                &params![MIGRATION_LOCK],
            )?;
            let found = c
                .query("SELECT max(version) FROM jaunt_schema", &[])?
                .rows
                .first()
                .map(|r| r.opt_i64(0))
                .transpose()?
                .flatten()
                .unwrap_or(0);
            if found > known {
                return Ok(Err(found));
            }
            if found >= version {
                return Ok(Ok(()));
            }
            c.batch(sql)?;
            c.query("DELETE FROM jaunt_schema", &[])?;
            c.query(
                "INSERT INTO jaunt_schema (version) VALUES ($1::bigint)",
                &params![version],
            )?;
            Ok(Ok(()))
        })?;
        if let Err(found) = done {
            return Err(PgError::Protocol(format!(
                "store schema version {found} is newer than this jaunt understands ({known}); upgrade jaunt"
            )));
        }
    }
    // A database that is newer than this binary, with no migration left to run.
    let found = c
        .query("SELECT max(version) FROM jaunt_schema", &[])?
        .rows
        .first()
        .map(|r| r.opt_i64(0))
        .transpose()?
        .flatten()
        .unwrap_or(0);
    if found > known {
        return Err(PgError::Protocol(format!(
            "store schema version {found} is newer than this jaunt understands ({known}); upgrade jaunt"
        )));
    }
    Ok(())
}

fn split_list(s: String) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn row_ca(r: &Row) -> std::result::Result<StoredCa, PgError> {
    Ok(StoredCa {
        name: r.text(0)?,
        x509_key_pem: r.text(1)?,
        x509_cert_pem: r.text(2)?,
        ssh_key: r.text(3)?,
    })
}

fn row_user(r: &Row) -> std::result::Result<StoredUser, PgError> {
    Ok(StoredUser {
        name: r.text(0)?,
        spec: r.text(1)?,
        password_hash: r.text(2)?,
        otp_secret: r.opt_text(3)?,
        created: r.u64(4)?,
    })
}

fn row_token(r: &Row) -> std::result::Result<StoredToken, PgError> {
    Ok(StoredToken {
        hash: r.text(0)?,
        types: split_list(r.text(1)?),
        expires: r.u64(2)?,
        single_use: r.bool(3)?,
        created: r.u64(4)?,
    })
}

fn row_host(r: &Row) -> std::result::Result<StoredHost, PgError> {
    Ok(StoredHost {
        id: r.text(0)?,
        name: r.text(1)?,
        types: split_list(r.text(2)?),
        joined: r.u64(3)?,
        last_seen: r.u64(4)?,
    })
}

fn row_event(r: &Row) -> std::result::Result<StoredEvent, PgError> {
    Ok(StoredEvent {
        seq: r.i64(0)?,
        time: r.u64(1)?,
        code: r.text(2)?,
        r#type: r.text(3)?,
        user: r.opt_text(4)?,
        event: r.text(5)?,
    })
}

const AUDIT_FILTER: &str = "($1::bigint IS NULL OR time >= $1::bigint)
    AND ($2::bigint IS NULL OR time <= $2::bigint)
    AND ($3::text IS NULL OR type = $3::text OR type LIKE $3::text || '.%')
    AND ($4::text IS NULL OR \"user\" = $4::text)";

impl Backend for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn schema_version(&self) -> Result<i64> {
        Ok(self
            .first("SELECT max(version) FROM jaunt_schema", &[], |r| {
                r.opt_i64(0)
            })?
            .flatten()
            .unwrap_or(0))
    }

    fn integrity_check(&self) -> Result<String> {
        // The server keeps its own files consistent; a query that answers is the check.
        self.query("SELECT 1", &[])?;
        Ok("ok".into())
    }

    fn revision(&self) -> Result<u64> {
        Ok(self
            .first("SELECT rev FROM jaunt_revision WHERE id = 1", &[], |r| {
                r.u64(0)
            })?
            .unwrap_or(0))
    }

    fn try_lease(&self, name: &str, holder: &str, now: u64, ttl_secs: u64) -> Result<bool> {
        // One statement: taken when free or expired, renewed by its holder, else left alone
        // (no row comes back).
        Ok(self
            .first(
                "INSERT INTO leases (name, holder, expires) VALUES ($1, $2, $3::bigint)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
                 WHERE leases.holder = excluded.holder OR leases.expires <= $4::bigint
                 RETURNING holder",
                &params![name, holder, now.saturating_add(ttl_secs), now],
                |r| r.text(0),
            )?
            .is_some_and(|h| h == holder))
    }

    fn heartbeat(&self, m: &StoredMember, forget_secs: u64) -> Result<()> {
        self.query(
            "INSERT INTO members (id, control_addr, public_addr, version, started, last_seen, state)
             VALUES ($1, $2, $3, $4, $5::bigint, $6::bigint, $7)
             ON CONFLICT (id) DO UPDATE SET control_addr = excluded.control_addr,
               public_addr = excluded.public_addr, version = excluded.version,
               last_seen = excluded.last_seen, state = excluded.state",
            &params![m.id, m.control_addr, m.public_addr, m.version, m.started, m.last_seen, m.state],
        )?;
        self.query(
            "DELETE FROM members WHERE last_seen < $1::bigint",
            &params![m.last_seen.saturating_sub(forget_secs)],
        )?;
        Ok(())
    }

    fn list_members(&self) -> Result<Vec<StoredMember>> {
        self.rows(
            "SELECT id, control_addr, public_addr, version, started, last_seen, state
             FROM members ORDER BY public_addr, id",
            &[],
            |r| {
                Ok(StoredMember {
                    id: r.text(0)?,
                    control_addr: r.text(1)?,
                    public_addr: r.text(2)?,
                    version: r.text(3)?,
                    started: r.u64(4)?,
                    last_seen: r.u64(5)?,
                    state: r.text(6)?,
                })
            },
        )
    }

    fn get_ca(&self, name: &str) -> Result<Option<StoredCa>> {
        self.first(
            "SELECT name, x509_key_pem, x509_cert_pem, ssh_key FROM cas WHERE name = $1",
            &params![name],
            row_ca,
        )
    }

    fn insert_ca_if_absent(&self, ca: &StoredCa, now: u64) -> Result<StoredCa> {
        self.query(
            "INSERT INTO cas (name, x509_key_pem, x509_cert_pem, ssh_key, created)
             VALUES ($1, $2, $3, $4, $5::bigint) ON CONFLICT (name) DO NOTHING",
            &params![ca.name, ca.x509_key_pem, ca.x509_cert_pem, ca.ssh_key, now],
        )?;
        self.get_ca(&ca.name)?
            .ok_or_else(|| StoreError::Postgres(PgError::Protocol("CA vanished".into())))
    }

    fn key_or_insert(&self, name: &str, pem: &str, now: u64) -> Result<String> {
        self.query(
            "INSERT INTO keys (name, pem, created) VALUES ($1, $2, $3::bigint)
             ON CONFLICT (name) DO NOTHING",
            &params![name, pem, now],
        )?;
        self.first(
            "SELECT pem FROM keys WHERE name = $1",
            &params![name],
            |r| r.text(0),
        )?
        .ok_or_else(|| StoreError::Postgres(PgError::Protocol("key vanished".into())))
    }

    fn get_ca_rotation(&self, name: &str) -> Result<Option<StoredRotation>> {
        self.first(
            "SELECT name, phase, seq, next_x509_key_pem, next_x509_cert_pem, next_ssh_key, grace, deadline, updated
             FROM ca_rotation WHERE name = $1",
            &params![name],
            |r| {
                let name = r.text(0)?;
                let next = match r.opt_text(3)? {
                    Some(x509_key_pem) => Some(StoredCa {
                        name: name.clone(),
                        x509_key_pem,
                        x509_cert_pem: r.opt_text(4)?.unwrap_or_default(),
                        ssh_key: r.opt_text(5)?.unwrap_or_default(),
                    }),
                    None => None,
                };
                Ok(StoredRotation {
                    name,
                    phase: r.text(1)?,
                    seq: r.u64(2)?,
                    next,
                    grace: r.opt_i64(6)?.map(|v| v as u64),
                    deadline: r.opt_i64(7)?.map(|v| v as u64),
                    updated: r.u64(8)?,
                })
            },
        )
    }

    fn put_ca_rotation(
        &self,
        rot: &StoredRotation,
        expect_seq: u64,
        promote: Option<&StoredCa>,
    ) -> Result<bool> {
        let next = rot.next.as_ref();
        let written = self.pool.with(|c| {
            c.transaction(|c| {
                // The row lock (or the insert's conflict) makes two controls' phase changes
                // serialize; the loser sees the other's sequence and answers false.
                let seq = c
                    .query(
                        "SELECT seq FROM ca_rotation WHERE name = $1 FOR UPDATE",
                        &params![rot.name],
                    )?
                    .rows
                    .first()
                    .map(|r| r.u64(0))
                    .transpose()?
                    .unwrap_or(0);
                if seq != expect_seq {
                    return Ok(false);
                }
                let out = c.query(
                    "INSERT INTO ca_rotation (name, phase, seq, next_x509_key_pem, next_x509_cert_pem, next_ssh_key, grace, deadline, updated)
                     VALUES ($1, $2, $3::bigint, $4, $5, $6, $7::bigint, $8::bigint, $9::bigint)
                     ON CONFLICT (name) DO UPDATE SET phase = $2, seq = $3::bigint,
                       next_x509_key_pem = $4, next_x509_cert_pem = $5, next_ssh_key = $6,
                       grace = $7::bigint, deadline = $8::bigint, updated = $9::bigint
                     WHERE ca_rotation.seq = $10::bigint",
                    &params![
                        rot.name,
                        rot.phase,
                        rot.seq,
                        next.map(|n| n.x509_key_pem.clone()),
                        next.map(|n| n.x509_cert_pem.clone()),
                        next.map(|n| n.ssh_key.clone()),
                        rot.grace,
                        rot.deadline,
                        rot.updated,
                        expect_seq
                    ],
                )?;
                if out.affected != 1 {
                    return Ok(false);
                }
                match promote {
                    Some(ca) if rot.name == "jwt" => {
                        c.query(
                            "UPDATE keys SET pem = $2 WHERE name = $1",
                            &params![rot.name, ca.x509_key_pem],
                        )?;
                    }
                    Some(ca) => {
                        c.query(
                            "UPDATE cas SET x509_key_pem = $2, x509_cert_pem = $3, ssh_key = $4 WHERE name = $1",
                            &params![rot.name, ca.x509_key_pem, ca.x509_cert_pem, ca.ssh_key],
                        )?;
                    }
                    None => {}
                }
                Ok(true)
            })
        })?;
        Ok(written)
    }

    fn insert_user(&self, u: &StoredUser) -> Result<bool> {
        Ok(self
            .query(
                "INSERT INTO users (name, spec, password_hash, otp_secret, created)
                 VALUES ($1, $2, $3, $4, $5::bigint) ON CONFLICT (name) DO NOTHING",
                &params![u.name, u.spec, u.password_hash, u.otp_secret, u.created],
            )?
            .affected
            == 1)
    }

    fn update_user_spec(&self, name: &str, spec: &str) -> Result<bool> {
        Ok(self
            .query(
                "UPDATE users SET spec = $2 WHERE name = $1",
                &params![name, spec],
            )?
            .affected
            == 1)
    }

    fn set_user_credentials(
        &self,
        name: &str,
        password_hash: &str,
        otp_secret: Option<&str>,
    ) -> Result<bool> {
        Ok(self
            .query(
                "UPDATE users SET password_hash = $2, otp_secret = $3 WHERE name = $1",
                &params![name, password_hash, otp_secret],
            )?
            .affected
            == 1)
    }

    fn get_user(&self, name: &str) -> Result<Option<StoredUser>> {
        self.first(
            "SELECT name, spec, password_hash, otp_secret, created FROM users WHERE name = $1",
            &params![name],
            row_user,
        )
    }

    fn list_users(&self) -> Result<Vec<StoredUser>> {
        self.rows(
            "SELECT name, spec, password_hash, otp_secret, created FROM users ORDER BY name",
            &[],
            row_user,
        )
    }

    fn delete_user(&self, name: &str) -> Result<bool> {
        Ok(self
            .query("DELETE FROM users WHERE name = $1", &params![name])?
            .affected
            == 1)
    }

    fn put_role(&self, name: &str, spec: &str, now: u64) -> Result<()> {
        self.query(
            "INSERT INTO roles (name, spec, updated) VALUES ($1, $2, $3::bigint)
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated = excluded.updated",
            &params![name, spec, now],
        )?;
        Ok(())
    }

    fn insert_role_if_absent(&self, name: &str, spec: &str, now: u64) -> Result<bool> {
        Ok(self
            .query(
                "INSERT INTO roles (name, spec, updated) VALUES ($1, $2, $3::bigint)
                 ON CONFLICT (name) DO NOTHING",
                &params![name, spec, now],
            )?
            .affected
            == 1)
    }

    fn get_role(&self, name: &str) -> Result<Option<String>> {
        self.first(
            "SELECT spec FROM roles WHERE name = $1",
            &params![name],
            |r| r.text(0),
        )
    }

    fn list_roles(&self) -> Result<Vec<(String, String)>> {
        self.rows("SELECT name, spec FROM roles ORDER BY name", &[], |r| {
            Ok((r.text(0)?, r.text(1)?))
        })
    }

    fn delete_role(&self, name: &str) -> Result<bool> {
        Ok(self
            .query("DELETE FROM roles WHERE name = $1", &params![name])?
            .affected
            == 1)
    }

    fn insert_token(&self, t: &StoredToken) -> Result<bool> {
        Ok(self
            .query(
                "INSERT INTO tokens (hash, types, expires, single_use, created)
                 VALUES ($1, $2, $3::bigint, $4::boolean, $5::bigint) ON CONFLICT (hash) DO NOTHING",
                &params![t.hash, t.types.join(","), t.expires, t.single_use, t.created],
            )?
            .affected
            == 1)
    }

    fn redeem_token(&self, hash: &str, now: u64) -> Result<TokenCheck> {
        // A valid single-use token is deleted by the one statement that finds it, so of two
        // controls racing with it exactly one gets the row back.
        if let Some(t) = self.first(
            "DELETE FROM tokens WHERE hash = $1 AND single_use AND expires > $2::bigint
             RETURNING hash, types, expires, single_use, created",
            &params![hash, now],
            row_token,
        )? {
            return Ok(TokenCheck::Valid(t));
        }
        let found = self.first(
            "SELECT hash, types, expires, single_use, created FROM tokens WHERE hash = $1",
            &params![hash],
            row_token,
        )?;
        Ok(match found {
            None => TokenCheck::Unknown,
            Some(t) if t.expires <= now => TokenCheck::Expired,
            // A single-use token seen here was valid a moment ago and was consumed by the
            // statement above... of another control: it is gone for this one.
            Some(t) if t.single_use => TokenCheck::Unknown,
            Some(t) => TokenCheck::Valid(t),
        })
    }

    fn list_tokens(&self) -> Result<Vec<StoredToken>> {
        self.rows(
            "SELECT hash, types, expires, single_use, created FROM tokens ORDER BY created",
            &[],
            row_token,
        )
    }

    fn delete_tokens_by_prefix(&self, prefix: &str) -> Result<usize> {
        Ok(self
            .query(
                "DELETE FROM tokens WHERE substr(hash, 1, length($1::text)) = $1::text",
                &params![prefix],
            )?
            .affected as usize)
    }

    fn prune_tokens(&self, now: u64) -> Result<usize> {
        Ok(self
            .query(
                "DELETE FROM tokens WHERE expires <= $1::bigint",
                &params![now],
            )?
            .affected as usize)
    }

    fn upsert_host(&self, h: &StoredHost) -> Result<()> {
        self.query(
            "INSERT INTO hosts (id, name, types, joined, last_seen)
             VALUES ($1, $2, $3, $4::bigint, $5::bigint)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, types = excluded.types,
               last_seen = excluded.last_seen",
            &params![h.id, h.name, h.types.join(","), h.joined, h.last_seen],
        )?;
        Ok(())
    }

    fn get_host(&self, id: &str) -> Result<Option<StoredHost>> {
        self.first(
            "SELECT id, name, types, joined, last_seen FROM hosts WHERE id = $1",
            &params![id],
            row_host,
        )
    }

    fn touch_hosts(&self, ids: &[&str], now: u64) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        // One UPDATE per 1,000 ids (`id IN (...)`), all in one transaction.
        Ok(self.pool.with(|c| {
            c.transaction(|c| {
                let mut changed = 0;
                for chunk in ids.chunks(1000) {
                    let mut sql =
                        String::from("UPDATE hosts SET last_seen = $1::bigint WHERE id IN (");
                    let mut ps = Vec::with_capacity(chunk.len() + 1);
                    ps.extend(params![now]);
                    for (i, id) in chunk.iter().enumerate() {
                        if i > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&format!("${}", i + 2));
                        ps.extend(params![*id]);
                    }
                    sql.push(')');
                    changed += c.query(&sql, &ps)?.affected as usize;
                }
                Ok(changed)
            })
        })?)
    }

    fn list_hosts(&self) -> Result<Vec<StoredHost>> {
        self.rows(
            "SELECT id, name, types, joined, last_seen FROM hosts ORDER BY name",
            &[],
            row_host,
        )
    }

    fn insert_lock(&self, l: &StoredLock) -> Result<()> {
        self.query(
            "INSERT INTO locks (id, spec, expires, created) VALUES ($1, $2, $3::bigint, $4::bigint)
             ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, expires = excluded.expires",
            &params![l.id, l.spec, l.expires, l.created],
        )?;
        Ok(())
    }

    fn list_locks(&self, now: u64) -> Result<Vec<StoredLock>> {
        self.rows(
            "SELECT id, spec, expires, created FROM locks
             WHERE expires IS NULL OR expires > $1::bigint ORDER BY created, id",
            &params![now],
            |r| {
                Ok(StoredLock {
                    id: r.text(0)?,
                    spec: r.text(1)?,
                    expires: r.opt_i64(2)?.map(|e| e.max(0) as u64),
                    created: r.u64(3)?,
                })
            },
        )
    }

    fn delete_host(&self, id: &str) -> Result<bool> {
        Ok(self
            .query("DELETE FROM hosts WHERE id = $1", &params![id])?
            .affected
            == 1)
    }

    fn delete_lock(&self, id: &str) -> Result<bool> {
        Ok(self
            .query("DELETE FROM locks WHERE id = $1", &params![id])?
            .affected
            == 1)
    }

    fn audit_append(&self, events: &[(u64, &str, &str, Option<&str>, &str)]) -> Result<i64> {
        if events.is_empty() {
            return Ok(0);
        }
        // Multi-row INSERTs of at most 1,000 rows (5,000 parameters), all in one transaction.
        Ok(self.pool.with(|c| {
            c.transaction(|c| {
                let mut last = 0;
                for chunk in events.chunks(1000) {
                    let mut sql = String::from(
                        "INSERT INTO audit (time, code, type, \"user\", event) VALUES ",
                    );
                    let mut ps = Vec::with_capacity(chunk.len() * 5);
                    for (i, (time, code, ty, user, event)) in chunk.iter().enumerate() {
                        let b = i * 5;
                        if i > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&format!(
                            "(${}::bigint, ${}, ${}, ${}, ${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5
                        ));
                        ps.extend(params![*time, *code, *ty, *user, *event]);
                    }
                    sql.push_str(" RETURNING seq");
                    let out = c.query(&sql, &ps)?;
                    for r in &out.rows {
                        last = last.max(r.i64(0)?);
                    }
                }
                Ok(last)
            })
        })?)
    }

    fn audit_prune(&self, before: u64, batch: usize) -> Result<usize> {
        Ok(self
            .query(
                "DELETE FROM audit WHERE seq IN
                   (SELECT seq FROM audit WHERE time < $1::bigint ORDER BY time LIMIT $2::bigint)",
                &params![before, batch],
            )?
            .affected as usize)
    }

    fn pages(&self) -> Result<(u64, u64, u64)> {
        // The database's size in 8 KiB pages (PostgreSQL's block size); free space inside
        // tables is the server's business (autovacuum).
        let bytes = self
            .first("SELECT pg_database_size(current_database())", &[], |r| {
                r.u64(0)
            })?
            .unwrap_or(0);
        Ok((bytes / 8192, 0, 8192))
    }

    fn audit_search(&self, q: &AuditQuery) -> Result<Vec<StoredEvent>> {
        let limit = if q.limit == 0 {
            i64::MAX
        } else {
            q.limit as i64
        };
        self.rows(
            &format!(
                "SELECT seq, time, code, type, \"user\", event FROM audit WHERE {AUDIT_FILTER}
                 ORDER BY seq LIMIT $5::bigint"
            ),
            &params![q.since, q.until, q.r#type, q.user, limit],
            row_event,
        )
    }

    fn audit_page(&self, q: &AuditQuery, before: Option<i64>) -> Result<Vec<StoredEvent>> {
        let limit = if q.limit == 0 {
            i64::MAX
        } else {
            q.limit as i64
        };
        self.rows(
            &format!(
                "SELECT seq, time, code, type, \"user\", event FROM audit WHERE {AUDIT_FILTER}
                   AND ($5::bigint IS NULL OR seq < $5::bigint)
                 ORDER BY seq DESC LIMIT $6::bigint"
            ),
            &params![q.since, q.until, q.r#type, q.user, before, limit],
            row_event,
        )
    }
}
