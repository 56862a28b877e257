//! The bulk channel's server side (wire format: `storaged_proto::bulk`,
//! docs/FORMAT.md "The bulk channel"): reads without HTTP/2.
//!
//! Two sockets speak it. On the Unix socket beside gRPC's, `ReadInto`
//! reads into a client's registered region (same host). On TCP (for
//! clients on other hosts), `Read` sends each item's verified window on
//! the connection itself, after a header carrying its checksum blocks'
//! CRCs, so the client receives it straight into its own memory and
//! checks it there: the network twin of `ReadInto`. A TCP connection
//! reads into a staging region of storaged's own (`TcpBulk`: taken at its
//! first `Read`, held until it closes, bounded per connection and in
//! all), in rounds of as many items as fit, and sends each item as soon
//! as it is read; the device writes the staging memory and the socket
//! reads it, so no byte is copied in user space.
//!
//! Connections arrive through the same admission as gRPC's (connection
//! counts, the first bytes' deadline, the idle deadline between
//! requests). The hello authenticates the peer as a gRPC call on the
//! same socket would be (the Unix socket's uid and gid, and a token if
//! sent; on TCP, the token); then each request runs as the gRPC call
//! would: one of its tenant's concurrent calls, its rights on the
//! dataset, regions of its own uid only, the connection's and tenant's
//! byte budgets. One request at a time per connection, answered whole
//! before the next: a client can make storaged hold one request's reads
//! per connection, no more. A frame that cannot be decoded is answered
//! INVALID_ARGUMENT and ends the connection (what follows it cannot be
//! trusted to be framed); a client that stops taking an answer for the
//! stall timeout loses its connection, and its staging with it.

