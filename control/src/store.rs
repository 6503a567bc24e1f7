//! The cluster store: a [`Backend`] interface with two implementations, and the [`Store`]
//! facade the rest of control calls.
//!
//! What lives here: CA keys, users (argon2id hashes, TOTP secrets), roles, join tokens (SHA-256
//! hashes only), locks, joined hosts, registered resources and the audit log. What does not:
//! any policy — callers decide, the store keeps.
//!
//! - `sqlite.rs`: the default, `jaunt.db` in the data dir (one control host, the dev cluster).
//! - `postgres.rs`: a PostgreSQL database shared by several control hosts (`storage: {type:
//!   postgres, conn_string: ...}`), with its own numbered migrations and a revision counter
//!   that other controls poll (the change feed).
//! - `pg.rs`: the blocking PostgreSQL client `postgres.rs` uses (no tokio; see ARCHITECTURE.md).
//!
//! The facade keeps the change count ([`Store::changes`]): every committed change to users,
//! roles, tokens, locks or CAs moves it, whichever backend; with a shared backend
//! [`Store::poll_changes`] moves it for other hosts' changes too. Nothing outside `store/`
//! sees SQL.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub mod pg;
pub mod postgres;
pub mod sqlite;

pub use postgres::Postgres;
pub use sqlite::Sqlite;

/// A store failure; the message names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("store schema version {found} is newer than this jaunt understands ({known}); upgrade jaunt")]
    TooNew { found: i64, known: i64 },
    #[error("store: lock poisoned by a panic in another thread")]
    Poisoned,
    #[error("store: {0}")]
    Postgres(#[from] pg::PgError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A certificate authority as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCa {
    pub name: String,
    pub x509_key_pem: String,
    pub x509_cert_pem: String,
    pub ssh_key: String,
}

/// A CA's rotation state as stored (`rotation.rs`; table `ca_rotation`). For `jwt` the
/// additional key is in `next.x509_key_pem` and the other two fields are empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRotation {
    pub name: String,
    pub phase: String,
    pub seq: u64,
    pub next: Option<StoredCa>,
    /// Seconds between automatic phase changes, for `--grace`.
    pub grace: Option<u64>,
    /// When the next automatic phase change is due (unix seconds).
    pub deadline: Option<u64>,
    pub updated: u64,
}

/// A user row: the spec is JSON (roles, traits) owned by the caller.
#[derive(Clone, Debug)]
pub struct StoredUser {
    pub name: String,
    pub spec: String,
    pub password_hash: String,
    pub otp_secret: Option<String>,
    pub created: u64,
}

/// A join token row; the token itself is never stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredToken {
    pub hash: String,
    pub types: Vec<String>,
    pub expires: u64,
    pub single_use: bool,
    pub created: u64,
}

/// A joined host.
#[derive(Clone, Debug)]
pub struct StoredHost {
    pub id: String,
    pub name: String,
    pub types: Vec<String>,
    pub joined: u64,
    pub last_seen: u64,
}

/// A lock row.
#[derive(Clone, Debug)]
pub struct StoredLock {
    pub id: String,
    pub spec: String,
    pub expires: Option<u64>,
    pub created: u64,
}

/// An audit event row.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub seq: i64,
    pub time: u64,
    pub code: String,
    pub r#type: String,
    pub user: Option<String>,
    pub event: String,
}

/// Filter for [`Store::audit_search`].
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub r#type: Option<String>,
    pub user: Option<String>,
    pub limit: usize,
}

/// What a token redemption found.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenCheck {
    Valid(StoredToken),
    Expired,
    Unknown,
}

/// A control+engine host of the cluster, as its heartbeat left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMember {
    /// Random per process start.
    pub id: String,
    /// The control API address.
    pub control_addr: String,
    /// The engine's public address (users and agents dial it).
    pub public_addr: String,
    pub version: String,
    pub started: u64,
    pub last_seen: u64,
    /// `serving`, `draining` (SIGTERM received: new dials belong elsewhere) or `stopped`.
    pub state: String,
}

/// What every backend stores and answers. Methods that change users, roles, tokens, locks or
/// CAs are counted by the [`Store`] facade, not here.
pub trait Backend: Send + Sync {
    /// "sqlite" or "postgres" (status output and logs).
    fn kind(&self) -> &'static str;

