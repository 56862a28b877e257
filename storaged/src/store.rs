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
//!
//! The jobs live in their own modules: `open` (assembly, reconciling the
//! catalog with the devices, the allocator), `read` (windows, verification,
//! streams and batches), `ingest` (sessions and the stripe writer),
//! `redundancy`, `scrub` and `replace` (`ec` stripes, repair, rebuild);
//! this file keeps the shared state, lookups, listing, delete and status.

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
use crate::error::{OpenError, ReadError, RemoveError, StoreError};
use crate::layout::{Segment, StripeLayout};

/// A committed dataset as readers see it. When deleted, its space returns
/// to the allocator only once the last reader has dropped its handle.
pub struct DatasetHandle {
    pub name: String,
    pub record: DatasetRecord,
    /// How its bytes lie on the devices (its storage class).
    pub layout: class::DatasetLayout,
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
        let layout = class::DatasetLayout::for_record(&record, layout);
        Self {
            name,
            record,
            layout,
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

/// What the writers of an ingest use of the store: the engine and the
/// buffer pool, nothing else.
pub(crate) struct WriteIo<'a> {
    pub engine: &'a Arc<dyn IoBackend>,
    pub pool: &'a Arc<BufferPool>,
}

/// Bytes served per read path, and payload bytes the server copied to
/// serve them (zero-copy paths keep the copied counters at 0).
#[derive(Debug, Default)]
pub struct ReadCounters {
    pub grpc_bytes_served: std::sync::atomic::AtomicU64,
    pub grpc_payload_bytes_copied: std::sync::atomic::AtomicU64,
    pub shm_bytes_served: std::sync::atomic::AtomicU64,
    pub shm_payload_bytes_copied: std::sync::atomic::AtomicU64,
    pub bulk_bytes_served: std::sync::atomic::AtomicU64,
    pub bulk_payload_bytes_copied: std::sync::atomic::AtomicU64,
    /// Device read pieces that joined a neighbour's read instead of being
    /// issued on their own (see `schedule`).
    pub device_reads_merged: std::sync::atomic::AtomicU64,
    /// Checksum blocks that failed verification on read (each one answered
    /// by a rebuild, a re-read, or DATA_LOSS; never served).
    pub checksum_mismatches: std::sync::atomic::AtomicU64,
}

/// One piece of a read: object offset and verified bytes.
pub type Chunk = (u64, crate::verified::VerifiedBytes);

/// The I/O side of the store: the engine behind its device slots, the
/// buffer pool, and what a replacement device's engine is built from.
pub(crate) struct DeviceIo {
    pub engine: Arc<dyn IoBackend>,
    /// The same engine, as the router that knows missing devices.
    pub slots: Arc<engine::route::DeviceSlots>,
    pub pool: Arc<BufferPool>,
    pub engine_kind: engine::EngineKind,
    pub engine_limits: EngineLimits,
    /// What wraps the pool's write paths (see `hooks`).
    pub hooks: Arc<dyn hooks::IoHooks>,
    /// Reads into client regions in flight, at most what an engine accepts.
    pub foreign_reads: tokio::sync::Semaphore,
}

/// The dataset side of the store: what is stored where.
pub(crate) struct DatasetSide {
    pub catalog: Catalog,
    /// The catalog's copy on the devices (root and manifests).
    pub pool_root: pool_root::PoolRoot,
    pub alloc: Arc<Mutex<ExtentAllocator>>,
    /// Where freed space goes: discarded, then back to `alloc`.
    pub space: Arc<discard::FreeSpace>,
    pub datasets: RwLock<BTreeMap<String, Arc<DatasetHandle>>>,
    pub ingesting: Mutex<HashSet<String>>,
    /// What ingests in progress declared, per owner (tenant quotas).
    pub quota: quota::QuotaLedger,
}

/// The redundancy side of the store: rebuilds, the stripe cache, and
/// device replacement.
pub(crate) struct RedundancyState {
    /// Units rebuilt from parity, by the device that lost them.
    pub device_reconstructions: Vec<std::sync::atomic::AtomicU64>,
    /// Recently rebuilt stripes (degraded reads of neighbours reuse them).
    pub stripe_cache: Mutex<redundancy::StripeCache>,
    /// A device replacement is running.
    pub replacing: AtomicBool,
    pub rebuild: Mutex<Option<replace::RebuildState>>,
    /// A superblock of this pool (template for replacement devices).
    pub superblock: crate::device::Superblock,
    pub device_paths: RwLock<Vec<PathBuf>>,
}

/// The store; see the module docs. A façade over its owned parts: the I/O
/// side, the dataset side, the redundancy state, read-ahead and counters.
pub struct Store {
    io: DeviceIo,
    data: DatasetSide,
    redundancy: RedundancyState,
    layout: StripeLayout,
    pool_id: [u8; 16],
    limits: StoreLimits,
    /// What start-up found on the devices (a rebuilt catalog, ...).
    pub recovery: pool_root::Recovery,
    /// Devices whose superblock was rebuilt from its copy at start.
    pub superblocks_repaired: u32,
    /// What `--fault-inject` injected so far (None without it).
    pub injected: Option<Arc<engine::fault::InjectedCounts>>,
    pub scrub_counters: scrub::ScrubCounters,
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

impl Store {
    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Registers a client region with the engine for reads where it can
    /// (see `RegionMap::fix_with`). Blocking.
    pub fn fix_region(&self, region: &crate::region::RegionMap) -> bool {
        region.fix_with(&*self.io.engine)
    }

