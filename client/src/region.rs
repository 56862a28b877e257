//! Memory regions: the same-host zero-copy read path.
//!
//! [`Client::register_region`] creates a memfd, sizes and maps it,
//! allocates its pages (this process pays for its own region's memory, not
//! storaged; huge pages where the kernel allows them), seals it against
//! shrinking (storaged refuses a region that could shrink under its
//! mapping), and registers it with storaged over the
//! Unix socket by its descriptor number. storaged opens it through
//! `/proc/<our pid>/fd/<n>`; once it answers, the descriptor is closed and
//! the memory lives as long as the two mappings. Nothing is ever on disk.
//!
//! [`Dataset::read_into`] lays the requested objects out in the region by
//! the alignment rules (`storaged_proto::model::read_into_span`), asks the
//! server to read them there, and returns a [`RegionBatch`] whose slices
//! are exactly each object's bytes, straight from the mapping: the device
//! wrote them, the server verified them in place, and nobody copied them.
//! The batch borrows the region mutably, so the next read into it waits
//! until the slices are dropped.
//!
//! The region stays registered while the [`Region`] lives: it holds the
//! open `RegisterRegion` call, and dropping it ends the call, which
//! deregisters the region on the server.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use storaged_proto::model::{READ_INTO_ALIGN_BYTES, read_into_span};
use storaged_proto::{bulk, pb};
use tonic::{Code, Status};

use crate::bulk::BulkError;
use crate::{Client, ClientError, Dataset};

/// A region of this process's memory that reads land in: registered with
/// a storaged on this host (the device writes it), or, for a storaged on
/// another host, this process's own (the TCP bulk channel receives into
/// it; `id` 0).
pub struct Region {
    map: memmap2::MmapRaw,
    id: u64,
    checksum_block_bytes: u64,
    /// Set when a `read_into` was dropped before it finished: its reads may
    /// still land, so the region is not used again.
    pub(crate) abandoned: bool,
    /// The open `RegisterRegion` call; dropping it deregisters the region,
    /// and its end (server restart or shutdown) means the server forgot it.
    /// `None`: a region storaged never sees (reads arrive over TCP).
    registration: Option<tonic::Streaming<pb::RegionEvent>>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &format_args!("{:#x}", self.id))
            .field("len", &self.map.len())
            .finish()
    }
}

/// One object (or range of one) to read into a region. `object_size` comes
/// from a listing or `stat`; the layout depends on it.
#[derive(Debug, Clone)]
pub struct RegionRead {
    pub path: String,
    pub offset: u64,
    /// `None` reads to the end of the object.
    pub length: Option<u64>,
    pub object_size: u64,
}

impl RegionRead {
    /// The whole object.
    pub fn whole(path: impl Into<String>, object_size: u64) -> Self {
        Self {
            path: path.into(),
            offset: 0,
            length: None,
            object_size,
        }
    }

    pub(crate) fn range(&self) -> (u64, u64) {
        let start = self.offset.min(self.object_size);
        let len = self
            .length
            .unwrap_or(u64::MAX)
            .min(self.object_size - start);
        (start, len)
    }
}

/// The result of one [`Dataset::read_into`]: per item, its bytes in the
/// region or its own error.
pub struct RegionBatch<'r> {
    region: &'r Region,
    items: Vec<ItemExtent>,
}

/// Where an item's bytes are in its region (offset, length), or its error.
type ItemExtent = Result<(usize, usize), Status>;

impl std::fmt::Debug for RegionBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionBatch")
            .field("region", self.region)
            .field("items", &self.items)
            .finish()
    }
}

impl RegionBatch<'_> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Exactly item `i`'s bytes, read in place; or why it failed (then its
    /// part of the region must not be trusted).
    /// Where item `i`'s bytes are in the region: `(offset, len)`.
    pub fn extent(&self, i: usize) -> Result<(usize, usize), &Status> {
        self.items[i].as_ref().copied()
    }

    pub fn get(&self, i: usize) -> Result<&[u8], &Status> {
        match &self.items[i] {
            Ok((offset, len)) => Ok(self.region.bytes(*offset, *len)),
            Err(status) => Err(status),
        }
    }
}

impl Region {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Whether the region can still be read into: a registered one while
    /// its registration call is open (it ends when storaged restarts or
    /// shuts down; the region is then useless and a new one must be
    /// registered), a remote client's own always.
    pub fn is_registered(&mut self) -> bool {
        use futures::FutureExt;
        // The server sends one message, then nothing until it ends the
        // call: anything ready now is that end (or an error).
        self.registration
            .as_mut()
            .is_none_or(|r| r.message().now_or_never().is_none())
    }

    /// Whether storaged writes this region itself (same host), rather
    /// than this process receiving into it.
    pub fn is_shared(&self) -> bool {
        self.registration.is_some()
    }