    /// Schema version (number of applied migrations).
    fn schema_version(&self) -> Result<i64>;

    /// "ok" for a healthy store (SQLite's `PRAGMA integrity_check`).
    fn integrity_check(&self) -> Result<String>;

    /// The shared change counter: moves on every committed change to users, roles, tokens,
    /// locks or CAs by any host. A store only one process writes answers 0.
    fn revision(&self) -> Result<u64> {
        Ok(0)
    }

    /// Takes or renews the lease `name` for `holder` until `now + ttl_secs`; true when
    /// `holder` holds it afterwards. Single-writer jobs (audit retention, the recordings
    /// completer's aborts) run only while they hold theirs, so of several controls one does
    /// the work. A store only one process writes grants every lease.
    fn try_lease(&self, _name: &str, _holder: &str, _now: u64, _ttl_secs: u64) -> Result<bool> {
        Ok(true)
    }

    /// Records a host's heartbeat (inserted or replaced by id); rows not seen for `forget_secs`
    /// are removed on the way.
    fn heartbeat(&self, m: &StoredMember, forget_secs: u64) -> Result<()>;

    /// Every host that sent a heartbeat, by public address.
    fn list_members(&self) -> Result<Vec<StoredMember>>;

    fn get_ca(&self, name: &str) -> Result<Option<StoredCa>>;

    /// Inserts a CA unless one of that name exists; returns the one that is stored afterwards,
    /// so two processes racing at first start agree on one CA.
    fn insert_ca_if_absent(&self, ca: &StoredCa, now: u64) -> Result<StoredCa>;

    /// A named private key (e.g. the JWT signing key), inserted if absent; returns the stored
    /// one.
    fn key_or_insert(&self, name: &str, pem: &str, now: u64) -> Result<String>;

    /// The rotation state of CA `name`, if it ever rotated.
    fn get_ca_rotation(&self, name: &str) -> Result<Option<StoredRotation>>;

    /// Writes a phase change atomically if the stored sequence is still `expect_seq` (0 when
    /// no row exists yet); `false` when another writer got there first. With `promote`
    /// (`standby`), that key becomes the current one (`cas` row, or `keys` row for `jwt`) in
    /// the same transaction.
    fn put_ca_rotation(
        &self,
        rot: &StoredRotation,
        expect_seq: u64,
        promote: Option<&StoredCa>,
    ) -> Result<bool>;

    /// Inserts a user; false if the name is taken.
    fn insert_user(&self, u: &StoredUser) -> Result<bool>;

    /// Replaces a user's spec (roles, traits); false if absent.
    fn update_user_spec(&self, name: &str, spec: &str) -> Result<bool>;

    /// Replaces a user's credentials; false if absent.
    fn set_user_credentials(
        &self,
        name: &str,
        password_hash: &str,
        otp_secret: Option<&str>,
    ) -> Result<bool>;

    fn get_user(&self, name: &str) -> Result<Option<StoredUser>>;

    fn list_users(&self) -> Result<Vec<StoredUser>>;

    fn delete_user(&self, name: &str) -> Result<bool>;

    fn put_role(&self, name: &str, spec: &str, now: u64) -> Result<()>;

    /// Inserts a role only if absent (built-in roles at first start must not undo edits).
    fn insert_role_if_absent(&self, name: &str, spec: &str, now: u64) -> Result<bool>;

    fn get_role(&self, name: &str) -> Result<Option<String>>;

    /// All roles as (name, spec).
    fn list_roles(&self) -> Result<Vec<(String, String)>>;

    fn delete_role(&self, name: &str) -> Result<bool>;

    fn insert_token(&self, t: &StoredToken) -> Result<bool>;

    /// Checks a token by hash at `now`; a valid single-use token is consumed atomically, so
    /// two hosts racing with one single-use token cannot both join.
    fn redeem_token(&self, hash: &str, now: u64) -> Result<TokenCheck>;

    fn list_tokens(&self) -> Result<Vec<StoredToken>>;

    /// Deletes tokens whose hash starts with `prefix` (a full hash or the listed id); returns
    /// how many matched. The caller refuses ambiguous prefixes first.
    fn delete_tokens_by_prefix(&self, prefix: &str) -> Result<usize>;

