//! The `SidecarTLSSecretReady` condition and the status bookkeeping around it.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use seinode_tls_crds::SIDECAR_TLS_SECRET_READY;
use seinode_tls_crds::validation::{Reason, SecretVerdict};

/// Condition type reporting whether the sidecar answers through its front door.
pub const SIDECAR_READY: &str = "SidecarReady";
/// Condition type summarising the node for kstatus, Flux, Argo CD and `kubectl wait`.
pub const READY: &str = "Ready";
/// `Ready` reasons, the first that holds (decide's `readiness`): True, the node serves.
pub const NODE_READY: &str = "NodeReady";
/// A TLS node whose Secret does not meet the contract.
pub const TLS_SECRET_NOT_READY: &str = "TLSSecretNotReady";
/// The node is Pending, Initializing or Failed.
pub const NOT_RUNNING: &str = "NotRunning";
/// Running, with an update or repair plan under way.
pub const PLAN_IN_PROGRESS: &str = "PlanInProgress";
/// Running, and the sidecar is not ready.
pub const SIDECAR_NOT_READY: &str = "SidecarNotReady";
/// Every `Ready` reason (for tools that explain them, such as `seinode-tls status`).
pub const READY_REASONS: [&str; 5] = [
    NODE_READY,
    TLS_SECRET_NOT_READY,
    NOT_RUNNING,
    PLAN_IN_PROGRESS,
    SIDECAR_NOT_READY,
];

/// A condition's status, as Kubernetes defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    /// Not known right now (the controller could not find out): neither a yes nor a no.
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// Whether `condition` holds (its status is `True`).
pub fn is_true(condition: &Condition) -> bool {
    condition.status == ConditionStatus::True.as_str()
}

impl From<bool> for ConditionStatus {
    fn from(ok: bool) -> Self {
        if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// A condition of `type_`. `lastTransitionTime` is kept from `existing` unless the status flips;
/// `observedGeneration` is the node's generation.
pub fn condition(
    type_: &str,
    status: impl Into<ConditionStatus>,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    existing: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let status = status.into().as_str();
    let last_transition_time = match existing {
        Some(existing) if existing.status == status => existing.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The `SidecarTLSSecretReady` condition for `verdict`: True when ready, Unknown while the
/// Secret cannot be read (a transient state, not a verdict on the Secret), else False.
pub fn tls_condition(
    verdict: &SecretVerdict,
    generation: Option<i64>,
    existing: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let (reason, message) = (verdict.reason.as_str(), verdict.message.as_str());
    let status = match verdict.reason {
        Reason::Ready => ConditionStatus::True,
        Reason::Unavailable => ConditionStatus::Unknown,
        _ => ConditionStatus::False,
    };
    condition(
        SIDECAR_TLS_SECRET_READY,
        status,
        reason,
        message,
        generation,
        existing,
        now,
    )
}

/// Whether going from `existing` to `new` is a flip worth an event (including first report):
/// ready or not. False and Unknown are both "not ready", so a transient read failure of a
/// Secret that was already failing tells nobody anything new.
pub fn flipped(existing: Option<&Condition>, new: &Condition) -> bool {
    existing.is_none_or(|existing| is_true(existing) != is_true(new))
}

/// Replaces the condition of `condition.type_` in `conditions`, keeping the others.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(slot) => *slot = condition,
        None => conditions.push(condition),
    }
}

/// Removes the condition of `type_`.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(reason: Reason) -> SecretVerdict {
        SecretVerdict {
            reason,
            message: format!("{reason} message"),
            not_after: None,
            missing_dns_names: vec![],
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid")
    }

    #[test]
    fn condition_is_true_only_when_ready() {
        let ready = tls_condition(&verdict(Reason::Ready), Some(2), None, at(10));
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "TLSSecretReady")
        );
        assert_eq!(ready.observed_generation, Some(2));
        for reason in Reason::ALL.into_iter().filter(|r| !r.is_ready()) {
            let c = tls_condition(&verdict(reason), Some(2), None, at(10));
            // A Secret that cannot be read is not known to be bad.
            let status = if reason == Reason::Unavailable {
                "Unknown"
            } else {
                "False"
            };
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                (status, reason.as_str())
            );
            assert_eq!(c.message, format!("{reason} message"));
        }
    }

    #[test]
    fn last_transition_time_moves_only_when_the_status_flips() {
        let first = tls_condition(&verdict(Reason::NotFound), Some(1), None, at(10));
        assert_eq!(first.last_transition_time, Time(at(10)));
        // Another False reason: same status, time kept.
        let second = tls_condition(
            &verdict(Reason::SansMismatch),
            Some(1),
            Some(&first),
            at(20),
        );
        assert_eq!(second.last_transition_time, Time(at(10)));
        assert_eq!(second.reason, "TLSSecretSANsMismatch");
        assert!(!flipped(Some(&first), &second));
        // False -> True: time moves.
        let third = tls_condition(&verdict(Reason::Ready), Some(1), Some(&second), at(30));
        assert_eq!(third.last_transition_time, Time(at(30)));
        assert!(flipped(Some(&second), &third));
        assert!(flipped(None, &first), "the first report counts as a flip");
        // False -> Unknown (a read failed): the time moves, as the status did, but nobody is
        // told: the node was not ready and still is not.
        let unknown = tls_condition(
            &verdict(Reason::Unavailable),
            Some(1),
            Some(&second),
            at(40),
        );
        assert_eq!(unknown.status, "Unknown");
        assert_eq!(unknown.last_transition_time, Time(at(40)));
        assert!(!flipped(Some(&second), &unknown));
        assert!(flipped(Some(&third), &unknown), "True -> Unknown is news");
    }

    #[test]
    fn set_and_remove_keep_other_conditions() {
        let other = Condition {
            type_: "SidecarReady".to_owned(),
            ..tls_condition(&verdict(Reason::Ready), None, None, at(1))
        };
        let mut conditions = vec![other.clone()];
        set_condition(
            &mut conditions,
            tls_condition(&verdict(Reason::NotFound), None, None, at(1)),
        );
        set_condition(
            &mut conditions,
            tls_condition(&verdict(Reason::Ready), None, None, at(2)),
        );
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[1].reason, "TLSSecretReady");
        remove_condition(&mut conditions, SIDECAR_TLS_SECRET_READY);
        assert_eq!(conditions, vec![other]);
    }
}
