//! The SQLite backend: rusqlite, WAL mode, one transaction per change; the default, and the dev
//! cluster's. One connection behind a mutex: the control plane is the slow path and SQLite
//! serializes writers anyway.
//!
//! Crash safety: WAL with `synchronous=NORMAL` keeps every committed transaction across a
//! `kill -9` of the process (the WAL is in the OS page cache; only a power loss can lose the
//! last commits, never corrupt the file). Migrations are numbered, applied in order, each in its
//! own transaction together with the `user_version` bump, so a crash mid-migration leaves the
//! previous version intact.
//!
//! Not here: the change count (the [`super::Store`] facade keeps it) and any policy.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    AuditQuery, Backend, Result, StoreError, StoredCa, StoredEvent, StoredHost, StoredLock,
    StoredMember, StoredRotation, StoredToken, StoredUser, TokenCheck,
};

/// Numbered migrations; index + 1 is the schema version they produce.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE cas (
        name TEXT PRIMARY KEY,
        x509_key_pem TEXT NOT NULL,
        x509_cert_pem TEXT NOT NULL,
        ssh_key TEXT NOT NULL,
        created INTEGER NOT NULL
     );
     CREATE TABLE keys (name TEXT PRIMARY KEY, pem TEXT NOT NULL, created INTEGER NOT NULL);
     CREATE TABLE users (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        otp_secret TEXT,
        created INTEGER NOT NULL
     );
     CREATE TABLE roles (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated INTEGER NOT NULL);
     CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        types TEXT NOT NULL,
        expires INTEGER NOT NULL,
        single_use INTEGER NOT NULL,
        created INTEGER NOT NULL
     );
     CREATE TABLE locks (id TEXT PRIMARY KEY, spec TEXT NOT NULL, expires INTEGER, created INTEGER NOT NULL);
     CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        types TEXT NOT NULL,
        joined INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
     );
     CREATE TABLE resources (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        host_id TEXT,
        spec TEXT NOT NULL,
        updated INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
     );
     CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        code TEXT NOT NULL,
        type TEXT NOT NULL,
        user TEXT,
        event TEXT NOT NULL
     );
     CREATE INDEX audit_time ON audit (time);
     CREATE INDEX audit_type_time ON audit (type, time);",
    // 2: CA rotation state (issue 13): one row per CA (`user`, `host`, `db`, `jwt`) that has
    // rotated: its phase, a sequence bumped per phase change, the next key pair while a
    // rotation runs (the `cas`/`keys` row stays current until `standby` promotes it) and the
    // grace deadline of a semi-automatic rotation.
    "CREATE TABLE ca_rotation (
        name TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        seq INTEGER NOT NULL,
        next_x509_key_pem TEXT,
        next_x509_cert_pem TEXT,
        next_ssh_key TEXT,
        grace INTEGER,
        deadline INTEGER,
        updated INTEGER NOT NULL
     );",
];

/// The SQLite store.
pub struct Sqlite {
    conn: Mutex<Connection>,
    /// Heartbeats: only this process writes a SQLite store (one daemon per data dir), so they
    /// live in memory.
    members: Mutex<std::collections::BTreeMap<String, StoredMember>>,
}

impl Sqlite {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Sqlite> {
        let conn = Connection::open(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::init(conn)
    }

    /// An in-memory store, for tests and benchmarks.
    pub fn memory() -> Result<Sqlite> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Sqlite> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode answers with a row, so it goes through query_row.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        // journal_size_limit: after a checkpoint the WAL is truncated to 64 MiB if a burst made
        // it larger (SQLite otherwise keeps the file at its largest size forever).
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
             PRAGMA journal_size_limit = 67108864;",
        )?;
        migrate(&mut conn)?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            members: Mutex::new(Default::default()),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&mut conn)?)
    }
}

