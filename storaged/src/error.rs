//! Errors of the store layer. What gRPC status each is answered with is
//! the service layer's choice (`service::codes`); nothing here knows gRPC.

use storaged_proto::NameError;

use crate::alloc::AllocError;
use crate::catalog::CatalogError;
use crate::device::DeviceError;

/// Why the store could not open. Start-up only; never a gRPC status.
/// "offset O (length L) is past the end of P (S bytes)": the range asked
/// for, never a derived one (its end), so the user finds their numbers.
fn out_of_range_text(path: &str, offset: u64, length: Option<u64>, size: u64) -> String {
    match length {
        Some(l) => format!(
            "range at offset {offset} with length {l} ends at {} past the end of {path:?} ({size} bytes)",
            offset.saturating_add(l)
        ),
        None => format!("offset {offset} is past the end of {path:?} ({size} bytes)"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(
        "the devices are blank but {0} describes an existing pool; restore the devices or pass --force to start over"
    )]
    StaleCatalog(std::path::PathBuf),
    #[error("catalog {path} is inconsistent with the pool: {source}")]
    Inconsistent {
        path: std::path::PathBuf,
        source: AllocError,
    },
    #[error("I/O engine: {0}")]
    Engine(std::io::Error),
    #[error("cannot start degraded: {0}")]
    TooDegraded(String),
    #[error("the pool's metadata on the devices: {0}")]
    PoolMeta(#[from] crate::poolmeta::PoolMetaError),
}

/// Why an admin job (scrub, device replacement) could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("dataset {0:?} not found")]
    DatasetNotFound(String),
    #[error("a scrub is already running")]
    ScrubRunning,
    #[error("a device replacement is running")]
    ReplaceRunning,
    #[error(
        "device {index} is being replaced by {}; resume that first (storagectl device replace {index} {})",
        .path.display(),
        .path.display()
    )]
    OtherReplacePending {
        index: u32,
        path: std::path::PathBuf,
    },
    #[error(
        "device {0} is healthy; replacing it makes its data unreadable until the rebuild ends (stripe datasets lose its share). Say so explicitly to go on (storagectl device replace --healthy)"
    )]
    DeviceHealthy(u32),
    #[error("device {index} does not exist (the pool has devices 0 to {})", .device_count - 1)]
    NoSuchIndex { index: u32, device_count: u32 },
    #[error("{0:?} is neither a device index nor a device path of this pool")]
    NoSuchDevice(String),
    #[error(
        "the new device {} must be an absolute path (the daemon resolves it, not the client)",
        .0.display()
    )]
    RelativePath(std::path::PathBuf),
    #[error("{} is already device {index} of this pool", .path.display())]
    AlreadyInPool {
        path: std::path::PathBuf,
        index: usize,
    },
    /// The new device cannot be used (missing, too small, holding data).
    #[error("cannot use the new device: {0}")]
    NewDevice(#[from] DeviceError),
    #[error("cannot start I/O on the new device: {0}")]
    NewDeviceEngine(std::io::Error),
    /// What the job met on the way: device faults, the catalog.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CatalogError> for AdminError {
    fn from(e: CatalogError) -> Self {
        Self::Store(e.into())
    }
}

impl From<crate::poolmeta::PoolMetaError> for AdminError {
    fn from(e: crate::poolmeta::PoolMetaError) -> Self {
        Self::Store(e.into())
    }
}

