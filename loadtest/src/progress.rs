//! A one-line progress indicator on stderr, only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shows `label: done[/total]` every 250 ms until dropped.
pub struct Progress {
    pub done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = if std::io::stderr().is_terminal() {
            let (done, stop, label) = (done.clone(), stop.clone(), label.to_string());
            Some(std::thread::spawn(move || {
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let d = done.load(Ordering::Relaxed);
                    let t = start.elapsed().as_secs_f64();
                    let line = match total {
                        Some(total) => format!(
                            "{label}: {d}/{total} ({:.0}%) {t:.1}s",
                            d as f64 * 100.0 / total.max(1) as f64
                        ),
                        None => format!("{label}: {d} {t:.1}s"),
                    };
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                    std::thread::sleep(Duration::from_millis(250));
                }
                eprint!("\r\x1b[2K");
            }))
        } else {
            None
        };
        Progress { done, stop, handle }
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
