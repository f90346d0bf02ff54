//! The live view of `k2 demo <scenario>` in a real terminal: tmux runs the
//! `k2` binary in a detached session, and the test reads the screen with
//! `capture-pane` while it runs and after it ends.

use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux runs (scripts/test installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the session however the test ends.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

#[test]
fn the_live_view_of_overload_shows_the_level_the_signals_and_shedding_then_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let session = Session(format!("k2-demo-{}", std::process::id()));
    let command = format!(
        "{} demo overload --duration 60 --rate 10000 --listen 127.0.0.1:0 --dir {}; echo demo-exit=$?; sleep 600",
        env!("CARGO_BIN_EXE_k2"),
        dir.path().display()
    );
    let status = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session.0,
            "-x",
            "180",
            "-y",
            "50",
            &command,
        ])
        .env_remove("K2_LOG")
        .status()
        .expect("tmux runs (scripts/test installs it)");
    assert!(status.success(), "tmux could not start a session");

    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut live, mut end) = (None, None);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let screen = tmux(&["capture-pane", "-p", "-t", &session.0]);
        if screen.contains("demo-exit=") {
            // With the scrollback: the verdict is longer than the screen.
            end = Some(tmux(&["capture-pane", "-p", "-S", "-400", "-t", &session.0]));
            break;
        }
        // A frame at the top of the climb.
        if screen.contains("signals against the thresholds") && screen.contains("level CIRCUIT_BREAK") {
            live = Some(screen);
        }
    }
    let live = live.expect("no frame of the live view showed CIRCUIT_BREAK");
    for shown in [
        "-> CIRCUIT_BREAK",
        "retention_headroom_s",
        "total_lag_records",
        "CIRCUIT_BREAK",
        "committed rows/s",
        "lag per partition",
        "shed by priority",
        "active faults",
        "restarts:",
    ] {
        assert!(live.contains(shown), "the live view lacks {shown:?}:\n{live}");
    }
    let end = end.expect("the demo did not end within 180 s");
    for shown in [
        "[ok] the level climbed to CIRCUIT_BREAK",
        "[ok] the level came back to NORMAL",
        "[ok] no CRITICAL trade was shed",
        "by priority",
        "backfilled",
        "verdict: every produced trade and reference record is committed",
        "demo-exit=0",
    ] {
        assert!(end.contains(shown), "the end of the demo lacks {shown:?}:\n{end}");
    }
    let log = std::fs::read_to_string(dir.path().join("k2-demo.log")).unwrap_or_default();
    assert!(
        log.contains("fault injected"),
        "the logs went elsewhere than k2-demo.log:\n{log}"
    );
}
