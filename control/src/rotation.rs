//! Phased CA rotation (issue 13): `jaunt ca rotate --type user|host|db|jwt|all --phase
//! init|update_clients|update_servers|standby|rollback`, its `--grace` thread, and the
//! agents' confirmations that guard each phase change.
//!
//! Phases of one CA (the `cas` row, or the `keys` row for `jwt`, is the *current* key until
//! `standby` promotes the *next* one, kept in the `ca_rotation` row meanwhile):
//!
//! | phase            | signs with | trusted      | servers' certificates from |
//! |------------------|------------|--------------|----------------------------|
//! | `standby`        | current    | current      | current                    |
//! | `init`           | current    | current+next | current                    |
//! | `update_clients` | next       | both         | current                    |
//! | `update_servers` | next       | both         | next (re-issued now)       |
//! | `rollback`       | current    | both         | current (re-issued now)    |
//!
//! `standby` after `update_servers` promotes next to current; after `rollback` it drops next.
//! Every verifier reads the trusted set from [`Authorities`]: the engine's TLS configs and
//! snapshot, control's API, `jaunt ca export`, and the agents' policy (which also tells an
//! agent to renew its host certificate when it is not from the signing host CA).
//!
//! Not in this file: the store's SQL (`store.rs`), signing (`ca.rs`), the HTTP routing
//! (`service/` calls [`Control::rotate`] and [`note_confirmation`]).

use std::sync::Arc;
use std::time::Duration;

use jaunt_config::api::{CaRotationInfo, RotateRequest, RotateResponse};
use jaunt_config::identity::unix_now;

use crate::audit;
use crate::ca::{Authorities, CaKind, CertAuthority};
use crate::jwt::JwtSigner;
use crate::service::Control;
use crate::store::{Store, StoredCa, StoredRotation};

/// The CAs that rotate, by the names `--type` takes.
pub const NAMES: [&str; 4] = ["user", "host", "db", "jwt"];

/// How often the `--grace` thread looks for a phase that is due.
pub const GRACE_TICK: Duration = Duration::from_secs(1);

/// Agents that have not polled for this long are not counted as stranded (they are offline;
/// they pick up the current phase when they come back).
pub const AGENT_CONFIRM_WINDOW_SECS: u64 = 60;

/// A rotation phase. The names are a contract (`--phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Standby,
    Init,
    UpdateClients,
    UpdateServers,
    Rollback,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Init,
        Phase::UpdateClients,
        Phase::UpdateServers,
        Phase::Standby,
        Phase::Rollback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Standby => "standby",
            Phase::Init => "init",
            Phase::UpdateClients => "update_clients",
            Phase::UpdateServers => "update_servers",
            Phase::Rollback => "rollback",
        }
    }

    pub fn parse(text: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == text)
    }

    /// Whether the next key signs in this phase.
    pub fn next_signs(self) -> bool {
        matches!(self, Phase::UpdateClients | Phase::UpdateServers)
    }

    /// The phase a `--grace` rotation moves to after this one.
    pub fn auto_next(self) -> Option<Phase> {
        match self {
            Phase::Init => Some(Phase::UpdateClients),
            Phase::UpdateClients => Some(Phase::UpdateServers),
            Phase::UpdateServers | Phase::Rollback => Some(Phase::Standby),
            Phase::Standby => None,
        }
    }
}

/// Whether CA `name` may go from `from` to `to`; the error says what is allowed instead.
pub fn check_transition(name: &str, from: Phase, to: Phase) -> Result<(), String> {
    let ok = match to {
        Phase::Init => from == Phase::Standby,
        Phase::UpdateClients => from == Phase::Init,
        Phase::UpdateServers => from == Phase::UpdateClients,
        Phase::Standby => matches!(from, Phase::UpdateServers | Phase::Rollback),
        Phase::Rollback => matches!(
            from,
            Phase::Init | Phase::UpdateClients | Phase::UpdateServers
        ),
    };
    if ok {
        return Ok(());
    }
    let expected = match from {
        Phase::Standby => "init (no rotation is in progress)".to_string(),
        Phase::Rollback => "standby (to finish the rollback)".to_string(),
        other => format!(
            "{} or rollback",
            other.auto_next().map_or("standby", Phase::name)
        ),
    };
    Err(format!(
        "the {name} CA is in phase {}: it cannot go to {} (next: {expected})",
        from.name(),
        to.name()
    ))
}

