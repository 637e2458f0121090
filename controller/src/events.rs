//! The events the controller publishes about a node: one enum that owns reason, action and
//! note, and a name derived from the state the event reports, so publishing twice (after a
//! restart, or a retry) creates one event.

use crate::short_digest;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

/// events.k8s.io refuses notes longer than this many bytes.
pub const NOTE_LIMIT: usize = 1024;

/// Something worth telling the node's owner, decided from a status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// `SidecarTLSSecretReady` turned True (or was first reported True) at `at`.
    TlsSecretReady { message: String, at: Timestamp },
    /// `SidecarTLSSecretReady` turned False (or was first reported False) at `at`.
    TlsSecretNotReady { message: String, at: Timestamp },
    /// The certificate expires within the warning window.
    CertificateExpiring {
        secret: String,
        not_after: Timestamp,
        hours_left: i64,
    },
    /// A task of plan `plan` failed for good.
    PlanFailed {
        plan: String,
        task: String,
        error: String,
    },
    /// `SidecarReady` turned True at `at`.
    SidecarReady { note: String, at: Timestamp },
    /// `SidecarReady` turned False at `at`.
    SidecarNotReady { note: String, at: Timestamp },
}

impl NodeEvent {
    pub fn reason(&self) -> &'static str {
        match self {
            NodeEvent::TlsSecretReady { .. } => "SidecarTLSSecretReady",
            NodeEvent::TlsSecretNotReady { .. } => "SidecarTLSSecretNotReady",
            NodeEvent::CertificateExpiring { .. } => "SidecarTLSCertificateExpiring",
            NodeEvent::PlanFailed { .. } => "PlanFailed",
            NodeEvent::SidecarReady { .. } => "SidecarReady",
            NodeEvent::SidecarNotReady { .. } => "SidecarNotReady",
        }
    }

    pub fn is_warning(&self) -> bool {
        !matches!(
            self,
            NodeEvent::TlsSecretReady { .. } | NodeEvent::SidecarReady { .. }
        )
    }

    pub fn action(&self) -> &str {
        match self {
            NodeEvent::TlsSecretReady { .. }
            | NodeEvent::TlsSecretNotReady { .. }
            | NodeEvent::CertificateExpiring { .. } => "ValidateTLSSecret",
            NodeEvent::PlanFailed { task, .. } => task,
            NodeEvent::SidecarReady { .. } | NodeEvent::SidecarNotReady { .. } => "ProbeSidecar",
        }
    }

    /// The note, at most [`NOTE_LIMIT`] bytes (cut on a character boundary, marked with "…").
    pub fn note(&self) -> String {
        let full = match self {
            NodeEvent::TlsSecretReady { message, .. }
            | NodeEvent::TlsSecretNotReady { message, .. } => message.clone(),
            NodeEvent::CertificateExpiring {
                secret,
                not_after,
                hours_left,
            } => format!(
                "the certificate in Secret \"{secret}\" expires at {not_after} (in {hours_left}h); renew it before then or the node's TLS condition turns False"
            ),
            NodeEvent::PlanFailed { error, .. } => error.clone(),
            NodeEvent::SidecarReady { note, .. } | NodeEvent::SidecarNotReady { note, .. } => {
                note.clone()
            }
        };
        cap(full, NOTE_LIMIT)
    }

    /// What makes this event the same event when decided again: the condition and the instant
    /// it flipped, the certificate, the plan's task.
    /// (A stable digest: the name must not change with the process or the Rust release.)
    fn identity(&self, node_uid: &str) -> String {
        let what = match self {
            NodeEvent::TlsSecretReady { at, .. }
            | NodeEvent::TlsSecretNotReady { at, .. }
            | NodeEvent::SidecarReady { at, .. }
            | NodeEvent::SidecarNotReady { at, .. } => at.as_second().to_string(),
            NodeEvent::CertificateExpiring {
                secret, not_after, ..
            } => format!("{secret}\n{}", not_after.as_second()),
            NodeEvent::PlanFailed { plan, task, .. } => format!("{plan}\n{task}"),
        };
        short_digest([
            node_uid.as_bytes(),
            b"\n",
            self.reason().as_bytes(),
            b"\n",
            what.as_bytes(),
        ])
    }

    /// The events.k8s.io object for `regarding`, named after the event's identity.
    pub fn to_object(
        &self,
        regarding: ObjectReference,
        controller: &str,
        instance: &str,
        now: Timestamp,
    ) -> Event {
        let node_name = regarding.name.clone().unwrap_or_default();
        let uid = regarding.uid.clone().unwrap_or_default();
        // Event names are DNS subdomains (253); node names are at most 63.
        let name = format!("{node_name}.{}", self.identity(&uid));
        Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            action: Some(self.action().to_owned()),
            reason: Some(self.reason().to_owned()),
            note: Some(self.note()),
            type_: Some(
                if self.is_warning() {
                    "Warning"
                } else {
                    "Normal"
                }
                .to_owned(),
            ),
            event_time: Some(MicroTime(now)),
            reporting_controller: Some(controller.to_owned()),
            reporting_instance: Some(instance.to_owned()),
            regarding: Some(regarding),
            ..Event::default()
        }
    }
}

