//! The control plane of the one-machine cluster: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler on loopback, with the flags a real cluster uses.
//!
//! Used by `seinode-tls local` and by the tests under `tests/`, so both exercise a real API
//! server (CRD schema and CEL rules, webhook registration through a Service, RBAC), real
//! controllers (StatefulSet, garbage collector, token and root-CA publishers, EndpointSlices,
//! namespace deletion) and a real scheduler rather than mocks. The binaries are built from Go
//! modules by `tools/control-plane/build.sh` into a cache outside the repository.
//!
//! Processes are `std::process` children so that a `ControlPlane` can outlive the async runtime
//! that started it (tests share one per test binary). They are stopped on drop, and a watchdog
//! process stops them too if this process dies without dropping it (SIGKILL, or a test binary
//! exiting with the control plane in a static).

use parking_lot::Mutex;
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt, Resource};
use seinode_tls_crds::SeiNode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use seinode_tls_testkit::{CertificateAuthority, Issued, LeafSpec, PkiError};

use crate::watchdog::Watchdog;

/// Directory holding the prebuilt binaries (see [`Binaries`]); skips the build.
pub const BIN_DIR_ENV: &str = "SEINODE_TLS_CONTROL_PLANE_BIN_DIR";
/// Field manager for everything this project applies.
pub const FIELD_MANAGER: &str = "seinode-tls";
/// File that marks a directory as a control plane's, so a stale one may be wiped.
const MARKER: &str = ".seinode-tls-control-plane";
/// How long etcd and kube-apiserver get to become ready (generous for a loaded 2-core CI box).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at starting with fresh ports when one was taken between choosing and binding.
const START_ATTEMPTS: usize = 3;
/// Log lines shown when a component fails to start.
const LOG_TAIL_LINES: usize = 25;

#[derive(Debug, Error)]
pub enum ControlPlaneError {
    #[error("no control-plane component named {0:?}")]
    UnknownComponent(String),
    #[error(
        "the control-plane binaries are not built, and {} is not there to build them; set \
         {BIN_DIR_ENV} to a directory that holds them", .script.display()
    )]
    NoBuildScript { script: PathBuf },
    #[error("failed to run {}", .script.display())]
    BuildSpawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} failed ({status}); its output is above (it needs the Go toolchain and the Go \
         module proxy)", .script.display()
    )]
    Build { script: PathBuf, status: ExitStatus },
    #[error(
        "{} has no executable {name}; set {BIN_DIR_ENV} to a directory with {}, or unset it to \
         build them", .dir.display(), Binaries::NAMES.join(", ")
    )]
    MissingBinary { dir: PathBuf, name: &'static str },
    #[error(
        "{} exists and was not made by seinode-tls; choose an empty or new directory", .dir.display()
    )]
    ForeignDir { dir: PathBuf },
    #[error(
        "{} is in use by another seinode-tls control plane (or by the clean-up after one that was \
         killed, for a few seconds); stop it, or choose another directory", .dir.display()
    )]
    InUse { dir: PathBuf },
    #[error("failed to prepare {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("failed to start {component}")]
    Spawn {
        component: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{component} exited during start-up ({status}); last lines of {}:\n{tail}", .log.display())]
    Died {
        component: &'static str,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "{component} could not bind its port {START_ATTEMPTS} times in a row (another process \
         keeps taking loopback ports); last lines of {}:\n{tail}", .log.display()
    )]
    PortClash {
        component: &'static str,
        log: PathBuf,
        tail: String,
    },
    #[error("kube-apiserver did not become ready within {timeout:?}; last lines of {}:\n{tail}", .log.display())]
    NotReady {
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("failed to load the kubeconfig {}", .path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("failed to call the API server")]
    Kube(#[from] kube::Error),
    #[error("the SeiNode CRD was not Established within {0:?}")]
    CrdNotEstablished(Duration),
    #[error(
        "kube-controller-manager did not publish the default ServiceAccount and the \
         kube-root-ca.crt ConfigMap within {timeout:?}; last lines of {}:\n{tail}", .log.display()
    )]
    ControllersNotReady {
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
}

// === Binaries ===

/// Paths of the executables built from Go modules.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
    /// The node pods' TLS front door, run by the process kubelet for its image.
    pub kube_rbac_proxy: PathBuf,
    /// Renders, lints and installs the chart in tests.
    pub helm: PathBuf,
}

