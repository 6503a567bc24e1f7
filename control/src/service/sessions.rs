//! The engine's live sessions: `GET /v1/sessions`, `GET /v1/sessions/ID` (for `jaunt join`)
//! and `DELETE /v1/sessions/ID`.
//!
//! Not here: the sessions themselves (the engine's `EngineSessions`), recordings
//! (`recordings/`).

use jaunt_config::identity::Identity;

use super::{Control, Reply};
use crate::audit;
use crate::http::Response;

impl Control {
    /// Where `jaunt sessions ls|kill` find the engine's live sessions (set once it runs).
    pub fn set_engine_sessions(&self, sessions: jaunt_engine::server::EngineSessions) {
        *self.sessions.write().unwrap_or_else(|p| p.into_inner()) = Some(sessions);
    }

    pub(super) fn engine_sessions(&self) -> Result<jaunt_engine::server::EngineSessions, Response> {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Response::error(503, "the engine is not running on this host"))
    }

    /// `GET /v1/sessions`: the live sessions (role rule `session`/`list`).
    pub(crate) fn list_sessions(&self, caller: &Identity) -> Reply {
        self.require(caller, "session", "list")?;
        Ok(Response::json(200, &self.engine_sessions()?.list()))
    }

    /// `GET /v1/sessions/ID`: one live session, for `jaunt join` to find its node (role rule
    /// `session`/`join`). Only a recorded SSH session (terminated at its agent) can be watched:
    /// others are refused here with the reason. The join itself is authorized again, and
    /// audited (`session.join`), by the engine and the agent when the observer dials.
    pub(crate) fn join_session_info(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "session", "join")?;
        let Some(session) = self
            .engine_sessions()?
            .list()
            .into_iter()
            .find(|s| s.id == id)
        else {
            return Err(Response::error(
                404,
                format!("no live session {id:?}: see `jaunt sessions ls`"),
            ));
        };
        if let Some(watched) = &session.observing {
            return Err(Response::error(
                409,
                format!(
                    "session {id:?} is an observer of session {watched:?}: join that one instead"
                ),
            ));
        }
        if session.kind != jaunt_config::wire::DialKind::Ssh || !session.recorded {
            return Err(Response::error(
                409,
                format!(
                    "session {id:?} cannot be watched: only recorded SSH sessions (the agent \
                     terminates them) can be joined, and this is an unrecorded {} session",
                    session.kind.as_str()
                ),
            ));
        }
        Ok(Response::json(200, &session))
    }

    /// `DELETE /v1/sessions/ID`: ends a live session (role rule `session`/`delete`); the audit
    /// log's `session.kill` names who ended it.
    pub(crate) fn kill_session(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "session", "delete")?;
        let sessions = self.engine_sessions()?;
        let Some(session) = sessions.list().into_iter().find(|s| s.id == id) else {
            return Err(Response::error(
                404,
                format!("no live session {id:?}: see `jaunt sessions ls`"),
            ));
        };
        if !sessions.end(id, &caller.name) {
            return Err(Response::error(
                404,
                format!("session {id:?} ended already"),
            ));
        }
        self.audit.emit(
            audit::SESSION_KILLED,
            Some(&session.user),
            &serde_json::json!({
                "session_id": session.id,
                "user": session.user,
                "kind": session.kind,
                "target": session.target,
                "login": session.login,
                "by": caller.name,
            }),
        );
        Ok(Response::json(200, &session))
    }
}
