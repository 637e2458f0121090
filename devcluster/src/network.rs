//! The Pods' network: one Linux bridge per cluster with a /24 of `198.18.0.0/16` (RFC 2544's
//! range for network tests, so it never meets a real network), and one network namespace per
//! Pod with a veth into the bridge.
//!
//! The host reaches every Pod address over the bridge, as a node reaches its Pods; the Pods
//! reach the host at the bridge's address (the gateway) and each other, and nothing else: they
//! get no default route, and an `unreachable` route for the /24 outlives the bridge until the
//! cluster is cleaned up, so nothing sent to a stale Pod address can leave the machine.
//!
//! A cluster owns its /24 through a lock file in `/run/seinode-tls`; a bridge whose lock nobody
//! holds was left by a process that died, and is removed before the range is reused.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// Directory of the per-range lock files.
const LOCK_DIR: &str = "/run/seinode-tls";
/// Prefix of the bridges and namespaces made here (bridge `sntls<i>`, netns `sntls<i>-<n>`;
/// the host ends of the veths are `snv<i>-<n>`).
pub const NAME_PREFIX: &str = "sntls";

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error(
        "Pods need network namespaces, which only root can make (running as uid {uid}); run as \
         root to get the process kubelet"
    )]
    NotRoot { uid: u32 },
    #[error("failed to run `ip {args}`: {message}")]
    Ip { args: String, message: String },
    #[error("failed to lock {}", .path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all 256 Pod ranges in 198.18.0.0/16 are held by other clusters on this machine")]
    NoFreeRange,
    #[error("all 253 Pod addresses of {subnet} are in use")]
    NoFreeAddress { subnet: String },
}

/// Whether this process may make network namespaces (it runs as root).
pub fn check_privileges() -> Result<(), NetworkError> {
    let uid = current_uid();
    if uid == 0 {
        Ok(())
    } else {
        Err(NetworkError::NotRoot { uid })
    }
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// A cluster's bridge and /24. Removes them (and any Pod namespace left) on drop.
#[derive(Debug)]
pub struct PodNetwork {
    index: u8,
    pool: Arc<Mutex<Pool>>,
    _lock: File,
}

#[derive(Debug, Default)]
struct Pool {
    used: BTreeSet<u8>,
    next_sandbox: u32,
}

impl PodNetwork {
    /// Claims a free /24 and creates its bridge. Needs root.
    pub fn create() -> Result<Self, NetworkError> {
        check_privileges()?;
        std::fs::create_dir_all(LOCK_DIR).map_err(|source| NetworkError::Lock {
            path: LOCK_DIR.into(),
            source,
        })?;
        for index in 0..=u8::MAX {
            let path = PathBuf::from(LOCK_DIR).join(format!("net-{index}.lock"));
            let file = File::create(&path).map_err(|source| NetworkError::Lock {
                path: path.clone(),
                source,
            })?;
            if file.try_lock().is_err() {
                continue;
            }
            // Ours now: whatever is left under this index belongs to a process that died.
            clean_up(index);
            let network = Self {
                index,
                pool: Arc::default(),
                _lock: file,
            };
            network.create_bridge()?;
            return Ok(network);
        }
        Err(NetworkError::NoFreeRange)
    }

    /// Index of the /24 (`198.18.<index>.0/24`); the watchdog cleans up by it.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Another handle on the range's lock: whoever holds it keeps the range from being
    /// claimed (the watchdog holds it until it has cleaned up after a dead owner).
    pub fn lock(&self) -> std::io::Result<File> {
        self._lock.try_clone()
    }

    /// The bridge's address on the host: where Pods reach the host (and the API server).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 1)
    }

    /// `198.18.<index>.0/24`.
    pub fn subnet(&self) -> String {
        format!("198.18.{}.0/24", self.index)
    }

    /// The cluster's Service ClusterIP range, `198.19.<index>.0/24`: unreachable, as nothing
    /// routes ClusterIPs here (no kube-proxy); names resolve to endpoints instead.
    pub fn service_range(&self) -> String {
        format!("198.19.{}.0/24", self.index)
    }

    fn bridge(&self) -> String {
        format!("{NAME_PREFIX}{}", self.index)
    }

    fn create_bridge(&self) -> Result<(), NetworkError> {
        let bridge = self.bridge();
        let gateway = format!("{}/24", self.gateway());
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &gateway, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        // Never route for the Pods, whatever the host's global setting.
        let forwarding = format!("/proc/sys/net/ipv4/conf/{bridge}/forwarding");
        std::fs::write(&forwarding, "0").map_err(|e| NetworkError::Ip {
            args: format!("(write 0 to {forwarding})"),
            message: e.to_string(),
        })?;
        // Lower priority than the bridge's own route; it remains when the bridge is gone.
        for range in [self.subnet(), self.service_range()] {
            ip(&["route", "replace", "unreachable", &range, "metric", "4000"])?;
        }
        Ok(())
    }

    /// A new network namespace with `lo` up and `eth0` on the bridge at a free address. No
    /// default route: a Pod reaches its /24 and nothing else.
    pub fn sandbox(&self, pod_uid: &str) -> Result<Sandbox, NetworkError> {
        let (host_octet, n) = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let octet = (2..=254u8)
                .find(|o| !pool.used.contains(o))
                .ok_or_else(|| NetworkError::NoFreeAddress {
                    subnet: self.subnet(),
                })?;
            pool.used.insert(octet);
            pool.next_sandbox += 1;
            (octet, pool.next_sandbox)
        };
        let sandbox = Sandbox {
            netns: format!("{NAME_PREFIX}{}-{n}", self.index),
            ip: Ipv4Addr::new(198, 18, self.index, host_octet),
            host_veth: format!("snv{}-{n}", self.index),
            pool: self.pool.clone(),
        };
        if let Err(e) = sandbox.create(&self.bridge()) {
            tracing::warn!(pod_uid, error = %e, "failed to create a Pod sandbox");
            sandbox.remove();
            return Err(e);
        }
        tracing::debug!(pod_uid, netns = %sandbox.netns, ip = %sandbox.ip, "Pod sandbox created");
        Ok(sandbox)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        clean_up(self.index);
    }
}