impl Binaries {
    /// The file names a binaries directory holds.
    pub const NAMES: [&str; 7] = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kube-rbac-proxy",
        "helm",
    ];

    /// Finds the binaries: `$SEINODE_TLS_CONTROL_PLANE_BIN_DIR` if set, otherwise the build
    /// cache, building them first when missing (many minutes the first time; progress goes to
    /// stderr).
    pub fn locate() -> Result<Self, ControlPlaneError> {
        let dir = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => build_binaries()?,
        };
        Self::in_dir(&dir)
    }

    /// The binaries in `dir`, which must hold all of [`Binaries::NAMES`].
    pub fn in_dir(dir: &Path) -> Result<Self, ControlPlaneError> {
        let find = |name: &'static str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ControlPlaneError::MissingBinary {
                    dir: dir.to_owned(),
                    name,
                })
            }
        };
        Ok(Self {
            etcd: find("etcd")?,
            kube_apiserver: find("kube-apiserver")?,
            kube_controller_manager: find("kube-controller-manager")?,
            kube_scheduler: find("kube-scheduler")?,
            kubectl: find("kubectl")?,
            kube_rbac_proxy: find("kube-rbac-proxy")?,
            helm: find("helm")?,
        })
    }
}

/// Runs `tools/control-plane/build.sh`, which prints the cache directory on stdout.
fn build_binaries() -> Result<PathBuf, ControlPlaneError> {
    run_tools_script("control-plane/build.sh")
}

/// The directory holding cert-manager's CRDs (`cert-manager.io_certificates.yaml`, …), fetched
/// from the Go module proxy by `tools/cert-manager/crds.sh` the first time.
pub fn cert_manager_crds() -> Result<PathBuf, ControlPlaneError> {
    run_tools_script("cert-manager/crds.sh")
}

/// promtool, built from the Go module `github.com/prometheus/prometheus` by
/// `tools/promtool/build.sh` the first time (a few minutes), to test the chart's alerts.
pub fn promtool() -> Result<PathBuf, ControlPlaneError> {
    Ok(run_tools_script("promtool/build.sh")?.join("promtool"))
}

/// The kstatus probe (`tools/kstatus`: sigs.k8s.io/cli-utils' kstatus over one object on stdin),
/// built from the Go module proxy on first use and cached like the control plane.
pub fn kstatus() -> Result<PathBuf, ControlPlaneError> {
    Ok(run_tools_script("kstatus/build.sh")?.join("kstatus"))
}

/// Runs a script under `tools/` that prints a cache directory as its last line on stdout.
fn run_tools_script(name: &str) -> Result<PathBuf, ControlPlaneError> {
    // The workspace root holds `tools/`; this crate sits one level below it.
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tools")
        .join(name);
    if !script.is_file() {
        return Err(ControlPlaneError::NoBuildScript { script });
    }
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ControlPlaneError::BuildSpawn {
            script: script.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ControlPlaneError::Build {
            script,
            status: output.status,
        });
    }
    let dir = String::from_utf8_lossy(&output.stdout);
    Ok(PathBuf::from(dir.lines().last().unwrap_or_default().trim()))
}

// === Control plane ===

/// Where and how to run the control plane.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneConfig {
    /// State directory; a fresh temporary directory when `None`. Removed on drop either way.
    pub dir: Option<PathBuf>,
    /// The executables; located (and built if needed) when `None`.
    pub binaries: Option<Binaries>,
    /// Where Pods reach the API server (the Pod network's gateway): its serving certificate
    /// then covers this address too, and it is the `kubernetes` Service's endpoint. Loopback
    /// when `None`.
    pub advertise_address: Option<Ipv4Addr>,
    /// ClusterIP range of Services; [`DEFAULT_SERVICE_RANGE`] when `None`. Nothing routes it
    /// (there is no kube-proxy): names resolve to endpoints instead.
    pub service_cluster_ip_range: Option<String>,
}

/// ClusterIP range when none is given: part of RFC 2544's test range, never a real network.
pub const DEFAULT_SERVICE_RANGE: &str = "198.19.255.0/24";