/// A refused rotation request, with its HTTP status.
#[derive(Debug)]
pub struct RotateError {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> RotateError {
    RotateError {
        status,
        message: message.into(),
    }
}

fn internal(e: impl std::fmt::Display) -> RotateError {
    refuse(500, e.to_string())
}

fn kind_of(name: &str) -> Option<CaKind> {
    CaKind::ALL.into_iter().find(|k| k.name() == name)
}

/// The stored rotation state of `name`, or `standby` at sequence 0.
fn stored(store: &Store, name: &str) -> Result<StoredRotation, crate::store::StoreError> {
    Ok(store.get_ca_rotation(name)?.unwrap_or(StoredRotation {
        name: name.to_string(),
        phase: Phase::Standby.name().to_string(),
        seq: 0,
        next: None,
        grace: None,
        deadline: None,
        updated: 0,
    }))
}

fn phase_of(rot: &StoredRotation) -> Phase {
    Phase::parse(&rot.phase).unwrap_or(Phase::Standby)
}

/// Builds [`Authorities`] from the store: each CA's current key, its rotation row, and which of
/// the two signs in its phase. The CAs and the JWT key must exist (bootstrap creates them).
pub fn load(store: &Store, jwt_pem_if_absent: &str) -> anyhow::Result<Authorities> {
    let mut phases = std::collections::BTreeMap::new();
    let mut pair =
        |kind: CaKind| -> anyhow::Result<(Arc<CertAuthority>, Option<Arc<CertAuthority>>)> {
            let current = store.get_ca(kind.name())?.ok_or_else(|| {
                anyhow::anyhow!("the {} CA is missing from the store", kind.name())
            })?;
            let current = Arc::new(CertAuthority::from_stored(kind, &current)?);
            let rot = stored(store, kind.name())?;
            let phase = phase_of(&rot);
            phases.insert(kind.name().to_string(), (rot.phase.clone(), rot.seq));
            let next = rot
                .next
                .as_ref()
                .map(|n| CertAuthority::from_stored(kind, n).map(Arc::new))
                .transpose()?;
            Ok(match next {
                Some(next) if phase.next_signs() => (next, Some(current)),
                next => (current, next),
            })
        };
    let (user, extra_user) = pair(CaKind::User)?;
    let (host, extra_host) = pair(CaKind::Host)?;
    let (db, extra_db) = pair(CaKind::Db)?;
    let jwt_current = Arc::new(JwtSigner::from_pem(&store.key_or_insert(
        crate::service::JWT_KEY_NAME,
        jwt_pem_if_absent,
        unix_now(),
    )?)?);
    let rot = stored(store, "jwt")?;
    phases.insert("jwt".to_string(), (rot.phase.clone(), rot.seq));
    let jwt_next = rot
        .next
        .as_ref()
        .map(|n| JwtSigner::from_pem(&n.x509_key_pem).map(Arc::new))
        .transpose()?;
    let (jwt, extra_jwt) = match jwt_next {
        Some(next) if phase_of(&rot).next_signs() => (next, Some(jwt_current)),
        next => (jwt_current, next),
    };
    Ok(Authorities {
        user,
        host,
        db,
        jwt,
        extra_user,
        extra_host,
        extra_db,
        extra_jwt,
        phases,
    })
}

/// The CA names a `--type` means.
pub fn names_of(ty: &str) -> Result<Vec<&'static str>, RotateError> {
    if ty == "all" {
        return Ok(NAMES.to_vec());
    }
    NAMES
        .iter()
        .find(|n| **n == ty)
        .map(|n| vec![*n])
        .ok_or_else(|| {
            refuse(
                400,
                format!("unknown CA type {ty:?}: expected user, host, db, jwt or all"),
            )
        })
}

/// A fresh key pair of the kind `name` stores.
fn fresh(name: &str, cluster: &str) -> Result<StoredCa, RotateError> {
    match kind_of(name) {
        Some(kind) => CertAuthority::generate(kind, cluster, unix_now())
            .and_then(|ca| ca.to_stored())
            .map_err(internal),
        None => Ok(StoredCa {
            name: name.to_string(),
            x509_key_pem: rcgen::KeyPair::generate()
                .map_err(internal)?
                .serialize_pem(),
            x509_cert_pem: String::new(),
            ssh_key: String::new(),
        }),
    }
}

