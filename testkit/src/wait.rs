//! Bounded waits: for a condition on a test thread, for a future on a glommio executor.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::WAIT;

/// Polls `condition` every 10 ms until it holds; panics after [`WAIT`].
pub fn wait_for(what: &str, condition: impl FnMut() -> bool) {
    wait_for_within(WAIT, what, condition);
}

/// Polls `condition` every 10 ms until it holds; panics after `bound`.
pub fn wait_for_within(bound: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `fut`'s output; panics if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(WAIT, what, fut).await
}

/// `fut`'s output; panics if it takes longer than `bound`.
pub async fn within_for<F: Future>(bound: Duration, what: &str, fut: F) -> F::Output {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::Timer::new(bound).await;
        None
    })
    .await
    .unwrap_or_else(|| panic!("timed out after {bound:?} waiting for {what}"))
}

/// Runs `test` on a fresh glommio executor (named `stand-in-engine`) on this thread.
pub fn on_executor<F, Fut>(test: F) -> Fut::Output
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("stand-in-engine")
        .io_memory(64 << 10)
        .make()
        .unwrap()
        .run(test())
}

/// Runs `body` on a fresh glommio executor on a new thread.
pub fn spawn_executor<F, Fut, T>(body: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap()
            .run(body())
    })
}

/// Runs `body` on a fresh glommio executor on its own thread; returns its result.
pub fn on_thread_executor<F, Fut, T>(body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    spawn_executor(body).join().unwrap()
}
