//! What one client can hold of a port, and of the webhook's memory.
//!
//! - **Connections**: a total cap and a cap per source address (over either, a new connection is
//!   closed at once), so one Pod cannot take the slots the API server needs.
//! - **Use, not bytes**: a connection is closed gracefully once no request that counts has
//!   arrived for the idle timeout (on the admission port an admission review answered; HTTP/2
//!   PINGs and cheap requests elsewhere do not count), and when it reaches its maximum age. A
//!   connection on which no byte moves for the idle timeout (a client that stops reading) is
//!   closed too. See [`crate::serve`].
//! - **Request bodies**: bytes of bodies being read are charged to a budget as they arrive, so
//!   memory is bounded by bytes in flight rather than by request count, and a body that trickles
//!   holds only what has arrived.
//! - **Requests**: a cap on decisions made at once, taken only once a body has fully arrived (a
//!   trickling body holds no slot); over it a request is shed with `429 Too Many Requests` and
//!   `Retry-After`, which the API server's client retries within the webhook's `timeoutSeconds`.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::metrics::WebhookMetrics;

// === Connections ===

/// The bounds of one port's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections; over it a new one is closed at once.
    pub max_connections: usize,
    /// Open connections from one source address; over it a new one from there is closed.
    pub max_per_source: usize,
    /// A connection is closed once no request that counts has arrived for this long, or no byte
    /// has moved for this long. Also the time an HTTP/1 request head may take.
    pub idle_timeout: Duration,
    /// A connection is closed gracefully at this age (HTTP/2: GOAWAY; HTTP/1: `Connection: close`
    /// on the next response), so that no client keeps one forever.
    pub max_age: Duration,
    /// The TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// A first request must begin within this of the connection's start.
    pub first_request_timeout: Duration,
    /// Streams open at once on one HTTP/2 connection.
    pub max_streams: u32,
}

