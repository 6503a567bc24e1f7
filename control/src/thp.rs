//! The long-running processes (`jaunt start`, `jaunt agent`) turn transparent huge pages off for
//! themselves (`prctl(PR_SET_THP_DISABLE)`).
//!
//! Why: mimalloc advises the kernel to back its memory with huge pages (its `allow_thp` option is
//! on by default), and where the host's THP mode is `madvise` (Debian's default) the first touch
//! of each 2 MiB then faults in a whole huge page that the kernel zeroes, however little of it is
//! used. In a reconnect storm (9,900 agents after a crashed daemon's restart) that zeroing was
//! about a fifth of the new daemon's CPU (`clear_page_erms` under `do_huge_pmd_anonymous_page`
//! from mimalloc's free-list set-up); with THP off the daemon used less CPU in all nine
//! alternated rounds and the agents were back sooner in eight (level in the ninth), while bulk
//! and rr did not change. It also takes the
//! occasional 60-150 ms of zeroing out of a start and about 25 MB out of the baseline RSS
//! (BENCHMARKS.md, "Reconnect storm: huge pages").
//!
//! The flag is the process's: it covers memory mapped before the call, survives the
//! `rep movsb` re-exec (`memcpy.rs`), and is inherited by children across `execve`. Neither
//! process spawns children today; one that starts to (a shell for a session, say) should clear it
//! in the child before `exec` (`prctl(PR_SET_THP_DISABLE, 0)`).
//!
//! An operator who sets `MIMALLOC_ALLOW_THP` decides instead (`1` keeps huge pages; mimalloc
//! implements `0` with the same `prctl`). Not here: the data path's buffers, which are sized and
//! pooled in the engine (`jaunt_engine::mux::pool`).

use std::ffi::OsStr;

/// mimalloc's own switch; when the operator set it, it decides.
const OPERATOR_SWITCH: &str = "MIMALLOC_ALLOW_THP";

/// Whether this process turns THP off, given the operator's `MIMALLOC_ALLOW_THP`.
fn turn_off(operator: Option<&OsStr>) -> bool {
    operator.is_none()
}

/// Turns transparent huge pages off for this process unless the operator chose (see the module
/// docs). Returns whether THP is now off by this call; a kernel that refuses leaves it as it was.
pub(crate) fn disable_transparent_huge_pages() -> bool {
    if !turn_off(std::env::var_os(OPERATOR_SWITCH).as_deref()) {
        return false;
    }
    set_thp_disable()
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_thp_disable() -> bool {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and reads or writes no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn set_thp_disable() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_setting_decides() {
        assert!(turn_off(None));
        assert!(!turn_off(Some(OsStr::new("1"))));
        assert!(!turn_off(Some(OsStr::new("0"))));
    }
}
