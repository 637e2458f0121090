//! Drift: whether an owned object is still what the controller would apply, from the watches'
//! copies alone (no API call). Every applied object is stamped with the sidecar contract it was
//! built for and a digest of the object as built; an object with the current stamp is compared
//! field by field (what the server adds and its canonical quantities aside), one with another
//! template is left as it is until the node's next plan, and one of an older contract is
//! restored.

use kube::{Resource, ResourceExt};
use seinode_tls_crds::SeiNode;
use serde::Serialize;

use crate::decide::ObjectState;
use crate::short_digest;

/// Annotation on every object the controller applies: a digest of the object as built, so an
/// object changed by someone else (restored) is told from one built by an older controller or
/// configuration (left as it is until the node's next plan, so an upgrade rolls no Pod).
pub const TEMPLATE_HASH_ANNOTATION: &str = "seinode-tls.sei.io/template-hash";
/// Annotation on every object the controller applies: the sidecar contract the object was
/// built for. Unlike a template change, an object built for an older contract is re-applied
/// (its pod rolls): a pod of the first contract left seictl's API open on the pod network.
pub const SIDECAR_CONTRACT_ANNOTATION: &str = "seinode-tls.sei.io/sidecar-contract";
/// The contract of this controller's objects: seictl in trusted-header mode behind
/// kube-rbac-proxy, `/v0` paths, `seinodetasks`.
pub const SIDECAR_CONTRACT: &str = "seictl-v1";

/// The state of an owned object against what the controller would apply (`desired`; `None`:
/// only its ownership is judged).
pub(crate) fn state<K: Resource + Serialize>(
    node: &SeiNode,
    observed: Option<&K>,
    desired: Option<&K>,
) -> ObjectState {
    let Some(observed) = observed else {
        return ObjectState::Missing;
    };
    let controller = observed
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match controller {
        Some(owner) if Some(&owner.uid) == node.metadata.uid.as_ref() => {
            let annotation =
                |object: &K, key: &str| object.meta().annotations.as_ref()?.get(key).cloned();
            let hash = |object: &K| annotation(object, TEMPLATE_HASH_ANNOTATION);
            if let Some(desired) = desired
                && hash(desired) != hash(observed)
            {
                if annotation(desired, SIDECAR_CONTRACT_ANNOTATION)
                    != annotation(observed, SIDECAR_CONTRACT_ANNOTATION)
                {
                    // Built for an older sidecar contract: restored now (see the constant).
                    return ObjectState::Drifted;
                }
                // Built from another template (an older controller, other flags): the next
                // plan of the node applies the current one.
                return ObjectState::Current;
            }
            let covered = desired.is_none_or(|desired| {
                match (
                    serde_json::to_value(observed),
                    serde_json::to_value(desired),
                ) {
                    (Ok(observed), Ok(desired)) => covers(&observed, &desired),
                    _ => true,
                }
            });
            if covered {
                ObjectState::Current
            } else {
                ObjectState::Drifted
            }
        }
        Some(owner) if owner.kind == "SeiNode" && owner.name == node.name_any() => {
            ObjectState::Orphaned
        }
        Some(owner) => {
            ObjectState::Foreign(format!("it is controlled by {} {}", owner.kind, owner.name))
        }
        None => ObjectState::Foreign("it has no controller owner".to_owned()),
    }
}

/// `object` with its [`SIDECAR_CONTRACT_ANNOTATION`] and [`TEMPLATE_HASH_ANNOTATION`]: a digest
/// of the object as built.
pub fn stamp<K: Resource + Serialize>(mut object: K) -> K {
    object
        .meta_mut()
        .annotations
        .get_or_insert_default()
        .insert(
            SIDECAR_CONTRACT_ANNOTATION.to_owned(),
            SIDECAR_CONTRACT.to_owned(),
        );
    let bytes = serde_json::to_vec(&object).unwrap_or_default();
    let hash = short_digest([bytes.as_slice()]);
    object
        .meta_mut()
        .annotations
        .get_or_insert_default()
        .insert(TEMPLATE_HASH_ANNOTATION.to_owned(), hash);
    object
}

