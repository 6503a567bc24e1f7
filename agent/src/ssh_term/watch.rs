//! Live terminated sessions that observers may watch (`jaunt join`), shared by the agent's
//! executors: the session's relay runs on one executor, an observer's stream may arrive on
//! another (another engine shard's tunnel).
//!
//! The relay registers its session ([`LiveSessions::register`]) and hands every piece of
//! terminal output of its session channels to [`Live::output`]; that costs one atomic load
//! while nobody watches. An observer ([`LiveSessions::join`]) gets a bounded buffer of its own
//! ([`MAX_OBSERVER_BUFFER`]: an observer that falls that far behind is dropped, never the
//! session slowed) and queues a notice that the relay writes into the user's terminal
//! ([`Live::poll_notices`]). Observers only read: nothing they send reaches the session.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Most bytes of output an observer may have waiting; beyond it the observer is dropped.
pub(crate) const MAX_OBSERVER_BUFFER: usize = 1 << 20;
/// Most observers of one session.
pub(crate) const MAX_OBSERVERS: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent's live terminated sessions by the engine's session id. Cheap to clone.
#[derive(Clone, Default)]
pub struct LiveSessions {
    by_id: Arc<Mutex<HashMap<String, Arc<Live>>>>,
}

impl std::fmt::Debug for LiveSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSessions")
            .field("live", &lock(&self.by_id).len())
            .finish()
    }
}

/// A notice for the session's user: an observer joined or left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Notice {
    pub(crate) observer: String,
    pub(crate) joined: bool,
}

impl Notice {
    /// The line written into the user's terminal.
    pub(crate) fn text(&self) -> String {
        if self.joined {
            format!(
                "\r\n[jaunt] {} joined this session as an observer (read-only)\r\n",
                self.observer
            )
        } else {
            format!(
                "\r\n[jaunt] observer {} left this session\r\n",
                self.observer
            )
        }
    }
}

/// One live session.
pub(crate) struct Live {
    watching: AtomicUsize,
    state: Mutex<LiveState>,
}

#[derive(Default)]
struct LiveState {
    observers: Vec<Arc<Observer>>,
    notices: VecDeque<Notice>,
    waker: Option<Waker>,
    ended: bool,
}

/// One observer's waiting output.
pub(crate) struct Observer {
    state: Mutex<ObserverState>,
}

#[derive(Default)]
struct ObserverState {
    buf: Vec<u8>,
    waker: Option<Waker>,
    /// Why it ended, once it has.
    closed: Option<&'static str>,
}

/// Unregisters a session when its relay ends (its observers are told).
pub(crate) struct Registered {
    sessions: LiveSessions,
    id: String,
    pub(crate) live: Arc<Live>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.sessions.by_id).remove(&self.id);
        let mut state = lock(&self.live.state);
        state.ended = true;
        for obs in state.observers.drain(..) {
            obs.close("the session ended");
        }
        self.live.watching.store(0, Ordering::Release);
    }
}

/// An observer's registration; leaving (drop) queues the "left" notice.
pub(crate) struct Watching {
    live: Arc<Live>,
    pub(crate) observer: Arc<Observer>,
    name: String,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut state = lock(&self.live.state);
        let before = state.observers.len();
        state.observers.retain(|o| !Arc::ptr_eq(o, &self.observer));
        self.live
            .watching
            .store(state.observers.len(), Ordering::Release);
        if state.observers.len() < before && !state.ended {
            state.notices.push_back(Notice {
                observer: self.name.clone(),
                joined: false,
            });
            if let Some(w) = state.waker.take() {
                w.wake();
            }
        }
    }
}

/// Why an observer could not join.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum JoinRefused {
    NoSuchSession,
    TooMany,
}

impl LiveSessions {
    /// Registers the live session `id` until the returned guard drops.
    pub(crate) fn register(&self, id: &str) -> Registered {
        let live = Arc::new(Live {
            watching: AtomicUsize::new(0),
            state: Mutex::new(LiveState::default()),
        });
        lock(&self.by_id).insert(id.to_string(), live.clone());
        Registered {
            sessions: self.clone(),
            id: id.to_string(),
            live,
        }
    }

