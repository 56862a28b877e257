//! Erasure-coded datasets in the store: writing stripes at ingest, and
//! reading through lost or bad units.
//!
//! **Write.** [`EcWriter`] collects a stripe's K data units in pool buffers
//! as ingest bytes arrive (objects packed at 4 KiB in the data space, see
//! `ec`), computes the M parity units when the stripe is full, takes the
//! position-bound CRC of every unit, and writes the K + M units, each to its
//! own device, with the ingest's usual bound on writes in flight. The last
//! stripe is padded with zeros. The unit CRCs are committed with the dataset
//! in the same catalog transaction.
//!
//! **Degraded read.** A read of an `ec` dataset first goes to the data
//! units as for any dataset. If a device is missing, fails, or returns bytes
//! failing their checksum, the read falls back to the stripes it covers:
//! every unit of the stripe is read and checked against its unit CRC, the
//! units that are gone or bad (at most M) are rebuilt from the others, the
//! rebuilt ones must match their own CRC, and the window is verified again
//! against the object's block CRCs before a byte leaves. Each rebuilt
//! stripe counts once for its dataset and once per lost unit for its
//! device. Rebuilt data units are kept in a small cache (bounded in bytes,
//! oldest out first), so a sequential degraded read rebuilds each stripe
//! once rather than once per window.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use storaged_proto::model::StorageClass;

use super::window::ReadWindow;
use super::{Chunk, DatasetHandle, ObjectRef, Store, WriteFuture, WriteIo};
use crate::alloc::BLOCK_BYTES;
use crate::buf::{BufLease, BufferPool};
use crate::catalog::DatasetRecord;
use crate::ec::{Codec, EcGeometry, EcMap, unit_checks};
use crate::engine;
use crate::error::{OpenError, StoreError};
use crate::layout::StripeLayout;

/// Layout and codec of one erasure-coded dataset.
#[derive(Debug)]
pub struct EcDataset {
    pub map: EcMap,
    pub codec: Codec,
}

impl EcDataset {
    pub fn for_record(record: &DatasetRecord, layout: StripeLayout) -> Option<Self> {
        let StorageClass::Ec {
            data_units,
            parity_units,
        } = record.class
        else {
            return None;
        };
        let geometry = EcGeometry {
            data_units,
            parity_units,
        };
        Some(Self {
            map: EcMap::new(geometry, layout, &record.extents),
            codec: Codec::new(geometry),
        })
    }

    pub fn geometry(&self) -> EcGeometry {
        self.map.geometry
    }

    /// Devices holding at least one unit of this dataset.
    pub(super) fn devices_used(&self, device_count: u32) -> Vec<bool> {
        let mut used = vec![false; device_count as usize];
        let stripes = self.map.stripes();
        for s in 0..stripes.min(u64::from(device_count)) {
            for p in 0..self.geometry().width() {
                used[self.map.unit_location(s, p).0 as usize] = true;
            }
        }
        used
    }
}

/// Devices (of `missing`) that hold bytes of `ds`.
pub fn devices_at_risk(ds: &DatasetHandle, layout: StripeLayout, missing: &[bool]) -> Vec<u32> {
    let used = ds.layout.devices_used(&ds.record, layout.device_count);
    (0..layout.device_count)
        .filter(|d| missing[*d as usize] && used[*d as usize])
        .collect()
}

/// What a dataset can still serve with the devices `missing`: empty when
/// all is well.
pub fn dataset_health(ds: &DatasetHandle, layout: StripeLayout, missing: &[bool]) -> String {
    let gone = devices_at_risk(ds, layout, missing);
    if gone.is_empty() {
        return String::new();
    }
    ds.layout.health(ds.record.class, &gone)
}

