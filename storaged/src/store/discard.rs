//! Freed space goes back to the devices: a punched hole in a file-backed
//! device (the file's blocks return to its file system), a discard (TRIM)
//! on a block device (the SSD may erase ahead of time).
//!
//! **Crash safety.** A discard must never touch space that a later commit
//! owns. Freed extents therefore do not go back to the allocator when they
//! are freed: [`FreeSpace::release`] queues them, still marked used, for
//! one background thread, which discards them on every device and only then
//! returns them to the allocator. No ingest can be handed an extent while
//! its discard may still run, so a discard can only ever hit bytes nobody
//! owns. A crash before the discard loses nothing: the dataset's deletion
//! was committed in the catalog first, so the extent is free at the next
//! start, where a pass over all free space ([`Job::TrimFree`]) discards it
//! (piece by piece, each piece taken out of the allocator while it is
//! discarded, for the same reason). Held space is free space that is
//! late: an allocation that finds no room while some is held waits for it
//! ([`FreeSpace::allocate`]) rather than report a full pool.
//!
//! Discards are advice to the device: one that fails is logged and
//! counted, and the space is freed all the same. A device that cannot
//! discard (a file system without hole punching, a drive without TRIM) is
//! counted once per range and not retried. With `discard = false` in the
//! config, released space goes straight back to the allocator.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::alloc::{Extent, ExtentAllocator};
use crate::engine::IoBackend;
use crate::layout::StripeLayout;

/// Largest piece of free space the start-up pass takes out of the
/// allocator at a time (an ingest meanwhile sees at most this much less).
const TRIM_PIECE_BYTES: u64 = 64 << 20;

/// Longest an allocation waits for held space to come back from its
/// discard before it reports the pool full (a discard that takes longer
/// is a device in trouble).
const HELD_WAIT_MAX: Duration = Duration::from_secs(30);

/// What the discard thread has done, for `status`.
#[derive(Debug, Default)]
pub struct DiscardCounters {
    pub enabled: AtomicBool,
    /// Device bytes given back (each device's share counted).
    pub discarded_bytes: AtomicU64,
    /// Logical bytes freed and waiting for their discard (still counted as
    /// used until it is done).
    pub pending_bytes: AtomicU64,
    /// Device ranges whose discard failed (the space is freed anyway).
    pub failures: AtomicU64,
    /// Device ranges the device could not discard (unsupported).
    pub unsupported: AtomicU64,
    /// The start-up pass over free space has finished.
    pub startup_pass_done: AtomicBool,
    /// Allocations that found no room and waited for held space to come
    /// back from its discard.
    pub allocations_waited: AtomicU64,
}

/// Work for the discard thread.
enum Job {
    /// Extents freed by a delete or an aborted ingest, out of the allocator.
    Extents(Vec<Extent>),
    /// Discard every free extent (at start: space freed before a crash).
    TrimFree,
}

/// The allocator's release path: straight back when discards are off,
/// through the discard thread when they are on.
pub struct FreeSpace {
    pub alloc: Arc<Mutex<ExtentAllocator>>,
    /// Extents out of the allocator for a discard (queued, or the start-up
    /// pass's piece). Changed only while `alloc`'s lock is held, so a
    /// reader holding it sees the allocator and this set agree.
    held: Arc<Mutex<Vec<Extent>>>,
    /// Signalled, with `alloc`'s lock, whenever discarded space returns to
    /// the allocator: allocations that found no room wait on it.
    returned: Arc<Condvar>,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    pub counters: Arc<DiscardCounters>,
}

/// No room for an allocation, even after held space came back.
#[derive(Debug, Clone, Copy)]
pub struct NoRoom {
    pub free_bytes: u64,
    pub largest_free_bytes: u64,
}

impl std::fmt::Debug for FreeSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreeSpace").finish_non_exhaustive()
    }
}

/// The discard thread's half, kept until the engine exists.
pub struct DiscardWorker {
    jobs: std::sync::mpsc::Receiver<Job>,
    alloc: Arc<Mutex<ExtentAllocator>>,
    held: Arc<Mutex<Vec<Extent>>>,
    returned: Arc<Condvar>,
    counters: Arc<DiscardCounters>,
}

