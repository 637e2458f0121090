//! What one client can hold of the webhook: connections (a cap; over it a new connection is
//! closed at once), connections nobody uses (closed once no byte has moved for the idle
//! timeout, also a client that stops reading its response) and requests being handled (a cap;
//! over it a request is shed with `429 Too Many Requests` and `Retry-After`, which the API
//! server's client retries within the webhook's `timeoutSeconds`).
//!
//! The TLS handshake and the first request of a connection have their own 10-second bounds
//! (axum-server's), and an HTTP/1 request head must arrive within the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum_server::accept::Accept;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::WebhookMetrics;

/// Admits a new connection while fewer than the cap are open, and bounds its idle time.
#[derive(Clone)]
pub struct ConnectionGuard {
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
    open: Gauge,
    refused: Counter,
    idle_closed: Counter,
}

impl ConnectionGuard {
    pub fn new(max_connections: usize, idle_timeout: Duration, metrics: &WebhookMetrics) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
            open: metrics.connections_open.clone(),
            refused: metrics.connections_refused.clone(),
            idle_closed: metrics.connections_idle_closed.clone(),
        }
    }
}

impl ConnectionGuard {
    /// A guard whose figures are not exported (the health port's: its own connections are not
    /// the admission port's).
    pub fn unexported(max_connections: usize, idle_timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
            open: Gauge::default(),
            refused: Counter::default(),
            idle_closed: Counter::default(),
        }
    }
}

impl<S> Accept<TcpStream, S> for ConnectionGuard {
    type Stream = GuardedStream;
    type Service = S;
    type Future = std::future::Ready<io::Result<(GuardedStream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            // Dropping the stream closes it; the client sees the connection end before TLS.
            self.refused.inc();
            return std::future::ready(Err(io::Error::other("connection limit reached")));
        };
        self.open.inc();
        std::future::ready(Ok((
            GuardedStream {
                inner: stream,
                idle_timeout: self.idle_timeout,
                last_active: Instant::now(),
                deadline: Box::pin(tokio::time::sleep(self.idle_timeout)),
                _permit: permit,
                open: self.open.clone(),
                idle_closed: self.idle_closed.clone(),
            },
            service,
        )))
    }
}

/// A TCP stream that holds its connection slot and fails with `TimedOut` once no byte has
/// been read or written for the idle timeout.
pub struct GuardedStream {
    inner: TcpStream,
    idle_timeout: Duration,
    /// When a byte last moved. The timer is moved forward lazily, when it fires, so the hot
    /// path costs one clock read per I/O call.
    last_active: Instant,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
    open: Gauge,
    idle_closed: Counter,
}

impl GuardedStream {
    /// The outcome of an I/O call on the inner stream: progress (or an error) marks the stream
    /// active; while it waits, the idle deadline is checked, and once passed the call fails.
    fn track<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.last_active = Instant::now();
            return poll;
        }
        loop {
            ready!(self.deadline.as_mut().poll(cx));
            let due = self.last_active + self.idle_timeout;
            if Instant::now() >= due {
                self.idle_closed.inc();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                )));
            }
            self.deadline.as_mut().reset(due);
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.track(cx, poll)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.track(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.track(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Not tracked: a flush moves no byte of its own, and HTTP/2 flushes whenever its
    /// connection is polled, which the idle timer itself does.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The cap on admission requests being handled at once.
pub struct RequestLimit {
    permits: Semaphore,
    max: usize,
    shed: Counter,
}

impl RequestLimit {
    pub fn new(max: usize, metrics: &WebhookMetrics) -> Self {
        Self {
            permits: Semaphore::new(max),
            max,
            shed: metrics.requests_shed.clone(),
        }
    }
}

/// Middleware: runs the request while a slot is free (held until the response is built, body
/// read included), else answers `429` with `Retry-After: 1` at once.
pub async fn shed_over_limit(
    State(limit): State<Arc<RequestLimit>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = limit.permits.try_acquire() else {
        limit.shed.inc();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, "1"),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            ],
            format!(
                "the webhook is handling its maximum of {} requests (--max-concurrent-requests); retry\n",
                limit.max
            ),
        )
            .into_response();
    };
    next.run(request).await
}
