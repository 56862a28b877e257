//! `ReadInto`: verified reads whose bytes the device writes straight into a
//! client's registered region (see `region`).
//!
//! An item's range is widened to whole checksum blocks (32 KiB, counted
//! from the object's start) and its device reads to 4 KiB, exactly as for
//! `Read`; the difference is where they land. The widened range goes to the
//! region at `region_offset` (4 KiB aligned), one O_DIRECT read per stripe
//! unit it touches, and is checked there, in place. The item's own bytes
//! then start at `region_offset + (offset - block_start)`; the completion
//! says where (`data_offset`). Bytes of the span past the object's end are
//! zeroed, so nothing of a neighbouring object reaches the client. The
//! span an item needs is `storaged_proto::model::read_into_span`, which
//! clients use to lay out their region.
//!
//! The TCP bulk channel (`service/bulk.rs`) runs the same reads into a
//! staging region of storaged's own, packed by [`Store::plan_read_into`]
//! spans, and sends each window from there; it asks for the windows'
//! CRCs (`ReadIntoOptions::crcs`) to send along and, when its client
//! verifies them, leaves out the check here (`ReadIntoOptions::verify`).
//!
//! No byte of payload is copied by storaged on this path: the DMA writes
//! the region, the CRC reads it. `ReadCounters::shm_payload_bytes_copied`
//! has no increment on this path and `shm_bytes_served` counts what it
//! delivered; a test checks both against the gRPC path, which does count
//! its copies.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, Stream};
use storaged_proto::DatasetName;
use storaged_proto::model::{RangeSpec, read_into_span};

use super::class::FaultAction;
use super::schedule::{Run, Want, schedule};
use super::window::{ReadWindow, WindowPolicy};
use super::{BatchItemPlan, ObjectRef, Store};
use crate::alloc::BLOCK_BYTES;
use crate::engine::ForeignRead;
use crate::error::{ReadError, StoreError};
use crate::region::RegionMap;

/// One item of a `ReadInto`: a range and where its span starts in the
/// region.
#[derive(Debug, Clone)]
pub struct ReadIntoItem {
    pub range: RangeSpec,
    pub region_offset: u64,
}

/// Where a finished item's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadIntoDone {
    /// Region offset of the first requested byte.
    pub data_offset: u64,
    /// Requested bytes (after clamping to the object's end).
    pub length: u64,
    /// Region bytes the item used from its `region_offset`.
    pub span_bytes: u64,
    /// Object bytes at the span's start: whole checksum blocks, the last
    /// cut at the object's end (the rest of the span is zeroes).
    pub window_bytes: u64,
    /// The dataset's checksum block.
    pub block_bytes: u32,
    /// The catalog's CRC of each block of the window, when asked for
    /// (`ReadIntoOptions::crcs`); empty otherwise.
    pub crcs: Vec<u32>,
}

/// How a `ReadInto` runs.
#[derive(Debug, Clone, Copy)]
pub struct ReadIntoOptions {
    /// Items in flight at once (clamped to the store's limit).
    pub in_flight: u32,
    /// Check each window against its CRCs here. Off only where the bytes'
    /// receiver checks them against `crcs` before using them (the TCP bulk
    /// channel's clients); a window read again after a fault is checked
    /// all the same.
    pub verify: bool,
    /// Return each window's CRCs with it.
    pub crcs: bool,
    /// Count the bytes as the TCP bulk channel's (`bulk_*` counters)
    /// rather than the shm path's.
    pub remote: bool,
}

impl ReadIntoOptions {
    /// The shm path's: verified here, no CRCs returned.
    pub fn same_host(in_flight: u32) -> Self {
        Self {
            in_flight,
            verify: true,
            crcs: false,
            remote: false,
        }
    }
}

/// A `ReadInto` item resolved against the catalog, before a region offset
/// is chosen for it: what it needs of a region (its span).
pub struct PlannedItem(BatchItemPlan);

