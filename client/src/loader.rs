//! Plans resolved to objects, and the prefetching loader that reads them.
//!
//! A [`Plan`] is one (rank, worker)'s sequence from [`crate::plan`] applied
//! to the dataset's listing. The listing is shared (`Arc`) so the workers of
//! one process list the dataset once.
//!
//! The [`Loader`] cuts the plan into batches and keeps several `ReadBatch`
//! calls running ahead of the consumer, as many as fit in
//! `prefetch_bytes_max` (object sizes are known from the listing; one batch
//! always runs, however large). Each call asks for its items in completion
//! order, so no sample waits behind a slow one on the server, and the loader
//! puts them back in plan order; batches are yielded strictly in plan order.
//! Memory is bounded by `prefetch_bytes_max` plus one batch waiting to be
//! taken by the consumer.
//!
//! **Transport.** When the client is connected over storaged's Unix socket
//! (same host), the loader reads through the zero-copy path instead: it
//! registers a few regions, each large enough for one batch, and each
//! batch is one `ReadInto` into a free region. Samples are then `Bytes`
//! views of the region (no copy on either side); a region is reused only
//! when every sample of the batch it holds has been dropped. A consumer
//! that keeps samples of every region gets its next batch over gRPC rather
//! than a loader that waits forever. Each [`Batch`] says which path served
//! it, and [`Loader::stats`] counts batches and bytes per path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use storaged_proto::model::{
    BATCH_ANY_ORDER_ITEM_BYTES_MAX, READ_INTO_ALIGN_BYTES, REGION_UNKNOWN_METADATA_KEY,
    read_into_span,
};

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use tonic::{Code, Status};

use crate::plan::{PlanError, PlanSpec, PlanState, rank_sequence, worker_sequence};

/// The server's checksum block, for laying out regions before one is
/// registered (the registration reply confirms it).
const CHECKSUM_BLOCK_BYTES: u64 = storaged_proto::model::CHECKSUM_BLOCK_BYTES as u64;
use crate::region::{Region, RegionRead};
use crate::retry::Retrying;

mod cluster;
mod scheduler;
use crate::{BatchItem, ClientError, Dataset, ObjectInfo, async_stream_bounded};
use scheduler::Scheduler;

/// Largest batch a loader accepts: one `ReadBatch` call per batch.
pub const LOADER_BATCH_ITEMS_MAX: usize = 16_384;

/// Items each `ReadBatch` call of the loader keeps in flight on the server.
pub const LOADER_CALL_IN_FLIGHT_MAX: u32 = 256;

/// One (rank, worker)'s read order for an epoch, resolved to objects.
#[derive(Debug, Clone)]
pub struct Plan {
    spec: PlanSpec,
    objects: Arc<[ObjectInfo]>,
    indices: Vec<u64>,
    /// The whole rank's order (every worker's samples interleaved), for
    /// read-ahead hints; `None` after a resume, where a worker's positions
    /// no longer line up with the rank's.
    rank_order: Option<Arc<[u64]>>,
}

impl Plan {
    /// Applies `spec` (and `resume`) to a listing of the dataset, which must
    /// be in listing order (as [`Dataset::list`] returns it).
    pub fn new(
        objects: Arc<[ObjectInfo]>,
        spec: PlanSpec,
        resume: Option<&PlanState>,
    ) -> Result<Self, PlanError> {
        let indices = worker_sequence(objects.len() as u64, &spec, resume)?;
        let rank_order = match resume {
            None => Some(rank_sequence(objects.len() as u64, &spec)?.into()),
            Some(_) => None,
        };
        Ok(Self {
            spec,
            objects,
            indices,
            rank_order,
        })
    }

    /// Object indices of batch `batch` (of `batch_size` samples) of *every*
    /// worker of this rank: the window a read-ahead hint names. Workers
    /// take the rank's order round-robin (by sample, or by batch), so their
    /// batch `b`s together are one contiguous stretch of it, which storaged
    /// reads sorted by (device, offset) with neighbours merged. After a
    /// resume, only this worker's own batch.
    fn hint_window(&self, batch: usize, batch_size: usize) -> &[u64] {
        match &self.rank_order {
            Some(order) => {
                let width = batch_size * self.spec.num_workers as usize;
                let start = (batch * width).min(order.len());
                &order[start..(start + width).min(order.len())]
            }
            None => {
                let start = (batch * batch_size).min(self.indices.len());
                &self.indices[start..(start + batch_size).min(self.indices.len())]
            }
        }
    }

