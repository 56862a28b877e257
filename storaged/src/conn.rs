//! Connections: who may connect, for how long, and how storaged ends one.
//!
//! Every accepted socket, TCP or Unix, passes [`Admission`]: at most
//! `connections_max` in all and `connections_per_peer_max` per peer (IP
//! address; uid on the Unix socket). A refused socket is closed at once and
//! logged (at most one line per [`LOG_EVERY`], with the count since), so a
//! flood can neither exhaust file descriptors nor the log. Accept errors
//! (EMFILE) back off instead of spinning.
//!
//! An admitted socket is wrapped in [`Conn`], which enforces two deadlines
//! on what it reads: the client's first 24 bytes (the HTTP/2 preface, a
//! TLS hello, or the bulk channel's hello) within `preface_timeout`, and,
//! once no call is in progress,
//! the next call within `idle_timeout`. Calls are counted by
//! [`TrackCallsLayer`]. Failing the socket's next read or write is how a
//! connection is ended: HTTP/2 then drops every stream of it, and with
//! them the messages it had not yet sent. Nothing else returns those: a
//! message handed to HTTP/2 stays there until the client's window lets it
//! out, so a stream whose client stopped reading ends its connection
//! ([`ConnState::close`]).
//!
//! Each connection also has a byte budget of pool buffers
//! ([`ConnState::inflight`], see `budget`).

pub mod read_interest;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::budget::Account;

/// Length of the HTTP/2 client preface.
const PREFACE_BYTES: usize = 24;

/// Most one log line per kind of refusal per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long accepting pauses after an accept error (EMFILE, ENFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// File descriptors kept for devices, the catalog, logs and regions when
/// `connections_max` is fitted under the process's limit.
const FDS_RESERVED: usize = 128;

/// The connection limits (see `ServerLimits`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub connections_max: usize,
    pub connections_per_peer_max: usize,
    pub preface_timeout: Duration,
    pub idle_timeout: Duration,
    /// Pool bytes one connection's calls may hold at once.
    pub inflight_bytes_max: usize,
}

/// Who a peer is, for the per-peer limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Ip(IpAddr),
    Uid(u32),
    Unknown,
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::Uid(uid) => write!(f, "uid {uid} (Unix socket)"),
            PeerKey::Unknown => f.write_str("an unknown peer"),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    #[error("{open} connections are open (connections_max)")]
    Total { open: usize },
    #[error("{peer} has {open} connections open (connections_per_peer_max)")]
    PerPeer { peer: PeerKey, open: usize },
}

/// `ConnState::closing` of an open connection.
const OPEN: u8 = 0;

/// Why storaged ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Fewer than 24 bytes arrived within `preface_timeout_s`.
    NoPreface = 1,
    /// No call for `connection_idle_timeout_s`.
    Idle = 2,
    /// A response stream's client read nothing for
    /// `stream_stall_timeout_s`.
    StalledStream = 3,
}

impl CloseReason {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(CloseReason::NoPreface),
            2 => Some(CloseReason::Idle),
            3 => Some(CloseReason::StalledStream),
            _ => None,
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::NoPreface => {
                "the client sent no HTTP/2 preface (or bulk channel hello) within preface_timeout_s"
            }
            CloseReason::Idle => "no call for connection_idle_timeout_s",
            CloseReason::StalledStream => {
                "a response stream's client read nothing for stream_stall_timeout_s"
            }
        })
    }
}