impl PlannedItem {
    /// The item's index in its request.
    pub fn index(&self) -> u32 {
        match &self.0 {
            BatchItemPlan::Fail(i, _) | BatchItemPlan::Empty(i, _) => *i,
            BatchItemPlan::Read { index, .. } => *index,
        }
    }

    /// Region bytes the item needs (0 for one that fails or is empty).
    pub fn span(&self) -> u64 {
        match &self.0 {
            BatchItemPlan::Read {
                obj, start, len, ..
            } => {
                let block = u64::from(obj.dataset.record.checksum_block_bytes);
                read_into_span(*start, *len, obj.record.size, block).0
            }
            _ => 0,
        }
    }
}

impl Store {
    /// Reads `items` of `dataset` (of id `dataset_id`, if given) into
    /// `region`, yielding `(index, result)` as items complete (see
    /// [`Store::read_planned_into`]).
    pub fn read_into(
        self: &Arc<Self>,
        region: Arc<RegionMap>,
        dataset: &DatasetName,
        dataset_id: Option<u64>,
        items: Vec<Result<ReadIntoItem, ReadError>>,
        options: ReadIntoOptions,
    ) -> Result<
        impl Stream<Item = (u32, Result<ReadIntoDone, ReadError>)> + Send + 'static,
        ReadError,
    > {
        let region_offsets: Vec<Option<u64>> = items
            .iter()
            .map(|i| i.as_ref().ok().map(|i| i.region_offset))
            .collect();
        let ranges = items.into_iter().map(|i| i.map(|i| i.range)).collect();
        let placed = self
            .plan_read_into(dataset, dataset_id, ranges)?
            .map(|plan| {
                let at = match &plan.0 {
                    BatchItemPlan::Fail(..) => 0,
                    _ => region_offsets[plan.index() as usize].expect("valid item"),
                };
                (plan, at)
            })
            .collect();
        Ok(self.read_planned_into(region, placed, options))
    }

