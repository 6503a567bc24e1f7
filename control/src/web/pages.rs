//! The web UI's HTML, rendered on the server, and its static assets, served from the binary.
//!
//! Pages are plain functions of their data to a `String`; every value from outside (names,
//! labels, audit fields) goes through [`esc`]. There is no inline script or style (the CSP
//! forbids them): behaviour lives in `assets/jaunt.js`, which reads `data-` attributes and the
//! `csrf-token` meta tag, and looks in `assets/jaunt.css`.
//!
//! Not here: routing, sessions, authorization (`mod.rs`).

use std::fmt::Write;

use crate::http::Response;
use crate::recordings::RecordingInfo;
use crate::store::StoredEvent;

use super::Visible;

/// What the header of a signed-in page shows.
pub struct Frame {
    pub title: String,
    pub cluster: String,
    /// Empty on pages shown without a session.
    pub user: String,
    /// The session's CSRF token (empty without a session).
    pub csrf: String,
}

/// The audit page's filter, as typed.
pub struct AuditFilter {
    pub r#type: String,
    pub user: String,
    pub since: String,
    pub until: String,
}

/// Static files under `/web/assets/`: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "jaunt.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/jaunt.css"),
    ),
    (
        "jaunt.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/jaunt.js"),
    ),
    (
        "jaunt-player.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/jaunt-player.js"),
    ),
    (
        "jaunt-terminal.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/jaunt-terminal.js"),
    ),
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/xterm.css"),
    ),
    (
        "xterm-LICENSE.txt",
        "text/plain; charset=utf-8",
        include_bytes!("assets/xterm-LICENSE.txt"),
    ),
];

/// Most recordings `/web/recordings` lists (the newest; the filters narrow the rest).
pub const MAX_LISTED_RECORDINGS: usize = 500;

/// `GET /web/assets/NAME`.
pub fn asset(name: &str) -> Result<Response, Response> {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return Err(Response::error(404, "no such asset"));
    };
    Ok(Response {
        status: 200,
        content_type,
        body: bytes.to_vec(),
        headers: vec![("cache-control".to_owned(), "public, max-age=300".to_owned())],
    })
}

/// HTML-escapes `text` for element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes `text` for a URL path segment or query value.
pub fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn head(title: &str, csrf: &str, body_class: &str, extra: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf-token\" content=\"{}\">\
         <title>{} · Jaunt</title>\
         <link rel=\"stylesheet\" href=\"/web/assets/jaunt.css\">\
         <script src=\"/web/assets/jaunt.js\" defer></script>{}</head>\
         <body class=\"{}\">",
        esc(csrf),
        esc(title),
        extra,
        esc(body_class)
    )
}

fn page(frame: &Frame, body_class: &str, content: &str) -> String {
    page_with(frame, body_class, content, "")
}

/// A page whose `<head>` also holds `extra` (trusted markup: asset links only).
fn page_with(frame: &Frame, body_class: &str, content: &str, extra: &str) -> String {
    let mut html = head(&frame.title, &frame.csrf, body_class, extra);
    html.push_str("<header class=\"top\"><a class=\"brand\" href=\"/web/\">Jaunt</a>");
    if !frame.user.is_empty() {
        html.push_str(
            "<nav aria-label=\"Main\"><a href=\"/web/\">Resources</a>\
             <a href=\"/web/sessions\">Sessions</a><a href=\"/web/recordings\">Recordings</a>\
             <a href=\"/web/audit\">Audit</a></nav>",
        );
        let _ = write!(
            html,
            "<span class=\"who\">{} <span class=\"cluster\">{}</span></span>\
             <button type=\"button\" id=\"logout\">Log out</button>",
            esc(&frame.user),
            esc(&frame.cluster)
        );
    }
    let _ = writeln!(
        html,
        "</header><main id=\"main\"><h1>{}</h1>{}</main></body></html>",
        esc(&frame.title),
        content
    );
    html
}

