//! Read-ahead hints: a client says which objects it will read next, and
//! storaged reads them before they are asked for.
//!
//! A `Hint` names up to `hint_items_max` objects of one dataset (a loader
//! sends the part of its plan beyond the batches it is already reading).
//! Every piece of every hinted object is scheduled together (see
//! `schedule`): sorted by (device, offset), neighbours merged into device
//! reads of up to `read_merge_bytes_max`, issued round-robin over devices.
//! With block-shuffled plans a window of samples is mostly neighbours on
//! disk, so a few large reads replace one small read per sample.
//!
//! Each hinted object becomes an entry of a small cache, keyed by (dataset
//! id, logical offset), that a foreground read of the object takes: it
//! waits for the entry if its read is still running, then serves slices of
//! the verified buffers without a copy. An entry is taken out by the read
//! that reaches the object's end (training reads each sample once per
//! epoch); entries nobody reads expire after `hint_ttl_ms`.
//!
//! **Bounded, and never in the way.** The cache holds at most
//! `hint_cache_bytes_max` of pool buffers. Buffers are taken only if free
//! at that moment, and only while more than half of their size class is
//! free (`BufferPool::try_acquire_spare`), so read-ahead never queues
//! behind foreground reads nor takes the buffers they need (entries hold
//! theirs until read or expired), and a pending entry holds everything it needs
//! and only waits for the device, which makes waiting on it safe for a
//! foreground read. What does not fit is skipped and counted. A failed or
//! corrupt read-ahead serves nothing: the foreground read reads the object
//! itself and reports the error as usual.
//!
//! The same-host `ReadInto` path does not use the cache (serving from it
//! would be a copy); its requests are scheduled the same way in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use storaged_proto::{DatasetName, ObjectPath};
use tokio::sync::watch;

use super::schedule::{Run, Want, schedule};
use super::{Chunk, ObjectRef, Store};
use crate::alloc::BLOCK_BYTES;
use crate::buf::BufLease;
use crate::engine;
use crate::error::{Limit, ReadError, StoreError};

type Key = (u64, u64);

/// `None` while the read runs; then `Some(None)` if it failed, or the
/// object's verified bytes as chunks in object order.
type Slot = Option<Option<Arc<[Chunk]>>>;

/// Counters, exported in `Status`.
#[derive(Debug, Default)]
pub struct ReadAheadCounters {
    /// Objects named by hints.
    pub hinted: AtomicU64,
    /// Objects read ahead and verified.
    pub prefetched: AtomicU64,
    /// Hinted objects not read ahead: no budget or buffer free, too large,
    /// or not found.
    pub skipped: AtomicU64,
    /// Objects whose read-ahead failed (I/O error or checksum): not
    /// cached, read again by whoever asks.
    pub failed: AtomicU64,
    /// Foreground reads served from read-ahead, and their bytes.
    pub hits: AtomicU64,
    pub hit_bytes: AtomicU64,
    /// Entries that expired unread.
    pub expired: AtomicU64,
}

/// Buffer bytes charged to the cache for one run, given back when the last
/// entry using the run leaves the cache.
struct Charge {
    bytes: u64,
    used: Arc<AtomicU64>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

struct Entry {
    size: u64,
    inserted: Instant,
    data: watch::Receiver<Slot>,
    _charges: Vec<Arc<Charge>>,
}

/// The read-ahead cache; see the module docs.
pub struct ReadAhead {
    entries: Mutex<HashMap<Key, Entry>>,
    /// Entry count, so reads skip the lock when nothing was hinted.
    len: AtomicUsize,
    used_bytes: Arc<AtomicU64>,
    budget_bytes: u64,
    ttl: Duration,
    pub counters: ReadAheadCounters,
}

/// What a hint did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintOutcome {
    /// Objects now being read ahead (or already cached).
    pub accepted: u32,
    pub accepted_bytes: u64,
    /// Device reads issued for them.
    pub device_reads: u32,
}

