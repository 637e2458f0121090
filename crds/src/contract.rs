//! The sidecar TLS contract: the DNS names a node's certificate must carry.
//!
//! The names are computable before the node exists, so platform tooling can issue the
//! certificate ahead of time (`seinode-tls contract`, the dry-run annotation, or
//! `status.sidecarTLS.requiredDNSNames` once the node exists).

use thiserror::Error;

/// Cluster DNS domain used when none is configured.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Annotation the mutating webhook sets on TLS-enabled SeiNodes: the contract, comma-separated.
pub const REQUIRED_DNS_NAMES_ANNOTATION: &str = "sei.io/sidecar-tls-required-dns-names";

/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Longest DNS name in its textual form (RFC 1035, as Kubernetes counts it).
const MAX_NAME_LEN: usize = 253;

/// The DNS names the sidecar's certificate must cover for SeiNode `name` in `namespace`:
/// the headless Service `name`, and pod 0 of the StatefulSet `name` behind it.
pub fn required_dns_names(name: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    vec![
        format!("{name}.{namespace}.svc.{cluster_domain}"),
        pod_dns_name(name, namespace, cluster_domain),
    ]
}

/// The name of the one Pod of SeiNode `name`'s StatefulSet.
pub fn pod_name(name: &str) -> String {
    format!("{name}-0")
}

/// The DNS name of pod 0 of SeiNode `name`'s StatefulSet (through its headless Service): the
/// name clients of the sidecar, the controller among them, verify the certificate against.
pub fn pod_dns_name(name: &str, namespace: &str, cluster_domain: &str) -> String {
    format!("{}.{name}.{namespace}.svc.{cluster_domain}", pod_name(name))
}

/// Why a node's contract can never be met by any certificate.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnsatisfiableContract {
    #[error(
        "DNS label \"{label}\" of required name \"{name}\" is {len} characters, over the limit of \
         63; no certificate can carry it (shorten the SeiNode or namespace name)"
    )]
    LabelTooLong {
        name: String,
        label: String,
        len: usize,
    },
    #[error(
        "required name \"{name}\" is {len} characters, over the DNS limit of 253; no certificate \
         can carry it (shorten the SeiNode name, the namespace or the cluster domain)"
    )]
    NameTooLong { name: String, len: usize },
    #[error("required name \"{name}\" has an empty DNS label")]
    EmptyLabel { name: String },
}

/// Longest SeiNode name whose objects can all exist: the StatefulSet controller labels each Pod
/// `controller-revision-hash: <name>-<hash of up to 10 characters>`, and a label value is at
/// most 63 characters.
pub const MAX_NODE_NAME_LEN: usize = MAX_LABEL_LEN - 11;

/// Checks that a SeiNode named `name` can ever run: its Service needs a DNS-1035 label (lowercase
/// letters, digits and '-', starting with a letter, ending with a letter or digit) and its
/// StatefulSet's Pods a revision label that fits (see [`MAX_NODE_NAME_LEN`]). The message says
/// which rule failed.
pub fn check_runnable_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(format!(
            "the name is {} characters, over {MAX_NODE_NAME_LEN}: the StatefulSet's Pods would be \
             labelled controller-revision-hash \"{name}-<hash>\", over the 63-character limit \
             of a label, so no Pod would ever be created",
            name.len()
        ));
    }
    let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
    let ends_alphanumeric = name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    let allowed = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(starts_with_letter && ends_alphanumeric && allowed) {
        return Err(
            "the name must be a DNS-1035 label (lowercase letters, digits and '-', starting \
             with a letter and ending with a letter or digit; no dots), as its headless Service \
             is named like it"
                .to_owned(),
        );
    }
    Ok(())
}

/// Port of kube-rbac-proxy in a node's pod, the TLS front door (the Service's port `api`).
pub const PROXY_PORT: i32 = 8443;

/// Checks that `spec.sidecar.port` leaves the pod's own ports free: seictl listening on the
/// proxy's port would keep the proxy from starting, or answer in its place.
pub fn check_sidecar_port(port: i32) -> Result<(), String> {
    if port == PROXY_PORT {
        return Err(format!(
            "spec.sidecar.port {port} is kube-rbac-proxy's port in the node's pod (the TLS front \
             door); choose another port for the sidecar, such as the default 7777"
        ));
    }
    Ok(())
}

/// Checks that every required name is a DNS name a certificate can carry.
pub fn check_satisfiable(required: &[String]) -> Result<(), UnsatisfiableContract> {
    for name in required {
        if name.len() > MAX_NAME_LEN {
            return Err(UnsatisfiableContract::NameTooLong {
                name: name.clone(),
                len: name.len(),
            });
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(UnsatisfiableContract::EmptyLabel { name: name.clone() });
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(UnsatisfiableContract::LabelTooLong {
                    name: name.clone(),
                    label: label.to_owned(),
                    len: label.len(),
                });
            }
        }
    }
    Ok(())
}