/// A Pod's network namespace and address.
#[derive(Debug)]
pub struct Sandbox {
    /// Name of the network namespace (`ip netns exec <netns> ...`).
    pub netns: String,
    /// The Pod's address.
    pub ip: Ipv4Addr,
    host_veth: String,
    pool: Arc<Mutex<Pool>>,
}

impl Sandbox {
    fn create(&self, bridge: &str) -> Result<(), NetworkError> {
        let ns = self.netns.as_str();
        let address = format!("{}/24", self.ip);
        ip(&["netns", "add", ns])?;
        ip(&[
            "link",
            "add",
            &self.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        ip(&["link", "set", &self.host_veth, "master", bridge, "up"])?;
        ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Kills whatever still runs in the namespace, deletes it (its veth goes with it) and frees
    /// the address. Safe to call twice.
    pub fn remove(&self) {
        remove_netns(&self.netns);
        let _ = ip(&["link", "del", &self.host_veth]);
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(octet) = self.ip.octets().get(3) {
            pool.used.remove(octet);
        }
    }
}

/// Removes everything under `index`: processes in its namespaces, the namespaces, the bridge
/// and the unreachable route. What the watchdog does from its shell script, too.
fn clean_up(index: u8) {
    let prefix = format!("{NAME_PREFIX}{index}-");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for ns in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|ns| ns.starts_with(&prefix))
        {
            remove_netns(ns);
        }
    }
    let _ = ip(&["link", "del", &format!("{NAME_PREFIX}{index}")]);
    for range in [
        format!("198.18.{index}.0/24"),
        format!("198.19.{index}.0/24"),
    ] {
        let _ = ip(&["route", "del", "unreachable", &range, "metric", "4000"]);
    }
}

/// Kills every process in network namespace `ns` (a namespace that only loses its name would
/// hide them from every later clean-up), then deletes it.
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// The shell form of [`clean_up`], for the watchdog: `$1` is the index.
pub(crate) const CLEAN_UP_SCRIPT: &str = r#"for ns in $(ip netns list | awk -v p="sntls$1-" 'index($1, p) == 1 { print $1 }'); do
  pids=$(ip netns pids "$ns"); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  ip netns del "$ns" 2>/dev/null
done
ip link del "sntls$1" 2>/dev/null
ip route del unreachable "198.18.$1.0/24" metric 4000 2>/dev/null
ip route del unreachable "198.19.$1.0/24" metric 4000 2>/dev/null"#;

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetworkError::Ip {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Ip {
            args: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Established TCP connections of process `pid` whose remote port is `port`: its socket inodes
/// (`/proc/PID/fd`) matched against its network namespace's tables (`/proc/PID/net/tcp{,6}`).
pub fn established_connections(pid: u32, port: u16) -> std::io::Result<usize> {
    let proc = std::path::Path::new("/proc").join(pid.to_string());
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(proc.join("fd"))?.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["net/tcp", "net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(proc.join(table)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "01" && remote_port == Some(port) && inodes.contains(*inode) {
                count += 1;
            }
        }
    }
    Ok(count)
}