/// A running control plane. Stops every component and removes its directory on drop.
pub struct ControlPlane {
    dir: PathBuf,
    binaries: Binaries,
    kubeconfig: PathBuf,
    server: String,
    port: u16,
    ca: CertificateAuthority,
    /// In start order; stopped in reverse. Locked only to restart one (the chaos tests).
    components: Mutex<Vec<(&'static str, Child)>>,
    /// How each component was started: program, arguments and log.
    recipes: Vec<Recipe>,
    watchdog: Mutex<Option<Watchdog>>,
    /// The state directory, open and locked while this control plane (then its watchdog) uses
    /// it: another one given the same directory refuses to start instead of wiping it. Last:
    /// released once the directory is gone.
    _dir_lock: File,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler, and waits until
    /// the API server reports ready and the controllers have published the default
    /// ServiceAccount and `kube-root-ca.crt`.
    pub async fn start(config: ControlPlaneConfig) -> Result<Self, ControlPlaneError> {
        let binaries = match config.binaries {
            Some(binaries) => binaries,
            None => tokio::task::block_in_place(Binaries::locate)?,
        };
        let dir = match config.dir {
            Some(dir) => dir,
            None => std::env::temp_dir().join(format!(
                "seinode-tls-cp-{}-{}",
                std::process::id(),
                unique()
            )),
        };
        let dir_lock = prepare_dir(&dir)?;
        let dir = fs::canonicalize(&dir).map_err(|source| ControlPlaneError::Io {
            path: dir.clone(),
            source,
        })?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            let network = (
                config.advertise_address,
                config.service_cluster_ip_range.as_deref(),
            );
            let error = match Self::start_once(&dir, &dir_lock, &binaries, network).await {
                Ok(cp) => return Ok(cp),
                Err(ControlPlaneError::Died {
                    component,
                    log,
                    tail,
                    ..
                }) if tail.contains("address already in use") => {
                    if attempt < START_ATTEMPTS {
                        tracing::warn!(
                            component,
                            attempt,
                            "port taken during start-up, retrying with new ports"
                        );
                        continue;
                    }
                    ControlPlaneError::PortClash {
                        component,
                        log,
                        tail,
                    }
                }
                Err(e) => e,
            };
            let _ = fs::remove_dir_all(&dir);
            return Err(error);
        }
    }