/// At most one log line per [`LOG_EVERY`], counting what it held back.
#[derive(Debug, Default)]
struct LogGate {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl LogGate {
    /// `Some(lines held back since the last one)` when a line may be
    /// written now.
    fn pass(&self) -> Option<u64> {
        let mut last = self.last.lock().expect("log gate poisoned");
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    per_peer: HashMap<PeerKey, usize>,
}

/// The admission control of one server (shared by its listeners).
#[derive(Debug)]
pub struct Admission {
    limits: ConnLimits,
    counts: Mutex<Counts>,
    next_id: AtomicU64,
    refusals: LogGate,
    timeouts: LogGate,
    accept_errors: LogGate,
    /// Connections refused since start.
    pub refused: AtomicU64,
}

/// An admitted connection's place in the counts; dropping it frees it.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    peer: PeerKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.admission.lock();
        c.open -= 1;
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
            next_id: AtomicU64::new(1),
            refusals: LogGate::default(),
            timeouts: LogGate::default(),
            accept_errors: LogGate::default(),
            refused: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().expect("admission counts poisoned")
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    /// Takes a place for a connection from `peer`, or says which limit
    /// stops it (and logs that, rate-limited).
    pub fn admit(self: &Arc<Self>, peer: PeerKey) -> Result<Slot, Refused> {
        let refused = {
            let mut c = self.lock();
            let of_peer = c.per_peer.get(&peer).copied().unwrap_or(0);
            if c.open >= self.limits.connections_max {
                Refused::Total { open: c.open }
            } else if of_peer >= self.limits.connections_per_peer_max {
                Refused::PerPeer {
                    peer,
                    open: of_peer,
                }
            } else {
                c.open += 1;
                *c.per_peer.entry(peer).or_insert(0) += 1;
                return Ok(Slot {
                    admission: Arc::clone(self),
                    peer,
                });
            }
        };
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.refusals.pass() {
            tracing::warn!(
                %peer,
                refused_since_last_line = held_back,
                "refusing a connection: {refused}"
            );
        }
        Err(refused)
    }

    /// Wraps an admitted socket.
    fn wrap<IO>(&self, io: IO, slot: Slot, remote: Remote) -> Conn<IO> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            peer: slot.peer,
            calls: AtomicUsize::new(0),
            last_call_end: Mutex::new(Instant::now()),
            closing: AtomicU8::new(OPEN),
            waker: AtomicWaker::new(),
            inflight: Account::new(format!("connection {id}"), self.limits.inflight_bytes_max),
        });
        Conn {
            io,
            info: ConnInfo { state, remote },
            preface_left: PREFACE_BYTES,
            deadline: Box::pin(tokio::time::sleep(self.limits.preface_timeout)),
            idle_timeout: self.limits.idle_timeout,
            slot,
        }
    }

    /// The TCP connections of `listener` that pass admission.
    pub fn tcp(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> impl Stream<Item = io::Result<Conn<tokio::net::TcpStream>>> + Send + 'static {
        let admission = Arc::clone(self);
        futures::stream::unfold(listener, move |listener| {
            let admission = Arc::clone(&admission);
            async move {
                loop {
                    let (socket, addr) = match listener.accept().await {
                        Ok(s) => s,
                        Err(e) => {
                            admission.accept_failed(&e).await;
                            continue;
                        }
                    };
                    let Ok(slot) = admission.admit(PeerKey::Ip(addr.ip())) else {
                        continue;
                    };
                    let _ = socket.set_nodelay(true);
                    let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(
                        &socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)),
                    );
                    let remote = Remote::Tcp(socket.connect_info());
                    let conn = admission.wrap(socket, slot, remote);
                    return Some((Ok(conn), listener));
                }
            }
        })
    }

    /// The Unix socket connections of `listener` that pass admission.
    pub fn unix(
        self: &Arc<Self>,
        listener: tokio::net::UnixListener,
    ) -> impl Stream<Item = io::Result<Conn<tokio::net::UnixStream>>> + Send + 'static {
        let admission = Arc::clone(self);
        futures::stream::unfold(listener, move |listener| {
            let admission = Arc::clone(&admission);
            async move {
                loop {
                    let socket = match listener.accept().await {
                        Ok((s, _)) => s,
                        Err(e) => {
                            admission.accept_failed(&e).await;
                            continue;
                        }
                    };
                    let info = socket.connect_info();
                    let peer = info
                        .peer_cred
                        .map_or(PeerKey::Unknown, |c| PeerKey::Uid(c.uid()));
                    let Ok(slot) = admission.admit(peer) else {
                        continue;
                    };
                    let conn = admission.wrap(socket, slot, Remote::Unix(info));
                    return Some((Ok(conn), listener));
                }
            }
        })
    }

    async fn accept_failed(&self, e: &io::Error) {
        if let Some(held_back) = self.accept_errors.pass() {
            tracing::warn!(
                error = %e,
                open = self.open(),
                errors_since_last_line = held_back,
                "accepting a connection failed (out of file descriptors?); pausing"
            );
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// Raises the soft limit on open files to the hard one, and returns
/// `connections_max` lowered to fit under it (with a warning), so a flood
/// of connections meets storaged's limit before the kernel's.
pub fn fit_to_fd_limit(connections_max: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return connections_max;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit read by the call only.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let fds = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    let room = fds.saturating_sub(FDS_RESERVED).max(1);
    if connections_max > room {
        tracing::warn!(
            connections_max,
            open_files_max = fds,
            lowered_to = room,
            "connections_max does not fit the open-file limit (ulimit -n); lowering it"
        );
        return room;
    }
    connections_max
}

/// The transport under a connection.
#[derive(Debug, Clone)]
pub enum Remote {
    Tcp(TcpConnectInfo),
    Unix(UdsConnectInfo),
}

/// What storaged tracks about one open connection.
#[derive(Debug)]
pub struct ConnState {
    pub id: u64,
    pub peer: PeerKey,
    calls: AtomicUsize,
    last_call_end: Mutex<Instant>,
    /// `OPEN`, or the `CloseReason` (as `u8`): read on every socket read
    /// and write, so an atomic rather than a lock.
    closing: AtomicU8,
    /// The task that reads the socket, woken to end the connection.
    waker: AtomicWaker,
    /// Pool bytes this connection's calls hold.
    pub inflight: Arc<Account>,
}

impl ConnState {
    /// Ends the connection: its next read or write fails, which drops
    /// every stream on it.
    pub fn close(&self, reason: CloseReason) {
        if self.set_closing(reason) {
            tracing::warn!(conn = self.id, peer = %self.peer, "closing connection: {reason}");
        }
        self.waker.wake();
    }

    fn closing(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.closing.load(Ordering::Acquire))
    }

    /// Records why the connection closes; `false` if it already was.
    fn set_closing(&self, reason: CloseReason) -> bool {
        self.closing
            .compare_exchange(OPEN, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Counts a call until the guard is dropped.
    pub fn call_started(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(Arc::clone(self))
    }
}

/// One call in progress on a connection.
#[derive(Debug)]
pub struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        *self.0.last_call_end.lock().expect("conn state poisoned") = Instant::now();
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
        // The reader re-arms its idle deadline from the new end time.
        self.0.waker.wake();
    }
}

/// In every request's extensions (as tonic's connect info).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub state: Arc<ConnState>,
    pub remote: Remote,
}