/// Whether a DNS SAN of a certificate covers `host`, as TLS clients verify host names:
/// case-insensitive; a wildcard only as the whole left-most label, matching exactly one label.
pub fn san_covers(san: &str, host: &str) -> bool {
    // A SAN with a trailing dot is not a valid reference identity: Go and rustls/webpki refuse
    // to match it, so it covers nothing.
    let host = host.strip_suffix('.').unwrap_or(host);
    if san.is_empty() || host.is_empty() || san.ends_with('.') {
        return false;
    }
    match san.strip_prefix("*.") {
        Some(rest) => {
            if rest.is_empty() || rest.contains('*') {
                return false;
            }
            match host.split_once('.') {
                Some((first, host_rest)) => {
                    !first.is_empty() && host_rest.eq_ignore_ascii_case(rest)
                }
                None => false,
            }
        }
        None => !san.contains('*') && san.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_names_are_service_then_pod_zero() {
        assert_eq!(
            required_dns_names("rpc", "sei", "cluster.local"),
            [
                "rpc.sei.svc.cluster.local",
                "rpc-0.rpc.sei.svc.cluster.local"
            ]
        );
        assert_eq!(
            required_dns_names("a", "b", "example.internal"),
            ["a.b.svc.example.internal", "a-0.a.b.svc.example.internal"]
        );
    }

    #[test]
    fn satisfiable_for_ordinary_names() {
        assert_eq!(
            check_satisfiable(&required_dns_names("rpc", "sei", "cluster.local")),
            Ok(())
        );
    }

    #[test]
    fn pod_label_over_63_characters_is_unsatisfiable() {
        // 62 characters is a valid SeiNode name, but "<name>-0" is then a 64-character label.
        let name = "n".repeat(62);
        let err = check_satisfiable(&required_dns_names(&name, "sei", "cluster.local"))
            .expect_err("64-character label");
        assert!(
            matches!(err, UnsatisfiableContract::LabelTooLong { len: 64, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("over the limit of 63"), "{err}");
    }

    #[test]
    fn name_over_253_characters_is_unsatisfiable() {
        let domain = [
            "d".repeat(60),
            "d".repeat(60),
            "d".repeat(60),
            "d".repeat(60),
        ]
        .join(".");
        let err =
            check_satisfiable(&required_dns_names("rpc", "sei", &domain)).expect_err("long name");
        assert!(
            matches!(err, UnsatisfiableContract::NameTooLong { .. }),
            "{err}"
        );
    }

    #[test]
    fn names_that_can_never_run_are_refused_with_the_rule_they_break() {
        assert!(check_runnable_name("rpc-0").is_ok());
        assert!(check_runnable_name(&"n".repeat(MAX_NODE_NAME_LEN)).is_ok());
        let long = check_runnable_name(&"n".repeat(MAX_NODE_NAME_LEN + 1)).unwrap_err();
        assert!(long.contains("controller-revision-hash"), "{long}");
        for bad in ["rpc.east", "0rpc", "rpc-", "Rpc", "rp_c"] {
            let err = check_runnable_name(bad).unwrap_err();
            assert!(err.contains("DNS-1035"), "{bad}: {err}");
        }
    }

    #[test]
    fn exact_match_is_case_insensitive() {
        assert!(san_covers(
            "RPC.Sei.svc.cluster.local",
            "rpc.sei.svc.cluster.local"
        ));
        assert!(
            !san_covers("rpc.sei.svc.cluster.local.", "rpc.sei.svc.cluster.local"),
            "a SAN with a trailing dot covers nothing (Go and rustls refuse it)"
        );
        assert!(!san_covers(
            "*.rpc.sei.svc.cluster.local.",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
        assert!(!san_covers(
            "rpc.sei.svc.cluster.local",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
    }

    #[test]
    fn wildcard_covers_exactly_one_left_most_label() {
        assert!(san_covers(
            "*.rpc.sei.svc.cluster.local",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
        assert!(san_covers(
            "*.SEI.svc.cluster.local",
            "rpc.sei.svc.cluster.local"
        ));
        // One label only: the service wildcard does not reach the pod name.
        assert!(!san_covers(
            "*.sei.svc.cluster.local",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
        // Not the bare parent either.
        assert!(!san_covers(
            "*.rpc.sei.svc.cluster.local",
            "rpc.sei.svc.cluster.local"
        ));
    }

    #[test]
    fn partial_and_inner_wildcards_never_match() {
        assert!(!san_covers(
            "rpc-*.rpc.sei.svc.cluster.local",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
        assert!(!san_covers(
            "r*.sei.svc.cluster.local",
            "rpc.sei.svc.cluster.local"
        ));
        assert!(!san_covers(
            "rpc-0.*.sei.svc.cluster.local",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
        assert!(!san_covers("*", "rpc"));
        assert!(!san_covers(
            "*.*.sei.svc.cluster.local",
            "rpc-0.rpc.sei.svc.cluster.local"
        ));
        assert!(!san_covers("", "rpc"));
    }
}