    async fn start_once(
        dir: &Path,
        dir_lock: &File,
        binaries: &Binaries,
        (advertise, service_range): (Option<Ipv4Addr>, Option<&str>),
    ) -> Result<Self, ControlPlaneError> {
        let advertise = advertise.unwrap_or(Ipv4Addr::LOCALHOST);
        let service_range = service_range.unwrap_or(DEFAULT_SERVICE_RANGE);
        let ca = CertificateAuthority::new("seinode-tls local control plane CA")?;
        let serving_ips = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(advertise)];
        let pki = Pki::issue(&ca, &dir.join("pki"), &serving_ips)?;
        let ports = Ports::choose(dir)?;
        // From here on, dropping `started` stops what runs (on any error below).
        let mut started = Self::take_over(dir, dir_lock, binaries, ca, ports.apiserver)?;
        started
            .start_api_server(&ports, &pki, advertise, service_range)
            .await?;
        started.start_controllers(&ports, &pki).await?;
        Ok(started)
    }

    /// A control plane with nothing running yet that owns `dir`: a watchdog watches the
    /// directory (and keeps it locked until it has removed it), and dropping the value stops
    /// whatever is started in it from here on.
    fn take_over(
        dir: &Path,
        dir_lock: &File,
        binaries: &Binaries,
        ca: CertificateAuthority,
        apiserver_port: u16,
    ) -> Result<Self, ControlPlaneError> {
        let mut control_plane = Self {
            dir: dir.to_owned(),
            binaries: binaries.clone(),
            kubeconfig: dir.join("kubeconfig"),
            server: format!("https://127.0.0.1:{apiserver_port}"),
            port: apiserver_port,
            ca,
            components: Mutex::default(),
            recipes: Vec::new(),
            watchdog: Mutex::new(Watchdog::spawn(dir_lock.try_clone().ok())),
            _dir_lock: dir_lock
                .try_clone()
                .map_err(|source| ControlPlaneError::Io {
                    path: dir.to_owned(),
                    source,
                })?,
        };
        if let Some(w) = control_plane.watchdog.get_mut().as_mut() {
            w.watch_dir(dir);
        }
        Ok(control_plane)
    }

    /// Starts etcd (on an empty data directory) and kube-apiserver, writes the admin
    /// kubeconfig and waits until the API server is ready.
    async fn start_api_server(
        &mut self,
        ports: &Ports,
        pki: &Pki,
        advertise: Ipv4Addr,
        service_range: &str,
    ) -> Result<(), ControlPlaneError> {
        let etcd_dir = self.dir.join("etcd");
        let _ = fs::remove_dir_all(&etcd_dir);
        let etcd_log = self.dir.join("etcd.log");
        let etcd = spawn(
            "etcd",
            &mut etcd_command(&self.binaries.etcd, ports, &etcd_dir),
            &etcd_log,
            false,
        );
        self.add(etcd)?;
        let apiserver_log = self.dir.join("kube-apiserver.log");
        let apiserver = spawn(
            "kube-apiserver",
            &mut apiserver_command(
                &self.binaries.kube_apiserver,
                ports,
                pki,
                advertise,
                service_range,
            ),
            &apiserver_log,
            false,
        );
        self.add(apiserver)?;
        let kubeconfig = kubeconfig_yaml(&self.server, &self.ca.cert_pem(), &pki.admin);
        write_private(&self.kubeconfig, &kubeconfig)?;
        self.wait_ready(&[etcd_log, apiserver_log]).await
    }

    /// Starts kube-controller-manager and kube-scheduler, each with its own identity as kubeadm
    /// runs them, and waits until the controllers have published what Pods need.
    async fn start_controllers(
        &mut self,
        ports: &Ports,
        pki: &Pki,
    ) -> Result<(), ControlPlaneError> {
        let ca_pem = self.ca.cert_pem();
        let controller_manager_kubeconfig = self.dir.join("kube-controller-manager.kubeconfig");
        write_private(
            &controller_manager_kubeconfig,
            &kubeconfig_yaml(&self.server, &ca_pem, &pki.controller_manager),
        )?;
        let scheduler_kubeconfig = self.dir.join("kube-scheduler.kubeconfig");
        write_private(
            &scheduler_kubeconfig,
            &kubeconfig_yaml(&self.server, &ca_pem, &pki.scheduler),
        )?;
        let controller_manager_log = self.dir.join("kube-controller-manager.log");
        let controller_manager = spawn(
            "kube-controller-manager",
            &mut controller_manager_command(
                &self.binaries.kube_controller_manager,
                ports.controller_manager,
                &controller_manager_kubeconfig,
                pki,
            ),
            &controller_manager_log,
            false,
        );
        self.add(controller_manager)?;
        let scheduler_log = self.dir.join("kube-scheduler.log");
        let scheduler = spawn(
            "kube-scheduler",
            &mut scheduler_command(
                &self.binaries.kube_scheduler,
                ports.scheduler,
                &scheduler_kubeconfig,
                pki,
            ),
            &scheduler_log,
            false,
        );
        self.add(scheduler)?;
        self.wait_controllers(&[controller_manager_log, scheduler_log])
            .await
    }

    /// Takes a freshly spawned component under management (stopped on drop, watched).
    fn add(
        &mut self,
        child: Result<(&'static str, Child, Recipe), ControlPlaneError>,
    ) -> Result<(), ControlPlaneError> {
        let (name, child, recipe) = child?;
        if let Some(w) = self.watchdog.get_mut().as_mut() {
            w.watch_pid(child.id());
        }
        self.components.get_mut().push((name, child));
        self.recipes.push(recipe);
        Ok(())
    }

    /// A crash of `component` (`etcd`, `kube-apiserver`, ...): SIGKILL, then, after `down`,
    /// the same command again (etcd keeps its data directory); returns once the API server
    /// reports ready again. For fault-injection tests.
    pub async fn crash_and_restart(
        &self,
        component: &str,
        down: Duration,
    ) -> Result<(), ControlPlaneError> {
        let index = self
            .recipes
            .iter()
            .position(|r| r.component == component)
            .ok_or(ControlPlaneError::UnknownComponent(component.to_owned()))?;
        {
            let mut components = self.components.lock();
            let child = &mut components[index].1;
            let _ = child.kill();
            let _ = child.wait();
        }
        tokio::time::sleep(down).await;
        let recipe = &self.recipes[index];
        let mut command = Command::new(&recipe.program);
        command.args(&recipe.args);
        let (_, child, _) = spawn(recipe.component, &mut command, &recipe.log, true)?;
        if let Some(w) = self.watchdog.lock().as_mut() {
            w.watch_pid(child.id());
        }
        self.components.lock()[index].1 = child;
        let client = client_from_kubeconfig(&self.kubeconfig).await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if is_ready(&client).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ControlPlaneError::NotReady {
                    timeout: READY_TIMEOUT,
                    log: recipe.log.clone(),
                    tail: log_tail(&recipe.log),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A component that exited, with its log's tail, as an error.
    fn exited(&mut self, logs: &[PathBuf]) -> Option<ControlPlaneError> {
        let components = self.components.get_mut();
        for ((component, child), log) in components.iter_mut().rev().zip(logs.iter().rev()) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(ControlPlaneError::Died {
                    component,
                    status,
                    log: log.clone(),
                    tail: log_tail(log),
                });
            }
        }
        None
    }

    /// Waits for the API server's `/readyz`; `logs` are the components' so far, in order.
    async fn wait_ready(&mut self, logs: &[PathBuf]) -> Result<(), ControlPlaneError> {
        let client = client_from_kubeconfig(&self.kubeconfig).await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(e) = self.exited(logs) {
                return Err(e);
            }
            if is_ready(&client).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ControlPlaneError::NotReady {
                    timeout: READY_TIMEOUT,
                    log: logs.last().cloned().unwrap_or_default(),
                    tail: logs.last().map(|l| log_tail(l)).unwrap_or_default(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until kube-controller-manager runs: its ServiceAccount controller made `default`
    /// in `default`, and its root-CA publisher made `kube-root-ca.crt` there. `logs` are those
    /// of the components started after the API server.
    async fn wait_controllers(&mut self, logs: &[PathBuf]) -> Result<(), ControlPlaneError> {
        use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
        let client = client_from_kubeconfig(&self.kubeconfig).await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let config_maps: Api<ConfigMap> = Api::namespaced(client, "default");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // The logs line up with the last components, which `exited` walks from the end.
            if let Some(e) = self.exited(logs) {
                return Err(e);
            }
            if matches!(accounts.get_opt("default").await, Ok(Some(_)))
                && matches!(config_maps.get_opt("kube-root-ca.crt").await, Ok(Some(_)))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = logs.first().cloned().unwrap_or_default();
                return Err(ControlPlaneError::ControllersNotReady {
                    timeout: READY_TIMEOUT,
                    tail: log_tail(&log),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The admin kubeconfig (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The API server's port (on loopback, and on the advertise address when forwarded).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// The CA the API server's certificate chains to; also usable for webhook certificates.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// A client for the current async runtime, authenticated as the admin.
    pub async fn client(&self) -> Result<Client, ControlPlaneError> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// The admin's client configuration.
    pub async fn config(&self) -> Result<Config, ControlPlaneError> {
        config_from_kubeconfig(&self.kubeconfig).await
    }

    /// `kubectl` with `KUBECONFIG` set to this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig).stdin(Stdio::null());
        cmd
    }

    /// Issues a serving certificate signed by this control plane's CA (for local webhooks).
    pub fn issue_serving_certificate(
        &self,
        common_name: &str,
        dns_names: &[&str],
    ) -> Result<Issued, ControlPlaneError> {
        Ok(self.ca.issue(&LeafSpec {
            common_name,
            dns_names,
            ip_addresses: &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            server: true,
            ..LeafSpec::default()
        })?)
    }

    /// Issues the controller's client certificate for the node proxies (user
    /// [`SIDECAR_CLIENT_USER`]) from a CA of its own, never the API server's (so the
    /// certificate is worthless against the API server), and writes the certificate, key and
    /// CA into the state directory. Each call makes a new CA.
    pub fn write_sidecar_client(&self) -> Result<SidecarClientPaths, ControlPlaneError> {
        let ca = CertificateAuthority::new("seinode-tls local sidecar client CA")?;
        let issued = ca.issue(&LeafSpec {
            common_name: SIDECAR_CLIENT_USER,
            client: true,
            ..LeafSpec::default()
        })?;
        let dir = self.dir.join(format!("sidecar-client-{}", unique()));
        let io = |path: &Path, source| ControlPlaneError::Io {
            path: path.to_owned(),
            source,
        };
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let paths = SidecarClientPaths {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            ca_file: dir.join("ca.crt"),
        };
        for (path, text) in [
            (&paths.cert_file, &issued.cert_pem),
            (&paths.key_file, &issued.key_pem),
            (&paths.ca_file, &ca.cert_pem()),
        ] {
            fs::write(path, text).map_err(|e| io(path, e))?;
        }
        Ok(paths)
    }

    /// Process ids of the components, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.components.lock().iter().map(|(_, c)| c.id()).collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let components = self.components.get_mut();
        for (_, child) in components.iter_mut().rev() {
            stop(child);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "failed to remove control-plane directory");
        }
    }
}

/// Whether the API server answers `/readyz` with ok.
async fn is_ready(client: &Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client
        .request_text(request)
        .await
        .is_ok_and(|body| body.trim() == "ok")
}

/// A client for the cluster described by a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, ControlPlaneError> {
    Ok(Client::try_from(config_from_kubeconfig(path).await?)?)
}

/// The client configuration in a kubeconfig file.
pub async fn config_from_kubeconfig(path: &Path) -> Result<Config, ControlPlaneError> {
    let kubeconfig =
        Kubeconfig::read_from(path).map_err(|source| ControlPlaneError::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| ControlPlaneError::Kubeconfig {
            path: path.to_owned(),
            source,
        })
}

/// Server-side applies `object` with this project's field manager.
pub async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

/// The user the controller's sidecar client certificate names (what the node proxies see).
pub const SIDECAR_CLIENT_USER: &str = "seinode-tls:sidecar-client";

/// Files of the controller's sidecar client identity (see
/// [`ControlPlane::write_sidecar_client`]).
#[derive(Debug, Clone)]
pub struct SidecarClientPaths {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// What the chart grants in a cluster, for the one-machine cluster without it: the node pods'
/// ServiceAccounts may ask for TokenReviews and SubjectAccessReviews (kube-rbac-proxy's
/// `system:auth-delegator`; here every ServiceAccount's, the tests making namespaces at will),
/// and [`SIDECAR_CLIENT_USER`] may create and get `seinodetasks` (the sidecar-client role).
pub async fn install_sidecar_rbac(client: &Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let binding = |name: &str, role: &str, subject: Subject| ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: role.to_owned(),
        },
        subjects: Some(vec![subject]),
    };
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some("seinode-tls-local-sidecar-client".to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["sei.io".to_owned()]),
            resources: Some(vec!["seinodetasks".to_owned()]),
            verbs: vec!["create".to_owned(), "get".to_owned(), "list".to_owned()],
            ..PolicyRule::default()
        }]),
        ..ClusterRole::default()
    };
    apply(&Api::all(client.clone()), &role).await?;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    apply(
        &bindings,
        &binding(
            "seinode-tls-local-sidecar-client",
            "seinode-tls-local-sidecar-client",
            Subject {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "User".to_owned(),
                name: SIDECAR_CLIENT_USER.to_owned(),
                namespace: None,
            },
        ),
    )
    .await?;
    apply(
        &bindings,
        &binding(
            "seinode-tls-local-node-auth-delegator",
            "system:auth-delegator",
            Subject {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "Group".to_owned(),
                name: "system:serviceaccounts".to_owned(),
                namespace: None,
            },
        ),
    )
    .await?;
    Ok(())
}

