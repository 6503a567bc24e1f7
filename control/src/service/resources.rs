//! Roles, locks and `jaunt create -f`: `GET /v1/roles`, `DELETE /v1/roles/NAME`, `GET
//! /v1/locks`, `DELETE /v1/locks/ID`, `POST /v1/resources`, and which lock in force refuses a
//! login.
//!
//! Not here: role evaluation (`rbac.rs`, `jaunt_config::rbac`); creating users and tokens
//! (`users.rs`, `tokens.rs`, which `POST /v1/resources` calls); the snapshot that carries roles
//! and locks to the engine (`mod.rs`).

use jaunt_config::api::TokenAddRequest;
use jaunt_config::identity::{unix_now, Identity};
use jaunt_config::resource::{Lock, LockTarget, Resource, Role};

use super::{internal, random_hex, user_from_stored, valid_name, Control, Reply};
use crate::audit;
use crate::http::{Request, Response};
use crate::store::StoredLock;

impl Control {
    pub(super) fn list_roles(&self, caller: &Identity) -> Reply {
        self.require(caller, "role", "list")?;
        let roles: Vec<Role> = self
            .store
            .list_roles()
            .map_err(internal)?
            .iter()
            .filter_map(|(_, spec)| serde_json::from_str(spec).ok())
            .collect();
        Ok(Response::json(200, &roles))
    }

    pub(super) fn delete_role(&self, caller: &Identity, name: &str) -> Reply {
        self.require(caller, "role", "delete")?;
        let in_use: Vec<String> = self
            .store
            .list_users()
            .map_err(internal)?
            .iter()
            .filter_map(|s| user_from_stored(s).ok())
            .filter(|u| u.spec.roles.iter().any(|r| r == name))
            .map(|u| u.metadata.name)
            .collect();
        if !in_use.is_empty() {
            return Err(Response::error(
                409,
                format!("role {name} is still assigned to: {}", in_use.join(", ")),
            ));
        }
        if !self.store.delete_role(name).map_err(internal)? {
            return Err(Response::error(404, format!("no such role: {name}")));
        }
        self.audit.emit(
            audit::ROLE_DELETED,
            Some(&caller.name),
            &serde_json::json!({"user": caller.name, "name": name}),
        );
        Ok(Response::json(200, &serde_json::json!({"deleted": name})))
    }

    pub(super) fn list_locks(&self, caller: &Identity) -> Reply {
        self.require(caller, "lock", "list")?;
        let locks: Vec<Lock> = self
            .store
            .list_locks(unix_now())
            .map_err(internal)?
            .iter()
            .filter_map(|l| serde_json::from_str(&l.spec).ok())
            .collect();
        Ok(Response::json(200, &locks))
    }

    pub(super) fn delete_lock(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "lock", "delete")?;
        if !self.store.delete_lock(id).map_err(internal)? {
            return Err(Response::error(404, format!("no such lock: {id}")));
        }
        self.audit.emit(
            audit::LOCK_DELETED,
            Some(&caller.name),
            &serde_json::json!({"user": caller.name, "id": id}),
        );
        Ok(Response::json(200, &serde_json::json!({"deleted": id})))
    }

    /// `jaunt create -f`: one resource (the CLI parsed the YAML and reported its errors with
    /// lines; this re-validates, since the API is public).
    pub(super) fn create_resource(&self, req: &Request, caller: &Identity) -> Reply {
        let resource: Resource = req.json()?;
        let now = unix_now();
        match resource {
            Resource::Role(role) => {
                self.require(caller, "role", "create")?;
                valid_name("role name", &role.metadata.name)?;
                let existed = self
                    .store
                    .get_role(&role.metadata.name)
                    .map_err(internal)?
                    .is_some();
                self.store
                    .put_role(
                        &role.metadata.name,
                        &serde_json::to_string(&role).map_err(internal)?,
                        now,
                    )
                    .map_err(internal)?;
                self.audit.emit(
                    if existed {
                        audit::ROLE_UPDATED
                    } else {
                        audit::ROLE_CREATED
                    },
                    Some(&caller.name),
                    &serde_json::json!({
                        "user": caller.name, "name": role.metadata.name,
                    }),
                );
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "role", "name": role.metadata.name, "updated": existed}),
                ))
            }
            Resource::User(user) => {
                self.require(caller, "user", "create")?;
                if self
                    .store
                    .get_user(&user.metadata.name)
                    .map_err(internal)?
                    .is_some()
                {
                    self.roles_of(&user.spec.roles)?;
                    self.store
                        .update_user_spec(
                            &user.metadata.name,
                            &serde_json::to_string(&user).map_err(internal)?,
                        )
                        .map_err(internal)?;
                    self.audit.emit(audit::USER_UPDATED, Some(&caller.name), &serde_json::json!({
                        "user": caller.name, "name": user.metadata.name, "roles": user.spec.roles,
                    }));
                    return Ok(Response::json(
                        200,
                        &serde_json::json!({"kind": "user", "name": user.metadata.name, "updated": true}),
                    ));
                }
                let creds = self.insert_user(caller, &user, None)?;
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "user", "name": user.metadata.name, "updated": false, "credentials": creds}),
                ))
            }
            Resource::Token(token) => {
                self.require(caller, "token", "create")?;
                let resp = self.insert_token(
                    caller,
                    TokenAddRequest {
                        types: token
                            .spec
                            .types
                            .iter()
                            .map(|t| format!("{t:?}").to_lowercase())
                            .collect(),
                        ttl_secs: token.spec.ttl.as_secs(),
                        single_use: token.spec.single_use,
                        token: Some(token.metadata.name.clone()).filter(|n| !n.is_empty()),
                    },
                )?;
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "token", "token": resp.token, "info": resp.info}),
                ))
            }
            Resource::Lock(lock) => {
                self.require(caller, "lock", "create")?;
                let id = if lock.metadata.name.is_empty() {
                    random_hex(8).map_err(internal)?
                } else {
                    lock.metadata.name.clone()
                };
                let expires = lock.spec.ttl.as_ref().map(|t| now + t.as_secs());
                let mut lock = lock;
                lock.metadata.name = id.clone();
                self.store
                    .insert_lock(&StoredLock {
                        id: id.clone(),
                        spec: serde_json::to_string(&lock).map_err(internal)?,
                        expires,
                        created: now,
                    })
                    .map_err(internal)?;
                self.audit.emit(
                    audit::LOCK_CREATED,
                    Some(&caller.name),
                    &serde_json::json!({
                        "user": caller.name, "id": id, "target": lock.spec.target,
                    }),
                );
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "lock", "name": id}),
                ))
            }
        }
    }

    /// The first lock in force that targets this user or one of these roles, as (id, message).
    pub(super) fn matching_lock(
        &self,
        user: &str,
        roles: &[String],
        now: u64,
    ) -> Result<Option<(String, String)>, Response> {
        for l in self.store.list_locks(now).map_err(internal)? {
            let Ok(lock) = serde_json::from_str::<Lock>(&l.spec) else {
                continue;
            };
            let hit = match &lock.spec.target {
                LockTarget::User(u) => u == user,
                LockTarget::Role(r) => roles.contains(r),
                LockTarget::Node(_) | LockTarget::Login(_) => false,
            };
            if hit {
                let message = lock
                    .spec
                    .message
                    .clone()
                    .unwrap_or_else(|| "locked by an administrator".into());
                return Ok(Some((l.id, message)));
            }
        }
        Ok(None)
    }
}
