//! The accept loop: HTTP/1.1 connections under a header-read deadline, a keep-alive idle
//! deadline, a header size limit and a cap on open connections.
//!
//! Why not `axum::serve`: it has none of these, so sockets that never finish their headers (or
//! sit idle between requests) pile up until the process runs out of file descriptors and honest
//! requests cannot even be accepted. Here:
//! - Every connection is driven by its own task that knows whether a request is in flight. With
//!   none in flight, the next request head must be complete within `header_read_timeout` of its
//!   first byte (else `408 header_timeout` and close), and an idle keep-alive connection is
//!   closed after `idle_timeout` (a fresh connection gets `header_read_timeout`).
//! - Head bytes read with no request in flight are counted; past `max_header_bytes` the
//!   connection gets `431 headers_too_large` (the JSON error shape) and is closed.
//! - At most `max_connections` are open. At the cap a new connection sheds the connection idle
//!   longest (no request in flight: slow or unfinished heads, idle keep-alive); with none idle
//!   the new one gets `503 overloaded` and is closed. A request in flight is never cut.
//!
//! Invariant: this module never reads a header's value or a body; it only counts bytes.

use super::error::ApiError;
use crate::reason::ReasonCode;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Connection limits (config `limits.*`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Time from a request head's first byte (or from accept) to its end.
    pub header_read_timeout: Duration,
    /// Time an open connection may sit with no request after a response.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Open connections at most (see [`default_max_connections`]).
    pub max_connections: usize,
}

/// Half the soft `RLIMIT_NOFILE` (the other half stays for the store pool, outbound HTTP, files
/// and the connections being shed), at least 16; 1024 when the limit cannot be read.
pub fn default_max_connections() -> usize {
    match nofile_soft_limit() {
        Some(n) => (n / 2).clamp(16, 100_000) as usize,
        None => 1024,
    }
}

/// The soft open-files limit, from `/proc/self/limits` (no `unsafe` for `getrlimit`).
fn nofile_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX / 4);
    }
    soft.parse().ok()
}

/// How a connection's task is told to stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    None = 0,
    /// Shed at the cap: close quietly.
    Shed = 1,
    /// The head outgrew `max_header_bytes`: 431.
    HeadTooLarge = 2,
}

/// One connection's state, shared by its task, its IO wrapper, its service and the accept loop.
struct ConnState {
    /// Requests in flight (0 or 1 on HTTP/1.1).
    in_flight: AtomicUsize,
    /// Head bytes read since the last request began (only counted with none in flight).
    head_bytes: AtomicUsize,
    /// When the connection last became idle (accept or end of a response), ms since `epoch`.
    idle_since_ms: AtomicU64,
    /// When the first byte of the pending head arrived (0: none yet), ms since `epoch` + 1.
    head_started_ms: AtomicU64,
    /// At least one request was served (idle deadline instead of the first-head deadline).
    served: AtomicBool,
    abort: AtomicUsize,
    wake: tokio::sync::Notify,
    /// The listener's start, shared by all its connections (idle times compare across them).
    epoch: Instant,
    /// The socket, to look (never read) for input not yet taken by hyper before shedding.
    stream: std::sync::Weak<TcpStream>,
}