impl ReadAhead {
    pub fn new(budget_bytes: u64, ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            used_bytes: Arc::new(AtomicU64::new(0)),
            budget_bytes,
            ttl,
            counters: ReadAheadCounters::default(),
        }
    }

    /// Buffer bytes the cache holds now.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    fn key(obj: &ObjectRef) -> Key {
        (obj.dataset.record.id, obj.record.logical_offset)
    }

    fn sweep(&self, now: Instant) {
        let mut entries = self.entries.lock().expect("read-ahead poisoned");
        let before = entries.len();
        entries.retain(|_, e| now.duration_since(e.inserted) < self.ttl);
        let expired = before - entries.len();
        self.len.store(entries.len(), Ordering::Relaxed);
        self.counters
            .expired
            .fetch_add(expired as u64, Ordering::Relaxed);
    }

    /// The verified bytes of `obj` if it was read ahead, waiting for its
    /// read if that is still running. `consume` takes the entry out.
    /// Nothing is read ahead (no lock taken): callers can skip lookups.
    pub(super) fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    async fn lookup(&self, obj: &ObjectRef, consume: bool) -> Option<Arc<[Chunk]>> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut rx = {
            let mut entries = self.entries.lock().expect("read-ahead poisoned");
            let key = Self::key(obj);
            let entry = entries.get(&key).filter(|e| e.size == obj.record.size)?;
            let rx = entry.data.clone();
            if consume {
                // The entry's charges go with it; the buffers themselves
                // return to the pool once the served slices are dropped.
                entries.remove(&key);
                self.len.store(entries.len(), Ordering::Relaxed);
            }
            rx
        };
        let slot = rx.wait_for(Option::is_some).await.ok()?;
        slot.clone().flatten()
    }
}

/// Cuts `[start, end)` out of an object's chunks, without copying.
fn slice_chunks(chunks: &[Chunk], start: u64, end: u64) -> Vec<Chunk> {
    chunks
        .iter()
        .filter_map(|(at, b)| {
            let lo = start.max(*at);
            let hi = end.min(at + b.len() as u64);
            (lo < hi).then(|| (lo, b.slice((lo - at) as usize..(hi - at) as usize)))
        })
        .collect()
}

impl Store {
    /// Served from read-ahead: object bytes `[start, end)` (within one
    /// read window), or `None` to read them from the devices.
    pub(super) async fn read_ahead_hit(
        &self,
        obj: &ObjectRef,
        start: u64,
        end: u64,
    ) -> Option<Vec<Chunk>> {
        let chunks = self.read_ahead.lookup(obj, end >= obj.record.size).await?;
        let out = slice_chunks(&chunks, start, end);
        let c = &self.read_ahead.counters;
        c.hits.fetch_add(1, Ordering::Relaxed);
        c.hit_bytes.fetch_add(end - start, Ordering::Relaxed);
        Some(out)
    }

    /// Starts reading `paths` of `dataset` ahead (see the module docs) and
    /// returns at once with what was accepted.
    pub fn hint(
        self: &Arc<Self>,
        dataset: &DatasetName,
        paths: &[ObjectPath],
    ) -> Result<HintOutcome, ReadError> {
        let limit = self.limits.hint_items_max;
        if paths.len() > limit {
            return Err(StoreError::Limit {
                limit: Limit::HintItems,
                asked: paths.len() as u64,
                max: limit as u64,
            }
            .into());
        }
        let now = Instant::now();
        self.read_ahead.sweep(now);
        self.read_ahead
            .counters
            .hinted
            .fetch_add(paths.len() as u64, Ordering::Relaxed);
        let mut accepted = HintOutcome::default();
        let objects = self.hint_candidates(dataset, paths, &mut accepted)?;

        // Every piece of every object, scheduled together. `dest` is the
        // piece's offset in its object, which orders the pieces again.
        let mut wants = Vec::new();
        let mut pieces_left = vec![0usize; objects.len()];
        for (tag, obj) in objects.iter().enumerate() {
            let dev_len = obj.record.size.next_multiple_of(BLOCK_BYTES);
            for s in self.object_segments(obj, 0, dev_len) {
                wants.push(Want {
                    device: s.device,
                    device_offset: s.device_offset,
                    len: s.len,
                    dest: s.logical - obj.record.logical_offset,
                    tag,
                });
                pieces_left[tag] += 1;
            }
        }
        // A run is read into one pool buffer.
        let merge_max = self
            .limits
            .read_merge_bytes_max
            .min(self.io.pool.buf_bytes_max() as u64);
        let runs = schedule(&mut wants, merge_max, false);
        let (leases, admitted) = self.lease_runs(&runs, &wants, objects.len());
        let senders = self.admit_entries(
            &objects,
            &runs,
            &wants,
            &leases,
            &admitted,
            now,
            &mut accepted,
        );

        // Runs that serve none of the admitted objects are not read at all.
        let reads = FuturesUnordered::new();
        let mut merged = 0u64;
        for (run, lease) in runs.into_iter().zip(leases) {
            let Some((lease, _charge)) = lease else {
                continue;
            };
            if !wants[run.wants.clone()].iter().any(|w| admitted[w.tag]) {
                continue;
            }
            accepted.device_reads += 1;
            merged += run.wants.len() as u64 - 1;
            let store = Arc::clone(self);
            reads.push(async move {
                let result = engine::read_exact(
                    &*store.io.engine,
                    run.device,
                    run.device_offset,
                    run.len as usize,
                    lease,
                )
                .await;
                (run.wants, result.map(|buf| buf.into_bytes()).ok())
            });
        }
        self.read_counters
            .device_reads_merged
            .fetch_add(merged, Ordering::Relaxed);
        tokio::spawn(Arc::clone(self).deliver_read_ahead(
            reads,
            wants,
            objects,
            senders,
            pieces_left,
        ));
        Ok(accepted)
    }

