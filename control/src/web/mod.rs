//! The web UI on the public host: [`WebUi`], control's implementation of the engine's
//! [`WebBackend`]. The engine terminates TLS and parses HTTP; every request it does not answer
//! itself lands in [`WebUi::handle`] on a shard's blocking thread.
//!
//! Contract URLs (bookmarks and tests depend on them): `/web/login`, `/web/` (the resources the
//! user's roles allow), `/web/audit`, `/web/sessions` (live sessions; ending one needs the role
//! rule `session`/`delete`, as `jaunt sessions kill` does), `/web/recordings` and
//! `/web/recordings/ID` (rule `recording` `list`/`read`), `/web/apps/APP/open` (`apps.rs`),
//! `/web/terminal/NODE/LOGIN` and `/web/sessions/ID/join` (an observer's read-only view, role
//! rule `session`/`join` as `jaunt join`; `terminal.rs`), and the calls under `/webapi/`
//! (`login`, `logout`, `sessions/ID/end`, `GET recordings/ID/cast`,
//! `terminal/NODE/LOGIN/ticket`, `sessions/ID/join/ticket`; the WebSockets
//! `/webapi/terminal/NODE/LOGIN` and `/webapi/join/ID` are the engine's).
//! `GET /` redirects to `/web/`.
//!
//! Web security:
//! - The session cookie is `__Host-jaunt_session` (`Secure`, `HttpOnly`, `SameSite=Lax`,
//!   `Path=/`, no `Domain`), made by a password login with the same limits and audit events as
//!   `jaunt login` ([`Control::password_login`]); it lives until the identity's certificate
//!   TTL and logout deletes it on the server (`session.rs`).
//! - Every state-changing request (`POST`) carries `X-CSRF-Token`: the session's token, shown
//!   to scripts in a `<meta>` of every page; before login, a double-submit token (the
//!   `__Host-jaunt_login` cookie, `SameSite=Strict`, and the same value in the login page).
//!   A cross-site page can neither read the token nor send the header without a CORS preflight,
//!   which is never granted.
//! - Every response sends a Content-Security-Policy without `unsafe-inline` (scripts and styles
//!   come from `/web/assets/` only) and `frame-ancestors 'none'`; the playback page's admits
//!   xterm.js's `<style>` elements by a nonce and allows style attributes ([`player_csp`]), and
//!   so does the terminal page's.
//! - The control API does not accept the cookie: it authenticates client certificates only
//!   (`service/`), and this module never forwards to it.
//! - Which resources a user sees is decided by [`jaunt_config::rbac::authorize`], the function
//!   the engine calls on every dial, over the roles and locks in the store now.
//!
//! Not here: HTML (`pages.rs`), the session table (`session.rs`), app sessions (`apps.rs`), the vendored assets
//! (`assets/`, listed in `assets/MANIFEST.md`).

mod apps;
mod pages;
pub mod session;
mod terminal;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use jaunt_config::api::ResourceInfo;
use jaunt_config::identity::{unix_now, Identity};
use jaunt_config::rbac::{self, ActiveLock, Policy, ResourceKind};
use jaunt_config::resource::{Lock, Role};
use jaunt_engine::server::{AppAccess, TerminalGrant, WebBackend, WebRequest, WebResponse};

use crate::http::{parse_query, percent_decode, Response};
use crate::service::{Control, LoginVia, PasswordLogin};
use crate::store::AuditQuery;
use session::{Sessions, WebSession};

/// The session cookie's name. The `__Host-` prefix makes browsers insist on `Secure`,
/// `Path=/` and no `Domain`: no sibling host can set or shadow it.
pub const SESSION_COOKIE: &str = "__Host-jaunt_session";

/// The login page's double-submit CSRF cookie.
pub const LOGIN_COOKIE: &str = "__Host-jaunt_login";

/// The header that carries the CSRF token on state-changing requests.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Audit events per page of `/web/audit`.
pub const AUDIT_PAGE_EVENTS: usize = 50;