use std::io::IoSlice;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use storaged_proto::bulk::{
    FrameError, HELLO_BYTES, Hello, HelloReply, ItemHeader, ItemReply, KIND_READ, ReadEnd,
    ReadFrame, ReadIntoFrame, ReadIntoReply, Request, VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::caller::CallId;
use super::codes::GrpcCode;
use super::zerocopy::{TcpSocket, ZEROCOPY_BYTES_MIN, ZeroCopy};
use super::*;
use crate::conn::Conn;
use crate::region::RegionMap;
use crate::store::read_into::{PlannedItem, ReadIntoOptions};

/// The method name bulk `ReadInto` requests are counted under in
/// `storaged_rpc_seconds`.
const METHOD_READ_INTO: &str = "bulk/ReadInto";
/// ... and bulk `Read` requests.
const METHOD_READ: &str = "bulk/Read";

/// How long a TCP bulk connection keeps its staging region between
/// requests: long enough that a busy client's next request finds it (a
/// new one costs a mapping and a pin), short enough that idle pooled
/// connections hold none.
const STAGING_IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// How often idle staging is looked at for unmapping, at most (the keep
/// time itself is `bulk_staging_keep_s`).
const STAGING_SWEEP_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// The TCP bulk channel's port and staging memory.
#[derive(Debug)]
pub(super) struct TcpBulk {
    pub port: u16,
    /// One connection's staging: the most one round holds, and the
    /// largest item span served.
    pub staging_bytes: u64,
    /// Staging memory left to map, in MiB: every staging region, held or
    /// idle, holds its share.
    staging_left_mib: Arc<tokio::sync::Semaphore>,
    staging_total_mib: usize,
    /// How long a staging region no connection holds stays mapped for the
    /// next one (`bulk_staging_keep_s`): a fresh one costs zeroing and
    /// pinning its pages, about 1 s of CPU per GiB here, which a client
    /// that reads in bursts would otherwise pay at each burst.
    staging_keep: std::time::Duration,
    /// Staging regions no connection holds, each with its share and since
    /// when it is idle.
    idle: std::sync::Mutex<Vec<(Staging, std::time::Instant)>>,
    /// Send windows with `MSG_ZEROCOPY` (`bulk_send_zerocopy`).
    pub send_zerocopy: bool,
    /// Zero-copy sends made, and those the kernel copied after all.
    pub zerocopy_sends: AtomicU64,
    pub zerocopy_copied: AtomicU64,
}

/// A staging region and its share of the total.
#[derive(Debug)]
struct Staging {
    region: Arc<RegionMap>,
    _share: tokio::sync::OwnedSemaphorePermit,
}

impl TcpBulk {
    pub(super) fn new(port: u16, limits: &crate::config::ServerLimits) -> Self {
        let total_mib = (limits.bulk_staging_bytes_total_max >> 20) as usize;
        Self {
            port,
            staging_bytes: limits.bulk_staging_bytes,
            staging_left_mib: Arc::new(tokio::sync::Semaphore::new(total_mib)),
            staging_total_mib: total_mib,
            staging_keep: std::time::Duration::from_secs(limits.bulk_staging_keep_s),
            idle: std::sync::Mutex::default(),
            send_zerocopy: limits.bulk_send_zerocopy,
            zerocopy_sends: AtomicU64::new(0),
            zerocopy_copied: AtomicU64::new(0),
        }
    }

    /// Keeps `staging` for the next connection, unless a read still holds
    /// its memory (a connection that broke mid-round: the engine keeps the
    /// region until its reads complete, and then it is unmapped). The
    /// sweeper unmaps it after `bulk_staging_keep_s` unused.
    fn give_back(&self, staging: Staging) {
        if Arc::strong_count(&staging.region) == 1 {
            let now = std::time::Instant::now();
            self.idle
                .lock()
                .expect("staging pool poisoned")
                .push((staging, now));
        }
    }

    /// Staging bytes connections hold now (mapped ones idle for the next
    /// connections not counted).
    pub(super) fn staging_in_use(&self) -> u64 {
        let idle = self.idle.lock().expect("staging pool poisoned").len() as u64;
        self.staging_mapped()
            .saturating_sub(idle * self.staging_bytes)
    }

    /// Staging bytes mapped now: held by connections or kept idle.
    pub(super) fn staging_mapped(&self) -> u64 {
        ((self.staging_total_mib - self.staging_left_mib.available_permits()) as u64) << 20
    }

    /// Unmaps the staging regions idle for `bulk_staging_keep_s` (looking
    /// every quarter of it, at most every 10 s), for as long as `pool` is
    /// in use (a task on the current runtime).
    pub(super) fn sweep_idle(pool: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(pool);
        let keep = pool.staging_keep;
        let every = (keep / 4).clamp(std::time::Duration::from_millis(100), STAGING_SWEEP_MAX);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                let now = std::time::Instant::now();
                let expired: Vec<_> = {
                    let mut idle = pool.idle.lock().expect("staging pool poisoned");
                    let (keep, expired) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|(_, since)| now.duration_since(*since) < keep);
                    *idle = keep;
                    expired
                };
                drop(expired);
            }
        });
    }

    /// A staging region for one connection, pinned for the engine where it
    /// can be; RESOURCE_EXHAUSTED when the total is taken.
    async fn take_staging(&self, store: &Arc<Store>) -> Result<Staging, Status> {
        if let Some((staging, _)) = self.idle.lock().expect("staging pool poisoned").pop() {
            return Ok(staging);
        }
        let mib = (self.staging_bytes >> 20) as u32;
        let share = Arc::clone(&self.staging_left_mib)
            .try_acquire_many_owned(mib)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "the bulk channel's staging memory ({} MiB, bulk_staging_total) is held by other connections; retry, or read over gRPC",
                    self.staging_total_mib
                ))
            })?;
        let len = self.staging_bytes as usize;
        let store = Arc::clone(store);
        // Mapping, faulting in and pinning 16 MiB takes milliseconds: not
        // on a runtime worker.
        let region = tokio::task::spawn_blocking(move || {
            let region = RegionMap::staging(len)?;
            store.fix_region(&region);
            Ok::<_, std::io::Error>(region)
        })
        .await
        .map_err(|e| Status::internal(format!("staging memory: {e}")))?
        .map_err(|e| Status::resource_exhausted(format!("staging memory: {e}")))?;
        Ok(Staging {
            region: Arc::new(region),
            _share: share,
        })
    }
}

