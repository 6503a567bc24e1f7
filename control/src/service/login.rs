//! The open endpoints and the certificates they and renewals issue: `GET /v1/ping`,
//! `POST /v1/login` (and [`Control::password_login`], which the web UI's login shares), `POST
//! /v1/join` (an agent redeems a join token) and `POST /v1/hosts/renew`, all signing through
//! `issue`.
//!
//! Not here: the password and one-time-code checks themselves (`auth.rs`), the signing
//! (`ca.rs`), and join tokens' creation and listing (`tokens.rs`).

use jaunt_config::api::{Certs, JoinRequest, LoginRequest, PingResponse, RenewRequest};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

use super::{
    internal, random_hex, token_hash, user_from_stored, valid_name, Control, LoginVia,
    PasswordLogin, Reply,
};
use crate::audit;
use crate::auth;
use crate::ca::{self, CaKind};
use crate::http::{Request, Response};
use crate::rbac;
use crate::store::{StoredHost, TokenCheck};

impl Control {
    pub(super) fn ping(&self) -> Reply {
        Ok(Response::json(
            200,
            &PingResponse {
                cluster_name: self.settings.cluster.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                public_addr: self.public_addr(),
                host_ca_pin: self.cas().host.pin().to_string(),
                second_factor: if self.settings.second_factor {
                    "otp"
                } else {
                    "off"
                }
                .to_string(),
            },
        ))
    }

    pub(super) fn login(&self, req: &Request) -> Reply {
        let body: LoginRequest = req.json()?;
        let addr = req.peer.ip().to_string();
        let identity = self.password_login(
            &PasswordLogin {
                user: &body.user,
                password: &body.password,
                otp: body.otp.as_deref(),
                ttl_secs: body.ttl_secs,
                addr: &addr,
                via: LoginVia::Cli,
            },
            unix_now(),
        )?;
        let certs = self.issue(&identity, &body.tls_public_key, &body.ssh_public_key, &[])?;
        Ok(Response::json(200, &certs))
    }

    /// Checks a user's password (and one-time code when the cluster requires one) under the
    /// failed-login limits, refuses locked users, and returns the identity a login grants. Both
    /// `POST /v1/login` and the web UI's login call it, so they share limits and audit events
    /// (`user.login` / `user.login.failed`; the web's carry `"via": "web"`).
    pub fn password_login(
        &self,
        login: &PasswordLogin<'_>,
        now: u64,
    ) -> Result<Identity, Response> {
        let name = login.user;
        let addr = login.addr;
        let via = |mut fields: serde_json::Value| {
            if login.via == LoginVia::Web {
                fields["via"] = "web".into();
            }
            fields
        };
        let user_key = format!("user:{name}");
        let addr_key = format!("addr:{addr}");
        for key in [&user_key, &addr_key] {
            if let Some(wait) = self.limiter.blocked(key, now) {
                self.audit.emit(
                    audit::LOGIN_FAILED,
                    Some(name),
                    &via(serde_json::json!({
                        "user": name, "addr": addr, "reason": "rate limited",
                    })),
                );
                return Err(Response::error(
                    429,
                    format!("too many failed logins; try again in {wait} s"),
                ));
            }
        }
        let stored = self.store.get_user(name).map_err(internal)?;
        let hash = stored
            .as_ref()
            .map_or(auth::dummy_hash(), |u| u.password_hash.as_str());
        let password_ok = auth::verify_password(login.password, hash) && stored.is_some();
        let fail = |reason: &str, message: &str| {
            self.limiter.fail(&user_key, now);
            self.limiter.fail(&addr_key, now);
            self.audit.emit(
                audit::LOGIN_FAILED,
                Some(name),
                &via(serde_json::json!({
                    "user": name, "addr": addr, "reason": reason,
                })),
            );
            Response::error(401, message)
        };
        let Some(stored) = stored.filter(|_| password_ok) else {
            return Err(fail("bad password", "invalid user name or password"));
        };
        if self.settings.second_factor {
            let Some(secret) = stored.otp_secret.as_deref() else {
                return Err(fail("no second factor enrolled", "this user has no second factor enrolled; ask an admin to run `jaunt users reset`"));
            };
            match login.otp {
                None | Some("") => {
                    return Err(Response::error(
                        401,
                        match login.via {
                            LoginVia::Cli => {
                                "this cluster requires a one-time code: pass --otp CODE"
                            }
                            LoginVia::Web => "this cluster requires a one-time code",
                        },
                    ));
                }
                Some(code) if !auth::verify_otp(secret, code, now) => {
                    return Err(fail("bad one-time code", "invalid one-time code"));
                }
                Some(_) => {}
            }
        }
        let user = user_from_stored(&stored).map_err(internal)?;
        let roles = self.roles_of(&user.spec.roles)?;
        if let Some(lock) = self.matching_lock(&user.metadata.name, &user.spec.roles, now)? {
            self.audit.emit(
                audit::LOGIN_FAILED,
                Some(name),
                &via(serde_json::json!({
                    "user": name, "addr": addr, "reason": "locked", "lock": lock.0,
                })),
            );
            return Err(Response::error(
                403,
                format!("user {name} is locked: {}", lock.1),
            ));
        }
        self.limiter.clear(&user_key);
        self.limiter.clear(&addr_key);
        let ttl = rbac::cap_ttl(
            &roles,
            login
                .ttl_secs
                .unwrap_or(self.settings.user_ttl_secs)
                .min(self.settings.user_ttl_secs),
        );
        let identity = rbac::user_identity(&user, &roles, &self.settings.cluster, now, ttl);
        self.audit.emit(
            audit::LOGIN_OK,
            Some(name),
            &via(serde_json::json!({
                "user": name, "addr": addr, "roles": identity.roles, "expires": identity.expires,
            })),
        );
        Ok(identity)
    }