/// The Content-Security-Policy of every response: nothing inline, nothing from elsewhere, no
/// framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The playback page's policy: as [`CSP`], but xterm.js's `<style>` elements are admitted by
/// the response's `nonce` and its cells' `style` attributes are allowed (24-bit colours).
/// Scripts are still `'self'` only.
fn player_csp(nonce: &str) -> String {
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'nonce-{nonce}'; \
         style-src-attr 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
         object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// The web UI backend.
pub struct WebUi {
    control: Arc<Control>,
    sessions: Sessions,
}

impl WebBackend for WebUi {
    fn handle(&self, request: &WebRequest) -> WebResponse {
        finish(self.route(request).unwrap_or_else(|r| r))
    }

    fn app_access(&self, app: &str, request: &WebRequest) -> Option<AppAccess> {
        self.app_request(app, request)
    }

    fn terminal_access(&self, request: &WebRequest, ticket: &str) -> Result<TerminalGrant, String> {
        self.terminal_grant(request, ticket)
    }
}

/// A response with the headers every web UI response carries.
fn finish(response: Response) -> WebResponse {
    let mut headers = response.headers;
    // A page may send its own policy (the playback page's adds a style nonce).
    if !headers.iter().any(|(n, _)| n == "content-security-policy") {
        headers.push(("content-security-policy".to_owned(), CSP.to_owned()));
    }
    headers.extend(
        [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "same-origin"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned())),
    );
    WebResponse {
        status: response.status,
        content_type: response.content_type,
        headers,
        body: response.body,
    }
}

type Reply = Result<Response, Response>;

/// A parsed request: decoded path and query, the session if the cookie names a live one.
struct Ctx<'a> {
    request: &'a WebRequest,
    path: String,
    query: Vec<(String, String)>,
    session: Option<(String, WebSession)>,
    now: u64,
}

impl Ctx<'_> {
    fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
    }
}

impl WebUi {
    /// The web UI of `control`.
    pub fn new(control: Arc<Control>) -> WebUi {
        WebUi {
            control,
            sessions: Sessions::default(),
        }
    }

    /// The live session of a cookie token (for the terminal's WebSocket, which authenticates
    /// with its first message).
    pub fn session(&self, token: &str) -> Option<WebSession> {
        self.sessions.get(token, unix_now())
    }

    fn route(&self, request: &WebRequest) -> Reply {
        let (raw_path, raw_query) = request
            .path
            .split_once('?')
            .unwrap_or((request.path.as_str(), ""));
        let path = percent_decode(raw_path, false)
            .ok_or_else(|| Response::error(400, "bad escape in the path"))?;
        let query = parse_query(raw_query)
            .ok_or_else(|| Response::error(400, "bad escape in the query"))?;
        let now = unix_now();
        let session = cookie(request, SESSION_COOKIE)
            .and_then(|token| Some((token.to_owned(), self.sessions.get(token, now)?)));
        let ctx = Ctx {
            request,
            path,
            query,
            session,
            now,
        };
        let segments: Vec<&str> = ctx.path.trim_start_matches('/').split('/').collect();
        match (request.method.as_str(), segments.as_slice()) {
            ("GET" | "HEAD", [""]) | ("GET" | "HEAD", ["web"]) => Ok(redirect("/web/")),
            ("GET" | "HEAD", ["web", "assets", name]) => pages::asset(name),
            ("GET" | "HEAD", ["web", "login"]) => self.login_page(&ctx),
            ("POST", ["webapi", "login"]) => self.login(&ctx),
            ("POST", ["webapi", "logout"]) => self.logout(&ctx),
            ("POST", ["webapi", "sessions", id, "end"]) => self.end_session(&ctx, id),
            ("GET", ["webapi", "recordings", id, "cast"]) => self.recording_cast(&ctx, id),
            ("POST", ["webapi", "terminal", node, login, "ticket"]) => {
                self.terminal_ticket(&ctx, node, login)
            }
            ("POST", ["webapi", "sessions", id, "join", "ticket"]) => self.join_ticket(&ctx, id),
            (_, ["webapi", ..]) => Err(Response::error(404, "no such endpoint")),
            ("GET" | "HEAD", ["web", rest @ ..]) => {
                let Some((token, session)) = &ctx.session else {
                    let next = pages::query_escape(&request.path);
                    return Ok(redirect(&format!("/web/login?next={next}")));
                };
                match rest {
                    ["apps", app, "open"] => self.open_app(&ctx, token, session, app),
                    [""] => self.resources_page(&ctx, session),
                    ["audit"] => self.audit_page(&ctx, session),
                    ["sessions"] => self.sessions_page(session),
                    ["sessions", id, "join"] => self.join_page(session, id),
                    ["recordings"] => self.recordings_page(&ctx, session),
                    ["recordings", id] => self.playback_page(session, id),
                    ["terminal", node, login] => self.terminal_page(session, node, login),
                    _ => Err(page_error(&ctx, 404, "There is no such page.")),
                }
            }
            ("GET" | "HEAD", _) => Err(page_error(&ctx, 404, "There is no such page.")),
            _ => Err(Response::error(405, "method not allowed")),
        }
    }

