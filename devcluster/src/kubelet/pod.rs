//! One worker per pod: sandbox, volumes, init containers in order, then the containers with
//! their probes and restarts, status reporting, and graceful termination.
//!
//! Container tasks own their process and record what they do in a [`ContainerRecord`]; the
//! pod worker turns the records into the pod's status and is the only writer of it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, PersistentVolume,
    PersistentVolumeClaim, Pod, PodStatus, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use nix::sys::signal::Signal;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::KubeletConfig;
use super::dns::{Names, OwnName};
use super::env::{ConfigError, EnvContext, ObjectSource, command_line, container_env, expand};
use super::images::{Image, ImageFile};
use super::probe::{self, ProbePlan};
use super::runtime::{self, Mount, ProcessSpec};
use super::status::{
    BACKOFF_RESET, ContainerRecord, StatusInput, backoff, crash_loop_message, pod_status,
    terminated, waiting,
};
use super::storage::volume_dir;
use super::volumes::{TokenKey, VolumeKind, token_keys, volume_kind, write_atomic};
use crate::network::{PodNetwork, Sandbox};

/// How often volumes are re-synced even without a Secret or ConfigMap event (tokens, claims).
const VOLUME_RESYNC: Duration = Duration::from_secs(10);
/// Grace period cap when the kubelet itself stops (not a pod deletion).
pub const STOP_GRACE_CAP: Duration = Duration::from_secs(10);
/// Longest wait between retries of a container that cannot be configured yet.
const CONFIG_RETRY_CAP: Duration = Duration::from_secs(20);

// === Shared state ===

/// What every pod worker shares.
pub(super) struct Shared {
    pub client: Client,
    pub network: Arc<PodNetwork>,
    pub config: KubeletConfig,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    /// Bumped whenever a Secret or ConfigMap changes.
    pub objects_changed: watch::Receiver<u64>,
    pub names: Arc<Names>,
    /// Process groups of every running container, for a synchronous kill on drop.
    pub pids: Mutex<std::collections::BTreeSet<u32>>,
    /// Sandboxes of running pods, for removal on drop.
    pub sandboxes: Mutex<BTreeMap<String, Arc<Sandbox>>>,
}

impl Shared {
    pub fn gateway(&self) -> Ipv4Addr {
        self.network.gateway()
    }
}

impl ObjectSource for Shared {
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.secrets
            .get(&ObjectRef::new(name).within(namespace))
            .map(|s| (*s).clone())
    }

    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        self.config_maps
            .get(&ObjectRef::new(name).within(namespace))
            .map(|c| (*c).clone())
    }
}

/// The latest view of a pod from the watch.
#[derive(Debug, Clone)]
pub(super) struct PodUpdate {
    pub pod: Arc<Pod>,
    /// The pod is gone from the API.
    pub gone: bool,
}