    /// The whole region, for this process to receive into. `&mut self`:
    /// no batch view of it is alive, and no read into it is in flight.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len()` bytes, writable, and lives as
        // long as `self`; the exclusive borrow keeps every other view
        // (batches borrow the region) away for its duration. A shared
        // region is written by storaged only during a `read_into`, which
        // also holds `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr(), self.map.len()) }
    }

    /// The server's checksum block: reads widen to whole blocks.
    pub fn checksum_block_bytes(&self) -> u64 {
        self.checksum_block_bytes
    }

    /// Region bytes needed to read `read`.
    pub fn span(&self, read: &RegionRead) -> u64 {
        let (start, len) = read.range();
        read_into_span(start, len, read.object_size, self.checksum_block_bytes).0
    }

    /// Bytes a completed read left at `[offset, offset + len)`. Callers
    /// hold the region shared (`&self`), so no read into it is in flight.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.map.len());
        // SAFETY: in bounds (asserted). The server wrote these bytes and
        // reported completion before this view was made, and it writes the
        // region only for reads this `Region` asks for, which need `&mut
        // self` and so cannot overlap a live `RegionBatch`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }
}

/// The smallest region taken for a few small reads: one 2 MiB huge page,
/// so that it can be backed by one (see [`sealed_memfd`]).
pub(crate) const REGION_BYTES_MIN: u64 = 2 << 20;

/// A memfd of `size_bytes`, mapped, every page allocated, sealed against
/// shrinking.
///
/// The pages are asked to be huge (`MADV_HUGEPAGE` before they are
/// touched): a device read into 4 KiB pages is a request of one segment
/// per page, which this VM's virtio disk serves markedly slower than one
/// into physically contiguous memory (a 112 KiB O_DIRECT read at queue
/// depth 1: 114 us into 4 KiB pages, 68 us into a huge page; BENCHMARKS.md,
/// "Huge pages"). The kernel grants it where shared memory may be huge
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to `advise`,
/// `always` or `within_size`); elsewhere this is a no-op.
fn sealed_memfd(size_bytes: u64) -> Result<(std::fs::File, memmap2::MmapRaw), ClientError> {
    let io_err = |what: &str, source: std::io::Error| ClientError::Io {
        path: format!("memfd ({what})"),
        source,
    };
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"storaged-region".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io_err("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size_bytes).map_err(|e| io_err("sizing", e))?;
    let map = memmap2::MmapOptions::new()
        .len(size_bytes as usize)
        .map_raw(&file)
        .map_err(|e| io_err("mapping", e))?;
    // Advice only: refused on kernels without it, and then the pages are
    // allocated below all the same.
    let _ = map.advise(memmap2::Advice::HugePage);
    let _ = map.advise(memmap2::Advice::PopulateWrite);
    // Allocated here, by the client: storaged pins only regions without
    // holes, and never allocates a client's pages itself. (A no-op for
    // pages the advice above allocated already.)
    // SAFETY: fallocate on the open memfd, within its size.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size_bytes as libc::off_t) };
    if rc != 0 {
        return Err(io_err("allocating", std::io::Error::last_os_error()));
    }
    // SAFETY: F_ADD_SEALS on an open memfd created with MFD_ALLOW_SEALING.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if rc != 0 {
        return Err(io_err("sealing", std::io::Error::last_os_error()));
    }
    Ok((file, map))
}

/// A region of this process's own memory of at least `size_bytes`
/// (rounded up to 4 KiB), for the TCP bulk channel to receive into:
/// anonymous, asked to be huge pages, every page allocated now.
fn remote_region(size_bytes: u64, checksum_block_bytes: u64) -> Result<Region, ClientError> {
    let size_bytes = size_bytes.max(1).next_multiple_of(READ_INTO_ALIGN_BYTES);
    let map = memmap2::MmapOptions::new()
        .len(size_bytes as usize)
        .map_anon()
        .map_err(|source| ClientError::Io {
            path: "anonymous region".into(),
            source,
        })?;
    let _ = map.advise(memmap2::Advice::HugePage);
    let _ = map.advise(memmap2::Advice::PopulateWrite);
    Ok(Region {
        map: memmap2::MmapRaw::from(map),
        id: 0,
        checksum_block_bytes,
        abandoned: false,
        registration: None,
    })
}

/// Regions a client keeps for reuse (loaders take them and give them back),
/// at most this many bytes in all.
const REGION_CACHE_BYTES_MAX: u64 = 2 << 30;
/// Idle regions kept however long they wait. More are kept only while the
/// client is busy: storaged limits regions per user (64 by default), and
/// idle ones held here would keep the same user's other clients (a second
/// job, a loader beside a mount) from registering theirs, while giving
/// them back at once would make a busy client register them again (a
/// registration, fresh pages, a pin) for every request.
const REGION_IDLE_KEEP_COUNT: usize = 8;
/// How long a region past `REGION_IDLE_KEEP_COUNT` may stay idle.
const REGION_IDLE_MAX: Duration = Duration::from_secs(2);

