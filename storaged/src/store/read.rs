//! The read path: object ranges as verified windows (device reads merged
//! per window, every checksum block checked, rebuilt from parity where a
//! unit is lost), streamed in order, in batches, or in any order.

use super::class::FaultAction;
use super::window::{ReadWindow, WindowPolicy};
use super::*;
use crate::error::{Limit, ReadError};

impl Store {
    /// Device extents of an object's bytes, in object order.
    pub fn object_extents(&self, obj: &ObjectRef) -> Vec<(u64, Segment)> {
        self.object_segments(obj, 0, obj.record.size)
            .into_iter()
            .map(|s| (s.logical - obj.record.logical_offset, s))
            .collect()
    }

    /// Device pieces of object bytes `[start, start + len)`, cut at stripe
    /// units. `Segment::logical` is in the dataset's address space (the
    /// pool's for `stripe`, the data space for `ec`).
    pub(crate) fn object_segments(&self, obj: &ObjectRef, start: u64, len: u64) -> Vec<Segment> {
        obj.dataset
            .layout
            .segments(obj.record.logical_offset + start, len)
    }

    /// Device and device offset of object byte `offset`.
    pub(super) fn locate(&self, obj: &ObjectRef, offset: u64) -> (u32, u64) {
        self.object_segments(obj, offset, 1)
            .first()
            .map(|s| (s.device, s.device_offset))
            .unwrap_or((0, 0))
    }

