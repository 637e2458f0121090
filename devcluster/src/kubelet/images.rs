//! The image table: there is no container runtime or registry here, so an image reference is
//! mapped to executables and files already on this machine.
//!
//! Matching is by repository (the reference without `:tag` or `@digest`), so a chart's
//! `ghcr.io/org/app:v1.2.3` finds the entry a test inserted as `ghcr.io/org/app`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The search path containers get when their image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A local stand-in for a container image.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// What runs when the container has no `command` (the image's ENTRYPOINT; its CMD is empty).
    pub entrypoint: Vec<String>,
    /// Default (uid, gid) when neither the container nor the pod sets `runAsUser`/`runAsGroup`.
    pub user: (u32, u32),
    /// Environment of the image (PATH and the like); the container's `env` overrides it.
    pub env: Vec<(String, String)>,
    /// Files placed in the container's filesystem: (absolute container path, source).
    pub files: Vec<(String, ImageFile)>,
}

/// The source of a file placed in a container.
#[derive(Debug, Clone)]
pub enum ImageFile {
    /// A host file (or directory), bind-mounted read-only.
    Host(PathBuf),
    /// Text of a small script, written with mode 0755.
    Script(String),
}

/// Image references to local images.
#[derive(Debug, Clone, Default)]
pub struct Images {
    by_repository: BTreeMap<String, Image>,
}

impl Images {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `repository` (a reference's tag and digest are ignored) to `image`.
    pub fn insert(&mut self, repository: &str, image: Image) -> &mut Self {
        self.by_repository
            .insert(repository_of(repository).to_owned(), image);
        self
    }

    /// Builder form of [`Images::insert`].
    pub fn with(mut self, repository: &str, image: Image) -> Self {
        self.insert(repository, image);
        self
    }

    /// The image for a reference such as `ghcr.io/org/app:v1@sha256:…`.
    pub fn get(&self, reference: &str) -> Option<&Image> {
        self.by_repository.get(repository_of(reference))
    }

    /// The known repositories, for messages about an unknown one.
    pub fn repositories(&self) -> Vec<&str> {
        self.by_repository.keys().map(String::as_str).collect()
    }
}

/// The repository part of an image reference: without `@digest` and without a `:tag` after the
/// last `/` (a registry's `host:port` stays).
pub fn repository_of(reference: &str) -> &str {
    let without_digest = reference
        .split_once('@')
        .map_or(reference, |(name, _)| name);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].rfind(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_drops_tag_and_digest_but_keeps_registry_port() {
        assert_eq!(repository_of("nginx"), "nginx");
        assert_eq!(repository_of("nginx:1.27"), "nginx");
        assert_eq!(
            repository_of("ghcr.io/org/app:v1@sha256:abc"),
            "ghcr.io/org/app"
        );
        assert_eq!(
            repository_of("ghcr.io/org/app@sha256:abc"),
            "ghcr.io/org/app"
        );
        assert_eq!(repository_of("localhost:5000/app"), "localhost:5000/app");
        assert_eq!(repository_of("localhost:5000/app:v2"), "localhost:5000/app");
    }

    #[test]
    fn image_is_found_by_any_tag_of_its_repository() {
        let images = Images::new().with(
            "quay.io/brancz/kube-rbac-proxy:v0.18.0",
            Image {
                entrypoint: vec!["/bin/proxy".into()],
                ..Image::default()
            },
        );
        assert!(
            images
                .get("quay.io/brancz/kube-rbac-proxy:v0.19.1")
                .is_some()
        );
        assert!(
            images
                .get("quay.io/brancz/kube-rbac-proxy@sha256:00")
                .is_some()
        );
        assert!(images.get("quay.io/brancz/other:v1").is_none());
        assert_eq!(images.repositories(), ["quay.io/brancz/kube-rbac-proxy"]);
    }
}