/// Idle registered regions of one client, for reuse: a region costs a
/// registration and, on first use, fresh pages for both processes.
#[derive(Debug, Default)]
pub(crate) struct RegionCache {
    /// Each with when it was given back.
    idle: std::sync::Mutex<Vec<(Region, Instant)>>,
    /// Until when storaged is known to refuse more regions (its region
    /// limits): callers fall back to gRPC without paying for a refused
    /// registration (a memfd, its pages and a call) every time.
    refused_until: std::sync::Mutex<Option<Instant>>,
}

/// How long a refused registration (RESOURCE_EXHAUSTED) keeps this client
/// from asking again when no idle region fits.
const REGION_REFUSED_BACKOFF: Duration = Duration::from_secs(1);

impl RegionCache {
    /// A cache whose regions idle past `REGION_IDLE_MAX` (beyond
    /// `REGION_IDLE_KEEP_COUNT`) are deregistered by a task on the
    /// current runtime, which ends with the cache.
    pub(crate) fn new() -> std::sync::Arc<Self> {
        let cache = std::sync::Arc::new(Self::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = std::sync::Arc::downgrade(&cache);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(REGION_IDLE_MAX / 2).await;
                    let Some(cache) = weak.upgrade() else { return };
                    cache.sweep(Instant::now());
                }
            });
        }
        cache
    }

    /// An idle region of at least `size_bytes`, the smallest that fits.
    pub(crate) fn take(&self, size_bytes: u64) -> Option<Region> {
        let mut idle = self.idle.lock().expect("region cache poisoned");
        idle.retain_mut(|(r, _)| r.is_registered());
        let best = idle
            .iter()
            .enumerate()
            .filter(|(_, (r, _))| r.len() as u64 >= size_bytes)
            .min_by_key(|(_, (r, _))| r.len())
            .map(|(i, _)| i)?;
        Some(idle.swap_remove(best).0)
    }

    /// Keeps `region` for reuse unless it is retired; past the bytes
    /// limit the smallest idle regions are deregistered (a large one
    /// serves any read a small one would).
    pub(crate) fn give_back(&self, region: Region) {
        if region.abandoned {
            return;
        }
        let evicted = {
            let mut idle = self.idle.lock().expect("region cache poisoned");
            idle.push((region, Instant::now()));
            evict_smallest(&mut idle, |(r, _)| r.len() as u64, REGION_CACHE_BYTES_MAX)
        };
        // Deregistered outside the lock.
        drop(evicted);
    }

    /// Deregisters the regions idle too long, beyond the few kept.
    fn sweep(&self, now: Instant) {
        let evicted = {
            let mut idle = self.idle.lock().expect("region cache poisoned");
            evict_stale(&mut idle, now, REGION_IDLE_KEEP_COUNT, REGION_IDLE_MAX)
        };
        drop(evicted);
    }
}

/// Removes the smallest of `items` until their sizes (`len`) add up to at
/// most `bytes_max`; returns the removed.
fn evict_smallest<T>(items: &mut Vec<T>, len: impl Fn(&T) -> u64, bytes_max: u64) -> Vec<T> {
    let mut evicted = Vec::new();
    while items.iter().map(&len).sum::<u64>() > bytes_max {
        let smallest = (0..items.len())
            .min_by_key(|&i| len(&items[i]))
            .expect("over the limit, so not empty");
        evicted.push(items.swap_remove(smallest));
    }
    evicted
}

/// Removes from `items` (each with when it became idle) those idle for
/// `idle_max` or longer, the longest idle first, while more than `keep`
/// remain; returns the removed.
fn evict_stale<T>(
    items: &mut Vec<(T, Instant)>,
    now: Instant,
    keep: usize,
    idle_max: Duration,
) -> Vec<T> {
    let mut evicted = Vec::new();
    while items.len() > keep {
        let oldest = (0..items.len())
            .min_by_key(|&i| items[i].1)
            .expect("more than `keep`, so not empty");
        if now.duration_since(items[oldest].1) < idle_max {
            break;
        }
        evicted.push(items.swap_remove(oldest).0);
    }
    evicted
}

impl Client {
    /// A registered region of at least `size_bytes`: an idle one this
    /// client registered before (see [`Client::give_back_region`]), or a
    /// new one.
    pub async fn region(&self, size_bytes: u64) -> Result<Region, ClientError> {
        match self.regions.take(size_bytes) {
            Some(region) => Ok(region),
            None => self.register_region(size_bytes).await,
        }
    }

