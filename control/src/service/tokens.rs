//! Join tokens: `GET|POST /v1/tokens` and `DELETE /v1/tokens/ID`, and the token creation
//! `jaunt create -f` shares.
//!
//! Not here: redeeming a token (`POST /v1/join`, `login.rs`); the store keeps only each
//! token's hash ([`super::token_hash`]).

use jaunt_config::api::{TokenAddRequest, TokenAddResponse, TokenInfo};
use jaunt_config::identity::{unix_now, Identity};

use super::{internal, random_hex, token_hash, Control, Reply, MAX_TOKEN_TTL_SECS, TOKEN_TYPES};
use crate::audit;
use crate::http::{Request, Response};
use crate::store::StoredToken;

impl Control {
    pub(super) fn list_tokens(&self, caller: &Identity) -> Reply {
        self.require(caller, "token", "list")?;
        let now = unix_now();
        self.store.prune_tokens(now).map_err(internal)?;
        let tokens: Vec<TokenInfo> = self
            .store
            .list_tokens()
            .map_err(internal)?
            .iter()
            .map(token_info)
            .collect();
        Ok(Response::json(200, &tokens))
    }

    pub(super) fn add_token(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "token", "create")?;
        let body: TokenAddRequest = req.json()?;
        Ok(Response::json(200, &self.insert_token(caller, body)?))
    }

    pub(super) fn insert_token(
        &self,
        caller: &Identity,
        body: TokenAddRequest,
    ) -> Result<TokenAddResponse, Response> {
        if body.types.is_empty() {
            return Err(Response::error(
                400,
                "a token needs at least one type (--type node,app,db)",
            ));
        }
        for t in &body.types {
            if !TOKEN_TYPES.contains(&t.as_str()) {
                return Err(Response::error(
                    400,
                    format!(
                        "unknown token type {t:?}: expected one of {}",
                        TOKEN_TYPES.join(", ")
                    ),
                ));
            }
        }
        if body.ttl_secs == 0 || body.ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(Response::error(
                400,
                format!(
                    "token ttl must be between 1s and {}h",
                    MAX_TOKEN_TTL_SECS / 3600
                ),
            ));
        }
        let token = match body.token {
            Some(t) if t.len() >= 16 => t,
            Some(_) => {
                return Err(Response::error(
                    400,
                    "a chosen token must be at least 16 characters",
                ))
            }
            None => random_hex(16).map_err(internal)?,
        };
        let now = unix_now();
        let stored = StoredToken {
            hash: token_hash(&token),
            types: body.types.clone(),
            expires: now + body.ttl_secs,
            single_use: body.single_use,
            created: now,
        };
        if !self.store.insert_token(&stored).map_err(internal)? {
            return Err(Response::error(409, "that token already exists"));
        }
        self.audit.emit(audit::TOKEN_CREATED, Some(&caller.name), &serde_json::json!({
            "user": caller.name, "id": token_info(&stored).id, "types": body.types, "expires": stored.expires,
        }));
        Ok(TokenAddResponse {
            token,
            info: token_info(&stored),
            proxy_addr: self.public_addr(),
            ca_pin: self.cas().host.pin().to_string(),
        })
    }

    pub(super) fn delete_token(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "token", "delete")?;
        // Accept the listed id (a hash prefix) or the token itself.
        let matching: Vec<StoredToken> = self.store.list_tokens().map_err(internal)?;
        let by_secret = token_hash(id);
        let targets: Vec<&StoredToken> = matching
            .iter()
            .filter(|t| t.hash == by_secret || (id.len() >= 8 && t.hash.starts_with(id)))
            .collect();
        match targets.as_slice() {
            [] => Err(Response::error(404, format!("no such token: {id}"))),
            [one] => {
                self.store
                    .delete_tokens_by_prefix(&one.hash)
                    .map_err(internal)?;
                self.audit.emit(
                    audit::TOKEN_DELETED,
                    Some(&caller.name),
                    &serde_json::json!({"user": caller.name, "id": token_info(one).id}),
                );
                Ok(Response::json(
                    200,
                    &serde_json::json!({"deleted": token_info(one).id}),
                ))
            }
            _ => Err(Response::error(
                409,
                format!("{id} matches several tokens; give more of the id"),
            )),
        }
    }
}

fn token_info(t: &StoredToken) -> TokenInfo {
    TokenInfo {
        id: t.hash.chars().take(16).collect(),
        types: t.types.clone(),
        expires: t.expires,
        single_use: t.single_use,
        created: t.created,
    }
}
