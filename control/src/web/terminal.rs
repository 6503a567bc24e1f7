//! The web terminal's page and tickets (`/web/terminal/NODE/LOGIN`).
//!
//! 1. `GET /web/terminal/NODE/LOGIN` (web session): the page, xterm.js and
//!    `assets/jaunt-terminal.js`. The login picker of `/web/` links here.
//! 2. The script asks `POST /webapi/terminal/NODE/LOGIN/ticket` (web session, `X-CSRF-Token`)
//!    for a one-time ticket (60 s, bound to this web session, node and login; `session.rs`).
//! 3. It opens the WebSocket `wss://<public host>/webapi/terminal/NODE/LOGIN` (the engine's,
//!    `jaunt_engine` `conn/terminal.rs`) and sends the ticket as its first message; the engine
//!    calls [`WebUi::terminal_grant`], which redeems it (the upgrade's session cookie must be
//!    the ticket's session) into the identity and a user certificate signed for it, as an app
//!    session gets one. The engine then authorizes the dial as any SSH dial: a login the
//!    user's roles do not allow is refused there, with the engine's message, shown on the page.
//!
//! Tickets are not checked against the roles here: the engine's authorization decides, once.
//!
//! An observer's page, `GET /web/sessions/ID/join` (role rule `session`/`join`, as `jaunt
//! join`; only recorded SSH sessions, which their agent terminates), is the same page read-only:
//! its ticket comes from `POST /webapi/sessions/ID/join/ticket`, its WebSocket is
//! `/webapi/join/ID`, and the grant names the watched session, so the engine dials as `jaunt
//! join` does (audited `session.join`, a live session of its own, killable). The watched user's
//! terminal says who joined; nothing the observer types is sent on.

use jaunt_config::identity::unix_now;
use jaunt_engine::server::{LiveSessionInfo, TerminalGrant, WebRequest};

use super::pages;
use super::session::WebSession;
use super::{cookie, error_text, html_response, player_csp, Ctx, Reply, WebUi, SESSION_COOKIE};
use crate::http::{percent_decode, Response};

impl WebUi {
    /// `GET /web/terminal/NODE/LOGIN`.
    pub(super) fn terminal_page(&self, session: &WebSession, node: &str, login: &str) -> Reply {
        let frame = self.frame(session, &format!("{login}@{node}"));
        let nonce =
            super::session::random_hex().map_err(|e| Response::error(500, e.to_string()))?;
        let html = pages::terminal(&frame, node, login, &nonce);
        Ok(html_response(200, html).with_header("content-security-policy", &player_csp(&nonce)))
    }

    /// `POST /webapi/terminal/NODE/LOGIN/ticket`: `{"ticket": T}`.
    pub(super) fn terminal_ticket(&self, ctx: &Ctx<'_>, node: &str, login: &str) -> Reply {
        let Some((token, session)) = &ctx.session else {
            return Err(Response::error(401, "not logged in: reload the page"));
        };
        super::check_csrf(ctx, session)?;
        let ticket = self
            .sessions
            .create_terminal_ticket(token, node, login, ctx.now)
            .map_err(|e| Response::error(503, e.to_string()))?;
        Ok(Response::json(
            200,
            &serde_json::json!({ "ticket": ticket }),
        ))
    }

    /// `GET /web/sessions/ID/join`: the observer's page, or why not (no `session`/`join` rule,
    /// no such live session, one that cannot be watched).
    pub(super) fn join_page(&self, session: &WebSession, id: &str) -> Reply {
        let frame = self.frame(session, "Watching a session");
        let watched = match self.watchable(session, id) {
            Ok(watched) => watched,
            Err(refused) => {
                return Ok(html_response(
                    refused.status,
                    pages::error(&frame, &error_text(&refused)),
                ))
            }
        };
        let nonce =
            super::session::random_hex().map_err(|e| Response::error(500, e.to_string()))?;
        let html = pages::join(&frame, &watched, &nonce);
        Ok(html_response(200, html).with_header("content-security-policy", &player_csp(&nonce)))
    }