    fn login_page(&self, ctx: &Ctx<'_>) -> Reply {
        let next = safe_next(ctx.query("next"));
        if ctx.session.is_some() {
            return Ok(redirect(next));
        }
        let token = session::random_hex().map_err(|e| Response::error(500, e.to_string()))?;
        let html = pages::login(
            &self.control.settings.cluster,
            &token,
            self.control.settings.second_factor,
            next,
        );
        Ok(html_response(200, html).with_header(
            "set-cookie",
            &format!("{LOGIN_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"),
        ))
    }

    fn login(&self, ctx: &Ctx<'_>) -> Reply {
        // Double submit: the header must repeat the cookie the login page set.
        let expected = cookie(ctx.request, LOGIN_COOKIE).unwrap_or("");
        let given = ctx.request.header(CSRF_HEADER).unwrap_or("");
        if expected.is_empty() || !constant_time_eq(expected, given) {
            return Err(Response::error(
                403,
                "missing or wrong CSRF token: reload the login page",
            ));
        }
        #[derive(serde::Deserialize)]
        struct Body {
            user: String,
            password: String,
            #[serde(default)]
            otp: Option<String>,
        }
        let body: Body = serde_json::from_slice(&ctx.request.body)
            .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))?;
        let addr = ctx
            .request
            .peer
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip())
            .to_string();
        let identity = self.control.password_login(
            &PasswordLogin {
                user: &body.user,
                password: &body.password,
                otp: body.otp.as_deref(),
                ttl_secs: None,
                addr: &addr,
                via: LoginVia::Web,
            },
            ctx.now,
        )?;
        let expires = identity.expires;
        let (token, _) = self
            .sessions
            .create(identity, ctx.now)
            .map_err(|e| Response::error(503, e.to_string()))?;
        let max_age = expires.saturating_sub(ctx.now);
        Ok(Response::json(200, &serde_json::json!({ "expires": expires }))
            .with_header(
                "set-cookie",
                &format!(
                    "{SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}"
                ),
            )
            .with_header(
                "set-cookie",
                &format!("{LOGIN_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
            ))
    }

    fn logout(&self, ctx: &Ctx<'_>) -> Reply {
        let Some((token, session)) = &ctx.session else {
            return Err(Response::error(401, "not logged in"));
        };
        check_csrf(ctx, session)?;
        self.sessions.remove(token);
        self.control.audit.emit(
            crate::audit::WEB_LOGOUT,
            Some(&session.identity.name),
            &serde_json::json!({ "user": session.identity.name }),
        );
        Ok(Response::empty(204).with_header(
            "set-cookie",
            &format!("{SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"),
        ))
    }

    fn sessions_page(&self, session: &WebSession) -> Reply {
        let frame = self.frame(session, "Live sessions");
        let listed = match self.control.list_sessions(&session.identity) {
            Ok(r) => r,
            Err(refused) => {
                return Ok(html_response(
                    refused.status,
                    pages::error(&frame, &error_text(&refused)),
                ))
            }
        };
        let sessions: Vec<serde_json::Value> =
            serde_json::from_slice(&listed.body).unwrap_or_default();
        // Join buttons only for those whose roles have `session`/`join` (the engine and the
        // agent decide again when the observer dials, locks included).
        let can_join = self
            .control
            .require(&session.identity, "session", "join")
            .is_ok();
        Ok(html_response(
            200,
            pages::sessions(&frame, &sessions, can_join),
        ))
    }

    /// `POST /webapi/sessions/ID/end`: ends a live session, as `jaunt sessions kill ID` does
    /// (role rule `session`/`delete`; audited as `session.kill`).
    fn end_session(&self, ctx: &Ctx<'_>, id: &str) -> Reply {
        let Some((_, session)) = &ctx.session else {
            return Err(Response::error(401, "not logged in"));
        };
        check_csrf(ctx, session)?;
        self.control.kill_session(&session.identity, id)
    }

    /// `/web/recordings`: the recordings (role rule `recording`/`list`), filtered as
    /// `jaunt recordings ls` filters them.
    fn recordings_page(&self, ctx: &Ctx<'_>, session: &WebSession) -> Reply {
        let frame = self.frame(session, "Recordings");
        if let Err(refused) = self.control.require(&session.identity, "recording", "list") {
            return Ok(html_response(
                403,
                pages::error(&frame, &error_text(&refused)),
            ));
        }
        let filter = pages::RecordingFilter {
            user: ctx.query("user").unwrap_or("").to_owned(),
            node: ctx.query("node").unwrap_or("").to_owned(),
            since: ctx.query("since").unwrap_or("").to_owned(),
        };
        let since = match ctx.query("since") {
            None => None,
            Some(v) => match v.parse::<jaunt_config::duration::Duration>() {
                Ok(d) => Some(ctx.now.saturating_sub(d.as_secs())),
                Err(e) => {
                    return Ok(html_response(
                        400,
                        pages::error(
                            &frame,
                            &format!("since: {v:?} is not a duration ({e}); try 24h or 30m"),
                        ),
                    ))
                }
            },
        };
        match crate::recordings::api::filtered(
            &self.control,
            ctx.query("user"),
            ctx.query("node"),
            since,
        ) {
            Ok(list) => Ok(html_response(
                200,
                pages::recordings(&frame, &filter, &list),
            )),
            Err(refused) => Ok(html_response(
                refused.status,
                pages::error(&frame, &error_text(&refused)),
            )),
        }
    }

    /// `/web/recordings/ID`: playback (role rule `recording`/`read`).
    fn playback_page(&self, session: &WebSession, id: &str) -> Reply {
        let frame = self.frame(session, "Recording");
        let info = match self.recording_info(&session.identity, id) {
            Ok(info) => info,
            Err(refused) => {
                return Ok(html_response(
                    refused.status,
                    pages::error(&frame, &error_text(&refused)),
                ))
            }
        };
        let nonce = session::random_hex().map_err(|e| Response::error(500, e.to_string()))?;
        let html = pages::playback(&frame, &info, &nonce);
        Ok(html_response(200, html).with_header("content-security-policy", &player_csp(&nonce)))
    }

    /// `GET /webapi/recordings/ID/cast?offset=N`: up to [`MAX_READ_BYTES`] of the `.cast`
    /// from `offset`, for the player (role rule `recording`/`read`).
    ///
    /// [`MAX_READ_BYTES`]: crate::recordings::MAX_READ_BYTES
    fn recording_cast(&self, ctx: &Ctx<'_>, id: &str) -> Reply {
        let Some((_, session)) = &ctx.session else {
            return Err(Response::error(401, "not logged in"));
        };
        let offset = match ctx.query("offset") {
            None => 0,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| Response::error(400, "offset must be a number of bytes"))?,
        };
        self.recording_info(&session.identity, id)?;
        let recordings = self
            .control
            .recordings()
            .ok_or_else(|| Response::error(503, "recordings storage is not running"))?;
        let bytes = recordings
            .backend
            .read(id, offset, crate::recordings::MAX_READ_BYTES)
            .map_err(|e| Response::error(503, e.to_string()))?;
        Ok(Response {
            status: 200,
            content_type: "application/octet-stream",
            body: bytes,
            headers: Vec::new(),
        })
    }

    /// A recording's info, if `identity` may read recordings and it exists.
    fn recording_info(
        &self,
        identity: &Identity,
        id: &str,
    ) -> Result<crate::recordings::RecordingInfo, Response> {
        self.control.require(identity, "recording", "read")?;
        let recordings = self
            .control
            .recordings()
            .ok_or_else(|| Response::error(503, "recordings storage is not running"))?;
        recordings
            .info(id)
            .map_err(|e| Response::error(503, e.to_string()))?
            .ok_or_else(|| Response::error(404, format!("there is no recording {id:?}")))
    }

    fn resources_page(&self, ctx: &Ctx<'_>, session: &WebSession) -> Reply {
        let resources = self.visible_resources(&session.identity, ctx.now)?;
        let html = pages::resources(
            &self.frame(session, "Resources"),
            &resources,
            &self.control.public_addr(),
        );
        Ok(html_response(200, html))
    }

    fn audit_page(&self, ctx: &Ctx<'_>, session: &WebSession) -> Reply {
        let frame = self.frame(session, "Audit log");
        if let Err(refused) = self.control.require(&session.identity, "audit", "list") {
            return Ok(html_response(
                403,
                pages::error(&frame, &error_text(&refused)),
            ));
        }
        let time = |name: &str| -> Result<Option<u64>, Response> {
            ctx.query(name)
                .map(|v| {
                    parse_time(v).ok_or_else(|| {
                        page_error(
                            ctx,
                            400,
                            &format!("{name}: {v:?} is not a time (YYYY-MM-DDTHH:MM, UTC)"),
                        )
                    })
                })
                .transpose()
        };
        let filter = pages::AuditFilter {
            r#type: ctx.query("type").unwrap_or("").to_owned(),
            user: ctx.query("user").unwrap_or("").to_owned(),
            since: ctx.query("since").unwrap_or("").to_owned(),
            until: ctx.query("until").unwrap_or("").to_owned(),
        };
        let query = AuditQuery {
            since: time("since")?,
            until: time("until")?,
            r#type: ctx.query("type").map(str::to_owned),
            user: ctx.query("user").map(str::to_owned),
            limit: AUDIT_PAGE_EVENTS + 1,
        };
        let before = ctx.query("before").and_then(|v| v.parse::<i64>().ok());
        let mut events = self
            .control
            .store
            .audit_page(&query, before)
            .map_err(|e| Response::error(500, e.to_string()))?;
        let more = events.len() > AUDIT_PAGE_EVENTS;
        events.truncate(AUDIT_PAGE_EVENTS);
        let older = if more {
            events.last().map(|e| e.seq)
        } else {
            None
        };
        let html = pages::audit(&frame, &filter, &events, older, before.is_some());
        Ok(html_response(200, html))
    }

    /// What every signed-in page shows around its content.
    fn frame(&self, session: &WebSession, title: &str) -> pages::Frame {
        pages::Frame {
            title: title.to_owned(),
            cluster: self.control.settings.cluster.clone(),
            user: session.identity.name.clone(),
            csrf: session.csrf.clone(),
        }
    }

    /// See [`visible_resources`].
    fn visible_resources(&self, identity: &Identity, now: u64) -> Result<Vec<Visible>, Response> {
        visible_resources(&self.control, identity, now)
    }
}