/// `/web/login`: user, password and (when the cluster asks for one) a one-time code. `token`
/// is the double-submit CSRF token also set as a cookie; `next` where to go afterwards.
pub fn login(cluster: &str, token: &str, second_factor: bool, next: &str) -> String {
    let mut html = head("Log in", token, "login", "");
    let _ = write!(
        html,
        "<main id=\"main\" class=\"login-box\"><h1>Log in to {}</h1>\
         <form id=\"login-form\" data-next=\"{}\" novalidate>\
         <label for=\"user\">User</label>\
         <input id=\"user\" name=\"user\" autocomplete=\"username\" required autofocus>\
         <label for=\"password\">Password</label>\
         <input id=\"password\" name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required>",
        esc(cluster),
        esc(next)
    );
    if second_factor {
        html.push_str(
            "<label for=\"otp\">One-time code</label>\
             <input id=\"otp\" name=\"otp\" inputmode=\"numeric\" \
             autocomplete=\"one-time-code\" pattern=\"[0-9]*\" required>",
        );
    }
    html.push_str(
        "<p id=\"login-error\" class=\"error\" role=\"alert\" hidden></p>\
         <button type=\"submit\">Log in</button></form></main></body></html>\n",
    );
    html
}

/// Resource rows `/web/` renders for layout at once; the rest wait in a `<template>` (parsed,
/// not laid out) until the filter or "Show all" needs them.
pub const FIRST_RESOURCE_ROWS: usize = 100;

/// `/web/`: the resources the user may reach, with labels, a filter box, a login picker per
/// node, and apps that open in a new tab. Beyond [`FIRST_RESOURCE_ROWS`] rows the rest are in
/// `<template id="more-resources">` in the table: a page of 1,000 nodes lays out 100 rows, and
/// `jaunt.js` moves the others in when the filter (which searches all of them) or "Show all"
/// asks; the filter then shows at most that many matches until "Show all".
pub fn resources(frame: &Frame, resources: &[Visible], public_addr: &str) -> String {
    let mut content = String::from(
        "<p class=\"filter\"><label for=\"filter\">Filter</label>\
         <input id=\"filter\" type=\"search\" placeholder=\"name, label or key=value\" \
         autocomplete=\"off\"></p>",
    );
    if resources.is_empty() {
        content.push_str(
            "<p class=\"empty\">Your roles allow no connected resource. Ask an administrator \
             for a role, or check that the agents are running.</p>",
        );
        return page(frame, "resources", &content);
    }
    let _ = write!(
        content,
        "<table id=\"resources\" data-total=\"{}\" data-first=\"{FIRST_RESOURCE_ROWS}\"><thead><tr>\
         <th scope=\"col\">Kind</th><th scope=\"col\">Name</th>\
         <th scope=\"col\">Labels</th><th scope=\"col\">Connect</th></tr></thead><tbody>",
        resources.len()
    );
    for (i, r) in resources.iter().enumerate() {
        if i == FIRST_RESOURCE_ROWS {
            content.push_str("<template id=\"more-resources\">");
        }
        let info = &r.info;
        let labels: Vec<String> = info
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let search = format!("{} {} {}", info.kind, info.name, labels.join(" ")).to_lowercase();
        let _ = write!(
            content,
            "<tr class=\"resource\" data-kind=\"{}\" data-name=\"{}\" data-search=\"{}\">\
             <td class=\"kind\">{}</td><td class=\"name\">{}</td><td class=\"labels\">",
            esc(&info.kind),
            esc(&info.name),
            esc(&search),
            esc(kind_title(&info.kind)),
            esc(&info.name),
        );
        for label in &labels {
            let _ = write!(content, "<span class=\"label\">{}</span> ", esc(label));
        }
        content.push_str("</td><td class=\"connect\">");
        match info.kind.as_str() {
            "node" => {
                let id = format!("login-{}", query_escape(&info.name));
                let first = r.choices.first().map_or("", String::as_str);
                let _ = write!(
                    content,
                    "<label class=\"sr-only\" for=\"{id}\">Login on {name}</label>\
                     <select id=\"{id}\" class=\"login-picker\" data-node=\"{name}\">",
                    id = esc(&id),
                    name = esc(&info.name)
                );
                for login in &r.choices {
                    let _ = write!(content, "<option value=\"{0}\">{0}</option>", esc(login));
                }
                let _ = write!(
                    content,
                    "</select> <a class=\"button ssh\" href=\"/web/terminal/{}/{}\" \
                     target=\"_blank\" rel=\"noopener\">Connect</a>",
                    esc(&query_escape(&info.name)),
                    esc(&query_escape(first)),
                );
            }
            "app" => {
                // Through the app session exchange (`apps.rs`): no client certificate needed.
                let _ = write!(
                    content,
                    "<a class=\"button app\" href=\"/web/apps/{}/open\" target=\"_blank\" \
                     rel=\"noopener noreferrer\" title=\"{}\">Open</a>",
                    esc(&query_escape(&info.name)),
                    esc(&app_url(&info.name, public_addr)),
                );
            }
            "db" => {
                let _ = write!(
                    content,
                    "<code>jaunt db connect {} --db-user {}</code>",
                    esc(&info.name),
                    esc(r.choices.first().map_or("USER", String::as_str))
                );
            }
            _ => {
                let _ = write!(content, "<code>jaunt proxy tcp {}</code>", esc(&info.name));
            }
        }
        content.push_str("</td></tr>");
    }
    if resources.len() > FIRST_RESOURCE_ROWS {
        content.push_str("</template>");
    }
    content.push_str(
        "</tbody></table><p id=\"no-match\" class=\"empty\" hidden>Nothing matches the filter.</p>",
    );
    if resources.len() > FIRST_RESOURCE_ROWS {
        let _ = write!(
            content,
            "<p id=\"partial\"><span id=\"partial-count\" role=\"status\">Showing the \
             first {FIRST_RESOURCE_ROWS} of {}; the filter searches all.</span> \
             <button type=\"button\" id=\"show-all\">Show all</button></p>",
            resources.len()
        );
    }
    page(frame, "resources", &content)
}

