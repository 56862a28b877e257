//! The store: ingest sessions that stripe objects onto the devices, and
//! verified reads of any byte range.
//!
//! **Ingest.** A session reserves logical space in large runs and carves each
//! object from it at 4 KiB alignment, so small objects pack densely and a
//! large one is one contiguous extent that stripes over every device. Bytes
//! are copied once, into an aligned pool buffer that covers up to the next
//! stripe-unit boundary; a full buffer is exactly one device write, and up to
//! `ingest_write_depth` writes are in flight. CRC-32s are computed per
//! 32 KiB checksum block as bytes arrive. Commit waits for every write,
//! fdatasyncs every device, and only then commits the catalog transaction
//! that makes the dataset visible. A session dropped for any other reason
//! (client gone, error) gives its space back once its in-flight writes have
//! completed, so a later ingest can never be overwritten by a stale write.
//!
//! **Read.** A range is widened to whole checksum blocks and cut into
//! windows of at most `message_bytes`. Each window becomes one device read
//! per stripe unit it touches, issued together; every block is verified
//! before any byte of it leaves, and the verified buffers are handed to tonic
//! as `Bytes` without a copy. Windows are pipelined (`read_ahead_bytes` per
//! stream), which keeps all devices busy on a sequential read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{Stream, TryFutureExt};
use storaged_proto::model::{RangeSpec, StorageClass};
use storaged_proto::{DatasetName, ObjectPath};

use crate::alloc::{BLOCK_BYTES, Extent, ExtentAllocator, coalesce, coalesce_in_order};
use crate::buf::{BufLease, BufferPool, ClassSpec};
use crate::catalog::{Catalog, DatasetRecord, ObjectRecord, ObjectSummary};
use crate::config::{StoreConfig, StoreLimits};
use crate::device::{CHECKSUM_BLOCK_BYTES, OpenedPool, PoolSpec, open_pool, pool_id_hex};
use crate::ec::{EcGeometry, EcMap};
use crate::engine::{self, EngineLimits, IoBackend};
use crate::error::{OpenError, StoreError};
use crate::layout::{Segment, StripeLayout};

/// Logical space an ingest takes from the allocator at a time.
const RESERVATION_BYTES: u64 = 64 << 20;

/// A committed dataset as readers see it. When deleted, its space returns
/// to the allocator only once the last reader has dropped its handle.
pub struct DatasetHandle {
    pub name: String,
    pub record: DatasetRecord,
    /// Layout and codec of an erasure-coded dataset.
    pub ec: Option<redundancy::EcDataset>,
    /// Reads served by rebuilding from parity (stripes rebuilt).
    pub reconstructions: std::sync::atomic::AtomicU64,
    space: Arc<discard::FreeSpace>,
    deleted: AtomicBool,
}