/// A connection's staging, given back to the pool when the connection
/// releases it or ends, however it ends; and its zero-copy sends, if it
/// makes them.
struct StagingSlot {
    pool: Option<Arc<TcpBulk>>,
    held: Option<Staging>,
    zerocopy: Option<ZeroCopy>,
}

impl StagingSlot {
    /// Gives the staging back to the pool, unless the kernel may still
    /// send from it (zero-copy sends not known to be done): then it is
    /// unmapped when the kernel lets go, never written for another
    /// connection while this peer may still be sent its pages.
    fn release(&mut self) {
        let in_flight = self.zerocopy.as_ref().is_some_and(|z| z.outstanding() > 0);
        if let (Some(pool), Some(staging)) = (&self.pool, self.held.take())
            && !in_flight
        {
            pool.give_back(staging);
        }
    }

    /// Adds this connection's zero-copy sends since the last call to the
    /// pool's counters.
    fn count_zerocopy(&mut self, reported: &mut (u64, u64)) {
        if let (Some(pool), Some(z)) = (&self.pool, &self.zerocopy) {
            let (sends, copied) = z.counts();
            pool.zerocopy_sends
                .fetch_add(sends - reported.0, Ordering::Relaxed);
            pool.zerocopy_copied
                .fetch_add(copied - reported.1, Ordering::Relaxed);
            *reported = (sends, copied);
        }
    }
}

impl Drop for StagingSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// Who is at the other end of a bulk connection.
#[derive(Clone, Copy)]
enum Peer {
    /// On this host, by its credentials.
    Unix(tokio::net::unix::UCred),
    /// Elsewhere: known by its token only.
    Tcp,
}

