//! The loader's scheduler: which batch starts next, and when.
//!
//! Batches start in plan order while the bytes of those running fit
//! `prefetch_bytes_max`; one always runs, however large. When the loader
//! reads into regions, a batch also needs a free region (one the consumer
//! no longer holds samples of); with none free it waits for a running
//! batch, or, when nothing runs (the consumer may keep every region
//! forever), reads over gRPC instead.

use std::collections::VecDeque;
use std::sync::Arc;

use super::BatchPlan;

/// See the module docs. `S` is what a region slot is; it is free when the
/// scheduler holds the only reference.
pub(super) struct Scheduler<S> {
    pending: VecDeque<BatchPlan>,
    prefetch_bytes_max: u64,
    running_bytes: u64,
    running: usize,
    /// The region slots not lent to a running batch, when reading into
    /// regions.
    slots: Option<Vec<Arc<S>>>,
}

impl<S> Scheduler<S> {
    pub fn new(
        batches: Vec<BatchPlan>,
        prefetch_bytes_max: u64,
        slots: Option<Vec<Arc<S>>>,
    ) -> Self {
        Self {
            pending: batches.into(),
            prefetch_bytes_max,
            running_bytes: 0,
            running: 0,
            slots,
        }
    }

    /// The next batch to start and the region it reads into (`None`: over
    /// gRPC), or `None` to wait for a running batch to finish.
    pub fn start_next(&mut self) -> Option<(BatchPlan, Option<Arc<S>>)> {
        let next = self.pending.front()?;
        let fits = self.running_bytes.saturating_add(next.bytes) <= self.prefetch_bytes_max;
        if self.running > 0 && !fits {
            return None;
        }
        let slot = match &mut self.slots {
            None => None,
            Some(slots) => match slots.iter().position(|s| Arc::strong_count(s) == 1) {
                Some(i) => Some(slots.swap_remove(i)),
                None if self.running == 0 => None,
                None => return None,
            },
        };
        let batch = self.pending.pop_front().expect("a batch is pending");
        self.running_bytes += batch.bytes;
        self.running += 1;
        Some((batch, slot))
    }

    /// A started batch of `bytes` finished; its region (if any) comes back.
    pub fn finished(&mut self, bytes: u64, slot: Option<Arc<S>>) {
        self.running_bytes -= bytes;
        self.running -= 1;
        if let (Some(slots), Some(slot)) = (self.slots.as_mut(), slot) {
            slots.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(sizes: &[u64]) -> Vec<BatchPlan> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| BatchPlan {
                first_position: i as u64,
                samples: vec![(i as u64, format!("s{i}"), bytes)],
                bytes,
            })
            .collect()
    }

    #[test]
    fn batches_start_in_order_within_the_prefetch_bytes() {
        let mut s: Scheduler<()> = Scheduler::new(batches(&[40, 40, 40, 10]), 100, None);
        let a = s.start_next().unwrap();
        let b = s.start_next().unwrap();
        assert_eq!((a.0.first_position, b.0.first_position), (0, 1));
        assert!(s.start_next().is_none(), "120 bytes would not fit 100");
        s.finished(40, None);
        assert_eq!(s.start_next().unwrap().0.first_position, 2);
        assert_eq!(s.start_next().unwrap().0.first_position, 3);
        assert!(s.start_next().is_none());
        assert_eq!(s.running, 3);
    }

    #[test]
    fn one_batch_always_runs_however_large() {
        let mut s: Scheduler<()> = Scheduler::new(batches(&[500, 500]), 100, None);
        assert!(s.start_next().is_some());
        assert!(s.start_next().is_none());
        s.finished(500, None);
        assert!(s.start_next().is_some());
    }

    #[test]
    fn a_batch_takes_a_free_region_or_waits_or_goes_over_grpc() {
        let slots = vec![Arc::new(1u32), Arc::new(2u32)];
        let mut s = Scheduler::new(batches(&[1, 1, 1, 1]), 1 << 20, Some(slots));
        let (_, r0) = s.start_next().unwrap();
        let (_, r1) = s.start_next().unwrap();
        let (r0, r1) = (r0.unwrap(), r1.unwrap());
        assert!(s.start_next().is_none(), "no region free while batches run");
        // The consumer keeps samples of the first region: back, not free.
        let kept = Arc::clone(&r0);
        s.finished(1, Some(r0));
        assert!(s.start_next().is_none());
        s.finished(1, Some(r1));
        let (_, r) = s.start_next().unwrap();
        assert_eq!(*r.clone().unwrap(), 2, "the free region, not the held one");
        s.finished(1, r);
        // Every region held and nothing running: over gRPC, not forever.
        let held: Vec<_> = s.slots.as_ref().unwrap().iter().map(Arc::clone).collect();
        let (b, r) = s.start_next().unwrap();
        assert!(r.is_none());
        assert_eq!(b.first_position, 3);
        drop((kept, held));
    }
}