    pub(super) fn join(&self, req: &Request) -> Reply {
        let body: JoinRequest = req.json()?;
        let now = unix_now();
        let addr = req.peer.ip().to_string();
        let addr_key = format!("addr:{addr}");
        if let Some(wait) = self.limiter.blocked(&addr_key, now) {
            return Err(Response::error(
                429,
                format!("too many failed joins; try again in {wait} s"),
            ));
        }
        valid_name("host name", &body.host_name)?;
        let token = match self
            .store
            .redeem_token(&token_hash(&body.token), now)
            .map_err(internal)?
        {
            TokenCheck::Valid(t) => t,
            TokenCheck::Expired => {
                self.limiter.fail(&addr_key, now);
                return Err(Response::error(
                    401,
                    "join token expired; create a new one with `jaunt tokens add`",
                ));
            }
            TokenCheck::Unknown => {
                self.limiter.fail(&addr_key, now);
                return Err(Response::error(
                    401,
                    "join token is not valid (unknown, removed or already used)",
                ));
            }
        };
        let id = random_hex(16).map_err(internal)?;
        let identity = Identity {
            roles: token.types.clone(),
            logins: vec![body.host_name.clone(), id.clone()],
            ..Identity::issued(
                IdentityKind::Host,
                &id,
                &self.settings.cluster,
                now,
                self.settings.host_ttl_secs,
            )
        };
        let certs = self.issue(
            &identity,
            &body.tls_public_key,
            &body.ssh_public_key,
            &[id.clone(), body.host_name.clone()],
        )?;
        self.store
            .upsert_host(&StoredHost {
                id: id.clone(),
                name: body.host_name.clone(),
                types: token.types.clone(),
                joined: now,
                last_seen: now,
            })
            .map_err(internal)?;
        // The new host replaces earlier records of its name that are not connected (the same
        // agent joining again, e.g. with a new token), so they are not listed forever.
        self.remove_stale_hosts(None, &body.host_name, Some(&id))?;
        self.audit.emit(
            audit::HOST_JOINED,
            None,
            &serde_json::json!({
                "host_id": id, "host_name": body.host_name, "types": token.types, "addr": addr,
            }),
        );
        Ok(Response::json(200, &certs))
    }

    pub(super) fn renew(&self, req: &Request, caller: &Identity) -> Reply {
        if caller.kind != IdentityKind::Host {
            return Err(Response::error(403, "only hosts renew host certificates"));
        }
        let body: RenewRequest = req.json()?;
        let now = unix_now();
        let identity = Identity {
            not_before: now.saturating_sub(60),
            expires: now + self.settings.host_ttl_secs,
            ..caller.clone()
        };
        let certs = self.issue(
            &identity,
            &body.tls_public_key,
            &body.ssh_public_key,
            &identity.logins,
        )?;
        if let Some(mut host) = self.store.get_host(&caller.name).map_err(internal)? {
            host.last_seen = now;
            self.store.upsert_host(&host).map_err(internal)?;
        }
        Ok(Response::json(200, &certs))
    }

    /// Signs X.509 and SSH certificates for `identity` over the caller's public keys.
    pub(super) fn issue(
        &self,
        identity: &Identity,
        tls_public_pem: &str,
        ssh_public: &str,
        dns_names: &[String],
    ) -> Result<Certs, Response> {
        let spki =
            ca::spki_pem_to_der(tls_public_pem).map_err(|e| Response::error(400, e.to_string()))?;
        let ssh_public = ssh_key::PublicKey::from_openssh(ssh_public)
            .map_err(|e| Response::error(400, format!("ssh_public_key: {e}")))?;
        let cas = self.cas();
        let ca = match identity.kind {
            IdentityKind::User => &cas.user,
            IdentityKind::Host => &cas.host,
        };
        let tls = ca
            .sign_x509(identity, &spki, dns_names)
            .map_err(|e| Response::error(400, e.to_string()))?;
        let ssh = ca.sign_ssh(identity, &ssh_public).map_err(internal)?;
        self.audit.emit(audit::CERT_ISSUED, Some(&identity.name), &serde_json::json!({
            "user": identity.name, "kind": identity.kind, "roles": identity.roles, "expires": identity.expires,
        }));
        Ok(Certs {
            identity: identity.clone(),
            tls_cert: ca::cert_pem(&tls),
            ssh_cert: ssh.to_openssh().map_err(internal)?,
            host_ca_tls: cas.trusted_pem(CaKind::Host),
            user_ca_tls: cas.trusted_pem(CaKind::User),
            host_ca_ssh: cas.ssh_lines(CaKind::Host).join("\n"),
            user_ca_ssh: cas.ssh_lines(CaKind::User).join("\n"),
            engines: self.healthy_engines().unwrap_or_default(),
        })
    }
}