    /// Like [`new`](Self::new), but dealing the rank's sequence to the
    /// workers a batch at a time (batch `i` of `batch_size` samples to
    /// worker `i % num_workers`), as PyTorch's DataLoader deals the batches
    /// of a map-style dataset: the workers' batches, taken round-robin, are
    /// then exactly the rank's sequence in order, and the rank's batch
    /// count does not depend on the worker count.
    pub fn batch_dealt(
        objects: Arc<[ObjectInfo]>,
        spec: PlanSpec,
        batch_size: usize,
    ) -> Result<Self, PlanError> {
        // rank_sequence validates the spec (worker in range, ...).
        let order: Arc<[u64]> = rank_sequence(objects.len() as u64, &spec)?.into();
        let workers = spec.num_workers as usize;
        let indices = order
            .chunks(batch_size.max(1))
            .skip(spec.worker as usize)
            .step_by(workers)
            .flatten()
            .copied()
            .collect();
        Ok(Self {
            spec,
            objects,
            indices,
            rank_order: Some(order),
        })
    }

    /// This plan without its first `n` samples: what is left of one
    /// worker's sequence after it consumed `n` (a per-worker resume, as a
    /// framework that checkpoints each worker on its own does it; the
    /// worker count must be the one the sequence was dealt for). Read-ahead
    /// hints then cover this worker's own batches only.
    pub fn skip(mut self, n: u64) -> Result<Self, PlanError> {
        let available = self.indices.len() as u64;
        if n > available {
            return Err(PlanError::PositionPastEnd {
                worker: self.spec.worker as usize,
                position: n,
                available,
            });
        }
        self.indices.drain(..n as usize);
        if n > 0 {
            self.rank_order = None;
        }
        Ok(self)
    }

    pub fn spec(&self) -> &PlanSpec {
        &self.spec
    }

    /// Samples in this worker's sequence.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Object indices (positions in the listing), in read order.
    pub fn indices(&self) -> &[u64] {
        &self.indices
    }

    /// The objects in read order.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectInfo> + '_ {
        self.indices.iter().map(|&i| &self.objects[i as usize])
    }

    /// The dataset's listing this plan indexes into.
    pub fn listing(&self) -> &Arc<[ObjectInfo]> {
        &self.objects
    }
}

/// One sample: exactly the object's bytes.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Position in the dataset's listing.
    pub object_index: u64,
    pub path: String,
    pub data: Bytes,
}

/// Which read path served a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// `ReadBatch` over gRPC (TCP or the Unix socket).
    Grpc,
    /// `ReadInto` a registered region: zero-copy shared memory.
    Shm,
    /// `Read` on the TCP bulk channel, received into this process's
    /// region and checked here (storaged on another host).
    Bulk,
}

impl ReadPath {
    /// The path that served reads into `region`.
    fn of(region: &Region) -> Self {
        if region.is_shared() {
            Self::Shm
        } else {
            Self::Bulk
        }
    }
}

/// Consecutive samples of a plan.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position of the first sample in the plan (after any resume).
    pub first_position: u64,
    pub samples: Vec<Sample>,
    pub served_by: ReadPath,
}

/// Batches and sample bytes served per path so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoaderStats {
    pub grpc_batches: u64,
    pub grpc_bytes: u64,
    pub shm_batches: u64,
    pub shm_bytes: u64,
    pub bulk_batches: u64,
    pub bulk_bytes: u64,
    /// Read-ahead hints sent, objects storaged accepted from them, and
    /// hints that failed (ignored: a hint is advice).
    pub hints_sent: u64,
    pub hint_objects_accepted: u64,
    pub hints_failed: u64,
}

#[derive(Debug, Default)]
struct StatCounters {
    grpc_batches: AtomicU64,
    grpc_bytes: AtomicU64,
    shm_batches: AtomicU64,
    shm_bytes: AtomicU64,
    bulk_batches: AtomicU64,
    bulk_bytes: AtomicU64,
    hints_sent: AtomicU64,
    hint_objects_accepted: AtomicU64,
    hints_failed: AtomicU64,
}

/// How a [`Loader`] reads; [`Default`] is what [`Dataset::loader`] uses.
#[derive(Debug, Clone, Copy)]
pub struct LoaderOptions {
    /// Send storaged the part of the plan beyond the batches being read
    /// (up to `hint_bytes_max`), so it reads those samples ahead, in
    /// device order with neighbours merged. On both paths: over gRPC the
    /// read-ahead buffers are sent as they are; on the shm path storaged
    /// copies them into the region (one memory copy on the server,
    /// counted in `shm_payload_bytes_copied`) where it would otherwise read
    /// each batch's samples on their own. Off, the shm path copies nothing.
    pub hints: bool,
    pub hint_bytes_max: u64,
    /// How long one batch may keep failing with `UNAVAILABLE`, `CANCELLED`
    /// or `ABORTED` (storaged restarting, a dropped connection) before the
    /// loader gives up and
    /// yields the error. The batch is read again whole, with the client's
    /// backoff between attempts; other errors are never retried.
    pub retry_budget: Duration,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            hints: true,
            hint_bytes_max: LOADER_HINT_BYTES_MAX,
            retry_budget: LOADER_RETRY_BUDGET,
        }
    }
}

/// Default [`LoaderOptions::retry_budget`]: long enough for storaged to
/// restart on a busy node.
pub const LOADER_RETRY_BUDGET: Duration = Duration::from_secs(30);

