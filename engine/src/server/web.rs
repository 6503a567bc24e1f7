//! The seam between the engine's web route and the web UI: [`WebBackend`], which the engine calls
//! for every request on the public host that it does not answer itself (it answers
//! `/webapi/ping` and the JWK Set; see `http.rs`).
//!
//! The engine terminates TLS, parses and bounds the request (head and `Content-Length` body,
//! `http.rs`), and runs the backend on the shard's blocking thread (glommio's `spawn_blocking`),
//! so a page that reads the store or a login that hashes a password never stalls the shard's
//! other connections. Control implements the trait (control's `web` module: pages, sessions,
//! login, the resource list); an engine without a backend (an agent's, a test's) answers 404.
//!
//! Not here: HTML, sessions and their cookies, which resources a user sees (all control's), the
//! HTTP parser (`http.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

/// One request on the public host, read whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query as sent (not decoded).
    pub path: String,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (at most [`MAX_REQUEST_BODY_BYTES`](super::http::MAX_REQUEST_BODY_BYTES)).
    pub body: Vec<u8>,
    /// The client's address (rate limits key on it), when the socket knew it.
    pub peer: Option<SocketAddr>,
}

impl WebRequest {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The backend's answer. The engine adds `Content-Length`, `Connection` and, unless given here,
/// `Cache-Control: no-store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebResponse {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Other headers; one with CR, LF or NUL in it is dropped.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// What the backend says about a browser's request on an app host (`<app>.<public host>`)
/// that came without a client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppAccess {
    /// Answer this (the session exchange's redirect, a redirect to log in, a refusal); the
    /// connection is closed after it.
    Respond(WebResponse),
    /// The request carries a live app session: connect it to the app as `identity`, forwarding
    /// `cert_der` (a user certificate control made for the session) so that the agent checks
    /// the user as it checks any other.
    Proxy {
        identity: jaunt_config::identity::Identity,
        cert_der: Vec<u8>,
    },
}

/// What the backend grants a web terminal's WebSocket (`/webapi/terminal/<node>/<login>`) whose
/// first message carried a good ticket: whom to connect, where, as which login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminalGrant {
    /// The web session's identity (the engine authorizes the dial with it as any other).
    pub identity: jaunt_config::identity::Identity,
    /// A user certificate control made for it, forwarded to the agent (which checks it).
    pub cert_der: Vec<u8>,
    /// The node.
    pub node: String,
    /// The login on it.
    pub login: String,
    /// An observer's WebSocket (`/webapi/join/<id>`): the live session it watches, read-only
    /// (a `jaunt join` dial of `node`); `None` for a terminal of its own.
    pub join: Option<String>,
}

/// The name of the app session cookie on app hosts. The engine takes it out of the request it
/// forwards: the app never sees it.
pub const APP_SESSION_COOKIE: &str = "__Host-jaunt_app";

/// What serves the web UI. Called on a blocking thread, once per request; it may block (store,
/// password hashing) but should not for long, and must not panic (a panic answers 500).
pub trait WebBackend: Send + Sync {
    /// Answers one request.
    fn handle(&self, request: &WebRequest) -> WebResponse;

    /// Decides on a request for app `app` that came without a client certificate. The default
    /// has no app sessions: `None`, and the engine tells the client how to get a certificate.
    fn app_access(&self, app: &str, request: &WebRequest) -> Option<AppAccess> {
        let _ = (app, request);
        None
    }

    /// Redeems the one-time `ticket` of a web terminal's first WebSocket message. `request` is
    /// the upgrade request (its path names the node and login, its cookie the web session the
    /// ticket must belong to). `Err` is what the user reads. The default has no terminal.
    fn terminal_access(&self, request: &WebRequest, ticket: &str) -> Result<TerminalGrant, String> {
        let _ = (request, ticket);
        Err("this engine serves no web terminal".to_owned())
    }
}

/// The web UI backend as the engine's configuration holds it.
#[derive(Clone)]
pub struct WebUi(pub Arc<dyn WebBackend>);

impl std::fmt::Debug for WebUi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebUi(..)")
    }
}
