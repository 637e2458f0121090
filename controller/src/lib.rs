//! The SeiNode reconciler.
//!
//! Publishes each node's TLS contract in `status.sidecarTLS`, keeps the `SidecarTLSSecretReady`
//! condition from the shared validation, and gates and runs the node's plan (ConfigMap for
//! kube-rbac-proxy, headless Service, StatefulSet). Watches SeiNodes, the objects it owns
//! (by label), and `kubernetes.io/tls` Secrets (metadata only), mapped to the nodes that name
//! them through an index. With leader election only the Lease holder reconciles.

pub mod config;
pub mod image;
pub mod index;
pub mod metrics;
pub mod plan;
pub mod probe;
pub mod reconcile;
pub mod resources;
pub mod secrets;
pub mod status;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller as Runtime, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::validation::TLS_SECRET_TYPE;
use thiserror::Error;

pub use config::{ControllerConfig, LeaderElection};
use index::SecretIndex;
use metrics::ControllerMetrics;
use reconcile::Context;

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("failed to set up leader election on Lease {namespace}/{name}")]
    LeaderElection {
        namespace: String,
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("leader election on Lease {name} stopped")]
    LeaseLost { name: String },
    #[error("invalid {flag}: {reason}")]
    Config { flag: &'static str, reason: String },
}

/// The controller, with its metrics registered.
pub struct Controller {
    config: ControllerConfig,
    ca_bundle: Option<Vec<u8>>,
    metrics: Arc<ControllerMetrics>,
}

impl Controller {
    /// Checks the configuration and registers the metrics.
    pub fn new(config: ControllerConfig, registry: &mut Registry) -> Result<Self, ControllerError> {
        image::check_image(&config.sidecar_image).map_err(|reason| ControllerError::Config {
            flag: "--sidecar-image",
            reason,
        })?;
        image::check_image(&config.rbac_proxy_image).map_err(|reason| ControllerError::Config {
            flag: "--rbac-proxy-image",
            reason,
        })?;
        let ca_bundle = match &config.sidecar_ca_bundle {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ControllerError::Config {
                    flag: "--sidecar-ca-bundle",
                    reason: format!("failed to read {}: {e}", path.display()),
                })?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(ControllerError::Config {
                        flag: "--sidecar-ca-bundle",
                        reason: format!("{} holds no PEM CERTIFICATE", path.display()),
                    });
                }
                Some(pem)
            }
            None => None,
        };
        let metrics = Arc::new(ControllerMetrics::register(registry));
        Ok(Self {
            config,
            ca_bundle,
            metrics,
        })
    }

    /// Reconciles until `shutdown` resolves. With leader election, waits for the Lease and
    /// reconciles only while holding it.
    pub async fn run(
        self,
        client: Client,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControllerError> {
        let Some(election) = self.config.leader_election.clone() else {
            run_controller(client, self.config, self.ca_bundle, self.metrics, shutdown).await;
            return Ok(());
        };
        let error = |source| ControllerError::LeaderElection {
            namespace: election.lease_namespace.clone(),
            name: election.lease_name.clone(),
            source,
        };
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &election.lease_name)
                .with_namespace(&election.lease_namespace)
                .with_identity(&election.identity)
                .with_duration(election.lease_duration.as_secs().max(2))
                .with_grace(election.renew_grace.as_secs().max(1))
                .with_field_manager(reconcile::FIELD_MANAGER)
                .build()
                .await
                .map_err(error)?;
        let (mut leading, lease_task) = manager.watch().await;
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        loop {
            // Wait to lead (or to stop).
            while !*leading.borrow_and_update() {
                tracing::info!(identity = %election.identity, "waiting for the leader lease");
                tokio::select! {
                    changed = leading.changed() => if changed.is_err() {
                        return Err(ControllerError::LeaseLost { name: election.lease_name.clone() });
                    },
                    () = shutdown.clone() => { drop(leading); let _ = lease_task.await; return Ok(()) }
                }
            }
            tracing::info!(identity = %election.identity, "leading: reconciling");
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let controller = tokio::spawn(run_controller(
                client.clone(),
                self.config.clone(),
                self.ca_bundle.clone(),
                self.metrics.clone(),
                async move {
                    let _ = stop_rx.await;
                },
            ));
            let stopping = tokio::select! {
                _ = async { while leading.changed().await.is_ok() && *leading.borrow() {} } => false,
                () = shutdown.clone() => true,
            };
            let _ = stop_tx.send(());
            let _ = controller.await;
            // A follower exports no per-node figures: the leader's are the current ones.
            self.metrics.tls.retain(|_, _| false);
            if stopping {
                // Dropping the receiver makes the lease task release the Lease.
                drop(leading);
                let _ = lease_task.await;
                return Ok(());
            }
            tracing::warn!(identity = %election.identity, "lost the leader lease: stopped reconciling");
        }
    }
}

/// The kube-runtime controller over SeiNodes, their owned objects and TLS Secrets.
async fn run_controller(
    client: Client,
    config: ControllerConfig,
    ca_bundle: Option<Vec<u8>>,
    metrics: Arc<ControllerMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let nodes: Api<SeiNode> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let index = Arc::new(SecretIndex::default());
    let node_index = index.clone();
    let node_stream = reflector::reflector(
        writer,
        watcher(nodes, watcher::Config::default()).default_backoff(),
    )
    .inspect(move |event| {
        if let Ok(event) = event {
            node_index.apply(event);
        }
    })
    .touched_objects();

    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        resources::MANAGED_BY_LABEL,
        resources::MANAGED_BY
    ));
    // Metadata only: the reconcile reads the one Secret it needs; the watch just wakes nodes.
    let secrets = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}")),
    )
    .default_backoff()
    .touched_objects();

    // kube-runtime wants a Sync trigger; relay the caller's future through a channel.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: config.reporter.clone(),
            instance: None,
        },
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        ca_bundle,
        recorder,
        metrics,
        reader.clone(),
    ));
    let pruning = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                ctx.prune();
            }
        })
    };
    Runtime::for_stream(node_stream, reader)
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<StatefulSet>::all(client), owned)
        .watches_stream(secrets, move |secret| {
            index.nodes_for(&secret.namespace().unwrap_or_default(), &secret.name_any())
        })
        .graceful_shutdown_on(async move {
            let _ = stop_rx.await;
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(error = %error, "controller event");
            }
            std::future::ready(())
        })
        .await;
    relay.abort();
    pruning.abort();
    tracing::info!("controller stopped");
}