    /// Validates a range of `obj` and returns `(start, len)`.
    pub fn resolve_range(
        obj: &ObjectRef,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(u64, u64), ReadError> {
        let size = obj.record.size;
        if offset > size {
            return Err(ReadError::OutOfRange {
                path: obj.path.clone(),
                offset,
                length,
                size,
            });
        }
        let len = match length {
            None => size - offset,
            Some(l) if l <= size - offset => l,
            Some(_) => {
                return Err(ReadError::OutOfRange {
                    path: obj.path.clone(),
                    offset,
                    length,
                    size,
                });
            }
        };
        Ok((offset, len))
    }

    /// The one window policy of every read of `obj` (see `window`):
    /// windows of at most `message_bytes`.
    pub(super) fn window_policy(&self, obj: &ObjectRef) -> WindowPolicy {
        WindowPolicy::new(obj, self.limits.message_bytes)
    }

    /// Reads window `w` of `obj`, verifies every checksum block of it, and
    /// returns its wanted parts. A read that fails on the devices follows
    /// the dataset's read-fault policy (see `class`).
    pub(super) async fn read_window(
        &self,
        obj: &ObjectRef,
        w: ReadWindow,
    ) -> Result<Vec<Chunk>, StoreError> {
        debug_assert_eq!(
            w.start % u64::from(obj.dataset.record.checksum_block_bytes),
            0
        );
        let (lo, hi) = w.wanted();
        if let Some(chunks) = self.read_ahead_hit(obj, lo, hi).await {
            return Ok(chunks);
        }
        if let Some(ec) = obj.dataset.layout.ec()
            && self.io.slots.any_missing()
        {
            // One snapshot of the missing devices for the check and the
            // rebuild.
            let missing = self.io.slots.missing();
            if self.window_meets_missing(obj, ec, w, &missing) {
                // Not charged to the call's budget: see `Budget::exempt`.
                return crate::budget::Budget::exempt(
                    self.read_window_rebuilt(obj, ec, w, &missing),
                )
                .await;
            }
        }
        match self.read_window_healthy(obj, w).await {
            Err(e) if obj.dataset.layout.on_read_fault(&e, false) != FaultAction::Fail => {
                tracing::debug!(dataset = %obj.dataset.name, path = %obj.path, error = %e, "read failed; recovering");
                crate::budget::Budget::exempt(self.read_window_recovering(obj, w)).await
            }
            r => r,
        }
    }

    /// Whether window `w` of an `ec` dataset should skip its direct read:
    /// a piece is on a known-missing device (no point trying it first), or
    /// the window is large and its stripes lost a unit anywhere (it joins
    /// the whole-stripe rebuild its neighbours share, rather than reading
    /// its units a second time).
    fn window_meets_missing(
        &self,
        obj: &ObjectRef,
        ec: &redundancy::EcDataset,
        w: ReadWindow,
        missing: &[bool],
    ) -> bool {
        let large = w.len() * 2 >= ec.map.unit_bytes();
        let g = ec.map.geometry;
        self.object_segments(obj, w.start, w.device_len())
            .iter()
            .any(|s| {
                missing[s.device as usize]
                    || (large && {
                        let (stripe, _) = ec.map.data_unit_of(s.logical);
                        (0..g.width()).any(|p| missing[ec.map.unit_location(stripe, p).0 as usize])
                    })
            })
    }

    /// Window `w` again after its direct read failed, the way its class
    /// recovers: rebuilt from parity (`ec`), or read once more into
    /// storaged's memory (`stripe`, after a read into a client's region).
    pub(super) async fn read_window_recovering(
        &self,
        obj: &ObjectRef,
        w: ReadWindow,
    ) -> Result<Vec<Chunk>, StoreError> {
        match obj.dataset.layout.ec() {
            Some(ec) => {
                let missing = self.io.slots.missing();
                self.read_window_rebuilt(obj, ec, w, &missing).await
            }
            None => self.read_window_healthy(obj, w).await,
        }
    }

    /// An `ec` window that cannot be read directly. Windows of half a unit
    /// or more (streaming) are served from whole rebuilt stripes, which
    /// their neighbours share (no more bytes read than a healthy read);
    /// smaller ones (samples) rebuild just their byte range, falling back to
    /// whole stripes if that does not verify.
    pub(super) async fn read_window_rebuilt(
        &self,
        obj: &ObjectRef,
        ec: &redundancy::EcDataset,
        w: ReadWindow,
        missing: &[bool],
    ) -> Result<Vec<Chunk>, StoreError> {
        if w.len() * 2 < ec.map.unit_bytes() {
            match self.read_window_partial(obj, ec, w, missing).await {
                Ok(chunks) => return Ok(chunks),
                Err(e) => {
                    tracing::debug!(error = %e, "range rebuild did not verify; rebuilding whole stripes");
                }
            }
        }
        self.read_window_degraded(obj, ec, w).await
    }

    /// [`read_window`](Self::read_window) from the units themselves.
    pub(super) async fn read_window_healthy(
        &self,
        obj: &ObjectRef,
        w: ReadWindow,
    ) -> Result<Vec<Chunk>, StoreError> {
        let segs = self.object_segments(obj, w.start, w.device_len());
        let longest = segs.iter().map(|s| s.len).max().unwrap_or(0) as usize;
        let leases = self
            .io
            .pool
            .acquire_many(longest, segs.len())
            .await
            .map_err(StoreError::Buffers)?;
        let reads = segs.iter().zip(leases).map(|(s, lease)| {
            engine::read_exact(
                &*self.io.engine,
                s.device,
                s.device_offset,
                s.len as usize,
                lease,
            )
            .map_err(move |e| StoreError::from_io(s.device, s.device_offset, e))
        });
        let bufs: Vec<BufLease> = futures::future::try_join_all(reads).await?;
        let pieces = bufs.into_iter().map(BufLease::into_bytes).collect();
        self.verified_parts(obj, w, pieces)
    }

    /// Verifies window `w` of `obj`, whose bytes are `pieces` back to back,
    /// and hands out its wanted parts without copying.
    pub(super) fn verified_parts(
        &self,
        obj: &ObjectRef,
        w: ReadWindow,
        pieces: Vec<Bytes>,
    ) -> Result<Vec<Chunk>, StoreError> {
        let verified = crate::verified::verify(pieces, (w.start, w.end), Self::blocks(obj))
            .map_err(|e| self.verify_error(obj, e))?;
        Ok(wanted_parts(
            verified.into_iter(),
            w.start,
            w.end,
            w.want_start,
            w.want_end,
        ))
    }

    /// What `obj`'s bytes are checked against.
    pub(super) fn blocks(obj: &ObjectRef) -> crate::verified::Blocks<'_> {
        crate::verified::Blocks {
            block_bytes: u64::from(obj.dataset.record.checksum_block_bytes),
            object_bytes: obj.record.size,
            crcs: &obj.record.block_crcs,
        }
    }