/// Refuses a degraded start that would leave a redundant dataset
/// unreadable (more devices missing than it has parity).
pub fn check_degraded_start(
    datasets: &BTreeMap<String, Arc<DatasetHandle>>,
    layout: StripeLayout,
    missing: &[bool],
    paths: &[std::path::PathBuf],
) -> Result<(), OpenError> {
    if !missing.iter().any(|m| *m) {
        return Ok(());
    }
    for ds in datasets.values() {
        // A class without redundancy starts regardless (and reports the
        // objects at risk); one with redundancy must keep every byte.
        if ds.layout.losses_tolerated() > 0 {
            let gone = devices_at_risk(ds, layout, missing);
            if gone.len() > ds.layout.losses_tolerated() {
                let names: Vec<String> = gone
                    .iter()
                    .map(|d| format!("{d} ({})", paths[*d as usize].display()))
                    .collect();
                return Err(OpenError::TooDegraded(format!(
                    "dataset {:?} ({}) would be unreadable: devices {} are missing and it tolerates {}",
                    ds.name,
                    ds.record.class,
                    names.join(", "),
                    ds.layout.losses_tolerated()
                )));
            }
        }
    }
    Ok(())
}

type StripeKey = (u64, u64);

/// Rebuilt stripes' data units, oldest out first, bounded in bytes.
#[derive(Debug)]
pub struct StripeCache {
    bytes_max: u64,
    bytes: u64,
    /// Rebuilds in progress: concurrent readers of one stripe (a stream's
    /// windows in flight) wait for the same rebuild instead of each doing
    /// their own.
    pending: std::collections::HashMap<StripeKey, Arc<tokio::sync::OnceCell<Arc<Vec<Bytes>>>>>,
    /// ((dataset id, stripe), data units).
    entries: VecDeque<(StripeKey, Arc<Vec<Bytes>>)>,
}

impl StripeCache {
    pub fn new(bytes_max: u64) -> Self {
        Self {
            bytes_max,
            bytes: 0,
            pending: Default::default(),
            entries: VecDeque::new(),
        }
    }

    fn get(&self, key: (u64, u64)) -> Option<Arc<Vec<Bytes>>> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| Arc::clone(v))
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn insert(&mut self, key: (u64, u64), units: Arc<Vec<Bytes>>) {
        let size: u64 = units.iter().map(|u| u.len() as u64).sum();
        if size > self.bytes_max || self.get(key).is_some() {
            return;
        }
        while self.bytes + size > self.bytes_max {
            let Some((_, old)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.iter().map(|u| u.len() as u64).sum::<u64>();
        }
        self.bytes += size;
        self.entries.push_back((key, units));
    }
}

/// A stripe's units as read and checked: `(unit, intact)` by position.
pub(super) struct StripeRead {
    pub units: Vec<BufLease>,
    /// Every row of the unit read and checked good.
    pub intact: Vec<bool>,
    /// By position, by row: the row read and checked good.
    pub rows_good: Vec<Vec<bool>>,
    /// Positions whose read failed (I/O error, not a checksum mismatch).
    pub io_failed: Vec<bool>,
    /// Positions whose device is missing (a kind of I/O failure).
    pub missing: Vec<bool>,
    /// Check values, `rows` per position.
    pub crcs: Vec<u32>,
    pub rows: usize,
}

/// Which rows of `bytes` (unit `position` of `stripe`) match `expected`
/// (one check value per row).
fn rows_matching(
    dataset_id: u64,
    stripe: u64,
    position: u32,
    bytes: &[u8],
    expected: &[u32],
) -> Vec<bool> {
    unit_checks(dataset_id, stripe, position, bytes, expected.len())
        .iter()
        .zip(expected)
        .map(|(a, b)| a == b)
        .collect()
}

