//! The recordings endpoints of the control API (routes in `service/mod.rs`):
//! - agents (host certificates): `POST /v1/recordings/uploads`,
//!   `PUT /v1/recordings/uploads/ID?offset=N`, `POST /v1/recordings/uploads/ID/complete`;
//! - users (role rule `recording`): `GET /v1/recordings` (`list`; filters `user`, `node`,
//!   `since` in unix seconds), `GET /v1/recordings/ID` and `GET /v1/recordings/ID/cast?offset=N&length=M`
//!   (`read`; raw asciicast bytes, at most [`MAX_READ_BYTES`] per call).
//!
//! Not here: staging and storage (`mod.rs` and the backends).

use jaunt_config::identity::{Identity, IdentityKind};

use super::{CompleteUpload, RecordingInfo, Recordings, Refusal, MAX_READ_BYTES};
use crate::http::{Request, Response};
use crate::service::Control;

type Reply = Result<Response, Response>;

fn refused((status, message): Refusal) -> Response {
    // Conflicts carry the right offset as JSON already.
    if message.starts_with('{') {
        return Response {
            status,
            content_type: "application/json",
            body: message.into_bytes(),
            headers: Vec::new(),
        };
    }
    Response::error(status, message)
}

fn recordings(control: &Control) -> Result<&Recordings, Response> {
    control
        .recordings()
        .ok_or_else(|| Response::error(503, "recordings storage is not running"))
}

fn host(caller: &Identity) -> Result<&str, Response> {
    if caller.kind != IdentityKind::Host {
        return Err(Response::error(
            403,
            "only agents (host certificates) upload recordings",
        ));
    }
    Ok(&caller.name)
}

/// `POST /v1/recordings/uploads`.
pub fn begin(control: &Control, req: &Request, caller: &Identity) -> Reply {
    let host = host(caller)?;
    let rec = req.json()?;
    let state = recordings(control)?.begin(host, rec).map_err(refused)?;
    Ok(Response::json(200, &state))
}

/// `PUT /v1/recordings/uploads/ID?offset=N`.
pub fn append(control: &Control, req: &Request, caller: &Identity, id: &str) -> Reply {
    let host = host(caller)?;
    let offset = req
        .query_param("offset")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| Response::error(400, "offset must be a number of bytes"))?;
    let state = recordings(control)?
        .append(host, id, offset, &req.body)
        .map_err(refused)?;
    Ok(Response::json(200, &state))
}

/// `POST /v1/recordings/uploads/ID/complete`.
pub fn complete(control: &Control, req: &Request, caller: &Identity, id: &str) -> Reply {
    let host = host(caller)?;
    let done: CompleteUpload = req.json()?;
    let info = recordings(control)?
        .complete(host, id, &done)
        .map_err(refused)?;
    control.audit.emit(
        crate::audit::RECORDING_UPLOAD,
        Some(&info.user),
        &serde_json::json!({
            "recording_id": info.id,
            "session_id": info.session_id,
            "user": info.user,
            "login": info.login,
            "node": info.node,
            "kind": info.kind,
            "size": info.size,
            "interrupted": info.interrupted,
            "truncated": info.truncated,
            "host": info.host,
        }),
    );
    Ok(Response::json(200, &info))
}

/// `GET /v1/recordings`.
pub fn list(control: &Control, req: &Request, caller: &Identity) -> Reply {
    control.require(caller, "recording", "list")?;
    let since = match req.query_param("since") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| Response::error(400, "since must be unix seconds"))?,
        ),
        None => None,
    };
    let all = filtered(
        control,
        req.query_param("user"),
        req.query_param("node"),
        since,
    )?;
    Ok(Response::json(200, &all))
}

/// The stored recordings matching the filters of `GET /v1/recordings` (and of the web UI's
/// `/web/recordings`), oldest first. The caller checks the `recording`/`list` rule.
pub fn filtered(
    control: &Control,
    user: Option<&str>,
    node: Option<&str>,
    since: Option<u64>,
) -> Result<Vec<RecordingInfo>, Response> {
    let mut all: Vec<RecordingInfo> = recordings(control)?
        .backend
        .list()
        .map_err(|e| Response::error(503, e.to_string()))?
        .into_iter()
        .filter(|r| user.is_none_or(|u| r.user == u))
        .filter(|r| node.is_none_or(|n| r.node == n))
        .filter(|r| since.is_none_or(|s| r.started >= s))
        .collect();
    all.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    Ok(all)
}

/// `GET /v1/recordings/ID`.
pub fn info(control: &Control, caller: &Identity, id: &str) -> Reply {
    control.require(caller, "recording", "read")?;
    match recordings(control)?
        .info(id)
        .map_err(|e| Response::error(503, e.to_string()))?
    {
        Some(info) => Ok(Response::json(200, &info)),
        None => Err(Response::error(
            404,
            format!("no recording {id:?}: see `jaunt recordings ls`"),
        )),
    }
}

/// `GET /v1/recordings/ID/cast?offset=N&length=M`.
pub fn read(control: &Control, req: &Request, caller: &Identity, id: &str) -> Reply {
    control.require(caller, "recording", "read")?;
    let num = |k: &str, default: u64| -> Result<u64, Response> {
        req.query_param(k).map_or(Ok(default), |v| {
            v.parse::<u64>()
                .map_err(|_| Response::error(400, format!("{k} must be a number of bytes")))
        })
    };
    let offset = num("offset", 0)?;
    let length = num("length", MAX_READ_BYTES)?.min(MAX_READ_BYTES);
    let recs = recordings(control)?;
    if recs
        .info(id)
        .map_err(|e| Response::error(503, e.to_string()))?
        .is_none()
    {
        return Err(Response::error(
            404,
            format!("no recording {id:?}: see `jaunt recordings ls`"),
        ));
    }
    let bytes = recs
        .backend
        .read(id, offset, length)
        .map_err(|e| Response::error(503, e.to_string()))?;
    Ok(Response {
        status: 200,
        content_type: "application/octet-stream",
        body: bytes,
        headers: Vec::new(),
    })
}