/// Why an ingest (begin, objects, data, commit) was refused or failed.
/// The ingest protocol's violations name what the client did; what the
/// shared layers met on the way (devices, catalog, buffers, space,
/// limits) is `Store`.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(
        "the pool is degraded (device(s) {missing:?} missing; new data would have no redundancy); replace the device first (storagectl device replace)"
    )]
    Degraded { missing: Vec<u32> },
    /// A storage class the pool cannot hold.
    #[error("{0}")]
    Class(#[from] crate::ec::EcError),
    #[error("dataset {0:?} already exists")]
    DatasetExists(String),
    #[error("dataset {0:?} is being ingested right now")]
    InProgress(String),
    #[error("object {path:?} appears twice in the ingest of {dataset:?}")]
    DuplicateObject { dataset: String, path: String },
    #[error(
        "object {path:?} conflicts with {other:?} in dataset {dataset:?}: a name cannot be both an object and a directory"
    )]
    TreeConflict {
        dataset: String,
        path: String,
        other: String,
    },
    #[error(
        "ingest protocol violation: object {path:?} got {received} of {size} bytes before the next object began"
    )]
    ObjectIncomplete {
        path: String,
        received: u64,
        size: u64,
    },
    #[error("ingest protocol violation: data arrived outside an object")]
    DataOutsideObject,
    #[error("ingest protocol violation: object {path:?} declared {size} bytes but more arrived")]
    TooMuchData { path: String, size: u64 },
    #[error(
        "ingest protocol violation: object {path:?}: client CRC {client:#010x} does not match received bytes ({actual:#010x})"
    )]
    CrcMismatch {
        path: String,
        client: u32,
        actual: u32,
    },
    #[error(
        "ingest protocol violation: commit while object {path:?} has {received} of {size} bytes"
    )]
    CommitWhileOpen {
        path: String,
        received: u64,
        size: u64,
    },
    #[error(
        "ingest protocol violation: commit says {said_objects} objects / {said_bytes} bytes, but {objects} objects / {bytes} bytes arrived"
    )]
    CommitMismatch {
        said_objects: u64,
        said_bytes: u64,
        objects: u64,
        bytes: u64,
    },
    /// The commit's blocking task died (a bug): nothing was committed.
    #[error("commit task failed: {0}")]
    TaskFailed(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Quota(#[from] crate::store::quota::QuotaError),
    /// What the shared layers met on the way.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CatalogError> for IngestError {
    fn from(e: CatalogError) -> Self {
        Self::Store(e.into())
    }
}

/// A limit of the store that a request ran into (ARCHITECTURE.md lists
/// them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Items of one ReadBatch (`batch_items_max`).
    BatchItems,
    /// Bytes of one item of an any-order batch
    /// (`batch_any_order_item_bytes_max`).
    AnyOrderItemBytes,
    /// Ingests running at once (`ingests_concurrent_max`).
    IngestsConcurrent,
    /// Objects of one dataset (`ingest_objects_max`).
    DatasetObjects,
    /// Objects of one hint (`hint_items_max`).
    HintItems,
}

impl Limit {
    fn text(self, asked: u64, max: u64) -> String {
        match self {
            Limit::BatchItems => format!("{asked} items in one ReadBatch; the limit is {max}"),
            Limit::AnyOrderItemBytes => format!(
                "item of {asked} bytes exceeds {max} bytes for any-order batches; read it in order"
            ),
            Limit::IngestsConcurrent => {
                format!("{asked} ingests are already running; the limit is {max}")
            }
            Limit::DatasetObjects => format!("a dataset holds at most {max} objects"),
            Limit::HintItems => format!("{asked} objects in one hint; the limit is {max}"),
        }
    }
}

/// Why a lookup or read (List, Stat, Read, ReadBatch, ReadInto, Hint) was
/// refused or failed: what the request named that does not exist or does
/// not fit. What the shared layers met on the way (devices, checksums,
/// buffers, limits, the catalog) is `Store`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("page_size {page_size} exceeds the limit of {max}")]
    PageTooLarge { page_size: u32, max: u32 },
    #[error("dataset {0:?} not found")]
    DatasetNotFound(String),
    /// The caller named a dataset by id too, and the name now belongs to
    /// another one (removed and created again).
    #[error(
        "dataset {name:?} is not the one asked for: it has id {id}, the caller expected {expected} (it was removed and created again)"
    )]
    DatasetReplaced {
        name: String,
        id: u64,
        expected: u64,
    },
    #[error("object {path:?} not found in dataset {dataset:?}")]
    ObjectNotFound { dataset: String, path: String },
    /// The range as the client asked for it (`length: None`: to the end).
    #[error("{}", out_of_range_text(path, *offset, *length, *size))]
    OutOfRange {
        path: String,
        offset: u64,
        length: Option<u64>,
        size: u64,
    },
    /// A ReadInto item's place in the region is not O_DIRECT aligned.
    #[error("item {index}: region_offset {region_offset} is not a multiple of {align}")]
    RegionOffsetUnaligned {
        index: u32,
        region_offset: u64,
        align: u64,
    },
    #[error(
        "item {index} needs region bytes [{region_offset}, {}) but region {region:#x} holds {size} bytes",
        .region_offset.saturating_add(*.span)
    )]
    RegionBounds {
        index: u32,
        region_offset: u64,
        span: u64,
        region: u64,
        size: u64,
    },
    /// What the shared layers met on the way.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CatalogError> for ReadError {
    fn from(e: CatalogError) -> Self {
        Self::Store(e.into())
    }
}

