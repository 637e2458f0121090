//! Reading a node's TLS Secret and judging it, parsing each Secret version once, and reading
//! it only when the Secret watch says it changed since.

use std::sync::Arc;

use jiff::Timestamp;
use kube::Client;
use prometheus_client::metrics::counter::Counter;
use seinode_tls_crds::validation::{InspectedSecret, SecretLookup, SecretVerdict, judge};
use seinode_tls_kube::inspections::{Current, Inspections};
use seinode_tls_kube::versions::SecretVersions;

/// Inspections kept whole (the probe trusts their leaf and `ca.crt`), replaced when the
/// version moves and pruned when no node names the Secret any more.
pub struct SecretJudge {
    inspections: Inspections,
    versions: Arc<SecretVersions>,
    reads: Counter,
}

impl SecretJudge {
    /// A judge that reads a Secret only when `versions` (fed by the Secret watch) holds no
    /// version of it that was inspected already; each read counts in `reads`. A held inspection
    /// of exactly the version the watch reports is the Secret as it stands: a later change
    /// reaches the watch, which moves the version and wakes the Secret's nodes.
    pub fn new(versions: Arc<SecretVersions>, reads: Counter) -> Self {
        Self {
            inspections: Inspections::default(),
            versions,
            reads,
        }
    }

    /// Judges `namespace/name` against `required` at `now`: from the held inspection when the
    /// watch reports that very version, else read from the API server (authoritative: a Secret
    /// of another type is reported as malformed, not as missing). A failed read is
    /// `TLSSecretUnavailable`, never `TLSSecretNotFound`. Also returns the inspection, whose
    /// leaf the sidecar probe trusts.
    pub async fn verdict(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        required: &[String],
        now: Timestamp,
    ) -> (SecretVerdict, Option<Arc<InspectedSecret>>) {
        let watched = self.versions.get(namespace, name).flatten();
        let current = self
            .inspections
            .held_or_read(client, namespace, name, watched.as_deref())
            .await;
        if !matches!(current, Ok(Current::Held(_))) {
            self.reads.inc();
        }
        let inspected = match current {
            Ok(Current::Held(held)) => held,
            Ok(Current::Read(Some(secret))) => self.inspections.of(&secret),
            Ok(Current::Read(None)) => {
                let verdict = judge(namespace, name, SecretLookup::NotFound, required, now);
                return (verdict, None);
            }
            Err(error) => {
                let cause = match &error {
                    kube::Error::Api(status) => {
                        format!("API error {}: {}", status.code, status.message)
                    }
                    other => other.to_string(),
                };
                let lookup = SecretLookup::Unavailable(&cause);
                return (judge(namespace, name, lookup, required, now), None);
            }
        };
        let verdict = judge(
            namespace,
            name,
            SecretLookup::Found(&inspected),
            required,
            now,
        );
        (verdict, Some(inspected))
    }

    /// Keeps only the Secrets for which `keep(namespace, name)` holds.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.inspections.retain(keep);
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::core::PartialObjectMeta;
    use kube::runtime::watcher;
    use seinode_tls_crds::validation::Reason;
    use seinode_tls_testkit::{CertificateAuthority, LeafSpec};

    use super::*;

    /// An event of the Secret metadata watch.
    type MetaEvent = watcher::Event<PartialObjectMeta<Secret>>;