/// A resource as the list shows it: `choices` are the logins (node) or database users (db)
/// the user may pick.
pub struct Visible {
    pub info: ResourceInfo,
    pub choices: Vec<String>,
}

/// The message of a control API error answer.
fn error_text(refused: &Response) -> String {
    serde_json::from_slice::<jaunt_config::api::ErrorBody>(&refused.body)
        .map_or_else(|_| "access denied".to_owned(), |b| b.error)
}

fn check_csrf(ctx: &Ctx<'_>, session: &WebSession) -> Result<(), Response> {
    let given = ctx.request.header(CSRF_HEADER).unwrap_or("");
    if constant_time_eq(&session.csrf, given) {
        Ok(())
    } else {
        Err(Response::error(403, "missing or wrong CSRF token"))
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(request: &'a WebRequest, name: &str) -> Option<&'a str> {
    request
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Where a login may send the browser afterwards: a path on this host under `/web/`, never
/// another host (`//evil`, `/\evil`).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with("/web/")
                && !n.contains("//")
                && !n.contains('\\')
                && !n.starts_with("/web/login") =>
        {
            n
        }
        _ => "/web/",
    }
}

/// `YYYY-MM-DDTHH:MM[:SS]` (what `<input type=datetime-local>` sends), taken as UTC, or unix
/// seconds.
fn parse_time(value: &str) -> Option<u64> {
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs);
    }
    let (date, clock) = value.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i32>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let mut c = clock.splitn(3, ':').map(|p| p.parse::<u8>().ok());
    let (hour, minute) = (c.next()??, c.next()??);
    let second = c.next().unwrap_or(Some(0))?;
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year, month, u8::try_from(day).ok()?).ok()?;
    let t = date.with_hms(hour, minute, second).ok()?;
    u64::try_from(t.assume_utc().unix_timestamp()).ok()
}