    /// `POST /webapi/sessions/ID/join/ticket`: `{"ticket": T}`.
    pub(super) fn join_ticket(&self, ctx: &Ctx<'_>, id: &str) -> Reply {
        let Some((token, session)) = &ctx.session else {
            return Err(Response::error(401, "not logged in: reload the page"));
        };
        super::check_csrf(ctx, session)?;
        self.watchable(session, id)?;
        let ticket = self
            .sessions
            .create_join_ticket(token, id, ctx.now)
            .map_err(|e| Response::error(503, e.to_string()))?;
        Ok(Response::json(
            200,
            &serde_json::json!({ "ticket": ticket }),
        ))
    }

    /// The live session `id` if `session`'s user may watch it (as `GET /v1/sessions/ID` for
    /// `jaunt join` decides), else the refusal.
    fn watchable(&self, session: &WebSession, id: &str) -> Result<LiveSessionInfo, Response> {
        let found = self.control.join_session_info(&session.identity, id)?;
        serde_json::from_slice(&found.body)
            .map_err(|e| Response::error(500, format!("the live session: {e}")))
    }

    /// [`jaunt_engine::server::WebBackend::terminal_access`].
    pub(super) fn terminal_grant(
        &self,
        request: &WebRequest,
        ticket: &str,
    ) -> Result<TerminalGrant, String> {
        let path = request.path.split('?').next().unwrap_or("");
        if let Some(id) = path.strip_prefix("/webapi/join/") {
            return self.join_grant(request, ticket, id);
        }
        let rest = path
            .strip_prefix("/webapi/terminal/")
            .ok_or_else(|| "not a terminal address".to_owned())?;
        let (node, login) = match rest.split('/').collect::<Vec<_>>().as_slice() {
            [node, login] => (
                percent_decode(node, false).unwrap_or_default(),
                percent_decode(login, false).unwrap_or_default(),
            ),
            _ => return Err("the terminal address is /webapi/terminal/NODE/LOGIN".to_owned()),
        };
        let web = cookie(request, SESSION_COOKIE)
            .ok_or_else(|| "not logged in: log in again and reload the page".to_owned())?;
        let session = self
            .sessions
            .redeem_terminal_ticket(ticket, web, &node, &login, unix_now())
            .ok_or_else(|| {
                "the terminal's ticket has expired or was used already: reload the page".to_owned()
            })?;
        let cert_der = self.session_cert(&session.identity).map_err(|e| {
            tracing::error!(error = %e, "web: cannot sign a terminal certificate");
            "cannot make a certificate for the terminal".to_owned()
        })?;
        Ok(TerminalGrant {
            identity: session.identity,
            cert_der,
            node,
            login,
            join: None,
        })
    }

    /// [`WebUi::terminal_grant`] for an observer's WebSocket `/webapi/join/ID`.
    fn join_grant(
        &self,
        request: &WebRequest,
        ticket: &str,
        id: &str,
    ) -> Result<TerminalGrant, String> {
        let id = percent_decode(id, false)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| "the observer's address is /webapi/join/SESSION".to_owned())?;
        let web = cookie(request, SESSION_COOKIE)
            .ok_or_else(|| "not logged in: log in again and reload the page".to_owned())?;
        let session = self
            .sessions
            .redeem_join_ticket(ticket, web, &id, unix_now())
            .ok_or_else(|| {
                "the observer's ticket has expired or was used already: reload the page".to_owned()
            })?;
        let watched = self
            .watchable(&session, &id)
            .map_err(|refused| error_text(&refused))?;
        let cert_der = self.session_cert(&session.identity).map_err(|e| {
            tracing::error!(error = %e, "web: cannot sign an observer's certificate");
            "cannot make a certificate for the observer".to_owned()
        })?;
        Ok(TerminalGrant {
            identity: session.identity,
            cert_der,
            node: watched.target,
            login: watched.login.unwrap_or_else(|| "-".to_owned()),
            join: Some(id),
        })
    }
}