impl ConnState {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn abort(&self, why: Abort) {
        if self
            .abort
            .compare_exchange(0, why as usize, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    fn aborted(&self) -> Abort {
        match self.abort.load(Ordering::SeqCst) {
            1 => Abort::Shed,
            2 => Abort::HeadTooLarge,
            _ => Abort::None,
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Bytes wait in the socket that hyper has not read yet: a request has just arrived (an
    /// honest client's head lands at once; the task may not have run yet). A peek, not a read.
    fn input_pending(&self) -> bool {
        let Some(s) = self.stream.upgrade() else {
            return false;
        };
        let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(&*s).peek(&mut one), Ok(n) if n > 0)
    }
}

/// Marks a request in flight for as long as it lives.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(s: &Arc<ConnState>) -> Self {
        s.in_flight.fetch_add(1, Ordering::SeqCst);
        s.head_bytes.store(0, Ordering::SeqCst);
        s.head_started_ms.store(0, Ordering::SeqCst);
        Self(s.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        s.served.store(true, Ordering::SeqCst);
        s.idle_since_ms.store(s.now_ms(), Ordering::SeqCst);
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The socket as hyper sees it: shared with the connection's task (which answers 408/431 on it
/// after hyper is dropped), counting head bytes on the way in.
struct Io {
    stream: Arc<TcpStream>,
    state: Arc<ConnState>,
    limit: usize,
    scratch: Vec<u8>,
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.aborted() == Abort::HeadTooLarge {
            // The task is about to answer 431 and drop this connection.
            return Poll::Pending;
        }
        let want = buf.remaining().min(this.scratch.len());
        loop {
            std::task::ready!(this.stream.poll_read_ready(cx))?;
            match this.stream.try_read(&mut this.scratch[..want]) {
                Ok(n) => {
                    if n > 0 && this.state.idle() {
                        let s = &this.state;
                        let _ = s.head_started_ms.compare_exchange(
                            0,
                            s.now_ms() + 1,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        let total = s.head_bytes.fetch_add(n, Ordering::SeqCst) + n;
                        if total > this.limit {
                            s.abort(Abort::HeadTooLarge);
                            return Poll::Pending;
                        }
                    }
                    buf.put_slice(&this.scratch[..n]);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task closes the socket once hyper is done with it.
        Poll::Ready(Ok(()))
    }
}

/// The open connections, for shedding at the cap and for graceful shutdown.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    empty: tokio::sync::Notify,
}

impl Registry {
    fn len(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn insert(&self, s: Arc<ConnState>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.conns.lock() {
            c.insert(id, s);
        }
        id
    }

    fn remove(&self, id: u64) {
        let empty = match self.conns.lock() {
            Ok(mut c) => {
                c.remove(&id);
                c.is_empty()
            }
            Err(_) => true,
        };
        if empty {
            self.empty.notify_waiters();
        }
    }

    /// Shed the connection idle longest (no request in flight, none just arriving, not already
    /// told to go). False: none is idle.
    fn shed_one(&self) -> bool {
        let Ok(c) = self.conns.lock() else {
            return false;
        };
        let mut idle: Vec<(u64, &Arc<ConnState>)> = c
            .values()
            .filter(|s| s.idle() && s.aborted() == Abort::None)
            .map(|s| (s.idle_since_ms.load(Ordering::SeqCst), s))
            .collect();
        idle.sort_unstable_by_key(|(t, _)| *t);
        match idle.into_iter().find(|(_, s)| !s.input_pending()) {
            Some((_, s)) => {
                s.abort(Abort::Shed);
                true
            }
            None => false,
        }
    }

    fn all(&self) -> Vec<Arc<ConnState>> {
        self.conns
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Counters for the log at shutdown and for tests reading the log.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    shed: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    idle_closed: AtomicU64,
    too_large: AtomicU64,
}

/// Serve `app` on `listener` until `shutdown` completes, then let requests in flight finish
/// (at most 30 s).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Arc::new(limits);
    let registry = Arc::new(Registry::default());
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let epoch = Instant::now();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE and aborted handshakes: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if registry.len() >= limits.max_connections {
            if registry.shed_one() {
                stats.shed.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                let bytes = ApiError::overloaded().http1_bytes();
                // Best effort, never waiting: the socket closes when dropped.
                let _ = stream.try_write(&bytes);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        let state = Arc::new(ConnState {
            in_flight: AtomicUsize::new(0),
            head_bytes: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            head_started_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            abort: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
            epoch,
            stream: Arc::downgrade(&stream),
        });
        let id = registry.insert(state.clone());
        let (registry, stats, limits, app, stop) = (
            registry.clone(),
            stats.clone(),
            limits.clone(),
            app.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            drive(stream, peer, state, app, &limits, &stats, stop).await;
            registry.remove(id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    for s in registry.all() {
        s.wake.notify_one();
    }
    let wait = async {
        while registry.len() > 0 {
            let notified = registry.empty.notified();
            if registry.len() == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), wait).await;
    tracing::info!(
        accepted = stats.accepted.load(Ordering::Relaxed),
        shed_idle = stats.shed.load(Ordering::Relaxed),
        refused_at_cap = stats.refused.load(Ordering::Relaxed),
        header_timeouts = stats.header_timeouts.load(Ordering::Relaxed),
        idle_closed = stats.idle_closed.load(Ordering::Relaxed),
        headers_too_large = stats.too_large.load(Ordering::Relaxed),
        "connections closed"
    );
}

/// What ended a connection early, decided by its task.
enum End {
    /// hyper finished (client closed, `Connection: close`, error).
    Done,
    /// Close without a word (shed, idle keep-alive, nothing sent yet).
    Quiet,
    /// Answer this and close.
    Answer(Vec<u8>),
}

async fn drive(
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    state: Arc<ConnState>,
    app: Router,
    limits: &ConnLimits,
    stats: &Stats,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let io = Io {
        stream: stream.clone(),
        state: state.clone(),
        limit: limits.max_header_bytes,
        scratch: vec![0; 16 * 1024],
    };
    let svc_state = state.clone();
    let svc = hyper::service::service_fn(move |mut req: axum::http::Request<Incoming>| {
        let guard = InFlight::begin(&svc_state);
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await;
            drop(guard);
            resp
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        // Deadlines are this module's; hyper's own would close without an answer.
        .header_read_timeout(None)
        // A backstop: our count answers 431 first.
        .max_buf_size((limits.max_header_bytes * 2).max(64 * 1024));
    // Boxed so that dropping it really drops hyper's handle on the socket (see `End::Answer`).
    let mut conn = Box::pin(builder.serve_connection(io, svc));
    let tick = (limits.header_read_timeout / 4)
        .clamp(Duration::from_millis(20), Duration::from_millis(250));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    let end = loop {
        tokio::select! {
            _ = conn.as_mut() => break End::Done,
            () = state.wake.notified() => {}
            _ = interval.tick() => {}
            r = stop.changed(), if !stopping => {
                stopping = true;
                let _ = r;
                conn.as_mut().graceful_shutdown();
            }
        }
        match state.aborted() {
            // Chosen while idle, but a request began meanwhile (its head was read between the
            // choice and now): never cut a request; the cap is exceeded by one for a moment.
            Abort::Shed if !state.idle() => {
                let _ = state.abort.compare_exchange(
                    Abort::Shed as usize,
                    Abort::None as usize,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            Abort::Shed => break End::Quiet,
            Abort::HeadTooLarge => {
                stats.too_large.fetch_add(1, Ordering::Relaxed);
                break End::Answer(ApiError::headers_too_large().http1_bytes());
            }
            Abort::None => {}
        }
        if !state.idle() {
            continue;
        }
        if stopping {
            break End::Quiet;
        }
        let now = state.now_ms();
        let started = state.head_started_ms.load(Ordering::SeqCst);
        if started > 0 {
            if now + 1 - started > limits.header_read_timeout.as_millis() as u64 {
                stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                break End::Answer(ApiError::header_timeout().http1_bytes());
            }
        } else {
            let served = state.served.load(Ordering::SeqCst);
            let allowed = if served {
                limits.idle_timeout
            } else {
                limits.header_read_timeout
            };
            if now - state.idle_since_ms.load(Ordering::SeqCst) > allowed.as_millis() as u64 {
                if served {
                    stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                break End::Quiet;
            }
        }
    };
    // Only a shed or idle connection is dropped here: never one with a request in flight
    // (those end as `Done`, or are waited for while stopping).
    drop(conn);
    if let End::Answer(bytes) = end {
        answer_and_close(stream, &bytes).await;
    }
}

/// Write `bytes`, half-close, and read what the client still sends for a moment (closing a socket
/// with unread input resets it, and the client would lose the answer).
async fn answer_and_close(stream: Arc<TcpStream>, bytes: &[u8]) {
    let Ok(mut stream) = Arc::try_unwrap(stream) else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(bytes).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 16 * 1024];
        let mut left: usize = 4 * 1024 * 1024;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<(), io::Error>(())
    })
    .await;
}

impl ApiError {
    fn overloaded() -> Self {
        let mut e = Self::of(ReasonCode::Overloaded);
        e.retry_after = Some(1);
        e
    }

    fn headers_too_large() -> Self {
        Self::of(ReasonCode::HeadersTooLarge)
    }

    fn header_timeout() -> Self {
        Self::of(ReasonCode::HeaderTimeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_half_the_fd_limit() {
        let n = default_max_connections();
        assert!(n >= 16);
        if let Some(soft) = nofile_soft_limit() {
            assert_eq!(n as u64, (soft / 2).clamp(16, 100_000));
        }
    }

    #[test]
    fn raw_answers_have_the_json_error_shape() {
        let b = ApiError::headers_too_large().http1_bytes();
        let text = String::from_utf8(b).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(v["error"], "headers_too_large");
        let len = format!("content-length: {}\r\n", body.len());
        assert!(text.contains(&len), "{text}");
    }
}
