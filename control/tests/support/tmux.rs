//! tmux as the real PTY of `jaunt ssh` in tests: each test runs a tmux server of its own (on
//! socket `-L SOCK`), which [`TmuxServer`] ends when dropped.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{jaunt_bin, Cluster};

/// Runs tmux on its own server socket `sock`.
pub fn tmux(sock: &str, args: &[&str]) -> Output {
    Command::new("tmux")
        .args(["-L", sock])
        .args(args)
        .output()
        .unwrap()
}

/// Ends the tmux server on socket `.0` when dropped (a failed assertion must not leave it
/// running).
pub struct TmuxServer(pub String);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = tmux(&self.0, &["kill-server"]);
    }
}

/// `jaunt ssh root@node1` as `c`'s user in a 100x30 tmux session `session` on a new tmux
/// server on socket `sock`: the guard that ends that server.
pub fn ssh_in_tmux(c: &Cluster, sock: &str, session: &str) -> TmuxServer {
    let command = format!(
        "env JAUNT_HOME={} {} ssh root@node1",
        c.home.display(),
        jaunt_bin()
    );
    let o = tmux(
        sock,
        &[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "100",
            "-y",
            "30",
            &command,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    TmuxServer(sock.to_string())
}

/// The text of tmux session `target`'s pane on the server `sock` (its last 200 lines of
/// history too, wrapped lines joined).
pub fn pane(sock: &str, target: &str) -> String {
    let o = tmux(
        sock,
        &["capture-pane", "-p", "-J", "-S", "-200", "-t", target],
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Polls the pane of tmux session `target` until its text contains `want` (20 s at the most).
#[track_caller]
pub fn wait_for_pane_of(sock: &str, target: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = pane(sock, target);
        if text.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{want:?} never showed: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
