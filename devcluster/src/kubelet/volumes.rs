//! Pod volumes as plain directories on the host, written with the kubelet's atomic layout.
//!
//! Secret, ConfigMap, projected and downwardAPI volumes are rewritten in place while the pod
//! runs (certificate rotation depends on it), so readers must never see half a change: the
//! files live in a timestamped directory, `..data` points at it and is swapped with one
//! `rename`, and each top-level name is a symlink through `..data`. Nothing is mounted on the
//! host, so removing a pod's directory is all the cleanup there is.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ConfigMapProjection, DownwardAPIVolumeFile, KeyToPath, Pod, SecretProjection, Volume,
};

use super::env::{ConfigError, EnvContext, ObjectSource, field_value};

/// The symlink that names the current data directory.
const DATA_LINK: &str = "..data";
const DATA_LINK_TMP: &str = "..data_tmp";
/// Mode of files whose source gives none (secret, configMap, downwardAPI and projected alike).
pub const DEFAULT_MODE: u32 = 0o644;
/// Lifetime of a projected service-account token when the spec gives none.
pub const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// One file of an atomically written volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Files keyed by their path relative to the volume root (may contain `/`).
pub type VolumeFiles = BTreeMap<String, VolumeFile>;

/// A token request a projected volume needs: (audience, expirationSeconds).
pub type TokenKey = (String, i64);

/// What a pod's volume is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// Written by [`write_atomic`] from these files.
    Atomic(VolumeFiles),
    /// A plain, writable directory under the pod's directory.
    EmptyDir,
    /// The directory of the PersistentVolume bound to this claim.
    Claim { claim: String, read_only: bool },
}

// === Atomic writer ===

/// Makes `dir` hold exactly `files`, switching atomically; returns whether anything changed.
/// With `group`, files and directories are owned by root:group and group-readable, as the
/// kubelet does for `fsGroup`.
pub fn write_atomic(
    dir: &Path,
    files: &VolumeFiles,
    group: Option<u32>,
    now: Timestamp,
) -> io::Result<bool> {
    fs::create_dir_all(dir)?;
    let current = fs::read_link(dir.join(DATA_LINK)).ok();
    if let Some(current) = &current
        && read_tree(&dir.join(current))? == effective(files, group)
    {
        return Ok(false);
    }

    let mut name = format!("..{}", now.strftime("%Y_%m_%d_%H_%M_%S.%f"));
    while dir.join(&name).exists() {
        name.push('_');
    }
    let data_dir = dir.join(&name);
    create_dir(&data_dir, group)?;
    for (path, file) in effective(files, group) {
        let target = data_dir.join(&path);
        if let Some(parent) = target.parent() {
            for ancestor in parent.strip_prefix(&data_dir).into_iter().flat_map(|p| {
                p.ancestors()
                    .filter(|a| !a.as_os_str().is_empty())
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
            }) {
                let dir = data_dir.join(ancestor);
                if !dir.exists() {
                    create_dir(&dir, group)?;
                }
            }
        }
        fs::write(&target, &file.data)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(file.mode))?;
        if let Some(group) = group {
            std::os::unix::fs::chown(&target, Some(0), Some(group))?;
        }
    }

    let tmp = dir.join(DATA_LINK_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(&name, &tmp)?;
    fs::rename(&tmp, dir.join(DATA_LINK))?;

    let wanted: Vec<String> = files.keys().filter_map(|p| top_level(p)).collect();
    for top in &wanted {
        let link = dir.join(top);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_LINK).join(top), &link)?;
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name.starts_with("..") {
            if file_name != DATA_LINK && file_name != name && entry.path().is_dir() {
                fs::remove_dir_all(entry.path())?;
            }
            continue;
        }
        if !wanted.contains(&file_name) && entry.file_type()?.is_symlink() {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(true)
}