/// The directory name of a pod, as the kubelet's log directories are named.
pub fn pod_dir_name(pod: &Pod) -> String {
    format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// The pod's hostname: `spec.hostname`, else its name, at most 63 characters.
pub fn pod_hostname(pod: &Pod) -> String {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.'])
        .to_owned()
}

// === Pod worker ===

/// Host directory of each volume, and whether it is always mounted read-only.
type VolumePaths = BTreeMap<String, (PathBuf, bool)>;

/// Which pod, as the API names it.
#[derive(Debug)]
struct PodId {
    uid: String,
    namespace: String,
    name: String,
}

impl PodId {
    fn of(pod: &Pod) -> Self {
        Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// One running pod's fixed facts and channels.
struct PodRun {
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    id: PodId,
    dir: PathBuf,
    ip: Ipv4Addr,
    netns: String,
    hostname: String,
    /// `None` until the first sync; then the volume paths or why they are not ready.
    volumes: watch::Sender<Option<Result<VolumePaths, String>>>,
    /// Poked whenever a container record changes.
    changed: Notify,
}

impl PodRun {
    fn new(shared: Arc<Shared>, pod: Arc<Pod>, id: PodId, dir: PathBuf, sandbox: &Sandbox) -> Self {
        Self {
            hostname: pod_hostname(&pod),
            shared,
            pod,
            id,
            dir,
            ip: sandbox.ip,
            netns: sandbox.netns.clone(),
            volumes: watch::Sender::new(None),
            changed: Notify::new(),
        }
    }

    fn context(&self) -> EnvContext<'_> {
        EnvContext {
            pod: &self.pod,
            pod_ip: self.ip,
            host_ip: self.shared.gateway(),
            hostname: &self.hostname,
            apiserver_host: self.shared.config.apiserver_host,
            apiserver_port: self.shared.config.apiserver_port,
        }
    }

    fn grace(&self) -> Duration {
        let seconds = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
    }

    /// Makes the pod's name resolve to its address (and its hostname and subdomain, in its own
    /// `/etc/hosts`).
    fn register_name(&self) {
        self.shared.names.register(
            &self.id.uid,
            OwnName {
                namespace: self.id.namespace.clone(),
                ip: self.ip,
                hostname: self.hostname.clone(),
                subdomain: self.pod.spec.as_ref().and_then(|s| s.subdomain.clone()),
            },
            self.dir.join("etc-hosts"),
            self.shared.gateway(),
            &self.shared.config.cluster_domain,
        );
    }
}

/// Runs the pod until it is deleted, gone, or the kubelet stops.
pub(super) async fn run_pod(
    shared: Arc<Shared>,
    mut updates: watch::Receiver<PodUpdate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let pod = updates.borrow().pod.clone();
    let id = PodId::of(&pod);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) || pod.metadata.deletion_timestamp.is_some() {
        // Nothing of it runs here (finished before this kubelet started, or deleted first).
        if wait_for_deletion(&mut updates, &mut shutdown).await {
            delete_from_api(&shared.client, &id).await;
        }
        return;
    }
    let dir = shared.config.dir.join("pods").join(pod_dir_name(&pod));
    if let Err(error) = std::fs::create_dir_all(&dir) {
        tracing::error!(%error, namespace = %id.namespace, name = %id.name, "failed to create the pod directory");
        return;
    }
    let Some(sandbox) = make_sandbox(&shared, &id, &mut updates, &mut shutdown).await else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let run = Arc::new(PodRun::new(shared, pod, id, dir, &sandbox));
    run.register_name();
    let deleted = run_containers(&run, &mut updates, &mut shutdown).await;
    tear_down(&run, &sandbox, deleted).await;
}

/// The pod's network sandbox, retried with back-off until it is made. `None` when the pod is
/// deleted (then removed from the API) or the kubelet stops before.
async fn make_sandbox(
    shared: &Shared,
    id: &PodId,
    updates: &mut watch::Receiver<PodUpdate>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Arc<Sandbox>> {
    let (namespace, name) = (&id.namespace, &id.name);
    let mut failures = 0;
    let sandbox = loop {
        let network = shared.network.clone();
        let uid = id.uid.clone();
        match tokio::task::spawn_blocking(move || network.sandbox(&uid)).await {
            Ok(Ok(sandbox)) => break Arc::new(sandbox),
            Ok(Err(error)) => {
                tracing::warn!(%error, %namespace, %name, "failed to create the pod sandbox");
            }
            Err(error) => tracing::warn!(%error, "sandbox task failed"),
        }
        let delay = backoff(Duration::from_secs(1), failures).min(CONFIG_RETRY_CAP);
        failures += 1;
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            deleted = wait_for_deletion(updates, shutdown) => {
                if deleted {
                    delete_from_api(&shared.client, id).await;
                }
                return None;
            }
        }
    };
    if let Ok(mut sandboxes) = shared.sandboxes.lock() {
        sandboxes.insert(id.uid.clone(), sandbox.clone());
    }
    tracing::info!(%namespace, %name, ip = %sandbox.ip, netns = %sandbox.netns, "pod sandbox ready");
    Some(sandbox)
}

/// Runs the pod's containers, keeping its volumes and status current, until the pod is
/// deleted, gone, or the kubelet stops; then stops the containers. Returns whether the pod is
/// being deleted (its final status written).
async fn run_containers(
    run: &Arc<PodRun>,
    updates: &mut watch::Receiver<PodUpdate>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut status = StatusWriter::new(&run.pod);
    let (stop_tx, stop_rx) = watch::channel::<Option<Duration>>(None);
    let mut tokens = TokenCache::default();
    sync_volumes(run, &mut tokens).await;
    let mut lifecycle = tokio::spawn(lifecycle(run.clone(), status.records.clone(), stop_rx));
    let ending = follow(
        run,
        &mut status,
        &mut tokens,
        &mut lifecycle,
        updates,
        shutdown,
    )
    .await;
    let _ = stop_tx.send(Some(ending.grace(run)));
    if !ending.lifecycle_done {
        let _ = lifecycle.await;
    }
    if ending.deleted {
        status.write(run, &ending.latest).await;
    }
    ending.deleted
}

/// Why and how [`follow`] ended.
struct Ending {
    /// The pod as last seen.
    latest: Arc<Pod>,
    /// It is being deleted (else it is gone from the API, or the kubelet stops).
    deleted: bool,
    /// The containers had all ended by themselves.
    lifecycle_done: bool,
}

impl Ending {
    /// How long the containers get to stop: the deletion's grace period, else the pod's,
    /// capped when the kubelet itself stops.
    fn grace(&self, run: &PodRun) -> Duration {
        if self.deleted {
            self.latest
                .metadata
                .deletion_grace_period_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or_else(|| run.grace(), Duration::from_secs)
        } else {
            run.grace().min(STOP_GRACE_CAP)
        }
    }
}

/// Writes the status whenever a container record changes and re-syncs the volumes (on a
/// Secret or ConfigMap change, and every [`VOLUME_RESYNC`]) until the pod is to stop.
async fn follow(
    run: &PodRun,
    status: &mut StatusWriter,
    tokens: &mut TokenCache,
    lifecycle: &mut tokio::task::JoinHandle<()>,
    updates: &mut watch::Receiver<PodUpdate>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ending {
    let (namespace, name) = (&run.id.namespace, &run.id.name);
    let mut objects_changed = run.shared.objects_changed.clone();
    let mut resync = tokio::time::interval(VOLUME_RESYNC);
    resync.tick().await;
    let mut latest = run.pod.clone();
    let mut lifecycle_done = false;
    let deleted = loop {
        status.write(run, &latest).await;
        tokio::select! {
            () = run.changed.notified() => {
                // Let a burst of changes settle into one write.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    break false;
                }
                let update = updates.borrow_and_update().clone();
                latest = update.pod.clone();
                if update.gone {
                    tracing::info!(%namespace, %name, "pod is gone from the API; stopping it");
                    break false;
                }
                if update.pod.metadata.deletion_timestamp.is_some() {
                    tracing::info!(%namespace, %name, "pod is being deleted; stopping it");
                    break true;
                }
            }
            _ = shutdown.changed() => break false,
            _ = objects_changed.changed() => sync_volumes(run, tokens).await,
            _ = resync.tick() => sync_volumes(run, tokens).await,
            _ = &mut *lifecycle, if !lifecycle_done => {
                lifecycle_done = true;
            }
        }
    };
    Ending {
        latest,
        deleted,
        lifecycle_done,
    }
}

/// Removes what the pod held on this machine (its name, sandbox and directory) and, when it
/// is being deleted, the pod object.
async fn tear_down(run: &PodRun, sandbox: &Arc<Sandbox>, deleted: bool) {
    let shared = &run.shared;
    shared.names.unregister(&run.id.uid);
    let removed = sandbox.clone();
    let _ = tokio::task::spawn_blocking(move || removed.remove()).await;
    if let Ok(mut sandboxes) = shared.sandboxes.lock() {
        sandboxes.remove(&run.id.uid);
    }
    if let Err(error) = std::fs::remove_dir_all(&run.dir) {
        tracing::warn!(%error, dir = %run.dir.display(), "failed to remove the pod directory");
    }
    if deleted {
        delete_from_api(&shared.client, &run.id).await;
    }
    tracing::info!(namespace = %run.id.namespace, name = %run.id.name, "pod stopped");
}

/// Waits until the pod is deleted (true) or the kubelet stops (false).
async fn wait_for_deletion(
    updates: &mut watch::Receiver<PodUpdate>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        {
            let update = updates.borrow_and_update();
            if update.gone {
                return false;
            }
            if update.pod.metadata.deletion_timestamp.is_some() {
                return true;
            }
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return false },
            _ = shutdown.changed() => return false,
        }
    }
}