/// Whether `observed` holds everything in `desired`: every field `desired` sets has the same
/// value (objects recursively, lists item by item; the server may add fields and defaults).
/// The quantities of `limits` and `requests` are compared by value: the API server stores them
/// in its canonical form (`1024Mi` as `1Gi`, `0.5` as `500m`), and a SeiNode's sidecar
/// resources are copied as their author wrote them.
pub fn covers(observed: &serde_json::Value, desired: &serde_json::Value) -> bool {
    covers_at(observed, desired, false)
}

fn covers_at(observed: &serde_json::Value, desired: &serde_json::Value, quantities: bool) -> bool {
    use serde_json::Value;
    match (observed, desired) {
        (Value::Object(observed), Value::Object(desired)) => desired.iter().all(|(key, want)| {
            // The values of a `limits` or `requests` map (flat: resource name → quantity).
            let quantities = quantities || matches!(key.as_str(), "limits" | "requests");
            want.is_null()
                || observed
                    .get(key)
                    .is_some_and(|have| covers_at(have, want, quantities))
        }),
        (Value::Array(observed), Value::Array(desired)) => {
            observed.len() >= desired.len()
                && desired
                    .iter()
                    .zip(observed)
                    .all(|(want, have)| covers(have, want))
        }
        (Value::String(have), Value::String(want)) if quantities && have != want => {
            quantity_value(have).is_some_and(|have| quantity_value(want) == Some(have))
        }
        (observed, desired) => observed == desired,
    }
}