fn redirect(to: &str) -> Response {
    Response {
        status: 303,
        content_type: "text/plain; charset=utf-8",
        body: Vec::new(),
        headers: vec![("location".to_owned(), to.to_owned())],
    }
}

fn html_response(status: u16, html: String) -> Response {
    Response {
        status,
        content_type: "text/html; charset=utf-8",
        body: html.into_bytes(),
        headers: Vec::new(),
    }
}

/// The frame of a page shown without a session.
fn bare_frame(title: &str) -> pages::Frame {
    pages::Frame {
        title: title.to_owned(),
        cluster: String::new(),
        user: String::new(),
        csrf: String::new(),
    }
}

fn page_error(ctx: &Ctx<'_>, status: u16, message: &str) -> Response {
    let frame = ctx.session.as_ref().map(|(_, s)| pages::Frame {
        title: "Error".to_owned(),
        cluster: String::new(),
        user: s.identity.name.clone(),
        csrf: s.csrf.clone(),
    });
    let frame = frame.unwrap_or_else(|| pages::Frame {
        title: "Error".to_owned(),
        cluster: String::new(),
        user: String::new(),
        csrf: String::new(),
    });
    html_response(status, pages::error(&frame, message))
}

/// The connected resources `identity` may reach now, each with the logins (nodes) or
/// database users (databases) it may use there, decided by the engine's authorization
/// function over the store's roles and locks.
pub(crate) fn visible_resources(
    control: &Control,
    identity: &Identity,
    now: u64,
) -> Result<Vec<Visible>, Response> {
    let (policy, locks) = policy(control, now).map_err(|e| {
        tracing::error!(error = %e, "web: cannot compile the roles");
        Response::error(500, "the roles cannot be evaluated; see the server log")
    })?;
    let allowed = |info: &ResourceInfo, kind: ResourceKind, request: rbac::Request<'_>| {
        let resource = rbac::Resource {
            kind,
            name: &info.name,
            labels: &info.labels,
        };
        rbac::authorize(&policy, identity, &resource, &request, &locks, now).is_ok()
    };
    let mut out = Vec::new();
    for info in control.inventory() {
        let (kind, choices) = match info.kind.as_str() {
            "node" => {
                let logins: Vec<String> = identity
                    .logins
                    .iter()
                    .filter(|l| allowed(&info, ResourceKind::Node, rbac::Request::ssh(l)))
                    .cloned()
                    .collect();
                (ResourceKind::Node, Some(logins))
            }
            "db" => {
                let users: Vec<String> = identity
                    .db_users
                    .iter()
                    .filter(|u| allowed(&info, ResourceKind::Db, rbac::Request::db(u, None)))
                    .cloned()
                    .collect();
                (ResourceKind::Db, Some(users))
            }
            "app" => (ResourceKind::App, None),
            "tcp" => (ResourceKind::Tcp, None),
            _ => continue,
        };
        let visible = match &choices {
            Some(list) => !list.is_empty(),
            None => allowed(&info, kind, rbac::Request::default()),
        };
        if visible {
            out.push(Visible {
                choices: choices.unwrap_or_default(),
                info,
            });
        }
    }
    Ok(out)
}