    /// Drops expired tokens; returns how many.
    fn prune_tokens(&self, now: u64) -> Result<usize>;

    fn upsert_host(&self, h: &StoredHost) -> Result<()>;

    fn get_host(&self, id: &str) -> Result<Option<StoredHost>>;

    /// Sets `last_seen` to `now` for those of `ids` that are joined hosts, in one transaction
    /// (the engine's tunnel-up events, a batch at a time); returns how many rows changed. An id
    /// with no host record (removed with `jaunt rm node/NAME`) is left out, not created.
    fn touch_hosts(&self, ids: &[&str], now: u64) -> Result<usize>;

    fn list_hosts(&self) -> Result<Vec<StoredHost>>;

    /// Removes a joined host's record (`jaunt rm node/NAME`); false if there was none.
    fn delete_host(&self, id: &str) -> Result<bool>;

    fn insert_lock(&self, l: &StoredLock) -> Result<()>;

    /// Locks in force at `now` (expired ones are not returned).
    fn list_locks(&self, now: u64) -> Result<Vec<StoredLock>>;

    fn delete_lock(&self, id: &str) -> Result<bool>;

    /// Appends events in one transaction; returns the sequence number of the last. Once this
    /// returns, the events survive a `kill -9` (of control; of the database server too for
    /// PostgreSQL with its default `synchronous_commit`).
    fn audit_append(&self, events: &[(u64, &str, &str, Option<&str>, &str)]) -> Result<i64>;

    /// Removes at most `batch` of the oldest audit events with `time < before`, in one short
    /// transaction; returns how many went. Callers loop until fewer than `batch` went, so
    /// writers interleave with the pruning.
    fn audit_prune(&self, before: u64, batch: usize) -> Result<usize>;

    /// The store's size: (pages in use, free pages, page size).
    fn pages(&self) -> Result<(u64, u64, u64)>;

    /// Matching events, oldest first, at most `q.limit` (all when 0).
    fn audit_search(&self, q: &AuditQuery) -> Result<Vec<StoredEvent>>;

    /// One page of [`Backend::audit_search`]'s matches, newest first: at most `q.limit`
    /// events with `seq` below `before` (all when `None`). The web UI's audit page pages with
    /// it.
    fn audit_page(&self, q: &AuditQuery, before: Option<i64>) -> Result<Vec<StoredEvent>>;
}

/// The store control uses: one [`Backend`] plus the change count.
pub struct Store {
    backend: Box<dyn Backend>,
    /// Counts committed changes to users, roles, tokens, locks and CAs: the change feed.
    /// Control compares it around each request and publishes a snapshot when it moved, so no
    /// mutation path (deletes included) can forget to; [`Store::poll_changes`] moves it for
    /// other hosts' changes to a shared backend.
    changes: AtomicU64,
    /// The backend's revision as last seen by [`Store::poll_changes`].
    seen_revision: AtomicU64,
}

/// Read-only calls, passed through.
macro_rules! pass {
    ($($(#[$m:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $($(#[$m])* pub fn $name(&self, $($arg: $ty),*) -> Result<$ret> {
            self.backend.$name($($arg),*)
        })*
    };
}

/// Changes, passed through; the change count moves when `$changed` holds for the answer.
macro_rules! change {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, |$out:ident| $changed:expr;)*) => {
        $(pub fn $name(&self, $($arg: $ty),*) -> Result<$ret> {
            let $out = self.backend.$name($($arg),*)?;
            if $changed {
                self.changes.fetch_add(1, Ordering::SeqCst);
            }
            Ok($out)
        })*
    };
}