    /// [`region`](Self::region) for reads that can go over gRPC instead
    /// (`Dataset::read_ranges_sized`): right after storaged refused a
    /// registration for its region limits, this fails at once
    /// (RESOURCE_EXHAUSTED) for a second unless an idle region fits, rather
    /// than paying for another refused registration on every read. Loaders
    /// keep asking with [`region`](Self::region): a region freed by others
    /// is theirs at once.
    pub(crate) async fn region_unless_refused(
        &self,
        size_bytes: u64,
    ) -> Result<Region, ClientError> {
        if let Some(region) = self.regions.take(size_bytes) {
            return Ok(region);
        }
        let refused = *self.regions.refused_until.lock().expect("poisoned");
        if refused.is_some_and(|until| Instant::now() < until) {
            return Err(ClientError::Status(Status::resource_exhausted(
                "storaged refused a region a moment ago (its region limits); not asking again yet",
            )));
        }
        let registered = self.register_region(size_bytes).await;
        if let Err(ClientError::Status(s)) = &registered
            && s.code() == Code::ResourceExhausted
        {
            *self.regions.refused_until.lock().expect("poisoned") =
                Some(Instant::now() + REGION_REFUSED_BACKOFF);
        }
        registered
    }

    /// Keeps `region` registered for a later [`Client::region`] (bounded;
    /// beyond the bound it is deregistered).
    pub fn give_back_region(&self, region: Region) {
        self.regions.give_back(region);
    }

    /// Creates and registers a region of at least `size_bytes` (rounded up
    /// to 4 KiB) on a `unix://` connection; on TCP, where storaged offers
    /// its TCP bulk channel, a region of this process's own for it to
    /// receive into.
    pub async fn register_region(&self, size_bytes: u64) -> Result<Region, ClientError> {
        if !self.local
            && let Some(pool) = self.bulk_tcp().await
        {
            return remote_region(size_bytes, pool.checksum_block_bytes);
        }
        if !self.local {
            let because = match self.not_local_because() {
                Some(why) => format!(" (this connection is TCP: {why})"),
                None => String::new(),
            };
            return Err(ClientError::InvalidArgument(format!(
                "memory regions need a unix:// connection to a storaged on this host{because}"
            )));
        }
        let size_bytes = size_bytes.max(1).next_multiple_of(READ_INTO_ALIGN_BYTES);
        let (file, map) = sealed_memfd(size_bytes)?;
        // The descriptor stays open until storaged has opened it (its
        // first message); then the two mappings hold the memory.
        let registered = async {
            let mut rpc = self.rpc.clone();
            let mut call = rpc
                .register_region(pb::RegisterRegionRequest {
                    path: String::new(),
                    size_bytes,
                    memfd: Some(file.as_raw_fd()),
                })
                .await?
                .into_inner();
            let event = call.message().await?.ok_or_else(|| {
                ClientError::Protocol("RegisterRegion ended without a region id".into())
            })?;
            Ok::<_, ClientError>(Region {
                map,
                id: event.region_id,
                checksum_block_bytes: u64::from(event.checksum_block_bytes),
                abandoned: false,
                registration: Some(call),
            })
        }
        .await;
        drop(file);
        registered
    }
}

/// Items one `ReadInto` call keeps in flight on the server, at most.
const READ_INTO_IN_FLIGHT_MAX: u32 = 256;

