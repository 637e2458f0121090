//! Clean-up that survives the process that owns a cluster.
//!
//! A small shell process reads what to clean up from a pipe, one line each (`pid N:START`,
//! `net I`, `dir PATH`), and waits for the pipe to close. The pipe closes however the owner ends
//! (SIGKILL, a test binary exiting with the cluster in a static, a panic); the watchdog then
//! stops the processes still running that it was told of (SIGTERM, 5 s, SIGKILL; a PID now
//! held by a process started at another time is left alone), removes the Pod namespaces and
//! bridge of each
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
# Whether process $1 (PID:START) still runs and is the one started at START (field 22 of its
# stat), not a later process that was given the PID of one the owner already reaped.
same() {
  stat=$(cat "/proc/${1%%:*}/stat" 2>/dev/null) || return 1
  set -- "$1" ${stat##*) }
  [ "$2" != Z ] && [ "${21}" = "${1#*:}" ]
}
current() { for e in $pids; do same "$e" && printf '%s ' "${e%%:*}"; done; }
live=$(current)
if [ -n "$live" ]; then
  kill -TERM $live 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    live=$(current); [ -z "$live" ] && break
    sleep 0.5
  done
  live=$(current); [ -n "$live" ] && kill -KILL $live 2>/dev/null
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

    /// Stops process `pid` if the owner dies, and while it is still that process: the watchdog
    /// checks its start time, so a PID the kernel gave to another process after the owner
    /// reaped this one (a restarted component) is left alone. A process already gone is not
    /// watched.
    pub fn watch_pid(&mut self, pid: u32) {
        match start_time(pid) {
            Some(start) => self.send(&format!("pid {pid}:{start}")),
            None => tracing::warn!(pid, "not watching a process that is already gone"),
        }
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

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count after it.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19).map(str::to_owned)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner dies (its end of the pipe closes): the watchdog stops the processes it was
    /// told of, but not one that has since been given a watched PID.
    #[test]
    fn an_orphaned_watchdog_stops_its_processes_and_only_them() {
        let mut watched = Command::new("sleep").arg("300").spawn().unwrap();
        let mut other = Command::new("sleep").arg("300").spawn().unwrap();
        let mut watchdog = Watchdog::spawn(None).unwrap();
        watchdog.watch_pid(watched.id());
        // As if `other` had been given the PID of a process started at another time.
        watchdog.send(&format!("pid {}:1", other.id()));
        drop(watchdog.stdin.take());
        watchdog.child.wait().unwrap();
        let status = watched.wait().unwrap();
        assert!(!status.success(), "the watched process was not stopped");
        assert_eq!(
            other.try_wait().unwrap(),
            None,
            "another process was stopped"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn the_start_time_is_read_past_any_command_name() {
        let own = start_time(std::process::id()).unwrap();
        assert!(own.parse::<u64>().is_ok(), "{own}");
        assert_eq!(start_time(u32::MAX), None);
    }
}