impl ConnInfo {
    /// The connection a request arrived on (under TLS or not).
    pub fn of(extensions: &http::Extensions) -> Option<&ConnInfo> {
        extensions.get::<ConnInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
    }

    /// The client's certificate chain (leaf first), on a TLS connection
    /// where the client sent one.
    pub fn peer_certs(
        extensions: &http::Extensions,
    ) -> Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>> {
        extensions
            .get::<TlsConnectInfo<ConnInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
    }

    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.remote {
            Remote::Tcp(t) => t.remote_addr(),
            Remote::Unix(_) => None,
        }
    }

    pub fn unix(&self) -> Option<&UdsConnectInfo> {
        match &self.remote {
            Remote::Unix(u) => Some(u),
            Remote::Tcp(_) => None,
        }
    }
}

/// An admitted socket; see the module docs.
pub struct Conn<IO> {
    io: IO,
    info: ConnInfo,
    /// Preface bytes still to arrive.
    preface_left: usize,
    /// The preface deadline, then the idle deadline.
    deadline: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    slot: Slot,
}

impl<IO> Conn<IO> {
    /// The same admitted connection over `f(io)`: another way of driving
    /// the same socket (see [`read_interest`]).
    pub fn map_io<T>(self, f: impl FnOnce(IO) -> io::Result<T>) -> io::Result<Conn<T>> {
        let Conn {
            io,
            info,
            preface_left,
            deadline,
            idle_timeout,
            slot,
        } = self;
        Ok(Conn {
            io: f(io)?,
            info,
            preface_left,
            deadline,
            idle_timeout,
            slot,
        })
    }