impl FreeSpace {
    /// The release path over `alloc`; with `discard`, also the worker half
    /// to [`start`](DiscardWorker::start) once the engine is built.
    pub fn new(alloc: Arc<Mutex<ExtentAllocator>>, discard: bool) -> (Self, Option<DiscardWorker>) {
        let counters = Arc::new(DiscardCounters::default());
        counters.enabled.store(discard, Ordering::Relaxed);
        let held: Arc<Mutex<Vec<Extent>>> = Arc::default();
        let returned: Arc<Condvar> = Arc::default();
        if !discard {
            let space = Self {
                alloc,
                held,
                returned,
                jobs: Mutex::new(None),
                counters,
            };
            return (space, None);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = DiscardWorker {
            jobs: rx,
            alloc: Arc::clone(&alloc),
            held: Arc::clone(&held),
            returned: Arc::clone(&returned),
            counters: Arc::clone(&counters),
        };
        // The start-up pass goes first.
        let _ = tx.send(Job::TrimFree);
        let space = Self {
            alloc,
            held,
            returned,
            jobs: Mutex::new(Some(tx)),
            counters,
        };
        (space, Some(worker))
    }

    /// Extents out of the allocator for a discard. Call with the
    /// allocator's lock held for a view consistent with it.
    pub fn held_extents(&self) -> Vec<Extent> {
        self.held.lock().expect("held set poisoned").clone()
    }

    /// Runs `take` on the allocator. Space out for a discard is free space
    /// the allocator cannot hand out yet, so when `take` finds no room
    /// while some is held, this waits for it to come back (each returned
    /// piece wakes it to try again), at most [`HELD_WAIT_MAX`]. Without
    /// this, an ingest right after start (the start-up pass holds a piece)
    /// or right after a delete (its space is queued) fails on a pool that
    /// has room. The wait blocks the calling thread for as long as a
    /// discard of one piece takes (milliseconds on a file, a device's TRIM
    /// time on a drive); on a multi-threaded runtime its other tasks are
    /// moved off it first.
    pub fn allocate<T>(
        &self,
        mut take: impl FnMut(&mut ExtentAllocator) -> Option<T>,
    ) -> Result<T, NoRoom> {
        let deadline = Instant::now() + HELD_WAIT_MAX;
        let mut waited = false;
        let mut alloc = self.alloc.lock().expect("allocator poisoned");
        loop {
            if let Some(got) = take(&mut alloc) {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // `held` changes only under `alloc`'s lock, which is held here.
            if left.is_zero() || self.held.lock().expect("held set poisoned").is_empty() {
                return Err(NoRoom {
                    free_bytes: alloc.free_bytes(),
                    largest_free_bytes: alloc.largest_free_bytes(),
                });
            }
            if !waited {
                waited = true;
                self.counters
                    .allocations_waited
                    .fetch_add(1, Ordering::Relaxed);
            }
            let wait = || {
                self.returned
                    .wait_timeout(alloc, left)
                    .expect("allocator poisoned")
                    .0
            };
            // On a multi-threaded runtime the worker's other tasks move
            // elsewhere while this one waits.
            alloc = match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(wait)
                }
                _ => wait(),
            };
        }
    }

    /// Gives `extents` (taken from the allocator, holding nothing anyone
    /// reads or writes any more) back: discarded first when discards are
    /// on. `what` names the owner in logs.
    pub fn release(&self, extents: Vec<Extent>, what: &str) {
        let jobs = self.jobs.lock().expect("discard queue poisoned");
        if let Some(tx) = jobs.as_ref() {
            let bytes: u64 = extents.iter().map(|e| e.len).sum();
            {
                let _alloc = self.alloc.lock().expect("allocator poisoned");
                self.held
                    .lock()
                    .expect("held set poisoned")
                    .extend_from_slice(&extents);
            }
            self.counters
                .pending_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            // The thread lives as long as this sender, so the send cannot
            // fail; if it ever did, the space stays held until restart
            // (where the start-up pass frees it), never handed out twice.
            if tx.send(Job::Extents(extents)).is_err() {
                tracing::error!(
                    owner = what,
                    "the discard thread is gone; freed space stays held until restart"
                );
            }
            return;
        }
        drop(jobs);
        self.release_now(extents, what);
    }

    /// Returns a discarded extent to the allocator and drops it from the
    /// held set, together under the allocator's lock.
    fn give_back_to(
        alloc: &Mutex<ExtentAllocator>,
        held: &Mutex<Vec<Extent>>,
        returned: &Condvar,
        e: Extent,
    ) {
        let mut alloc = alloc.lock().expect("allocator poisoned");
        if let Err(err) = alloc.release(e) {
            tracing::error!(error = %err, "releasing discarded space");
        }
        let mut held = held.lock().expect("held set poisoned");
        if let Some(i) = held.iter().position(|h| *h == e) {
            held.swap_remove(i);
        }
        returned.notify_all();
    }

