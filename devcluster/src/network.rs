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

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use thiserror::Error;

/// Directory of the per-range lock files.
const LOCK_DIR: &str = "/run/seinode-tls";
/// Prefix of the bridges and namespaces made here (bridge `sntls<i>`, netns `sntls<i>-<n>`;
/// the host ends of the veths are `snv<i>-<n>`).
pub const NAME_PREFIX: &str = "sntls";
/// Prefix of the host ends of the Pods' veths: `snv<i>-<n>`.
const VETH_PREFIX: &str = "snv";

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
            if let Some(taken) = host_use_of_range(index) {
                tracing::warn!(index, %taken, "the host already uses this Pod address range; trying the next");
                continue;
            }
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
            let mut pool = self.pool.lock();
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
            host_veth: format!("{VETH_PREFIX}{}-{n}", self.index),
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
        let mut pool = self.pool.lock();
        if let Some(octet) = self.ip.octets().get(3) {
            pool.used.remove(octet);
        }
    }
}

/// Removes everything under `index`: processes in its namespaces, the namespaces, the host ends
/// of their veths, the bridge and the unreachable routes. What the watchdog does from its shell
/// script, too.
fn clean_up(index: u8) {
    let prefix = format!("{NAME_PREFIX}{index}-");
    for ns in ip_stdout(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&prefix))
    {
        remove_netns(ns);
    }
    // A namespace goes (and its veth with it) only once its last process has exited, which the
    // kernel finishes later: the host ends are deleted here, so the names are free on return.
    let veth_prefix = format!("{VETH_PREFIX}{index}-");
    for link in link_names(&ip_stdout(&["-o", "link", "show"])) {
        if link.starts_with(&veth_prefix) {
            let _ = ip(&["link", "del", link]);
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

/// What the host has in `198.18.<index>.0/24` or `198.19.<index>.0/24` (an address, or a route
/// at least as specific as those /24s), which would compete with the Pod network's routes and
/// could take its traffic off the machine; `None` when the ranges are free.
fn host_use_of_range(index: u8) -> Option<String> {
    range_conflict(
        &ip_stdout(&["-4", "-o", "route", "show", "table", "all"]),
        &ip_stdout(&["-4", "-o", "addr", "show"]),
        index,
    )
}

/// [`host_use_of_range`] over the output of `ip -4 -o route show table all` and
/// `ip -4 -o addr show`.
fn range_conflict(routes: &str, addresses: &str, index: u8) -> Option<String> {
    let ours = |ip: Ipv4Addr| {
        let [a, b, c, _] = ip.octets();
        a == 198 && (b == 18 || b == 19) && c == index
    };
    let prefix = |text: &str| -> Option<(Ipv4Addr, u8)> {
        let (ip, len) = text.split_once('/').unwrap_or((text, "32"));
        Some((ip.parse().ok()?, len.parse().ok()?))
    };
    const ROUTE_TYPES: [&str; 9] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "anycast",
        "unreachable",
        "blackhole",
        "prohibit",
        "throw",
    ];
    for line in routes.lines() {
        let mut words = line.split_whitespace();
        let Some(mut destination) = words.next() else {
            continue;
        };
        if ROUTE_TYPES.contains(&destination) {
            destination = words.next().unwrap_or_default();
        }
        if let Some((ip, len)) = prefix(destination)
            && len >= 24
            && ours(ip)
        {
            return Some(format!("route {}", line.trim()));
        }
    }
    for line in addresses.lines() {
        let mut words = line.split_whitespace();
        if words.by_ref().any(|w| w == "inet")
            && let Some((ip, _)) = words.next().and_then(prefix)
            && ours(ip)
        {
            return Some(format!("address {}", line.trim()));
        }
    }
    None
}

/// Kills every process in network namespace `ns` (a namespace that only loses its name would
/// hide them from every later clean-up), again while any is left (one may fork meanwhile) for
/// at most [`KILL_DEADLINE`], then deletes it.
fn remove_netns(ns: &str) {
    let deadline = std::time::Instant::now() + KILL_DEADLINE;
    loop {
        let pids: Vec<i32> = ip_stdout(&["netns", "pids", ns])
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect();
        if pids.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(KILL_POLL);
    }
    let _ = ip(&["netns", "del", ns]);
}

/// How long [`remove_netns`] keeps killing what runs in a namespace, and how often it looks.
const KILL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
const KILL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The shell form of [`clean_up`], for the watchdog: `$1` is the index.
pub(crate) const CLEAN_UP_SCRIPT: &str = r#"for ns in $(ip netns list | awk -v p="sntls$1-" 'index($1, p) == 1 { print $1 }'); do
  tries=0
  while pids=$(ip netns pids "$ns" 2>/dev/null); [ -n "$pids" ] && [ "$tries" -lt 250 ]; do
    kill -KILL $pids 2>/dev/null; sleep 0.02; tries=$((tries + 1))
  done
  ip netns del "$ns" 2>/dev/null
done
for link in $(ip -o link show | awk -F': ' '{ split($2, n, "@"); print n[1] }' | awk -v p="snv$1-" 'index($1, p) == 1'); do
  ip link del "$link" 2>/dev/null
done
ip link del "sntls$1" 2>/dev/null
ip route del unreachable "198.18.$1.0/24" metric 4000 2>/dev/null
ip route del unreachable "198.19.$1.0/24" metric 4000 2>/dev/null"#;

/// Whether `ip` is in the Pod network (the /24) of `member`, an address in it.
pub fn in_pod_network(ip: Ipv4Addr, member: Ipv4Addr) -> bool {
    ip.octets()[..3] == member.octets()[..3]
}

/// Whether `ip` may be a Pod's address in the Pod network of `gateway`: in its /24, and not
/// the gateway (the host) itself. What `local` and the tests let the controller dial.
pub fn is_pod_address(ip: std::net::IpAddr, gateway: Ipv4Addr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => in_pod_network(ip, gateway) && ip != gateway,
        std::net::IpAddr::V6(_) => false,
    }
}