/// Default read-ahead a loader asks of storaged beyond its own prefetch,
/// counted over its hint windows (which hold every worker's samples).
pub const LOADER_HINT_BYTES_MAX: u64 = 32 << 20;

/// Paths per `Hint` call: storaged's default `hint_items_max`.
const HINT_PATHS_MAX: usize = 4096;

/// A stream of [`Batch`]es in plan order; see the module documentation.
pub struct Loader {
    batches: Pin<Box<dyn Stream<Item = Result<Batch, ClientError>> + Send>>,
    consumed: Arc<AtomicU64>,
    total: u64,
    stats: Arc<StatCounters>,
}

impl Loader {
    /// A loader handing out `batches` (`total` samples), counting them in
    /// `stats`.
    fn new(
        batches: impl Stream<Item = Result<Batch, ClientError>> + Send + 'static,
        total: u64,
        stats: Arc<StatCounters>,
    ) -> Self {
        Self {
            batches: Box::pin(batches),
            consumed: Arc::new(AtomicU64::new(0)),
            total,
            stats,
        }
    }

    /// Samples handed to the consumer so far: this worker's entry in the
    /// `positions` of a [`PlanState`] checkpoint.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }

    /// Samples in the plan.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Batches and bytes per read path, counted as batches are handed out.
    pub fn stats(&self) -> LoaderStats {
        let c = &self.stats;
        LoaderStats {
            grpc_batches: c.grpc_batches.load(Ordering::Relaxed),
            grpc_bytes: c.grpc_bytes.load(Ordering::Relaxed),
            shm_batches: c.shm_batches.load(Ordering::Relaxed),
            shm_bytes: c.shm_bytes.load(Ordering::Relaxed),
            bulk_batches: c.bulk_batches.load(Ordering::Relaxed),
            bulk_bytes: c.bulk_bytes.load(Ordering::Relaxed),
            hints_sent: c.hints_sent.load(Ordering::Relaxed),
            hint_objects_accepted: c.hint_objects_accepted.load(Ordering::Relaxed),
            hints_failed: c.hints_failed.load(Ordering::Relaxed),
        }
    }
}

impl Stream for Loader {
    type Item = Result<Batch, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.batches.poll_next_unpin(cx);
        if let Poll::Ready(Some(Ok(batch))) = &next {
            self.consumed
                .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
            let bytes: u64 = batch.samples.iter().map(|s| s.data.len() as u64).sum();
            let (batches, bytes_served) = match batch.served_by {
                ReadPath::Grpc => (&self.stats.grpc_batches, &self.stats.grpc_bytes),
                ReadPath::Shm => (&self.stats.shm_batches, &self.stats.shm_bytes),
                ReadPath::Bulk => (&self.stats.bulk_batches, &self.stats.bulk_bytes),
            };
            batches.fetch_add(1, Ordering::Relaxed);
            bytes_served.fetch_add(bytes, Ordering::Relaxed);
        }
        next
    }
}

/// What one batch call needs: its samples (index, path, size) and their
/// bytes in all.
#[derive(Clone)]
struct BatchPlan {
    first_position: u64,
    samples: Vec<(u64, String, u64)>,
    bytes: u64,
}

impl BatchPlan {
    /// Region bytes one `ReadInto` of every sample whole takes (each
    /// sample's span, see `read_into_span`).
    fn region_span(&self) -> u64 {
        self.samples
            .iter()
            .map(|&(_, _, size)| read_into_span(0, size, size, CHECKSUM_BLOCK_BYTES).0)
            .sum()
    }
}

/// A region the shm loader reads batches into. Sample views hold an `Arc`
/// of it; the loader reuses it only when it holds the last one.
struct RegionSlot {
    /// Always `Some` until dropped, when it goes back to the client's
    /// cache.
    region: Option<Region>,
    client: crate::Client,
}

impl RegionSlot {
    fn region(&self) -> &Region {
        self.region.as_ref().expect("present until dropped")
    }
}

impl Drop for RegionSlot {
    /// The last sample (or the loader) let go: the next loader of this
    /// client reuses the region instead of registering a new one.
    fn drop(&mut self) {
        if let Some(region) = self.region.take() {
            self.client.give_back_region(region);
        }
    }
}

/// One sample's bytes inside a [`RegionSlot`].
struct RegionView {
    slot: Arc<RegionSlot>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for RegionView {
    fn as_ref(&self) -> &[u8] {
        // No read into the region is in flight while a view exists: the
        // loader reads into a slot only when it holds its only `Arc`.
        self.slot.region().bytes(self.offset, self.len)
    }
}

/// Regions the shm loader keeps per batch in flight, plus one for the batch
/// the consumer holds and one waiting in the channel.
const SHM_SLOTS_EXTRA: u64 = 2;

/// Most batches in flight on the shm path (so at most 4 regions per
/// loader): each is one `ReadInto` of a whole batch, and regions count
/// against the server's per-uid limit, which the loaders of every
/// DataLoader worker of every job of a user share.
const SHM_PREFETCH_REGIONS_MAX: u64 = 2;

/// Largest region the loader registers; a batch that needs more is read
/// over gRPC.
const SHM_REGION_BYTES_MAX: u64 = 1 << 30;

impl Dataset {
    /// Lists the dataset and returns this (rank, worker)'s plan.
    pub async fn plan(&self, spec: PlanSpec) -> Result<Plan, ClientError> {
        self.plan_resumed(spec, None).await
    }