/// Removes the pod object once its containers are gone, as the kubelet does.
async fn delete_from_api(client: &Client, id: &PodId) {
    let PodId {
        uid,
        namespace,
        name,
    } = id;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(error) => tracing::warn!(%error, %namespace, %name, "failed to delete the pod"),
    }
}

/// What a container task records about its container.
type Record = Arc<Mutex<ContainerRecord>>;

/// The records of the pod's containers, shared with their tasks.
#[derive(Clone)]
struct Records {
    init: Vec<Record>,
    containers: Vec<Record>,
}

/// The pod's status as made from its container records: written when it changes.
struct StatusWriter {
    records: Records,
    start_time: Timestamp,
    /// What was last written.
    written: Option<PodStatus>,
}

impl StatusWriter {
    fn new(pod: &Pod) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let record = |c: &Container| {
            Arc::new(Mutex::new(ContainerRecord::new(
                &c.name,
                c.image.as_deref().unwrap_or_default(),
            )))
        };
        Self {
            records: Records {
                init: spec.init_containers.iter().flatten().map(record).collect(),
                containers: spec.containers.iter().map(record).collect(),
            },
            start_time: Timestamp::now(),
            written: None,
        }
    }

    /// Writes the status the records give, on top of `latest`, unless it is what was written.
    async fn write(&mut self, run: &PodRun, latest: &Pod) {
        let snapshot = |records: &[Record]| -> Vec<ContainerRecord> {
            records
                .iter()
                .filter_map(|r| r.lock().ok().map(|r| r.clone()))
                .collect()
        };
        let init = snapshot(&self.records.init);
        let containers = snapshot(&self.records.containers);
        let base = with_own_conditions(latest, self.written.as_ref());
        let status = pod_status(
            &StatusInput {
                pod: &base,
                pod_ip: Some(run.ip),
                host_ip: run.shared.gateway(),
                start_time: self.start_time,
                init: &init,
                containers: &containers,
                sandbox_ready: true,
            },
            Timestamp::now(),
        );
        if self.written.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(run.shared.client.clone(), &run.id.namespace);
        let patch = serde_json::json!({ "status": status });
        match api
            .patch_status(&run.id.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.written = Some(status),
            Err(kube::Error::Api(error)) if error.code == 404 => self.written = Some(status),
            Err(error) => {
                tracing::warn!(%error, namespace = %run.id.namespace, name = %run.id.name, "failed to write pod status");
                run.changed.notify_one();
            }
        }
    }
}

/// `latest` with the conditions of `written` in place of the watch's: our own transition times
/// are kept even when the watch lags behind our writes.
fn with_own_conditions(latest: &Pod, written: Option<&PodStatus>) -> Pod {
    let mut base = latest.clone();
    let Some(previous) = written else {
        return base;
    };
    let mut status = base.status.take().unwrap_or_default();
    let others: Vec<_> = status
        .conditions
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            !previous
                .conditions
                .iter()
                .flatten()
                .any(|p| p.type_ == c.type_)
        })
        .collect();
    let mut conditions = previous.conditions.clone().unwrap_or_default();
    conditions.retain(|c| !others.iter().any(|o| o.type_ == c.type_));
    conditions.extend(others);
    status.conditions = Some(conditions);
    base.status = Some(status);
    base
}

// === Volumes ===

/// Issued service-account tokens, by (audience, lifetime).
#[derive(Debug, Default)]
struct TokenCache {
    tokens: BTreeMap<TokenKey, (String, Instant)>,
}

async fn sync_volumes(run: &PodRun, tokens: &mut TokenCache) {
    let result = sync_volumes_inner(run, tokens).await;
    if let Err(error) = &result {
        tracing::debug!(%error, namespace = %run.id.namespace, name = %run.id.name, "volumes not ready");
    }
    let result = result.map_err(|e| e.0);
    run.volumes.send_if_modified(|current| {
        let changed = current.as_ref() != Some(&result);
        *current = Some(result);
        changed
    });
}