impl Dataset {
    /// Reads `reads` into `region`, laid out back to back from its start,
    /// and returns each item's exact bytes there. Fails as a whole if they
    /// do not fit or the call fails; a failed item carries its own error.
    pub async fn read_into<'r>(
        &self,
        region: &'r mut Region,
        reads: &[RegionRead],
    ) -> Result<RegionBatch<'r>, ClientError> {
        if !region.is_shared() {
            return self.read_into_remote(region, reads).await;
        }
        if !region.is_registered() {
            region.abandoned = true;
            return Err(ClientError::InvalidArgument(format!(
                "region {:#x} is no longer registered (storaged restarted or stopped); register a new one",
                region.id
            )));
        }
        if region.abandoned {
            return Err(ClientError::InvalidArgument(format!(
                "region {:#x}: an earlier read_into was cancelled and its reads may still land; register a new region",
                region.id
            )));
        }
        let (mut items, expected) = lay_out(region, reads)?;
        let max_in_flight = (reads.len() as u32).clamp(1, READ_INTO_IN_FLIGHT_MAX);
        if let Some(bulk) = self.client.bulk().await {
            let frame = bulk::ReadIntoFrame {
                region_id: region.id,
                dataset: self.name.to_string(),
                dataset_id: self.id,
                max_in_flight,
                items: items.drain(..).map(Into::into).collect(),
            };
            // As below: until the reply, storaged may be writing the region.
            region.abandoned = true;
            match bulk.read_into(&frame).await {
                Ok(reply) => {
                    let items = bulk_items(reply, &expected)?;
                    // A reply comes after the last of the call's reads.
                    region.abandoned = false;
                    return Ok(RegionBatch {
                        region: &*region,
                        items,
                    });
                }
                Err(BulkError::Call(e)) => return Err(e),
                // Nothing was sent: over gRPC instead.
                Err(BulkError::Unreachable) => {
                    region.abandoned = false;
                    items = frame.items.into_iter().map(Into::into).collect();
                }
            }
        }
        let mut rpc = self.client.rpc.clone();
        let mut completions = rpc
            .read_into(pb::ReadIntoRequest {
                region_id: region.id,
                dataset: self.name.to_string(),
                items,
                max_in_flight,
                dataset_id: self.id,
            })
            .await?
            .into_inner();
        // From here until the last completion the server may be writing the
        // region; if this future is dropped (or fails) first, the region is
        // retired.
        region.abandoned = true;
        let mut results: Vec<Option<ItemExtent>> = vec![None; reads.len()];
        while let Some(c) = completions.message().await? {
            let i = c.index as usize;
            let Some(slot) = results.get_mut(i).filter(|s| s.is_none()) else {
                return Err(ClientError::Protocol(format!(
                    "ReadInto completion for item {i} is unexpected"
                )));
            };
            *slot = Some(match c.error {
                Some(e) => Err(Status::new(Code::from(e.code), e.message)),
                None => {
                    let (offset, len) = expected[i];
                    if (c.data_offset, c.length) != (offset, len) {
                        return Err(ClientError::Protocol(format!(
                            "item {i} landed at {}+{}; the layout put it at {offset}+{len}",
                            c.data_offset, c.length
                        )));
                    }
                    Ok((offset as usize, len as usize))
                }
            });
        }
        let items = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| ClientError::Protocol(format!("ReadInto ended without item {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        region.abandoned = false;
        Ok(RegionBatch {
            region: &*region,
            items,
        })
    }
}

