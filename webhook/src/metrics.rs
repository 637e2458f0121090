//! Prometheus metrics of the webhook. Labels come from small fixed sets; never object names.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::admission::{Outcome, WebhookKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WebhookLabel {
    validate_seinodes,
    mutate_seinodes,
    validate_secrets,
}

impl WebhookLabel {
    pub const ALL: [WebhookLabel; 3] = [
        WebhookLabel::validate_seinodes,
        WebhookLabel::mutate_seinodes,
        WebhookLabel::validate_secrets,
    ];
}

impl From<WebhookKind> for WebhookLabel {
    fn from(kind: WebhookKind) -> Self {
        match kind {
            WebhookKind::ValidateSeiNode => WebhookLabel::validate_seinodes,
            WebhookKind::MutateSeiNode => WebhookLabel::mutate_seinodes,
            WebhookKind::GuardSecret => WebhookLabel::validate_secrets,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OperationLabel {
    CREATE,
    UPDATE,
    DELETE,
    CONNECT,
    /// The request could not be read.
    unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OutcomeLabel {
    allowed,
    warned,
    patched,
    denied,
    /// HTTP 400: malformed, oversized or unsupported request.
    bad_request,
}

impl From<Outcome> for OutcomeLabel {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Allowed => OutcomeLabel::allowed,
            Outcome::AllowedWithWarnings => OutcomeLabel::warned,
            Outcome::Patched => OutcomeLabel::patched,
            Outcome::Denied => OutcomeLabel::denied,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub webhook: WebhookLabel,
    pub operation: OperationLabel,
    pub outcome: OutcomeLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LatencyLabels {
    pub webhook: WebhookLabel,
}

/// The webhook's metrics, registered under the registry's prefix.
#[derive(Debug)]
pub struct WebhookMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram>,
    pub serving_cert_not_after: Gauge<i64, AtomicI64>,
    pub serving_cert_reloads: Family<ReloadLabels, Counter>,
    /// The certificate files' watch could not be set up or reported an error (reloads then
    /// rely on the 30-second re-read).
    pub serving_cert_watch_failures: Counter,
    pub in_flight: Gauge,
    /// Requests answered 429: `--max-concurrent-requests` were being handled, or
    /// `--max-body-memory` was spent.
    pub requests_shed: Counter,
    pub connections_open: Gauge,
    /// Connections closed on accept because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Connections closed after `--idle-timeout` without a byte read or written.
    pub connections_idle_closed: Counter,
    /// TLS Secrets the metadata watch knows.
    pub secret_cache_known: Gauge,
    /// Of those, the ones whose inspection is held (some SeiNode names them).
    pub secret_cache_inspected: Gauge,
    /// On-demand reads of a Secret a new SeiNode names, by result.
    pub secret_reads: Family<SecretReadLabels, Counter>,
}

/// The results of an on-demand Secret read.
pub const SECRET_READ_RESULTS: [&str; 3] = ["read", "not_found", "failed"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SecretReadLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    success,
    failure,
}

impl WebhookMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "webhook_requests",
            "Admission requests by webhook, operation and outcome",
            requests.clone(),
        );
        // Every family exports from the start (a dashboard shows 0, not "no data"), and the
        // series an alert takes `rate()` of exist before their first increment, so it sees it.
        for webhook in WebhookLabel::ALL {
            let _series = requests.get_or_create(&RequestLabels {
                webhook,
                operation: OperationLabel::unknown,
                outcome: OutcomeLabel::bad_request,
            });
        }
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            // 50 µs to about 1.6 s.
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "webhook_request_duration_seconds",
            "Time from receiving an admission request to answering it",
            latency.clone(),
        );
        for webhook in WebhookLabel::ALL {
            let _series = latency.get_or_create(&LatencyLabels { webhook });
        }
        let serving_cert_not_after = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "webhook_serving_certificate_not_after_timestamp_seconds",
            "notAfter of the webhook's serving certificate, as a Unix time",
            serving_cert_not_after.clone(),
        );
        let serving_cert_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "webhook_serving_certificate_reloads",
            "Reloads of the serving certificate from disk, by result",
            serving_cert_reloads.clone(),
        );
        // Both series from the start, so that `increase()` sees a first failure.
        for result in [ReloadResult::success, ReloadResult::failure] {
            let _series = serving_cert_reloads.get_or_create(&ReloadLabels { result });
        }
        let serving_cert_watch_failures = Counter::default();
        registry.register(
            "webhook_serving_certificate_watch_failures",
            "Failures to watch the serving certificate files (reloads then rely on a 30-second re-read)",
            serving_cert_watch_failures.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "webhook_requests_in_flight",
            "Admission requests being handled now",
            in_flight.clone(),
        );
        let requests_shed = Counter::default();
        registry.register(
            "webhook_requests_shed",
            "Admission requests answered 429: every request slot taken, or the body memory budget spent",
            requests_shed.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "webhook_connections_open",
            "HTTPS connections open now",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "webhook_connections_refused",
            "HTTPS connections closed on accept because the connection limit was reached",
            connections_refused.clone(),
        );
        let connections_idle_closed = Counter::default();
        registry.register(
            "webhook_connections_idle_closed",
            "HTTPS connections closed because no byte moved for the idle timeout",
            connections_idle_closed.clone(),
        );
        let secret_cache_known = Gauge::default();
        registry.register(
            "webhook_secret_cache_known",
            "kubernetes.io/tls Secrets the webhook's metadata watch knows",
            secret_cache_known.clone(),
        );
        let secret_cache_inspected = Gauge::default();
        registry.register(
            "webhook_secret_cache_inspected",
            "TLS Secrets whose parsed content the webhook holds (those SeiNodes name)",
            secret_cache_inspected.clone(),
        );
        let secret_reads = Family::<SecretReadLabels, Counter>::default();
        registry.register(
            "webhook_secret_reads",
            "On-demand reads of a Secret named by a new SeiNode, by result (read, not_found, failed)",
            secret_reads.clone(),
        );
        for result in SECRET_READ_RESULTS {
            let _series = secret_reads.get_or_create(&SecretReadLabels { result });
        }
        Self {
            requests,
            latency,
            serving_cert_not_after,
            serving_cert_reloads,
            serving_cert_watch_failures,
            in_flight,
            requests_shed,
            connections_open,
            connections_refused,
            connections_idle_closed,
            secret_cache_known,
            secret_cache_inspected,
            secret_reads,
        }
    }

    /// Counts a read; `result` is one of [`SECRET_READ_RESULTS`].
    pub fn count_secret_read(&self, result: &'static str) {
        debug_assert!(SECRET_READ_RESULTS.contains(&result), "{result}");
        self.secret_reads
            .get_or_create(&SecretReadLabels { result })
            .inc();
    }
}
