//! [`IssueCache`]: what the agent gets from a blocking hook (a database client certificate, an
//! app JWT) cached per key until a time the caller picks, with one request in flight per key
//! shared by everyone waiting for it. The hook runs on a thread of its own (it talks to
//! control); a glommio task waits for it, bounded, and answers every waiter. Lives on one
//! executor (`Rc`/`RefCell`, no locks).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;
use std::time::Duration;

use futures::channel::oneshot;
use jaunt_config::identity::unix_now;

use crate::net;

/// A value or why there is none, as every waiter receives it.
pub(crate) type Issued<V> = Result<V, String>;

enum Slot<V> {
    Ready { value: V, use_until: u64 },
    Pending(Vec<oneshot::Sender<Issued<V>>>),
}

/// Bounds and words of one cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most requests in flight at once; more are refused ("try again in a moment").
    pub max_pending: usize,
    /// Most keys kept; past it, expired entries go, then the one that expires first.
    pub max_cached: usize,
    /// How long a request may take.
    pub timeout: Duration,
    /// What is issued, for messages (`token`, `certificate`).
    pub what: &'static str,
    /// Name of the request threads.
    pub thread: &'static str,
}

/// See the module doc.
pub(crate) struct IssueCache<K, V> {
    slots: Rc<RefCell<HashMap<K, Slot<V>>>>,
    limits: Limits,
    /// Moved by [`IssueCache::forget`]: a request started before answers its waiters but is
    /// not cached.
    epoch: Rc<std::cell::Cell<u64>>,
}

impl<K, V> IssueCache<K, V>
where
    K: Clone + Eq + Hash + 'static,
    V: Clone + 'static,
{
    pub(crate) fn new(limits: Limits) -> IssueCache<K, V> {
        IssueCache {
            slots: Rc::new(RefCell::new(HashMap::new())),
            limits,
            epoch: Rc::new(std::cell::Cell::new(0)),
        }
    }

    /// Drops every cached value (what was issued under a CA that is rotating away); requests
    /// in flight still answer their waiters, but what they bring is not cached.
    pub(crate) fn forget(&self) -> usize {
        self.epoch.set(self.epoch.get().wrapping_add(1));
        let mut slots = self.slots.borrow_mut();
        let before = slots.len();
        slots.retain(|_, s| matches!(s, Slot::Pending(_)));
        before - slots.len()
    }

    /// Keys held (ready or pending).
    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    /// The value for `key`: cached while `now < use_until`, or issued now. `issue` runs on a
    /// thread of its own; `settle` runs on the executor with its result (or a thread, timeout
    /// error) and returns the value with the time to use it until (not cached if already
    /// past), logging as it likes. Must run on a glommio executor.
    pub(crate) async fn get<R: Send + 'static>(
        &self,
        key: &K,
        issue: impl FnOnce() -> Result<R, String> + Send + 'static,
        settle: impl FnOnce(Result<R, String>) -> Result<(V, u64), String> + 'static,
    ) -> Issued<V> {
        let waiter = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(key) {
                Some(Slot::Ready { value, use_until }) if unix_now() < *use_until => {
                    return Ok(value.clone());
                }
                Some(Slot::Pending(waiters)) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                _ => None,
            }
        };
        let rx = match waiter {
            Some(rx) => rx,
            None => self.start(key, issue, settle)?,
        };
        rx.await
            .unwrap_or_else(|_| Err(format!("the {} request was abandoned", self.limits.what)))
    }

    /// Registers a pending request for `key` and starts it.
    fn start<R: Send + 'static>(
        &self,
        key: &K,
        issue: impl FnOnce() -> Result<R, String> + Send + 'static,
        settle: impl FnOnce(Result<R, String>) -> Result<(V, u64), String> + 'static,
    ) -> Result<oneshot::Receiver<Issued<V>>, String> {
        let Limits {
            max_pending,
            max_cached,
            timeout,
            what,
            thread,
        } = self.limits;
        let (tx, rx) = oneshot::channel();
        {
            let mut slots = self.slots.borrow_mut();
            let pending = slots
                .values()
                .filter(|s| matches!(s, Slot::Pending(_)))
                .count();
            if pending >= max_pending {
                return Err(format!(
                    "{max_pending} {what} requests are already in flight; try again in a moment"
                ));
            }
            if slots.len() >= max_cached {
                let now = unix_now();
                slots.retain(|_, s| match s {
                    Slot::Pending(_) => true,
                    Slot::Ready { use_until, .. } => *use_until > now,
                });
                if slots.len() >= max_cached {
                    let victim = slots
                        .iter()
                        .filter_map(|(k, s)| match s {
                            Slot::Ready { use_until, .. } => Some((*use_until, k.clone())),
                            Slot::Pending(_) => None,
                        })
                        .min_by_key(|(at, _)| *at);
                    if let Some((_, k)) = victim {
                        slots.remove(&k);
                    }
                }
            }
            slots.insert(key.clone(), Slot::Pending(vec![tx]));
        }
        let (done_tx, done_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                // The agent may have stopped waiting; nothing to do then.
                let _ = done_tx.send(issue());
            });
        if let Err(e) = spawned {
            let result = settle(Err(format!("cannot start a {what} request thread: {e}")));
            complete(&self.slots, key, result, true);
            return Ok(rx);
        }
        let slots = self.slots.clone();
        let key = key.clone();
        let (epoch, started) = (self.epoch.clone(), self.epoch.get());
        glommio::spawn_local(async move {
            let result = match net::timeout(timeout, done_rx).await {
                None => Err(format!("control did not issue a {what} within {timeout:?}")),
                Some(Err(_)) => Err(format!("the {what} request stopped without an answer")),
                Some(Ok(issued)) => issued,
            };
            complete(&slots, &key, settle(result), epoch.get() == started);
        })
        .detach();
        Ok(rx)
    }
}