    /// A failed verification as the store reports it: a mismatch is
    /// `DATA_LOSS` naming the object offset and the device address of the
    /// bad block (and counted); a missing CRC is a corrupt record.
    pub(super) fn verify_error(
        &self,
        obj: &ObjectRef,
        e: crate::verified::VerifyError,
    ) -> StoreError {
        match e {
            crate::verified::VerifyError::Mismatch(m) => {
                self.read_counters
                    .checksum_mismatches
                    .fetch_add(1, Ordering::Relaxed);
                let (device, device_offset) = self.locate(obj, m.object_offset);
                StoreError::Checksum {
                    dataset: obj.dataset.name.clone(),
                    path: obj.path.clone(),
                    object_offset: m.object_offset,
                    device,
                    device_offset,
                    expected: m.expected,
                    actual: m.actual,
                }
            }
            crate::verified::VerifyError::NoChecksum { block } => {
                StoreError::Catalog(crate::catalog::CatalogError::Corrupt(
                    format!("object {}", obj.path),
                    format!("no checksum for block {block}"),
                ))
            }
        }
    }

    /// Checks every checksum block of window `w`, whose bytes lie in
    /// `pieces` back to back, in
    /// place (bytes in a client's region, or read ahead before they are
    /// cut).
    pub(super) fn verify_window(
        &self,
        obj: &ObjectRef,
        w: ReadWindow,
        pieces: &[&[u8]],
    ) -> Result<(), StoreError> {
        crate::verified::check(pieces, (w.start, w.end), Self::blocks(obj))
            .map_err(|e| self.verify_error(obj, e))
    }