/// The rotation state of every CA, as `jaunt ca rotate` and `jaunt status` print it.
pub fn describe(cas: &Authorities, store: &Store, names: &[&str]) -> Vec<CaRotationInfo> {
    names
        .iter()
        .map(|name| {
            let (signing, additional) = match kind_of(name) {
                Some(kind) => (
                    cas.get(kind).pin().to_string(),
                    cas.extra(kind).map(|c| c.pin().to_string()),
                ),
                None => (
                    format!("kid:{}", cas.jwt.kid()),
                    cas.extra_jwt.as_ref().map(|j| format!("kid:{}", j.kid())),
                ),
            };
            let deadline = store
                .get_ca_rotation(name)
                .ok()
                .flatten()
                .and_then(|r| r.deadline);
            CaRotationInfo {
                r#type: name.to_string(),
                phase: cas.phase(name).to_string(),
                signing,
                additional,
                next_phase_at: deadline,
            }
        })
        .collect()
}

impl Control {
    /// One `jaunt ca rotate` request by `by`: checks every named CA's transition and the
    /// agents' confirmations first, then changes each phase (one store transaction each),
    /// audits it, and swaps the authorities every verifier reads.
    pub fn rotate(&self, req: &RotateRequest, by: &str) -> Result<RotateResponse, RotateError> {
        let names = names_of(&req.r#type)?;
        let to = match (&req.phase, req.grace_secs) {
            (Some(p), _) => Phase::parse(p).ok_or_else(|| {
                refuse(
                    400,
                    format!(
                        "unknown phase {p:?}: expected init, update_clients, update_servers, \
                         standby or rollback"
                    ),
                )
            })?,
            (None, Some(_)) => Phase::Init,
            (None, None) => {
                return Err(refuse(400, "pass --phase PHASE, or --grace DURATION"));
            }
        };
        if req.grace_secs == Some(0) {
            return Err(refuse(400, "--grace must be longer than 0s"));
        }
        let mut plan = Vec::new();
        for name in &names {
            let rot = stored(&self.store, name).map_err(internal)?;
            check_transition(name, phase_of(&rot), to).map_err(|m| refuse(409, m))?;
            plan.push(rot);
        }
        if !req.force {
            let stranded = self.unconfirmed_agents();
            if !stranded.is_empty() {
                return Err(refuse(
                    409,
                    format!(
                        "{} connected agent(s) have not confirmed the current CA phase yet: {}. \
                         Changing the phase now could strand them; agents confirm within \
                         seconds (they poll every 5 s), so retry shortly, or pass --force",
                        stranded.len(),
                        stranded.join(", ")
                    ),
                ));
            }
        }
        for rot in plan {
            self.apply_phase(rot, to, req.grace_secs, by)?;
        }
        self.reload_authorities().map_err(internal)?;
        Ok(RotateResponse {
            cas: describe(&self.cas(), &self.store, &names),
        })
    }

    /// Writes one CA's phase change and its audit event (the caller reloads).
    fn apply_phase(
        &self,
        rot: StoredRotation,
        to: Phase,
        grace: Option<u64>,
        by: &str,
    ) -> Result<(), RotateError> {
        let from = phase_of(&rot);
        let now = unix_now();
        let mut promote = None;
        let next = match (from, to) {
            (_, Phase::Init) => Some(fresh(&rot.name, &self.settings.cluster)?),
            (Phase::UpdateServers, Phase::Standby) => {
                promote = rot.next.clone();
                None
            }
            (_, Phase::Standby) => None,
            _ => rot.next.clone(),
        };
        // A `--grace` given now (or kept from the rotation's start) times the next step.
        let grace = match to {
            Phase::Init => grace,
            Phase::Standby => None,
            _ => grace.or(rot.grace),
        };
        let row = StoredRotation {
            name: rot.name.clone(),
            phase: to.name().to_string(),
            seq: rot.seq + 1,
            next,
            grace,
            deadline: grace
                .filter(|_| to.auto_next().is_some())
                .map(|g| now.saturating_add(g)),
            updated: now,
        };
        if !self
            .store
            .put_ca_rotation(&row, rot.seq, promote.as_ref())
            .map_err(internal)?
        {
            return Err(refuse(
                409,
                format!(
                    "the {} CA's phase changed meanwhile; look at `jaunt status` and retry",
                    rot.name
                ),
            ));
        }
        self.audit.emit(
            audit::CA_ROTATED,
            Some(by),
            &serde_json::json!({
                "user": by, "ca": rot.name, "from": from.name(), "phase": to.name(),
                "seq": row.seq, "grace_secs": row.grace, "next_phase_at": row.deadline,
            }),
        );
        tracing::info!(ca = %rot.name, from = from.name(), to = to.name(), by, "CA rotation phase changed");
        Ok(())
    }

    /// Re-reads the authorities from the store and hands them to every verifier: control's
    /// own (the API's TLS through the registered hooks), the engine (snapshot and TLS configs
    /// through the hooks), and agents (their next policy poll).
    pub fn reload_authorities(&self) -> anyhow::Result<()> {
        // The JWT key exists since bootstrap: nothing is inserted here.
        let fresh = Arc::new(load(&self.store, "")?);
        self.set_cas(fresh.clone());
        self.run_ca_hooks(&fresh);
        self.publish_snapshot();
        Ok(())
    }

    /// For a store other controls write too: when a CA's stored phase or sequence differs from
    /// the authorities in force here (another control changed the phase), reload them, which
    /// also rebuilds this host's TLS through the hooks. True when it reloaded.
    pub fn refresh_if_rotated(&self) -> anyhow::Result<bool> {
        let cas = self.cas();
        for name in NAMES {
            let rot = stored(&self.store, name)?;
            let here = cas.phases.get(name).map(|(p, s)| (p.as_str(), *s));
            if here != Some((rot.phase.as_str(), rot.seq)) {
                self.reload_authorities()?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The `--grace` step: every CA whose deadline passed moves to its next phase (as the
    /// `rotation` principal, refused like a manual change while agents have not confirmed).
    pub fn advance_due_rotations(&self, now: u64) {
        for name in NAMES {
            let Ok(rot) = stored(&self.store, name) else {
                continue;
            };
            let Some(due) = rot.deadline else { continue };
            if due > now {
                continue;
            }
            let Some(to) = phase_of(&rot).auto_next() else {
                continue;
            };
            let req = RotateRequest {
                r#type: name.to_string(),
                phase: Some(to.name().to_string()),
                grace_secs: None,
                force: false,
            };
            match self.rotate(&req, "rotation") {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(ca = name, error = %e.message, "automatic phase change waits")
                }
            }
        }
    }
}

/// Starts the `--grace` thread: every [`GRACE_TICK`], phases whose deadline passed advance.
/// Ends when `stop` is dropped.
pub fn spawn_grace_thread(
    control: Arc<Control>,
    stop: crossbeam_channel::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ca-rotation".into())
        .spawn(move || loop {
            match stop.recv_timeout(GRACE_TICK) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    control.advance_due_rotations(unix_now())
                }
                _ => return,
            }
        })
}

/// Records an agent's confirmation (`GET /v1/agent/policy?confirmed=GENERATION`).
pub fn note_confirmation(
    confirmations: &std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>,
    host: &str,
    query: &[(String, String)],
) {
    let confirmed = query
        .iter()
        .find(|(k, _)| k == "confirmed")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut map = confirmations.lock().unwrap_or_else(|p| p.into_inner());
    // Bounded by the number of joined hosts that poll; an entry is one host id.
    map.insert(host.to_string(), (confirmed, unix_now()));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_are_the_contract() {
        let names: Vec<_> = Phase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            [
                "init",
                "update_clients",
                "update_servers",
                "standby",
                "rollback"
            ]
        );
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.name()), Some(p));
        }
        assert_eq!(Phase::parse("updateclients"), None);
    }

    #[test]
    fn transitions_follow_the_order_and_rollback_only_before_standby() {
        use Phase::*;
        let allowed = [
            (Standby, Init),
            (Init, UpdateClients),
            (UpdateClients, UpdateServers),
            (UpdateServers, Standby),
            (Init, Rollback),
            (UpdateClients, Rollback),
            (UpdateServers, Rollback),
            (Rollback, Standby),
        ];
        for from in [Standby, Init, UpdateClients, UpdateServers, Rollback] {
            for to in Phase::ALL {
                assert_eq!(
                    check_transition("user", from, to).is_ok(),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        let e = check_transition("user", Standby, Rollback).unwrap_err();
        assert!(e.contains("no rotation is in progress"), "{e}");
        let e = check_transition("host", Init, UpdateServers).unwrap_err();
        assert!(e.contains("update_clients or rollback"), "{e}");
    }

    #[test]
    fn a_second_control_on_the_same_store_follows_a_phase_change() {
        let store = Arc::new(Store::memory().unwrap());
        let settings = crate::service::Settings {
            cluster: "c".into(),
            public_addr: "127.0.0.1:1".into(),
            second_factor: false,
            user_ttl_secs: 600,
            host_ttl_secs: 600,
        };
        let a = Control::bootstrap(store.clone(), settings.clone()).unwrap();
        let b = Control::bootstrap(store, settings).unwrap();
        assert!(!b.refresh_if_rotated().unwrap());
        let req = |phase: &str| RotateRequest {
            r#type: "user".into(),
            phase: Some(phase.into()),
            grace_secs: None,
            force: false,
        };
        a.rotate(&req("init"), "admin").unwrap();
        a.rotate(&req("update_clients"), "admin").unwrap();
        assert_eq!(b.cas().phase("user"), "standby");
        assert!(b.refresh_if_rotated().unwrap());
        assert_eq!(b.cas().phase("user"), "update_clients");
        assert_eq!(
            b.cas().user.pin(),
            a.cas().user.pin(),
            "b signs with the new CA"
        );
        assert!(!b.refresh_if_rotated().unwrap());
        // Both controls' grace threads may try the same step: one wins, the other is told.
        let stale = stored(&b.store, "user").unwrap();
        a.rotate(&req("update_servers"), "admin").unwrap();
        let e = b
            .apply_phase(stale, Phase::UpdateServers, None, "rotation")
            .unwrap_err();
        assert_eq!(e.status, 409, "{}", e.message);
    }

    #[test]
    fn load_follows_the_phase() {
        let store = Store::memory().unwrap();
        let now = unix_now();
        for kind in CaKind::ALL {
            let ca = CertAuthority::generate(kind, "c", now).unwrap();
            store
                .insert_ca_if_absent(&ca.to_stored().unwrap(), now)
                .unwrap();
        }
        let jwt = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let before = load(&store, &jwt).unwrap();
        assert!(before.extra_user.is_none());
        assert_eq!(before.generation(), load(&store, "").unwrap().generation());
        let next = fresh("user", "c").unwrap();
        let next_pin = CertAuthority::from_stored(CaKind::User, &next)
            .unwrap()
            .pin()
            .to_string();
        let mut row = StoredRotation {
            name: "user".into(),
            phase: "init".into(),
            seq: 1,
            next: Some(next),
            grace: None,
            deadline: None,
            updated: now,
        };
        store.put_ca_rotation(&row, 0, None).unwrap();
        let init = load(&store, "").unwrap();
        assert_eq!(
            init.user.pin(),
            before.user.pin(),
            "init still signs with the old"
        );
        assert_eq!(init.extra_user.as_ref().unwrap().pin(), next_pin);
        assert_eq!(init.trusted_der(CaKind::User).len(), 2);
        assert_eq!(init.ssh_lines(CaKind::User).len(), 2);
        assert_ne!(init.generation(), before.generation());
        row.phase = "update_clients".into();
        row.seq = 2;
        store.put_ca_rotation(&row, 1, None).unwrap();
        let clients = load(&store, "").unwrap();
        assert_eq!(
            clients.user.pin(),
            next_pin,
            "update_clients signs with the new"
        );
        assert_eq!(
            clients.extra_user.as_ref().unwrap().pin(),
            before.user.pin()
        );
        assert_eq!(
            clients.trusted_pem(CaKind::User).matches("BEGIN").count(),
            2
        );
        assert_eq!(clients.host.pin(), before.host.pin(), "other CAs untouched");
    }
}
