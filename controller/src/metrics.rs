//! Prometheus metrics of the controller.
//!
//! Reconcile counters carry only fixed label sets. The per-node TLS figures are encoded at scrape
//! time from what the last reconcile of each node found; they carry the node's namespace and name
//! (a bounded set: one series per TLS node, dropped when the node goes). A certificate's expiry
//! is its absolute notAfter, like the webhook's own serving certificate's, so an alert computes
//! "expires within" with `time()` and one threshold.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use jiff::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use seinode_tls_crds::validation::Reason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReconcileOutcome {
    success,
    /// A transient error: retried with backoff.
    error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: ReconcileOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
    /// Whether the node had reached Running ("true"/"false"): alerts care about running ones.
    running: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    namespace: String,
    seinode: String,
}

/// What the last reconcile of a TLS node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTls {
    pub reason: Reason,
    pub not_after: Option<Timestamp>,
    /// Whether the node had reached Running (its pod may be serving with this Secret).
    pub running: bool,
}

/// TLS state per node `(namespace, name)`, shared by the reconciler and the collector.
#[derive(Debug, Default)]
pub struct TlsState {
    nodes: Mutex<HashMap<(String, String), NodeTls>>,
}

impl TlsState {
    pub fn set(&self, namespace: &str, name: &str, tls: NodeTls) {
        self.lock()
            .insert((namespace.to_owned(), name.to_owned()), tls);
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.lock().remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Keeps only the nodes for which `exists` holds (deleted nodes are never reconciled again).
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        self.lock().retain(|(ns, name), _| exists(ns, name));
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<(String, String), NodeTls>> {
        self.nodes.lock()
    }
}

#[derive(Debug)]
struct TlsCollector {
    state: Arc<TlsState>,
}

impl Collector for TlsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let nodes = self.state.lock().clone();
        let by_reason = Family::<ReasonLabels, Gauge>::default();
        for reason in Reason::ALL {
            for running in ["true", "false"] {
                by_reason
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str().to_owned(),
                        running: running.to_owned(),
                    })
                    .set(0);
            }
        }
        let not_afters = Family::<NodeLabels, Gauge>::default();
        for ((namespace, seinode), tls) in &nodes {
            by_reason
                .get_or_create(&ReasonLabels {
                    reason: tls.reason.as_str().to_owned(),
                    running: tls.running.to_string(),
                })
                .inc();
            if let Some(not_after) = tls.not_after {
                not_afters
                    .get_or_create(&NodeLabels {
                        namespace: namespace.clone(),
                        seinode: seinode.clone(),
                    })
                    .set(not_after.as_second());
            }
        }
        let metric = encoder.encode_descriptor(
            "controller_seinodes_by_tls_reason",
            "TLS-enabled SeiNodes by the reason of their SidecarTLSSecretReady condition",
            None,
            MetricType::Gauge,
        )?;
        by_reason.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "controller_tls_certificate_not_after_timestamp_seconds",
            "notAfter of the certificate in each TLS SeiNode's Secret, in seconds since the Unix epoch",
            None,
            <Gauge as TypedMetric>::TYPE,
        )?;
        not_afters.encode(metric)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProbeLabels {
    /// The `SidecarReady` reason (a fixed set).
    pub result: &'static str,
}

/// The controller's metrics.
#[derive(Debug)]
pub struct ControllerMetrics {
    pub reconciles: Family<OutcomeLabels, Counter>,
    pub probes: Family<ProbeLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub secret_reads: Counter,
    pub tls: Arc<TlsState>,
    /// 1 while this process reconciles (it leads, or runs without leader election), else 0.
    pub leader: Gauge,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "controller_reconciles",
            "Reconciles of SeiNodes by outcome",
            reconciles.clone(),
        );
        // Every family exports from the start (a dashboard shows 0, not "no data"), and the
        // series an alert takes `rate()` of exist before their first increment.
        for outcome in [ReconcileOutcome::success, ReconcileOutcome::error] {
            let _series = reconciles.get_or_create(&OutcomeLabels { outcome });
        }
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "controller_reconcile_duration_seconds",
            "Time spent in one reconcile of a SeiNode",
            reconcile_duration.clone(),
        );
        let probes = Family::<ProbeLabels, Counter>::default();
        registry.register(
            "controller_sidecar_probes",
            "Probes of sidecars through their front door, by result",
            probes.clone(),
        );
        for result in crate::sidecar::ProbeResult::REASONS {
            let _series = probes.get_or_create(&ProbeLabels { result });
        }
        let secret_reads = Counter::default();
        registry.register(
            "controller_secret_reads",
            "Reads of TLS Secrets from the API server (a reconcile reads its node's Secret only when the Secret watch reports a version not judged yet)",
            secret_reads.clone(),
        );
        let tls = Arc::new(TlsState::default());
        registry.register_collector(Box::new(TlsCollector { state: tls.clone() }));
        let leader = Gauge::default();
        registry.register(
            "controller_leader",
            "1 while this replica reconciles (it holds the leader Lease, or runs without leader election), else 0",
            leader.clone(),
        );
        Self {
            reconciles,
            probes,
            reconcile_duration,
            secret_reads,
            tls,
            leader,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_node_not_after_and_reason_counts_are_encoded_at_scrape_time() {
        let mut registry = Registry::with_prefix("seinode_tls");
        let metrics = ControllerMetrics::register(&mut registry);
        let in_a_day = Timestamp::now() + jiff::SignedDuration::from_hours(24);
        metrics.tls.set(
            "sei",
            "rpc",
            NodeTls {
                reason: Reason::Ready,
                not_after: Some(in_a_day),
                running: true,
            },
        );
        metrics.tls.set(
            "sei",
            "archive",
            NodeTls {
                reason: Reason::NotFound,
                not_after: None,
                running: false,
            },
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(
                r#"seinode_tls_controller_seinodes_by_tls_reason{reason="TLSSecretReady",running="true"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"seinode_tls_controller_seinodes_by_tls_reason{reason="TLSSecretNotFound",running="false"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"seinode_tls_controller_seinodes_by_tls_reason{reason="TLSSecretExpired",running="true"} 0"#
            ),
            "{text}"
        );
        let line = format!(
            r#"seinode_tls_controller_tls_certificate_not_after_timestamp_seconds{{namespace="sei",seinode="rpc"}} {}"#,
            in_a_day.as_second()
        );
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        assert!(
            !text.contains(r#"seinode="archive""#),
            "no certificate, no expiry series"
        );

        metrics.tls.retain(|_, name| name != "rpc");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            !text.contains(r#"seinode="rpc""#),
            "a deleted node's series goes: {text}"
        );
    }
}