/// A resource quantity's exact value as (negative, digits, power of ten), the digits without
/// trailing zeros (zero is `(false, 0, 0)`), so equal values compare equal whatever their
/// notation: `1Gi`, `1024Mi`, `1073741824`; `0.5`, `500m`, `5e-1`. `None` for what is not a
/// quantity, or too large to hold exactly.
fn quantity_value(text: &str) -> Option<(bool, u128, i64)> {
    let (negative, text) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let number_len = text
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, suffix) = text.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let mut digits: u128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        digits = digits
            .checked_mul(10)?
            .checked_add(u128::from(digit - b'0'))?;
    }
    let mut exponent = -i64::try_from(fraction.len()).ok()?;
    let binary = |power: u32| digits.checked_mul(1u128.checked_shl(10 * power)?);
    match suffix {
        "Ki" => digits = binary(1)?,
        "Mi" => digits = binary(2)?,
        "Gi" => digits = binary(3)?,
        "Ti" => digits = binary(4)?,
        "Pi" => digits = binary(5)?,
        "Ei" => digits = binary(6)?,
        "n" => exponent -= 9,
        "u" => exponent -= 6,
        "m" => exponent -= 3,
        "" => {}
        "k" => exponent += 3,
        "M" => exponent += 6,
        "G" => exponent += 9,
        "T" => exponent += 12,
        "P" => exponent += 15,
        "E" => exponent += 18,
        _ => {
            let power = suffix.strip_prefix(['e', 'E'])?;
            let digits_only = power.strip_prefix(['-', '+']).unwrap_or(power);
            if digits_only.is_empty() || !digits_only.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            exponent = exponent.checked_add(power.parse::<i64>().ok()?)?;
        }
    }
    if digits == 0 {
        return Some((false, 0, 0));
    }
    while digits.is_multiple_of(10) {
        digits /= 10;
        exponent += 1;
    }
    Some((negative, digits, exponent))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;
    use crate::resources;

    #[test]
    fn covers_ignores_what_the_server_adds_and_sees_what_changed() {
        let desired = json!({"spec": {"replicas": 1, "template": {"containers": [{"name": "seid", "image": "sei:v1"}]}}});
        let defaulted = json!({"spec": {"replicas": 1, "revisionHistoryLimit": 10, "template": {"containers": [{"name": "seid", "image": "sei:v1", "imagePullPolicy": "IfNotPresent"}]}}});
        assert!(covers(&defaulted, &desired));
        let edited = json!({"spec": {"replicas": 1, "template": {"containers": [{"name": "seid", "image": "sei:v0"}]}}});
        assert!(!covers(&edited, &desired));
        let scaled = json!({"spec": {"replicas": 0, "template": {"containers": [{"name": "seid", "image": "sei:v1"}]}}});
        assert!(!covers(&scaled, &desired));
        let fewer = json!({"spec": {"replicas": 1, "template": {"containers": []}}});
        assert!(!covers(&fewer, &desired));
        assert!(covers(&json!({"a": 1}), &json!({"a": 1, "b": null})));
    }

    #[test]
    fn quantities_are_compared_by_value_whatever_their_notation() {
        for (a, b) in [
            ("1Gi", "1024Mi"),
            ("1Gi", "1073741824"),
            ("500m", "0.5"),
            ("500m", "5e-1"),
            ("1", "1000m"),
            ("1k", "1000"),
            ("1.5Gi", "1536Mi"),
            ("0", "0Mi"),
            ("-1", "-1000m"),
            ("2E", "2e18"),
        ] {
            assert!(
                quantity_value(a).is_some() && quantity_value(a) == quantity_value(b),
                "{a} and {b}: {:?} {:?}",
                quantity_value(a),
                quantity_value(b)
            );
        }
        for (a, b) in [("1Gi", "1G"), ("500m", "5"), ("1", "-1"), ("1Ki", "1k")] {
            assert_ne!(quantity_value(a), quantity_value(b), "{a} and {b}");
        }
        for text in [
            "", "Gi", ".", "1..2", "1.2.3", "1x", "1e", "1e+", "one", "--1", "1 Gi",
        ] {
            assert_eq!(quantity_value(text), None, "{text:?}");
        }
        // Too large to hold exactly: not a quantity here (the objects then differ).
        assert_eq!(
            quantity_value("999999999999999999999999999999999999999Ei"),
            None
        );
    }

    #[test]
    fn covers_compares_resource_quantities_by_value_and_nothing_else() {
        let desired = json!({"resources": {"limits": {"memory": "1024Mi", "cpu": "0.5"}, "requests": {"storage": "0.5Ti"}}});
        let canonical = json!({"resources": {"limits": {"memory": "1Gi", "cpu": "500m"}, "requests": {"storage": "512Gi"}}});
        assert!(covers(&canonical, &desired));
        let edited = json!({"resources": {"limits": {"memory": "2Gi", "cpu": "500m"}, "requests": {"storage": "512Gi"}}});
        assert!(!covers(&edited, &desired));
        // Elsewhere a string is a string.
        assert!(!covers(&json!({"image": "1k"}), &json!({"image": "1000"})));
    }

    /// An upgrade: objects from another template of the same sidecar contract stay until the
    /// node's next plan (no pod rolls); objects built for the first contract (no contract
    /// annotation: seictl's API open on the pod network) are drifted, and restored now.
    #[test]
    fn objects_of_an_older_sidecar_contract_are_drifted_other_templates_are_not() {
        let node = crate::decide::tests::node("ghcr.io/sei-protocol/sei:v6.3.0", 1);
        let owned = |mut service: Service| {
            service.metadata.owner_references =
                Some(node.controller_owner_ref(&()).into_iter().collect());
            service
        };
        let desired = stamp(resources::service(&node));
        assert_eq!(
            state(&node, Some(&owned(desired.clone())), Some(&desired)),
            ObjectState::Current
        );
        // Another template of this contract (an older controller's flags): left as it is.
        let mut other_template = owned(desired.clone());
        other_template
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(
                TEMPLATE_HASH_ANNOTATION.to_owned(),
                "0123456789abcdef".to_owned(),
            );
        assert_eq!(
            state(&node, Some(&other_template), Some(&desired)),
            ObjectState::Current
        );
        // Built by the first contract's controller: no contract annotation, another hash.
        let mut first_contract = other_template.clone();
        first_contract
            .metadata
            .annotations
            .get_or_insert_default()
            .remove(SIDECAR_CONTRACT_ANNOTATION);
        assert_eq!(
            state(&node, Some(&first_contract), Some(&desired)),
            ObjectState::Drifted
        );
    }
}