/// Installs (or updates) the SeiNode CRD and waits until it is Established.
pub async fn install_crd(client: &Client) -> Result<(), ControlPlaneError> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = SeiNode::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    apply(&api, &crd).await?;
    let established = kube::runtime::wait::await_condition(
        api,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    );
    match tokio::time::timeout(TIMEOUT, established).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(ControlPlaneError::CrdNotEstablished(TIMEOUT)),
    }
}

// === Components ===

/// The control plane's certificates and keys, written into its `pki` directory (which the API
/// server, the controller manager and the scheduler also use as their `--cert-dir`).
struct Pki {
    dir: PathBuf,
    ca_file: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_pub: PathBuf,
    /// Client identities: the admin (`system:masters`) and the two components.
    admin: Issued,
    controller_manager: Issued,
    scheduler: Issued,
}

impl Pki {
    /// Issues from `ca` the API server's serving certificate (its Service names and
    /// `serving_ips`) and the client certificates, makes the service-account signing key, and
    /// writes what the components read into `dir`.
    fn issue(
        ca: &CertificateAuthority,
        dir: &Path,
        serving_ips: &[IpAddr],
    ) -> Result<Self, ControlPlaneError> {
        fs::create_dir_all(dir).map_err(|source| ControlPlaneError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let serving = ca.issue(&LeafSpec {
            common_name: "kube-apiserver",
            dns_names: &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses: serving_ips,
            server: true,
            ..LeafSpec::default()
        })?;
        let client = |common_name: &str, organizations: &[&str]| {
            ca.issue(&LeafSpec {
                common_name,
                organizations,
                client: true,
                ..LeafSpec::default()
            })
        };
        let service_account_key = rcgen::KeyPair::generate()
            .map_err(|source| PkiError::new("service-account signing key", source))?;
        let write = |name: &str, contents: &str| -> Result<PathBuf, ControlPlaneError> {
            let path = dir.join(name);
            write_private(&path, contents)?;
            Ok(path)
        };
        Ok(Self {
            dir: dir.to_owned(),
            ca_file: write("ca.crt", &ca.cert_pem())?,
            serving_cert: write("apiserver.crt", &serving.cert_pem)?,
            serving_key: write("apiserver.key", &serving.key_pem)?,
            service_account_key: write(
                "service-account.key",
                &service_account_key.serialize_pem(),
            )?,
            service_account_pub: write(
                "service-account.pub",
                &service_account_key.public_key_pem(),
            )?,
            admin: client("seinode-tls-admin", &["system:masters"])?,
            controller_manager: client("system:kube-controller-manager", &[])?,
            scheduler: client("system:kube-scheduler", &[])?,
        })
    }
}

/// The components' loopback ports, free a moment ago (see [`free_port`]).
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

impl Ports {
    fn choose(dir: &Path) -> Result<Self, ControlPlaneError> {
        Ok(Self {
            etcd_client: free_port(dir)?,
            etcd_peer: free_port(dir)?,
            apiserver: free_port(dir)?,
            controller_manager: free_port(dir)?,
            scheduler: free_port(dir)?,
        })
    }

