//! The long-running processes (`jaunt start`, `jaunt agent`) turn off glibc's `rep movsb`
//! copies by re-executing themselves once with the glibc tunable that does it.
//!
//! Why: on AMD Zen 3/4 (FSRM), glibc before the fix for its bug 30994 (Debian 12's 2.36 among
//! them) copies every block above about 2 KiB with `rep movsb`, which runs about 20x slower when
//! the destination lies 1..=31 bytes after the source modulo 64. The data path's large copies are
//! mostly rustls' (plaintext into a record buffer that starts 5 bytes into its allocation, the
//! decrypted payload out of it) and land in that layout often: in a bulk download through the
//! engine, one such copy alone took 6.6% of the engine's and agent's CPU, and the daemon's CPU
//! per GiB fell by about a third with the tunable (BENCHMARKS.md, issue 14's bulk section). The
//! mux's own copies already avoid the layout (`jaunt_engine::mux`'s `copy`), rustls' cannot.
//! With the threshold at its maximum glibc copies with its vector loop, which does not care
//! about the layout, at every size below the non-temporal threshold.
//!
//! The tunable is read by the dynamic loader at start, so it can only be set for a new image:
//! `exec` of the same executable with the same arguments (same PID, same open descriptors, the
//! environment plus `GLIBC_TUNABLES`). Nothing happens when the operator's `GLIBC_TUNABLES`
//! already sets this tunable (to keep `rep movsb`, set it to 2048), when an earlier exec already
//! tried (a marker variable: glibc may drop the tunables for privileged processes), off x86-64
//! Linux with glibc, or when the exec fails (then the process simply goes on).

use std::ffi::OsString;

/// The glibc tunable: the smallest copy that uses `rep movsb`.
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// Its largest value: never.
const NEVER: &str = "4294967295";

/// Set in the re-executed process, so that it never tries again.
const MARKER: &str = "JAUNT_MEMCPY_REEXEC";

/// `GLIBC_TUNABLES` with the tunable added, or `None` when it needs no change (the operator set
/// the tunable already) or cannot be read.
fn tunables_with_threshold(current: Option<&OsString>) -> Option<String> {
    let current = match current {
        None => "",
        Some(value) => value.to_str()?,
    };
    let set_already = current
        .split(':')
        .any(|entry| entry.split('=').next() == Some(TUNABLE));
    if set_already {
        return None;
    }
    Some(if current.is_empty() {
        format!("{TUNABLE}={NEVER}")
    } else {
        format!("{current}:{TUNABLE}={NEVER}")
    })
}

/// Re-executes this process with `rep movsb` off (see the module docs); returns only when it
/// did not (nothing to do, or the exec failed).
pub(crate) fn reexec_without_rep_movsb() {
    if !cfg!(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_env = "gnu"
    )) {
        return;
    }
    if std::env::var_os(MARKER).is_some() {
        return;
    }
    let Some(tunables) = tunables_with_threshold(std::env::var_os("GLIBC_TUNABLES").as_ref())
    else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    // `exec` returns only on failure; then this process goes on with glibc's defaults.
    let _failed = command
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(MARKER, "1")
        .exec();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_threshold_unless_the_operator_set_it() {
        let os = |s: &str| OsString::from(s);
        assert_eq!(
            tunables_with_threshold(None).as_deref(),
            Some("glibc.cpu.x86_rep_movsb_threshold=4294967295")
        );
        assert_eq!(
            tunables_with_threshold(Some(&os("glibc.malloc.arena_max=2"))).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=4294967295")
        );
        assert_eq!(
            tunables_with_threshold(Some(&os("glibc.cpu.x86_rep_movsb_threshold=2048"))),
            None
        );
        assert_eq!(
            tunables_with_threshold(Some(&os(
                "glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=2048"
            ))),
            None
        );
        // A similar name is not the tunable.
        assert!(
            tunables_with_threshold(Some(&os("glibc.cpu.x86_rep_stosb_threshold=1"))).is_some()
        );
    }
}
