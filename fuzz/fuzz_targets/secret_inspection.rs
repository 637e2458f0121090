//! `inspect_tls_secret` over a Secret built from fuzz bytes: tls.crt, tls.key and ca.crt split
//! from the input, or raw DER or PEM beside a fixed certificate and key (the layouts are in the
//! crate's lib, where the corpus generator reads them too).
//!
//! Invariants: no panic, and a `Defective` detail never contains tls.key (checked when tls.key
//! is 8 bytes or more; an occurrence counts when it follows the key, see the lib).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use seinode_tls_crds::validation::{InspectedSecret, inspect_tls_secret};
use seinode_tls_fuzz::{FixedPair, SecretParts, find, rotated};
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};

/// Shorter keys could occur in a message by chance.
const MIN_KEY_LEN: usize = 8;

/// A valid leaf and its key (ECDSA P-256, from the project's testkit), made once per process.
fn fixed() -> &'static FixedPair {
    static FIXED: OnceLock<FixedPair> = OnceLock::new();
    FIXED.get_or_init(|| {
        let ca = CertificateAuthority::new("fuzz CA").expect("generate a CA");
        let leaf = ca
            .issue(&LeafSpec {
                common_name: "rpc",
                dns_names: &[
                    "rpc.sei.svc.cluster.local",
                    "rpc-0.rpc.sei.svc.cluster.local",
                ],
                server: true,
                ..Default::default()
            })
            .expect("issue a leaf");
        FixedPair {
            cert_pem: leaf.cert_pem.into_bytes(),
            key_pem: leaf.key_pem.into_bytes(),
        }
    })
}

/// The detail of a defective Secret; `None` when it is usable.
fn detail_of(parts: &SecretParts) -> Option<String> {
    match inspect_tls_secret(&parts.to_secret()) {
        InspectedSecret::Defective { detail, .. } => Some(detail),
        InspectedSecret::Usable(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(parts) = SecretParts::decode(data, fixed()) else {
        return;
    };
    let Some(detail) = detail_of(&parts) else {
        return;
    };
    let Some(key) = parts
        .tls_key
        .as_deref()
        .filter(|key| key.len() >= MIN_KEY_LEN && key.iter().any(u8::is_ascii_alphanumeric))
    else {
        return;
    };
    if find(detail.as_bytes(), key).is_none() {
        return;
    }
    let rotated_detail = detail_of(&parts.with_rotated_key()).unwrap_or_default();
    assert!(
        find(rotated_detail.as_bytes(), &rotated(key)).is_none(),
        "the Defective detail echoes tls.key ({} bytes): {detail:?}",
        key.len()
    );
});