impl Store {
    /// Reads every unit of `stripe` of `ds` and checks each against its
    /// unit CRC. Never fails for a unit's sake: a unit that cannot be read
    /// or does not match is reported as not intact.
    pub(super) async fn read_stripe(
        &self,
        ds: &DatasetHandle,
        ec: &EcDataset,
        stripe: u64,
        one_at_a_time: bool,
    ) -> Result<StripeRead, StoreError> {
        let width = ec.geometry().width() as usize;
        let unit = ec.map.unit_bytes() as usize;
        let rows = ds.record.unit_rows.max(1) as usize;
        let crcs = self
            .data
            .catalog
            .unit_crcs(ds.record.id, width * rows, stripe, 1)?;
        let leases = self
            .io
            .pool
            .acquire_many(unit, width)
            .await
            .map_err(StoreError::Buffers)?;
        let reads = leases.into_iter().enumerate().map(|(p, lease)| {
            let (device, offset) = ec.map.unit_location(stripe, p as u32);
            engine::read_exact_keep(&*self.io.engine, device, offset, unit, lease)
        });
        // Background work (scrub, rebuild) reads one unit at a time, so
        // it never puts a whole stripe in front of foreground reads.
        let results = if one_at_a_time {
            let mut v = Vec::with_capacity(width);
            for r in reads {
                v.push(r.await);
            }
            v
        } else {
            futures::future::join_all(reads).await
        };
        let mut units = Vec::with_capacity(width);
        let mut intact = Vec::with_capacity(width);
        let mut rows_good = Vec::with_capacity(width);
        let mut missing = Vec::with_capacity(width);
        let mut io_failed = Vec::with_capacity(width);
        for (p, (r, lease)) in results.into_iter().enumerate() {
            io_failed.push(r.is_err());
            let good = match &r {
                Ok(()) => rows_matching(
                    ds.record.id,
                    stripe,
                    p as u32,
                    lease.as_slice(),
                    &crcs[p * rows..(p + 1) * rows],
                ),
                Err(_) => vec![false; rows],
            };
            missing.push(
                r.as_ref()
                    .err()
                    .is_some_and(crate::engine::route::is_missing),
            );
            intact.push(good.iter().all(|g| *g));
            rows_good.push(good);
            units.push(lease);
        }
        Ok(StripeRead {
            units,
            intact,
            rows_good,
            io_failed,
            missing,
            crcs,
            rows,
        })
    }

    /// Rebuilds the rows of `read` that are not good, in place, each from
    /// the same row of the other units (Reed-Solomon works column by
    /// column), and checks each rebuilt row against its CRC. Rot scattered
    /// over every unit is repaired as long as each row keeps K good units
    /// (datasets from before row CRCs have one row: the whole unit).
    /// Returns the positions with a rebuilt row. Counts the
    /// reconstruction.
    pub(super) fn rebuild_stripe(
        &self,
        ds: &DatasetHandle,
        ec: &EcDataset,
        stripe: u64,
        read: &mut StripeRead,
    ) -> Result<Vec<u32>, StoreError> {
        let width = read.intact.len();
        let touched: Vec<u32> = (0..width as u32)
            .filter(|p| !read.intact[*p as usize])
            .collect();
        if touched.is_empty() {
            return Ok(touched);
        }
        let unit = ec.map.unit_bytes() as usize;
        let row_bytes = unit / read.rows;
        let devices_of = |positions: &[u32]| -> Vec<u32> {
            positions
                .iter()
                .map(|p| ec.map.unit_location(stripe, *p).0)
                .collect()
        };
        for l in &mut read.units {
            l.set_len(unit);
        }
        for row in 0..read.rows {
            let lost: Vec<u32> = (0..width as u32)
                .filter(|p| !read.rows_good[*p as usize][row])
                .collect();
            if lost.is_empty() {
                continue;
            }
            let unrecoverable = |missing: bool| StoreError::Unrecoverable {
                dataset: ds.name.clone(),
                stripe,
                devices: devices_of(&lost),
                parity: ec.geometry().parity_units,
                missing,
            };
            if lost.len() > ec.geometry().m() {
                return Err(unrecoverable(
                    lost.iter().any(|p| read.io_failed[*p as usize]),
                ));
            }
            let span = row * row_bytes..(row + 1) * row_bytes;
            {
                let mut shards: Vec<(&mut [u8], bool)> = read
                    .units
                    .iter_mut()
                    .zip(&read.rows_good)
                    .map(|(l, good)| (&mut l.as_mut_full()[span.clone()], good[row]))
                    .collect();
                ec.codec
                    .reconstruct(stripe, &mut shards)
                    .map_err(|_| unrecoverable(false))?;
            }
            for p in &lost {
                let p = *p as usize;
                let bytes = &read.units[p].as_slice()[span.clone()];
                let check = if read.rows == 1 {
                    crate::ec::unit_crc(ds.record.id, stripe, p as u32, bytes)
                } else {
                    crate::ec::row_crc(ds.record.id, stripe, p as u32, row as u32, bytes)
                };
                if check != read.crcs[p * read.rows + row] {
                    // The survivors passed their own checks, so this means
                    // the catalog and the units disagree: never serve it.
                    return Err(unrecoverable(false));
                }
                read.rows_good[p][row] = true;
            }
        }
        for p in &touched {
            read.intact[*p as usize] = true;
        }
        ds.reconstructions.fetch_add(1, Ordering::Relaxed);
        for d in devices_of(&touched) {
            self.redundancy.device_reconstructions[d as usize].fetch_add(1, Ordering::Relaxed);
        }
        Ok(touched)
    }

