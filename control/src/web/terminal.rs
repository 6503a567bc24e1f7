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

use jaunt_config::identity::unix_now;
use jaunt_engine::server::{TerminalGrant, WebRequest};

use super::pages;
use super::session::WebSession;
use super::{cookie, html_response, player_csp, Ctx, Reply, WebUi, SESSION_COOKIE};
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

    /// [`jaunt_engine::server::WebBackend::terminal_access`].
    pub(super) fn terminal_grant(
        &self,
        request: &WebRequest,
        ticket: &str,
    ) -> Result<TerminalGrant, String> {
        let path = request.path.split('?').next().unwrap_or("");
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
        })
    }
}