impl Backend for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn heartbeat(&self, m: &StoredMember, forget_secs: u64) -> Result<()> {
        let mut members = self.members.lock().map_err(|_| StoreError::Poisoned)?;
        members.retain(|_, old| old.last_seen.saturating_add(forget_secs) >= m.last_seen);
        members.insert(m.id.clone(), m.clone());
        Ok(())
    }

    fn list_members(&self) -> Result<Vec<StoredMember>> {
        let members = self.members.lock().map_err(|_| StoreError::Poisoned)?;
        let mut out: Vec<_> = members.values().cloned().collect();
        out.sort_by(|a, b| a.public_addr.cmp(&b.public_addr));
        Ok(out)
    }

    /// Schema version (number of applied migrations).
    fn schema_version(&self) -> Result<i64> {
        self.with(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
    }

    /// `PRAGMA integrity_check`: "ok" for a healthy file.
    fn integrity_check(&self) -> Result<String> {
        self.with(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
    }

    // ---- certificate authorities and keys ----

    fn get_ca(&self, name: &str) -> Result<Option<StoredCa>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, x509_key_pem, x509_cert_pem, ssh_key FROM cas WHERE name = ?1",
                [name],
                |r| {
                    Ok(StoredCa {
                        name: r.get(0)?,
                        x509_key_pem: r.get(1)?,
                        x509_cert_pem: r.get(2)?,
                        ssh_key: r.get(3)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Inserts a CA unless one of that name exists; returns the one that is stored afterwards, so
    /// two processes racing at first start agree on one CA.
    fn insert_ca_if_absent(&self, ca: &StoredCa, now: u64) -> Result<StoredCa> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO cas (name, x509_key_pem, x509_cert_pem, ssh_key, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![ca.name, ca.x509_key_pem, ca.x509_cert_pem, ca.ssh_key, now as i64],
            )?;
            let stored = tx.query_row(
                "SELECT name, x509_key_pem, x509_cert_pem, ssh_key FROM cas WHERE name = ?1",
                [&ca.name],
                |r| Ok(StoredCa { name: r.get(0)?, x509_key_pem: r.get(1)?, x509_cert_pem: r.get(2)?, ssh_key: r.get(3)? }),
            )?;
            tx.commit()?;
            Ok(stored)
        })
    }

    /// A named private key (e.g. the JWT signing key), inserted if absent; returns the stored one.
    fn key_or_insert(&self, name: &str, pem: &str, now: u64) -> Result<String> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO keys (name, pem, created) VALUES (?1, ?2, ?3)",
                params![name, pem, now as i64],
            )?;
            let pem: String =
                tx.query_row("SELECT pem FROM keys WHERE name = ?1", [name], |r| r.get(0))?;
            tx.commit()?;
            Ok(pem)
        })
    }

    fn get_ca_rotation(&self, name: &str) -> Result<Option<StoredRotation>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, phase, seq, next_x509_key_pem, next_x509_cert_pem, next_ssh_key, grace, deadline, updated FROM ca_rotation WHERE name = ?1",
                [name],
                |r| {
                    let name: String = r.get(0)?;
                    let key: Option<String> = r.get(3)?;
                    let next = match key {
                        Some(x509_key_pem) => Some(StoredCa {
                            name: name.clone(),
                            x509_key_pem,
                            x509_cert_pem: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                            ssh_key: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                        }),
                        None => None,
                    };
                    Ok(StoredRotation {
                        name,
                        phase: r.get(1)?,
                        seq: r.get::<_, i64>(2)? as u64,
                        next,
                        grace: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
                        deadline: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                        updated: r.get::<_, i64>(8)? as u64,
                    })
                },
            )
            .optional()
        })
    }

    fn put_ca_rotation(
        &self,
        rot: &StoredRotation,
        expect_seq: u64,
        promote: Option<&StoredCa>,
    ) -> Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let seq: Option<i64> = tx
                .query_row("SELECT seq FROM ca_rotation WHERE name = ?1", [&rot.name], |r| r.get(0))
                .optional()?;
            if seq.unwrap_or(0) as u64 != expect_seq {
                return Ok(false);
            }
            let next = rot.next.as_ref();
            tx.execute(
                "INSERT OR REPLACE INTO ca_rotation (name, phase, seq, next_x509_key_pem, next_x509_cert_pem, next_ssh_key, grace, deadline, updated) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    rot.name,
                    rot.phase,
                    rot.seq as i64,
                    next.map(|n| n.x509_key_pem.as_str()),
                    next.map(|n| n.x509_cert_pem.as_str()),
                    next.map(|n| n.ssh_key.as_str()),
                    rot.grace.map(|v| v as i64),
                    rot.deadline.map(|v| v as i64),
                    rot.updated as i64,
                ],
            )?;
            match promote {
                Some(ca) if rot.name == "jwt" => {
                    tx.execute(
                        "UPDATE keys SET pem = ?2 WHERE name = ?1",
                        params![rot.name, ca.x509_key_pem],
                    )?;
                }
                Some(ca) => {
                    tx.execute(
                        "UPDATE cas SET x509_key_pem = ?2, x509_cert_pem = ?3, ssh_key = ?4 WHERE name = ?1",
                        params![rot.name, ca.x509_key_pem, ca.x509_cert_pem, ca.ssh_key],
                    )?;
                }
                None => {}
            }
            tx.commit()?;
            Ok(true)
        })
    }

    // ---- users ----

    /// Inserts a user; false if the name is taken.
    fn insert_user(&self, u: &StoredUser) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO users (name, spec, password_hash, otp_secret, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![u.name, u.spec, u.password_hash, u.otp_secret, u.created as i64],
            )?;
            Ok(n == 1)
        })
    }

    /// Replaces a user's spec (roles, traits); false if absent.
    fn update_user_spec(&self, name: &str, spec: &str) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE users SET spec = ?2 WHERE name = ?1",
                params![name, spec],
            )? == 1)
        })
    }

    /// Replaces a user's credentials; false if absent.
    fn set_user_credentials(
        &self,
        name: &str,
        password_hash: &str,
        otp_secret: Option<&str>,
    ) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE users SET password_hash = ?2, otp_secret = ?3 WHERE name = ?1",
                params![name, password_hash, otp_secret],
            )? == 1)
        })
    }

    fn get_user(&self, name: &str) -> Result<Option<StoredUser>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, spec, password_hash, otp_secret, created FROM users WHERE name = ?1",
                [name],
                row_user,
            )
            .optional()
        })
    }

    fn list_users(&self) -> Result<Vec<StoredUser>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT name, spec, password_hash, otp_secret, created FROM users ORDER BY name",
            )?;
            let rows = st.query_map([], row_user)?;
            rows.collect()
        })
    }

    fn delete_user(&self, name: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM users WHERE name = ?1", [name])? == 1))
    }

    // ---- roles ----

    fn put_role(&self, name: &str, spec: &str, now: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO roles (name, spec, updated) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated = excluded.updated",
                params![name, spec, now as i64],
            )?;
            Ok(())
        })
    }

    /// Inserts a role only if absent (built-in roles at first start must not undo edits).
    fn insert_role_if_absent(&self, name: &str, spec: &str, now: u64) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "INSERT OR IGNORE INTO roles (name, spec, updated) VALUES (?1, ?2, ?3)",
                params![name, spec, now as i64],
            )? == 1)
        })
    }

    fn get_role(&self, name: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT spec FROM roles WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// All roles as (name, spec).
    fn list_roles(&self) -> Result<Vec<(String, String)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, spec FROM roles ORDER BY name")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn delete_role(&self, name: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM roles WHERE name = ?1", [name])? == 1))
    }

    // ---- join tokens ----

    fn insert_token(&self, t: &StoredToken) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "INSERT OR IGNORE INTO tokens (hash, types, expires, single_use, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![t.hash, t.types.join(","), t.expires as i64, t.single_use, t.created as i64],
            )? == 1)
        })
    }

    /// Checks a token by hash at `now`; a valid single-use token is consumed in the same
    /// transaction, so two hosts racing with one single-use token cannot both join.
    fn redeem_token(&self, hash: &str, now: u64) -> Result<TokenCheck> {
        self.with(|c| {
            let tx = c.transaction()?;
            let found = tx
                .query_row(
                    "SELECT hash, types, expires, single_use, created FROM tokens WHERE hash = ?1",
                    [hash],
                    row_token,
                )
                .optional()?;
            let check = match found {
                None => TokenCheck::Unknown,
                Some(t) if t.expires <= now => TokenCheck::Expired,
                Some(t) => {
                    if t.single_use {
                        tx.execute("DELETE FROM tokens WHERE hash = ?1", [hash])?;
                    }
                    TokenCheck::Valid(t)
                }
            };
            tx.commit()?;
            Ok(check)
        })
    }

    fn list_tokens(&self) -> Result<Vec<StoredToken>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT hash, types, expires, single_use, created FROM tokens ORDER BY created",
            )?;
            let rows = st.query_map([], row_token)?;
            rows.collect()
        })
    }

    /// Deletes tokens whose hash starts with `prefix` (a full hash or the listed id); returns how
    /// many matched. The caller refuses ambiguous prefixes first.
    fn delete_tokens_by_prefix(&self, prefix: &str) -> Result<usize> {
        self.with(|c| {
            c.execute(
                "DELETE FROM tokens WHERE substr(hash, 1, length(?1)) = ?1",
                [prefix],
            )
        })
    }

    /// Drops expired tokens; returns how many.
    fn prune_tokens(&self, now: u64) -> Result<usize> {
        self.with(|c| c.execute("DELETE FROM tokens WHERE expires <= ?1", [now as i64]))
    }

    // ---- hosts ----

    fn upsert_host(&self, h: &StoredHost) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO hosts (id, name, types, joined, last_seen) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, types = excluded.types, last_seen = excluded.last_seen",
                params![h.id, h.name, h.types.join(","), h.joined as i64, h.last_seen as i64],
            )?;
            Ok(())
        })
    }

    fn get_host(&self, id: &str) -> Result<Option<StoredHost>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, name, types, joined, last_seen FROM hosts WHERE id = ?1",
                [id],
                row_host,
            )
            .optional()
        })
    }

    fn touch_hosts(&self, ids: &[&str], now: u64) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.with(|c| {
            let tx = c.transaction()?;
            let mut changed = 0;
            {
                let mut st = tx.prepare_cached("UPDATE hosts SET last_seen = ?1 WHERE id = ?2")?;
                for id in ids {
                    changed += st.execute(params![now as i64, id])?;
                }
            }
            tx.commit()?;
            Ok(changed)
        })
    }

    fn list_hosts(&self) -> Result<Vec<StoredHost>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT id, name, types, joined, last_seen FROM hosts ORDER BY name")?;
            let rows = st.query_map([], row_host)?;
            rows.collect()
        })
    }

    // ---- locks ----

    fn insert_lock(&self, l: &StoredLock) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO locks (id, spec, expires, created) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, expires = excluded.expires",
                params![l.id, l.spec, l.expires.map(|e| e as i64), l.created as i64],
            )?;
            Ok(())
        })
    }

    /// Locks in force at `now` (expired ones are not returned).
    fn list_locks(&self, now: u64) -> Result<Vec<StoredLock>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, spec, expires, created FROM locks WHERE expires IS NULL OR expires > ?1 ORDER BY created",
            )?;
            let rows = st.query_map([now as i64], |r| {
                Ok(StoredLock {
                    id: r.get(0)?,
                    spec: r.get(1)?,
                    expires: r.get::<_, Option<i64>>(2)?.map(|e| e.max(0) as u64),
                    created: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
    }

    fn delete_host(&self, id: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM hosts WHERE id = ?1", [id])? == 1))
    }

    fn delete_lock(&self, id: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM locks WHERE id = ?1", [id])? == 1))
    }

    // ---- audit ----

    /// Appends events in one transaction; returns the sequence number of the last. Once this
    /// returns, the events survive a `kill -9`.
    fn audit_append(&self, events: &[(u64, &str, &str, Option<&str>, &str)]) -> Result<i64> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO audit (time, code, type, user, event) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (time, code, ty, user, event) in events {
                    st.execute(params![*time as i64, code, ty, user, event])?;
                }
            }
            let last = tx.last_insert_rowid();
            tx.commit()?;
            Ok(last)
        })
    }

    /// Removes at most `batch` of the oldest audit events with `time < before`, in one short
    /// transaction; returns how many went. Callers loop until fewer than `batch` went, so the
    /// store's lock is held for one batch at a time and writers interleave.
    fn audit_prune(&self, before: u64, batch: usize) -> Result<usize> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "DELETE FROM audit WHERE seq IN
                   (SELECT seq FROM audit WHERE time < ?1 ORDER BY time LIMIT ?2)",
                params![before as i64, batch as i64],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// The store's size: (pages in use, free pages, page size).
    fn pages(&self) -> Result<(u64, u64, u64)> {
        self.with(|c| {
            let count: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok((
                (count - free).max(0) as u64,
                free.max(0) as u64,
                size.max(0) as u64,
            ))
        })
    }

    fn audit_search(&self, q: &AuditQuery) -> Result<Vec<StoredEvent>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, time, code, type, user, event FROM audit
                 WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR time <= ?2)
                   AND (?3 IS NULL OR type = ?3 OR type LIKE ?3 || '.%') AND (?4 IS NULL OR user = ?4)
                 ORDER BY seq LIMIT ?5",
            )?;
            let limit = if q.limit == 0 { i64::MAX } else { q.limit as i64 };
            let rows = st.query_map(
                params![q.since.map(|v| v as i64), q.until.map(|v| v as i64), q.r#type, q.user, limit],
                |r| {
                    Ok(StoredEvent {
                        seq: r.get(0)?,
                        time: r.get::<_, i64>(1)?.max(0) as u64,
                        code: r.get(2)?,
                        r#type: r.get(3)?,
                        user: r.get(4)?,
                        event: r.get(5)?,
                    })
                },
            )?;
            rows.collect()
        })
    }

    /// One page of [`Backend::audit_search`]'s matches, newest first: at most `q.limit` events
    /// with `seq` below `before` (all when `None`). The web UI's audit page pages with it.
    fn audit_page(&self, q: &AuditQuery, before: Option<i64>) -> Result<Vec<StoredEvent>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, time, code, type, user, event FROM audit
                 WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR time <= ?2)
                   AND (?3 IS NULL OR type = ?3 OR type LIKE ?3 || '.%') AND (?4 IS NULL OR user = ?4)
                   AND (?5 IS NULL OR seq < ?5)
                 ORDER BY seq DESC LIMIT ?6",
            )?;
            let limit = if q.limit == 0 { i64::MAX } else { q.limit as i64 };
            let rows = st.query_map(
                params![
                    q.since.map(|v| v as i64),
                    q.until.map(|v| v as i64),
                    q.r#type,
                    q.user,
                    before,
                    limit
                ],
                |r| {
                    Ok(StoredEvent {
                        seq: r.get(0)?,
                        time: r.get::<_, i64>(1)?.max(0) as u64,
                        code: r.get(2)?,
                        r#type: r.get(3)?,
                        user: r.get(4)?,
                        event: r.get(5)?,
                    })
                },
            )?;
            rows.collect()
        })
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