    /// The verified data units of `stripe`, rebuilt where needed.
    async fn stripe_data(
        &self,
        ds: &DatasetHandle,
        ec: &EcDataset,
        stripe: u64,
    ) -> Result<Arc<Vec<Bytes>>, StoreError> {
        let key = (ds.record.id, stripe);
        let cell = {
            let mut cache = self.redundancy.stripe_cache.lock().expect("cache poisoned");
            if let Some(hit) = cache.get(key) {
                return Ok(hit);
            }
            Arc::clone(cache.pending.entry(key).or_default())
        };
        let result = cell
            .get_or_try_init(|| async {
                let mut read = self.read_stripe(ds, ec, stripe, false).await?;
                self.rebuild_stripe(ds, ec, stripe, &mut read)?;
                // Copied out of the pool buffers so that the cache never
                // holds buffers foreground reads are waiting for.
                let data: Vec<Bytes> = read
                    .units
                    .into_iter()
                    .take(ec.geometry().k())
                    .map(|l| Bytes::copy_from_slice(l.as_slice()))
                    .collect();
                Ok::<_, StoreError>(Arc::new(data))
            })
            .await
            .cloned();
        let mut cache = self.redundancy.stripe_cache.lock().expect("cache poisoned");
        if cache
            .pending
            .get(&key)
            .is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            cache.pending.remove(&key);
        }
        if let Ok(data) = &result {
            cache.insert(key, Arc::clone(data));
        }
        result
    }

    /// A small window of an `ec` dataset with pieces on a missing or failing
    /// device: each such piece is rebuilt from the same byte range of K
    /// other units of its stripe (Reed-Solomon works column by column), so
    /// a 100 KiB sample costs K reads of 100 KiB, not K whole units. The
    /// survivors are not checked one by one here; the rebuilt window is
    /// checked against the object's block CRCs, and any mismatch sends the
    /// caller to the whole-stripe path, which checks every unit.
    pub(super) async fn read_window_partial(
        &self,
        obj: &ObjectRef,
        ec: &EcDataset,
        w: ReadWindow,
        missing: &[bool],
    ) -> Result<Vec<Chunk>, StoreError> {
        let segs = self.object_segments(obj, w.start, w.device_len());
        // Every buffer the window needs, taken at once (one per piece read
        // directly, K per piece rebuilt), so that windows never hold some
        // buffers while waiting for more. A piece that fails to read
        // directly fails the window: the caller rebuilds whole stripes.
        let k = ec.geometry().k();
        let lost: Vec<bool> = segs.iter().map(|s| missing[s.device as usize]).collect();
        let need = lost.iter().map(|l| if *l { k } else { 1 }).sum();
        let longest = segs.iter().map(|s| s.len).max().unwrap_or(0) as usize;
        let mut leases = self
            .io
            .pool
            .acquire_many(longest, need)
            .await
            .map_err(StoreError::Buffers)?
            .into_iter();
        let mut plan = Vec::with_capacity(segs.len());
        for (s, l) in segs.iter().zip(&lost) {
            let n = if *l { k } else { 1 };
            plan.push((s, *l, leases.by_ref().take(n).collect::<Vec<_>>()));
        }
        let pieces = futures::future::try_join_all(plan.into_iter().map(
            |(s, rebuild, leases)| async move {
                if rebuild {
                    return self.rebuild_range(obj, ec, s, missing, leases).await;
                }
                let lease = leases
                    .into_iter()
                    .next()
                    .expect("one buffer per direct piece");
                engine::read_exact(
                    &*self.io.engine,
                    s.device,
                    s.device_offset,
                    s.len as usize,
                    lease,
                )
                .await
                .map(BufLease::into_bytes)
                .map_err(|e| StoreError::from_io(s.device, s.device_offset, e))
            },
        ))
        .await?;
        self.verified_parts(obj, w, pieces)
    }

    /// The bytes of data segment `s` rebuilt from the same range of the
    /// other units of its stripe, read into `leases` (K buffers of at least
    /// `s.len` bytes).
    async fn rebuild_range(
        &self,
        obj: &ObjectRef,
        ec: &EcDataset,
        s: &crate::layout::Segment,
        missing: &[bool],
        leases: Vec<BufLease>,
    ) -> Result<Bytes, StoreError> {
        let g = ec.geometry();
        let unit = ec.map.unit_bytes();
        let (stripe, position) = ec.map.data_unit_of(s.logical);
        let within = s.logical % unit;
        let len = s.len as usize;
        let sources: Vec<u32> = (0..g.width())
            .filter(|q| *q != position)
            .filter(|q| !missing[ec.map.unit_location(stripe, *q).0 as usize])
            .take(g.k())
            .collect();
        let lost_devices = vec![s.device];
        let unrecoverable = |io: bool| StoreError::Unrecoverable {
            dataset: obj.dataset.name.clone(),
            stripe,
            devices: lost_devices.clone(),
            parity: g.parity_units,
            missing: io,
        };
        if sources.len() < g.k() {
            return Err(unrecoverable(true));
        }
        let reads = sources.iter().zip(leases).map(|(q, lease)| {
            let (device, offset) = ec.map.unit_location(stripe, *q);
            engine::read_exact(&*self.io.engine, device, offset + within, len, lease)
        });
        let mut got: Vec<BufLease> = futures::future::try_join_all(reads)
            .await
            .map_err(|_| unrecoverable(true))?;
        let mut scratch: Vec<Vec<u8>> = (0..g.width() as usize - sources.len())
            .map(|_| vec![0u8; len])
            .collect();
        let mut rebuilt = None;
        {
            let mut from_sources = got.iter_mut();
            let mut from_scratch = scratch.iter_mut();
            let mut shards: Vec<(&mut [u8], bool)> = (0..g.width())
                .map(|q| {
                    if sources.contains(&q) {
                        let l = from_sources.next().expect("one lease per source");
                        (&mut l.as_mut_full()[..len], true)
                    } else {
                        (from_scratch.next().expect("scratch").as_mut_slice(), false)
                    }
                })
                .collect();
            ec.codec
                .reconstruct(stripe, &mut shards)
                .map_err(|_| unrecoverable(false))?;
            for (q, (bytes, _)) in shards.iter().enumerate() {
                if q as u32 == position {
                    rebuilt = Some(Bytes::copy_from_slice(bytes));
                }
            }
        }
        obj.dataset.reconstructions.fetch_add(1, Ordering::Relaxed);
        self.redundancy.device_reconstructions[s.device as usize].fetch_add(1, Ordering::Relaxed);
        rebuilt.ok_or_else(|| unrecoverable(false))
    }

    /// `read_window` for an `ec` dataset whose direct read failed: the
    /// window is assembled from whole stripes (rebuilt where needed) and
    /// verified again.
    pub(super) async fn read_window_degraded(
        &self,
        obj: &ObjectRef,
        ec: &EcDataset,
        w: ReadWindow,
    ) -> Result<Vec<Chunk>, StoreError> {
        let segs = self.object_segments(obj, w.start, w.device_len());
        let unit = ec.map.unit_bytes();
        let mut stripes: BTreeMap<u64, Arc<Vec<Bytes>>> = BTreeMap::new();
        let mut pieces: Vec<Bytes> = Vec::with_capacity(segs.len());
        for s in &segs {
            let (stripe, position) = ec.map.data_unit_of(s.logical);
            let data = match stripes.get(&stripe) {
                Some(d) => Arc::clone(d),
                None => {
                    let d = self.stripe_data(&obj.dataset, ec, stripe).await?;
                    stripes.insert(stripe, Arc::clone(&d));
                    d
                }
            };
            let at = (s.logical % unit) as usize;
            pieces.push(data[position as usize].slice(at..at + s.len as usize));
        }
        self.verified_parts(obj, w, pieces)
    }

    /// Stripes rebuilt, by device that lost a unit.
    pub fn device_reconstructions(&self) -> Vec<u64> {
        self.redundancy
            .device_reconstructions
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Devices missing now.
    pub fn missing_devices(&self) -> Vec<bool> {
        self.io.slots.missing()
    }
}