    /// An API server holding at most one Secret, counting the reads it serves and keeping the
    /// version each asked for.
    #[derive(Clone, Default)]
    struct FakeApi {
        secret: Arc<Mutex<Option<Secret>>>,
        reads: Arc<AtomicUsize>,
        asked: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl FakeApi {
        fn client(&self) -> Client {
            let api = self.clone();
            let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
                let api = api.clone();
                async move {
                    assert_eq!(request.method(), http::Method::GET);
                    assert_eq!(
                        request.uri().path(),
                        "/api/v1/namespaces/sei/secrets/rpc-tls"
                    );
                    api.reads.fetch_add(1, Ordering::SeqCst);
                    let version = request.uri().query().and_then(|query| {
                        query
                            .split('&')
                            .find_map(|pair| pair.strip_prefix("resourceVersion="))
                            .map(str::to_owned)
                    });
                    api.asked.lock().push(version);
                    let (code, body) = seinode_tls_testkit::get_answer(api.secret.lock().as_ref());
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(body))
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                }
            });
            Client::new(service, "default")
        }

        /// Stores `secret` at `version`; returns its metadata as the watch reports it.
        fn put(&self, secret: &Secret, version: &str) -> PartialObjectMeta<Secret> {
            let mut secret = secret.clone();
            secret.metadata.resource_version = Some(version.to_owned());
            *self.secret.lock() = Some(secret.clone());
            PartialObjectMeta {
                types: None,
                metadata: ObjectMeta {
                    resource_version: Some(version.to_owned()),
                    ..secret.metadata
                },
                _phantom: std::marker::PhantomData,
            }
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }

        /// The versions the reads since the last call asked for (`None`: a quorum read).
        fn asked(&self) -> Vec<Option<String>> {
            std::mem::take(&mut *self.asked.lock())
        }
    }

    #[tokio::test]
    async fn a_secret_is_read_only_when_the_watch_reports_a_version_not_judged_yet() {
        let required = required_names();
        let ca = CertificateAuthority::new("test CA").unwrap();
        let names: Vec<&str> = required.iter().map(String::as_str).collect();
        let leaf = ca
            .issue(&LeafSpec {
                common_name: "rpc",
                organizations: &[],
                dns_names: &names,
                ip_addresses: &[],
                server: true,
                client: false,
                valid_days: None,
            })
            .unwrap();
        let good =
            seinode_tls_testkit::tls_secret("sei", "rpc-tls", &leaf.cert_pem, &leaf.key_pem, None);
        let api = FakeApi::default();
        let client = api.client();
        let versions = Arc::new(SecretVersions::default());
        let judge = SecretJudge::new(versions.clone(), Counter::default());
        let reason = |verdict: (SecretVerdict, _)| verdict.0.reason;
        let verdict = || judge.verdict(&client, "sei", "rpc-tls", &required, Timestamp::now());

        // Before the watch has reported it: read every time.
        api.put(&good, "1");
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(api.reads(), 2);

        // The watch reports the version judged already: no read.
        versions.apply(&MetaEvent::Apply(api.put(&good, "1")));
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(api.reads(), 2);

        // A new version: read once, then judged from the inspection.
        let mut broken = good.clone();
        broken.data.as_mut().unwrap().insert(
            "tls.crt".to_owned(),
            k8s_openapi::ByteString(b"-----BEGIN CERTIFICATE-----\nAAAA\n".to_vec()),
        );
        versions.apply(&MetaEvent::Apply(api.put(&broken, "2")));
        assert_eq!(reason(verdict().await), Reason::Malformed);
        assert_eq!(reason(verdict().await), Reason::Malformed);
        assert_eq!(api.reads(), 3);
        assert_eq!(judge.reads.get(), 3);
        // Unknown to the watch: quorum reads; at a version the watch reported: from the cache.
        assert_eq!(api.asked(), [None, None, Some("2".to_owned())]);

        // Deleted: read (and found missing) every time.
        let gone = api.put(&broken, "2");
        *api.secret.lock() = None;
        versions.apply(&MetaEvent::Delete(gone));
        assert_eq!(reason(verdict().await), Reason::NotFound);
        assert_eq!(reason(verdict().await), Reason::NotFound);
        assert_eq!(api.reads(), 5);

        // Back, then gone while the watch was away: the relist that does not list it drops it.
        versions.apply(&MetaEvent::Apply(api.put(&good, "3")));
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(api.reads(), 6);
        *api.secret.lock() = None;
        versions.apply(&MetaEvent::Init);
        versions.apply(&MetaEvent::InitDone);
        assert_eq!(reason(verdict().await), Reason::NotFound);
        assert_eq!(api.reads(), 7);

        // A relist that does list it keeps it.
        versions.apply(&MetaEvent::Init);
        versions.apply(&MetaEvent::InitApply(api.put(&good, "4")));
        versions.apply(&MetaEvent::InitDone);
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(reason(verdict().await), Reason::Ready);
        assert_eq!(api.reads(), 8);
        // Deleted (two reads), back at 3, dropped by the relist, back at 4.
        let expected = [None, None, Some("3"), None, Some("4")].map(|v| v.map(str::to_owned));
        assert_eq!(api.asked(), expected);
    }

    fn required_names() -> Vec<String> {
        seinode_tls_crds::contract::required_dns_names("rpc", "sei", "cluster.local")
    }
}
