//! Per-thread pools of the mux core's two fixed-size buffers: the input scratch
//! ([`INPUT_BUF_LEN`]) and a transmit queue buffer at its smallest ([`MIN_ALLOC`]).
//!
//! An idle tunnel (keepalives only) needs neither between two wake-ups, yet held both (64 KiB +
//! 2 x 16 KiB, zeroed, so resident) for its whole life: at 19,800 tunnels most of the daemon's
//! 2.8 GB. [`Conn::release_idle_buffers`](super::Conn::release_idle_buffers) gives them back
//! here when the driver goes to sleep, and the next use takes one back without an allocation or
//! zeroing, so a busy tunnel pays a thread-local push and pop per wake-up.
//!
//! The core stays sans-IO: this is memory, not I/O, and a pool per thread (each glommio
//! executor is one) needs no lock. Not here: larger transmit buffers (grown by bulk), which a
//! busy tunnel keeps and a quiet one frees (after a keepalive interval of silence, see
//! `Conn::release_idle_buffers`).

use std::cell::RefCell;

use super::tx::MIN_ALLOC;
use super::INPUT_BUF_LEN;

/// Buffers kept per thread and size.
const POOLED: usize = 32;

thread_local! {
    static INPUT: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static QUEUE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A zero-initialized-once buffer of exactly `len` bytes (contents unspecified): from the
/// pool when `len` is one of the pooled sizes and one is there, else a new zeroed one.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let pooled = match len {
        INPUT_BUF_LEN => INPUT.with_borrow_mut(Vec::pop),
        MIN_ALLOC => QUEUE.with_borrow_mut(Vec::pop),
        _ => None,
    };
    pooled.unwrap_or_else(|| vec![0u8; len])
}

/// Gives `buf` back (emptying the caller's); a buffer of another size is dropped.
pub(crate) fn give(buf: &mut Vec<u8>) {
    let buf = std::mem::take(buf);
    let keep = |pool: &mut Vec<Vec<u8>>, buf: Vec<u8>| {
        if pool.len() < POOLED {
            pool.push(buf);
        }
    };
    match buf.len() {
        INPUT_BUF_LEN => INPUT.with_borrow_mut(|pool| keep(pool, buf)),
        MIN_ALLOC => QUEUE.with_borrow_mut(|pool| keep(pool, buf)),
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn pooled_sizes_come_back_others_are_dropped() {
        let mut a = take(INPUT_BUF_LEN);
        assert_eq!(a.len(), INPUT_BUF_LEN);
        a[0] = 7;
        let ptr = a.as_ptr();
        give(&mut a);
        assert!(a.is_empty());
        let b = take(INPUT_BUF_LEN);
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is reused");
        let mut odd = vec![0u8; 100];
        give(&mut odd);
        assert_eq!(take(100).len(), 100);
    }
}
