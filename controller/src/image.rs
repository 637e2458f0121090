//! Container image references: an empty or malformed one is a clear error on the node, not a
//! pod that fails to pull much later.

/// Checks `reference` against the shape of a container image reference:
/// `[registry[:port]/]path[:tag][@algorithm:digest]`, lowercase path components.
pub fn check_image(reference: &str) -> Result<(), String> {
    let describe = |why: &str| {
        Err(format!(
            "image \"{reference}\" is not a valid image reference: {why}"
        ))
    };
    if reference.is_empty() {
        return Err("image is empty".to_owned());
    }
    if reference.len() > 4096 {
        return describe("longer than 4096 characters");
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return describe("it contains whitespace");
    }
    let (name_and_tag, digest) = match reference.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return describe("the digest must be algorithm:hex");
        };
        let valid_algorithm = !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        if !valid_algorithm || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return describe("the digest must be algorithm:hex with at least 32 hex digits");
        }
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a registry port).
    let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_and_tag[..last_slash + i],
            Some(&name_and_tag[last_slash + i + 1..]),
        ),
        None => (name_and_tag, None),
    };
    if let Some(tag) = tag {
        let valid = (1..=128).contains(&tag.len())
            && tag
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return describe(
                "the tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
            );
        }
    }
    if name.is_empty() {
        return describe("the repository name is empty");
    }
    let mut components = name.split('/');
    let first = components.next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let path: Vec<&str> = if has_registry {
        components.collect()
    } else {
        name.split('/').collect()
    };
    if path.is_empty() {
        return describe("the repository path is empty");
    }
    for component in path {
        let valid = !component.is_empty()
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && component.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid {
            return describe(&format!(
                "repository path component \"{component}\" must be lowercase letters, digits and separators"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_references_fleets_use() {
        for image in [
            "ghcr.io/sei-protocol/sei:v6.3.0",
            "ghcr.io/sei-protocol/seictl@sha256:2cb320dd583000765520293d4e28ecc79fed4432c76760923d3aaa47803a4dbf",
            "quay.io/brancz/kube-rbac-proxy:v0.19.1",
            "localhost:5000/sei:dev",
            "busybox",
            "library/busybox:1.36",
            "registry.example.com:443/a/b/c:tag_1.0-rc",
        ] {
            assert_eq!(check_image(image), Ok(()), "{image}");
        }
    }

    #[test]
    fn refuses_empty_and_malformed_references_with_the_reason() {
        assert_eq!(check_image(""), Err("image is empty".to_owned()));
        for (image, why) in [
            ("ghcr.io/Sei/sei:v1", "repository path component \"Sei\""),
            ("sei: v1", "whitespace"),
            ("sei:", "the tag must be"),
            ("sei:-v1", "the tag must be"),
            ("sei@sha256:xyz", "the digest must be"),
            ("ghcr.io/", "repository path component \"\""),
            ("sei//node", "repository path component \"\""),
        ] {
            let err = check_image(image).expect_err(image);
            assert!(err.contains(why), "{image}: {err}");
            assert!(
                err.starts_with(&format!("image \"{image}\" is not a valid image reference")),
                "{err}"
            );
        }
    }
}
