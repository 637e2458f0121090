//! Serving a router on a port within [`ConnectionLimits`]: hyper's connection builders, driven
//! one task per connection, so that each connection can be closed gracefully on its own when it
//! is idle or old, which a server that only offers a global shutdown cannot do.
//!
//! A connection is accepted while the total and its source's share allow, gets its TLS
//! handshake (on the admission port) within a bound, must begin a request within a bound, and is
//! closed gracefully (HTTP/2 GOAWAY, or HTTP/1 close once no request is in flight) once no
//! request that counts has come for the idle timeout, and at its maximum age. What counts is up
//! to the handlers: they call [`crate::limits::mark_use`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Version, header};
use axum_server::tls_rustls::RustlsConfig;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::limits::{
    Activity, ConnectionCounters, ConnectionLimits, ConnectionSlot, ConnectionSlots, GuardedStream,
};

/// Most bytes of a request head (HTTP/1 read buffer, HTTP/2 header list): reviews carry a few
/// headers only.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// HTTP/2 flow-control windows: what a client may send before the server reads it, per stream
/// and per connection. Bodies are read as they arrive; these bound what sits unread.
const STREAM_WINDOW: u32 = 256 << 10;
const CONNECTION_WINDOW: u32 = 512 << 10;
/// After a graceful close begins, requests in flight get this long before the connection is
/// dropped.
const CLOSING_GRACE: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors, most likely), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A port to serve: what it serves, whether over TLS, and within what limits.
pub struct Port {
    pub listener: TcpListener,
    pub router: Router,
    pub tls: Option<RustlsConfig>,
    pub limits: ConnectionLimits,
    pub counters: ConnectionCounters,
}

/// Serves `port` until `shutdown` resolves; then stops accepting, closes every connection
/// gracefully and waits up to `grace` for requests in flight.
pub async fn serve(
    port: Port,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> std::io::Result<()> {
    let slots = ConnectionSlots::new(&port.limits);
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = port.listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "failed to accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Some(slot) = slots.try_admit(peer.ip()) else {
                    // Dropping the stream closes it; the client sees the connection end at once.
                    port.counters.refused.inc();
                    continue;
                };
                connections.spawn(connection(
                    tcp,
                    slot,
                    ConnectionContext {
                        router: port.router.clone(),
                        tls: port.tls.clone(),
                        limits: port.limits,
                        counters: port.counters.clone(),
                        stopping: stopping.clone(),
                    },
                ));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(port.listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "connections still open after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

struct ConnectionContext {
    router: Router,
    tls: Option<RustlsConfig>,
    limits: ConnectionLimits,
    counters: ConnectionCounters,
    stopping: watch::Receiver<bool>,
}

async fn connection(tcp: TcpStream, slot: ConnectionSlot, context: ConnectionContext) {
    let _ = tcp.set_nodelay(true);
    let stream = GuardedStream::new(
        tcp,
        context.limits.idle_timeout,
        slot,
        context.counters.clone(),
    );
    let activity = Activity::new();
    match context.tls.clone() {
        None => drive(TokioIo::new(stream), false, activity, context).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.get_inner());
            let handshake =
                tokio::time::timeout(context.limits.handshake_timeout, acceptor.accept(stream));
            let Ok(Ok(tls)) = handshake.await else {
                return;
            };
            let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            drive(TokioIo::new(tls), http2, activity, context).await;
        }
    }
}

/// Serves HTTP on one connection until it ends, closing it when the limits say so.
async fn drive<I>(io: TokioIo<I>, http2: bool, activity: Arc<Activity>, context: ConnectionContext)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ConnectionContext {
        router,
        limits,
        counters,
        mut stopping,
        ..
    } = context;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            activity.request_began();
            // HTTP/1 has no GOAWAY: an old connection is closed after its next response.
            let close_after =
                request.version() < Version::HTTP_2 && activity.age() >= limits.max_age;
            request.extensions_mut().insert(activity.clone());
            let router = router.clone();
            async move {
                let mut response = router.oneshot(request.map(Body::new)).await?;
                if close_after {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(MAX_HEAD_BYTES).unwrap_or(u32::MAX))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);

    let first_request_by = Instant::now() + limits.first_request_timeout;
    let mut closing_by: Option<Instant> = None;
    loop {
        // The earliest moment a limit may apply; at it, the limits are checked and the next one
        // computed (use moves the idle deadline on).
        let check = match closing_by {
            Some(deadline) => deadline,
            None => {
                let mut check = activity.idle_deadline(limits.idle_timeout);
                if activity.requests() == 0 {
                    check = check.min(first_request_by);
                }
                if http2 {
                    check =
                        check.min(Instant::now() + limits.max_age.saturating_sub(activity.age()));
                }
                check
            }
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = stopping.changed(), if closing_by.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_by = Some(Instant::now() + CLOSING_GRACE);
            }
            () = tokio::time::sleep_until(check) => {
                let now = Instant::now();
                if closing_by.is_some() {
                    // Requests in flight had their grace; drop the connection.
                    return;
                }
                if activity.requests() == 0 && now >= first_request_by {
                    // Nothing in flight: closed outright.
                    return;
                }
                let idle = now >= activity.idle_deadline(limits.idle_timeout);
                let old = http2 && activity.age() >= limits.max_age;
                if idle || old {
                    if idle {
                        counters.idle_closed.inc();
                    }
                    connection.as_mut().graceful_shutdown();
                    closing_by = Some(now + CLOSING_GRACE);
                }
            }
        }
    }
}
