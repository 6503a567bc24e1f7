//! The patched glommio reactor under a request/response load, seen from the process: no
//! io_uring worker thread (`iou-wrk-*`) is ever needed.
//!
//! Upstream glommio linked an eventfd write to a timer that fires after `ring_depth`
//! completions; the kernel cannot write an eventfd without blocking, so each firing went through
//! an io-wq worker thread (131 wake-ups a second in the daemon and the agent under the rr load
//! test). Patch 12 (`vendor/glommio/PATCHES.md`) reads that trigger from memory instead. A
//! thread the kernel creates for a punted request shows up in `/proc/self/task` with the name
//! `iou-wrk-<tid>` and lingers for seconds when idle, so counting those threads right after
//! thousands of completions shows whether anything on the path was punted.
//!
//! Not here: the CPU this saves (BENCHMARKS.md, "rr: the reactor's last levers"). This file is
//! its own test binary with one test, so no other test's I/O runs in the process meanwhile.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

/// Round trips of 64 bytes: each is at least two completions on each side's main ring (a
/// read poll and an accept or connect at the start), many times glommio's `ring_depth` (128).
const ROUND_TRIPS: usize = 2_000;

/// Names of this process's io_uring worker threads.
fn io_workers() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim().to_owned())
        .filter(|comm| comm.starts_with("iou-wrk"))
        .collect()
}

#[test]
fn request_response_needs_no_io_worker_thread() {
    let before = io_workers();
    assert!(
        before.is_empty(),
        "io_uring workers before the test: {before:?}"
    );

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = LocalExecutorBuilder::new(Placement::Unbound)
        .name("echo")
        .io_memory(64 << 10)
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let mut stream = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            for _ in 0..ROUND_TRIPS {
                stream.read_exact(&mut buf).await.unwrap();
                stream.write_all(&buf).await.unwrap();
            }
        })
        .unwrap();
    let addr = addr_rx.recv().unwrap();
    let client = LocalExecutorBuilder::new(Placement::Unbound)
        .name("client")
        .io_memory(64 << 10)
        .spawn(move || async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut buf = [7u8; 64];
            for i in 0..ROUND_TRIPS {
                buf[0] = i as u8;
                stream.write_all(&buf).await.unwrap();
                let sent = buf;
                stream.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, sent, "round trip {i} came back changed");
            }
            // Both executors are still running here, so any worker their rings created is
            // still alive (idle io-wq workers exit only after seconds).
            io_workers()
        })
        .unwrap();
    let workers = client.join().expect("client executor panicked");
    server.join().expect("echo executor panicked");
    assert!(
        workers.is_empty(),
        "{ROUND_TRIPS} round trips made the kernel punt requests to io_uring worker threads \
         {workers:?}: something on the reactor's path (such as upstream glommio's throughput \
         timer and its linked eventfd write, which patch 12 removed) cannot complete without \
         blocking"
    );
}