async fn sync_volumes_inner(
    run: &PodRun,
    tokens: &mut TokenCache,
) -> Result<BTreeMap<String, (PathBuf, bool)>, ConfigError> {
    let pod = &run.pod;
    let now = Instant::now();
    for key in token_keys(pod) {
        let fresh = tokens
            .tokens
            .get(&key)
            .is_some_and(|(_, refresh)| now < *refresh);
        if fresh {
            continue;
        }
        match request_token(run, &key).await {
            Ok(token) => {
                let lifetime = Duration::from_secs(u64::try_from(key.1).unwrap_or(3600));
                tokens
                    .tokens
                    .insert(key, (token, now + lifetime.mul_f64(0.8)));
            }
            Err(error) if tokens.tokens.contains_key(&key) => {
                tracing::warn!(%error, namespace = %run.id.namespace, name = %run.id.name, "failed to refresh a service account token; keeping the old one");
            }
            Err(error) => {
                return Err(ConfigError(format!(
                    "failed to request a service account token: {error}"
                )));
            }
        }
    }
    let issued: BTreeMap<TokenKey, String> = tokens
        .tokens
        .iter()
        .map(|(k, (token, _))| (k.clone(), token.clone()))
        .collect();
    let spec = pod.spec.clone().unwrap_or_default();
    let group = spec
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group)
        .and_then(|g| u32::try_from(g).ok());
    let context = run.context();
    let mut paths = BTreeMap::new();
    for volume in spec.volumes.iter().flatten() {
        let dir = run.dir.join("volumes").join(&volume.name);
        let kind = volume_kind(volume, &context, run.shared.as_ref(), &issued)?;
        let io = |error: std::io::Error| {
            ConfigError(format!("failed to write volume {}: {error}", volume.name))
        };
        match kind {
            VolumeKind::Atomic(files) => {
                if write_atomic(&dir, &files, group, Timestamp::now()).map_err(io)? {
                    tracing::info!(namespace = %run.id.namespace, name = %run.id.name, volume = %volume.name, "volume content written");
                }
                paths.insert(volume.name.clone(), (dir, true));
            }
            VolumeKind::EmptyDir => {
                if !dir.is_dir() {
                    std::fs::create_dir_all(&dir).map_err(io)?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                        .map_err(io)?;
                }
                paths.insert(volume.name.clone(), (dir, false));
            }
            VolumeKind::Claim { claim, read_only } => {
                let path = claim_path(run, &claim).await?;
                paths.insert(volume.name.clone(), (path, read_only));
            }
        }
    }
    Ok(paths)
}

async fn request_token(run: &PodRun, key: &TokenKey) -> Result<String, kube::Error> {
    let account = run
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(run.shared.client.clone(), &run.id.namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: (!key.0.is_empty()).then(|| vec![key.0.clone()]),
            expiration_seconds: Some(key.1),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(run.id.name.clone()),
                uid: Some(run.id.uid.clone()),
            }),
        }),
        ..TokenRequest::default()
    };
    let issued = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await?;
    Ok(issued.status.and_then(|s| s.token).unwrap_or_default())
}

async fn claim_path(run: &PodRun, claim: &str) -> Result<PathBuf, ConfigError> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(run.shared.client.clone(), &run.id.namespace);
    let failed = |error: kube::Error| {
        ConfigError(format!(
            "failed to read persistentvolumeclaim \"{claim}\": {error}"
        ))
    };
    let bound = claims
        .get_opt(claim)
        .await
        .map_err(failed)?
        .ok_or_else(|| ConfigError(format!("persistentvolumeclaim \"{claim}\" not found")))?
        .spec
        .and_then(|s| s.volume_name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ConfigError(format!(
                "persistentvolumeclaim \"{claim}\" is not bound yet"
            ))
        })?;
    let volumes: Api<PersistentVolume> = Api::all(run.shared.client.clone());
    let volume = volumes
        .get_opt(&bound)
        .await
        .map_err(failed)?
        .ok_or_else(|| ConfigError(format!("persistentvolume \"{bound}\" not found")))?;
    let dir = volume_dir(&volume).ok_or_else(|| {
        ConfigError(format!(
            "persistentvolume \"{bound}\" is not a hostPath or local volume; the devcluster \
             kubelet mounts only those"
        ))
    })?;
    // Only what this kubelet's provisioner made: a PersistentVolume must never hand a Pod a
    // directory of the host.
    let own = run.shared.config.dir.join("volumes");
    if dir.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::RootDir
        )
    }) || !dir.starts_with(&own)
    {
        return Err(ConfigError(format!(
            "persistentvolume \"{bound}\" points at {}, outside {}: the devcluster kubelet \
             mounts only the volumes its provisioner made",
            dir.display(),
            own.display()
        )));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ConfigError(format!("failed to create {}: {e}", dir.display())))?;
    Ok(dir)
}

// === Containers ===