/// What `ip args` printed; empty if it could not run.
fn ip_stdout(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// The interface names in the output of `ip -o link show`, without a veth's `@peer`.
fn link_names(text: &str) -> impl Iterator<Item = &str> {
    // "12: snv0-7@if3: <BROADCAST,...> ..."
    text.lines()
        .filter_map(|line| line.split(": ").nth(1)?.split('@').next())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_of_the_pod_network_are_pod_addresses() {
        let gateway = Ipv4Addr::new(198, 18, 3, 1);
        let at = |ip: [u8; 4]| std::net::IpAddr::from(Ipv4Addr::from(ip));
        assert!(is_pod_address(at([198, 18, 3, 7]), gateway));
        assert!(!is_pod_address(at([198, 18, 3, 1]), gateway), "the host");
        assert!(
            !is_pod_address(at([198, 18, 4, 7]), gateway),
            "another run's Pods"
        );
        assert!(!is_pod_address(at([10, 0, 0, 7]), gateway));
        assert!(!is_pod_address(
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            gateway
        ));
    }

    /// The first word of each line `ip args` printed (a namespace, a PID).
    fn names(args: &[&str]) -> Vec<String> {
        ip_stdout(args)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_range_the_host_uses_is_not_taken() {
        let routes = "default via 10.0.0.1 dev eth0 proto dhcp src 10.0.0.5 metric 100\n\
                      10.0.0.0/24 dev eth0 proto kernel scope link src 10.0.0.5\n\
                      198.18.0.0/15 via 10.0.0.1 dev eth0\n\
                      local 10.0.0.5 dev eth0 table local proto kernel scope host src 10.0.0.5\n";
        let addresses = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                         2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n";
        // A broader route loses to the Pod network's /24.
        assert_eq!(range_conflict(routes, addresses, 0), None);
        let vpn = format!("{routes}198.19.7.0/24 dev tun0 scope link\n");
        assert!(range_conflict(&vpn, addresses, 7).is_some_and(|c| c.contains("tun0")));
        assert_eq!(range_conflict(&vpn, addresses, 6), None);
        let host = "unreachable 198.18.2.9 metric 10\n";
        assert!(range_conflict(host, addresses, 2).is_some());
        let address = format!("{addresses}3: eth1    inet 198.18.4.20/16 scope global eth1\n");
        assert!(range_conflict(routes, &address, 4).is_some_and(|c| c.contains("eth1")));
        assert_eq!(range_conflict(routes, &address, 5), None);
    }

    /// Needs root and iproute2, as every cluster test does. A range is handed back only once
    /// nothing of it is left: its lock then lets the next process reuse its names at once.
    #[test]
    fn a_dropped_network_leaves_no_namespace_veth_bridge_or_process() {
        let network = PodNetwork::create().unwrap();
        let index = network.index();
        let sandbox = network.sandbox("clean-up-test").unwrap();
        // A process in the Pod's namespace that has forked: both must go.
        let mut pod = Command::new("ip")
            .args(["netns", "exec", &sandbox.netns, "sh", "-c"])
            .arg("sleep 300 & exec sleep 300")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while names(&["netns", "pids", &sandbox.netns]).len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the Pod never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Dropped without removing the sandbox, as after a crash of its kubelet.
        drop(network);
        assert!(!pod.wait().unwrap().success(), "the Pod was not killed");
        let netns = format!("{NAME_PREFIX}{index}-");
        let veth = format!("{VETH_PREFIX}{index}-");
        let bridge = format!("{NAME_PREFIX}{index}");
        assert!(
            !names(&["netns", "list"])
                .iter()
                .any(|n| n.starts_with(&netns)),
            "a namespace is left"
        );
        let shown = ip_stdout(&["-o", "link", "show"]);
        let links: Vec<&str> = link_names(&shown).collect();
        assert!(links.contains(&"lo"), "links not read: {links:?}");
        assert!(
            !links.iter().any(|l| l.starts_with(&veth) || *l == bridge),
            "links left: {links:?}"
        );
    }
}