    /// Runs `f` on the socket itself (a send the `AsyncWrite` methods
    /// cannot make), after the same checks they make: the connection is
    /// not being closed and no deadline has passed.
    pub fn poll_io<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&IO, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.check(cx)?;
        f(&self.io, cx)
    }

    /// The socket under the admission's bookkeeping.
    pub fn io(&self) -> &IO {
        &self.io
    }

    fn timeouts(&self) -> &LogGate {
        &self.slot.admission.timeouts
    }

    /// Fails if the connection is being closed or a deadline passed; else
    /// arms the wakeups that will say so.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let state = Arc::clone(&self.info.state);
        state.waker.register(cx.waker());
        if let Some(reason) = state.closing() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                reason.to_string(),
            ));
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let reason = if self.preface_left > 0 {
                CloseReason::NoPreface
            } else if state.calls.load(Ordering::Acquire) > 0 {
                self.deadline
                    .as_mut()
                    .reset((now + self.idle_timeout).into());
                continue;
            } else {
                let idle_until =
                    *state.last_call_end.lock().expect("conn state poisoned") + self.idle_timeout;
                if idle_until > now {
                    self.deadline.as_mut().reset(idle_until.into());
                    continue;
                }
                CloseReason::Idle
            };
            state.set_closing(reason);
            if reason == CloseReason::NoPreface {
                if let Some(held_back) = self.timeouts().pass() {
                    tracing::warn!(conn = state.id, peer = %state.peer, closed_since_last_line = held_back, "closing connection: {reason}");
                }
            } else {
                tracing::debug!(conn = state.id, peer = %state.peer, "closing connection: {reason}");
            }
            return Err(io::Error::new(io::ErrorKind::TimedOut, reason.to_string()));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            if self.preface_left > 0 && n > 0 {
                self.preface_left = self.preface_left.saturating_sub(n);
                if self.preface_left == 0 {
                    // From now on the idle deadline applies (checked and
                    // re-armed in `check`).
                    let idle = tokio::time::Instant::now() + self.idle_timeout;
                    self.deadline.as_mut().reset(idle);
                }
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Counts each request as a call of its connection until its response
/// body is dropped (see [`ConnState::call_started`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls(inner)
    }
}

/// See [`TrackCallsLayer`].
#[derive(Debug, Clone)]
pub struct TrackCalls<S>(S);

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for TrackCalls<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body + Unpin,
{
    type Response = http::Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = ConnInfo::of(request.extensions()).map(|c| c.state.call_started());
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                inner: body,
                _call: guard,
            }))
        })
    }
}

/// A response body that keeps its call counted.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _call: Option<CallGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            connections_max: 3,
            connections_per_peer_max: 2,
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            inflight_bytes_max: 1 << 20,
        }
    }

    #[test]
    fn admission_counts_in_all_and_per_peer_and_frees_on_drop() {
        // Guards against a flood of connections from one peer (or from
        // many) taking every file descriptor.
        let a = Admission::new(limits());
        let one = PeerKey::Ip("10.0.0.1".parse().unwrap());
        let two = PeerKey::Ip("10.0.0.2".parse().unwrap());
        let s1 = a.admit(one).unwrap();
        let _s2 = a.admit(one).unwrap();
        assert!(matches!(
            a.admit(one),
            Err(Refused::PerPeer { open: 2, .. })
        ));
        let _s3 = a.admit(two).unwrap();
        assert!(matches!(
            a.admit(PeerKey::Uid(7)),
            Err(Refused::Total { open: 3 })
        ));
        drop(s1);
        assert_eq!(a.open(), 2);
        let _s4 = a.admit(one).unwrap();
        assert_eq!(a.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_log_gate_passes_one_line_per_period() {
        let g = LogGate::default();
        assert_eq!(g.pass(), Some(0));
        assert_eq!(g.pass(), None);
        assert_eq!(g.pass(), None);
        *g.last.lock().unwrap() = Some(Instant::now() - LOG_EVERY);
        assert_eq!(g.pass(), Some(2));
    }
}