/// Runs the init containers in order, then the containers, until all are done or stopped.
async fn lifecycle(run: Arc<PodRun>, records: Records, stop: watch::Receiver<Option<Duration>>) {
    let spec = run.pod.spec.clone().unwrap_or_default();
    let mut tasks = JoinSet::new();
    for (container, record) in spec.init_containers.iter().flatten().zip(records.init) {
        let sidecar = container.restart_policy.as_deref() == Some("Always");
        if sidecar {
            tasks.spawn(run_container(
                run.clone(),
                container.clone(),
                Role::Sidecar,
                record.clone(),
                stop.clone(),
            ));
            // Later containers start once the sidecar has started.
            let mut stop = stop.clone();
            loop {
                if record.lock().map(|r| r.started).unwrap_or(true) {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => break,
                }
            }
        } else if !run_container(
            run.clone(),
            container.clone(),
            Role::Init,
            record,
            stop.clone(),
        )
        .await
        {
            tasks.shutdown().await;
            return;
        }
        if stop.borrow().is_some() {
            while tasks.join_next().await.is_some() {}
            return;
        }
    }
    let mut main = JoinSet::new();
    for (container, record) in spec.containers.iter().zip(records.containers) {
        main.spawn(run_container(
            run.clone(),
            container.clone(),
            Role::Regular,
            record,
            stop.clone(),
        ));
    }
    while main.join_next().await.is_some() {}
    // Sidecars stop when the main containers are done.
    let mut stop = stop;
    if stop.borrow().is_none() {
        let _ = stop.changed().await;
    }
    while tasks.join_next().await.is_some() {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Init,
    Sidecar,
    Regular,
}

/// A container's process, ready to start.
struct Prepared {
    process: ProcessSpec,
    startup: Option<ProbePlan>,
    liveness: Option<ProbePlan>,
    readiness: Option<ProbePlan>,
}

/// Why a container is waiting instead of running.
struct Blocked {
    reason: &'static str,
    message: String,
}

impl From<ConfigError> for Blocked {
    fn from(error: ConfigError) -> Self {
        Self {
            reason: "CreateContainerConfigError",
            message: error.0,
        }
    }
}

fn update(
    run: &PodRun,
    record: &Mutex<ContainerRecord>,
    change: impl FnOnce(&mut ContainerRecord),
) {
    if let Ok(mut record) = record.lock() {
        change(&mut record);
    }
    run.changed.notify_one();
}

/// Runs one container through its restarts; for an init container, returns whether it
/// completed successfully.
async fn run_container(
    run: Arc<PodRun>,
    container: Container,
    role: Role,
    record: Record,
    stop: watch::Receiver<Option<Duration>>,
) -> bool {
    let policy = run
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let mut task = ContainerTask {
        volumes: run.volumes.subscribe(),
        run,
        container,
        role,
        record,
        stop,
        policy,
        failures: 0,
        blocked_attempts: 0,
    };
    task.run().await.unwrap_or(false)
}

/// The pod stops: a container task ends, its record saying how far it got.
struct Stopped;

/// A container's process, started.
struct Running {
    child: tokio::process::Child,
    pid: u32,
    started_at: Timestamp,
    since: Instant,
}

/// One container's task: its attempts at running, and the back-off between them.
struct ContainerTask {
    run: Arc<PodRun>,
    container: Container,
    role: Role,
    record: Record,
    stop: watch::Receiver<Option<Duration>>,
    /// The pod's restartPolicy.
    policy: String,
    /// Failed starts and runs since the last run that lasted [`BACKOFF_RESET`].
    failures: u32,
    /// Attempts in a row at preparing the container that were blocked.
    blocked_attempts: u32,
    /// Changes of the pod's volumes, which may unblock the container.
    volumes: watch::Receiver<Option<Result<VolumePaths, String>>>,
}

impl ContainerTask {
    /// Starts the container, supervises it and restarts it as the pod's policy says, until it
    /// is done (`Ok(succeeded)`) or the pod stops.
    async fn run(&mut self) -> Result<bool, Stopped> {
        loop {
            if self.stop.borrow().is_some() {
                return Err(Stopped);
            }
            let prepared = match prepare(&self.run, &self.container) {
                Ok(prepared) => prepared,
                Err(blocked) => {
                    self.wait_blocked(blocked).await?;
                    continue;
                }
            };
            self.blocked_attempts = 0;
            let Some(mut running) = self.start(&prepared).await? else {
                continue;
            };
            let exit_code = self.until_exit(&prepared, &mut running).await?;
            let finished_at = Timestamp::now();
            if !self.restarts(exit_code) {
                self.update(|r| {
                    r.state = terminated(exit_code, Some(running.started_at), finished_at);
                    r.ready = false;
                    r.finished = true;
                });
                return Ok(exit_code == 0);
            }
            self.crash_loop_back_off(&running, exit_code, finished_at)
                .await?;
        }
    }

    fn update(&self, change: impl FnOnce(&mut ContainerRecord)) {
        update(&self.run, &self.record, change);
    }

    /// Records why the container cannot start yet and waits for a retry: a back-off, or a
    /// change of the volumes.
    async fn wait_blocked(&mut self, blocked: Blocked) -> Result<(), Stopped> {
        let base = self.run.shared.config.crash_loop_base;
        let delay = backoff(base, self.blocked_attempts).min(CONFIG_RETRY_CAP);
        let shown = if blocked.reason == "ErrImagePull" && self.blocked_attempts > 0 {
            "ImagePullBackOff"
        } else {
            blocked.reason
        };
        if self.blocked_attempts == 0 || blocked.reason != "ContainerCreating" {
            tracing::info!(container = %self.container.name, namespace = %self.run.id.namespace, pod = %self.run.id.name, reason = shown, message = %blocked.message, "container cannot start");
        }
        self.blocked_attempts += 1;
        self.update(|r| r.state = waiting(shown, blocked.message));
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            _ = self.volumes.changed() => Ok(()),
            _ = self.stop.changed() => Err(Stopped),
        }
    }

    /// Starts the process and records it running once its command runs; `None` when it could
    /// not be started (after the back-off).
    async fn start(&mut self, prepared: &Prepared) -> Result<Option<Running>, Stopped> {
        let base = self.run.shared.config.crash_loop_base;
        let child = match runtime::spawn(&prepared.process) {
            Ok(child) => child,
            Err(error) => {
                let message = format!("failed to start the container process: {error}");
                self.update(|r| r.state = waiting("RunContainerError", message));
                tokio::select! {
                    () = tokio::time::sleep(backoff(base, self.failures)) => {}
                    _ = self.stop.changed() => return Err(Stopped),
                }
                self.failures += 1;
                return Ok(None);
            }
        };
        let Some(pid) = child.id() else {
            // Reaped already: it exited at once; the back-off below applies as for any exit.
            tracing::warn!(container = %self.container.name, "container exited before it could be tracked");
            tokio::time::sleep(backoff(base, self.failures)).await;
            self.failures += 1;
            return Ok(None);
        };
        if let Ok(mut pids) = self.run.shared.pids.lock() {
            pids.insert(pid);
        }
        // Running means the command runs: wait until the script has built the root and
        // chrooted into it (or the process is gone), as a runtime reports a started container.
        runtime::wait_for_root(pid).await;
        let running = Running {
            child,
            pid,
            started_at: Timestamp::now(),
            since: Instant::now(),
        };
        tracing::info!(container = %self.container.name, namespace = %self.run.id.namespace, pod = %self.run.id.name, pid, "container started");
        let role = self.role;
        self.update(|r| {
            if r.state.terminated.is_some()
                || r.last_state.is_some()
                || r.state
                    .waiting
                    .as_ref()
                    .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"))
            {
                r.restart_count += 1;
            }
            r.state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(running.started_at)),
                }),
                ..ContainerState::default()
            };
            r.pid = Some(pid);
            r.started = prepared.startup.is_none();
            r.ready = r.started && prepared.readiness.is_none() && role != Role::Init;
        });
        Ok(Some(running))
    }

    /// Supervises the running container until it exits (or fails a probe and is stopped);
    /// returns its exit code. When the pod stops, stops it and records it finished.
    async fn until_exit(
        &mut self,
        prepared: &Prepared,
        running: &mut Running,
    ) -> Result<i32, Stopped> {
        let (run, container, pid) = (&self.run, &self.container, running.pid);
        let outcome = supervise(
            run,
            container,
            &self.record,
            prepared,
            &mut running.child,
            &mut self.stop,
        )
        .await;
        let exit_code = match outcome {
            Outcome::Exited(code) => code,
            Outcome::Unhealthy(kind) => {
                tracing::info!(container = %container.name, pod = %run.id.name, probe = kind, "container failed its probe; restarting");
                terminate(
                    run,
                    container,
                    prepared,
                    &mut running.child,
                    pid,
                    run.grace(),
                )
                .await
            }
            Outcome::Stop(grace) => {
                let code =
                    terminate(run, container, prepared, &mut running.child, pid, grace).await;
                forget_pid(run, pid);
                self.update(|r| {
                    r.state = terminated(code, Some(running.started_at), Timestamp::now());
                    r.ready = false;
                    r.finished = true;
                });
                return Err(Stopped);
            }
        };
        // Leftover processes of the container go with its main process.
        runtime::signal_group(pid, Signal::SIGKILL);
        forget_pid(run, pid);
        tracing::info!(container = %container.name, namespace = %run.id.namespace, pod = %run.id.name, exit_code, "container exited");
        Ok(exit_code)
    }

    /// Whether a container that exited with `exit_code` runs again, by its role and the pod's
    /// restartPolicy.
    fn restarts(&self, exit_code: i32) -> bool {
        let policy = self.policy.as_str();
        match self.role {
            Role::Init => exit_code != 0 && policy != "Never",
            Role::Sidecar => true,
            Role::Regular => policy == "Always" || (policy == "OnFailure" && exit_code != 0),
        }
    }

    /// Records the exit as the last state and waits out the back-off (reset after a long run).
    async fn crash_loop_back_off(
        &mut self,
        running: &Running,
        exit_code: i32,
        finished_at: Timestamp,
    ) -> Result<(), Stopped> {
        if running.since.elapsed() >= BACKOFF_RESET {
            self.failures = 0;
        }
        let delay = backoff(self.run.shared.config.crash_loop_base, self.failures);
        self.failures += 1;
        let message = crash_loop_message(delay, &self.container.name, &self.run.pod);
        self.update(|r| {
            r.last_state = Some(terminated(exit_code, Some(running.started_at), finished_at));
            r.state = waiting("CrashLoopBackOff", message);
            r.ready = false;
            r.started = false;
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            _ = self.stop.changed() => {
                self.update(|r| r.finished = true);
                Err(Stopped)
            }
        }
    }
}