impl Dataset {
    /// [`read_into`](Self::read_into) a region of this process's own, from
    /// a storaged on another host, over its TCP bulk channel: each window
    /// received in place and checked against its CRCs here. A range whose
    /// span is larger than storaged serves at once goes as consecutive
    /// pieces that land back to back. A window that fails its CRCs is read
    /// again through gRPC, which storaged verifies: its bytes are used
    /// then and the damage counted as the wire's, or the item fails with
    /// storaged's DATA_LOSS and it is counted as the device's.
    async fn read_into_remote<'r>(
        &self,
        region: &'r mut Region,
        reads: &[RegionRead],
    ) -> Result<RegionBatch<'r>, ClientError> {
        let Some(pool) = self.client.bulk_tcp().await else {
            if self.client.connect_options().bulk_tcp == crate::BulkTcp::Required {
                return Err(ClientError::Status(Status::unavailable(
                    "storaged's TCP bulk channel is not offered or did not answer, and this client requires it",
                )));
            }
            return self.read_into_over_grpc(region, reads).await;
        };
        let (items, expected) = lay_out(region, reads)?;
        let block = region.checksum_block_bytes;
        let mut frame_items = Vec::with_capacity(items.len());
        let mut layout = Vec::with_capacity(items.len());
        let mut owner = Vec::with_capacity(items.len());
        for (i, (item, read)) in items.into_iter().zip(reads).enumerate() {
            let length = item.length.expect("lay_out sets every length");
            for piece in pieces(
                item.offset,
                length,
                read.object_size,
                block,
                pool.item_bytes_max,
            ) {
                frame_items.push(bulk::ReadIntoFrameItem {
                    path: item.path.clone(),
                    offset: piece.offset,
                    length: Some(piece.layout.length),
                    region_offset: item.region_offset + piece.at,
                });
                layout.push(crate::bulk_tcp::PieceLayout {
                    region_offset: item.region_offset + piece.at,
                    ..piece.layout
                });
                owner.push(i);
            }
        }
        let frame = bulk::ReadFrame {
            dataset: self.name.to_string(),
            dataset_id: self.id,
            max_in_flight: (frame_items.len() as u32).clamp(1, READ_INTO_IN_FLIGHT_MAX),
            client_verifies: true,
            items: frame_items,
        };
        let landed = match pool.read(&frame, &layout, region.bytes_mut()).await {
            Ok(landed) => landed,
            Err(BulkError::Call(e)) => return Err(e),
            Err(BulkError::Unreachable) => {
                // Learnt again from Status on a later call (a restarted
                // storaged may listen on another port); this call goes over
                // gRPC unless the channel is required (then UNAVAILABLE:
                // worth retrying).
                self.client.forget_bulk_tcp(&pool);
                if self.client.connect_options().bulk_tcp == crate::BulkTcp::Required {
                    return Err(ClientError::Status(Status::unavailable(format!(
                        "storaged's TCP bulk channel did not answer at {}",
                        pool.addr
                    ))));
                }
                tracing::warn!(addr = %pool.addr, "the TCP bulk channel did not answer; reading over gRPC");
                return self.read_into_over_grpc(region, reads).await;
            }
        };
        let mut outcome: Vec<Option<Status>> = vec![None; reads.len()];
        let mut damaged = vec![false; reads.len()];
        for (piece, &i) in landed.into_iter().zip(&owner) {
            match piece {
                crate::bulk_tcp::Piece::Landed => {}
                crate::bulk_tcp::Piece::Failed(status) => {
                    outcome[i].get_or_insert(status);
                }
                crate::bulk_tcp::Piece::Mismatch(m) => {
                    tracing::warn!(dataset = %self.name, path = %reads[i].path, mismatch = %m, "bulk channel: a window failed its CRCs here; reading it again through storaged's verified path");
                    damaged[i] = true;
                }
            }
        }
        let mut results = Vec::with_capacity(reads.len());
        for (i, read) in reads.iter().enumerate() {
            let (data_offset, len) = expected[i];
            if let Some(status) = outcome[i].take() {
                results.push(Err(status));
                continue;
            }
            if damaged[i] {
                let counters = &pool.counters;
                let again = self.read_range(&read.path, read.range().0, len).await;
                match again {
                    Ok(bytes) if bytes.len() as u64 == len => {
                        counters.wire_mismatches.fetch_add(1, Ordering::Relaxed);
                        let at = data_offset as usize;
                        region.bytes_mut()[at..at + bytes.len()].copy_from_slice(&bytes);
                    }
                    Ok(bytes) => {
                        return Err(ClientError::ShortRead {
                            path: read.path.clone(),
                            expected: len,
                            got: bytes.len() as u64,
                        });
                    }
                    Err(ClientError::Status(s)) => {
                        if s.code() == Code::DataLoss {
                            counters.device_mismatches.fetch_add(1, Ordering::Relaxed);
                        }
                        results.push(Err(s));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            results.push(Ok((data_offset as usize, len as usize)));
        }
        Ok(RegionBatch {
            region: &*region,
            items: results,
        })
    }
}

impl Dataset {
    /// [`read_into`](Self::read_into) a remote client's own region over
    /// gRPC, for when the TCP bulk channel is not there: the items' bytes
    /// (verified by storaged) copied where the layout puts them, so the
    /// caller cannot tell but by the copy.
    async fn read_into_over_grpc<'r>(
        &self,
        region: &'r mut Region,
        reads: &[RegionRead],
    ) -> Result<RegionBatch<'r>, ClientError> {
        let (_, expected) = lay_out(region, reads)?;
        let (small, large): (Vec<usize>, Vec<usize>) = (0..reads.len()).partition(|&i| {
            reads[i].range().1 <= storaged_proto::model::BATCH_ANY_ORDER_ITEM_BYTES_MAX
        });
        let batch: Vec<RegionRead> = small.iter().map(|&i| reads[i].clone()).collect();
        let (fetched, _) = self.read_ranges_grpc(&batch).await?;
        let mut results: Vec<Result<Bytes, ClientError>> =
            (0..reads.len()).map(|_| Ok(Bytes::new())).collect();
        for (i, r) in small.into_iter().zip(fetched) {
            results[i] = r;
        }
        for i in large {
            let (start, len) = reads[i].range();
            results[i] = self.read_range(&reads[i].path, start, len).await;
        }
        let memory = region.bytes_mut();
        let mut items = Vec::with_capacity(reads.len());
        for (result, &(data_offset, len)) in results.into_iter().zip(&expected) {
            items.push(match result {
                Ok(bytes) if bytes.len() as u64 == len => {
                    let at = data_offset as usize;
                    memory[at..at + bytes.len()].copy_from_slice(&bytes);
                    Ok((at, bytes.len()))
                }
                Ok(bytes) => Err(Status::data_loss(format!(
                    "{} bytes arrived where {len} were asked for",
                    bytes.len()
                ))),
                Err(ClientError::Status(s)) => Err(s),
                Err(e) => return Err(e),
            });
        }
        Ok(RegionBatch {
            region: &*region,
            items,
        })
    }
}

/// One request piece of a range: the object bytes it asks for (`offset`,
/// `layout.length`), where it lands relative to the range's region offset
/// (`at`), and what its answer must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RangePiece {
    offset: u64,
    at: u64,
    layout: crate::bulk_tcp::PieceLayout,
}