    /// Where etcd serves its clients (the API server).
    fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_client)
    }
}

/// A one-member etcd on loopback, without fsync (its data dies with the control plane).
fn etcd_command(binary: &Path, ports: &Ports, data_dir: &Path) -> Command {
    let client_url = ports.etcd_url();
    let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
    let mut command = Command::new(binary);
    command
        .arg("--name=seinode-tls")
        .arg(format!("--data-dir={}", data_dir.display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=seinode-tls={peer_url}"))
        .arg("--unsafe-no-fsync=true")
        .arg("--log-level=warn");
    command
}

/// kube-apiserver on loopback with RBAC, client certificates and service-account tokens, as a
/// real cluster runs it.
fn apiserver_command(
    binary: &Path,
    ports: &Ports,
    pki: &Pki,
    advertise: Ipv4Addr,
    service_range: &str,
) -> Command {
    let mut command = Command::new(binary);
    command
        .arg(format!("--etcd-servers={}", ports.etcd_url()))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--advertise-address={advertise}"))
        // Webhooks and aggregated APIs that name a Service are called at its endpoints
        // (there is no kube-proxy to route a ClusterIP).
        .arg("--enable-aggregator-routing=true")
        .arg(format!("--secure-port={}", ports.apiserver))
        .arg(format!("--cert-dir={}", pki.dir.display()))
        .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.serving_key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca_file.display()))
        .arg("--authorization-mode=RBAC")
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}",
            pki.service_account_pub.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.service_account_key.display()
        ))
        .arg(format!("--service-cluster-ip-range={service_range}"))
        .arg("--profiling=false")
        .arg("--v=1");
    command
}