/// Turns an ingest's data-space bytes into encoded stripes; see the module
/// docs.
pub(super) struct EcWriter {
    dataset_id: u64,
    codec: Codec,
    geometry: EcGeometry,
    unit_bytes: usize,
    /// Stripe being filled.
    stripe: u64,
    /// Data bytes in it so far.
    fill: usize,
    data: Vec<BufLease>,
    /// Check values, `rows` per unit, stripe by stripe.
    pub unit_crcs: Vec<u32>,
    /// Checked rows per unit (`DatasetRecord::unit_rows`).
    pub rows: u32,
    pub writes: FuturesUnordered<WriteFuture>,
    depth_max: usize,
}

impl EcWriter {
    pub fn new(dataset_id: u64, geometry: EcGeometry, unit_bytes: u64, depth_max: usize) -> Self {
        Self {
            dataset_id,
            codec: Codec::new(geometry),
            geometry,
            unit_bytes: unit_bytes as usize,
            stripe: 0,
            fill: 0,
            data: Vec::with_capacity(geometry.k()),
            unit_crcs: Vec::new(),
            rows: (unit_bytes / crate::ec::UNIT_ROW_BYTES).max(1) as u32,
            writes: FuturesUnordered::new(),
            depth_max: depth_max.max(geometry.width() as usize),
        }
    }

