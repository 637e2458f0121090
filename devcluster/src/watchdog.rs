//! Clean-up that survives the process that owns a cluster.
//!
//! A small shell process reads what to clean up from a pipe, one line each (`pid N`, `net I`,
//! `dir PATH`), and waits for the pipe to close. The pipe closes however the owner ends
//! (SIGKILL, a test binary exiting with the cluster in a static, a panic); the watchdog then
//! stops the processes (SIGTERM, 5 s, SIGKILL), removes the Pod namespaces and bridge of each
//! network index (killing whatever still runs in them) and removes the directories. An owner
//! that cleans up itself calls [`Watchdog::disarm`] first.

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
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
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
    /// Starts the watchdog; `None` (with a warning) when `sh` cannot be started.
    pub fn spawn() -> Option<Self> {
        let script = format!("clean_net() {{\n{CLEAN_UP_SCRIPT}\n}}\n{SCRIPT}");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("seinode-tls-watchdog")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
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

    /// Removes `dir` if the owner dies (after the processes are stopped).
    pub fn watch_dir(&mut self, dir: &Path) {
        self.send(&format!("dir {}", dir.display()));
    }

    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut()
            && let Err(e) = writeln!(stdin, "{line}")
        {
            tracing::warn!(error = %e, "the clean-up watchdog is gone");
        }
    }

    /// Ends the watchdog without cleaning up: the owner does it.
    pub fn disarm(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin.take();
    }
}

impl Drop for Watchdog {
    /// Dropping without [`Watchdog::disarm`] (a panic during start-up) cleans up.
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.wait();
        }
    }
}