    pub fn layout(&self) -> StripeLayout {
        self.layout
    }

    /// (bytes, datasets) committed by `owner`.
    pub fn owner_usage(&self, owner: &str) -> (u64, u64) {
        self.data.owner_usage(owner)
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

    pub fn dataset(&self, name: &DatasetName) -> Result<Arc<DatasetHandle>, ReadError> {
        self.data.dataset(name)
    }

    pub fn list_datasets(&self) -> Vec<Arc<DatasetHandle>> {
        self.data.list()
    }

    /// One page of a dataset's objects. The page token is the last path of
    /// the previous page.
    pub fn list_objects(
        &self,
        name: &DatasetName,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ObjectSummary>, Option<String>), ReadError> {
        let ds = self.dataset(name)?;
        let page_size = match page_size {
            0 => self.limits.list_page_size_default,
            n if n > self.limits.list_page_size_max => {
                return Err(ReadError::PageTooLarge {
                    page_size: n,
                    max: self.limits.list_page_size_max,
                });
            }
            n => n,
        };
        let after = (!page_token.is_empty()).then_some(page_token);
        let (objects, more) =
            self.data
                .catalog
                .list_objects(ds.record.id, prefix, after, page_size as usize)?;
        let next = if more {
            objects.last().map(|o| o.path.clone())
        } else {
            None
        };
        Ok((objects, next))
    }

    pub fn lookup(&self, name: &DatasetName, path: &ObjectPath) -> Result<ObjectRef, ReadError> {
        self.lookup_pinned(name, None, path)
    }

    /// Dataset `name`, which must have id `expected` when one is given
    /// (a reader that knew it before keeps reading that one, never a
    /// dataset created again under its name).
    pub fn dataset_pinned(
        &self,
        name: &DatasetName,
        expected: Option<u64>,
    ) -> Result<Arc<DatasetHandle>, ReadError> {
        let ds = self.dataset(name)?;
        match expected {
            Some(expected) if expected != ds.record.id => Err(ReadError::DatasetReplaced {
                name: name.to_string(),
                id: ds.record.id,
                expected,
            }),
            _ => Ok(ds),
        }
    }

    /// [`lookup`](Self::lookup) in the dataset of id `expected`, if given.
    pub fn lookup_pinned(
        &self,
        name: &DatasetName,
        expected: Option<u64>,
        path: &ObjectPath,
    ) -> Result<ObjectRef, ReadError> {
        let ds = self.dataset_pinned(name, expected)?;
        let record = self
            .data
            .catalog
            .get_object(ds.record.id, path.as_str())?
            .ok_or_else(|| ReadError::ObjectNotFound {
                dataset: name.to_string(),
                path: path.to_string(),
            })?;
        Ok(ObjectRef {
            dataset: ds,
            path: path.to_string(),
            record,
        })
    }

    /// Deletes a dataset; its space is freed once no reader holds it.
    /// Returns the bytes freed.
    pub async fn delete(self: &Arc<Self>, name: &DatasetName) -> Result<u64, RemoveError> {
        let store = Arc::clone(self);
        let n = name.to_string();
        let record = tokio::task::spawn_blocking(move || {
            store.data.pool_root.delete(&store.data.catalog, &n)
        })
        .await
        .map_err(|source| StoreError::TaskFailed {
            what: "delete",
            source,
        })??
        .ok_or_else(|| RemoveError::DatasetNotFound(name.to_string()))?;
        let handle = self
            .data
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
    /// The engine and pool, for writers.
    pub(crate) fn write_io(&self) -> WriteIo<'_> {
        self.io.write_io()
    }

    /// The I/O buffer pool: (bytes in all, bytes leased now).
    pub fn buffer_pool_usage(&self) -> (u64, u64) {
        self.io.pool.bytes_in_use()
    }

    pub fn discard_counters(&self) -> &discard::DiscardCounters {
        &self.data.space.counters
    }

    /// The generation of the pool root on the devices now.
    pub fn pool_root_generation(&self) -> u64 {
        self.data.pool_root.generation()
    }

    /// Why the catalog is failing, while it is.
    pub fn catalog_fault(&self) -> Option<String> {
        self.data.catalog.health()
    }

    async fn sync_all(self: &Arc<Self>) -> Result<(), StoreError> {
        self.io.sync_all(self.layout.device_count).await
    }
}

impl DeviceIo {
    /// Makes every write to devices `0..device_count` durable.
    async fn sync_all(&self, device_count: u32) -> Result<(), StoreError> {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || {
            for d in 0..device_count {
                engine
                    .sync(d)
                    .map_err(|source| StoreError::Sync { device: d, source })?;
            }
            Ok(())
        })
        .await
        .map_err(|source| StoreError::TaskFailed {
            what: "sync",
            source,
        })?
    }