/// Why a dataset could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("dataset {0:?} not found")]
    DatasetNotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CatalogError> for RemoveError {
    fn from(e: CatalogError) -> Self {
        Self::Store(e.into())
    }
}

impl From<crate::poolmeta::PoolMetaError> for RemoveError {
    fn from(e: crate::poolmeta::PoolMetaError) -> Self {
        Self::Store(e.into())
    }
}

/// What any operation can meet in the layers it shares with the others:
/// device faults (errno, device and offset kept), checksum mismatches,
/// stripes past repair, buffers, space and limits, the catalog and the
/// pool's metadata. Each operation's error wraps it (`ReadError::Store`,
/// `IngestError::Store`, `AdminError::Store`, `RemoveError::Store`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A blocking task of the operation died (a bug); what it was doing
    /// did not finish.
    #[error("{what} task failed: {source}")]
    TaskFailed {
        what: &'static str,
        source: tokio::task::JoinError,
    },
    #[error(
        "pool is full: the ingest needs {needed} contiguous bytes but the largest free extent is {largest_free} bytes ({free} bytes free in all)"
    )]
    NoSpace {
        needed: u64,
        free: u64,
        largest_free: u64,
    },
    #[error("device {device} is full (writing at offset {offset}): {source}")]
    DeviceFull {
        device: u32,
        offset: u64,
        source: std::io::Error,
    },
    #[error("limit exceeded: {}", .limit.text(*.asked, *.max))]
    Limit { limit: Limit, asked: u64, max: u64 },
    /// No pool buffer can hold what the request needs (larger than the
    /// largest buffer class, or more buffers than the class has).
    #[error("limit exceeded: {0}")]
    Buffers(std::io::Error),
    #[error(
        "checksum mismatch in dataset {dataset:?} object {path:?} at object offset {object_offset} (device {device} offset {device_offset}): stored {expected:#010x}, read {actual:#010x}"
    )]
    Checksum {
        dataset: String,
        path: String,
        object_offset: u64,
        device: u32,
        device_offset: u64,
        expected: u32,
        actual: u32,
    },
    #[error(
        "device {device} is missing (absent at start or gone): the bytes at its offset {offset} are unavailable"
    )]
    DeviceMissing { device: u32, offset: u64 },
    #[error(
        "dataset {dataset:?} stripe {stripe}: units on devices {devices:?} are lost or corrupt, more than its {parity} parity units can rebuild"
    )]
    Unrecoverable {
        dataset: String,
        stripe: u64,
        devices: Vec<u32>,
        parity: u8,
        /// Whether any of them is a missing device (UNAVAILABLE) rather
        /// than bad bytes only (DATA_LOSS).
        missing: bool,
    },
    #[error("I/O error on device {device} at offset {offset}: {source}")]
    Io {
        device: u32,
        offset: u64,
        source: std::io::Error,
    },
    #[error("fdatasync of device {device} failed: {source}")]
    Sync { device: u32, source: std::io::Error },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("storaged is shutting down")]
    ShuttingDown,
    #[error("the pool's metadata on the devices: {0}")]
    PoolMeta(#[from] crate::poolmeta::PoolMetaError),
}

impl StoreError {
    /// Whether a device misbehaved (gone, failed, short or bad bytes): the
    /// errors a read of an erasure-coded dataset answers by rebuilding.
    pub fn is_device_fault(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. } | StoreError::DeviceMissing { .. } | StoreError::Checksum { .. }
        )
    }

    /// Maps an engine error, turning ENOSPC into "device full" and ENODEV
    /// into "device missing".
    pub fn from_io(device: u32, offset: u64, source: std::io::Error) -> Self {
        if crate::engine::route::is_missing(&source) {
            return StoreError::DeviceMissing { device, offset };
        }
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::DeviceFull {
                device,
                offset,
                source,
            }
        } else {
            StoreError::Io {
                device,
                offset,
                source,
            }
        }
    }
}