    /// Verified bytes `[start, start + len)` of `obj`, in order, with up to
    /// `read_ahead_bytes` of reads running ahead of the consumer.
    pub fn read_stream(
        self: &Arc<Self>,
        obj: Arc<ObjectRef>,
        start: u64,
        len: u64,
    ) -> impl Stream<Item = Result<Chunk, StoreError>> + Send + 'static {
        let depth = (self.limits.read_ahead_bytes / self.limits.message_bytes).max(1) as usize;
        let store = Arc::clone(self);
        let windows = self.window_policy(&obj).windows(start, len).map(move |w| {
            let store = Arc::clone(&store);
            let obj = Arc::clone(&obj);
            async move { store.read_window(&obj, w).await }
        });
        let weigh = |r: &Result<Vec<Chunk>, StoreError>| -> u64 {
            r.as_ref()
                .map(|chunks| chunks.iter().map(|c| c.1.len() as u64).sum())
                .unwrap_or(0)
        };
        // Reads keep running while finished windows wait behind a slow one
        // (see `pipeline`); half the read-ahead may wait.
        pipeline::OrderedPipeline::new(windows, depth, self.limits.read_ahead_bytes / 2, weigh)
            .flat_map(|r| {
                let items: Vec<Result<Chunk, StoreError>> = match r {
                    Ok(chunks) => chunks.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                };
                futures::stream::iter(items)
            })
    }

    /// Validates and looks up batch items (one catalog read transaction).
    /// Checks a batch's size and dataset at once, and returns its items'
    /// plans as an iterator that resolves them against the catalog a
    /// chunk at a time, as the reads reach them: memory follows the
    /// window in flight, not the item count.
    pub(super) fn resolve_batch(
        self: &Arc<Self>,
        dataset: &DatasetName,
        dataset_id: Option<u64>,
        items: Vec<Result<RangeSpec, ReadError>>,
    ) -> Result<LazyPlans, ReadError> {
        if items.len() > self.limits.batch_items_max {
            return Err(StoreError::Limit {
                limit: Limit::BatchItems,
                asked: items.len() as u64,
                max: self.limits.batch_items_max as u64,
            }
            .into());
        }
        Ok(LazyPlans {
            store: Arc::clone(self),
            dataset: self.dataset_pinned(dataset, dataset_id)?,
            items: items.into_iter().enumerate(),
            ready: std::collections::VecDeque::new(),
        })
    }

    /// Plans of `chunk`, items of dataset `ds` with their indices.
    pub(super) fn resolve_chunk(
        &self,
        ds: &Arc<DatasetHandle>,
        chunk: Vec<(usize, Result<RangeSpec, ReadError>)>,
    ) -> std::collections::VecDeque<BatchItemPlan> {
        let paths: Vec<&str> = chunk
            .iter()
            .filter_map(|(_, i)| i.as_ref().ok().map(|r| r.path.as_str()))
            .collect();
        let mut records = match self.data.catalog.get_objects(ds.record.id, &paths) {
            Ok(r) => r.into_iter(),
            Err(e) => {
                let reason = e.to_string();
                return chunk
                    .into_iter()
                    .map(|(index, _)| {
                        BatchItemPlan::Fail(
                            index as u32,
                            StoreError::Catalog(crate::catalog::CatalogError::Failing {
                                path: "catalog".into(),
                                reason: reason.clone(),
                            })
                            .into(),
                        )
                    })
                    .collect();
            }
        };
        let mut plans = std::collections::VecDeque::with_capacity(chunk.len());
        for (index, item) in chunk {
            let index = index as u32;
            let spec = match item {
                Ok(s) => s,
                Err(e) => {
                    plans.push_back(BatchItemPlan::Fail(index, e));
                    continue;
                }
            };
            let Some(record) = records.next().expect("one record per valid item") else {
                plans.push_back(BatchItemPlan::Fail(
                    index,
                    ReadError::ObjectNotFound {
                        dataset: ds.name.clone(),
                        path: spec.path.to_string(),
                    },
                ));
                continue;
            };
            let obj = Arc::new(ObjectRef {
                dataset: Arc::clone(ds),
                path: spec.path.to_string(),
                record,
            });
            plans.push_back(match Self::resolve_range(&obj, spec.offset, spec.length) {
                Err(e) => BatchItemPlan::Fail(index, e),
                Ok((start, 0)) => BatchItemPlan::Empty(index, start),
                Ok((start, len)) => BatchItemPlan::Read {
                    index,
                    obj,
                    start,
                    len,
                },
            });
        }
        plans
    }

    /// Reads many ranges of one dataset. Yields, in item order, each item's
    /// chunks or its error; `in_flight` windows are read at once, and
    /// finished ones may wait behind a slow one (see `pipeline`).
    pub fn read_batch(
        self: &Arc<Self>,
        dataset: &DatasetName,
        dataset_id: Option<u64>,
        items: Vec<Result<RangeSpec, ReadError>>,
        in_flight: u32,
    ) -> Result<impl Stream<Item = BatchEvent> + Send + 'static, ReadError> {
        let plans = self.resolve_batch(dataset, dataset_id, items)?;
        let planner = Arc::clone(self);
        let tasks = plans.flat_map(move |plan| -> Vec<BatchTask> {
            match plan {
                BatchItemPlan::Fail(i, e) => vec![BatchTask::Fail(i, e)],
                BatchItemPlan::Empty(i, at) => vec![BatchTask::Empty(i, at)],
                BatchItemPlan::Read {
                    index,
                    obj,
                    start,
                    len,
                } => {
                    // One item's windows at a time (as many as the item
                    // has messages), made when the pipeline reaches it.
                    let windows: Vec<ReadWindow> =
                        planner.window_policy(&obj).windows(start, len).collect();
                    let last = windows.len() - 1;
                    windows
                        .into_iter()
                        .enumerate()
                        .map(|(k, window)| BatchTask::Window {
                            index,
                            obj: Arc::clone(&obj),
                            window,
                            len,
                            last: k == last,
                        })
                        .collect()
                }
            }
        });
        let store = Arc::clone(self);
        let depth = in_flight.clamp(1, self.limits.batch_in_flight_max) as usize;
        // After an item fails mid-way, its remaining windows are skipped.
        let failed: Arc<Mutex<Option<u32>>> = Arc::new(Mutex::new(None));
        let windows = tasks.map(move |t| {
            let store = Arc::clone(&store);
            async move {
                match t {
                    BatchTask::Fail(index, e) => vec![BatchEvent::Error { index, error: e }],
                    BatchTask::Empty(index, start) => vec![BatchEvent::empty(index, start)],
                    BatchTask::Window {
                        index,
                        obj,
                        window,
                        len,
                        last,
                    } => BatchEvent::from_read(
                        index,
                        len,
                        last,
                        store.read_window(&obj, window).await,
                    ),
                }
            }
        });
        Ok(pipeline::OrderedPipeline::new(
            windows,
            depth,
            self.limits.batch_reorder_bytes_max,
            BatchEvent::weigh,
        )
        .flat_map(move |events| {
            let mut failed = failed.lock().expect("poisoned");
            let kept: Vec<BatchEvent> = events
                .into_iter()
                .filter(|e| {
                    let idx = e.index();
                    if *failed == Some(idx) {
                        return false;
                    }
                    if matches!(e, BatchEvent::Error { .. }) {
                        *failed = Some(idx);
                    }
                    true
                })
                .collect();
            futures::stream::iter(kept)
        }))
    }

    /// Like [`read_batch`](Self::read_batch), but items are delivered as
    /// they complete, each item's messages together, tagged with its index.
    /// `in_flight` items are read at once. A single-window item is handed out
    /// without a copy; a larger one is copied out of the pool buffers window
    /// by window, so no task ever holds buffers while waiting for more (the
    /// no-deadlock rule of the ordered path needs tasks to start in order,
    /// which completion order does not give). Items over
    /// `batch_any_order_item_bytes_max` fail with RESOURCE_EXHAUSTED.
    pub fn read_batch_any_order(
        self: &Arc<Self>,
        dataset: &DatasetName,
        dataset_id: Option<u64>,
        items: Vec<Result<RangeSpec, ReadError>>,
        in_flight: u32,
    ) -> Result<impl Stream<Item = BatchEvent> + Send + 'static, ReadError> {
        let plans = self.resolve_batch(dataset, dataset_id, items)?;
        let store = Arc::clone(self);
        let depth = in_flight.clamp(1, self.limits.batch_in_flight_max) as usize;
        let item_max = self.limits.batch_any_order_item_bytes_max;
        let tasks = plans.map(move |plan| {
            let store = Arc::clone(&store);
            async move {
                match plan {
                    BatchItemPlan::Fail(index, error) => vec![BatchEvent::Error { index, error }],
                    BatchItemPlan::Empty(index, start) => vec![BatchEvent::empty(index, start)],
                    BatchItemPlan::Read { index, len, .. } if len > item_max => {
                        vec![BatchEvent::Error {
                            index,
                            error: StoreError::Limit {
                                limit: Limit::AnyOrderItemBytes,
                                asked: len,
                                max: item_max,
                            }
                            .into(),
                        }]
                    }
                    BatchItemPlan::Read {
                        index,
                        obj,
                        start,
                        len,
                    } => BatchEvent::from_read(
                        index,
                        len,
                        true,
                        store.read_whole(&obj, start, len).await,
                    ),
                }
            }
        });
        Ok(futures::stream::iter(tasks)
            .buffer_unordered(depth)
            .flat_map(futures::stream::iter))
    }

    /// Verified bytes `[start, start + len)` of `obj` as message-sized
    /// chunks; see [`read_batch_any_order`](Self::read_batch_any_order) for
    /// why larger ranges are copied.
    pub(super) async fn read_whole(
        &self,
        obj: &ObjectRef,
        start: u64,
        len: u64,
    ) -> Result<Vec<Chunk>, StoreError> {
        let windows: Vec<ReadWindow> = self.window_policy(obj).windows(start, len).collect();
        if let [w] = windows[..] {
            return self.read_window(obj, w).await;
        }
        // The copy counts against the caller's budget for as long as any
        // message of it lives (see `budget::HeapCopy`).
        let charge = crate::budget::Budget::charge_heap_current(len as usize).await;
        // Window by window, so each window's pool buffers go back before
        // the next is read.
        let mut copy = crate::verified::VerifiedCopy::with_capacity(len as usize);
        for w in windows {
            for (_, b) in self.read_window(obj, w).await? {
                copy.push(&b);
            }
        }
        self.read_counters
            .grpc_payload_bytes_copied
            .fetch_add(len, Ordering::Relaxed);
        let all = copy.finish(|data| crate::budget::HeapCopy { data, charge });
        let step = self.limits.message_bytes as usize;
        Ok((0..all.len())
            .step_by(step)
            .map(|at| (start + at as u64, all.slice(at..(at + step).min(all.len()))))
            .collect())
    }
}