/// The arguments kube-controller-manager and kube-scheduler share: their identity (for the API
/// server, and to authenticate and authorize their own callers), their port on loopback, and
/// no leader election (there is one of each).
fn component_command(binary: &Path, port: u16, kubeconfig: &Path, cert_dir: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!(
            "--authentication-kubeconfig={}",
            kubeconfig.display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            kubeconfig.display()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", cert_dir.display()))
        .arg("--leader-elect=false")
        .arg("--profiling=false")
        .arg("--v=1");
    command
}

/// kube-controller-manager with every controller, one ServiceAccount each (as kubeadm runs it)
/// and the CA that the root-CA publisher hands to Pods.
fn controller_manager_command(binary: &Path, port: u16, kubeconfig: &Path, pki: &Pki) -> Command {
    let mut command = component_command(binary, port, kubeconfig, &pki.dir.join("kcm"));
    command
        .arg(format!("--client-ca-file={}", pki.ca_file.display()))
        .arg("--controllers=*")
        .arg(format!("--root-ca-file={}", pki.ca_file.display()))
        .arg(format!(
            "--service-account-private-key-file={}",
            pki.service_account_key.display()
        ))
        .arg("--use-service-account-credentials=true");
    command
}

fn scheduler_command(binary: &Path, port: u16, kubeconfig: &Path, pki: &Pki) -> Command {
    component_command(binary, port, kubeconfig, &pki.dir.join("scheduler"))
}

// === Helpers ===

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Creates `dir`, or empties it when a previous control plane left it behind.
fn prepare_dir(dir: &Path) -> Result<File, ControlPlaneError> {
    let io = |source| ControlPlaneError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    // Locked before anything in it is touched; emptied, not removed, so the lock stays on it.
    let lock = File::open(dir).map_err(io)?;
    if lock.try_lock().is_err() {
        return Err(ControlPlaneError::InUse {
            dir: dir.to_owned(),
        });
    }
    let entries: Vec<fs::DirEntry> = fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    if !entries.is_empty() && !dir.join(MARKER).is_file() {
        return Err(ControlPlaneError::ForeignDir {
            dir: dir.to_owned(),
        });
    }
    for entry in entries {
        let path = entry.path();
        let removed = if entry.file_type().map_err(io)?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|source| ControlPlaneError::Io { path, source })?;
    }
    fs::write(
        dir.join(MARKER),
        "state of a seinode-tls control plane; removed when it stops\n",
    )
    .map_err(io)?;
    Ok(lock)
}

