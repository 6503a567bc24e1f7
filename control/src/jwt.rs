//! App-access JWTs: what the agent's HTTP reverse proxy puts in `Jaunt-Jwt-Assertion`, so an app
//! behind Jaunt can know who is calling without trusting the network.
//!
//! - Signed by control with the cluster's ES256 key (P-256, store name `jwt`); the private key
//!   never leaves control. Agents ask for tokens with `POST /v1/app/jwt` and cache them.
//! - Verifiable by anyone with the JWK Set control publishes (the engine serves it at
//!   `https://<public host>/.well-known/jwks.json`); `kid` names the key, so a future key
//!   rotation can publish two.
//!
//! Claims (RFC 7519 names where one exists): `iss` (the cluster), `sub` and `username` (the
//! Jaunt user), `roles`, `aud` (the app's URI), `iat`, `nbf`, `exp`, `jti`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};

/// Default lifetime of an app token: short, since agents ask again when theirs is near expiry.
pub const APP_TOKEN_TTL_SECS: u64 = 10 * 60;
/// Clock skew allowed for `nbf`.
const NOT_BEFORE_SKEW_SECS: u64 = 60;

/// Why a key or token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The stored key is not a PKCS#8 P-256 key.
    #[error("the JWT signing key is unusable: {0}")]
    Key(String),
    /// Signing failed (the RNG).
    #[error("signing failed")]
    Sign,
}

/// The claims of an app token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppClaims {
    /// Issuer: the cluster name.
    pub iss: String,
    /// Subject: the Jaunt user.
    pub sub: String,
    /// The Jaunt user again, under the name apps behind Teleport-like proxies look for.
    pub username: String,
    /// The user's roles.
    pub roles: Vec<String>,
    /// Audience: the app's URI as the agent reaches it.
    pub aud: String,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Not before (unix seconds).
    pub nbf: u64,
    /// Expires (unix seconds).
    pub exp: u64,
    /// Token id (random, hex).
    pub jti: String,
}

/// The cluster's JWT signer.
pub struct JwtSigner {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl JwtSigner {
    /// From the stored PKCS#8 PEM key.
    pub fn from_pem(pem: &str) -> Result<JwtSigner, JwtError> {
        let der = pem_body(pem).ok_or_else(|| JwtError::Key("not a PEM private key".into()))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        // kid: the first 16 bytes of SHA-256 over the public point, base64url.
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
        Ok(JwtSigner { key, kid, rng })
    }

    /// The key id in tokens' headers and the JWK Set.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWK Set (RFC 7517 §5) with this key's public half.
    pub fn jwks_json(&self) -> String {
        let point = self.key.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04 || x (32) || y (32).
        let (x, y) = match point {
            [0x04, rest @ ..] if rest.len() == 64 => rest.split_at(32),
            _ => (&[][..], &[][..]),
        };
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "use": "sig",
                "alg": "ES256",
                "kid": self.kid,
            }]
        })
        .to_string()
    }

    /// A signed compact JWS over `claims`.
    pub fn sign(&self, claims: &AppClaims) -> Result<String, JwtError> {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
        token.push('.');
        token.push_str(
            &URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|_| JwtError::Sign)?),
        );
        let signature = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(token)
    }

    /// Claims for `user` with `roles` using the app at `uri`, valid from `now` for `ttl` seconds
    /// (but never past `not_after`, e.g. the user's certificate expiry, when given).
    pub fn app_claims(
        cluster: &str,
        user: &str,
        roles: &[String],
        uri: &str,
        now: u64,
        ttl: u64,
    ) -> AppClaims {
        let mut jti = [0u8; 16];
        let _ = ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut jti);
        AppClaims {
            iss: cluster.to_string(),
            sub: user.to_string(),
            username: user.to_string(),
            roles: roles.to_vec(),
            aud: uri.to_string(),
            iat: now,
            nbf: now.saturating_sub(NOT_BEFORE_SKEW_SECS),
            exp: now + ttl,
            jti: hex::encode(jti),
        }
    }
}

/// Verifies a compact ES256 JWS against a JWK Set (as [`JwtSigner::jwks_json`] writes it) and
/// returns its claims: what an app behind Jaunt does with `Jaunt-Jwt-Assertion`. Checks the
/// signature, `kid` and `exp`/`nbf` against `now`.
pub fn verify(token: &str, jwks_json: &str, now: u64) -> Result<AppClaims, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (three dot-separated parts)".into());
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| format!("{what}: {e}"))
    };
    let header: serde_json::Value =
        serde_json::from_slice(&decode(h, "header")?).map_err(|e| format!("header: {e}"))?;
    if header["alg"] != "ES256" {
        return Err(format!("unexpected alg {}", header["alg"]));
    }
    let kid = header["kid"].as_str().unwrap_or_default();
    let jwks: serde_json::Value =
        serde_json::from_str(jwks_json).map_err(|e| format!("JWKS: {e}"))?;
    let key = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == kid))
        .ok_or_else(|| format!("no key with kid {kid:?} in the JWKS"))?;
    let coord = |name: &str| {
        key[name]
            .as_str()
            .ok_or_else(|| format!("JWK has no {name}"))
            .and_then(|v| decode(v, name))
    };
    let mut point = vec![0x04];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    let public =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    let signed_len = h.len() + 1 + c.len();
    public
        .verify(&token.as_bytes()[..signed_len], &decode(s, "signature")?)
        .map_err(|_| "bad signature".to_string())?;
    let claims: AppClaims =
        serde_json::from_slice(&decode(c, "claims")?).map_err(|e| format!("claims: {e}"))?;
    if claims.exp <= now {
        return Err("expired".into());
    }
    if claims.nbf > now {
        return Err("not yet valid".into());
    }
    Ok(claims)
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn signer() -> JwtSigner {
        JwtSigner::from_pem(&rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap()
    }

    #[test]
    fn tokens_verify_against_the_jwks_and_only_it() {
        let s = signer();
        let claims = JwtSigner::app_claims(
            "c1",
            "alice",
            &["access".into()],
            "http://127.0.0.1:80",
            1_000,
            600,
        );
        let token = s.sign(&claims).unwrap();
        assert_eq!(verify(&token, &s.jwks_json(), 1_001).unwrap(), claims);
        // Expired, not yet valid.
        assert_eq!(
            verify(&token, &s.jwks_json(), 1_600).unwrap_err(),
            "expired"
        );
        assert_eq!(
            verify(&token, &s.jwks_json(), 900).unwrap_err(),
            "not yet valid"
        );
        // Another cluster's key does not verify it.
        let other = signer();
        assert!(verify(&token, &other.jwks_json(), 1_001).is_err());
        // A tampered claim breaks the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&AppClaims {
                sub: "root".into(),
                ..claims.clone()
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert_eq!(
            verify(&parts.join("."), &s.jwks_json(), 1_001).unwrap_err(),
            "bad signature"
        );
    }

    #[test]
    fn jwks_is_an_ec_p256_key_set() {
        let s = signer();
        let jwks: serde_json::Value = serde_json::from_str(&s.jwks_json()).unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(key["alg"], "ES256");
        assert_eq!(key["kid"], s.kid());
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(key["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(key["y"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
    }
}