/// How many connections are open, in all and per source address.
pub struct ConnectionSlots {
    max_connections: usize,
    max_per_source: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl ConnectionSlots {
    pub fn new(limits: &ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            max_connections: limits.max_connections,
            max_per_source: limits.max_per_source,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a connection from `source`, unless a cap is reached.
    pub fn try_admit(self: &Arc<Self>, source: IpAddr) -> Option<ConnectionSlot> {
        let source = source.to_canonical();
        let mut open = self.open.lock();
        let (total, per_source) = &mut *open;
        let from_source = per_source.entry(source).or_insert(0);
        if *total >= self.max_connections || *from_source >= self.max_per_source {
            if *from_source == 0 {
                per_source.remove(&source);
            }
            return None;
        }
        *from_source += 1;
        *total += 1;
        Some(ConnectionSlot {
            slots: self.clone(),
            source,
        })
    }
}

/// An open connection's place; freed when dropped.
pub struct ConnectionSlot {
    slots: Arc<ConnectionSlots>,
    source: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock();
        let (total, per_source) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(count) = per_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// The figures a port exports about its connections (the health port's are not exported).
#[derive(Clone, Default)]
pub struct ConnectionCounters {
    pub open: Gauge,
    pub refused: Counter,
    pub idle_closed: Counter,
}

impl ConnectionCounters {
    pub fn of(metrics: &WebhookMetrics) -> Self {
        Self {
            open: metrics.connections_open.clone(),
            refused: metrics.connections_refused.clone(),
            idle_closed: metrics.connections_idle_closed.clone(),
        }
    }
}

/// When a connection began and was last used; the request handlers that count as use mark it
/// through the request's extensions.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    /// Requests begun on this connection (any path).
    requests: AtomicU64,
    /// Milliseconds from `started` to the last use.
    last_use_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            last_use_ms: AtomicU64::new(0),
        })
    }

    pub(crate) fn request_began(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The connection was used: its idle time starts again.
    pub fn mark_use(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_use_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub(crate) fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the connection will have been unused for `idle` (unless used before).
    pub(crate) fn idle_deadline(&self, idle: Duration) -> Instant {
        self.started + Duration::from_millis(self.last_use_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Marks the connection a request came on as used (a no-op for a request that did not come
/// through [`crate::serve`], as in tests that call a router directly).
pub fn mark_use<B>(request: &axum::http::Request<B>) {
    if let Some(activity) = request.extensions().get::<Arc<Activity>>() {
        activity.mark_use();
    }
}

/// A TCP stream that holds its connection's slot and fails with `TimedOut` once no byte has
/// been read or written for the idle timeout.
pub struct GuardedStream {
    inner: TcpStream,
    idle_timeout: Duration,
    /// When a byte last moved. The timer is moved forward lazily, when it fires, so the hot
    /// path costs one clock read per I/O call.
    last_active: Instant,
    deadline: Pin<Box<Sleep>>,
    _slot: ConnectionSlot,
    counters: ConnectionCounters,
}

impl GuardedStream {
    pub fn new(
        inner: TcpStream,
        idle_timeout: Duration,
        slot: ConnectionSlot,
        counters: ConnectionCounters,
    ) -> Self {
        counters.open.inc();
        Self {
            inner,
            idle_timeout,
            last_active: Instant::now(),
            deadline: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
            counters,
        }
    }

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
                self.counters.idle_closed.inc();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no byte moved on the connection for too long",
                )));
            }
            self.deadline.as_mut().reset(due);
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.counters.open.dec();
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

// === Request bodies ===

/// What reading and deciding on a review costs in memory, per byte of its body: the body itself,
/// and what parsing keeps of it (at most the Secret values the judge reads, decoded, and their
/// certificates' DER while they are inspected).
pub const MEMORY_PER_BODY_BYTE: usize = 2;

/// The memory that bodies being read and decided on may take, in bytes. A body's bytes are
/// charged as they arrive (times [`MEMORY_PER_BODY_BYTE`]) and released when its request is
/// answered. A body that finds the budget spent releases what it held and is answered 429 (once
/// the client has sent it: the rest is read and dropped): waiting while holding part of the
/// budget would let bodies that each hold some wait on one another until their deadline.
pub struct BodyBudget {
    permits: Semaphore,
    bytes: usize,
    refused: Counter,
}

impl BodyBudget {
    pub fn new(bytes: usize, metrics: &WebhookMetrics) -> Self {
        Self {
            permits: Semaphore::new(bytes.min(Semaphore::MAX_PERMITS)),
            bytes,
            refused: metrics.requests_shed.clone(),
        }
    }

    /// The budget in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What is not charged now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// Why a body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than the endpoint's limit (a 400).
    TooLarge { limit: usize },
    /// Not all of it arrived before the deadline (a 400).
    Late { deadline: Duration },
    /// The budget stayed spent until the deadline (a 429 the API server retries).
    OverBudget { budget: usize },
    /// The connection failed while it was read (a 400, which nobody may read).
    Read(String),
}

impl BodyError {
    pub fn into_response(self) -> Response {
        let (status, message) = match self {
            BodyError::TooLarge { limit } => (
                StatusCode::BAD_REQUEST,
                format!("request body exceeds this endpoint's limit of {limit} bytes"),
            ),
            BodyError::Late { deadline } => (
                StatusCode::BAD_REQUEST,
                format!("the request body did not arrive within {deadline:?}"),
            ),
            BodyError::OverBudget { budget } => {
                return too_many(format!(
                    "the webhook is reading its maximum of {budget} bytes of requests \
                     (--max-body-memory); retry"
                ));
            }
            BodyError::Read(e) => (
                StatusCode::BAD_REQUEST,
                format!("failed to read the request body: {e}"),
            ),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            message + "\n",
        )
            .into_response()
    }
}

/// A body read within the budget; its charge is released when dropped.
pub struct ChargedBody<'a> {
    pub bytes: Bytes,
    _charge: Option<SemaphorePermit<'a>>,
}

/// Reads `body` (at most `limit` bytes) until `deadline`, charging the budget as bytes arrive.
/// A body that finds the budget spent releases what it holds and is read to its end without
/// being kept, so that the client, still sending, gets the 429 rather than a reset connection.
pub async fn read_body(
    budget: &BodyBudget,
    mut body: Body,
    limit: usize,
    deadline: Instant,
) -> Result<ChargedBody<'_>, BodyError> {
    let started = Instant::now();
    let read = async {
        // Frames as they came; joined once at the end, into exactly their length.
        let mut frames: Vec<Bytes> = Vec::new();
        let mut length = 0;
        let mut charge: Option<SemaphorePermit<'_>> = None;
        let mut over_budget = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if length + data.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            length += data.len();
            if over_budget {
                continue;
            }
            let cost = u32::try_from(data.len().saturating_mul(MEMORY_PER_BODY_BYTE))
                .map_err(|_| BodyError::TooLarge { limit })?;
            match budget.permits.try_acquire_many(cost) {
                Ok(permit) => match &mut charge {
                    Some(charge) => charge.merge(permit),
                    None => charge = Some(permit),
                },
                Err(_) => {
                    over_budget = true;
                    frames = Vec::new();
                    charge = None;
                    continue;
                }
            }
            frames.push(data);
        }
        if over_budget {
            budget.refused.inc();
            return Err(BodyError::OverBudget {
                budget: budget.bytes,
            });
        }
        Ok(ChargedBody {
            bytes: join(frames, length),
            _charge: charge,
        })
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(BodyError::Late {
            deadline: deadline.saturating_duration_since(started),
        }),
    }
}