impl DatasetHandle {
    fn new(
        name: String,
        record: DatasetRecord,
        layout: StripeLayout,
        space: Arc<discard::FreeSpace>,
    ) -> Self {
        let ec = redundancy::EcDataset::for_record(&record, layout);
        Self {
            name,
            record,
            ec,
            reconstructions: Default::default(),
            space,
            deleted: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for DatasetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetHandle")
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for DatasetHandle {
    fn drop(&mut self) {
        if self.deleted.load(Ordering::SeqCst) {
            // No reader is left; the catalog no longer has the dataset.
            self.space.release(self.record.owned_extents(), &self.name);
        }
    }
}

/// An object resolved for reading.
#[derive(Debug)]
pub struct ObjectRef {
    pub dataset: Arc<DatasetHandle>,
    pub path: String,
    pub record: ObjectRecord,
}

/// Per-device capacity as `status` reports it.
#[derive(Debug, Clone)]
pub struct DeviceUsage {
    pub index: u32,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// Snapshot for the Status RPC.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub pool_id: String,
    pub engine: &'static str,
    pub stripe_unit_bytes: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub devices: Vec<DeviceUsage>,
    pub datasets: Vec<Arc<DatasetHandle>>,
    pub ingests_in_progress: usize,
}

/// Bytes served per read path, and payload bytes the server copied to
/// serve them (zero-copy paths keep the copied counters at 0).
#[derive(Debug, Default)]
pub struct ReadCounters {
    pub grpc_bytes_served: std::sync::atomic::AtomicU64,
    pub grpc_payload_bytes_copied: std::sync::atomic::AtomicU64,
    pub shm_bytes_served: std::sync::atomic::AtomicU64,
    pub shm_payload_bytes_copied: std::sync::atomic::AtomicU64,
    /// Device read pieces that joined a neighbour's read instead of being
    /// issued on their own (see `schedule`).
    pub device_reads_merged: std::sync::atomic::AtomicU64,
    /// Checksum blocks that failed verification on read (each one answered
    /// by a rebuild, a re-read, or DATA_LOSS; never served).
    pub checksum_mismatches: std::sync::atomic::AtomicU64,
}

/// One piece of a read: object offset and verified bytes.
pub type Chunk = (u64, Bytes);

/// The store; see the module docs.
pub struct Store {
    engine: Arc<dyn IoBackend>,
    /// The same engine, as the router that knows missing devices.
    slots: Arc<engine::route::DeviceSlots>,
    /// Units rebuilt from parity, by the device that lost them.
    device_reconstructions: Vec<std::sync::atomic::AtomicU64>,
    /// Recently rebuilt stripes (degraded reads of neighbours reuse them).
    stripe_cache: Mutex<redundancy::StripeCache>,
    pub scrub_counters: scrub::ScrubCounters,
    /// What `--fault-inject` injected so far (None without it).
    pub injected: Option<Arc<engine::fault::InjectedCounts>>,
    pool: Arc<BufferPool>,
    layout: StripeLayout,
    catalog: Catalog,
    /// The catalog's copy on the devices (root and manifests).
    pool_root: pool_root::PoolRoot,
    /// What start-up found on the devices (a rebuilt catalog, ...).
    pub recovery: pool_root::Recovery,
    alloc: Arc<Mutex<ExtentAllocator>>,
    /// Where freed space goes: discarded, then back to `alloc`.
    space: Arc<discard::FreeSpace>,
    datasets: RwLock<BTreeMap<String, Arc<DatasetHandle>>>,
    ingesting: Mutex<HashSet<String>>,
    /// What ingests in progress declared, per owner (tenant quotas).
    quota: quota::QuotaLedger,
    device_paths: RwLock<Vec<PathBuf>>,
    /// Devices whose superblock was rebuilt from its copy at start.
    pub superblocks_repaired: u32,
    /// A device replacement is running.
    replacing: AtomicBool,
    rebuild: Mutex<Option<replace::RebuildState>>,
    /// A superblock of this pool (template for replacement devices).
    superblock: crate::device::Superblock,
    engine_kind: engine::EngineKind,
    engine_limits: EngineLimits,
    /// What wraps the pool's write paths (see `hooks`).
    hooks: Arc<dyn hooks::IoHooks>,
    pool_id: [u8; 16],
    limits: StoreLimits,
    /// Reads into client regions in flight, at most what an engine accepts.
    foreign_reads: tokio::sync::Semaphore,
    pub read_counters: ReadCounters,
    pub read_ahead: readahead::ReadAhead,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("layout", &self.layout)
            .finish()
    }
}

/// Buffer classes for a pool of `total` bytes: a quarter in 64 KiB buffers
/// (4 KiB to 64 KiB sample reads), a quarter in 256 KiB, half in
/// stripe-unit buffers (streaming and ingest).
fn buffer_classes(total: u64, stripe_unit: u64) -> Vec<ClassSpec> {
    let mut v = vec![
        ClassSpec {
            buf_bytes: 64 << 10,
            count: (total / 4 / (64 << 10)).max(1) as usize,
        },
        ClassSpec {
            buf_bytes: stripe_unit as usize,
            count: (total / 2 / stripe_unit).max(8) as usize,
        },
    ];
    if stripe_unit > 256 << 10 {
        v.push(ClassSpec {
            buf_bytes: 256 << 10,
            count: (total / 4 / (256 << 10)).max(1) as usize,
        });
    }
    v
}

impl Store {
    /// Opens the devices, the engine and the catalog, and rebuilds the
    /// allocator from committed datasets.
    pub fn open(cfg: &StoreConfig) -> Result<Arc<Self>, OpenError> {
        Self::open_hooked(cfg, Arc::new(hooks::NoHooks))
    }

    /// As [`open`](Self::open), with a hook to wrap the pool's engine
    /// (tests inject faults this way).
    pub fn open_with(
        cfg: &StoreConfig,
        wrap: impl FnOnce(Arc<dyn IoBackend>) -> Arc<dyn IoBackend> + Send + 'static,
    ) -> Result<Arc<Self>, OpenError> {
        Self::open_hooked(cfg, Arc::new(hooks::WrapEngineOnce::new(wrap)))
    }

    /// As [`open`](Self::open), with every write path of the pool going
    /// through `hooks` (tests simulate power loss this way).
    pub fn open_hooked(
        cfg: &StoreConfig,
        hooks: Arc<dyn hooks::IoHooks>,
    ) -> Result<Arc<Self>, OpenError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| OpenError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let catalog_path = cfg.data_dir.join("catalog.redb");
        // Replaced devices are where `device replace` put them.
        let from_catalog = if catalog_path.exists() {
            match Catalog::device_overrides(&catalog_path) {
                Ok(v) => Some(v),
                // Dealt with once the devices are open (rebuilt from them).
                Err(e) if e.is_damage() => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        // Without a usable catalog, the devices' root says where replaced
        // devices are (and what replacement was under way).
        let (overrides, pending) = from_catalog.unwrap_or_else(|| {
            crate::poolmeta::peek_root(&cfg.devices)
                .map(|r| {
                    (
                        r.replaced
                            .into_iter()
                            .map(|(i, p)| (i, PathBuf::from(p)))
                            .collect(),
                        r.replacing,
                    )
                })
                .unwrap_or_default()
        });
        let pending = pending.and_then(|b| replace::ReplaceRecord::decode(&b));
        // Devices are found by their superblocks; a replaced one where
        // `device replace` put it, in preference to the old one.
        let mut replacements: Vec<(u32, PathBuf)> = Vec::new();
        for (i, p) in overrides
            .into_iter()
            .chain(pending.iter().map(|r| (r.index, r.new_path.clone())))
        {
            replacements.retain(|(j, _)| *j != i);
            replacements.push((i, p));
        }
        let OpenedPool {
            files,
            paths,
            layout,
            pool_id,
            formatted,
            mut missing,
            superblocks,
            superblocks_repaired,
        } = open_pool(&PoolSpec {
            devices: cfg.devices.clone(),
            replacements,
            create_size_bytes: Some(cfg.device_size_bytes),
            stripe_unit_bytes: cfg.stripe_unit_bytes,
            force: cfg.force,
        })?;
        if formatted && catalog_path.exists() && !cfg.force {
            // Blank devices next to a catalog: the catalog describes data that
            // is gone. Keeping it would serve garbage; erasing it silently
            // would hide the loss.
            return Err(OpenError::StaleCatalog(catalog_path));
        }
        let meta_devices = crate::poolmeta::MetaDevices {
            files: files
                .iter()
                .zip(&missing)
                .zip(&paths)
                .map(|((f, m), path)| match (m, f.try_clone()) {
                    (false, Ok(f)) => Some(hooks.meta_file(f, path)),
                    _ => None,
                })
                .collect(),
            layout,
        };
        let catalog_backend = hooks.catalog(&catalog_path);
        let catalog = match Catalog::open_on(
            &catalog_path,
            pool_id,
            formatted,
            catalog_backend.clone(),
        ) {
            Ok(c) => c,
            // A damaged catalog is set aside (never deleted) and rebuilt
            // from the devices, if they describe the pool.
            Err(e) if e.is_damage() && meta_devices.read_newest_root(pool_id).is_some() => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = cfg.data_dir.join(format!("catalog.redb.damaged-{stamp}"));
                std::fs::rename(&catalog_path, &aside).map_err(|source| OpenError::DataDir {
                    path: aside.clone(),
                    source,
                })?;
                tracing::error!(error = %e, moved_to = %aside.display(), "the catalog is damaged; rebuilding it from the devices");
                Catalog::open_on(&catalog_path, pool_id, false, catalog_backend)?
            }
            Err(e) => return Err(e.into()),
        };
        // The devices' root is the truth; a catalog behind it (lost,
        // damaged, restored) is brought up to it before anything uses it.
        let (root, mut recovery) = pool_root::reconcile(&catalog, &meta_devices, pool_id)?;
        let records = catalog.datasets()?;
        let mut used = Vec::new();
        for (_, r) in &records {
            used.extend(r.owned_extents());
        }
        let alloc = ExtentAllocator::new(layout.capacity_bytes(), &used).map_err(|source| {
            OpenError::Inconsistent {
                path: catalog_path.clone(),
                source,
            }
        })?;
        let alloc = Arc::new(Mutex::new(alloc));
        let (space, discard_worker) = discard::FreeSpace::new(Arc::clone(&alloc), cfg.discard);
        let space = Arc::new(space);
        let pool_root = pool_root::PoolRoot::new(meta_devices, root);
        pool_root.adopt(&catalog, &space, &mut recovery)?;
        // Everything format 2 promises is on the devices now.
        let mut superblocks = superblocks;
        crate::device::upgrade_superblocks(&files, &paths, &mut superblocks, &missing)?;
        let records = catalog.datasets()?;
        let datasets: BTreeMap<String, Arc<DatasetHandle>> = records
            .into_iter()
            .map(|(name, record)| {
                let h = Arc::new(DatasetHandle::new(
                    name.clone(),
                    record,
                    layout,
                    Arc::clone(&space),
                ));
                (name, h)
            })
            .collect();
        redundancy::check_degraded_start(&datasets, layout, &missing, &paths)?;
        let pool = BufferPool::new(buffer_classes(
            cfg.buffer_pool_bytes,
            layout.stripe_unit_bytes,
        ))
        .map_err(OpenError::Engine)?;
        let engine_limits = EngineLimits {
            queue_depth_per_device_max: cfg.queue_depth_per_device_max,
            psync_threads: (layout.device_count * 2).clamp(2, 16),
        };
        let engine = engine::build(cfg.engine, files, Arc::clone(&pool), engine_limits)
            .map_err(OpenError::Engine)?;
        let mut engine = hooks.engine(engine, &paths);
        let mut injected = None;
        if let Some(spec) = &cfg.fault_inject {
            let seeded = engine::fault::SeededBackend::new(engine, spec.clone());
            injected = Some(Arc::clone(&seeded.injected));
            engine = Arc::new(seeded);
        }
        // A replacement that did not finish: its device is not trusted
        // until `device replace` resumes and completes it.
        let rebuild = pending.as_ref().map(|r| {
            tracing::warn!(device = r.index, path = %r.new_path.display(), "a device replacement was interrupted; run storagectl device replace again to resume it");
            if let Some(m) = missing.get_mut(r.index as usize) {
                *m = true;
            }
            replace::RebuildState {
                index: r.index,
                new_path: r.new_path.clone(),
                running: false,
                ..Default::default()
            }
        });
        let superblock = superblocks
            .iter()
            .zip(&missing)
            .find(|(_, m)| !**m)
            .map(|(sb, _)| sb.clone())
            .unwrap_or_else(|| superblocks[0].clone());
        let slots = Arc::new(engine::route::DeviceSlots::new(engine, &missing));
        let engine: Arc<dyn IoBackend> = Arc::clone(&slots) as _;
        if let Some(worker) = discard_worker {
            worker
                .start(Arc::clone(&engine), layout)
                .map_err(OpenError::Engine)?;
        }
        for (i, m) in missing.iter().enumerate() {
            if *m {
                tracing::warn!(device = i, path = %paths[i].display(), "device missing: the pool is degraded");
            }
        }
        tracing::info!(
            pool = %pool_id_hex(&pool_id),
            engine = engine.kind(),
            devices = layout.device_count,
            capacity_bytes = layout.capacity_bytes(),
            "store open"
        );
        Ok(Arc::new(Self {
            engine,
            slots,
            device_reconstructions: (0..layout.device_count)
                .map(|_| Default::default())
                .collect(),
            stripe_cache: Mutex::new(redundancy::StripeCache::new(
                cfg.limits.degraded_cache_bytes_max,
            )),
            scrub_counters: Default::default(),
            injected,
            superblocks_repaired,
            replacing: AtomicBool::new(false),
            rebuild: Mutex::new(rebuild),
            superblock,
            engine_kind: cfg.engine,
            engine_limits,
            hooks,
            pool,
            layout,
            catalog,
            pool_root,
            recovery,
            alloc,
            space,
            datasets: RwLock::new(datasets),
            ingesting: Mutex::new(HashSet::new()),
            quota: quota::QuotaLedger::default(),
            device_paths: RwLock::new(paths),
            pool_id,
            limits: cfg.limits.clone(),
            foreign_reads: tokio::sync::Semaphore::new(engine::FOREIGN_READS_IN_FLIGHT_MAX),
            read_counters: ReadCounters::default(),
            // Never more than half the pool, whatever the limits say:
            // foreground reads need the rest.
            read_ahead: readahead::ReadAhead::new(
                cfg.limits
                    .hint_cache_bytes_max
                    .min(cfg.buffer_pool_bytes / 2),
                std::time::Duration::from_millis(cfg.limits.hint_ttl_ms),
            ),
        }))
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Registers a client region with the engine for reads where it can
    /// (see `RegionMap::fix_with`). Blocking.
    pub fn fix_region(&self, region: &crate::region::RegionMap) -> bool {
        region.fix_with(&*self.engine)
    }

    pub fn layout(&self) -> StripeLayout {
        self.layout
    }

    /// (bytes, datasets) committed by `owner`.
    pub fn owner_usage(&self, owner: &str) -> (u64, u64) {
        let datasets = self.datasets.read().expect("dataset map poisoned");
        datasets
            .values()
            .filter(|h| h.record.owner == owner)
            .fold((0, 0), |(b, n), h| (b + h.record.total_bytes, n + 1))
    }

    /// The class of an ingest that names none: `ec:(N-1)+1` on a pool of
    /// N >= 3 devices (one device may fail), else `stripe`.
    pub fn default_class(&self) -> StorageClass {
        let n = self.layout.device_count;
        if n >= 3 {
            StorageClass::Ec {
                data_units: (n - 1).min(u32::from(crate::ec::DATA_UNITS_MAX)) as u8,
                parity_units: 1,
            }
        } else {
            StorageClass::Stripe
        }
    }

    pub fn dataset(&self, name: &DatasetName) -> Result<Arc<DatasetHandle>, StoreError> {
        self.datasets
            .read()
            .expect("dataset map poisoned")
            .get(name.as_str())
            .cloned()
            .ok_or_else(|| StoreError::DatasetNotFound(name.to_string()))
    }

    pub fn list_datasets(&self) -> Vec<Arc<DatasetHandle>> {
        self.datasets
            .read()
            .expect("dataset map poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// One page of a dataset's objects. The page token is the last path of
    /// the previous page.
    pub fn list_objects(
        &self,
        name: &DatasetName,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ObjectSummary>, Option<String>), StoreError> {
        let ds = self.dataset(name)?;
        let page_size = match page_size {
            0 => self.limits.list_page_size_default,
            n if n > self.limits.list_page_size_max => {
                return Err(StoreError::InvalidArgument(format!(
                    "page_size {n} exceeds the limit of {}",
                    self.limits.list_page_size_max
                )));
            }
            n => n,
        };
        let after = (!page_token.is_empty()).then_some(page_token);
        let (objects, more) =
            self.catalog
                .list_objects(ds.record.id, prefix, after, page_size as usize)?;
        let next = if more {
            objects.last().map(|o| o.path.clone())
        } else {
            None
        };
        Ok((objects, next))
    }

    pub fn lookup(&self, name: &DatasetName, path: &ObjectPath) -> Result<ObjectRef, StoreError> {
        let ds = self.dataset(name)?;
        let record = self
            .catalog
            .get_object(ds.record.id, path.as_str())?
            .ok_or_else(|| StoreError::ObjectNotFound {
                dataset: name.to_string(),
                path: path.to_string(),
            })?;
        Ok(ObjectRef {
            dataset: ds,
            path: path.to_string(),
            record,
        })
    }

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
        let at = obj.record.logical_offset + start;
        match &obj.dataset.ec {
            None => self.layout.segments(at, len).collect(),
            Some(ec) => ec.map.segments(at, len).collect(),
        }
    }

    /// Device and device offset of object byte `offset`.
    fn locate(&self, obj: &ObjectRef, offset: u64) -> (u32, u64) {
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
    ) -> Result<(u64, u64), StoreError> {
        let size = obj.record.size;
        if offset > size {
            return Err(StoreError::OutOfRange {
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
                return Err(StoreError::OutOfRange {
                    path: obj.path.clone(),
                    offset,
                    length,
                    size,
                });
            }
        };
        Ok((offset, len))
    }

    /// Windows `(window_start, window_end)` of object bytes that cover
    /// `[start, start + len)`, aligned to checksum blocks.
    fn windows(
        &self,
        obj: &ObjectRef,
        start: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64)> + use<> {
        let block = u64::from(obj.dataset.record.checksum_block_bytes);
        let size = obj.record.size;
        let end = start + len;
        let step = self.limits.message_bytes;
        let mut at = start / block * block;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let w_end = (at + step).min(end.next_multiple_of(block)).min(size);
            let w = (at, w_end);
            at = w_end;
            Some(w)
        })
    }

    /// Reads object bytes `[w_start, w_end)` (block aligned at the start),
    /// verifies every checksum block, and returns the parts that intersect
    /// `[want_start, want_end)`.
    async fn read_window(
        &self,
        obj: &ObjectRef,
        w_start: u64,
        w_end: u64,
        want_start: u64,
        want_end: u64,
    ) -> Result<Vec<Chunk>, StoreError> {
        let block = u64::from(obj.dataset.record.checksum_block_bytes);
        debug_assert_eq!(w_start % block, 0);
        let (lo, hi) = (w_start.max(want_start), w_end.min(want_end));
        if let Some(chunks) = self.read_ahead_hit(obj, lo, hi).await {
            return Ok(chunks);
        }
        if let Some(ec) = &obj.dataset.ec
            && self.slots.any_missing()
        {
            let missing = self.slots.missing();
            let dev_len = (w_end - w_start).next_multiple_of(BLOCK_BYTES);
            let segs = self.object_segments(obj, w_start, dev_len);
            // A known-missing device: no point trying it first. A
            // large window whose stripes lost a unit anywhere joins the
            // whole-stripe rebuild its neighbours share, rather than
            // reading its units a second time.
            let large = (w_end - w_start) * 2 >= ec.map.unit_bytes();
            let g = ec.map.geometry;
            if segs.iter().any(|s| {
                missing[s.device as usize]
                    || (large && {
                        let (stripe, _) = ec.map.data_unit_of(s.logical);
                        (0..g.width()).any(|p| missing[ec.map.unit_location(stripe, p).0 as usize])
                    })
            }) {
                // Not charged to the call's budget: see `Budget::exempt`.
                return crate::budget::Budget::exempt(self.read_window_rebuilt(
                    obj,
                    ec,
                    (w_start, w_end),
                    (want_start, want_end),
                    &missing,
                ))
                .await;
            }
        }
        match self
            .read_window_healthy(obj, w_start, w_end, want_start, want_end)
            .await
        {
            Err(e) if obj.dataset.ec.is_some() && e.is_device_fault() => {
                tracing::debug!(dataset = %obj.dataset.name, path = %obj.path, error = %e, "rebuilding from parity");
                let ec = obj.dataset.ec.as_ref().expect("checked");
                let missing = self.slots.missing();
                crate::budget::Budget::exempt(self.read_window_rebuilt(
                    obj,
                    ec,
                    (w_start, w_end),
                    (want_start, want_end),
                    &missing,
                ))
                .await
            }
            r => r,
        }
    }

    /// An `ec` window that cannot be read directly. Windows of half a unit
    /// or more (streaming) are served from whole rebuilt stripes, which
    /// their neighbours share (no more bytes read than a healthy read);
    /// smaller ones (samples) rebuild just their byte range, falling back to
    /// whole stripes if that does not verify.
    async fn read_window_rebuilt(
        &self,
        obj: &ObjectRef,
        ec: &redundancy::EcDataset,
        (w_start, w_end): (u64, u64),
        (want_start, want_end): (u64, u64),
        missing: &[bool],
    ) -> Result<Vec<Chunk>, StoreError> {
        if (w_end - w_start) * 2 < ec.map.unit_bytes() {
            match self
                .read_window_partial(obj, w_start, w_end, want_start, want_end, missing)
                .await
            {
                Ok(chunks) => return Ok(chunks),
                Err(e) => {
                    tracing::debug!(error = %e, "range rebuild did not verify; rebuilding whole stripes");
                }
            }
        }
        self.read_window_degraded(obj, w_start, w_end, want_start, want_end)
            .await
    }

    /// [`read_window`](Self::read_window) from the units themselves.
    async fn read_window_healthy(
        &self,
        obj: &ObjectRef,
        w_start: u64,
        w_end: u64,
        want_start: u64,
        want_end: u64,
    ) -> Result<Vec<Chunk>, StoreError> {
        let dev_len = (w_end - w_start).next_multiple_of(BLOCK_BYTES);
        let segs = self.object_segments(obj, w_start, dev_len);
        let longest = segs.iter().map(|s| s.len).max().unwrap_or(0) as usize;
        let leases = self
            .pool
            .acquire_many(longest, segs.len())
            .await
            .map_err(|e| StoreError::Limit(e.to_string()))?;
        let reads = segs.iter().zip(leases).map(|(s, lease)| {
            engine::read_exact(
                &*self.engine,
                s.device,
                s.device_offset,
                s.len as usize,
                lease,
            )
            .map_err(move |e| StoreError::from_io(s.device, s.device_offset, e))
        });
        let bufs: Vec<BufLease> = futures::future::try_join_all(reads).await?;
        let pieces = bufs.into_iter().map(BufLease::into_bytes).collect();
        self.verified_parts(obj, (w_start, w_end), (want_start, want_end), pieces)
    }

    /// Verifies window `[w_start, w_end)` of `obj`, whose bytes are
    /// `pieces` back to back, and hands out the parts in `[want_start,
    /// want_end)` without copying.
    fn verified_parts(
        &self,
        obj: &ObjectRef,
        (w_start, w_end): (u64, u64),
        (want_start, want_end): (u64, u64),
        pieces: Vec<Bytes>,
    ) -> Result<Vec<Chunk>, StoreError> {
        let views: Vec<&[u8]> = pieces.iter().map(|b| b.as_ref()).collect();
        self.verify_window(obj, w_start, w_end, &views)?;
        Ok(wanted_parts(
            pieces.into_iter(),
            w_start,
            w_end,
            want_start,
            want_end,
        ))
    }

    /// Checks every checksum block of object bytes `[w_start, w_end)`
    /// (`w_start` block aligned), which lie in `pieces` back to back (a
    /// block may straddle two pieces). A mismatch is `DATA_LOSS` naming the
    /// object offset and the device address of the bad block.
    fn verify_window(
        &self,
        obj: &ObjectRef,
        w_start: u64,
        w_end: u64,
        pieces: &[&[u8]],
    ) -> Result<(), StoreError> {
        let block = u64::from(obj.dataset.record.checksum_block_bytes);
        debug_assert_eq!(w_start % block, 0);
        let mut piece_i = 0usize;
        let mut piece_pos = 0u64; // window offset where pieces[piece_i] starts
        let mut b = w_start;
        while b < w_end {
            let b_end = (b + block).min(obj.record.size);
            let idx = (b / block) as usize;
            let expected = *obj.record.block_crcs.get(idx).ok_or_else(|| {
                StoreError::Catalog(crate::catalog::CatalogError::Corrupt(
                    format!("object {}", obj.path),
                    format!("no checksum for block {idx}"),
                ))
            })?;
            let mut h = crc32fast::Hasher::new();
            let mut at = b - w_start;
            let stop = b_end - w_start;
            while at < stop {
                while at >= piece_pos + pieces[piece_i].len() as u64 {
                    piece_pos += pieces[piece_i].len() as u64;
                    piece_i += 1;
                }
                let piece = pieces[piece_i];
                let in_piece = (at - piece_pos) as usize;
                let take = ((piece_pos + piece.len() as u64).min(stop) - at) as usize;
                h.update(&piece[in_piece..in_piece + take]);
                at += take as u64;
            }
            let actual = h.finalize();
            if actual != expected {
                self.read_counters
                    .checksum_mismatches
                    .fetch_add(1, Ordering::Relaxed);
                let (device, device_offset) = self.locate(obj, b);
                return Err(StoreError::Checksum {
                    dataset: obj.dataset.name.clone(),
                    path: obj.path.clone(),
                    object_offset: b,
                    device,
                    device_offset,
                    expected,
                    actual,
                });
            }
            b = b_end;
        }
        Ok(())
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
        let windows = self.windows(&obj, start, len).map(move |(ws, we)| {
            let store = Arc::clone(&store);
            let obj = Arc::clone(&obj);
            async move { store.read_window(&obj, ws, we, start, start + len).await }
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
    fn resolve_batch(
        self: &Arc<Self>,
        dataset: &DatasetName,
        items: Vec<Result<RangeSpec, StoreError>>,
    ) -> Result<LazyPlans, StoreError> {
        if items.len() > self.limits.batch_items_max {
            return Err(StoreError::Limit(format!(
                "{} items in one ReadBatch; the limit is {}",
                items.len(),
                self.limits.batch_items_max
            )));
        }
        Ok(LazyPlans {
            store: Arc::clone(self),
            dataset: self.dataset(dataset)?,
            items: items.into_iter().enumerate(),
            ready: std::collections::VecDeque::new(),
        })
    }

    /// Plans of `chunk`, items of dataset `ds` with their indices.
    fn resolve_chunk(
        &self,
        ds: &Arc<DatasetHandle>,
        chunk: Vec<(usize, Result<RangeSpec, StoreError>)>,
    ) -> std::collections::VecDeque<BatchItemPlan> {
        let paths: Vec<&str> = chunk
            .iter()
            .filter_map(|(_, i)| i.as_ref().ok().map(|r| r.path.as_str()))
            .collect();
        let mut records = match self.catalog.get_objects(ds.record.id, &paths) {
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
                            }),
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
                    StoreError::ObjectNotFound {
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
        items: Vec<Result<RangeSpec, StoreError>>,
        in_flight: u32,
    ) -> Result<impl Stream<Item = BatchEvent> + Send + 'static, StoreError> {
        let plans = self.resolve_batch(dataset, items)?;
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
                    let windows: Vec<(u64, u64)> = planner.windows(&obj, start, len).collect();
                    let last = windows.len() - 1;
                    windows
                        .into_iter()
                        .enumerate()
                        .map(|(k, (ws, we))| BatchTask::Window {
                            index,
                            obj: Arc::clone(&obj),
                            ws,
                            we,
                            start,
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
                        ws,
                        we,
                        start,
                        len,
                        last,
                    } => BatchEvent::from_read(
                        index,
                        len,
                        last,
                        store.read_window(&obj, ws, we, start, start + len).await,
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
        items: Vec<Result<RangeSpec, StoreError>>,
        in_flight: u32,
    ) -> Result<impl Stream<Item = BatchEvent> + Send + 'static, StoreError> {
        let plans = self.resolve_batch(dataset, items)?;
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
                            error: StoreError::Limit(format!(
                                "item of {len} bytes exceeds {item_max} bytes for any-order batches; read it in order"
                            )),
                        }]
                    }
                    BatchItemPlan::Read {
                        index,
                        obj,
                        start,
                        len,
                    } => BatchEvent::from_read(index, len, true, store.read_whole(&obj, start, len).await),
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
    async fn read_whole(
        &self,
        obj: &ObjectRef,
        start: u64,
        len: u64,
    ) -> Result<Vec<Chunk>, StoreError> {
        let windows: Vec<(u64, u64)> = self.windows(obj, start, len).collect();
        if let [(ws, we)] = windows[..] {
            return self.read_window(obj, ws, we, start, start + len).await;
        }
        // The copy counts against the caller's budget for as long as any
        // message of it lives (see `budget::HeapCopy`).
        let charge = crate::budget::Budget::charge_heap_current(len as usize).await;
        let mut buf = Vec::with_capacity(len as usize);
        for (ws, we) in windows {
            for (_, b) in self.read_window(obj, ws, we, start, start + len).await? {
                buf.extend_from_slice(&b);
            }
        }
        self.read_counters
            .grpc_payload_bytes_copied
            .fetch_add(len, Ordering::Relaxed);
        let all = bytes::Bytes::from_owner(crate::budget::HeapCopy { data: buf, charge });
        let step = self.limits.message_bytes as usize;
        Ok((0..all.len())
            .step_by(step)
            .map(|at| (start + at as u64, all.slice(at..(at + step).min(all.len()))))
            .collect())
    }

    /// Starts an ingest of a new dataset `name`.
    pub fn begin_ingest(
        self: &Arc<Self>,
        name: DatasetName,
        class: StorageClass,
        owner: quota::OwnerQuota,
    ) -> Result<IngestSession, StoreError> {
        let missing = self.missing_devices();
        if missing.iter().any(|m| *m) {
            let gone: Vec<usize> = (0..missing.len()).filter(|d| missing[*d]).collect();
            return Err(StoreError::Degraded(format!(
                "device(s) {gone:?} missing; new data would have no redundancy"
            )));
        }
        let geometry = match class {
            StorageClass::Stripe => None,
            StorageClass::Ec {
                data_units,
                parity_units,
            } => {
                let g = EcGeometry::new(u32::from(data_units), u32::from(parity_units))
                    .and_then(|g| g.check_fits(self.layout.device_count).map(|()| g))
                    .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
                Some(g)
            }
        };
        if self
            .datasets
            .read()
            .expect("dataset map poisoned")
            .contains_key(name.as_str())
        {
            return Err(StoreError::DatasetExists(name.to_string()));
        }
        {
            let mut ing = self.ingesting.lock().expect("ingest set poisoned");
            if ing.contains(name.as_str()) {
                return Err(StoreError::IngestInProgress(name.to_string()));
            }
            if ing.len() >= self.limits.ingests_concurrent_max {
                return Err(StoreError::Limit(format!(
                    "{} ingests are already running",
                    ing.len()
                )));
            }
            let (_, datasets) = self.owner_usage(&owner.owner);
            self.quota.begin_dataset(&owner, datasets)?;
            ing.insert(name.to_string());
        }
        let ec = match geometry {
            None => None,
            Some(geometry) => {
                let dataset_id = match self.catalog.reserve_dataset_id() {
                    Ok(id) => id,
                    Err(e) => {
                        self.ingesting
                            .lock()
                            .expect("ingest set poisoned")
                            .remove(name.as_str());
                        self.quota.end_dataset(&owner.owner, 0);
                        return Err(e.into());
                    }
                };
                Some(EcIngest {
                    map: EcMap::new(geometry, self.layout, &[]),
                    writer: redundancy::EcWriter::new(
                        dataset_id,
                        geometry,
                        self.layout.stripe_unit_bytes,
                        self.limits.ingest_write_depth,
                    ),
                    data_end: 0,
                    dataset_id,
                })
            }
        };
        let owner_bytes = self.owner_usage(&owner.owner).0;
        Ok(IngestSession {
            ec,
            store: Arc::clone(self),
            name,
            class,
            owner,
            owner_bytes,
            declared_bytes: 0,
            objects: Vec::new(),
            paths: HashSet::new(),
            dirs: HashMap::new(),
            extents: Vec::new(),
            reservation: None,
            current: None,
            writer: StripeWriter::new(self.layout, self.limits.ingest_write_depth),
            total_bytes: 0,
            committed: false,
        })
    }

    /// Deletes a dataset; its space is freed once no reader holds it.
    /// Returns the bytes freed.
    pub async fn delete(self: &Arc<Self>, name: &DatasetName) -> Result<u64, StoreError> {
        let store = Arc::clone(self);
        let n = name.to_string();
        let record =
            tokio::task::spawn_blocking(move || store.pool_root.delete(&store.catalog, &n))
                .await
                .map_err(|e| StoreError::InvalidArgument(format!("delete task failed: {e}")))??
                .ok_or_else(|| StoreError::DatasetNotFound(name.to_string()))?;
        let handle = self
            .datasets
            .write()
            .expect("dataset map poisoned")
            .remove(name.as_str());
        if let Some(h) = handle {
            h.deleted.store(true, Ordering::SeqCst);
        }
        // What it frees: its data and its manifest rows.
        Ok(record.owned_extents().iter().map(|e| e.len).sum())
    }

    /// What the discard thread has done (and whether discards are on).
    pub fn discard_counters(&self) -> &discard::DiscardCounters {
        &self.space.counters
    }

    /// The generation of the pool root on the devices now.
    pub fn pool_root_generation(&self) -> u64 {
        self.pool_root.generation()
    }

    /// Why the catalog is failing, while it is.
    pub fn catalog_fault(&self) -> Option<String> {
        self.catalog.health()
    }

    pub fn status(&self) -> StoreStatus {
        let alloc = self.alloc.lock().expect("allocator poisoned");
        let n = self.layout.device_count as usize;
        let mut free_per_device = vec![0u64; n];
        for e in alloc.free_extents() {
            self.layout
                .bytes_per_device(e.offset, e.len, &mut free_per_device);
        }
        // Freed space waiting for its discard (and the start-up pass's
        // piece) belongs to nobody: reported free, though the allocator
        // hands it out only after the discard. Read under the allocator's
        // lock, which every change to it holds too.
        let mut held_bytes = 0;
        for e in self.space.held_extents() {
            held_bytes += e.len;
            self.layout
                .bytes_per_device(e.offset, e.len, &mut free_per_device);
        }
        let devices = (0..n)
            .map(|i| DeviceUsage {
                index: i as u32,
                path: self.device_paths.read().expect("paths poisoned")[i].clone(),
                capacity_bytes: self.layout.device_data_bytes,
                used_bytes: self.layout.device_data_bytes - free_per_device[i],
            })
            .collect();
        StoreStatus {
            pool_id: pool_id_hex(&self.pool_id),
            engine: self.engine.kind(),
            stripe_unit_bytes: self.layout.stripe_unit_bytes,
            capacity_bytes: alloc.capacity_bytes(),
            used_bytes: alloc.used_bytes() - held_bytes,
            devices,
            datasets: self.list_datasets(),
            ingests_in_progress: self.ingesting.lock().expect("poisoned").len(),
        }
    }

    async fn sync_all(self: &Arc<Self>) -> Result<(), StoreError> {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            for d in 0..store.layout.device_count {
                store
                    .engine
                    .sync(d)
                    .map_err(|source| StoreError::Sync { device: d, source })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::InvalidArgument(format!("sync task failed: {e}")))?
    }
}

/// A batch item after validation and lookup.
/// A batch's plans, resolved a chunk at a time (see `resolve_batch`).
struct LazyPlans {
    store: Arc<Store>,
    dataset: Arc<DatasetHandle>,
    items: std::iter::Enumerate<std::vec::IntoIter<Result<RangeSpec, StoreError>>>,
    ready: std::collections::VecDeque<BatchItemPlan>,
}

/// Items resolved against the catalog at once by a lazy batch plan.
const PLAN_CHUNK_ITEMS: usize = 256;

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

enum BatchItemPlan {
    Fail(u32, StoreError),
    Empty(u32, u64),
    Read {
        index: u32,
        obj: Arc<ObjectRef>,
        start: u64,
        len: u64,
    },
}

enum BatchTask {
    Fail(u32, StoreError),
    Empty(u32, u64),
    Window {
        index: u32,
        obj: Arc<ObjectRef>,
        ws: u64,
        we: u64,
        start: u64,
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
        data: Bytes,
        item_length: u64,
        last: bool,
    },
    Error {
        index: u32,
        error: StoreError,
    },
}

impl BatchEvent {
    fn empty(index: u32, offset: u64) -> Self {
        BatchEvent::Data {
            index,
            offset,
            data: Bytes::new(),
            item_length: 0,
            last: true,
        }
    }

    /// Events for one read of item `index` (`item_length` bytes in all);
    /// `final_read` says whether it holds the item's last bytes.
    fn from_read(
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
            Err(error) => vec![BatchEvent::Error { index, error }],
        }
    }

    /// Payload bytes of a group of events (for the reorder buffer, whose
    /// weigh function takes `&T` with `T = Vec<BatchEvent>`).
    #[allow(clippy::ptr_arg)]
    fn weigh(events: &Vec<BatchEvent>) -> u64 {
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

pub(crate) type WriteFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// The parts of verified window pieces (object bytes from `w_start`, back
/// to back) that fall in `[want_start, want_end)`, as zero-copy slices.
fn wanted_parts(
    pieces: impl Iterator<Item = Bytes>,
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

/// Queues the write of `lease` at `offset` of `device`, then waits while
/// `depth_max` or more writes are in flight.
pub(crate) async fn push_write(
    writes: &mut FuturesUnordered<WriteFuture>,
    depth_max: usize,
    engine: &Arc<dyn IoBackend>,
    device: u32,
    offset: u64,
    lease: BufLease,
) -> Result<(), StoreError> {
    let engine = Arc::clone(engine);
    writes.push(Box::pin(async move {
        engine::write_all(&*engine, device, offset, lease)
            .await
            .map(drop)
            .map_err(|e| StoreError::from_io(device, offset, e))
    }));
    while writes.len() >= depth_max {
        if let Some(r) = writes.next().await {
            r?;
        }
    }
    Ok(())
}

/// A pool buffer of `len` bytes for an ingest. Completed writes hold
/// buffers until polled, so they are drained while waiting for a free one.
pub(crate) async fn acquire_draining(
    writes: &mut FuturesUnordered<WriteFuture>,
    pool: &Arc<BufferPool>,
    len: usize,
) -> Result<BufLease, StoreError> {
    loop {
        tokio::select! {
            biased;
            Some(r) = writes.next(), if !writes.is_empty() => r?,
            lease = pool.acquire(len) => {
                return lease.map_err(|e| StoreError::Limit(e.to_string()));
            }
        }
    }
}

/// Turns sequential logical writes into stripe-unit-sized device writes.
struct StripeWriter {
    layout: StripeLayout,
    depth_max: usize,
    stage: Option<BufLease>,
    stage_logical: u64,
    stage_fill: usize,
    writes: FuturesUnordered<WriteFuture>,
}

impl StripeWriter {
    fn new(layout: StripeLayout, depth_max: usize) -> Self {
        Self {
            layout,
            depth_max: depth_max.max(1),
            stage: None,
            stage_logical: 0,
            stage_fill: 0,
            writes: FuturesUnordered::new(),
        }
    }

    fn stage_end(&self) -> u64 {
        self.stage_logical + self.stage_fill as u64
    }

    fn unit_end(&self, at: u64) -> u64 {
        (at / self.layout.stripe_unit_bytes + 1) * self.layout.stripe_unit_bytes
    }

    async fn acquire(&mut self, pool: &Arc<BufferPool>) -> Result<BufLease, StoreError> {
        acquire_draining(
            &mut self.writes,
            pool,
            self.layout.stripe_unit_bytes as usize,
        )
        .await
    }

    async fn write_at(
        &mut self,
        store: &Arc<Store>,
        mut logical: u64,
        mut data: &[u8],
    ) -> Result<(), StoreError> {
        while !data.is_empty() {
            if self.stage.is_some() && logical != self.stage_end() {
                self.flush(store).await?;
            }
            if self.stage.is_none() {
                assert_eq!(logical % BLOCK_BYTES, 0, "stages start 4 KiB aligned");
                self.stage = Some(self.acquire(&store.pool).await?);
                self.stage_logical = logical;
                self.stage_fill = 0;
            }
            let room = (self.unit_end(self.stage_logical) - self.stage_end()) as usize;
            let n = room.min(data.len());
            let fill = self.stage_fill;
            let stage = self.stage.as_mut().expect("staged");
            stage.as_mut_full()[fill..fill + n].copy_from_slice(&data[..n]);
            self.stage_fill += n;
            logical += n as u64;
            data = &data[n..];
            if self.stage_end() == self.unit_end(self.stage_logical) {
                self.flush(store).await?;
            }
        }
        Ok(())
    }

    /// Zero-fills the stage to the next 4 KiB boundary (end of an object).
    async fn pad_to_block(&mut self, store: &Arc<Store>) -> Result<(), StoreError> {
        let Some(stage) = self.stage.as_mut() else {
            return Ok(());
        };
        let padded = self.stage_fill.next_multiple_of(BLOCK_BYTES as usize);
        stage.as_mut_full()[self.stage_fill..padded].fill(0);
        self.stage_fill = padded;
        if self.stage_end() == self.unit_end(self.stage_logical) {
            self.flush(store).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, store: &Arc<Store>) -> Result<(), StoreError> {
        let Some(mut stage) = self.stage.take() else {
            return Ok(());
        };
        let padded = self.stage_fill.next_multiple_of(BLOCK_BYTES as usize);
        stage.as_mut_full()[self.stage_fill..padded].fill(0);
        stage.set_len(padded);
        let (device, offset) = self.layout.map(self.stage_logical);
        debug_assert!(self.stage_logical + padded as u64 <= self.unit_end(self.stage_logical));
        push_write(
            &mut self.writes,
            self.depth_max,
            &store.engine,
            device,
            offset,
            stage,
        )
        .await?;
        Ok(())
    }

    async fn finish(&mut self, store: &Arc<Store>) -> Result<(), StoreError> {
        self.flush(store).await?;
        while let Some(r) = self.writes.next().await {
            r?;
        }
        Ok(())
    }
}

struct CurrentObject {
    path: String,
    size: u64,
    received: u64,
    logical_offset: u64,
    client_crc: Option<u32>,
    block: crc32fast::Hasher,
    block_fill: u64,
    block_crcs: Vec<u32>,
    whole: crc32fast::Hasher,
}

/// The erasure-coding side of an ingest.
struct EcIngest {
    map: EcMap,
    writer: redundancy::EcWriter,
    /// End of the data space carved so far.
    data_end: u64,
    dataset_id: u64,
}

/// An ingest in progress; see the module docs. Dropping it without
/// [`commit`](Self::commit) discards everything.
pub struct IngestSession {
    /// Set for an erasure-coded dataset: its rows are `extents`, in data
    /// order, and bytes go through its writer instead of `writer`.
    ec: Option<EcIngest>,
    store: Arc<Store>,
    name: DatasetName,
    class: StorageClass,
    /// Who creates it, and the quota its declared sizes count against.
    owner: quota::OwnerQuota,
    /// The owner's committed bytes when the ingest began.
    owner_bytes: u64,
    /// Object sizes declared so far (counted in the quota ledger).
    declared_bytes: u64,
    objects: Vec<(String, ObjectRecord)>,
    paths: HashSet<String>,
    /// Directories the paths so far imply, each with one entry under it
    /// (for the message when an object takes a directory's name).
    dirs: HashMap<String, String>,
    extents: Vec<Extent>,
    reservation: Option<Extent>,
    current: Option<CurrentObject>,
    writer: StripeWriter,
    total_bytes: u64,
    committed: bool,
}

impl std::fmt::Debug for IngestSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestSession")
            .field("name", &self.name)
            .finish()
    }
}

impl IngestSession {
    pub fn dataset(&self) -> &DatasetName {
        &self.name
    }

    /// Data-space room for `len` bytes of an `ec` dataset, taking more
    /// whole rows when the current ones are full.
    fn carve_ec(&mut self, len: u64) -> Result<u64, StoreError> {
        let len = len.next_multiple_of(BLOCK_BYTES);
        let layout = self.store.layout;
        let row = layout.stripe_unit_bytes * u64::from(layout.device_count);
        let ec = self.ec.as_mut().expect("an ec ingest");
        let g = ec.map.geometry;
        while ec.data_end + len > ec.map.data_capacity_bytes() {
            let short = ec.data_end + len - ec.map.data_capacity_bytes();
            // Rows holding `short` data bytes, plus one for the stripe
            // that straddles the last row.
            let rows = (short * u64::from(g.width())).div_ceil(g.k() as u64 * row) + 1;
            let got = self
                .store
                .space
                .allocate(|alloc| {
                    alloc
                        .allocate_aligned(
                            (rows * row).max(RESERVATION_BYTES.next_multiple_of(row)),
                            row,
                        )
                        .or_else(|| alloc.allocate_aligned(rows * row, row))
                })
                .map_err(|room| StoreError::NoSpace {
                    needed: rows * row,
                    free: room.free_bytes,
                    largest_free: room.largest_free_bytes,
                })?;
            self.extents.push(got);
            ec.map = EcMap::new(g, layout, &self.extents);
        }
        let at = ec.data_end;
        ec.data_end += len;
        Ok(at)
    }

    fn carve(&mut self, len: u64) -> Result<u64, StoreError> {
        if self.ec.is_some() {
            return self.carve_ec(len);
        }
        let len = len.next_multiple_of(BLOCK_BYTES);
        if let Some(r) = self.reservation.as_mut().filter(|r| r.len >= len) {
            let at = r.offset;
            r.offset += len;
            r.len -= len;
            self.extents.push(Extent { offset: at, len });
            return Ok(at);
        }
        if let Some(r) = self.reservation.take() {
            self.store
                .alloc
                .lock()
                .expect("allocator poisoned")
                .release(r)
                .expect("reservation is ours");
        }
        let got = self
            .store
            .space
            .allocate(|alloc| {
                alloc
                    .allocate(len.max(RESERVATION_BYTES))
                    .or_else(|| alloc.allocate(len))
            })
            .map_err(|room| StoreError::NoSpace {
                needed: len,
                free: room.free_bytes,
                largest_free: room.largest_free_bytes,
            })?;
        self.extents.push(Extent {
            offset: got.offset,
            len,
        });
        self.reservation = Some(Extent {
            offset: got.offset + len,
            len: got.len - len,
        });
        Ok(got.offset)
    }

    /// Refuses `path` if it would make a name both an object and a
    /// directory (`a` and `a/b`): no file tree (export, mount) can hold
    /// both. Records `path`'s directories otherwise.
    fn check_tree(&mut self, path: &str) -> Result<(), StoreError> {
        let conflict = |other: &str| {
            StoreError::InvalidArgument(format!(
                "object {path:?} conflicts with {other:?} in dataset {:?}: a name cannot be both an object and a directory",
                self.name.as_str()
            ))
        };
        if let Some(under) = self.dirs.get(path) {
            return Err(conflict(&format!("{path}/{under}")));
        }
        let mut dirs = Vec::new();
        for (i, _) in path.match_indices('/') {
            let dir = &path[..i];
            if self.paths.contains(dir) {
                return Err(conflict(dir));
            }
            dirs.push(i);
        }
        for i in dirs {
            self.dirs
                .entry(path[..i].to_owned())
                .or_insert_with(|| path[i + 1..].to_owned());
        }
        Ok(())
    }

    /// Starts the next object. Its `size` bytes must follow in `data` calls.
    pub async fn begin_object(
        &mut self,
        path: ObjectPath,
        size: u64,
        client_crc: Option<u32>,
    ) -> Result<(), StoreError> {
        if let Some(cur) = &self.current {
            return Err(StoreError::Protocol(format!(
                "object {:?} got {} of {} bytes before the next object began",
                cur.path, cur.received, cur.size
            )));
        }
        if self.objects.len() >= self.store.limits.ingest_objects_max {
            return Err(StoreError::Limit(format!(
                "a dataset holds at most {} objects",
                self.store.limits.ingest_objects_max
            )));
        }
        let capacity = self.store.layout.capacity_bytes();
        if size > capacity {
            // Checked before any arithmetic on `size`: a hostile header must
            // not overflow the rounding or size a huge checksum vector.
            return Err(StoreError::NoSpace {
                needed: size,
                free: self
                    .store
                    .alloc
                    .lock()
                    .expect("allocator poisoned")
                    .free_bytes(),
                largest_free: capacity,
            });
        }
        // Before any byte of it is written (and before the tree check,
        // so a refused object leaves no trace): a tenant over its quota
        // fails here.
        self.store
            .quota
            .add_bytes(&self.owner, self.owner_bytes, size)?;
        self.declared_bytes += size;
        if self.paths.contains(path.as_str()) {
            return Err(StoreError::DuplicateObject {
                dataset: self.name.to_string(),
                path: path.to_string(),
            });
        }
        self.check_tree(path.as_str())?;
        self.paths.insert(path.to_string());
        let logical_offset = if size == 0 { 0 } else { self.carve(size)? };
        self.current = Some(CurrentObject {
            path: path.to_string(),
            size,
            received: 0,
            logical_offset,
            client_crc,
            block: crc32fast::Hasher::new(),
            block_fill: 0,
            block_crcs: Vec::with_capacity(size.div_ceil(u64::from(CHECKSUM_BLOCK_BYTES)) as usize),
            whole: crc32fast::Hasher::new(),
        });
        if size == 0 {
            self.end_object().await?;
        }
        Ok(())
    }

    /// Appends bytes to the current object.
    pub async fn data(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(StoreError::Protocol(
                "data arrived outside an object".into(),
            ));
        };
        if cur.received + bytes.len() as u64 > cur.size {
            return Err(StoreError::Protocol(format!(
                "object {:?} declared {} bytes but more arrived",
                cur.path, cur.size
            )));
        }
        let block = u64::from(CHECKSUM_BLOCK_BYTES);
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = ((block - cur.block_fill) as usize).min(rest.len());
            cur.block.update(&rest[..n]);
            cur.block_fill += n as u64;
            rest = &rest[n..];
            if cur.block_fill == block {
                let h = std::mem::replace(&mut cur.block, crc32fast::Hasher::new());
                cur.whole.combine(&h);
                cur.block_crcs.push(h.finalize());
                cur.block_fill = 0;
            }
        }
        let at = cur.logical_offset + cur.received;
        cur.received += bytes.len() as u64;
        let done = cur.received == cur.size;
        self.total_bytes += bytes.len() as u64;
        let store = Arc::clone(&self.store);
        match self.ec.as_mut() {
            Some(EcIngest { map, writer, .. }) => writer.write_at(&store, map, at, bytes).await?,
            None => self.writer.write_at(&store, at, bytes).await?,
        }
        if done {
            self.end_object().await?;
        }
        Ok(())
    }

    async fn end_object(&mut self) -> Result<(), StoreError> {
        let mut cur = self.current.take().expect("an object is open");
        if cur.block_fill > 0 {
            let h = std::mem::replace(&mut cur.block, crc32fast::Hasher::new());
            cur.whole.combine(&h);
            cur.block_crcs.push(h.finalize());
        }
        let crc32 = cur.whole.finalize();
        if let Some(c) = cur.client_crc
            && c != crc32
        {
            return Err(StoreError::Protocol(format!(
                "object {:?}: client CRC {c:#010x} does not match received bytes ({crc32:#010x})",
                cur.path
            )));
        }
        if cur.size > 0 {
            let store = Arc::clone(&self.store);
            match self.ec.as_mut() {
                Some(EcIngest { map, writer, .. }) => writer.pad_to_block(&store, map).await?,
                None => self.writer.pad_to_block(&store).await?,
            }
        }
        self.objects.push((
            cur.path,
            ObjectRecord {
                size: cur.size,
                logical_offset: cur.logical_offset,
                crc32,
                block_crcs: cur.block_crcs,
            },
        ));
        Ok(())
    }

    /// Makes the dataset durable and visible. `object_count` and
    /// `total_bytes` must match what was received.
    pub async fn commit(
        mut self,
        object_count: u64,
        total_bytes: u64,
    ) -> Result<Arc<DatasetHandle>, StoreError> {
        if let Some(cur) = &self.current {
            return Err(StoreError::Protocol(format!(
                "commit while object {:?} has {} of {} bytes",
                cur.path, cur.received, cur.size
            )));
        }
        if object_count != self.objects.len() as u64 || total_bytes != self.total_bytes {
            return Err(StoreError::Protocol(format!(
                "commit says {object_count} objects / {total_bytes} bytes, but {} objects / {} bytes arrived",
                self.objects.len(),
                self.total_bytes
            )));
        }
        let store = Arc::clone(&self.store);
        match self.ec.as_mut() {
            Some(EcIngest { map, writer, .. }) => writer.finish(&store, map).await?,
            None => self.writer.finish(&store).await?,
        }
        // Data durable before the catalog refers to it.
        store.sync_all().await?;
        if let Some(r) = self.reservation.take() {
            store
                .alloc
                .lock()
                .expect("allocator poisoned")
                .release(r)
                .expect("reservation is ours");
        }
        let (extents, unit_crcs, id) = match self.ec.as_mut() {
            None => {
                let mut extents = std::mem::take(&mut self.extents);
                coalesce(&mut extents);
                (extents, Vec::new(), 0)
            }
            Some(ec) => {
                let layout = store.layout;
                let row = layout.stripe_unit_bytes * u64::from(layout.device_count);
                let units = ec.writer.stripes() * u64::from(ec.map.geometry.width());
                let rows_used = units.div_ceil(u64::from(layout.device_count));
                let (kept, spare) = split_rows(std::mem::take(&mut self.extents), rows_used, row);
                let mut alloc = store.alloc.lock().expect("allocator poisoned");
                for e in spare {
                    alloc.release(e).expect("rows are ours");
                }
                drop(alloc);
                (
                    kept,
                    std::mem::take(&mut ec.writer.unit_crcs),
                    ec.dataset_id,
                )
            }
        };
        let allocated_bytes = extents.iter().map(|e| e.len).sum();
        // The manifest names the dataset id: a stripe dataset takes its id
        // now (an ec one took it when it started).
        let id = if id == 0 {
            let s2 = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || s2.catalog.reserve_dataset_id()).await {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => {
                    self.extents = extents;
                    return Err(e.into());
                }
                Err(e) => {
                    self.extents = extents;
                    return Err(StoreError::InvalidArgument(format!(
                        "commit task failed: {e}"
                    )));
                }
            }
        } else {
            id
        };
        let unit_rows = self.ec.as_ref().map_or(1, |ec| ec.writer.rows);
        let record = DatasetRecord {
            manifest: None,
            unit_rows,
            id,
            class: self.class,
            checksum_block_bytes: CHECKSUM_BLOCK_BYTES,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            object_count,
            total_bytes,
            allocated_bytes,
            extents,
            owner: self.owner.owner.clone(),
        };
        let mut manifest = crate::poolmeta::Manifest {
            name: self.name.to_string(),
            record,
            objects: std::mem::take(&mut self.objects),
            unit_crcs,
        };
        // Its length does not depend on where its rows are.
        manifest.record.manifest = Some(Extent { offset: 0, len: 0 });
        let bytes = manifest.encoded_len() as u64;
        let rows = match store.pool_root.allocate_rows(&store.space, bytes) {
            Ok(r) => r,
            Err(e) => {
                self.extents = std::mem::take(&mut manifest.record.extents);
                return Err(e);
            }
        };
        manifest.record.manifest = Some(rows);
        let s2 = Arc::clone(&store);
        let committed = tokio::task::spawn_blocking(move || {
            let r = s2.pool_root.commit(&s2.catalog, &manifest);
            (r, manifest.record)
        })
        .await;
        let (committed, times) = match committed {
            Ok((Ok(r), _)) => r,
            Ok((Err(e), record)) => {
                // Put the extents back so Drop frees them.
                self.extents = record.owned_extents();
                return Err(e);
            }
            Err(e) => {
                // The task panicked: its rows are lost until restart (the
                // catalog did not commit, so they are free then).
                return Err(StoreError::InvalidArgument(format!(
                    "commit task failed: {e}"
                )));
            }
        };
        self.committed = true;
        let handle = Arc::new(DatasetHandle::new(
            self.name.to_string(),
            committed,
            store.layout,
            Arc::clone(&store.space),
        ));
        store
            .datasets
            .write()
            .expect("dataset map poisoned")
            .insert(self.name.to_string(), Arc::clone(&handle));
        tracing::info!(
            dataset = %self.name,
            objects = object_count,
            bytes = total_bytes,
            metadata_on_devices_ms = times.devices_ms as u64,
            catalog_ms = times.catalog_ms as u64,
            "dataset committed"
        );
        Ok(handle)
    }
}

impl Drop for IngestSession {
    fn drop(&mut self) {
        self.store
            .ingesting
            .lock()
            .expect("ingest set poisoned")
            .remove(self.name.as_str());
        self.store
            .quota
            .end_dataset(&self.owner.owner, self.declared_bytes);
        if self.committed {
            return;
        }
        let mut space = std::mem::take(&mut self.extents);
        space.extend(self.reservation.take());
        let writes = match self.ec.as_mut() {
            Some(ec) => std::mem::take(&mut ec.writer.writes),
            None => std::mem::take(&mut self.writer.writes),
        };
        let free = Arc::clone(&self.store.space);
        let name = self.name.to_string();
        let release = move || {
            // Written bytes of an ingest nobody will commit: given back
            // (discarded) like a deleted dataset's.
            free.release(space, &name);
            tracing::info!(dataset = %name, "ingest aborted; space released");
        };
        if writes.is_empty() {
            release();
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Writes still in flight target this space: free it only after
            // they land, or a later ingest could be overwritten.
            rt.spawn(async move {
                let mut writes = writes;
                while writes.next().await.is_some() {}
                release();
            });
        } else {
            tracing::warn!(dataset = %self.name, "ingest aborted outside a runtime; its space is reclaimed at restart");
        }
    }
}

/// The first `rows` rows of `extents` (whole rows of `row` bytes, in data
/// order), coalesced in order, and the rest.
fn split_rows(extents: Vec<Extent>, mut rows: u64, row: u64) -> (Vec<Extent>, Vec<Extent>) {
    let (mut kept, mut spare) = (Vec::new(), Vec::new());
    for e in extents {
        let n = e.len / row;
        let take = n.min(rows);
        rows -= take;
        if take > 0 {
            kept.push(Extent {
                offset: e.offset,
                len: take * row,
            });
        }
        if take < n {
            spare.push(Extent {
                offset: e.offset + take * row,
                len: e.len - take * row,
            });
        }
    }
    coalesce_in_order(&mut kept);
    (kept, spare)
}

pub mod discard;
pub mod hooks;
mod pipeline;
pub mod pool_root;
pub mod quota;
pub mod read_into;
pub mod readahead;
pub mod redundancy;
pub mod replace;
mod schedule;
pub mod scrub;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_crash;
#[cfg(test)]
mod tests_ec;