/// The roles and locks in the store, compiled as control's snapshot compiles them.
fn policy(control: &Control, now: u64) -> anyhow::Result<(Policy, Vec<ActiveLock>)> {
    let store = &control.store;
    let roles = store
        .list_roles()?
        .into_iter()
        .map(|(name, spec)| {
            serde_json::from_str::<Role>(&spec)
                .map_err(|e| anyhow::anyhow!("stored role {name} does not parse: {e}"))
        })
        .collect::<anyhow::Result<Vec<Role>>>()?;
    let policy = Policy::compile(&roles)?;
    let locks = store
        .list_locks(now)?
        .iter()
        .filter_map(|l| {
            let lock: Lock = serde_json::from_str(&l.spec).ok()?;
            Some(ActiveLock::from_lock(&lock, l.expires))
        })
        .collect();
    Ok((policy, locks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_host() {
        assert_eq!(safe_next(Some("/web/audit?type=x")), "/web/audit?type=x");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/web//evil",
            "/web/\\evil",
            "/web/login",
            "/other",
        ] {
            assert_eq!(safe_next(Some(bad)), "/web/", "{bad}");
        }
        assert_eq!(safe_next(None), "/web/");
    }

    #[test]
    fn cookies_and_tokens() {
        let request = WebRequest {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("cookie".into(), "a=1; __Host-jaunt_session=abc; b=2".into())],
            body: Vec::new(),
            peer: None,
        };
        assert_eq!(cookie(&request, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&request, "b"), Some("2"));
        assert_eq!(cookie(&request, "c"), None);
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13"), Some(1_699_999_980));
        assert_eq!(parse_time("2023-11-14T22:13:20"), Some(1_700_000_000));
        assert_eq!(parse_time("yesterday"), None);
    }
}