/// Writes a file readable by its owner only (keys, kubeconfig).
pub fn write_private(path: &Path, contents: &str) -> Result<(), ControlPlaneError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ControlPlaneError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)
}

/// A loopback port that was free a moment ago. A clash with another process is still possible;
/// `ControlPlane::start` retries with fresh ports when a component reports its port taken.
fn free_port(dir: &Path) -> Result<u16, ControlPlaneError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| ControlPlaneError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// How a component was started, to start it again.
struct Recipe {
    component: &'static str,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
}

fn spawn(
    component: &'static str,
    command: &mut Command,
    log: &Path,
    append: bool,
) -> Result<(&'static str, Child, Recipe), ControlPlaneError> {
    let io = |source| ControlPlaneError::Io {
        path: log.to_owned(),
        source,
    };
    let out = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .map_err(io)?;
    let recipe = Recipe {
        component,
        program: PathBuf::from(command.get_program()),
        args: command.get_args().map(ToOwned::to_owned).collect(),
        log: log.to_owned(),
    };
    let err = out.try_clone().map_err(io)?;
    // A group of its own: a terminal's Ctrl-C reaches only the owner, which stops the
    // components in order (the kubelet still needs the API server while it stops Pods).
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map(|child| (component, child, recipe))
        .map_err(|source| ControlPlaneError::Spawn { component, source })
}

/// Stops a child: SIGTERM, a grace period, then SIGKILL.
fn stop(child: &mut Child) {
    const GRACE: Duration = Duration::from_secs(5);
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let Ok(mut file) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut text = String::new();
    let _ = BufReader::new(file).read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, admin: &Issued) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: seinode-tls-local
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: seinode-tls-local
  context:
    cluster: seinode-tls-local
    user: admin
current-context: seinode-tls-local
",
        ca = BASE64.encode(ca_pem),
        cert = BASE64.encode(&admin.cert_pem),
        key = BASE64.encode(&admin.key_pem),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two control planes given one state directory: the second refuses it while the first
    /// (or its watchdog) holds it, instead of wiping the first's etcd; once free, a stale
    /// directory of ours is emptied and reused, and one that is not ours is left alone.
    #[test]
    fn a_state_directory_is_used_by_one_control_plane_at_a_time() {
        let root = std::env::temp_dir().join(format!("seinode-tls-dir-lock-{}", unique()));
        let dir = root.join("state");
        let first = prepare_dir(&dir).unwrap();
        fs::write(dir.join("etcd-data"), "live").unwrap();
        let second = prepare_dir(&dir);
        assert!(
            matches!(second, Err(ControlPlaneError::InUse { .. })),
            "{second:?}"
        );
        assert!(
            dir.join("etcd-data").is_file(),
            "the live state was touched"
        );

        drop(first);
        let again = prepare_dir(&dir).unwrap();
        assert!(!dir.join("etcd-data").exists(), "a stale state is emptied");
        assert!(dir.join(MARKER).is_file());
        drop(again);

        let foreign = root.join("foreign");
        fs::create_dir_all(&foreign).unwrap();
        fs::write(foreign.join("notes"), "mine").unwrap();
        let refused = prepare_dir(&foreign);
        assert!(
            matches!(refused, Err(ControlPlaneError::ForeignDir { .. })),
            "{refused:?}"
        );
        assert!(foreign.join("notes").is_file());
        fs::remove_dir_all(&root).unwrap();
    }
}
