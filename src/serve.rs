//! The long-running server commands against a real cluster: `webhook`, `controller` and `run`
//! (both co-processes in one process, sharing nothing but the API server and the metrics).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use futures::FutureExt;
use prometheus_client::registry::Registry;
use seinode_tls_controller::{Controller, ControllerConfig};
use seinode_tls_webhook::server::health_router;
use seinode_tls_webhook::{Webhook, WebhookConfig};

use crate::exit::error_chain;

/// Prefix of every metric this binary exports.
pub const METRICS_PREFIX: &str = "seinode_tls";

/// The registry of a server command: every metric under [`METRICS_PREFIX`], starting with
/// `seinode_tls_build_info{version}` (always 1), which says which build a pod runs.
pub fn registry() -> Registry {
    let mut registry = Registry::with_prefix(METRICS_PREFIX);
    registry.register(
        "build",
        "The build of this process (always 1)",
        prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry
}

/// Runs the webhook until SIGINT or SIGTERM.
pub fn webhook_main(config: WebhookConfig) -> ExitCode {
    run_to_exit(async move {
        let client = crate::api_client::infer().await?;
        let mut registry = registry();
        let webhook = Webhook::bind(config, &mut registry)?;
        webhook
            .run(client, Arc::new(registry), shutdown_signal())
            .await?;
        Ok(())
    })
}

/// Runs the controller until SIGINT or SIGTERM, with `/healthz`, `/readyz` (see
/// [`Controller::readiness`]) and `/metrics` on `health_addr`.
pub fn controller_main(config: ControllerConfig, health_addr: std::net::SocketAddr) -> ExitCode {
    run_to_exit(async move {
        let mut registry = registry();
        let controller = Controller::new(config, &mut registry)?;
        let readiness = controller.readiness();
        let clients = crate::api_client::controller_clients(
            &controller,
            crate::api_client::infer_config().await?,
        )?;
        let shutdown = shutdown_signal().shared();
        let listener = tokio::net::TcpListener::bind(health_addr)
            .await
            .with_context(|| format!("failed to bind {health_addr}"))?;
        let health = tokio::spawn(seinode_tls_webhook::server::serve_health(
            listener,
            health_router(readiness, Arc::new(registry)),
            seinode_tls_webhook::server::HEALTH_LIMITS,
            shutdown.clone(),
        ));
        controller.run(clients, shutdown).await?;
        health
            .await
            .context("health server task")?
            .context("health server")?;
        Ok(())
    })
}

/// Runs the webhook and the controller side by side until SIGINT or SIGTERM. Every replica
/// serves the webhook; with leader election only the leader reconciles.
pub fn run_main(webhook: WebhookConfig, controller: ControllerConfig) -> ExitCode {
    run_to_exit(async move {
        let mut registry = registry();
        let webhook = Webhook::bind(webhook, &mut registry)?;
        let controller = Controller::new(controller, &mut registry)?;
        let clients = crate::api_client::controller_clients(
            &controller,
            crate::api_client::infer_config().await?,
        )?;
        let registry = Arc::new(registry);
        let shutdown = shutdown_signal().shared();
        // If either co-process fails, stop the other too.
        let (failed_tx, failed_rx) = tokio::sync::watch::channel(false);
        let stop = {
            let shutdown = shutdown.clone();
            async move {
                let mut failed_rx = failed_rx;
                tokio::select! {
                    () = shutdown => {}
                    _ = failed_rx.wait_for(|failed| *failed) => {}
                }
            }
            .shared()
        };
        let webhook_task = {
            let (client, registry, stop, failed_tx) = (
                clients.lease().clone(),
                registry.clone(),
                stop.clone(),
                failed_tx.clone(),
            );
            tokio::spawn(async move {
                let result = webhook.run(client, registry, stop).await;
                let _ = failed_tx.send(result.is_err());
                result
            })
        };
        let controller_result = controller.run(clients, stop).await;
        if controller_result.is_err() {
            let _ = failed_tx.send(true);
        }
        let webhook_result = webhook_task.await.context("webhook task")?;
        webhook_result?;
        controller_result?;
        Ok(())
    })
}

/// Sets up logging and the runtime, runs `main` and turns its error (or its panic) into exit
/// status 1.
///
/// `main` runs as a task of the runtime, not on the thread that blocks on it: what `block_on`
/// polls runs outside the worker pool, so a controller whose reconciles ran there (the
/// `controller` and `run` commands without leader election) had every wake-up from the API
/// connection's tasks cross threads, and a third busy thread beside the two workers.
pub fn run_to_exit(main: impl Future<Output = anyhow::Result<()>> + Send + 'static) -> ExitCode {
    crate::telemetry::init();
    crate::telemetry::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let main = runtime.spawn(main);
    match runtime.block_on(main) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
        // The panic hook has printed the panic.
        Err(_) => ExitCode::FAILURE,
    }
}

/// Resolves on the first SIGINT or SIGTERM. Handlers are installed when this is called, so a
/// signal that arrives before the future is polled is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "failed to install signal handlers; stopping now");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// Every server command's `/metrics` says which build it runs.
    #[test]
    fn the_registry_exports_the_build() {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &super::registry()).unwrap();
        let line = format!(
            "seinode_tls_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == line), "{text}");
    }

    /// A command's work runs on the runtime's workers (where the API connection's tasks wake
    /// it), not on the thread that waits for it; its error or its panic is exit status 1.
    #[test]
    fn a_command_runs_as_a_task_and_fails_on_an_error_or_a_panic() {
        use std::process::ExitCode;
        let on_a_worker = super::run_to_exit(async {
            let thread = std::thread::current();
            anyhow::ensure!(
                thread.name() == Some("tokio-rt-worker"),
                "ran on thread {:?}",
                thread.name()
            );
            Ok(())
        });
        assert_eq!(on_a_worker, ExitCode::SUCCESS);
        let failed = super::run_to_exit(async { anyhow::bail!("no") });
        assert_eq!(failed, ExitCode::FAILURE);
        let panicked = super::run_to_exit(async { panic!("a reconcile panicked") });
        assert_eq!(panicked, ExitCode::FAILURE);
    }
}
