//! Apps in the browser: a web session opens an app at `https://<app>.<public host>/` without a
//! client certificate, as Teleport's web UI does.
//!
//! 1. `GET /web/apps/APP/open[?next=PATH]` (public host, web session): if the user's roles
//!    allow the app (the engine's authorization function, as `/web/` lists it), a one-time
//!    exchange token (60 s) is made and the browser is sent to
//!    `https://APP.<public host>/__jaunt/app-session?token=T&next=PATH`.
//! 2. The engine, on the app host, finds no client certificate and asks
//!    [`WebUi::app_access`]: the exchange URL redeems the token once, makes an app session (a
//!    child of the web session, holding its identity and a user certificate control signs for
//!    it over a throwaway key) and answers a redirect to `PATH` setting
//!    `__Host-jaunt_app` (`Secure`, `HttpOnly`, `SameSite=Lax`, `Path=/`, host-only, lasting
//!    no longer than the web session).
//! 3. A request with a live app session cookie is connected to the app as that identity: the
//!    engine authorizes it as any session, forwards the certificate (the agent checks it and
//!    adds `Jaunt-Jwt-Assertion`), takes the cookie out, and sends `Connection: close`, so every
//!    request is checked again. Logout (or the web session's end) ends its app sessions.
//!
//! Without a session, a browser's `GET` (one that accepts HTML) is redirected to step 1 (and so
//! to the login page); anything else gets the engine's certificate refusal.

use jaunt_config::identity::unix_now;
use jaunt_engine::server::{AppAccess, WebRequest, WebResponse, APP_SESSION_COOKIE};

use super::pages::{self, query_escape};
use super::session::WebSession;
use super::{html_response, page_error, redirect, Ctx, Reply, WebUi};
use crate::http::{parse_query, Response};

/// The app host path the exchange lands on.
pub const EXCHANGE_PATH: &str = "/__jaunt/app-session";

/// Where an app session may send the browser on the app host: a path, never another host.
fn safe_app_path(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

impl WebUi {
    /// `GET /web/apps/APP/open`.
    pub(super) fn open_app(
        &self,
        ctx: &Ctx<'_>,
        token: &str,
        session: &WebSession,
        app: &str,
    ) -> Reply {
        let visible = self.visible_resources(&session.identity, ctx.now)?;
        if !visible
            .iter()
            .any(|v| v.info.kind == "app" && v.info.name == app)
        {
            return Err(page_error(
                ctx,
                404,
                &format!("There is no connected app {app:?} that your roles allow."),
            ));
        }
        let next = safe_app_path(ctx.query("next"));
        let exchange = self
            .sessions
            .create_exchange(token, app, next, ctx.now)
            .map_err(|e| Response::error(503, e.to_string()))?;
        let url = format!(
            "{}{EXCHANGE_PATH}?token={exchange}&next={}",
            pages::app_url(app, &self.control.public_addr()).trim_end_matches('/'),
            query_escape(next)
        );
        Ok(redirect(&url))
    }

    /// [`jaunt_engine::server::WebBackend::app_access`].
    pub(super) fn app_request(&self, app: &str, request: &WebRequest) -> Option<AppAccess> {
        let now = unix_now();
        let (path, raw_query) = request
            .path
            .split_once('?')
            .unwrap_or((request.path.as_str(), ""));
        if path == EXCHANGE_PATH {
            return Some(AppAccess::Respond(self.redeem(app, raw_query, now)));
        }
        if let Some(token) = super::cookie(request, APP_SESSION_COOKIE) {
            if let Some(s) = self.sessions.app_session(token, app, now) {
                return Some(AppAccess::Proxy {
                    identity: s.identity,
                    cert_der: s.cert_der,
                });
            }
        }
        let browser = request.method == "GET"
            && request
                .header("accept")
                .is_some_and(|a| a.contains("text/html"));
        if !browser {
            return None;
        }
        let open = format!(
            "https://{}/web/apps/{}/open?next={}",
            self.control.public_addr(),
            query_escape(app),
            query_escape(safe_app_path(Some(&request.path)))
        );
        Some(AppAccess::Respond(web_response(redirect(&open))))
    }

    /// The exchange URL on the app host: one use, then a redirect that sets the app cookie.
    fn redeem(&self, app: &str, raw_query: &str, now: u64) -> WebResponse {
        let query = parse_query(raw_query).unwrap_or_default();
        let token = query
            .iter()
            .find(|(k, _)| k == "token")
            .map_or("", |(_, v)| v.as_str());
        let Some((web, session, next)) = self.sessions.redeem_exchange(token, app, now) else {
            let message = format!(
                "This link to {app} has expired or was used already: open the app again from \
                 https://{}/web/",
                self.control.public_addr()
            );
            return web_response(html_response(
                400,
                pages::error(&super::bare_frame("Error"), &message),
            ));
        };
        let identity = session.identity;
        let cert = match self.session_cert(&identity) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::error!(error = %e, "web: cannot sign an app session certificate");
                return web_response(Response::error(500, "cannot make an app session"));
            }
        };
        let max_age = identity.expires.saturating_sub(now);
        let user = identity.name.clone();
        let token = match self
            .sessions
            .create_app_session(web, app, identity, cert, now)
        {
            Ok(t) => t,
            Err(e) => return web_response(Response::error(503, e.to_string())),
        };
        self.control.audit.emit(
            crate::audit::WEB_APP_SESSION,
            Some(&user),
            &serde_json::json!({ "user": user, "app": app }),
        );
        web_response(redirect(&next).with_header(
            "set-cookie",
            &format!(
                "{APP_SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax; \
                 Max-Age={max_age}"
            ),
        ))
    }

    /// A user certificate for `identity` from the user CA, over a key generated and dropped
    /// here: the engine forwards it to the agent, nobody ever presents it in TLS.
    pub(super) fn session_cert(
        &self,
        identity: &jaunt_config::identity::Identity,
    ) -> anyhow::Result<Vec<u8>> {
        let key = rcgen::KeyPair::generate()?;
        let spki = crate::ca::spki_pem_to_der(&key.public_key_pem())?;
        let der = self.control.cas().user.sign_x509(identity, &spki, &[])?;
        Ok(der.to_vec())
    }
}

/// A control response as the engine's web response, with the web UI's security headers.
fn web_response(response: Response) -> WebResponse {
    super::finish(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_paths_stay_on_the_app_host() {
        assert_eq!(safe_app_path(Some("/a?b=c")), "/a?b=c");
        for bad in ["//evil.example/", "https://evil.example/", "/\\evil", "x"] {
            assert_eq!(safe_app_path(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_app_path(None), "/");
    }
}