    /// Resolves `ranges` of `dataset` against the catalog, lazily, in
    /// item order: each item's span, for a caller that places them itself.
    pub fn plan_read_into(
        self: &Arc<Self>,
        dataset: &DatasetName,
        dataset_id: Option<u64>,
        ranges: Vec<Result<RangeSpec, ReadError>>,
    ) -> Result<impl Iterator<Item = PlannedItem> + Send + 'static + use<>, ReadError> {
        Ok(self
            .resolve_batch(dataset, dataset_id, ranges)?
            .map(PlannedItem))
    }

    /// Reads planned items, each at its region offset, into `region`,
    /// yielding `(index, result)` as items complete. Items are taken in
    /// groups of `options.in_flight`; each group's device reads are
    /// scheduled together (see `schedule`), and the next group is queued
    /// while one finishes.
    pub fn read_planned_into(
        self: &Arc<Self>,
        region: Arc<RegionMap>,
        items: Vec<(PlannedItem, u64)>,
        options: ReadIntoOptions,
    ) -> impl Stream<Item = (u32, Result<ReadIntoDone, ReadError>)> + Send + 'static {
        let store = Arc::clone(self);
        let group_items = options.in_flight.clamp(1, self.limits.batch_in_flight_max) as usize;
        let mut groups: Vec<Vec<(BatchItemPlan, u64)>> = Vec::new();
        for (PlannedItem(plan), at) in items {
            match groups.last_mut() {
                Some(g) if g.len() < group_items => g.push((plan, at)),
                _ => groups.push(vec![(plan, at)]),
            }
        }
        futures::stream::iter(groups)
            .map(move |group| {
                let store = Arc::clone(&store);
                let region = Arc::clone(&region);
                Box::pin(
                    async move {
                        let (done, rest) = store.read_ahead_into(&region, group, options).await;
                        futures::stream::iter(done)
                            .chain(store.read_group_into(region, rest, options))
                    }
                    .flatten_stream(),
                )
            })
            .flatten_unordered(2)
    }

    /// Items of `group` that read-ahead holds (a loader hinted them, and
    /// they are read or being read, verified, in storaged's buffers): their
    /// spans are copied into the region from there, exactly as a device
    /// read would have filled them, tail zeroed. Returns those items done,
    /// and the rest to read from the devices. The copy is counted in
    /// `shm_payload_bytes_copied`: the price of the merged, in-device-order
    /// reads a hint buys, which a client that wants none turns hints off
    /// to avoid.
    async fn read_ahead_into(
        &self,
        region: &RegionMap,
        group: Vec<(BatchItemPlan, u64)>,
        options: ReadIntoOptions,
    ) -> (
        Vec<(u32, Result<ReadIntoDone, ReadError>)>,
        Vec<(BatchItemPlan, u64)>,
    ) {
        if self.read_ahead.is_empty() {
            // The common case without hints: no per-item work at all.
            return (Vec::new(), group);
        }
        let lookups = group.iter().map(|(plan, at)| async move {
            let BatchItemPlan::Read {
                index,
                obj,
                start,
                len,
            } = plan
            else {
                return None;
            };
            let block = u64::from(obj.dataset.record.checksum_block_bytes);
            let (span, lead) = read_into_span(*start, *len, obj.record.size, block);
            let item = GroupItem {
                index: *index,
                obj: Arc::clone(obj),
                start: *start,
                len: *len,
                span,
                lead,
                region_offset: *at,
                pieces_left: 0,
                error: None,
            };
            let w = item.window();
            let chunks = self.read_ahead_hit(obj, w.start, w.end).await?;
            Some((item, chunks))
        });
        let found = futures::future::join_all(lookups).await;
        let mut done = Vec::new();
        let mut rest = Vec::new();
        for ((plan, at), hit) in group.into_iter().zip(found) {
            match hit {
                Some((item, chunks)) => {
                    done.push((item.index, self.copy_into(region, &item, &chunks, options)))
                }
                None => rest.push((plan, at)),
            }
        }
        (done, rest)
    }

    /// Delivers an item's window, held verified in `chunks` (from
    /// read-ahead, or rebuilt from parity), into its span.
    fn copy_into(
        &self,
        region: &RegionMap,
        item: &GroupItem,
        chunks: &[super::Chunk],
        options: ReadIntoOptions,
    ) -> Result<ReadIntoDone, ReadError> {
        check_offset(region, item.index, item.region_offset, item.span)?;
        let w = item.window();
        let base = item.region_offset as usize;
        for (offset, bytes) in chunks {
            // SAFETY: callers copy an item no device read targets: one
            // served from read-ahead (never read from the devices), or one
            // whose reads have all completed.
            unsafe { region.copy_in(base + (offset - w.start) as usize, bytes) };
        }
        let tail = w.len() as usize;
        // SAFETY: as above.
        unsafe { region.zero(base + tail, item.span as usize - tail) };
        let c = &self.read_counters;
        let copied = if options.remote {
            &c.bulk_payload_bytes_copied
        } else {
            &c.shm_payload_bytes_copied
        };
        copied.fetch_add(w.len(), Ordering::Relaxed);
        Ok(self.item_done(item, options))
    }

    /// A finished item's answer, counted as served.
    fn item_done(&self, item: &GroupItem, options: ReadIntoOptions) -> ReadIntoDone {
        let c = &self.read_counters;
        let served = if options.remote {
            &c.bulk_bytes_served
        } else {
            &c.shm_bytes_served
        };
        served.fetch_add(item.len, Ordering::Relaxed);
        let w = item.window();
        let block = u64::from(item.obj.dataset.record.checksum_block_bytes);
        let crcs = if options.crcs && block > 0 && w.len() > 0 {
            let first = (w.start / block) as usize;
            let last = w.end.div_ceil(block) as usize;
            item.obj
                .record
                .block_crcs
                .get(first..last)
                .map(<[u32]>::to_vec)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        ReadIntoDone {
            data_offset: item.region_offset + item.lead,
            length: item.len,
            span_bytes: item.span,
            window_bytes: w.len(),
            block_bytes: item.obj.dataset.record.checksum_block_bytes,
            crcs,
        }
    }

    /// Each item of a group as its device pieces (`wants`, tagged with
    /// the item) into its span of the region; items that fail their checks
    /// (or are empty) are ready at once.
    #[allow(clippy::type_complexity)]
    fn plan_group(
        &self,
        region: &RegionMap,
        group: Vec<(BatchItemPlan, u64)>,
    ) -> (
        std::collections::VecDeque<(u32, Result<ReadIntoDone, ReadError>)>,
        Vec<GroupItem>,
        Vec<Want>,
    ) {
        let mut ready = std::collections::VecDeque::new();
        let mut items: Vec<GroupItem> = Vec::new();
        let mut wants: Vec<Want> = Vec::new();
        for (plan, at) in group {
            match plan {
                BatchItemPlan::Fail(i, e) => ready.push_back((i, Err(e))),
                BatchItemPlan::Empty(i, _) => {
                    let done = ReadIntoDone {
                        data_offset: at,
                        length: 0,
                        span_bytes: 0,
                        window_bytes: 0,
                        block_bytes: 0,
                        crcs: Vec::new(),
                    };
                    ready.push_back((i, check_offset(region, i, at, 0).map(|()| done)));
                }
                BatchItemPlan::Read {
                    index,
                    obj,
                    start,
                    len,
                } => {
                    let block = u64::from(obj.dataset.record.checksum_block_bytes);
                    let (span, lead) = read_into_span(start, len, obj.record.size, block);
                    if let Err(e) = check_offset(region, index, at, span) {
                        ready.push_back((index, Err(e)));
                        continue;
                    }
                    let w_start = start - lead;
                    let tag = items.len();
                    let mut dest = at;
                    let mut pieces = 0;
                    for s in self.object_segments(&obj, w_start, span) {
                        wants.push(Want {
                            device: s.device,
                            device_offset: s.device_offset,
                            len: s.len,
                            dest,
                            tag,
                        });
                        dest += s.len;
                        pieces += 1;
                    }
                    items.push(GroupItem {
                        index,
                        obj,
                        start,
                        len,
                        span,
                        lead,
                        region_offset: at,
                        pieces_left: pieces,
                        error: None,
                    });
                }
            }
        }
        (ready, items, wants)
    }

    /// Reads one group of items into `region`: every item's device pieces
    /// are scheduled together, merged where both the device addresses and
    /// the region offsets are contiguous, and each item completes (verified
    /// in place, tail zeroed) once its last piece has landed.
    fn read_group_into(
        self: Arc<Self>,
        region: Arc<RegionMap>,
        group: Vec<(BatchItemPlan, u64)>,
        options: ReadIntoOptions,
    ) -> impl Stream<Item = (u32, Result<ReadIntoDone, ReadError>)> + Send + 'static {
        let (ready, items, mut wants) = self.plan_group(&region, group);
        let runs = schedule(&mut wants, self.limits.read_merge_bytes_max, true);
        self.read_counters
            .device_reads_merged
            .fetch_add((wants.len() - runs.len()) as u64, Ordering::Relaxed);
        let memory: Arc<dyn crate::engine::ForeignMemory> = Arc::clone(&region) as _;
        let running: FuturesUnordered<_> = runs
            .into_iter()
            .map(|run| {
                let store = Arc::clone(&self);
                let memory = Arc::clone(&memory);
                async move {
                    let result = store.read_run_into(&run, memory).await;
                    (run.wants, result)
                }
            })
            .collect();
        let state = GroupState {
            store: self,
            region,
            items,
            wants,
            running,
            fallbacks: FuturesUnordered::new(),
            ready,
            options,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(done) = st.ready.pop_front() {
                    return Some((done, st));
                }
                if st.running.is_empty() {
                    // Only rebuilds (if any) are left.
                    let done = st.fallbacks.next().await?;
                    st.ready.push_back(done);
                    continue;
                }
                let (wants, result) = tokio::select! {
                    Some(r) = st.running.next() => r,
                    Some(done) = st.fallbacks.next(), if !st.fallbacks.is_empty() => {
                        st.ready.push_back(done);
                        continue;
                    }
                };
                st.land(wants, result);
            }
        })
    }

    /// A `ReadInto` item whose direct read failed: its window is read
    /// again (rebuilt from parity where it must be) and verified in
    /// storaged's memory, then copied into the region.
    async fn read_item_into_via_memory(
        &self,
        region: &RegionMap,
        item: &GroupItem,
        options: ReadIntoOptions,
    ) -> Result<ReadIntoDone, ReadError> {
        let w = item.window();
        let chunks = self
            .read_window_recovering(&item.obj, ReadWindow::whole(w.start, w.end))
            .await?;
        // Every read of this item has completed (it had no pieces left), so
        // nothing else writes its span.
        self.copy_into(region, item, &chunks, options)
    }

    /// One scheduled device read into the region. Errors come back as
    /// parts, since every item the run covers reports its own.
    async fn read_run_into(
        &self,
        run: &Run,
        memory: Arc<dyn crate::engine::ForeignMemory>,
    ) -> RunResult {
        let fail = |e: std::io::Error| (run.device, run.device_offset, Arc::new(e));
        let permit = self
            .io
            .foreign_reads
            .acquire()
            .await
            .map_err(|_| fail(std::io::Error::other("storaged is shutting down")))?;
        let want = run.len as usize;
        let n = self
            .io
            .engine
            .read_foreign(ForeignRead {
                device: run.device,
                device_offset: run.device_offset,
                len: run.len as u32,
                memory,
                memory_offset: run.dest as usize,
            })
            .await
            .map_err(fail)?;
        drop(permit);
        if n != want {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short read: {n} of {want} bytes"),
            )));
        }
        Ok(())
    }

    /// Verifies a fully landed item in place and zeroes its span's tail.
    fn finish_item_into(
        &self,
        region: &RegionMap,
        item: &mut GroupItem,
        options: ReadIntoOptions,
    ) -> Result<ReadIntoDone, StoreError> {
        if let Some(e) = item.error.take() {
            return Err(e);
        }
        let w = item.window();
        let base = item.region_offset as usize;
        if options.verify {
            // SAFETY: every read into [base, base + span) has completed
            // (the item has no pieces left).
            let window = unsafe { region.completed(base, w.len() as usize) };
            self.verify_window(&item.obj, w, &[window])?;
        }
        let tail = w.len() as usize;
        // SAFETY: as above; the tail past the object's data is ours to zero.
        unsafe { region.zero(base + tail, item.span as usize - tail) };
        Ok(self.item_done(item, options))
    }
}