fn forget_pid(run: &PodRun, pid: u32) {
    if let Ok(mut pids) = run.shared.pids.lock() {
        pids.remove(&pid);
    }
}

enum Outcome {
    Exited(i32),
    Unhealthy(&'static str),
    Stop(Duration),
}

/// Probe bookkeeping for one probe.
struct ProbeRun<'a> {
    plan: &'a ProbePlan,
    kind: &'static str,
    next: Instant,
    successes: u32,
    failures: u32,
}

impl<'a> ProbeRun<'a> {
    fn new(plan: &'a ProbePlan, kind: &'static str, start: Instant) -> Self {
        Self {
            plan,
            kind,
            next: start + plan.timing.initial_delay,
            successes: 0,
            failures: 0,
        }
    }

    /// Runs it; returns Some(passed) when the result crosses a threshold.
    async fn probe(&mut self) -> Option<bool> {
        let result = probe::run(&self.plan.action, self.plan.timing.timeout).await;
        self.next = Instant::now() + self.plan.timing.period;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                (self.successes >= self.plan.timing.success_threshold).then_some(true)
            }
            Err(error) => {
                tracing::debug!(%error, probe = self.kind, "probe failed");
                self.successes = 0;
                self.failures += 1;
                (self.failures >= self.plan.timing.failure_threshold).then_some(false)
            }
        }
    }
}

/// Watches a running container: its exit, its probes, and the stop signal.
async fn supervise(
    run: &PodRun,
    container: &Container,
    record: &Mutex<ContainerRecord>,
    prepared: &Prepared,
    child: &mut tokio::process::Child,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Outcome {
    let start = Instant::now();
    let mut startup = prepared
        .startup
        .as_ref()
        .map(|p| ProbeRun::new(p, "startupProbe", start));
    let mut liveness = prepared
        .liveness
        .as_ref()
        .map(|p| ProbeRun::new(p, "livenessProbe", start));
    let mut readiness = prepared
        .readiness
        .as_ref()
        .map(|p| ProbeRun::new(p, "readinessProbe", start));
    let mut started = startup.is_none();
    loop {
        if let Some(grace) = *stop.borrow() {
            return Outcome::Stop(grace);
        }
        let next = if !started {
            startup.as_ref().map(|p| p.next)
        } else {
            [liveness.as_ref(), readiness.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.next)
                .min()
        }
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(status) => status.code().unwrap_or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        128 + status.signal().unwrap_or(0)
                    }),
                    Err(_) => 1,
                };
                return Outcome::Exited(code);
            }
            _ = stop.changed() => {}
            () = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                if !started {
                    if let Some(probe) = startup.as_mut() {
                        match probe.probe().await {
                            Some(true) => {
                                started = true;
                                let ready = readiness.is_none();
                                update(run, record, |r| {
                                    r.started = true;
                                    r.ready = ready;
                                });
                                for p in [liveness.as_mut(), readiness.as_mut()].into_iter().flatten() {
                                    p.next = Instant::now() + p.plan.timing.initial_delay;
                                }
                            }
                            Some(false) => return Outcome::Unhealthy("startupProbe"),
                            None => {}
                        }
                    }
                    continue;
                }
                if let Some(probe) = liveness.as_mut().filter(|p| p.next <= now)
                    && probe.probe().await == Some(false)
                {
                    return Outcome::Unhealthy("livenessProbe");
                }
                if let Some(probe) = readiness.as_mut().filter(|p| p.next <= now)
                    && let Some(ready) = probe.probe().await
                {
                    let changed = record.lock().map(|r| r.ready != ready).unwrap_or(false);
                    if changed {
                        tracing::info!(container = %container.name, pod = %run.id.name, ready, "readiness changed");
                        update(run, record, |r| r.ready = ready);
                    }
                }
            }
        }
    }
}