/// Range `[start, start + len)` of an object of `object_size` bytes as
/// pieces whose spans are at most `span_max`: one piece when it fits,
/// else consecutive runs of whole checksum blocks, each landing where the
/// one before it ends, so that the range's window lies in the region back
/// to back exactly as one read would have left it.
fn pieces(start: u64, len: u64, object_size: u64, block: u64, span_max: u64) -> Vec<RangePiece> {
    let whole = |offset: u64, length: u64, at: u64| {
        let (span, lead) = read_into_span(offset, length, object_size, block);
        RangePiece {
            offset,
            at,
            layout: crate::bulk_tcp::PieceLayout {
                region_offset: 0,
                span,
                lead,
                length,
            },
        }
    };
    let step = span_max - span_max % block.max(1);
    if block == 0 || step == 0 || read_into_span(start, len, object_size, block).0 <= span_max {
        return vec![whole(start, len, 0)];
    }
    let w_start = start - start % block;
    let w_end = (start + len).next_multiple_of(block).min(object_size);
    let end = start + len;
    (w_start..w_end)
        .step_by(step as usize)
        .map(|piece_start| {
            let offset = start.max(piece_start);
            let piece_end = end.min(piece_start + step);
            whole(offset, piece_end - offset, piece_start - w_start)
        })
        .collect()
}

/// Where an item's exact bytes land in the region: data offset, length.
type Landing = (u64, u64);

/// The items of a `ReadInto` of `reads` into `region`, back to back from
/// its start, and where each item's exact bytes will be (data offset,
/// length); refused when they do not fit.
fn lay_out(
    region: &Region,
    reads: &[RegionRead],
) -> Result<(Vec<pb::ReadIntoItem>, Vec<Landing>), ClientError> {
    let mut items = Vec::with_capacity(reads.len());
    let mut expected = Vec::with_capacity(reads.len());
    let mut at = 0u64;
    for r in reads {
        let (start, len) = r.range();
        let (span, lead) = read_into_span(start, len, r.object_size, region.checksum_block_bytes);
        items.push(pb::ReadIntoItem {
            path: r.path.clone(),
            offset: start,
            length: Some(len),
            region_offset: at,
        });
        expected.push((at + lead, len));
        at += span;
    }
    if at > region.len() as u64 {
        return Err(ClientError::InvalidArgument(format!(
            "{} reads need {at} bytes of region; region {:#x} has {}",
            reads.len(),
            region.id,
            region.len()
        )));
    }
    Ok((items, expected))
}

/// A region and a connection of its own to storaged's bulk channel, for
/// one thread that reads by blocking calls (the mount's FUSE threads):
/// a read is one write and one reply on the calling thread, with no task,
/// runtime or other thread between, so a small read costs the two
/// wakeups of storaged and of this thread and nothing more. Same host
/// only; storaged verifies every byte in place, as for
/// [`Dataset::read_into`].
pub struct BlockingReader {
    region: Region,
    conn: std::os::unix::net::UnixStream,
}

impl std::fmt::Debug for BlockingReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingReader")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A [`BlockingReader`] with a region of at least `region_bytes`, whose
    /// calls each wait at most `timeout` for storaged. Fails
    /// (FAILED_PRECONDITION) where storaged is not on this host or offers
    /// no bulk channel.
    pub async fn blocking_reader(
        &self,
        region_bytes: u64,
        timeout: Duration,
    ) -> Result<BlockingReader, ClientError> {
        let Some(bulk) = self.bulk().await else {
            return Err(ClientError::Status(Status::failed_precondition(
                "blocking reads need storaged's bulk channel on this host",
            )));
        };
        let region = self.region(region_bytes).await?;
        let conn = bulk.connect_blocking(timeout)?;
        Ok(BlockingReader { region, conn })
    }
}

impl BlockingReader {
    /// The reader's region: what one call can read is bounded by its
    /// length (each read widened to whole checksum blocks, see
    /// [`Region::span`]).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Reads `reads` of `dataset` into the region, blocking this thread
    /// until storaged answers, as [`Dataset::read_into`] does; a call
    /// storaged leaves unanswered past the reader's timeout fails
    /// DEADLINE_EXCEEDED. After an error of the call as a whole the reader
    /// is spent (its connection or region may be in any state): drop it
    /// and make another.
    pub fn read_into(
        &mut self,
        dataset: &Dataset,
        reads: &[RegionRead],
    ) -> Result<RegionBatch<'_>, ClientError> {
        if self.region.abandoned {
            return Err(ClientError::InvalidArgument(format!(
                "region {:#x}: an earlier call failed; make a new reader",
                self.region.id
            )));
        }
        let (items, expected) = lay_out(&self.region, reads)?;
        let frame = bulk::ReadIntoFrame {
            region_id: self.region.id,
            dataset: dataset.name.to_string(),
            dataset_id: dataset.id,
            max_in_flight: (reads.len() as u32).clamp(1, READ_INTO_IN_FLIGHT_MAX),
            items: items.into_iter().map(Into::into).collect(),
        };
        // Until the reply, storaged may be writing the region.
        self.region.abandoned = true;
        let reply = crate::bulk::read_into_blocking(&mut self.conn, &frame)?;
        let items = bulk_items(reply, &expected)?;
        self.region.abandoned = false;
        Ok(RegionBatch {
            region: &self.region,
            items,
        })
    }
}