/// An item of a `ReadInto` group whose pieces are being read.
struct GroupItem {
    index: u32,
    obj: Arc<ObjectRef>,
    start: u64,
    len: u64,
    span: u64,
    lead: u64,
    region_offset: u64,
    pieces_left: usize,
    /// The first failure of any of its pieces.
    error: Option<StoreError>,
}

impl GroupItem {
    /// The object bytes its span holds: whole checksum blocks, cut at the
    /// object's end.
    fn window(&self) -> ReadWindow {
        let w = WindowPolicy::new(&self.obj, self.span).covering(self.start, self.len);
        debug_assert_eq!(w.start, self.start - self.lead);
        w
    }

    /// A copy for a task of its own (the item is finished in the group).
    fn detach(&self) -> GroupItem {
        GroupItem {
            index: self.index,
            obj: Arc::clone(&self.obj),
            error: None,
            ..*self
        }
    }
}

/// A run's failure (device, offset, error): every item the run covers gets
/// its own error from it.
type RunResult = Result<(), (u32, u64, Arc<std::io::Error>)>;

type Fallback = std::pin::Pin<
    Box<dyn std::future::Future<Output = (u32, Result<ReadIntoDone, ReadError>)> + Send>,
>;

struct GroupState<F> {
    store: Arc<Store>,
    region: Arc<RegionMap>,
    items: Vec<GroupItem>,
    wants: Vec<Want>,
    running: FuturesUnordered<F>,
    /// Items being rebuilt from parity after their direct read failed.
    fallbacks: FuturesUnordered<Fallback>,
    ready: std::collections::VecDeque<(u32, Result<ReadIntoDone, ReadError>)>,
    options: ReadIntoOptions,
}