fn create_dir(dir: &Path, group: Option<u32>) -> io::Result<()> {
    fs::create_dir(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    if let Some(group) = group {
        std::os::unix::fs::chown(dir, Some(0), Some(group))?;
    }
    Ok(())
}

/// The files as they land on disk: with a group, readable by it.
fn effective(files: &VolumeFiles, group: Option<u32>) -> VolumeFiles {
    files
        .iter()
        .map(|(path, file)| {
            let mode = if group.is_some() {
                file.mode | 0o440
            } else {
                file.mode
            };
            let file = VolumeFile {
                data: file.data.clone(),
                mode: mode & 0o7777,
            };
            (path.clone(), file)
        })
        .collect()
}

/// Every regular file under `root`, keyed by relative path.
fn read_tree(root: &Path) -> io::Result<VolumeFiles> {
    let mut files = VolumeFiles::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if let Ok(relative) = entry.path().strip_prefix(root) {
                files.insert(
                    relative.to_string_lossy().into_owned(),
                    VolumeFile {
                        data: fs::read(entry.path())?,
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            }
        }
    }
    Ok(files)
}

fn top_level(path: &str) -> Option<String> {
    path.split('/').find(|s| !s.is_empty()).map(str::to_owned)
}

/// A relative path without `..`, as item paths must be.
fn checked_path(path: &str, volume: &str) -> Result<String, ConfigError> {
    let relative = Path::new(path);
    if path.is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        || path.starts_with("..")
    {
        return Err(ConfigError(format!(
            "volume {volume}: item path {path:?} must be relative, without '..'"
        )));
    }
    Ok(path.to_owned())
}

// === Volume content ===

/// What the pod's volumes are: the content of every atomic volume (from Secrets, ConfigMaps,
/// the downward API and `tokens`), or the first reason one cannot be built.
pub fn volume_kind(
    volume: &Volume,
    context: &EnvContext<'_>,
    objects: &dyn ObjectSource,
    tokens: &BTreeMap<TokenKey, String>,
) -> Result<VolumeKind, ConfigError> {
    let namespace = context.namespace();
    let name = &volume.name;
    let mut files = VolumeFiles::new();
    if let Some(source) = &volume.secret {
        let secret_name = source.secret_name.clone().unwrap_or_default();
        let projection = SecretProjection {
            name: secret_name,
            items: source.items.clone(),
            optional: source.optional,
        };
        let keys = secret_keys(objects, namespace, &projection);
        add_keys(&mut files, keys, mode(source.default_mode), name)?;
    } else if let Some(source) = &volume.config_map {
        let projection = ConfigMapProjection {
            name: source.name.clone(),
            items: source.items.clone(),
            optional: source.optional,
        };
        let keys = config_map_keys(objects, namespace, &projection);
        add_keys(&mut files, keys, mode(source.default_mode), name)?;
    } else if let Some(source) = &volume.downward_api {
        add_downward(
            &mut files,
            source.items.as_deref(),
            mode(source.default_mode),
            context,
            name,
        )?;
    } else if let Some(source) = &volume.projected {
        let default = mode(source.default_mode);
        for projection in source.sources.iter().flatten() {
            if let Some(secret) = &projection.secret {
                add_keys(
                    &mut files,
                    secret_keys(objects, namespace, secret),
                    default,
                    name,
                )?;
            } else if let Some(config_map) = &projection.config_map {
                let keys = config_map_keys(objects, namespace, config_map);
                add_keys(&mut files, keys, default, name)?;
            } else if let Some(downward) = &projection.downward_api {
                add_downward(
                    &mut files,
                    downward.items.as_deref(),
                    default,
                    context,
                    name,
                )?;
            } else if let Some(token) = &projection.service_account_token {
                let key = token_key(token);
                let value = tokens.get(&key).ok_or_else(|| {
                    ConfigError(format!(
                        "volume {name}: the service account token is not issued yet"
                    ))
                })?;
                let path = checked_path(&token.path, name)?;
                files.insert(
                    path,
                    VolumeFile {
                        data: value.clone().into_bytes(),
                        mode: default,
                    },
                );
            } else {
                return Err(ConfigError(format!(
                    "volume {name}: only secret, configMap, downwardAPI and serviceAccountToken \
                     projections are supported by the devcluster kubelet"
                )));
            }
        }
    } else if volume.empty_dir.is_some() {
        return Ok(VolumeKind::EmptyDir);
    } else if let Some(claim) = &volume.persistent_volume_claim {
        return Ok(VolumeKind::Claim {
            claim: claim.claim_name.clone(),
            read_only: claim.read_only.unwrap_or(false),
        });
    } else {
        return Err(ConfigError(format!(
            "volume {name}: only secret, configMap, projected, downwardAPI, emptyDir and \
             persistentVolumeClaim volumes are supported by the devcluster kubelet"
        )));
    }
    Ok(VolumeKind::Atomic(files))
}

/// The (audience, lifetime) of a token projection; the audience defaults to the API server's.
pub fn token_key(token: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection) -> TokenKey {
    (
        token.audience.clone().unwrap_or_default(),
        token.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
    )
}

/// The token requests a pod's projected volumes need.
pub fn token_keys(pod: &Pod) -> Vec<TokenKey> {
    let mut keys: Vec<TokenKey> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .map(token_key)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn mode(mode: Option<i32>) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .unwrap_or(DEFAULT_MODE)
}

/// Adds `data` (all keys, or the listed items) to `files`.
fn add_items(
    files: &mut VolumeFiles,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
    volume: &str,
    what: &str,
    optional: bool,
) -> Result<(), ConfigError> {
    match items {
        None => {
            for (key, value) in data {
                files.insert(
                    checked_path(&key, volume)?,
                    VolumeFile {
                        data: value,
                        mode: default_mode,
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(value) => {
                        files.insert(
                            checked_path(&item.path, volume)?,
                            VolumeFile {
                                data: value.clone(),
                                mode: item.mode.map_or(default_mode, |m| mode(Some(m))),
                            },
                        );
                    }
                    None if optional => {}
                    None => {
                        return Err(ConfigError(format!(
                            "volume {volume}: {what} has no key {:?}",
                            item.key
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The keys of one Secret or ConfigMap that a volume projects.
struct Keys<'a> {
    /// `secret "name"` or `configmap "name"`, for messages.
    what: String,
    /// The object's keys and values; `None` when it does not exist.
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&'a [KeyToPath]>,
    optional: bool,
}

fn secret_keys<'a>(
    objects: &dyn ObjectSource,
    namespace: &str,
    source: &'a SecretProjection,
) -> Keys<'a> {
    let data = objects.secret(namespace, &source.name).map(|secret| {
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    });
    Keys {
        what: format!("secret \"{}\"", source.name),
        data,
        items: source.items.as_deref(),
        optional: source.optional.unwrap_or(false),
    }
}

fn config_map_keys<'a>(
    objects: &dyn ObjectSource,
    namespace: &str,
    source: &'a ConfigMapProjection,
) -> Keys<'a> {
    let data = objects
        .config_map(namespace, &source.name)
        .map(|config_map| {
            let mut data: BTreeMap<String, Vec<u8>> = config_map
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (key, value) in config_map.binary_data.unwrap_or_default() {
                data.insert(key, value.0);
            }
            data
        });
    Keys {
        what: format!("configmap \"{}\"", source.name),
        data,
        items: source.items.as_deref(),
        optional: source.optional.unwrap_or(false),
    }
}

/// Adds the projected keys to `files`; a missing object is an error unless it is optional.
fn add_keys(
    files: &mut VolumeFiles,
    keys: Keys<'_>,
    default_mode: u32,
    volume: &str,
) -> Result<(), ConfigError> {
    let Some(data) = keys.data else {
        if keys.optional {
            return Ok(());
        }
        return Err(ConfigError(format!(
            "{} not found (volume {volume}); create it or mark the volume optional",
            keys.what
        )));
    };
    add_items(
        files,
        data,
        keys.items,
        default_mode,
        volume,
        &keys.what,
        keys.optional,
    )
}

fn add_downward(
    files: &mut VolumeFiles,
    items: Option<&[DownwardAPIVolumeFile]>,
    default_mode: u32,
    context: &EnvContext<'_>,
    volume: &str,
) -> Result<(), ConfigError> {
    for item in items.into_iter().flatten() {
        let Some(field) = &item.field_ref else {
            return Err(ConfigError(format!(
                "volume {volume}: downwardAPI item {} uses resourceFieldRef, which the \
                 devcluster kubelet does not support",
                item.path
            )));
        };
        let value = field_value(&field.field_path, context)?;
        files.insert(
            checked_path(&item.path, volume)?,
            VolumeFile {
                data: value.into_bytes(),
                mode: item.mode.map_or(default_mode, |m| mode(Some(m))),
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> VolumeFiles {
        entries
            .iter()
            .map(|(path, data)| {
                (
                    (*path).to_owned(),
                    VolumeFile {
                        data: data.as_bytes().to_vec(),
                        mode: 0o644,
                    },
                )
            })
            .collect()
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("devcluster-volumes-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn data_dirs(dir: &Path) -> Vec<String> {
        let mut dirs: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != DATA_LINK)
            .collect();
        dirs.sort();
        dirs
    }

    #[test]
    fn atomic_writer_lays_out_keys_as_symlinks_through_data() {
        let dir = scratch("layout");
        let now: Timestamp = "2026-11-28T21:00:00.123456789Z".parse().unwrap();
        assert!(
            write_atomic(&dir, &files(&[("tls.crt", "A"), ("sub/x", "B")]), None, now).unwrap()
        );
        assert_eq!(
            fs::read_link(dir.join("..data")).unwrap(),
            Path::new("..2026_11_28_21_00_00.123456789")
        );
        assert_eq!(
            fs::read_link(dir.join("tls.crt")).unwrap(),
            Path::new("..data/tls.crt")
        );
        assert_eq!(
            fs::read_link(dir.join("sub")).unwrap(),
            Path::new("..data/sub")
        );
        assert_eq!(fs::read_to_string(dir.join("tls.crt")).unwrap(), "A");
        assert_eq!(fs::read_to_string(dir.join("sub/x")).unwrap(), "B");
        let mode = fs::metadata(dir.join("tls.crt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_writer_changes_nothing_when_content_is_the_same() {
        let dir = scratch("same");
        let now = Timestamp::UNIX_EPOCH;
        write_atomic(&dir, &files(&[("k", "v")]), None, now).unwrap();
        let later = now + jiff::SignedDuration::from_secs(5);
        assert!(!write_atomic(&dir, &files(&[("k", "v")]), None, later).unwrap());
        assert_eq!(data_dirs(&dir).len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_writer_swaps_data_and_removes_old_dir_and_dropped_keys() {
        let dir = scratch("update");
        let now = Timestamp::UNIX_EPOCH;
        write_atomic(&dir, &files(&[("a", "1"), ("b", "2")]), None, now).unwrap();
        let first = data_dirs(&dir);
        let later = now + jiff::SignedDuration::from_secs(5);
        assert!(write_atomic(&dir, &files(&[("a", "3")]), None, later).unwrap());
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "3");
        assert!(
            fs::symlink_metadata(dir.join("b")).is_err(),
            "dropped key stays linked"
        );
        let second = data_dirs(&dir);
        assert_eq!(second.len(), 1);
        assert_ne!(first, second);
        assert!(fs::symlink_metadata(dir.join(DATA_LINK_TMP)).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn item_paths_may_not_leave_the_volume() {
        assert!(checked_path("../etc/passwd", "v").is_err());
        assert!(checked_path("/abs", "v").is_err());
        assert!(checked_path("..data", "v").is_err());
        assert_eq!(checked_path("a/b", "v").unwrap(), "a/b");
    }
}