    fn release_now(&self, extents: Vec<Extent>, what: &str) {
        let mut a = self.alloc.lock().expect("allocator poisoned");
        for e in extents {
            if let Err(err) = a.release(e) {
                tracing::error!(owner = what, error = %err, "releasing space");
            }
        }
    }

    /// Stops queueing discards (the thread finishes what is queued, then
    /// exits); later releases go straight back.
    pub fn stop(&self) {
        self.jobs.lock().expect("discard queue poisoned").take();
    }
}

impl DiscardWorker {
    fn give_back(&self, e: Extent) {
        FreeSpace::give_back_to(&self.alloc, &self.held, &self.returned, e);
    }

    /// Starts the discard thread on `engine`.
    pub fn start(self, engine: Arc<dyn IoBackend>, layout: StripeLayout) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("storaged-discard".into())
            .spawn(move || self.run(engine.as_ref(), layout))
            .map(drop)
    }

    fn run(self, engine: &dyn IoBackend, layout: StripeLayout) {
        while let Ok(job) = self.jobs.recv() {
            match job {
                Job::Extents(extents) => {
                    for e in extents {
                        discard_extent(engine, layout, e, &self.counters);
                        self.give_back(e);
                        self.counters
                            .pending_bytes
                            .fetch_sub(e.len, Ordering::Relaxed);
                    }
                }
                Job::TrimFree => {
                    self.trim_free(engine, layout);
                    self.counters
                        .startup_pass_done
                        .store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Discards all free space, a piece at a time, each piece out of the
    /// allocator while its discard runs.
    fn trim_free(&self, engine: &dyn IoBackend, layout: StripeLayout) {
        let free: Vec<Extent> = self
            .alloc
            .lock()
            .expect("allocator poisoned")
            .free_extents()
            .collect();
        for e in free {
            let mut at = e.offset;
            while at < e.end() {
                let piece = Extent {
                    offset: at,
                    len: TRIM_PIECE_BYTES.min(e.end() - at),
                };
                at = piece.end();
                {
                    let mut alloc = self.alloc.lock().expect("allocator poisoned");
                    // Taken meanwhile by an ingest: not ours to discard.
                    if alloc.mark_used(piece).is_err() {
                        continue;
                    }
                    self.held.lock().expect("held set poisoned").push(piece);
                }
                discard_extent(engine, layout, piece, &self.counters);
                self.give_back(piece);
            }
        }
    }
}

/// Device ranges of logical extent `e`, merged per device (consecutive
/// rows of one device are contiguous on it).
pub fn device_ranges(layout: StripeLayout, e: Extent) -> Vec<(u32, u64, u64)> {
    let mut runs: Vec<(u32, u64, u64)> = Vec::new();
    let mut open: Vec<Option<usize>> = vec![None; layout.device_count as usize];
    for s in layout.segments(e.offset, e.len) {
        let slot = &mut open[s.device as usize];
        match slot {
            Some(i) if runs[*i].1 + runs[*i].2 == s.device_offset => runs[*i].2 += s.len,
            _ => {
                *slot = Some(runs.len());
                runs.push((s.device, s.device_offset, s.len));
            }
        }
    }
    runs
}

fn discard_extent(engine: &dyn IoBackend, layout: StripeLayout, e: Extent, c: &DiscardCounters) {
    for (device, offset, len) in device_ranges(layout, e) {
        match engine.discard(device, offset, len) {
            Ok(()) => {
                c.discarded_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(err) if err.kind() == std::io::ErrorKind::Unsupported => {
                c.unsupported.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device, error = %err, "device cannot discard");
            }
            Err(err) => {
                c.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device, offset, len, error = %err, "discard failed; the space is free all the same");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_each_device_once_for_whole_rows() {
        let layout = StripeLayout {
            device_count: 4,
            stripe_unit_bytes: 64 << 10,
            data_offset_bytes: 1 << 20,
            device_data_bytes: 64 << 20,
        };
        let row = 4 * (64 << 10);
        let ranges = device_ranges(
            layout,
            Extent {
                offset: 2 * row,
                len: 3 * row,
            },
        );
        assert_eq!(ranges.len(), 4, "{ranges:?}");
        for (d, (device, offset, len)) in ranges.into_iter().enumerate() {
            assert_eq!(device, d as u32);
            assert_eq!(offset, (1 << 20) + 2 * (64 << 10));
            assert_eq!(len, 3 * (64 << 10));
        }
        // A partial row: only the devices it touches.
        let ranges = device_ranges(
            layout,
            Extent {
                offset: 4096,
                len: 8192,
            },
        );
        assert_eq!(ranges, vec![(0, (1 << 20) + 4096, 8192)]);
    }
}