    /// Stripes written (or being written) so far.
    pub fn stripes(&self) -> u64 {
        self.stripe
    }

    fn position(&self) -> u64 {
        self.stripe * (self.geometry.k() * self.unit_bytes) as u64 + self.fill as u64
    }

    async fn acquire(&mut self, pool: &Arc<BufferPool>) -> Result<BufLease, StoreError> {
        super::acquire_draining(&mut self.writes, pool, self.unit_bytes).await
    }

    /// Appends bytes at data-space offset `at` (at or after everything
    /// written so far; a gap is zero-filled).
    pub async fn write_at(
        &mut self,
        io: &WriteIo<'_>,
        map: &EcMap,
        at: u64,
        mut bytes: &[u8],
    ) -> Result<(), StoreError> {
        assert!(at >= self.position(), "ec writes go forward");
        while self.position() < at {
            let gap = (at - self.position()) as usize;
            self.put(io, map, &vec![0u8; gap.min(1 << 20)]).await?;
        }
        while !bytes.is_empty() {
            let n = self.put(io, map, bytes).await?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Copies as much of `bytes` as fits in the current unit; returns how
    /// much.
    async fn put(
        &mut self,
        io: &WriteIo<'_>,
        map: &EcMap,
        bytes: &[u8],
    ) -> Result<usize, StoreError> {
        let unit_index = self.fill / self.unit_bytes;
        if self.data.len() == unit_index {
            let l = self.acquire(io.pool).await?;
            self.data.push(l);
        }
        let within = self.fill % self.unit_bytes;
        let n = (self.unit_bytes - within).min(bytes.len());
        self.data[unit_index].as_mut_full()[within..within + n].copy_from_slice(&bytes[..n]);
        self.fill += n;
        if self.fill == self.geometry.k() * self.unit_bytes {
            self.seal(io, map).await?;
        }
        Ok(n)
    }

    /// Zero-fills to the next 4 KiB boundary (the end of an object).
    pub async fn pad_to_block(&mut self, io: &WriteIo<'_>, map: &EcMap) -> Result<(), StoreError> {
        let pad = (self.fill.next_multiple_of(BLOCK_BYTES as usize) - self.fill).min(4096);
        if pad > 0 {
            self.write_at(io, map, self.position(), &[0u8; 4096][..pad])
                .await?;
        }
        Ok(())
    }

    /// Encodes and writes the current stripe (zero-padded).
    async fn seal(&mut self, io: &WriteIo<'_>, map: &EcMap) -> Result<(), StoreError> {
        if self.fill == 0 {
            return Ok(());
        }
        let unit = self.unit_bytes;
        while self.data.len() < self.geometry.k() {
            let l = self.acquire(io.pool).await?;
            self.data.push(l);
        }
        // Zero what no object filled: the tail of the partly filled unit
        // and the untouched units after it.
        let total = self.geometry.k() * unit;
        let mut at = self.fill;
        while at < total {
            let (u, within) = (at / unit, at % unit);
            self.data[u].as_mut_full()[within..unit].fill(0);
            at += unit - within;
        }
        let mut parity = Vec::with_capacity(self.geometry.m());
        for _ in 0..self.geometry.m() {
            parity.push(self.acquire(io.pool).await?);
        }
        {
            let data: Vec<&[u8]> = self
                .data
                .iter_mut()
                .map(|l| {
                    l.set_len(unit);
                    l.as_slice()
                })
                .collect();
            let mut par: Vec<&mut [u8]> = parity
                .iter_mut()
                .map(|l| &mut l.as_mut_full()[..unit])
                .collect();
            self.codec.encode(&data, &mut par);
        }
        let stripe = self.stripe;
        let units: Vec<BufLease> = std::mem::take(&mut self.data)
            .into_iter()
            .chain(parity.into_iter().map(|mut l| {
                l.set_len(unit);
                l
            }))
            .collect();
        for (p, lease) in units.into_iter().enumerate() {
            self.unit_crcs.extend(unit_checks(
                self.dataset_id,
                stripe,
                p as u32,
                lease.as_slice(),
                self.rows as usize,
            ));
            let (device, offset) = map.unit_location(stripe, p as u32);
            super::push_write(
                &mut self.writes,
                self.depth_max,
                io.engine,
                device,
                offset,
                lease,
            )
            .await?;
        }
        self.stripe += 1;
        self.fill = 0;
        Ok(())
    }

    /// Seals the last stripe and waits for every write.
    pub async fn finish(&mut self, io: &WriteIo<'_>, map: &EcMap) -> Result<(), StoreError> {
        self.seal(io, map).await?;
        while let Some(r) = self.writes.next().await {
            r?;
        }
        Ok(())
    }
}