/// A batch's plans, resolved a chunk at a time (see `resolve_batch`).
pub(super) struct LazyPlans {
    store: Arc<Store>,
    dataset: Arc<DatasetHandle>,
    items: std::iter::Enumerate<std::vec::IntoIter<Result<RangeSpec, ReadError>>>,
    ready: std::collections::VecDeque<BatchItemPlan>,
}

/// Items resolved against the catalog at once by a lazy batch plan.
pub(super) const PLAN_CHUNK_ITEMS: usize = 256;

impl Iterator for LazyPlans {
    type Item = BatchItemPlan;

    fn next(&mut self) -> Option<BatchItemPlan> {
        if self.ready.is_empty() {
            let chunk: Vec<_> = self.items.by_ref().take(PLAN_CHUNK_ITEMS).collect();
            if chunk.is_empty() {
                return None;
            }
            self.ready = self.store.resolve_chunk(&self.dataset, chunk);
        }
        self.ready.pop_front()
    }
}

pub(super) enum BatchItemPlan {
    Fail(u32, ReadError),
    Empty(u32, u64),
    Read {
        index: u32,
        obj: Arc<ObjectRef>,
        start: u64,
        len: u64,
    },
}

pub(super) enum BatchTask {
    Fail(u32, ReadError),
    Empty(u32, u64),
    Window {
        index: u32,
        obj: Arc<ObjectRef>,
        window: ReadWindow,
        len: u64,
        last: bool,
    },
}