/// `text` cut to at most `limit` bytes on a character boundary, ending in "…" when cut.
pub fn cap(mut text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    const MARK: &str = "…";
    let mut end = limit - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("valid")
    }

    fn node_ref() -> ObjectReference {
        ObjectReference {
            api_version: Some("sei.io/v1alpha1".to_owned()),
            kind: Some("SeiNode".to_owned()),
            name: Some("rpc".to_owned()),
            namespace: Some("sei".to_owned()),
            uid: Some("u-1".to_owned()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn notes_are_capped_at_the_api_limit_on_a_character_boundary() {
        let long = "é".repeat(2000);
        let event = NodeEvent::TlsSecretNotReady {
            message: long,
            at: at(1),
        };
        let note = event.note();
        assert!(note.len() <= NOTE_LIMIT, "{}", note.len());
        assert!(note.ends_with('…'));
        assert!(note.len() > NOTE_LIMIT - 8, "cut close to the limit");
        let short = NodeEvent::SidecarReady {
            note: "ok".to_owned(),
            at: at(1),
        };
        assert_eq!(short.note(), "ok");
    }

    #[test]
    fn the_same_flip_gets_the_same_name_and_another_flip_another() {
        let flip = |second| NodeEvent::TlsSecretReady {
            message: "ready".to_owned(),
            at: at(second),
        };
        let name = |event: &NodeEvent| {
            event
                .to_object(node_ref(), "seinode-tls", "a", at(5))
                .metadata
                .name
                .expect("named")
        };
        assert_eq!(name(&flip(10)), name(&flip(10)));
        assert_ne!(name(&flip(10)), name(&flip(11)));
        let not_ready = NodeEvent::TlsSecretNotReady {
            message: "ready".to_owned(),
            at: at(10),
        };
        assert_ne!(name(&flip(10)), name(&not_ready));
        assert!(name(&flip(10)).starts_with("rpc."));
    }

    #[test]
    fn each_event_owns_its_reason_type_and_action() {
        let failed = NodeEvent::PlanFailed {
            plan: "init-1".to_owned(),
            task: "ApplyService".to_owned(),
            error: "in the way".to_owned(),
        };
        let object = failed.to_object(node_ref(), "seinode-tls", "a", at(5));
        assert_eq!(object.reason.as_deref(), Some("PlanFailed"));
        assert_eq!(object.action.as_deref(), Some("ApplyService"));
        assert_eq!(object.type_.as_deref(), Some("Warning"));
        assert_eq!(object.note.as_deref(), Some("in the way"));
        assert_eq!(object.regarding.and_then(|r| r.uid).as_deref(), Some("u-1"));
        let ready = NodeEvent::SidecarReady {
            note: "Healthy: ok".to_owned(),
            at: at(1),
        };
        assert!(!ready.is_warning());
        assert_eq!(ready.action(), "ProbeSidecar");
    }
}