impl<F> GroupState<F> {
    /// A device read of the group landed (or failed): each item it served
    /// has one piece less, and an item with none left is verified and
    /// ready, or read again where its class's read-fault policy says so.
    fn land(&mut self, wants: std::ops::Range<usize>, result: RunResult) {
        for w in &self.wants[wants] {
            let item = &mut self.items[w.tag];
            item.pieces_left -= 1;
            if let Err((device, offset, error)) = &result {
                item.error.get_or_insert_with(|| {
                    StoreError::from_io(*device, *offset, crate::engine::route::copy_error(error))
                });
            }
            if item.pieces_left == 0 {
                match self
                    .store
                    .finish_item_into(&self.region, item, self.options)
                {
                    // A device fault of an ec dataset is rebuilt; a
                    // checksum mismatch of any dataset is read
                    // again in storaged's memory, because the bytes
                    // in the region are the client's to spoil (a
                    // region whose pages it punched or wrote during
                    // the read): only a second mismatch there is the
                    // device's.
                    Err(e)
                        if item.obj.dataset.layout.on_read_fault(&e, true) != FaultAction::Fail =>
                    {
                        tracing::debug!(error = %e, "ReadInto item: reading again in storaged's memory");
                        let store = Arc::clone(&self.store);
                        let region = Arc::clone(&self.region);
                        let item = item.detach();
                        let options = self.options;
                        self.fallbacks.push(Box::pin(async move {
                            let index = item.index;
                            let done = store.read_item_into_via_memory(&region, &item, options);
                            (index, done.await)
                        }));
                    }
                    done => self
                        .ready
                        .push_back((item.index, done.map_err(ReadError::from))),
                }
            }
        }
    }
}

