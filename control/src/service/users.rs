//! Users: `GET|POST /v1/users`, `DELETE /v1/users/NAME` and `POST /v1/users/NAME/reset`, and
//! the user creation `jaunt create -f` shares.
//!
//! Not here: logging in (`login.rs`), roles and `jaunt create -f` itself (`resources.rs`),
//! password hashing and one-time codes (`auth.rs`).

use std::collections::BTreeMap;

use jaunt_config::api::{UserAddRequest, UserCredentials, UserInfo, UserResetRequest};
use jaunt_config::identity::{unix_now, Identity};
use jaunt_config::resource::User;

use super::{internal, user_from_stored, valid_name, Control, Reply};
use crate::audit;
use crate::auth;
use crate::http::{Request, Response};
use crate::store::StoredUser;

impl Control {
    pub(super) fn list_users(&self, caller: &Identity) -> Reply {
        self.require(caller, "user", "list")?;
        let users: Vec<UserInfo> = self
            .store
            .list_users()
            .map_err(internal)?
            .iter()
            .filter_map(|s| {
                let u = user_from_stored(s).ok()?;
                Some(UserInfo {
                    name: s.name.clone(),
                    roles: u.spec.roles.clone(),
                    traits: u.spec.traits.clone(),
                    created: s.created,
                    otp_enrolled: s.otp_secret.is_some(),
                    description: u.metadata.description.clone(),
                    labels: u.metadata.labels.clone(),
                })
            })
            .collect();
        Ok(Response::json(200, &users))
    }

    pub(super) fn add_user(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "user", "create")?;
        let body: UserAddRequest = req.json()?;
        let mut traits = BTreeMap::new();
        for (k, v) in [
            ("logins", &body.logins),
            ("db_users", &body.db_users),
            ("db_names", &body.db_names),
        ] {
            if !v.is_empty() {
                traits.insert(k.to_string(), v.clone());
            }
        }
        let user = User::new(&body.name, body.roles.clone(), traits);
        let creds = self.insert_user(caller, &user, body.password)?;
        Ok(Response::json(200, &creds))
    }

    /// Creates `user` with `password` (or a generated one); answers with what the person needs.
    pub(super) fn insert_user(
        &self,
        caller: &Identity,
        user: &User,
        password: Option<String>,
    ) -> Result<UserCredentials, Response> {
        valid_name("user name", &user.metadata.name)?;
        if user.spec.roles.is_empty() {
            return Err(Response::error(
                400,
                "a user needs at least one role (--roles)",
            ));
        }
        self.roles_of(&user.spec.roles)?;
        let generated = password.is_none();
        let password = match password {
            Some(p) => p,
            None => auth::random_password().map_err(internal)?,
        };
        let hash =
            auth::hash_password(&password).map_err(|e| Response::error(400, e.to_string()))?;
        let otp_secret = if self.settings.second_factor {
            Some(auth::new_otp_secret().map_err(internal)?)
        } else {
            None
        };
        let stored = StoredUser {
            name: user.metadata.name.clone(),
            spec: serde_json::to_string(user).map_err(internal)?,
            password_hash: hash,
            otp_secret: otp_secret.clone(),
            created: unix_now(),
        };
        if !self.store.insert_user(&stored).map_err(internal)? {
            return Err(Response::error(
                409,
                format!("user {} already exists", user.metadata.name),
            ));
        }
        self.audit.emit(
            audit::USER_CREATED,
            Some(&caller.name),
            &serde_json::json!({
                "user": caller.name, "name": user.metadata.name, "roles": user.spec.roles,
            }),
        );
        self.credentials(
            &user.metadata.name,
            generated.then_some(password),
            otp_secret,
        )
    }

    pub(super) fn credentials(
        &self,
        name: &str,
        password: Option<String>,
        otp_secret: Option<String>,
    ) -> Result<UserCredentials, Response> {
        let otp_url = match &otp_secret {
            Some(s) => Some(
                auth::otp_url(s, &format!("{name}@{}", self.settings.cluster)).map_err(internal)?,
            ),
            None => None,
        };
        Ok(UserCredentials {
            name: name.to_string(),
            password,
            otp_secret,
            otp_url,
        })
    }

    pub(super) fn delete_user(&self, caller: &Identity, name: &str) -> Reply {
        self.require(caller, "user", "delete")?;
        if !self.store.delete_user(name).map_err(internal)? {
            return Err(Response::error(404, format!("no such user: {name}")));
        }
        self.audit.emit(
            audit::USER_DELETED,
            Some(&caller.name),
            &serde_json::json!({"user": caller.name, "name": name}),
        );
        Ok(Response::json(200, &serde_json::json!({"deleted": name})))
    }

    pub(super) fn reset_user(&self, req: &Request, caller: &Identity, name: &str) -> Reply {
        self.require(caller, "user", "update")?;
        let body: UserResetRequest = if req.body.is_empty() {
            UserResetRequest::default()
        } else {
            req.json()?
        };
        let generated = body.password.is_none();
        let password = match body.password {
            Some(p) => p,
            None => auth::random_password().map_err(internal)?,
        };
        let hash =
            auth::hash_password(&password).map_err(|e| Response::error(400, e.to_string()))?;
        let otp_secret = if self.settings.second_factor {
            Some(auth::new_otp_secret().map_err(internal)?)
        } else {
            None
        };
        if !self
            .store
            .set_user_credentials(name, &hash, otp_secret.as_deref())
            .map_err(internal)?
        {
            return Err(Response::error(404, format!("no such user: {name}")));
        }
        self.audit.emit(
            audit::USER_UPDATED,
            Some(&caller.name),
            &serde_json::json!({
                "user": caller.name, "name": name, "change": "credentials reset",
            }),
        );
        Ok(Response::json(
            200,
            &self.credentials(name, generated.then_some(password), otp_secret)?,
        ))
    }
}