impl Store {
    /// The SQLite store at `path` (created if needed), schema brought up to date.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store::with_backend(Box::new(Sqlite::open(path)?)))
    }

    /// An in-memory SQLite store, for tests and benchmarks.
    pub fn memory() -> Result<Store> {
        Ok(Store::with_backend(Box::new(Sqlite::memory()?)))
    }

    /// The store `storage:` names: SQLite in `data_dir`, or PostgreSQL.
    pub fn from_config(
        storage: &jaunt_config::file::StorageConfig,
        data_dir: &Path,
    ) -> Result<Store> {
        match storage {
            jaunt_config::file::StorageConfig::Sqlite => Store::open(&data_dir.join("jaunt.db")),
            jaunt_config::file::StorageConfig::Postgres { conn_string } => Ok(Store::with_backend(
                Box::new(Postgres::connect(conn_string)?),
            )),
        }
    }

    pub fn with_backend(backend: Box<dyn Backend>) -> Store {
        let seen = backend.revision().unwrap_or(0);
        Store {
            backend,
            changes: AtomicU64::new(0),
            seen_revision: AtomicU64::new(seen),
        }
    }

    /// The backend itself.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// True when other hosts may write the same store (PostgreSQL): then
    /// [`Store::poll_changes`] is worth calling.
    pub fn is_shared(&self) -> bool {
        self.backend.kind() != "sqlite"
    }

    /// How many changes to users, roles, tokens, locks and CAs this store has seen since it
    /// was opened (see the field's doc).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Reads the backend's revision; when another host (or this one) committed a change since
    /// the last call, moves the change count and answers true.
    pub fn poll_changes(&self) -> Result<bool> {
        let rev = self.backend.revision()?;
        let before = self.seen_revision.swap(rev, Ordering::SeqCst);
        if rev != before {
            self.changes.fetch_add(1, Ordering::SeqCst);
            return Ok(true);
        }
        Ok(false)
    }

    pass! {
        schema_version() -> i64;
        integrity_check() -> String;
        try_lease(name: &str, holder: &str, now: u64, ttl_secs: u64) -> bool;
        heartbeat(m: &StoredMember, forget_secs: u64) -> ();
        list_members() -> Vec<StoredMember>;
        get_ca(name: &str) -> Option<StoredCa>;
        key_or_insert(name: &str, pem: &str, now: u64) -> String;
        get_ca_rotation(name: &str) -> Option<StoredRotation>;
        get_user(name: &str) -> Option<StoredUser>;
        list_users() -> Vec<StoredUser>;
        get_role(name: &str) -> Option<String>;
        list_roles() -> Vec<(String, String)>;
        list_tokens() -> Vec<StoredToken>;
        upsert_host(h: &StoredHost) -> ();
        get_host(id: &str) -> Option<StoredHost>;
        touch_hosts(ids: &[&str], now: u64) -> usize;
        list_hosts() -> Vec<StoredHost>;
        delete_host(id: &str) -> bool;
        list_locks(now: u64) -> Vec<StoredLock>;
        audit_append(events: &[(u64, &str, &str, Option<&str>, &str)]) -> i64;
        audit_prune(before: u64, batch: usize) -> usize;
        pages() -> (u64, u64, u64);
        audit_search(q: &AuditQuery) -> Vec<StoredEvent>;
        audit_page(q: &AuditQuery, before: Option<i64>) -> Vec<StoredEvent>;
    }

    change! {
        insert_ca_if_absent(ca: &StoredCa, now: u64) -> StoredCa, |out| out.x509_key_pem == ca.x509_key_pem;
        put_ca_rotation(rot: &StoredRotation, expect_seq: u64, promote: Option<&StoredCa>) -> bool, |out| out;
        insert_user(u: &StoredUser) -> bool, |out| out;
        update_user_spec(name: &str, spec: &str) -> bool, |out| out;
        set_user_credentials(name: &str, password_hash: &str, otp_secret: Option<&str>) -> bool, |out| out;
        delete_user(name: &str) -> bool, |out| out;
        put_role(name: &str, spec: &str, now: u64) -> (), |out| true;
        insert_role_if_absent(name: &str, spec: &str, now: u64) -> bool, |out| out;
        delete_role(name: &str) -> bool, |out| out;
        insert_token(t: &StoredToken) -> bool, |out| out;
        redeem_token(hash: &str, now: u64) -> TokenCheck, |out| matches!(&out, TokenCheck::Valid(t) if t.single_use);
        delete_tokens_by_prefix(prefix: &str) -> usize, |out| out > 0;
        prune_tokens(now: u64) -> usize, |out| out > 0;
        insert_lock(l: &StoredLock) -> (), |out| true;
        delete_lock(id: &str) -> bool, |out| out;
    }
}