/// Ends the pending request for `key`: caches a success still usable (unless `cache` is false:
/// the cache was told to forget meanwhile), forgets a failure, and answers every waiter.
fn complete<K: Clone + Eq + Hash, V: Clone>(
    slots: &RefCell<HashMap<K, Slot<V>>>,
    key: &K,
    result: Result<(V, u64), String>,
    cache: bool,
) {
    let mut map = slots.borrow_mut();
    let waiters = match map.remove(key) {
        Some(Slot::Pending(waiters)) => waiters,
        Some(ready) => {
            map.insert(key.clone(), ready);
            Vec::new()
        }
        None => Vec::new(),
    };
    let answer = result.map(|(value, use_until)| {
        if cache && use_until > unix_now() {
            map.insert(
                key.clone(),
                Slot::Ready {
                    value: value.clone(),
                    use_until,
                },
            );
        }
        value
    });
    drop(map);
    for waiter in waiters {
        let _ = waiter.send(answer.clone());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn cache() -> IssueCache<String, u64> {
        IssueCache::new(Limits {
            max_pending: 8,
            max_cached: 8,
            timeout: Duration::from_secs(10),
            what: "certificate",
            thread: "test-issue",
        })
    }

    fn executor() -> glommio::LocalExecutor {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap()
    }

    /// Issues from a counter: the value says which request made it.
    async fn get(cache: &IssueCache<String, u64>, issued: &Arc<AtomicUsize>) -> u64 {
        let issued = Arc::clone(issued);
        cache
            .get(
                &"alice".to_string(),
                move || Ok(issued.fetch_add(1, Ordering::SeqCst) as u64 + 1),
                |r| r.map(|v| (v, unix_now() + 3600)),
            )
            .await
            .unwrap()
    }

    #[test]
    fn forget_drops_what_was_issued_and_the_next_use_issues_anew() {
        executor().run(async {
            let cache = cache();
            let issued = Arc::new(AtomicUsize::new(0));
            assert_eq!(get(&cache, &issued).await, 1);
            assert_eq!(get(&cache, &issued).await, 1, "cached");
            assert_eq!(cache.forget(), 1);
            assert_eq!(get(&cache, &issued).await, 2, "issued again after forget");
            assert_eq!(get(&cache, &issued).await, 2, "and cached again");
        });
    }

    #[test]
    fn a_request_in_flight_at_forget_answers_but_is_not_cached() {
        executor().run(async {
            let cache = Rc::new(cache());
            let issued = Arc::new(AtomicUsize::new(0));
            let (release, released) = std::sync::mpsc::channel::<()>();
            let slow = {
                let (cache, issued) = (Rc::clone(&cache), Arc::clone(&issued));
                glommio::spawn_local(async move {
                    cache
                        .get(
                            &"alice".to_string(),
                            move || {
                                let _ = released.recv();
                                Ok(issued.fetch_add(1, Ordering::SeqCst) as u64 + 1)
                            },
                            |r| r.map(|v| (v, unix_now() + 3600)),
                        )
                        .await
                        .unwrap()
                })
            };
            glommio::executor().yield_now().await;
            assert_eq!(cache.forget(), 0, "nothing ready yet");
            release.send(()).unwrap();
            assert_eq!(slow.await, 1, "the waiter is answered");
            assert_eq!(
                get(&cache, &issued).await,
                2,
                "but what it brought was not kept"
            );
        });
    }
}
