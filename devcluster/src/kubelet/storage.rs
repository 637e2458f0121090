//! A tiny volume provisioner: every unbound PersistentVolumeClaim gets a PersistentVolume that
//! is a directory under the kubelet's state directory.
//!
//! The scheduler will not place a pod whose immediate claim is unbound, so StatefulSets need
//! this. kube-controller-manager's PV controller does the binding; pods mount the PV's
//! `hostPath` directory (never a mount on the host).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

/// The PersistentVolume for `claim`, when it still needs one.
pub fn volume_for(claim: &PersistentVolumeClaim, volumes_dir: &Path) -> Option<PersistentVolume> {
    let spec = claim.spec.as_ref()?;
    if spec.volume_name.as_deref().is_some_and(|v| !v.is_empty()) {
        return None;
    }
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase.is_some_and(|p| p != "Pending") || claim.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let uid = claim.metadata.uid.clone()?;
    let name = format!("pvc-{uid}");
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    Some(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(
                [(
                    "pv.kubernetes.io/provisioned-by".to_owned(),
                    "devcluster".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some([("storage".to_owned(), storage)].into()),
            access_modes: spec.access_modes.clone(),
            volume_mode: spec.volume_mode.clone(),
            storage_class_name: Some(spec.storage_class_name.clone().unwrap_or_default()),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            host_path: Some(HostPathVolumeSource {
                path: volumes_dir.join(&name).to_string_lossy().into_owned(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            claim_ref: Some(ObjectReference {
                namespace: claim.metadata.namespace.clone(),
                name: claim.metadata.name.clone(),
                uid: Some(uid),
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    })
}

/// The host directory behind a PersistentVolume.
pub fn volume_dir(volume: &PersistentVolume) -> Option<PathBuf> {
    let spec = volume.spec.as_ref()?;
    spec.host_path
        .as_ref()
        .map(|h| PathBuf::from(&h.path))
        .or_else(|| spec.local.as_ref().map(|l| PathBuf::from(&l.path)))
}

/// Provisions volumes for claims until the task is aborted.
pub async fn provision(client: Client, volumes_dir: PathBuf) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client);
    let mut events = watcher(claims, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let claim = match event {
            Ok(watcher::Event::Apply(claim) | watcher::Event::InitApply(claim)) => claim,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "persistentvolumeclaim watch failed; retrying");
                continue;
            }
        };
        let Some(volume) = volume_for(&claim, &volumes_dir) else {
            continue;
        };
        let name = volume.metadata.name.clone().unwrap_or_default();
        let dir = volumes_dir.join(&name);
        let made = fs::create_dir_all(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)));
        if let Err(error) = made {
            tracing::warn!(%error, dir = %dir.display(), "failed to create a volume directory");
            continue;
        }
        match volumes.create(&PostParams::default(), &volume).await {
            Ok(_) => tracing::info!(
                volume = %name,
                claim = claim.metadata.name.as_deref().unwrap_or_default(),
                namespace = claim.metadata.namespace.as_deref().unwrap_or_default(),
                "provisioned a persistent volume"
            ),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => {
                tracing::warn!(%error, volume = %name, "failed to create a persistent volume")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};

    fn claim() -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data-node-0".into()),
                namespace: Some("ns".into()),
                uid: Some("1234".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_owned(), Quantity("5Gi".into()))].into()),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn pending_claim_gets_a_retained_host_path_volume_bound_to_it() {
        let volume = volume_for(&claim(), Path::new("/state/volumes")).unwrap();
        assert_eq!(volume.metadata.name.as_deref(), Some("pvc-1234"));
        let spec = volume.spec.unwrap();
        assert_eq!(spec.capacity.unwrap()["storage"].0, "5Gi");
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.host_path.unwrap().path, "/state/volumes/pvc-1234");
        let claim_ref = spec.claim_ref.unwrap();
        assert_eq!(claim_ref.uid.as_deref(), Some("1234"));
        assert_eq!(claim_ref.namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn bound_claim_needs_no_volume() {
        let mut bound = claim();
        if let Some(spec) = bound.spec.as_mut() {
            spec.volume_name = Some("pv-x".into());
        }
        assert!(volume_for(&bound, Path::new("/v")).is_none());
    }
}
