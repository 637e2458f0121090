//! Container processes: a pod's container is a process tree in the pod's network namespace,
//! with a private mount, UTS and IPC namespace and a copy-on-write view of the host's root.
//!
//! The process is started as `ip netns exec <netns> unshare --uts --ipc -- sh -c SCRIPT`, each
//! stage exec'ing the next, so the child's pid is the container's main process and its process
//! group is the container (`process_group(0)`). Everything the script mounts lives in the mount
//! namespace `ip netns exec` creates (slave to the host), so nothing leaks back and nothing has
//! to be unmounted; writes land on a tmpfs. User values are positional arguments, never script
//! text.

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The launcher's own `PATH` (`ip`, `mount`, `chroot`, `setpriv` from the host), never the Pod's.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the hosts directory is bind-mounted; `/etc/hosts` becomes a symlink into it, so the
/// kubelet's atomic renames are seen by running containers.
const HOSTS_MOUNT: &str = "/run/devcluster-hosts";

/// Builds the container's root and execs its command; `$1..$8` are fixed parameters, then
/// `3 × $8` mount arguments (source, target, `ro`|`rw`), then the container's environment as
/// `NAME=VALUE` words, then the command line. The script itself runs with the host's `PATH`
/// only; the environment reaches the command alone (`env -i`), which runs with no capability
/// and no way to gain one, whatever its user.
const SCRIPT: &str = r#"set -eu
s=$1 hosts=$2 hn=$3 uid=$4 gid=$5 groups=$6 wd=$7 n=$8
shift 8
mount -t tmpfs -o mode=0755 devcluster "$s"
mkdir "$s/u" "$s/w" "$s/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$s/u,workdir=$s/w" "$s/root"
r=$s/root
for d in proc dev sys; do mkdir -p "$r/$d"; mount --rbind "/$d" "$r/$d"; done
mkdir -p "$r$HOSTS_MOUNT"
mount --bind "$hosts" "$r$HOSTS_MOUNT"
rm -f "$r/etc/hosts"
ln -s "$HOSTS_MOUNT/hosts" "$r/etc/hosts"
while [ "$n" -gt 0 ]; do
  # Resolve the target inside the container's root: a symlink on the way (`/var/run` -> `/run`)
  # must lead into the root, never out to the host's file system.
  src=$1 dst=$r$(chroot "$r" realpath -m -- "$2") mode=$3
  shift 3
  n=$((n - 1))
  if [ -d "$src" ]; then
    mkdir -p "$dst"
  else
    mkdir -p "$(dirname "$dst")"
    [ -e "$dst" ] || : >"$dst"
  fi
  mount --bind "$src" "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
hostname "$hn"
if [ -n "$wd" ]; then set -- -C "$wd" -- "$@"; else set -- -- "$@"; fi
if [ -n "$groups" ]; then g="--groups=$groups"; else g=--clear-groups; fi
exec chroot "$r" setpriv --reuid="$uid" --regid="$gid" "$g" --no-new-privs \
  --bounding-set=-all --inh-caps=-all -- env -i "$@"
"#;

/// A bind mount into the container's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub target: String,
    pub read_only: bool,
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub netns: String,
    /// An empty host directory the script mounts its tmpfs on (only inside its namespace).
    pub scratch: PathBuf,
    /// The directory holding the pod's `hosts` file.
    pub hosts_dir: PathBuf,
    pub hostname: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr are appended here.
    pub log: PathBuf,
}

/// The argument vector after `sh -c SCRIPT`.
pub fn script_args(spec: &ProcessSpec) -> Vec<String> {
    let groups: Vec<String> = spec.groups.iter().map(u32::to_string).collect();
    let mut args = vec![
        "devcluster-container".to_owned(),
        spec.scratch.to_string_lossy().into_owned(),
        spec.hosts_dir.to_string_lossy().into_owned(),
        spec.hostname.clone(),
        spec.uid.to_string(),
        spec.gid.to_string(),
        groups.join(","),
        spec.working_dir.clone().unwrap_or_default(),
        spec.mounts.len().to_string(),
    ];
    for mount in &spec.mounts {
        args.push(mount.source.to_string_lossy().into_owned());
        args.push(mount.target.clone());
        args.push(if mount.read_only { "ro" } else { "rw" }.to_owned());
    }
    args.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    args.extend(spec.argv.iter().cloned());
    args
}