impl StoragedService {
    /// Serves the bulk channel on every admitted connection of `conns`
    /// until the server stops.
    pub async fn serve_bulk<IO>(
        self,
        conns: impl Stream<Item = std::io::Result<crate::conn::Conn<IO>>> + Send + 'static,
    ) where
        IO: AsyncRead + AsyncWrite + TcpSocket + Unpin + Send + 'static,
    {
        let mut conns = std::pin::pin!(conns);
        let mut stopping = self.stopping.clone();
        loop {
            tokio::select! {
                next = conns.next() => match next {
                    Some(Ok(conn)) => {
                        tokio::spawn(self.clone().bulk_connection(conn));
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "bulk channel: accept failed"),
                    None => return,
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One connection: the hello, then requests until the client leaves,
    /// breaks the framing, or the server stops.
    async fn bulk_connection<IO>(self, mut conn: crate::conn::Conn<IO>)
    where
        IO: AsyncRead + AsyncWrite + TcpSocket + Unpin + Send + 'static,
    {
        use tonic::transport::server::Connected;
        let info = conn.connect_info();
        let peer = match info.unix() {
            None => Peer::Tcp,
            Some(u) => match u.peer_cred {
                Some(cred) => Peer::Unix(cred),
                None => {
                    // Without the peer's uid there is no telling whose
                    // regions these are.
                    let _ = hello_failed(
                        &mut conn,
                        Code::Unauthenticated,
                        "the peer's uid is unknown",
                    )
                    .await;
                    return;
                }
            },
        };
        let Some(principal) = self.bulk_hello(&mut conn, peer).await else {
            return;
        };
        let zerocopy = match (&self.bulk_tcp, conn.io().tcp()) {
            (Some(pool), Some(tcp)) if pool.send_zerocopy => match ZeroCopy::enable(tcp) {
                Ok(z) => Some(z),
                Err(error) => {
                    tracing::warn!(%error, "bulk channel: SO_ZEROCOPY refused; this connection copies");
                    None
                }
            },
            _ => None,
        };
        let mut staging = StagingSlot {
            pool: self.bulk_tcp.clone(),
            held: None,
            zerocopy,
        };
        let mut zerocopy_reported = (0, 0);
        let mut stopping = self.stopping.clone();
        loop {
            let mut len = [0u8; 4];
            let mut got = 0;
            while got < len.len() {
                // `read` (not `read_exact`): no bytes are lost when another
                // branch wins.
                tokio::select! {
                    read = conn.read(&mut len[got..]) => match read {
                        // Gone, or idle past the deadline (the admission's).
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    },
                    _ = stopping.wait_for(|stop| *stop) => return,
                    // An idle connection gives its staging back: a pool of
                    // them must not hold memory for reads nobody makes.
                    () = tokio::time::sleep(STAGING_IDLE_RELEASE), if staging.held.is_some() => {
                        if let (Some(z), Some(tcp)) = (staging.zerocopy.as_mut(), conn.io().tcp()) {
                            // Long since acknowledged, normally: learn so.
                            let _ = z.reap(tcp);
                        }
                        staging.release();
                    }
                }
            }
            let _call = info.state.call_started();
            let started = Instant::now();
            let len = u32::from_le_bytes(len) as usize;
            let mut kind = None;
            let request = if len > self.bulk_frame_bytes_max {
                Err(FrameError::TooLong {
                    what: "the request frame",
                    bytes: len,
                    max: self.bulk_frame_bytes_max,
                })
            } else {
                // Once its length is in, a frame arrives within the stall
                // timeout: a peer cannot hold its buffer by trickling.
                let mut body = vec![0u8; len];
                let read = tokio::time::timeout(self.stream_stall, conn.read_exact(&mut body));
                if !matches!(read.await, Ok(Ok(_))) {
                    return;
                }
                kind = body.first().copied();
                Request::decode(&body)
            };
            let (method, code, keep) = match request {
                Ok(Request::ReadInto(frame)) => {
                    let reply = match peer {
                        Peer::Unix(cred) => {
                            self.bulk_read_into(&principal, &info.state, cred.uid(), frame)
                                .await
                        }
                        Peer::Tcp => ReadIntoReply::failed(
                            Code::FailedPrecondition as u32,
                            crate::region::RegionError::NotLocal.to_string(),
                        ),
                    };
                    let code = Code::from(reply.code as i32);
                    let sent = self.bulk_reply(&mut conn, &reply).await;
                    (METHOD_READ_INTO, code, sent)
                }
                Ok(Request::Read(frame)) => {
                    let answered = self
                        .bulk_read(&principal, &info.state, &mut conn, &mut staging, frame)
                        .await;
                    staging.count_zerocopy(&mut zerocopy_reported);
                    match answered {
                        Ok(code) => (METHOD_READ, code, true),
                        // The connection broke or stalled mid-answer.
                        Err(_) => (METHOD_READ, Code::Unavailable, false),
                    }
                }
                Err(e) => {
                    let message = format!("bulk channel: {e}; closing the connection");
                    if kind == Some(KIND_READ) {
                        let _ = self
                            .bulk_read_failed(&mut conn, Code::InvalidArgument, &message)
                            .await;
                        (METHOD_READ, Code::InvalidArgument, false)
                    } else {
                        let reply = ReadIntoReply::failed(Code::InvalidArgument as u32, message);
                        let _ = self.bulk_reply(&mut conn, &reply).await;
                        (METHOD_READ_INTO, Code::InvalidArgument, false)
                    }
                }
            };
            self.bulk_requests.fetch_add(1, Ordering::Relaxed);
            crate::metrics::rpc::record_call(method, code, started.elapsed().as_secs_f64());
            if !keep {
                return;
            }
        }
    }

    /// Writes a `ReadInto` reply; whether the connection can go on.
    async fn bulk_reply<IO: AsyncWrite + Unpin>(
        &self,
        conn: &mut IO,
        reply: &ReadIntoReply,
    ) -> bool {
        let Ok(bytes) = reply.encode() else {
            return false;
        };
        // A reply is small; a client that does not take it within the
        // stall timeout is not reading at all.
        let written = tokio::time::timeout(self.stream_stall, conn.write_all(&bytes)).await;
        matches!(written, Ok(Ok(())))
    }

    /// Answers a `Read` that failed as a whole with its end frame alone.
    async fn bulk_read_failed<IO: AsyncWrite + TcpSocket + Unpin>(
        &self,
        conn: &mut Conn<IO>,
        code: Code,
        message: &str,
    ) -> std::io::Result<Code> {
        let end = ReadEnd {
            code: code as u32,
            message: message.to_owned(),
            items: 0,
        };
        self.bulk_send(conn, None, &encoded(end.encode())?, &[])
            .await?;
        Ok(code)
    }

    /// Writes `header` then `payload`, in one system call where the socket
    /// takes both, within the stall timeout; a large payload by reference
    /// where the connection makes zero-copy sends (`zerocopy`), after the
    /// header is copied.
    async fn bulk_send<IO: AsyncWrite + TcpSocket + Unpin>(
        &self,
        conn: &mut Conn<IO>,
        zerocopy: Option<&mut ZeroCopy>,
        header: &[u8],
        payload: &[u8],
    ) -> std::io::Result<()> {
        let send = async {
            if let Some(z) = zerocopy.filter(|_| payload.len() >= ZEROCOPY_BYTES_MIN) {
                conn.write_all(header).await?;
                let mut payload = payload;
                while !payload.is_empty() {
                    let n = std::future::poll_fn(|cx| {
                        conn.poll_io(cx, |io, cx| match io.tcp() {
                            Some(tcp) => z.poll_send(cx, tcp, payload),
                            None => std::task::Poll::Ready(Err(std::io::Error::other(
                                "zero-copy send on a socket that is not TCP",
                            ))),
                        })
                    })
                    .await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::WriteZero.into());
                    }
                    payload = &payload[n..];
                }
                return Ok(());
            }
            let (mut header, mut payload) = (header, payload);
            while !header.is_empty() {
                let n = conn
                    .write_vectored(&[IoSlice::new(header), IoSlice::new(payload)])
                    .await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                if n < header.len() {
                    header = &header[n..];
                } else {
                    payload = &payload[n - header.len()..];
                    header = &[];
                }
            }
            conn.write_all(payload).await
        };
        tokio::time::timeout(self.stream_stall, send)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client took nothing for stream_stall_timeout_s",
                )
            })?
    }

    /// One `Read` request, answered on `conn`: each item's header and
    /// window as it is read, then the end frame. Returns the call's code,
    /// or the I/O error that broke the connection.
    async fn bulk_read<IO: AsyncWrite + TcpSocket + Unpin>(
        &self,
        principal: &Principal,
        state: &Arc<ConnState>,
        conn: &mut Conn<IO>,
        slot: &mut StagingSlot,
        frame: ReadFrame,
    ) -> std::io::Result<Code> {
        let started = match self
            .start_bulk_read(principal, state, &mut slot.held, &frame)
            .await
        {
            Ok(started) => started,
            Err(status) => {
                return self
                    .bulk_read_failed(conn, status.code(), status.message())
                    .await;
            }
        };
        let (caller, plans, options) = started;
        let region = Arc::clone(&slot.held.as_ref().expect("taken by start_bulk_read").region);
        let region_offsets: Vec<u64> = frame.items.iter().map(|i| i.region_offset).collect();
        let capacity = crate::engine::ForeignMemory::len(&*region) as u64;
        let mut plans = plans.peekable();
        let mut at_by_index = vec![0u64; region_offsets.len()];
        let mut sent = 0u32;
        loop {
            // A round: as many items as fit in the staging region, back to
            // back; an item that could never fit fails alone.
            let mut round: Vec<(PlannedItem, u64)> = Vec::new();
            let mut too_large = Vec::new();
            let mut at = 0u64;
            while let Some(plan) = plans.peek() {
                let span = plan.span();
                if span > capacity {
                    too_large.push((plans.next().expect("peeked"), span));
                    continue;
                }
                if at + span > capacity {
                    break;
                }
                at_by_index[plan.index() as usize] = at;
                round.push((plans.next().expect("peeked"), at));
                at += span;
            }
            if round.is_empty() && too_large.is_empty() {
                break;
            }
            for (plan, span) in too_large {
                let header = ItemHeader {
                    index: plan.index(),
                    code: Code::ResourceExhausted as u32,
                    message: format!(
                        "item {} needs {span} bytes read at once; the bulk channel serves at most {capacity} per item (bulk_staging): split its range",
                        plan.index()
                    ),
                    region_offset: region_offsets[plan.index() as usize],
                    ..ItemHeader::default()
                };
                self.bulk_send(conn, None, &encoded(header.encode())?, &[])
                    .await?;
                sent += 1;
            }
            // The staging is about to be written: the kernel must be done
            // with pages sent from it by reference.
            if let (Some(z), Some(tcp)) = (slot.zerocopy.as_mut(), conn.io().tcp())
                && z.outstanding() > 0
            {
                tokio::time::timeout(self.stream_stall, z.settle(tcp))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client acknowledged nothing for stream_stall_timeout_s",
                        )
                    })??;
            }
            let reads = self
                .store
                .read_planned_into(Arc::clone(&region), round, options);
            let mut reads = std::pin::pin!(caller.budget.clone().scope_stream(reads));
            while let Some((index, result)) = reads.next().await {
                let i = index as usize;
                let mut header = ItemHeader {
                    index,
                    region_offset: region_offsets[i],
                    ..ItemHeader::default()
                };
                let mut window: &[u8] = &[];
                match result {
                    Ok(done) => {
                        header.lead = done.data_offset - at_by_index[i];
                        header.length = done.length;
                        header.window_bytes = done.window_bytes;
                        header.block_bytes = done.block_bytes;
                        header.crcs = done.crcs;
                        // SAFETY: the item's reads have all completed (its
                        // completion is here), no other item of the round
                        // shares its bytes, and the next round starts
                        // after this one's last item is sent.
                        window = unsafe {
                            region.completed(at_by_index[i] as usize, done.window_bytes as usize)
                        };
                    }
                    Err(error) => {
                        if error.code() == Code::DataLoss {
                            tracing::warn!(%error, "bulk Read item failed");
                        }
                        header.code = error.code() as u32;
                        header.message = error.to_string();
                    }
                }
                self.bulk_send(
                    conn,
                    slot.zerocopy.as_mut(),
                    &encoded(header.encode())?,
                    window,
                )
                .await?;
                sent += 1;
            }
        }
        drop(caller);
        let end = ReadEnd {
            code: 0,
            message: String::new(),
            items: sent,
        };
        self.bulk_send(conn, None, &encoded(end.encode())?, &[])
            .await?;
        Ok(Code::Ok)
    }

    /// A `Read`'s checks before any byte is read: the caller admitted
    /// (its tenant's concurrent calls), its right on the dataset, the
    /// items resolved, and the connection's staging taken.
    async fn start_bulk_read(
        &self,
        principal: &Principal,
        state: &Arc<ConnState>,
        staging: &mut Option<Staging>,
        frame: &ReadFrame,
    ) -> Result<
        (
            Caller,
            impl Iterator<Item = PlannedItem> + use<>,
            ReadIntoOptions,
        ),
        Status,
    > {
        let Some(tcp) = &self.bulk_tcp else {
            return Err(Status::failed_precondition(
                "this storaged does not serve the TCP bulk channel",
            ));
        };
        let caller = Caller::admit(
            principal.clone(),
            CallId::bulk(),
            Some(Arc::clone(state)),
            None,
        )?;
        let name = DatasetName::new(frame.dataset.clone()).map_err(invalid)?;
        self.authorize_read(&caller, "read", name.as_str()).await?;
        let ranges = frame
            .items
            .iter()
            .map(|i| {
                RangeSpec::try_from(&pb::ReadItem {
                    path: i.path.clone(),
                    offset: i.offset,
                    length: i.length,
                })
                .map_err(ReadError::from)
            })
            .collect();
        let plans = self.store.plan_read_into(&name, frame.dataset_id, ranges)?;
        if staging.is_none() {
            *staging = Some(tcp.take_staging(&self.store).await?);
        }
        let in_flight = match frame.max_in_flight {
            0 => self.store.limits().batch_in_flight_default,
            n => n,
        };
        let options = ReadIntoOptions {
            in_flight,
            verify: !frame.client_verifies,
            crcs: true,
            remote: true,
        };
        Ok((caller, plans, options))
    }

    /// Reads and answers the hello; the authenticated principal, or `None`
    /// when the connection is to end (answered already where it could be).
    async fn bulk_hello<IO>(
        &self,
        conn: &mut crate::conn::Conn<IO>,
        peer: Peer,
    ) -> Option<Principal>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut fixed = [0u8; HELLO_BYTES];
        conn.read_exact(&mut fixed).await.ok()?;
        let (version, token_len) = match Hello::decode_fixed(&fixed) {
            Ok(v) => v,
            Err(e) => {
                let _ =
                    hello_failed(conn, Code::InvalidArgument, &format!("bulk channel: {e}")).await;
                return None;
            }
        };
        if version != VERSION {
            let message = format!(
                "the client speaks bulk channel version {version}; this server speaks {VERSION}"
            );
            let _ = hello_failed(conn, Code::FailedPrecondition, &message).await;
            return None;
        }
        let mut token = vec![0u8; token_len];
        conn.read_exact(&mut token).await.ok()?;
        let Ok(token) = String::from_utf8(token) else {
            let _ = hello_failed(
                conn,
                Code::InvalidArgument,
                "the hello's token is not UTF-8",
            )
            .await;
            return None;
        };
        let (unix_uid, unix_gid) = match peer {
            Peer::Unix(cred) => (Some(cred.uid()), Some(cred.gid())),
            Peer::Tcp => (None, None),
        };
        let authenticated = self.tenants.authenticate(Presented {
            authorization: (!token.is_empty()).then_some(token.as_str()),
            unix_uid,
            unix_gid,
            cert_names: &[],
        });
        match authenticated {
            Ok(principal) => {
                let ok = HelloReply {
                    version: VERSION,
                    code: 0,
                    message: String::new(),
                };
                conn.write_all(&ok.encode()).await.ok()?;
                Some(principal)
            }
            Err(e) => {
                let status = Status::unauthenticated(e.to_string());
                let _ = self.record(
                    ("unauthenticated", "none".into()),
                    &CallId::bulk(),
                    "bulk_hello",
                    None,
                    Err(&status),
                );
                let _ = hello_failed(conn, status.code(), status.message()).await;
                None
            }
        }
    }

    /// One `ReadInto` request, answered whole: a failed call as its status,
    /// otherwise every item's outcome in request order.
    async fn bulk_read_into(
        &self,
        principal: &Principal,
        conn: &Arc<ConnState>,
        uid: u32,
        frame: ReadIntoFrame,
    ) -> ReadIntoReply {
        match self.bulk_read_into_call(principal, conn, uid, frame).await {
            Ok(reply) => reply,
            Err(status) => ReadIntoReply {
                region_unknown: status
                    .metadata()
                    .contains_key(storaged_proto::model::REGION_UNKNOWN_METADATA_KEY),
                ..ReadIntoReply::failed(status.code() as u32, status.message())
            },
        }
    }

    async fn bulk_read_into_call(
        &self,
        principal: &Principal,
        conn: &Arc<ConnState>,
        uid: u32,
        frame: ReadIntoFrame,
    ) -> Result<ReadIntoReply, Status> {
        let caller = Caller::admit(
            principal.clone(),
            CallId::bulk(),
            Some(Arc::clone(conn)),
            None,
        )?;
        let count = frame.items.len();
        let call = ReadIntoCall {
            dataset: frame.dataset,
            dataset_id: frame.dataset_id,
            region_id: frame.region_id,
            max_in_flight: frame.max_in_flight,
            items: frame.items.into_iter().map(Into::into).collect(),
        };
        self.learn_unit(&caller, &call.dataset).await;
        let (completions, _) = self.start_read_into(&caller, uid, call)?;
        let mut replies = vec![None; count];
        let mut completions = std::pin::pin!(caller.budget.clone().scope_stream(completions));
        while let Some((index, result)) = completions.next().await {
            let reply = match result {
                Ok(done) => ItemReply {
                    code: 0,
                    message: String::new(),
                    data_offset: done.data_offset,
                    length: done.length,
                    span_bytes: done.span_bytes,
                },
                Err(error) => {
                    if error.code() == Code::DataLoss {
                        tracing::warn!(%error, "bulk ReadInto item failed");
                    }
                    ItemReply {
                        code: error.code() as u32,
                        message: error.to_string(),
                        ..ItemReply::default()
                    }
                }
            };
            if let Some(slot) = replies.get_mut(index as usize) {
                *slot = Some(reply);
            }
        }
        let items = replies
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| Status::internal(format!("ReadInto ended without item {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(caller);
        Ok(ReadIntoReply {
            code: 0,
            message: String::new(),
            region_unknown: false,
            items,
        })
    }
}

/// A `ReadInto` as either transport asked for it.
pub(super) struct ReadIntoCall {
    pub dataset: String,
    pub dataset_id: Option<u64>,
    pub region_id: u64,
    pub max_in_flight: u32,
    pub items: Vec<pb::ReadIntoItem>,
}

/// A `ReadInto`'s completions from the store: (item index, outcome).
pub(super) type ReadIntoCompletions = Pin<
    Box<
        dyn Stream<
                Item = (
                    u32,
                    Result<crate::store::read_into::ReadIntoDone, ReadError>,
                ),
            > + Send,
    >,
>;

impl StoragedService {
    /// Starts `call` for `caller` (on the Unix socket as `uid`): its right
    /// on the dataset, its own region, the items validated (a bad one fails
    /// alone). Returns the store's completions and the items in flight.
    pub(super) fn start_read_into(
        &self,
        caller: &Caller,
        uid: u32,
        call: ReadIntoCall,
    ) -> Result<(ReadIntoCompletions, u32), Status> {
        let name = DatasetName::new(call.dataset).map_err(invalid)?;
        self.authorize_read_known(caller, "read_into", name.as_str())?;
        let principal = &caller.principal;
        let region = self.regions.get(call.region_id, |region| {
            region_is_callers(region, principal, uid)
        })?;
        let items = call
            .items
            .into_iter()
            .map(|i| {
                let range = RangeSpec::try_from(&pb::ReadItem {
                    path: i.path,
                    offset: i.offset,
                    length: i.length,
                })
                .map_err(ReadError::from)?;
                Ok(ReadIntoItem {
                    range,
                    region_offset: i.region_offset,
                })
            })
            .collect();
        let in_flight = match call.max_in_flight {
            0 => self.store.limits().batch_in_flight_default,
            n => n,
        };
        let options = crate::store::read_into::ReadIntoOptions::same_host(in_flight);
        let completions = self
            .store
            .read_into(region, &name, call.dataset_id, items, options)?;
        Ok((Box::pin(completions), in_flight))
    }
}

/// Whether `principal`, connected as `uid`, may use `region`: without
/// tenants, the uid's own regions (root: any); with tenants, its own
/// regions of its tenant (an admin: any).
fn region_is_callers(region: &crate::region::RegionMap, principal: &Principal, uid: u32) -> bool {
    match &principal.tenant {
        None => region.owner_uid == uid || uid == 0,
        Some(t) => t.admin || (region.owner_uid == uid && region.tenant == t.name),
    }
}

/// A frame's bytes, or the error that kept it from being encoded (an
/// I/O error: the connection cannot go on).
fn encoded(bytes: Result<Vec<u8>, FrameError>) -> std::io::Result<Vec<u8>> {
    bytes.map_err(std::io::Error::other)
}

/// Answers a hello with `code` and `message`; the connection ends after.
async fn hello_failed<IO: AsyncWrite + Unpin>(
    conn: &mut IO,
    code: Code,
    message: &str,
) -> std::io::Result<()> {
    let reply = HelloReply {
        version: VERSION,
        code: code as u32,
        message: message.to_owned(),
    };
    conn.write_all(&reply.encode()).await?;
    conn.shutdown().await
}