    /// The objects of a hint worth reading ahead: found, small enough to
    /// serve from one message, not cached already, named once. Those
    /// cached already count as accepted; the others are skipped.
    fn hint_candidates(
        &self,
        dataset: &DatasetName,
        paths: &[ObjectPath],
        accepted: &mut HintOutcome,
    ) -> Result<Vec<Arc<ObjectRef>>, ReadError> {
        let c = &self.read_ahead.counters;
        let ds = self.dataset(dataset)?;
        let names: Vec<&str> = paths.iter().map(|p| p.as_str()).collect();
        let records = self.data.catalog.get_objects(ds.record.id, &names)?;
        let size_max = self.limits.message_bytes;
        let mut objects: Vec<Arc<ObjectRef>> = Vec::new();
        let entries = self.read_ahead.entries.lock().expect("read-ahead poisoned");
        let mut seen = std::collections::HashSet::new();
        for (path, record) in paths.iter().zip(records) {
            let Some(record) = record.filter(|r| r.size > 0 && r.size <= size_max) else {
                c.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let key = (ds.record.id, record.logical_offset);
            if !seen.insert(key) {
                continue;
            }
            if entries.contains_key(&key) {
                accepted.accepted += 1;
                accepted.accepted_bytes += record.size;
                continue;
            }
            objects.push(Arc::new(ObjectRef {
                dataset: Arc::clone(&ds),
                path: path.to_string(),
                record,
            }));
        }
        Ok(objects)
    }

    /// Buffers for the runs, only from what is free and within the
    /// read-ahead budget, each with the charge that gives its bytes back;
    /// and which of `objects` objects have every run they need.
    #[allow(clippy::type_complexity)]
    fn lease_runs(
        &self,
        runs: &[Run],
        wants: &[Want],
        objects: usize,
    ) -> (Vec<Option<(BufLease, Arc<Charge>)>>, Vec<bool>) {
        let ra = &self.read_ahead;
        let mut admitted = vec![true; objects];
        let mut leases = Vec::with_capacity(runs.len());
        for run in runs {
            let lease = (ra.used_bytes() + run.len <= ra.budget_bytes)
                .then(|| self.io.pool.try_acquire_spare(run.len as usize))
                .flatten();
            match &lease {
                Some(l) => {
                    ra.used_bytes
                        .fetch_add(l.capacity() as u64, Ordering::Relaxed);
                }
                None => {
                    for w in &wants[run.wants.clone()] {
                        admitted[w.tag] = false;
                    }
                }
            }
            leases.push(lease.map(|l| {
                let charge = Arc::new(Charge {
                    bytes: l.capacity() as u64,
                    used: Arc::clone(&ra.used_bytes),
                });
                (l, charge)
            }));
        }
        (leases, admitted)
    }

    /// A cache entry for each admitted object, holding the charges of the
    /// runs it uses; returns the senders that complete them (`None` for an
    /// object not admitted, which is skipped).
    #[allow(clippy::too_many_arguments)]
    fn admit_entries(
        &self,
        objects: &[Arc<ObjectRef>],
        runs: &[Run],
        wants: &[Want],
        leases: &[Option<(BufLease, Arc<Charge>)>],
        admitted: &[bool],
        now: Instant,
        accepted: &mut HintOutcome,
    ) -> Vec<Option<watch::Sender<Slot>>> {
        let ra = &self.read_ahead;
        let mut charges: Vec<Vec<Arc<Charge>>> = vec![Vec::new(); objects.len()];
        for (run, lease) in runs.iter().zip(leases) {
            if let Some((_, charge)) = lease {
                for w in &wants[run.wants.clone()] {
                    if admitted[w.tag] {
                        charges[w.tag].push(Arc::clone(charge));
                    }
                }
            }
        }
        let mut senders = Vec::with_capacity(objects.len());
        let mut entries = ra.entries.lock().expect("read-ahead poisoned");
        for (tag, obj) in objects.iter().enumerate() {
            if !admitted[tag] {
                ra.counters.skipped.fetch_add(1, Ordering::Relaxed);
                senders.push(None);
                continue;
            }
            let (tx, rx) = watch::channel(None);
            entries.insert(
                ReadAhead::key(obj),
                Entry {
                    size: obj.record.size,
                    inserted: now,
                    data: rx,
                    _charges: std::mem::take(&mut charges[tag]),
                },
            );
            accepted.accepted += 1;
            accepted.accepted_bytes += obj.record.size;
            senders.push(Some(tx));
        }
        ra.len.store(entries.len(), Ordering::Relaxed);
        senders
    }

    /// Completes each admitted object's entry as its last run lands:
    /// verified chunks, or `None` if it failed.
    async fn deliver_read_ahead(
        self: Arc<Self>,
        mut reads: FuturesUnordered<
            impl std::future::Future<Output = (std::ops::Range<usize>, Option<Bytes>)>,
        >,
        wants: Vec<Want>,
        objects: Vec<Arc<ObjectRef>>,
        senders: Vec<Option<watch::Sender<Slot>>>,
        mut pieces_left: Vec<usize>,
    ) {
        let mut pieces: Vec<Vec<(u64, Option<Bytes>)>> = vec![Vec::new(); objects.len()];
        while let Some((run_wants, bytes)) = reads.next().await {
            let mut at = 0usize;
            for w in &wants[run_wants] {
                let piece = bytes.as_ref().map(|b| b.slice(at..at + w.len as usize));
                at += w.len as usize;
                let Some(tx) = senders[w.tag].as_ref() else {
                    continue;
                };
                pieces[w.tag].push((w.dest, piece));
                pieces_left[w.tag] -= 1;
                if pieces_left[w.tag] == 0 {
                    let obj = &objects[w.tag];
                    let got = std::mem::take(&mut pieces[w.tag]);
                    let chunks = self.finish_read_ahead(obj, got);
                    let c = &self.read_ahead.counters;
                    match chunks {
                        Some(_) => c.prefetched.fetch_add(1, Ordering::Relaxed),
                        None => c.failed.fetch_add(1, Ordering::Relaxed),
                    };
                    tx.send_replace(Some(chunks));
                }
            }
        }
    }

    /// Orders an object's pieces, verifies them and cuts them to the
    /// object's size; `None` if a piece is missing or fails its checksum
    /// (the foreground read then reads, and reports, for itself).
    fn finish_read_ahead(
        &self,
        obj: &ObjectRef,
        mut pieces: Vec<(u64, Option<Bytes>)>,
    ) -> Option<Arc<[Chunk]>> {
        pieces.sort_by_key(|p| p.0);
        let mut offsets = Vec::with_capacity(pieces.len());
        let mut bytes = Vec::with_capacity(pieces.len());
        for (at, b) in pieces {
            offsets.push(at);
            bytes.push(b?);
        }
        let verified = match crate::verified::verify(bytes, (0, obj.record.size), Self::blocks(obj))
        {
            Ok(v) => v,
            Err(e) => {
                let e = self.verify_error(obj, e);
                tracing::warn!(error = %e, "read-ahead failed verification; readers will re-read");
                return None;
            }
        };
        let chunks: Vec<Chunk> = offsets.into_iter().zip(verified).collect();
        Some(slice_chunks(&chunks, 0, obj.record.size).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_chunks_keeps_offsets_and_shares_memory() {
        let a = Bytes::from_static(b"0123456789");
        let b = Bytes::from_static(b"abcdef");
        let crc = crc32fast::hash(b"0123456789abcdef");
        let blocks = crate::verified::Blocks {
            block_bytes: 4096,
            object_bytes: 16,
            crcs: &[crc],
        };
        let v = crate::verified::verify(vec![a.clone(), b], (0, 16), blocks).unwrap();
        let chunks: Vec<Chunk> = [0u64, 10].into_iter().zip(v).collect();
        let got = slice_chunks(&chunks, 8, 12);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, &got[0].1[..]), (8, &b"89"[..]));
        assert_eq!((got[1].0, &got[1].1[..]), (10, &b"ab"[..]));
        assert_eq!(got[0].1.as_ptr(), a[8..].as_ptr(), "no copy");
        assert!(slice_chunks(&chunks, 16, 20).is_empty());
    }
}