/// `https://<app>.<public host>/` (with the public port, if any).
pub fn app_url(app: &str, public_addr: &str) -> String {
    format!("https://{app}.{public_addr}/")
}

fn kind_title(kind: &str) -> &'static str {
    match kind {
        "node" => "Server",
        "app" => "App",
        "db" => "Database",
        "tcp" => "TCP app",
        _ => "Other",
    }
}

/// `/web/audit`: a filter form and one page of events, newest first. `older` is the `before`
/// cursor of the next page; `paged` whether this is not the first.
pub fn audit(
    frame: &Frame,
    filter: &AuditFilter,
    events: &[StoredEvent],
    older: Option<i64>,
    paged: bool,
) -> String {
    let mut content = String::new();
    let _ = write!(
        content,
        "<form id=\"audit-filter\" class=\"filters\" method=\"get\" action=\"/web/audit\">\
         <label>Type <input name=\"type\" value=\"{}\" placeholder=\"session.start\"></label>\
         <label>User <input name=\"user\" value=\"{}\"></label>\
         <label>From (UTC) <input name=\"since\" type=\"datetime-local\" value=\"{}\"></label>\
         <label>To (UTC) <input name=\"until\" type=\"datetime-local\" value=\"{}\"></label>\
         <button type=\"submit\">Search</button></form>",
        esc(&filter.r#type),
        esc(&filter.user),
        esc(&filter.since),
        esc(&filter.until)
    );
    if events.is_empty() {
        content.push_str("<p class=\"empty\">No events match.</p>");
    } else {
        content.push_str(
            "<table id=\"audit\"><thead><tr><th scope=\"col\">Time (UTC)</th>\
             <th scope=\"col\">Type</th><th scope=\"col\">User</th><th scope=\"col\">Code</th>\
             <th scope=\"col\">Details</th></tr></thead><tbody>",
        );
        for e in events {
            let _ = write!(
                content,
                "<tr class=\"event\" data-seq=\"{}\"><td>{}</td><td class=\"type\">{}</td>\
                 <td class=\"user\">{}</td><td>{}</td><td class=\"details\"><code>{}</code></td></tr>",
                e.seq,
                esc(&crate::audit::rfc3339(e.time)),
                esc(&e.r#type),
                esc(e.user.as_deref().unwrap_or("")),
                esc(&e.code),
                esc(&details(&e.event)),
            );
        }
        content.push_str("</tbody></table>");
    }
    let keep = |extra: &str| {
        let mut q = String::new();
        for (k, v) in [
            ("type", &filter.r#type),
            ("user", &filter.user),
            ("since", &filter.since),
            ("until", &filter.until),
        ] {
            if !v.is_empty() {
                let _ = write!(q, "{k}={}&", query_escape(v));
            }
        }
        format!("/web/audit?{q}{extra}")
    };
    content.push_str("<nav class=\"pager\" aria-label=\"Pages\">");
    if paged {
        let _ = write!(
            content,
            "<a href=\"{}\">Newest</a>",
            esc(keep("").trim_end_matches(['&', '?']))
        );
    }
    if let Some(seq) = older {
        let _ = write!(
            content,
            "<a id=\"older\" href=\"{}\">Older</a>",
            esc(&keep(&format!("before={seq}")))
        );
    }
    content.push_str("</nav>");
    page(frame, "audit", &content)
}

/// `/web/sessions`: the live sessions (as `GET /v1/sessions` lists them), each with an End
/// button.
pub fn sessions(frame: &Frame, sessions: &[serde_json::Value], can_join: bool) -> String {
    let mut content =
        String::from("<p id=\"session-error\" class=\"error\" role=\"alert\" hidden></p>");
    if sessions.is_empty() {
        content.push_str("<p class=\"empty\">No live sessions.</p>");
        return page(frame, "sessions", &content);
    }
    content.push_str(
        "<table id=\"sessions\"><thead><tr><th scope=\"col\">User</th><th scope=\"col\">Kind</th>\
         <th scope=\"col\">Target</th><th scope=\"col\">Login</th><th scope=\"col\">Started (UTC)</th>\
         <th scope=\"col\">Recorded</th><th scope=\"col\">Session</th><th scope=\"col\"></th></tr></thead><tbody>",
    );
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_owned();
    for s in sessions {
        let id = text(s, "id");
        let login = match (s["login"].as_str(), s["db_user"].as_str()) {
            (Some(l), _) | (None, Some(l)) => l.to_owned(),
            _ => String::new(),
        };
        // Only a recorded SSH session (its agent terminates it) can be watched, and not an
        // observer's own session (the same rule as `jaunt join`).
        let joinable = can_join
            && s["kind"] == "ssh"
            && s["recorded"] == true
            && s["observing"].as_str().is_none();
        let join = if joinable {
            format!(
                "<a class=\"button join-session\" href=\"/web/sessions/{}/join\">Join</a> ",
                esc(&query_escape(&id))
            )
        } else {
            String::new()
        };
        let _ = write!(
            content,
            "<tr class=\"session\" data-id=\"{id}\"><td class=\"user\">{}</td><td>{}</td>\
             <td class=\"target\">{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{id}</code></td>\
             <td class=\"actions\">{join}<button type=\"button\" class=\"end-session\" data-id=\"{id}\">End</button></td></tr>",
            esc(&text(s, "user")),
            esc(&s["kind"].as_str().map_or_else(|| s["kind"].to_string(), str::to_owned)),
            esc(&text(s, "target")),
            esc(&login),
            esc(&crate::audit::rfc3339(s["started"].as_u64().unwrap_or(0))),
            if s["recorded"].as_bool() == Some(true) { "yes" } else { "no" },
            id = esc(&id),
        );
    }
    content.push_str("</tbody></table>");
    page(frame, "sessions", &content)
}

/// The recordings page's filters, as typed (the same as `jaunt recordings ls`).
pub struct RecordingFilter {
    pub user: String,
    pub node: String,
    /// A duration (`24h`, `30m`): recordings started since that long ago.
    pub since: String,
}

/// `/web/recordings`: a filter form and the recordings, newest first, each linking to its
/// playback page.
pub fn recordings(frame: &Frame, filter: &RecordingFilter, list: &[RecordingInfo]) -> String {
    let mut content = String::new();
    let _ = write!(
        content,
        "<form id=\"recording-filter\" class=\"filters\" method=\"get\" action=\"/web/recordings\">\
         <label>User <input name=\"user\" value=\"{}\"></label>\
         <label>Node <input name=\"node\" value=\"{}\"></label>\
         <label>Since <input name=\"since\" value=\"{}\" placeholder=\"24h\"></label>\
         <button type=\"submit\">Search</button></form>",
        esc(&filter.user),
        esc(&filter.node),
        esc(&filter.since)
    );
    if list.is_empty() {
        content.push_str("<p class=\"empty\">No recordings match.</p>");
        return page(frame, "recordings", &content);
    }
    content.push_str(
        "<table id=\"recordings\"><thead><tr><th scope=\"col\">Started (UTC)</th>\
         <th scope=\"col\">User</th><th scope=\"col\">Login</th><th scope=\"col\">Node</th>\
         <th scope=\"col\">What</th><th scope=\"col\">Length</th><th scope=\"col\">Size</th>\
         <th scope=\"col\">Notes</th><th scope=\"col\"></th></tr></thead><tbody>",
    );
    for r in list.iter().rev().take(MAX_LISTED_RECORDINGS) {
        let _ = write!(
            content,
            "<tr class=\"recording\" data-id=\"{id}\"><td>{}</td><td class=\"user\">{}</td>\
             <td>{}</td><td class=\"node\">{}</td><td class=\"what\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td><a class=\"button play\" href=\"/web/recordings/{href}\">Play</a></td></tr>",
            esc(&crate::audit::rfc3339(r.started)),
            esc(&r.user),
            esc(&r.login),
            esc(&r.node),
            esc(&what(r)),
            esc(&length(r)),
            esc(&human_bytes(r.size)),
            esc(&notes(r)),
            id = esc(&r.id),
            href = esc(&query_escape(&r.id)),
        );
    }
    content.push_str("</tbody></table>");
    if list.len() > MAX_LISTED_RECORDINGS {
        let _ = write!(
            content,
            "<p class=\"empty\">The newest {MAX_LISTED_RECORDINGS} of {} are shown; the filters \
             narrow the list.</p>",
            list.len()
        );
    }
    page(frame, "recordings", &content)
}

/// The head of a page running xterm.js: the nonce its `<style>` elements are admitted by
/// (`style_nonce`), its stylesheet and script, and `script` (an asset) that drives it.
fn xterm_head(style_nonce: &str, script: &str) -> String {
    format!(
        "<meta name=\"style-nonce\" content=\"{}\">\
         <link rel=\"stylesheet\" href=\"/web/assets/xterm.css\">\
         <script src=\"/web/assets/xterm.js\" defer></script>\
         <script src=\"/web/assets/{script}\" defer></script>",
        esc(style_nonce)
    )
}

/// `/web/recordings/ID`: what the recording is, and the player (`assets/jaunt-player.js`,
/// which fetches the `.cast` from `/webapi/recordings/ID/cast`). `style_nonce` is the nonce
/// the response's CSP admits xterm.js's `<style>` elements by.
pub fn playback(frame: &Frame, r: &RecordingInfo, style_nonce: &str) -> String {
    let extra = xterm_head(style_nonce, "jaunt-player.js");
    let mut content = String::new();
    let _ = write!(
        content,
        "<dl class=\"recording-info\"><dt>User</dt><dd>{}</dd><dt>Login</dt><dd>{}</dd>\
         <dt>Node</dt><dd>{}</dd><dt>What</dt><dd>{}</dd><dt>Started (UTC)</dt><dd>{}</dd>\
         <dt>Length</dt><dd>{}</dd><dt>Notes</dt><dd>{}</dd><dt>Session</dt><dd><code>{}</code></dd></dl>",
        esc(&r.user),
        esc(&r.login),
        esc(&r.node),
        esc(&what(r)),
        esc(&crate::audit::rfc3339(r.started)),
        esc(&length(r)),
        esc(&notes(r)),
        esc(&r.session_id),
    );
    let _ = write!(
        content,
        "<section id=\"player\" aria-label=\"Playback\" data-state=\"loading\" \
         data-cast=\"/webapi/recordings/{}/cast\" data-size=\"{}\" data-cols=\"{}\" data-rows=\"{}\" \
         data-convert-eol=\"{}\">\
         <div class=\"controls\">\
         <button type=\"button\" id=\"play\" disabled>Play</button>\
         <label class=\"sr-only\" for=\"seek\">Position</label>\
         <input id=\"seek\" type=\"range\" min=\"0\" max=\"0\" step=\"0.01\" value=\"0\" disabled>\
         <span id=\"clock\">0:00 / 0:00</span>\
         <label for=\"speed\">Speed</label><select id=\"speed\" disabled>\
         <option value=\"0.5\">0.5×</option><option value=\"1\" selected>1×</option>\
         <option value=\"2\">2×</option><option value=\"4\">4×</option>\
         <option value=\"8\">8×</option><option value=\"16\">16×</option></select></div>\
         <p id=\"player-status\" role=\"status\">Loading…</p>\
         <div id=\"screen\" class=\"screen\" tabindex=\"0\" aria-label=\"Recorded terminal\"></div>\
         </section>\
         <p><a href=\"/web/recordings\">All recordings</a></p>",
        esc(&query_escape(&r.id)),
        r.size,
        r.width.max(2),
        r.height.max(1),
        // Without a PTY (exec, sftp) output lines end in a bare LF.
        r.kind != "shell",
    );
    page_with(frame, "playback", &content, &extra)
}

/// `/web/terminal/NODE/LOGIN`: xterm.js connected by `jaunt-terminal.js` over the engine's
/// WebSocket; `style_nonce` admits xterm.js's `<style>` elements as on the playback page.
pub fn terminal(frame: &Frame, node: &str, login: &str, style_nonce: &str) -> String {
    let extra = xterm_head(style_nonce, "jaunt-terminal.js");
    let path = format!("{}/{}", query_escape(node), query_escape(login));
    let content = format!(
        "<section id=\"terminal\" aria-label=\"Terminal\" data-state=\"connecting\" \
         data-node=\"{node}\" data-login=\"{login}\" \
         data-ticket=\"/webapi/terminal/{path}/ticket\" data-ws=\"/webapi/terminal/{path}\">\
         <p id=\"terminal-status\" role=\"status\">Connecting to {login}@{node}…</p>\
         <div id=\"term-screen\" class=\"term-screen\" aria-label=\"Terminal on {node} as {login}\"></div>\
         </section>",
        node = esc(node),
        login = esc(login),
        path = esc(&path),
    );
    page_with(frame, "terminal", &content, &extra)
}

/// `/web/sessions/ID/join`: the terminal page, read-only, watching the live session `watched`
/// (the same script as the terminal; `data-readonly` keeps it from sending anything).
pub fn join(
    frame: &Frame,
    watched: &jaunt_engine::server::LiveSessionInfo,
    style_nonce: &str,
) -> String {
    let extra = xterm_head(style_nonce, "jaunt-terminal.js");
    let id = query_escape(&watched.id);
    let login = watched.login.clone().unwrap_or_default();
    let content = format!(
        "<section id=\"terminal\" aria-label=\"Watching a session\" data-state=\"connecting\" \
         data-readonly=\"true\" data-node=\"{node}\" data-login=\"{login}\" \
         data-watched=\"{session}\" data-user=\"{user}\" \
         data-ticket=\"/webapi/sessions/{id}/join/ticket\" data-ws=\"/webapi/join/{id}\">\
         <p id=\"terminal-status\" role=\"status\">Joining {user}'s session on {login}@{node}…</p>\
         <p class=\"note\">Read-only: {user} is told you are watching, and nothing you type is \
         sent.</p>\
         <div id=\"term-screen\" class=\"term-screen\" \
         aria-label=\"{user}'s session on {node} as {login}, read-only\"></div>\
         </section>",
        node = esc(&watched.target),
        login = esc(&login),
        user = esc(&watched.user),
        session = esc(&watched.id),
        id = esc(&id),
    );
    page_with(frame, "terminal", &content, &extra)
}

fn what(r: &RecordingInfo) -> String {
    match &r.command {
        Some(c) => format!("{}: {c}", r.kind),
        None => r.kind.clone(),
    }
}

fn length(r: &RecordingInfo) -> String {
    r.ended.map_or_else(
        || "?".to_owned(),
        |e| jaunt_config::duration::human(e.saturating_sub(r.started)),
    )
}

fn notes(r: &RecordingInfo) -> String {
    let mut notes = Vec::new();
    if let Some(status) = r.exit_status {
        notes.push(format!("exit {status}"));
    }
    if r.interrupted {
        notes.push("interrupted".to_owned());
    }
    if r.truncated {
        notes.push("truncated".to_owned());
    }
    notes.join(", ")
}

fn human_bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{} KiB", n / 1024),
        _ => format!("{} MiB", n / (1024 * 1024)),
    }
}

/// An event's JSON without the fields the table already shows.
fn details(event: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(event) {
        Ok(serde_json::Value::Object(mut map)) => {
            for key in ["code", "event", "time", "uid"] {
                map.remove(key);
            }
            serde_json::Value::Object(map).to_string()
        }
        _ => event.to_owned(),
    }
}

/// An error page (with the header when signed in).
pub fn error(frame: &Frame, message: &str) -> String {
    page(
        frame,
        "error",
        &format!(
            "<p class=\"error\" role=\"alert\">{}</p><p><a href=\"/web/\">Back to the resources</a></p>",
            esc(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendored files are the ones `assets/MANIFEST.md` lists.
    #[test]
    fn vendored_assets_match_the_manifest() {
        let manifest = include_str!("assets/MANIFEST.md");
        for name in ["xterm.js", "xterm.css", "xterm-LICENSE.txt"] {
            let (_, _, bytes) = ASSETS
                .iter()
                .find(|(n, _, _)| *n == name)
                .unwrap_or_else(|| unreachable!("{name} is not served"));
            let sum = hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes));
            let row = manifest
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| unreachable!("{name} is not in MANIFEST.md"));
            assert!(row.contains(&sum), "{name}: {sum} is not in {row}");
        }
        assert!(asset("xterm.js").is_ok());
        assert!(asset("../Cargo.toml").is_err());
    }

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(query_escape("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
    }

    #[test]
    fn pages_have_no_inline_script_and_escape_names() {
        let frame = Frame {
            title: "Resources".into(),
            cluster: "c".into(),
            user: "<b>".into(),
            csrf: "tok".into(),
        };
        let visible = vec![Visible {
            info: jaunt_config::api::ResourceInfo {
                kind: "node".into(),
                name: "web\"1".into(),
                labels: [("env".to_owned(), "<prod>".to_owned())].into(),
                protocol: "ssh".into(),
                host_id: "h".into(),
                agent: "a".into(),
                shards: vec![0],
            },
            choices: vec!["root".into()],
        }];
        let html = resources(&frame, &visible, "jaunt.test:3080");
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;b&gt;"));
        assert!(html.contains("env=&lt;prod&gt;"));
        assert!(html.contains("href=\"/web/terminal/web%221/root\""));
        assert!(html.contains("<meta name=\"csrf-token\" content=\"tok\">"));
        assert_eq!(
            app_url("grafana", "jaunt.test:3080"),
            "https://grafana.jaunt.test:3080/"
        );
        assert!(!html.contains("<template"), "a short list is all laid out");
        assert!(!html.contains("id=\"partial\""));

        // A long list: the first rows in the table, the rest in the template, all counted.
        let n = FIRST_RESOURCE_ROWS + 50;
        let many: Vec<Visible> = (0..n)
            .map(|i| Visible {
                info: jaunt_config::api::ResourceInfo {
                    name: format!("node{i}"),
                    ..visible[0].info.clone()
                },
                choices: vec!["root".into()],
            })
            .collect();
        let html = resources(&frame, &many, "jaunt.test:3080");
        let (laid_out, rest) = html
            .split_once("<template id=\"more-resources\">")
            .unwrap_or_else(|| unreachable!("no template"));
        let (waiting, after) = rest
            .split_once("</template>")
            .unwrap_or_else(|| unreachable!("template not closed"));
        assert_eq!(
            laid_out.matches("<tr class=\"resource\"").count(),
            FIRST_RESOURCE_ROWS
        );
        assert_eq!(waiting.matches("<tr class=\"resource\"").count(), 50);
        assert!(after.starts_with("</tbody></table>"));
        assert!(html.contains(&format!("data-total=\"{n}\"")));
        assert!(after.contains("id=\"show-all\""));
    }
}