/// One event of a ReadBatch stream.
#[derive(Debug)]
pub enum BatchEvent {
    Data {
        index: u32,
        offset: u64,
        data: crate::verified::VerifiedBytes,
        item_length: u64,
        last: bool,
    },
    Error {
        index: u32,
        error: ReadError,
    },
}

impl BatchEvent {
    pub(super) fn empty(index: u32, offset: u64) -> Self {
        BatchEvent::Data {
            index,
            offset,
            data: crate::verified::VerifiedBytes::empty(),
            item_length: 0,
            last: true,
        }
    }

    /// Events for one read of item `index` (`item_length` bytes in all);
    /// `final_read` says whether it holds the item's last bytes.
    pub(super) fn from_read(
        index: u32,
        item_length: u64,
        final_read: bool,
        read: Result<Vec<Chunk>, StoreError>,
    ) -> Vec<BatchEvent> {
        match read {
            Ok(chunks) => {
                let n = chunks.len();
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(k, (offset, data))| BatchEvent::Data {
                        index,
                        offset,
                        data,
                        item_length,
                        last: final_read && k + 1 == n,
                    })
                    .collect()
            }
            Err(error) => vec![BatchEvent::Error {
                index,
                error: error.into(),
            }],
        }
    }

    /// Payload bytes of a group of events (for the reorder buffer, whose
    /// weigh function takes `&T` with `T = Vec<BatchEvent>`).
    #[allow(clippy::ptr_arg)]
    pub(super) fn weigh(events: &Vec<BatchEvent>) -> u64 {
        events
            .iter()
            .map(|e| match e {
                BatchEvent::Data { data, .. } => data.len() as u64,
                BatchEvent::Error { .. } => 0,
            })
            .sum()
    }

    pub fn index(&self) -> u32 {
        match self {
            BatchEvent::Data { index, .. } | BatchEvent::Error { index, .. } => *index,
        }
    }
}

/// The parts of verified window pieces (object bytes from `w_start`, back
/// to back) that fall in `[want_start, want_end)`, as zero-copy slices.
pub(super) fn wanted_parts(
    pieces: impl Iterator<Item = crate::verified::VerifiedBytes>,
    w_start: u64,
    w_end: u64,
    want_start: u64,
    want_end: u64,
) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut pos = w_start;
    for piece in pieces {
        let (seg_start, seg_end) = (pos, pos + piece.len() as u64);
        pos = seg_end;
        let lo = seg_start.max(want_start);
        let hi = seg_end.min(want_end).min(w_end);
        if lo < hi {
            out.push((
                lo,
                piece.slice((lo - seg_start) as usize..(hi - seg_start) as usize),
            ));
        }
    }
    out
}