/// The items of a bulk channel reply, each checked against where the
/// layout put it (`expected`: data offset and length per item).
fn bulk_items(
    reply: bulk::ReadIntoReply,
    expected: &[(u64, u64)],
) -> Result<Vec<ItemExtent>, ClientError> {
    if reply.code != 0 {
        let mut status = Status::new(Code::from(reply.code as i32), reply.message);
        if reply.region_unknown {
            status.metadata_mut().insert(
                storaged_proto::model::REGION_UNKNOWN_METADATA_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        return Err(ClientError::Status(status));
    }
    if reply.items.len() != expected.len() {
        return Err(ClientError::Protocol(format!(
            "the bulk channel answered {} items of {}",
            reply.items.len(),
            expected.len()
        )));
    }
    reply
        .items
        .into_iter()
        .zip(expected)
        .enumerate()
        .map(|(i, (item, &(offset, len)))| {
            if item.code != 0 {
                return Ok(Err(Status::new(Code::from(item.code as i32), item.message)));
            }
            if (item.data_offset, item.length) != (offset, len) {
                return Err(ClientError::Protocol(format!(
                    "item {i} landed at {}+{}; the layout put it at {offset}+{len}",
                    item.data_offset, item.length
                )));
            }
            Ok(Ok((offset as usize, len as usize)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against regions whose pages can never be huge: the mapping
    /// asks for them (`hg` among its VmFlags in /proc/self/smaps),
    /// whatever the kernel's setting grants, and every page is allocated.
    #[test]
    fn region_memory_asks_for_huge_pages() {
        let (_file, map) = sealed_memfd(REGION_BYTES_MIN).unwrap();
        let header = format!("{:x}-", map.as_ptr() as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let field = |name: &str| {
            smaps
                .lines()
                .skip_while(|l| !l.starts_with(&header))
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} for the region's mapping"))
                .to_owned()
        };
        assert_eq!(field("Rss:"), "2048 kB");
        let flags = field("VmFlags:");
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn past_the_bytes_limit_the_smallest_go() {
        let mut idle: Vec<u64> = vec![8, 1, 4, 2, 16];
        let gone = evict_smallest(&mut idle, |&n| n, 24);
        assert_eq!(sorted(gone), vec![1, 2, 4]);
        assert_eq!(sorted(idle.clone()), vec![8, 16]);
        assert!(evict_smallest(&mut idle, |&n| n, 24).is_empty());
    }

    #[test]
    fn regions_idle_too_long_go_beyond_the_few_kept() {
        // Guards against a client hoarding its user's region slots once
        // idle, and against a busy one giving back what it reuses at once.
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let at = |s: u64| t0 + second * s as u32;
        let mut idle: Vec<(u64, Instant)> = (0..6).map(|i| (i, at(i))).collect();
        // At 3 s, regions 0 and 1 have been idle 2 s or more.
        let gone = evict_stale(&mut idle, at(3), 2, 2 * second);
        assert_eq!(sorted(gone), vec![0, 1], "the stale ones, oldest first");
        assert_eq!(idle.len(), 4, "the recent ones stay, busy or not");
        // Much later, all are stale: down to the two kept.
        let gone = evict_stale(&mut idle, at(100), 2, 2 * second);
        assert_eq!(sorted(gone), vec![2, 3]);
        assert_eq!(
            sorted(idle.into_iter().map(|(r, _)| r).collect()),
            vec![4, 5]
        );
    }

    #[test]
    fn long_ranges_go_as_pieces_that_land_back_to_back() {
        // Guards against a range split for the TCP bulk channel landing
        // anywhere but where one read of it would have put its bytes.
        let k32 = 32 * 1024;
        let size = 10 * k32 + 100;
        let (span, lead) = read_into_span(5, size - 5, size, k32);
        let pieces = pieces(5, size - 5, size, k32, 3 * k32 + 4096);
        assert_eq!(pieces.len(), 4, "{pieces:?}");
        assert_eq!(pieces[0].layout.lead, lead);
        let mut next = 0;
        let mut bytes = 0;
        for p in &pieces {
            assert_eq!(p.at, next, "each piece lands where the one before ends");
            assert!(p.layout.span <= 3 * k32 + 4096);
            next = p.at + p.layout.span;
            bytes += p.layout.length;
        }
        assert_eq!(next, span, "together they take the one read's span");
        assert_eq!(bytes, size - 5, "and ask for exactly its bytes");
        // A range that fits is one piece; so is an empty one.
        assert_eq!(pieces_count(0, 100, 100, k32, 1 << 20), 1);
        assert_eq!(pieces_count(7, 0, 100, k32, 1 << 20), 1);
    }

    fn pieces_count(start: u64, len: u64, size: u64, block: u64, max: u64) -> usize {
        pieces(start, len, size, block, max).len()
    }

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }
}