/// Starts the container; its pid is also its process group.
pub fn spawn(spec: &ProcessSpec) -> io::Result<Child> {
    std::fs::create_dir_all(&spec.scratch)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    let script = SCRIPT.replace("$HOSTS_MOUNT", HOSTS_MOUNT);
    let mut command = Command::new("ip");
    command
        .args([
            "netns",
            "exec",
            &spec.netns,
            "unshare",
            "--uts",
            "--ipc",
            "--",
            "sh",
            "-c",
        ])
        .arg(script)
        .args(script_args(spec))
        .env_clear()
        .env("PATH", HOST_PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    command.spawn()
}

/// Waits until process `pid` has left the host's root (the script's `chroot`, right before
/// the container's command), or is gone; at most 10 s.
pub async fn wait_for_root(pid: u32) {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        match std::fs::read_link(&root) {
            Ok(path) if path != std::path::Path::new("/") => return,
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
}

/// Sends `signal` to the process group `pid` leads; a group already gone is fine.
pub fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if raw <= 1 {
        return;
    }
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => tracing::warn!(%error, pid, ?signal, "failed to signal a container"),
    }
}

/// A command run inside a running container's namespaces and root (exec hooks).
pub fn exec_in(pid: u32, uid: u32, gid: u32, argv: &[String], env: &[(String, String)]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .args(["-t", &pid.to_string(), "-a", "-r", "-w"])
        .args([
            "-S",
            &uid.to_string(),
            "-G",
            &gid.to_string(),
            "--",
            "env",
            "-i",
            "--",
        ])
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .args(argv)
        .env_clear()
        .env("PATH", HOST_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_arguments_carry_user_strings_as_positional_parameters() {
        let spec = ProcessSpec {
            netns: "ns".into(),
            scratch: "/s".into(),
            hosts_dir: "/h".into(),
            hostname: "web-0".into(),
            uid: 1000,
            gid: 2000,
            groups: vec![3000, 4000],
            working_dir: None,
            mounts: vec![Mount {
                source: "/v/tls".into(),
                target: "/etc/tls; rm -rf /".into(),
                read_only: true,
            }],
            argv: vec!["/bin/echo".into(), "$(not expanded here)".into()],
            env: vec![],
            log: "/l".into(),
        };
        assert_eq!(
            script_args(&spec),
            [
                "devcluster-container",
                "/s",
                "/h",
                "web-0",
                "1000",
                "2000",
                "3000,4000",
                "",
                "1",
                "/v/tls",
                "/etc/tls; rm -rf /",
                "ro",
                "/bin/echo",
                "$(not expanded here)",
            ]
        );
    }

    /// Needs root, iproute2 and overlayfs, as every cluster test does.
    #[tokio::test]
    async fn container_runs_as_its_user_with_volumes_hosts_and_hostname() {
        let network = crate::network::PodNetwork::create().unwrap();
        let sandbox = network.sandbox("runtime-test").unwrap();
        let dir = std::env::temp_dir().join(format!("devcluster-runtime-{}", std::process::id()));
        let volume = dir.join("volume");
        let hosts = dir.join("hosts");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::create_dir_all(&hosts).unwrap();
        std::fs::write(volume.join("key"), "secret-value").unwrap();
        std::fs::write(
            hosts.join("hosts"),
            "127.0.0.1 localhost\n198.18.0.9 peer\n",
        )
        .unwrap();
        let spec = ProcessSpec {
            netns: sandbox.netns.clone(),
            scratch: dir.join("scratch"),
            hosts_dir: hosts,
            hostname: "web-0".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![2000],
            working_dir: Some("/etc/app".into()),
            mounts: vec![Mount {
                source: volume.clone(),
                target: "/etc/app".into(),
                read_only: true,
            }],
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "id -u; id -G; hostname; cat key; echo; grep peer /etc/hosts; pwd; \
                 touch /etc/app/x 2>/dev/null || echo read-only; echo $GREETING; \
                 touch /tmp/scratch && echo writable"
                    .into(),
            ],
            env: vec![
                ("PATH".into(), super::super::images::DEFAULT_PATH.into()),
                ("GREETING".into(), "hello; $(rm -rf /)".into()),
            ],
            log: dir.join("app.log"),
        };
        let status = spawn(&spec).unwrap().wait().await.unwrap();
        let log = std::fs::read_to_string(&spec.log).unwrap();
        sandbox.remove();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(status.success(), "{log}");
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            [
                "1000",
                "1000 2000",
                "web-0",
                "secret-value",
                "198.18.0.9 peer",
                "/etc/app",
                "read-only",
                "hello; $(rm -rf /)",
                "writable"
            ]
        );
        assert!(
            !std::path::Path::new("/tmp/scratch").exists(),
            "the container wrote to the host"
        );
    }
}