fn join(mut frames: Vec<Bytes>, length: usize) -> Bytes {
    if frames.len() == 1 {
        return frames.pop().unwrap_or_default();
    }
    let mut joined = Vec::with_capacity(length);
    for frame in frames {
        joined.extend_from_slice(&frame);
    }
    joined.into()
}

// === Requests ===

/// The cap on admission requests decided at once.
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

    /// A slot while one is free, else the `429` (with `Retry-After: 1`) to answer at once.
    pub fn try_slot(&self) -> Result<SemaphorePermit<'_>, Box<Response>> {
        self.permits.try_acquire().map_err(|_| {
            self.shed.inc();
            Box::new(too_many(format!(
                "the webhook is handling its maximum of {} requests (--max-concurrent-requests); retry",
                self.max
            )))
        })
    }
}

fn too_many(message: String) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::RETRY_AFTER, "1"),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        message + "\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::Ipv4Addr;

    use super::*;

    fn limits(max_connections: usize, max_per_source: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_per_source,
            idle_timeout: Duration::from_secs(1),
            max_age: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            first_request_timeout: Duration::from_secs(1),
            max_streams: 1,
        }
    }

    #[test]
    fn a_source_holds_at_most_its_share_and_all_sources_at_most_the_total() {
        let slots = ConnectionSlots::new(&limits(3, 2));
        let a = IpAddr::from(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::from(Ipv4Addr::new(10, 0, 0, 2));
        let c = IpAddr::from(Ipv4Addr::new(10, 0, 0, 3));
        let a1 = slots.try_admit(a).unwrap();
        let _a2 = slots.try_admit(a).unwrap();
        assert!(slots.try_admit(a).is_none(), "over the per-source cap");
        // An IPv4-mapped IPv6 address is the same source.
        assert!(slots.try_admit(a.to_canonical()).is_none());
        let mapped = match a {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => unreachable!(),
        };
        assert!(slots.try_admit(mapped).is_none());
        let _b1 = slots.try_admit(b).unwrap();
        assert!(slots.try_admit(c).is_none(), "over the total");
        drop(a1);
        let _c1 = slots.try_admit(c).unwrap();
        assert!(slots.try_admit(a).is_none(), "total again");
    }

    #[tokio::test]
    async fn a_body_is_charged_as_it_arrives_and_released_when_dropped() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = WebhookMetrics::register(&mut registry);
        let budget = BodyBudget::new(100, &metrics);
        let deadline = Instant::now() + Duration::from_millis(200);
        let read = read_body(&budget, Body::from(vec![b'x'; 30]), 1000, deadline)
            .await
            .unwrap();
        assert_eq!(read.bytes.len(), 30);
        assert_eq!(
            budget.permits.available_permits(),
            100 - 30 * MEMORY_PER_BODY_BYTE
        );
        // A second body that does not fit is refused (once read to its end), and holds nothing.
        let refused = read_body(&budget, Body::from(vec![b'y'; 30]), 1000, deadline).await;
        assert!(matches!(
            refused,
            Err(BodyError::OverBudget { budget: 100 })
        ));
        assert_eq!(
            budget.permits.available_permits(),
            100 - 30 * MEMORY_PER_BODY_BYTE
        );
        drop(read);
        assert_eq!(budget.permits.available_permits(), 100);
        // Over the endpoint's limit: refused as such, whatever the budget.
        let deadline = Instant::now() + Duration::from_millis(200);
        let long = read_body(&budget, Body::from(vec![b'z'; 11]), 10, deadline).await;
        assert!(matches!(long, Err(BodyError::TooLarge { limit: 10 })));
        assert_eq!(budget.permits.available_permits(), 100);
    }
}