/// preStop, SIGTERM, up to `grace`, SIGKILL; returns the exit code.
async fn terminate(
    run: &PodRun,
    container: &Container,
    prepared: &Prepared,
    child: &mut tokio::process::Child,
    pid: u32,
    grace: Duration,
) -> i32 {
    let deadline = Instant::now() + grace;
    if let Some(pre_stop) = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
    {
        let hook = async {
            if let Some(exec) = &pre_stop.exec {
                let argv = exec.command.clone().unwrap_or_default();
                let mut command = runtime::exec_in(
                    pid,
                    prepared.process.uid,
                    prepared.process.gid,
                    &argv,
                    &prepared.process.env,
                );
                if let Err(error) = command.status().await {
                    tracing::warn!(%error, container = %container.name, "preStop exec hook failed");
                }
            } else if let Some(http) = &pre_stop.http_get {
                match probe::http_action(http, container, run.ip) {
                    Ok(action) => {
                        if let Err(error) =
                            probe::run(&action, grace.max(Duration::from_secs(1))).await
                        {
                            tracing::warn!(%error, container = %container.name, "preStop httpGet hook failed");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "preStop httpGet hook is invalid"),
                }
            } else if let Some(sleep) = &pre_stop.sleep {
                tokio::time::sleep(Duration::from_secs(
                    u64::try_from(sleep.seconds).unwrap_or(0),
                ))
                .await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, hook).await;
    }
    runtime::signal_group(pid, Signal::SIGTERM);
    let code = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => status.code().unwrap_or(137),
        _ => {
            runtime::signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            137
        }
    };
    runtime::signal_group(pid, Signal::SIGKILL);
    code
}

/// Resolves everything a container needs to start, or why it cannot.
fn prepare(run: &PodRun, container: &Container) -> Result<Prepared, Blocked> {
    let config = &run.shared.config;
    let reference = container.image.clone().unwrap_or_default();
    let image = config.images.get(&reference).ok_or_else(|| Blocked {
        reason: "ErrImagePull",
        message: format!(
            "no local executable is mapped for image {reference:?} (the devcluster kubelet runs \
             no registry); known repositories: [{}]",
            config.images.repositories().join(", ")
        ),
    })?;
    let paths = match &*run.volumes.borrow() {
        None => {
            return Err(Blocked {
                reason: "ContainerCreating",
                message: String::new(),
            });
        }
        Some(Err(message)) => return Err(ConfigError(message.clone()).into()),
        Some(Ok(paths)) => paths.clone(),
    };
    unsupported(container)?;
    let context = run.context();
    let env = container_env(container, image, &context, run.shared.as_ref())?;
    let argv = command_line(container, image, &env);
    if argv.is_empty() {
        return Err(ConfigError(format!(
            "container {} has no command and image {reference:?} has no entrypoint",
            container.name
        ))
        .into());
    }
    let (uid, gid, groups) = identity(&run.pod, container, image);
    let non_root = container
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_non_root)
        .or_else(|| {
            run.pod
                .spec
                .as_ref()?
                .security_context
                .as_ref()?
                .run_as_non_root
        })
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err(ConfigError(format!(
            "container {} has runAsNonRoot and would run as root; set runAsUser",
            container.name
        ))
        .into());
    }
    let mounts = mounts(run, container, image, &paths, &env)?;
    let plan = |probe: Option<&k8s_openapi::api::core::v1::Probe>, kind| {
        probe
            .map(|p| probe::plan(p, container, run.ip, kind))
            .transpose()
    };
    let scratch = run.dir.join("rootfs").join(&container.name);
    Ok(Prepared {
        startup: plan(container.startup_probe.as_ref(), "startupProbe")?,
        liveness: plan(container.liveness_probe.as_ref(), "livenessProbe")?,
        readiness: plan(container.readiness_probe.as_ref(), "readinessProbe")?,
        process: ProcessSpec {
            netns: run.netns.clone(),
            scratch,
            hosts_dir: run.dir.join("etc-hosts"),
            hostname: run.hostname.clone(),
            uid,
            gid,
            groups,
            working_dir: container.working_dir.clone().filter(|w| !w.is_empty()),
            mounts,
            argv,
            env,
            log: run.dir.join(format!("{}.log", container.name)),
        },
    })
}

/// Fields this kubelet cannot honour; better a clear error than a silently different pod.
fn unsupported(container: &Container) -> Result<(), ConfigError> {
    let name = &container.name;
    if let Some(context) = &container.security_context
        && context.privileged == Some(true)
    {
        return Err(ConfigError(format!(
            "container {name}: securityContext.privileged is not supported by the devcluster kubelet"
        )));
    }
    if container
        .volume_devices
        .as_ref()
        .is_some_and(|d| !d.is_empty())
    {
        return Err(ConfigError(format!(
            "container {name}: volumeDevices are not supported by the devcluster kubelet"
        )));
    }
    Ok(())
}

