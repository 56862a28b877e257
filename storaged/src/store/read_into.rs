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
//! No byte of payload is copied by storaged on this path: the DMA writes
//! the region, the CRC reads it. `ReadCounters::shm_payload_bytes_copied`
//! has no increment on this path and `shm_bytes_served` counts what it
//! delivered; a test checks both against the gRPC path, which does count
//! its copies.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::stream::StreamExt;
use futures::{Stream, TryFutureExt};
use storaged_proto::DatasetName;
use storaged_proto::model::{RangeSpec, read_into_span};

use super::{BatchItemPlan, ObjectRef, Store};
use crate::alloc::BLOCK_BYTES;
use crate::engine::ForeignRead;
use crate::error::StoreError;
use crate::region::RegionMap;

/// One item of a `ReadInto`: a range and where its span starts in the
/// region.
#[derive(Debug, Clone)]
pub struct ReadIntoItem {
    pub range: RangeSpec,
    pub region_offset: u64,
}

/// Where a finished item's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIntoDone {
    /// Region offset of the first requested byte.
    pub data_offset: u64,
    /// Requested bytes (after clamping to the object's end).
    pub length: u64,
    /// Region bytes the item used from its `region_offset`.
    pub span_bytes: u64,
}

impl Store {
    /// Reads `items` of `dataset` into `region`, `in_flight` items at a
    /// time, yielding `(index, result)` as items complete.
    pub fn read_into(
        self: &Arc<Self>,
        region: Arc<RegionMap>,
        dataset: &DatasetName,
        items: Vec<Result<ReadIntoItem, StoreError>>,
        in_flight: u32,
    ) -> Result<
        impl Stream<Item = (u32, Result<ReadIntoDone, StoreError>)> + Send + 'static,
        StoreError,
    > {
        let region_offsets: Vec<Option<u64>> = items
            .iter()
            .map(|i| i.as_ref().ok().map(|i| i.region_offset))
            .collect();
        let ranges = items.into_iter().map(|i| i.map(|i| i.range)).collect();
        let plans = self.resolve_batch(dataset, ranges)?;
        let store = Arc::clone(self);
        let in_flight = in_flight.clamp(1, self.limits.batch_in_flight_max) as usize;
        Ok(futures::stream::iter(plans)
            .map(move |plan| {
                let store = Arc::clone(&store);
                let region = Arc::clone(&region);
                let offsets = region_offsets.clone();
                async move {
                    match plan {
                        BatchItemPlan::Fail(i, e) => (i, Err(e)),
                        BatchItemPlan::Empty(i, _) => {
                            let at = offsets[i as usize].expect("valid item");
                            let done = ReadIntoDone {
                                data_offset: at,
                                length: 0,
                                span_bytes: 0,
                            };
                            (i, check_offset(&region, i, at, 0).map(|()| done))
                        }
                        BatchItemPlan::Read {
                            index,
                            obj,
                            start,
                            len,
                        } => {
                            let at = offsets[index as usize].expect("valid item");
                            let r = store
                                .read_item_into(&region, index, &obj, start, len, at)
                                .await;
                            (index, r)
                        }
                    }
                }
            })
            .buffer_unordered(in_flight))
    }

    async fn read_item_into(
        &self,
        region: &Arc<RegionMap>,
        index: u32,
        obj: &ObjectRef,
        start: u64,
        len: u64,
        region_offset: u64,
    ) -> Result<ReadIntoDone, StoreError> {
        let block = u64::from(obj.dataset.record.checksum_block_bytes);
        let (span, lead) = read_into_span(start, len, obj.record.size, block);
        check_offset(region, index, region_offset, span)?;
        let w_start = start - lead;
        let w_end = (start + len).next_multiple_of(block).min(obj.record.size);
        let segments: Vec<_> = self
            .layout
            .segments(obj.record.logical_offset + w_start, span)
            .collect();
        let permits = self
            .foreign_reads
            .acquire_many(segments.len() as u32)
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        let memory: Arc<dyn crate::engine::ForeignMemory> = Arc::clone(region) as _;
        let mut at = region_offset as usize;
        let reads = segments.iter().map(|s| {
            let read = ForeignRead {
                device: s.device,
                device_offset: s.device_offset,
                len: s.len as u32,
                memory: Arc::clone(&memory),
                memory_offset: at,
            };
            at += s.len as usize;
            let (device, offset, want) = (s.device, s.device_offset, s.len as usize);
            self.engine
                .read_foreign(read)
                .map_err(move |e| StoreError::from_io(device, offset, e))
                .and_then(move |n| async move {
                    if n == want {
                        Ok(())
                    } else {
                        Err(StoreError::from_io(
                            device,
                            offset,
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!("short read: {n} of {want} bytes"),
                            ),
                        ))
                    }
                })
        });
        // Every read is waited for, even after one fails: the span must not
        // be checked or handed back while the kernel still writes it.
        let results = futures::future::join_all(reads).await;
        drop(permits);
        results.into_iter().collect::<Result<Vec<()>, _>>()?;

        let base = region_offset as usize;
        // SAFETY: every read into [base, base + span) has completed above.
        let window = unsafe { region.completed(base, (w_end - w_start) as usize) };
        self.verify_window(obj, w_start, w_end, &[window])?;
        let tail = (w_end - w_start) as usize;
        // SAFETY: as above; the tail past the object's data is ours to zero.
        unsafe { region.zero(base + tail, span as usize - tail) };
        self.read_counters
            .shm_bytes_served
            .fetch_add(len, Ordering::Relaxed);
        Ok(ReadIntoDone {
            data_offset: region_offset + lead,
            length: len,
            span_bytes: span,
        })
    }
}

/// Checks that `[region_offset, region_offset + span)` is aligned and
/// inside the region.
fn check_offset(
    region: &RegionMap,
    index: u32,
    region_offset: u64,
    span: u64,
) -> Result<(), StoreError> {
    use crate::engine::ForeignMemory;
    if !region_offset.is_multiple_of(BLOCK_BYTES) {
        return Err(StoreError::InvalidArgument(format!(
            "item {index}: region_offset {region_offset} is not a multiple of {BLOCK_BYTES}"
        )));
    }
    let size = region.len() as u64;
    if region_offset.checked_add(span).is_none_or(|end| end > size) {
        return Err(StoreError::RegionBounds(format!(
            "item {index} needs region bytes [{region_offset}, {}) but region {:#x} holds {size} bytes",
            region_offset.saturating_add(span),
            region.id
        )));
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