    /// Like [`plan`](Self::plan), continuing after what `resume` consumed.
    pub async fn plan_resumed(
        &self,
        spec: PlanSpec,
        resume: Option<&PlanState>,
    ) -> Result<Plan, ClientError> {
        let objects: Arc<[ObjectInfo]> = self.list("").await?.into();
        Ok(Plan::new(objects, spec, resume)?)
    }

    /// Reads `plan` in batches of `batch_size` samples (the last may be
    /// shorter), keeping up to `prefetch_bytes_max` of reads ahead of the
    /// consumer, with read-ahead hints on.
    pub fn loader(
        &self,
        plan: Plan,
        batch_size: usize,
        prefetch_bytes_max: u64,
    ) -> Result<Loader, ClientError> {
        self.loader_with(
            plan,
            batch_size,
            prefetch_bytes_max,
            LoaderOptions::default(),
        )
    }

    /// [`loader`](Self::loader) with explicit options.
    pub fn loader_with(
        &self,
        plan: Plan,
        batch_size: usize,
        prefetch_bytes_max: u64,
        options: LoaderOptions,
    ) -> Result<Loader, ClientError> {
        check_loader_args(batch_size, prefetch_bytes_max)?;
        let total = plan.len() as u64;
        let batches = batch_plans(&plan, batch_size);
        let dataset = self.clone();
        // Regions (shared memory on the same host, the TCP bulk channel
        // from another) need one of those and regions of a sane size.
        let region_bytes = region_bytes_for(&batches);
        let use_shm = region_bytes <= SHM_REGION_BYTES_MAX;
        let stats: Arc<StatCounters> = Arc::default();
        let mut hints = options.hints.then(|| HintWindow {
            paths: (0..batches.len())
                .map(|b| {
                    let window = plan.hint_window(b, batch_size);
                    let objects = window.iter().map(|&i| &plan.objects[i as usize]);
                    let bytes = objects.clone().map(|o| o.size).sum();
                    (objects.map(|o| o.path.clone()).collect(), bytes)
                })
                .collect(),
            next: 0,
            launched: 0,
            bytes_ahead: 0,
            bytes_max: options.hint_bytes_max,
            stats: Arc::clone(&stats),
        });
        let stream = async_stream_bounded(1, move |tx| async move {
            let mut slots: Vec<Arc<RegionSlot>> = Vec::new();
            let mut use_shm = use_shm && dataset.client.reads_into_regions().await;
            if use_shm {
                let count = (prefetch_bytes_max / region_bytes).clamp(1, SHM_PREFETCH_REGIONS_MAX)
                    + SHM_SLOTS_EXTRA;
                slots = register_slots(
                    &dataset,
                    count.min(batches.len() as u64 + 1),
                    region_bytes,
                    options.retry_budget,
                )
                .await;
                use_shm = !slots.is_empty();
            }
            let mut scheduler =
                Scheduler::new(batches, prefetch_bytes_max, use_shm.then_some(slots));
            let mut running = FuturesOrdered::new();
            loop {
                while let Some((batch, slot)) = scheduler.start_next() {
                    // A region travels with its fetch and comes back with
                    // the result.
                    running.push_back(fetch_retrying(
                        dataset.clone(),
                        batch,
                        slot,
                        options.retry_budget,
                    ));
                    if let Some(h) = hints.as_mut() {
                        h.launched_one();
                    }
                }
                if let Some(h) = hints.as_mut() {
                    h.send(&dataset).await;
                }
                let Some((bytes, result, slot)) = running.next().await else {
                    return;
                };
                scheduler.finished(bytes, slot);
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Loader::new(stream, total, stats))
    }
}

/// What every loader refuses: batches of no or too many samples, no
/// prefetch room.
fn check_loader_args(batch_size: usize, prefetch_bytes_max: u64) -> Result<(), ClientError> {
    if batch_size == 0 || batch_size > LOADER_BATCH_ITEMS_MAX {
        return Err(ClientError::InvalidArgument(format!(
            "batch_size {batch_size} must be 1 to {LOADER_BATCH_ITEMS_MAX}"
        )));
    }
    if prefetch_bytes_max == 0 {
        return Err(ClientError::InvalidArgument(
            "prefetch_bytes_max must be at least 1 byte".into(),
        ));
    }
    Ok(())
}

/// The part of a plan hinted to storaged: the windows of batches from
/// `launched` to `next` are hinted but not yet read, `bytes_ahead` of them.
struct HintWindow {
    /// Per batch: the paths of its hint window and their bytes.
    paths: Vec<(Vec<String>, u64)>,
    next: usize,
    launched: usize,
    bytes_ahead: u64,
    bytes_max: u64,
    stats: Arc<StatCounters>,
}

impl HintWindow {
    fn launched_one(&mut self) {
        if self.launched < self.next {
            self.bytes_ahead -= self.paths[self.launched].1;
        }
        self.launched += 1;
        self.next = self.next.max(self.launched);
    }

    /// Hints the windows of the batches after those being read, until
    /// `bytes_max` are hinted ahead; at least the next batch's. Calls carry
    /// at most `HINT_PATHS_MAX` paths (storaged's default limit); a refused
    /// or failed hint is counted, never fatal.
    async fn send(&mut self, dataset: &Dataset) {
        while self.next < self.paths.len()
            && (self.bytes_ahead < self.bytes_max || self.next == self.launched)
        {
            let (paths, bytes) = &self.paths[self.next];
            self.next += 1;
            self.bytes_ahead += bytes;
            for chunk in paths.chunks(HINT_PATHS_MAX) {
                self.stats.hints_sent.fetch_add(1, Ordering::Relaxed);
                match dataset.hint(chunk).await {
                    Ok(r) => {
                        self.stats
                            .hint_objects_accepted
                            .fetch_add(u64::from(r.accepted), Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.stats.hints_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The size of the loader's regions: the largest batch's spans, rounded
/// for alignment, and a quarter more in whole MiB (the next epoch's batches
/// differ a little in size, and should still fit the regions this one
/// leaves in the client's cache).
fn region_bytes_for(batches: &[BatchPlan]) -> u64 {
    let span_max = batches
        .iter()
        .map(BatchPlan::region_span)
        .max()
        .unwrap_or(0)
        .max(READ_INTO_ALIGN_BYTES);
    (span_max + span_max / 4).next_multiple_of(1 << 20)
}

/// `plan` cut into batches of `batch_size` samples (the last may be
/// shorter).
fn batch_plans(plan: &Plan, batch_size: usize) -> Vec<BatchPlan> {
    plan.indices
        .chunks(batch_size)
        .enumerate()
        .map(|(b, chunk)| {
            let samples: Vec<(u64, String, u64)> = chunk
                .iter()
                .map(|&i| {
                    let o = &plan.objects[i as usize];
                    (i, o.path.clone(), o.size)
                })
                .collect();
            let bytes = chunk.iter().map(|&i| plan.objects[i as usize].size).sum();
            BatchPlan {
                first_position: (b * batch_size) as u64,
                samples,
                bytes,
            }
        })
        .collect()
}

/// Up to `count` regions of `region_bytes` for the loader to read into.
/// Regions only save copies: with fewer than asked for (the server's
/// region limits, no memfd), the loader reads with those there are, or
/// over gRPC (each batch says which path served it).
async fn register_slots(
    dataset: &Dataset,
    count: u64,
    region_bytes: u64,
    retry_budget: Duration,
) -> Vec<Arc<RegionSlot>> {
    let mut slots = Vec::new();
    for _ in 0..count {
        let registered = retrying(&dataset.client, retry_budget)
            .run(|| dataset.client.region(region_bytes))
            .await;
        match registered {
            Ok(region) => slots.push(Arc::new(RegionSlot {
                region: Some(region),
                client: dataset.client.clone(),
            })),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    regions = slots.len(),
                    "cannot register a loader region; reading with fewer"
                );
                break;
            }
        }
    }
    slots
}

/// The client's retry policy, bounded by the loader's time budget alone.
fn retrying(client: &crate::Client, budget: Duration) -> Retrying {
    Retrying::new(client.retry.with_budget_only(budget))
}

/// Reads one batch (into `slot` when there is one, else over gRPC), again
/// while it fails transiently and `budget` allows: a restart of storaged
/// costs the batch's reads, not the epoch. Gives back the batch's planned
/// bytes and the slot with the result.
async fn fetch_retrying(
    dataset: Dataset,
    batch: BatchPlan,
    mut slot: Option<Arc<RegionSlot>>,
    budget: Duration,
) -> (u64, Result<Batch, ClientError>, Option<Arc<RegionSlot>>) {
    let mut retrying = retrying(&dataset.client, budget);
    loop {
        let attempt_plan = batch.clone();
        let (bytes, result, back) = match slot {
            Some(slot) => fetch_shm(dataset.clone(), attempt_plan, slot).await,
            None => {
                let (bytes, result) = fetch(dataset.clone(), attempt_plan).await;
                (bytes, result, None)
            }
        };
        slot = back;
        match result {
            Ok(batch) => return (bytes, Ok(batch), slot),
            Err(e) => {
                if let Err(e) = retrying.again(e).await {
                    return (bytes, Err(e), slot);
                }
            }
        }
    }
}

impl Dataset {
    /// Whole objects `(path, size)` (sizes from the listing), each as
    /// `Bytes`: on a same-host connection read into one region (a cached
    /// one when an idle region fits) and handed out as views of it, with
    /// no copy on either side (the region goes back to the client's cache
    /// when the last view is dropped); else one completion-order
    /// `ReadBatch` (large objects streamed in order), as the loader does.
    pub async fn read_objects(&self, objects: &[(String, u64)]) -> Result<Vec<Bytes>, ClientError> {
        let batch = BatchPlan {
            first_position: 0,
            samples: objects
                .iter()
                .enumerate()
                .map(|(i, (path, size))| (i as u64, path.clone(), *size))
                .collect(),
            bytes: objects.iter().map(|(_, size)| size).sum(),
        };
        let region_bytes = batch
            .region_span()
            .max(READ_INTO_ALIGN_BYTES)
            .next_multiple_of(1 << 20);
        let region =
            if region_bytes <= SHM_REGION_BYTES_MAX && self.client.reads_into_regions().await {
                self.client.region(region_bytes).await.ok()
            } else {
                None
            };
        let result = match region {
            Some(region) => {
                let slot = Arc::new(RegionSlot {
                    region: Some(region),
                    client: self.client.clone(),
                });
                fetch_shm(self.clone(), batch, slot).await.1
            }
            None => fetch(self.clone(), batch).await.1,
        };
        Ok(result?.samples.into_iter().map(|s| s.data).collect())
    }
}

/// One range of [`Dataset::read_ranges_sized`]: `length` bytes at `offset`
/// of object `path`, whose size (from a listing) is `object_size`; the
/// range is clamped to the object's end.
#[derive(Debug, Clone)]
pub struct SizedRange {
    pub path: String,
    pub object_size: u64,
    pub offset: u64,
    pub length: u64,
}

impl SizedRange {
    fn region_read(&self) -> RegionRead {
        RegionRead {
            path: self.path.clone(),
            offset: self.offset,
            length: Some(self.length),
            object_size: self.object_size,
        }
    }
}

impl Dataset {
    /// [`read_ranges_sized`](Self::read_ranges_sized) of one range.
    pub async fn read_range_sized(
        &self,
        path: &str,
        object_size: u64,
        offset: u64,
        length: u64,
    ) -> Result<(Bytes, ReadPath), ClientError> {
        let range = SizedRange {
            path: path.to_owned(),
            object_size,
            offset,
            length,
        };
        let (mut results, via) = self.read_ranges_sized(std::slice::from_ref(&range)).await?;
        let bytes = results.pop().expect("one result per range")?;
        Ok((bytes, via))
    }

    /// Many ranges of this dataset in one call, each with its own result.
    /// On a same-host connection they are read into one region (a cached
    /// one when an idle region fits) and handed out as views of it, with
    /// no copy on either side; otherwise, or when no region can be had, by
    /// one completion-order `ReadBatch` (ranges of at most
    /// `BATCH_ANY_ORDER_ITEM_BYTES_MAX`). Returns the results in `ranges`
    /// order and the path that served them. Tried once: a failure that a
    /// restart of storaged explains comes back transient
    /// ([`crate::retry::is_transient`]).
    pub async fn read_ranges_sized(
        &self,
        ranges: &[SizedRange],
    ) -> Result<(Vec<Result<Bytes, ClientError>>, ReadPath), ClientError> {
        let reads: Vec<RegionRead> = ranges.iter().map(SizedRange::region_read).collect();
        let wanted: u64 = reads.iter().map(|r| r.range().1).sum();
        if wanted == 0 {
            return Ok((
                ranges.iter().map(|_| Ok(Bytes::new())).collect(),
                ReadPath::Grpc,
            ));
        }
        if self.client.reads_into_regions().await {
            // Powers of two: few size classes, so the client's cache of
            // idle regions serves every later read. Sized by the exact span
            // (the ranges widened to whole checksum blocks) at the usual
            // block size, so an aligned 8 MiB read takes an 8 MiB region,
            // not 16 (every fresh region is memory storaged must fault in
            // and pin); a region too small for the server's block size
            // gets replaced below.
            let block = u64::from(storaged_proto::model::CHECKSUM_BLOCK_BYTES);
            let span: u64 = reads
                .iter()
                .map(|r| {
                    let (start, len) = r.range();
                    read_into_span(start, len, r.object_size, block).0
                })
                .sum();
            let mut region_bytes = span
                .next_power_of_two()
                .max(crate::region::REGION_BYTES_MIN);
            while region_bytes <= SHM_REGION_BYTES_MAX {
                let Ok(region) = self.client.region_unless_refused(region_bytes).await else {
                    break;
                };
                let span: u64 = reads.iter().map(|r| region.span(r)).sum();
                if span <= region.len() as u64 {
                    return self.read_ranges_into(region, &reads).await;
                }
                self.client.give_back_region(region);
                region_bytes = span.next_power_of_two();
            }
        }
        self.read_ranges_grpc(&reads).await
    }

    /// [`read_ranges_sized`](Self::read_ranges_sized) into `region`.
    async fn read_ranges_into(
        &self,
        mut region: Region,
        reads: &[RegionRead],
    ) -> Result<(Vec<Result<Bytes, ClientError>>, ReadPath), ClientError> {
        let path = ReadPath::of(&region);
        let result = self.read_into(&mut region, reads).await.map(|batch| {
            (0..batch.len())
                .map(|i| batch.extent(i).map_err(Status::clone))
                .collect::<Vec<_>>()
        });
        let extents = match result {
            Ok(extents) => extents,
            Err(ClientError::Status(s)) if region_unknown(&s) => {
                return Err(ClientError::Status(Status::unavailable(format!(
                    "storaged no longer knew the region ({})",
                    s.message()
                ))));
            }
            Err(e) if !region.is_registered() => {
                return Err(ClientError::Status(Status::unavailable(format!(
                    "storaged dropped the region during the read ({e})"
                ))));
            }
            Err(e) => return Err(e),
        };
        let slot = Arc::new(RegionSlot {
            region: Some(region),
            client: self.client.clone(),
        });
        let results = extents
            .into_iter()
            .zip(reads)
            .map(|(extent, read)| match extent {
                Ok((offset, len)) => Ok(Bytes::from_owner(RegionView {
                    slot: Arc::clone(&slot),
                    offset,
                    len,
                })),
                Err(s) => Err(ClientError::Status(Status::new(
                    s.code(),
                    format!("{}: {}", read.path, s.message()),
                ))),
            })
            .collect();
        Ok((results, path))
    }

    /// [`read_ranges_sized`](Self::read_ranges_sized) over gRPC: one
    /// completion-order `ReadBatch`.
    pub(crate) async fn read_ranges_grpc(
        &self,
        reads: &[RegionRead],
    ) -> Result<(Vec<Result<Bytes, ClientError>>, ReadPath), ClientError> {
        let items: Vec<BatchItem> = reads
            .iter()
            .map(|r| {
                let (offset, length) = r.range();
                BatchItem {
                    path: r.path.clone(),
                    offset,
                    length: Some(length),
                }
            })
            .collect();
        let in_flight = (items.len() as u32).min(LOADER_CALL_IN_FLIGHT_MAX);
        let mut results: Vec<Option<Result<Bytes, ClientError>>> =
            reads.iter().map(|_| None).collect();
        let mut stream = Box::pin(self.read_batch_any_order(items, in_flight));
        while let Some(result) = stream.next().await {
            let result = result?;
            let i = result.index as usize;
            let Some(slot) = results.get_mut(i) else {
                return Err(ClientError::Protocol(format!(
                    "batch item {i} does not exist"
                )));
            };
            *slot = Some(result.data.map_err(|s| {
                ClientError::Status(Status::new(
                    s.code(),
                    format!("{}: {}", reads[i].path, s.message()),
                ))
            }));
        }
        let results = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.unwrap_or_else(|| {
                    Err(ClientError::Protocol(format!(
                        "{}: no data arrived",
                        reads[i].path
                    )))
                })
            })
            .collect();
        Ok((results, ReadPath::Grpc))
    }
}

/// Reads one batch and puts the samples back in plan order. Objects up to
/// [`BATCH_ANY_ORDER_ITEM_BYTES_MAX`] go in one completion-order
/// `ReadBatch`; larger ones (shards), and any item storaged refuses in that
/// mode (a server configured with a lower limit), are read with in-order
/// `Read` streams, which storaged sends in message-sized pieces. Returns
/// the batch's planned bytes with the result.
async fn fetch(dataset: Dataset, batch: BatchPlan) -> (u64, Result<Batch, ClientError>) {
    let (large, small): (Vec<usize>, Vec<usize>) = (0..batch.samples.len())
        .partition(|&i| batch.samples[i].2 > BATCH_ANY_ORDER_ITEM_BYTES_MAX);
    let mut data: Vec<Option<Bytes>> = vec![None; batch.samples.len()];
    let outcome: Result<(), ClientError> = async {
        let refused = fetch_any_order(&dataset, &batch, &small, &mut data).await?;
        for i in large.into_iter().chain(refused) {
            let (_, path, _) = &batch.samples[i];
            let bytes = dataset.read(path).await.map_err(|e| match e {
                ClientError::Status(s) => {
                    ClientError::Status(Status::new(s.code(), format!("{path}: {}", s.message())))
                }
                e => e,
            })?;
            data[i] = Some(bytes);
        }
        Ok(())
    }
    .await;
    let result = outcome.and_then(|()| {
        let samples = batch
            .samples
            .into_iter()
            .zip(data)
            .map(|((object_index, path, _), data)| match data {
                Some(data) => Ok(Sample {
                    object_index,
                    path,
                    data,
                }),
                None => Err(ClientError::Protocol(format!("{path}: no data arrived"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            first_position: batch.first_position,
            samples,
            served_by: ReadPath::Grpc,
        })
    });
    (batch.bytes, result)
}

/// Reads the samples `which` (positions in `batch`) with one
/// completion-order `ReadBatch` into `data`. Returns the positions storaged
/// refused as too large for that mode (RESOURCE_EXHAUSTED), for an
/// in-order read.
async fn fetch_any_order(
    dataset: &Dataset,
    batch: &BatchPlan,
    which: &[usize],
    data: &mut [Option<Bytes>],
) -> Result<Vec<usize>, ClientError> {
    if which.is_empty() {
        return Ok(Vec::new());
    }
    let items = which
        .iter()
        .map(|&i| BatchItem {
            path: batch.samples[i].1.clone(),
            offset: 0,
            length: None,
        })
        .collect();
    let in_flight = (which.len() as u32).min(LOADER_CALL_IN_FLIGHT_MAX);
    let mut results = Box::pin(dataset.read_batch_any_order(items, in_flight));
    let mut refused = Vec::new();
    while let Some(result) = results.next().await {
        let result = result?;
        let &i = which.get(result.index as usize).ok_or_else(|| {
            ClientError::Protocol(format!("batch item {} does not exist", result.index))
        })?;
        let (_, path, _) = &batch.samples[i];
        match result.data {
            Ok(bytes) => data[i] = Some(bytes),
            Err(s) if s.code() == Code::ResourceExhausted => refused.push(i),
            Err(s) => {
                return Err(ClientError::Status(Status::new(
                    s.code(),
                    format!("{path}: {}", s.message()),
                )));
            }
        }
    }
    Ok(refused)
}

/// Whether a call failed because storaged does not know the region it
/// named (see [`REGION_UNKNOWN_METADATA_KEY`]).
fn region_unknown(s: &Status) -> bool {
    s.code() == Code::NotFound && s.metadata().contains_key(REGION_UNKNOWN_METADATA_KEY)
}

/// Reads one batch into `slot`'s region (the loader holds its only other
/// `Arc`, so nothing reads the region meanwhile) and hands out the samples
/// as views of it.
async fn fetch_shm(
    dataset: Dataset,
    batch: BatchPlan,
    mut slot: Arc<RegionSlot>,
) -> (u64, Result<Batch, ClientError>, Option<Arc<RegionSlot>>) {
    // Laid out in listing order, which is disk order: neighbours on disk
    // are then neighbours in the region, and storaged merges their reads.
    let mut disk_order: Vec<usize> = (0..batch.samples.len()).collect();
    disk_order.sort_by_key(|&i| batch.samples[i].0);
    let reads: Vec<RegionRead> = disk_order
        .iter()
        .map(|&i| {
            let (_, path, size) = &batch.samples[i];
            RegionRead::whole(path.clone(), *size)
        })
        .collect();
    let served_by = slot.region.as_ref().map_or(ReadPath::Shm, ReadPath::of);
    let extents: Result<Vec<(usize, usize)>, ClientError> = async {
        // The loader took this slot when no view referred to it, and views
        // are only made below, so this is the only `Arc`.
        let Some(slot) = Arc::get_mut(&mut slot) else {
            return Err(ClientError::Protocol("region slot is still shared".into()));
        };
        let region = slot.region.as_mut().expect("present until dropped");
        if !region.is_registered() {
            // storaged restarted since this region was registered (the
            // client's channel reconnects by itself): replace the region.
            let size = region.len() as u64;
            *region = dataset.client.register_region(size).await?;
        }
        let extents: Result<Vec<(usize, usize)>, ClientError> = async {
            let read = dataset.read_into(region, &reads).await?;
            let mut extents = vec![(0, 0); read.len()];
            for (j, &i) in disk_order.iter().enumerate() {
                extents[i] = read.extent(j).map_err(|s| {
                    ClientError::Status(tonic::Status::new(
                        s.code(),
                        format!("{}: {}", batch.samples[i].1, s.message()),
                    ))
                })?;
            }
            Ok(extents)
        }
        .await;
        match extents {
            // storaged does not know the region (it restarted after the
            // registration, and this client has not yet seen the old
            // registration end): register a fresh one now, and have the
            // batch read again.
            Err(ClientError::Status(s)) if region_unknown(&s) => {
                let size = region.len() as u64;
                *region = dataset.client.register_region(size).await?;
                Err(ClientError::Status(Status::unavailable(format!(
                    "storaged no longer knew the region ({})",
                    s.message()
                ))))
            }
            // The region's registration ended under the read: storaged
            // went away (a restart forgets regions). That is worth a retry
            // with a fresh registration, whatever code the read got.
            Err(e) if !region.is_registered() => Err(ClientError::Status(Status::unavailable(
                format!("storaged dropped the region during the read ({e})"),
            ))),
            extents => extents,
        }
    }
    .await;
    let result = extents.map(|extents| Batch {
        first_position: batch.first_position,
        samples: batch
            .samples
            .into_iter()
            .zip(extents)
            .map(|((object_index, path, _), (offset, len))| Sample {
                object_index,
                path,
                data: Bytes::from_owner(RegionView {
                    slot: Arc::clone(&slot),
                    offset,
                    len,
                }),
            })
            .collect(),
        served_by,
    });
    (batch.bytes, result, Some(slot))
}