/// (uid, gid, supplementary groups) of a container.
fn identity(pod: &Pod, container: &Container, image: &Image) -> (u32, u32, Vec<u32>) {
    let pod_context = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let own = container.security_context.as_ref();
    let id = |value: Option<i64>| value.and_then(|v| u32::try_from(v).ok());
    let uid = id(own.and_then(|c| c.run_as_user))
        .or_else(|| id(pod_context.and_then(|c| c.run_as_user)))
        .unwrap_or(image.user.0);
    let gid = id(own.and_then(|c| c.run_as_group))
        .or_else(|| id(pod_context.and_then(|c| c.run_as_group)))
        .unwrap_or(image.user.1);
    let mut groups: Vec<u32> = pod_context
        .and_then(|c| c.fs_group)
        .into_iter()
        .chain(
            pod_context
                .and_then(|c| c.supplemental_groups.clone())
                .into_iter()
                .flatten(),
        )
        .filter_map(|g| u32::try_from(g).ok())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    (uid, gid, groups)
}

/// The container's bind mounts: its volume mounts, then the image's files.
fn mounts(
    run: &PodRun,
    container: &Container,
    image: &Image,
    paths: &BTreeMap<String, (PathBuf, bool)>,
    env: &[(String, String)],
) -> Result<Vec<Mount>, ConfigError> {
    let mut mounts = Vec::new();
    for (index, (target, file)) in image.files.iter().enumerate() {
        let source = match file {
            ImageFile::Host(path) => path.clone(),
            ImageFile::Script(text) => {
                let dir = run.dir.join("images").join(&container.name);
                let path = dir.join(index.to_string());
                let written = std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(&path, text))
                    .and_then(|()| {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    });
                written.map_err(|e| {
                    ConfigError(format!("failed to write image file {target}: {e}"))
                })?;
                path
            }
        };
        mounts.push(Mount {
            source,
            target: target.clone(),
            read_only: true,
        });
    }
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for mount in container.volume_mounts.iter().flatten() {
        let (base, always_read_only) = paths.get(&mount.name).ok_or_else(|| {
            ConfigError(format!(
                "container {}: volumeMount {} names no volume of the pod",
                container.name, mount.name
            ))
        })?;
        let sub = match (&mount.sub_path, &mount.sub_path_expr) {
            (Some(sub), _) if !sub.is_empty() => Some(sub.clone()),
            (_, Some(expr)) if !expr.is_empty() => Some(expand(expr, &|name| {
                vars.get(name).map(|v| (*v).to_owned())
            })),
            _ => None,
        };
        let source = match sub {
            Some(sub) => {
                if Path::new(&sub)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(ConfigError(format!(
                        "container {}: subPath {sub:?} must be relative, without '..'",
                        container.name
                    )));
                }
                sub_path(base, &sub, !*always_read_only).map_err(|e| {
                    ConfigError(format!(
                        "container {}: subPath {sub:?}: {e}",
                        container.name
                    ))
                })?
            }
            None => base.clone(),
        };
        mounts.push(Mount {
            source,
            target: mount.mount_path.clone(),
            read_only: *always_read_only || mount.read_only.unwrap_or(false),
        });
    }
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSecurityContext, PodSpec, SecurityContext};
    use kube::api::ObjectMeta;

    #[test]
    fn identity_prefers_container_then_pod_then_image() {
        let image = Image {
            user: (65532, 65532),
            ..Image::default()
        };
        let mut pod = Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                security_context: Some(PodSecurityContext {
                    run_as_user: Some(1000),
                    fs_group: Some(2000),
                    supplemental_groups: Some(vec![3000, 2000]),
                    ..PodSecurityContext::default()
                }),
                ..PodSpec::default()
            }),
            status: None,
        };
        let mut container = Container::default();
        assert_eq!(
            identity(&pod, &container, &image),
            (1000, 65532, vec![2000, 3000])
        );
        container.security_context = Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            ..SecurityContext::default()
        });
        assert_eq!(identity(&pod, &container, &image).0, 0);
        pod.spec = Some(PodSpec::default());
        assert_eq!(
            identity(&pod, &Container::default(), &image),
            (65532, 65532, vec![])
        );
    }

    #[test]
    fn hostname_defaults_to_the_pod_name() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web-7d9".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        assert_eq!(pod_hostname(&pod), "web-7d9");
    }
}

/// `base/sub` for a subPath mount, never leaving `base`: every existing component must be a
/// plain directory or file (no symlink, which a container could have planted to reach the
/// host); missing directories are created when `create` is set.
fn sub_path(base: &Path, sub: &str, create: bool) -> Result<PathBuf, String> {
    let mut path = base.to_path_buf();
    for component in Path::new(sub).components() {
        let std::path::Component::Normal(part) = component else {
            return Err("must be relative, without '..'".to_owned());
        };
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!("{} is a symbolic link", path.display()));
            }
            Ok(_) => {}
            Err(_) if create => std::fs::create_dir(&path)
                .map_err(|e| format!("failed to create {}: {e}", path.display()))?,
            Err(_) => return Err(format!("{} does not exist", path.display())),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod sub_path_tests {
    use super::sub_path;

    #[test]
    fn a_sub_path_through_a_symlink_is_refused() {
        let base = std::env::temp_dir().join(format!("subpath-{}", std::process::id()));
        std::fs::create_dir_all(base.join("data")).unwrap();
        std::os::unix::fs::symlink("/", base.join("escape")).unwrap();
        assert!(sub_path(&base, "escape/etc", true).is_err());
        assert!(sub_path(&base, "../x", true).is_err());
        assert_eq!(
            sub_path(&base, "data/new", true).unwrap(),
            base.join("data/new")
        );
        assert!(base.join("data/new").is_dir());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