fn split_list(s: String) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn row_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredUser> {
    Ok(StoredUser {
        name: r.get(0)?,
        spec: r.get(1)?,
        password_hash: r.get(2)?,
        otp_secret: r.get(3)?,
        created: r.get::<_, i64>(4)?.max(0) as u64,
    })
}

fn row_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredToken> {
    Ok(StoredToken {
        hash: r.get(0)?,
        types: split_list(r.get(1)?),
        expires: r.get::<_, i64>(2)?.max(0) as u64,
        single_use: r.get(3)?,
        created: r.get::<_, i64>(4)?.max(0) as u64,
    })
}

fn row_host(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredHost> {
    Ok(StoredHost {
        id: r.get(0)?,
        name: r.get(1)?,
        types: split_list(r.get(2)?),
        joined: r.get::<_, i64>(3)?.max(0) as u64,
        last_seen: r.get::<_, i64>(4)?.max(0) as u64,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn token(hash: &str, expires: u64, single_use: bool) -> StoredToken {
        StoredToken {
            hash: hash.into(),
            types: vec!["node".into()],
            expires,
            single_use,
            created: 1,
        }
    }

    #[test]
    fn ca_rotation_round_trip_compare_and_promote() {
        let s = crate::store::Store::memory().unwrap();
        let old = StoredCa {
            name: "user".into(),
            x509_key_pem: "k1".into(),
            x509_cert_pem: "c1".into(),
            ssh_key: "s1".into(),
        };
        s.insert_ca_if_absent(&old, 1).unwrap();
        assert_eq!(s.get_ca_rotation("user").unwrap(), None);
        let new = StoredCa {
            x509_key_pem: "k2".into(),
            ..old.clone()
        };
        let mut rot = StoredRotation {
            name: "user".into(),
            phase: "init".into(),
            seq: 1,
            next: Some(new.clone()),
            grace: Some(60),
            deadline: Some(100),
            updated: 40,
        };
        let before = s.changes();
        assert!(s.put_ca_rotation(&rot, 0, None).unwrap());
        assert!(s.changes() > before, "a phase change moves the change feed");
        assert_eq!(s.get_ca_rotation("user").unwrap().as_ref(), Some(&rot));
        // A writer that read an older sequence loses.
        assert!(!s.put_ca_rotation(&rot, 0, None).unwrap());
        rot.phase = "standby".into();
        rot.seq = 2;
        rot.next = None;
        assert!(s.put_ca_rotation(&rot, 1, Some(&new)).unwrap());
        assert_eq!(s.get_ca("user").unwrap().unwrap().x509_key_pem, "k2");
        assert_eq!(s.get_ca_rotation("user").unwrap().unwrap().next, None);
        // jwt promotes into the keys table.
        s.key_or_insert("jwt", "j1", 1).unwrap();
        let jwt = StoredRotation {
            name: "jwt".into(),
            phase: "standby".into(),
            seq: 1,
            next: None,
            grace: None,
            deadline: None,
            updated: 1,
        };
        let key = StoredCa {
            name: "jwt".into(),
            x509_key_pem: "j2".into(),
            x509_cert_pem: String::new(),
            ssh_key: String::new(),
        };
        assert!(s.put_ca_rotation(&jwt, 0, Some(&key)).unwrap());
        assert_eq!(s.key_or_insert("jwt", "j3", 2).unwrap(), "j2");
    }

    #[test]
    fn touch_hosts_refreshes_only_joined_hosts_in_one_call() {
        let s = Sqlite::memory().unwrap();
        for id in ["a", "b"] {
            s.upsert_host(&StoredHost {
                id: id.into(),
                name: id.into(),
                types: vec!["node".into()],
                joined: 10,
                last_seen: 10,
            })
            .unwrap();
        }
        assert_eq!(s.touch_hosts(&[], 99).unwrap(), 0);
        assert_eq!(s.touch_hosts(&["a", "missing"], 99).unwrap(), 1);
        assert_eq!(s.get_host("a").unwrap().unwrap().last_seen, 99);
        assert_eq!(s.get_host("b").unwrap().unwrap().last_seen, 10);
        assert_eq!(s.get_host("a").unwrap().unwrap().joined, 10);
        assert!(s.get_host("missing").unwrap().is_none());
    }

    #[test]
    fn migrations_are_idempotent_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jaunt.db");
        let s = Sqlite::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(s);
        let s = Sqlite::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jaunt.db");
        drop(Sqlite::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 999")
            .unwrap();
        assert!(matches!(
            Sqlite::open(&path),
            Err(StoreError::TooNew { found: 999, .. })
        ));
    }

    #[test]
    fn single_use_tokens_redeem_once_and_expired_tokens_never() {
        let s = Sqlite::memory().unwrap();
        assert!(s.insert_token(&token("aa", 100, true)).unwrap());
        assert!(s.insert_token(&token("bb", 100, false)).unwrap());
        assert!(s.insert_token(&token("cc", 10, false)).unwrap());
        assert!(matches!(
            s.redeem_token("aa", 50).unwrap(),
            TokenCheck::Valid(_)
        ));
        assert_eq!(s.redeem_token("aa", 50).unwrap(), TokenCheck::Unknown);
        assert!(matches!(
            s.redeem_token("bb", 50).unwrap(),
            TokenCheck::Valid(_)
        ));
        assert!(matches!(
            s.redeem_token("bb", 50).unwrap(),
            TokenCheck::Valid(_)
        ));
        assert_eq!(s.redeem_token("cc", 50).unwrap(), TokenCheck::Expired);
        assert_eq!(s.redeem_token("zz", 50).unwrap(), TokenCheck::Unknown);
        assert_eq!(s.prune_tokens(50).unwrap(), 1);
        assert_eq!(s.delete_tokens_by_prefix("b").unwrap(), 1);
        assert!(s.list_tokens().unwrap().is_empty());
    }

    #[test]
    fn ca_insert_keeps_the_first() {
        let s = Sqlite::memory().unwrap();
        let a = StoredCa {
            name: "user".into(),
            x509_key_pem: "k1".into(),
            x509_cert_pem: "c1".into(),
            ssh_key: "s1".into(),
        };
        let b = StoredCa {
            x509_key_pem: "k2".into(),
            ..a.clone()
        };
        assert_eq!(s.insert_ca_if_absent(&a, 1).unwrap().x509_key_pem, "k1");
        assert_eq!(s.insert_ca_if_absent(&b, 2).unwrap().x509_key_pem, "k1");
    }

    #[test]
    fn retention_bounds_the_store_file() {
        // Ten rounds of 2,000 events of ~300 bytes; after each, events older than two rounds
        // are pruned in batches. The file must stop growing once it holds two rounds: freed
        // pages are reused. Without pruning it grows by a round's worth every round.
        let dir = tempfile::tempdir().unwrap();
        let s = Sqlite::open(&dir.path().join("jaunt.db")).unwrap();
        let event = format!("{{\"pad\":\"{}\"}}", "x".repeat(300));
        let mut pages = Vec::new();
        for round in 0..10u64 {
            let rows: Vec<(u64, &str, &str, Option<&str>, &str)> = (0..2000)
                .map(|i| {
                    (
                        1000 + round * 100 + i % 100,
                        "JA2000I",
                        "session.start",
                        Some("u"),
                        event.as_str(),
                    )
                })
                .collect();
            s.audit_append(&rows).unwrap();
            let before = (1000 + round * 100).saturating_sub(100);
            while s.audit_prune(before, 500).unwrap() == 500 {}
            let (used, free, _) = s.pages().unwrap();
            pages.push(used + free);
        }
        let all = s.audit_search(&AuditQuery::default()).unwrap();
        assert_eq!(all.len(), 4000, "two rounds kept");
        assert!(all.iter().all(|e| e.time >= 1000 + 8 * 100));
        assert!(
            pages[9] <= pages[3] + pages[3] / 20,
            "the store kept growing under retention: pages per round {pages:?}"
        );
    }

    #[test]
    fn audit_filters() {
        let s = Sqlite::memory().unwrap();
        s.audit_append(&[
            (10, "JA1000", "user.login", Some("alice"), "{}"),
            (20, "JA1001", "user.login.failed", Some("bob"), "{}"),
            (30, "JA2000", "session.start", Some("alice"), "{}"),
        ])
        .unwrap();
        let all = s.audit_search(&AuditQuery::default()).unwrap();
        assert_eq!(all.len(), 3);
        let logins = s
            .audit_search(&AuditQuery {
                r#type: Some("user.login".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(logins.len(), 2);
        let alice = s
            .audit_search(&AuditQuery {
                user: Some("alice".into()),
                since: Some(15),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(alice.len(), 1);
        assert_eq!(alice[0].r#type, "session.start");
    }
}
