//! Clean-up that survives the process that owns a cluster.
//!
//! A small shell process reads what to clean up from a pipe, one line each (`pid N`, `net I`,
//! `dir PATH`), and waits for the pipe to close. The pipe closes however the owner ends
//! (SIGKILL, a test binary exiting with the cluster in a static, a panic); the watchdog then
//! stops the processes (SIGTERM, 5 s, SIGKILL), removes the Pod namespaces and bridge of each
//! network index (killing whatever still runs in them) and removes the directories. An owner
//! that cleans up itself drops the watchdog last, once it is done: dropping ends it unused.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::network::CLEAN_UP_SCRIPT;

const SCRIPT: &str = r#"pids=""; nets=""; dirs=""
while IFS= read -r line; do
  case "$line" in
    "pid "*) pids="$pids ${line#pid }" ;;
    "net "*) nets="$nets ${line#net }" ;;
    "dir "*) dirs="$dirs
${line#dir }" ;;
  esac
done
if [ -n "$pids" ]; then
  kill -TERM $pids 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.5
  done
  kill -KILL $pids 2>/dev/null
fi
for net in $nets; do clean_net "$net"; done
printf '%s\n' "$dirs" | while IFS= read -r dir; do [ -n "$dir" ] && rm -rf -- "$dir"; done"#;

/// The watchdog process and the pipe it waits on.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts the watchdog; `None` (with a warning) when `sh` cannot be started. `hold`, when
    /// given, stays open in the watchdog until it exits (a lock it keeps while it cleans up).
    pub fn spawn(hold: Option<std::fs::File>) -> Option<Self> {
        let script = format!("clean_net() {{\n{CLEAN_UP_SCRIPT}\n}}\n{SCRIPT}");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("seinode-tls-watchdog")
            .stdin(Stdio::piped())
            .stdout(hold.map_or_else(Stdio::null, Stdio::from))
            .stderr(Stdio::null())
            // Not in the owner's process group: a Ctrl-C meant for the owner must not end it.
            .process_group(0)
            .spawn()
            .map_err(|e| tracing::warn!(error = %e, "failed to start the clean-up watchdog"))
            .ok()?;
        let stdin = child.stdin.take();
        Some(Self { child, stdin })
    }

    /// Stops process `pid` if the owner dies.
    pub fn watch_pid(&mut self, pid: u32) {
        self.send(&format!("pid {pid}"));
    }

    /// Removes Pod network `index` if the owner dies.
    pub fn watch_network(&mut self, index: u8) {
        self.send(&format!("net {index}"));
    }

    /// Removes `dir` if the owner dies (after the processes are stopped). A path with a line
    /// break cannot be told to the watchdog; it is left out, with a warning.
    pub fn watch_dir(&mut self, dir: &Path) {
        let dir = dir.display().to_string();
        if dir.contains('\n') {
            tracing::warn!(dir, "not watching a directory whose name has a line break");
            return;
        }
        self.send(&format!("dir {dir}"));
    }

    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut()
            && let Err(e) = writeln!(stdin, "{line}")
        {
            tracing::warn!(error = %e, "the clean-up watchdog is gone");
        }
    }
}

impl Drop for Watchdog {
    /// Ends the watchdog without cleaning up: the owner has done it (or, during a failed
    /// start, the parts it started clean up after themselves as they drop).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin.take();
    }
}