    /// What the writers of an ingest use.
    pub(crate) fn write_io(&self) -> WriteIo<'_> {
        WriteIo {
            engine: &self.engine,
            pool: &self.pool,
        }
    }
}

impl DatasetSide {
    pub fn dataset(&self, name: &DatasetName) -> Result<Arc<DatasetHandle>, ReadError> {
        self.datasets
            .read()
            .expect("dataset map poisoned")
            .get(name.as_str())
            .cloned()
            .ok_or_else(|| ReadError::DatasetNotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<DatasetHandle>> {
        self.datasets
            .read()
            .expect("dataset map poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// (bytes, datasets) committed by `owner`.
    pub fn owner_usage(&self, owner: &str) -> (u64, u64) {
        let datasets = self.datasets.read().expect("dataset map poisoned");
        datasets
            .values()
            .filter(|h| h.record.owner == owner)
            .fold((0, 0), |(b, n), h| (b + h.record.total_bytes, n + 1))
    }
}

pub use ingest::IngestSession;
pub use read::BatchEvent;
use read::BatchItemPlan;
pub(crate) use writer::{WriteFuture, acquire_draining, push_write};

pub mod class;
pub mod discard;
pub mod hooks;
pub mod status;
mod window;
pub use status::{DeviceState, DeviceUsage, StoreStatus};
mod ingest;
mod open;
mod pipeline;
pub mod pool_root;
pub mod quota;
pub mod read;
pub mod read_into;
pub mod readahead;
pub mod redundancy;
pub mod replace;
mod schedule;
pub mod scrub;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_crash;
#[cfg(test)]
mod tests_ec;
#[cfg(test)]
mod tests_model;