/// Checks that `[region_offset, region_offset + span)` is aligned and
/// inside the region.
fn check_offset(
    region: &RegionMap,
    index: u32,
    region_offset: u64,
    span: u64,
) -> Result<(), ReadError> {
    use crate::engine::ForeignMemory;
    if !region_offset.is_multiple_of(BLOCK_BYTES) {
        return Err(ReadError::RegionOffsetUnaligned {
            index,
            region_offset,
            align: BLOCK_BYTES,
        });
    }
    let size = region.len() as u64;
    if region_offset.checked_add(span).is_none_or(|end| end > size) {
        return Err(ReadError::RegionBounds {
            index,
            region_offset,
            span,
            region: region.id,
            size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_whole_blocks_and_stop_at_the_object_end() {
        let k32 = 32 * 1024;
        // The whole of a small object: rounded to 4 KiB.
        assert_eq!(read_into_span(0, 5, 5, k32), (4096, 0));
        // A range inside the second block of a large object.
        assert_eq!(
            read_into_span(40_000, 100, 1 << 20, k32),
            (k32, 40_000 - k32)
        );
        // Crossing a block boundary: two blocks.
        assert_eq!(read_into_span(k32 - 1, 2, 1 << 20, k32), (2 * k32, k32 - 1));
        // The last block is short: stop at the object's end, then 4 KiB.
        assert_eq!(
            read_into_span(70_000, 1000, 71_000, k32),
            (8192, 70_000 - 2 * k32)
        );
        assert_eq!(read_into_span(10, 0, 100, k32), (0, 0));
    }
}