    /// Adds `observer` to the live session `id`, and queues the notice for its user.
    pub(crate) fn join(&self, id: &str, observer: &str) -> Result<Watching, JoinRefused> {
        let live = lock(&self.by_id)
            .get(id)
            .cloned()
            .ok_or(JoinRefused::NoSuchSession)?;
        let obs = Arc::new(Observer {
            state: Mutex::new(ObserverState::default()),
        });
        {
            let mut state = lock(&live.state);
            if state.ended {
                return Err(JoinRefused::NoSuchSession);
            }
            if state.observers.len() >= MAX_OBSERVERS {
                return Err(JoinRefused::TooMany);
            }
            state.observers.push(obs.clone());
            live.watching
                .store(state.observers.len(), Ordering::Release);
            state.notices.push_back(Notice {
                observer: observer.to_string(),
                joined: true,
            });
            if let Some(w) = state.waker.take() {
                w.wake();
            }
        }
        Ok(Watching {
            live,
            observer: obs,
            name: observer.to_string(),
        })
    }
}

impl Live {
    /// Terminal output of the session: copied to every observer (one atomic load when none).
    pub(crate) fn output(&self, data: &[u8]) {
        if self.watching.load(Ordering::Acquire) == 0 || data.is_empty() {
            return;
        }
        let state = lock(&self.state);
        for obs in &state.observers {
            obs.push(data);
        }
    }

    /// The notices queued for the user's terminal; registers `cx` to be woken for the next.
    pub(crate) fn poll_notices(&self, cx: &mut Context<'_>) -> Vec<Notice> {
        let mut state = lock(&self.state);
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        state.notices.drain(..).collect()
    }
}

impl Observer {
    fn push(&self, data: &[u8]) {
        let mut state = lock(&self.state);
        if state.closed.is_some() {
            return;
        }
        if state.buf.len() + data.len() > MAX_OBSERVER_BUFFER {
            state.closed = Some("the observer fell too far behind the session");
            state.buf.clear();
        } else {
            state.buf.extend_from_slice(data);
        }
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }

    fn close(&self, why: &'static str) {
        let mut state = lock(&self.state);
        state.closed.get_or_insert(why);
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }

    /// The output waiting, `Ready(Err(why))` once it ended and all was taken.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Result<Vec<u8>, &'static str>> {
        let mut state = lock(&self.state);
        if !state.buf.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut state.buf)));
        }
        if let Some(why) = state.closed {
            return Poll::Ready(Err(why));
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn take(obs: &Observer) -> Poll<Result<Vec<u8>, &'static str>> {
        obs.poll_take(&mut Context::from_waker(futures::task::noop_waker_ref()))
    }

    #[test]
    fn observers_get_output_after_they_join_and_the_user_is_told() {
        let sessions = LiveSessions::default();
        assert_eq!(
            sessions.join("s1", "bob").err(),
            Some(JoinRefused::NoSuchSession)
        );
        let reg = sessions.register("s1");
        reg.live.output(b"before");
        let watching = sessions.join("s1", "bob").unwrap();
        let cx = &mut Context::from_waker(futures::task::noop_waker_ref());
        assert_eq!(
            reg.live.poll_notices(cx),
            vec![Notice {
                observer: "bob".into(),
                joined: true
            }]
        );
        assert!(take(&watching.observer).is_pending());
        reg.live.output(b"after");
        assert_eq!(take(&watching.observer), Poll::Ready(Ok(b"after".to_vec())));
        drop(watching);
        assert!(!reg.live.poll_notices(cx)[0].joined);
        let watching = sessions.join("s1", "carol").unwrap();
        drop(reg);
        assert_eq!(
            take(&watching.observer),
            Poll::Ready(Err("the session ended"))
        );
        assert!(sessions.join("s1", "dave").is_err());
    }

    #[test]
    fn a_slow_observer_is_dropped_not_the_session() {
        let sessions = LiveSessions::default();
        let reg = sessions.register("s1");
        let watching = sessions.join("s1", "bob").unwrap();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..(MAX_OBSERVER_BUFFER / chunk.len() + 2) {
            reg.live.output(&chunk);
        }
        assert!(matches!(take(&watching.observer), Poll::Ready(Err(_))));
    }
}
