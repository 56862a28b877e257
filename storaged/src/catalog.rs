//! The durable catalog: committed datasets, their objects, and the pool id.
//!
//! It lives in `DATA_DIR/catalog.redb`, an embedded redb database: B-trees
//! with copy-on-write pages and a two-phase commit that fsyncs before a
//! transaction is visible, so a crash at any point leaves either the old or
//! the new state. Using redb instead of a log of our own buys crash safety
//! that is already tested (redb's own crash-consistency suite) for the cost
//! of one dependency.
//!
//! Tables (value encodings in docs/FORMAT.md):
//! - `meta`: `"pool_id"` → 16 bytes, `"catalog_version"` → u32, `"next_dataset_id"` → u64.
//! - `datasets`: name → DatasetRecord.
//! - `objects`: (dataset id, path) → ObjectRecord. Keys sort by dataset then
//!   path bytes, so one dataset's objects are one contiguous range and a
//!   prefix listing is a range scan.
//!
//! Ordering that makes ingest crash-safe: object bytes are written to the
//! devices and fdatasync'ed *before* the one write transaction that inserts
//! the dataset and all its objects commits. Before that commit nothing refers
//! to the space; after it everything does.

use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::alloc::Extent;
use storaged_proto::model::StorageClass;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DATASETS: TableDefinition<&str, &[u8]> = TableDefinition::new("datasets");
const OBJECTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("objects");
const UNITS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("units");

/// Makes the storage a catalog's database lives on, in place of redb's own
/// file backend (tests simulate power loss this way, see `crash`). Called
/// again whenever the catalog reopens its database after a failure.
pub type BackendFactory =
    std::sync::Arc<dyn Fn() -> std::io::Result<Box<dyn redb::StorageBackend>> + Send + Sync>;

/// A boxed backend as redb's `impl StorageBackend`.
#[derive(Debug)]
struct BoxedBackend(Box<dyn redb::StorageBackend>);

impl redb::StorageBackend for BoxedBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
}

/// Opens the database at `path`, on `backend` if there is one.
fn open_database(path: &Path, backend: Option<&BackendFactory>) -> Result<Database, redb::Error> {
    match backend {
        None => Ok(Database::create(path)?),
        Some(make) => Ok(redb::Builder::new().create_with_backend(BoxedBackend(make()?))?),
    }
}

pub const CATALOG_VERSION: u32 = 1;
/// Version 2 added the owner (version 1 records read as owned by "").
const DATASET_RECORD_VERSION: u8 = 3;
/// Longest owner (tenant) name a record holds.
pub const OWNER_BYTES_MAX: usize = 255;
const OBJECT_RECORD_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database: {0}")]
    Db(#[from] redb::Error),
    #[error("catalog belongs to pool {found}, but the devices belong to pool {expected}")]
    PoolMismatch { expected: String, found: String },
    #[error("catalog {0} is corrupt: {1}")]
    Corrupt(String, String),
    #[error("dataset {0} already exists")]
    DatasetExists(String),
    /// The catalog's filesystem is full (ENOSPC, EDQUOT). The catalog is
    /// reopened by the next operation, so it recovers once space returns.
    #[error("the catalog's filesystem is full ({path}): {source}")]
    Full {
        path: String,
        source: std::io::Error,
    },
    /// The catalog failed to read or write its file and could not be
    /// reopened yet; each operation tries again.
    #[error("the catalog is failing ({path}): {reason}")]
    Failing { path: String, reason: String },
}

impl CatalogError {
    /// The catalog file is damaged (not a redb file, a failed page check,
    /// an unknown version), as opposed to unreachable or of another pool:
    /// a start may rebuild it from the devices.
    pub fn is_damage(&self) -> bool {
        match self {
            CatalogError::Corrupt(..) => true,
            CatalogError::Db(redb::Error::Corrupted(_) | redb::Error::UpgradeRequired(_)) => true,
            CatalogError::Db(redb::Error::Io(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

fn dberr<E: Into<redb::Error>>(e: E) -> CatalogError {
    CatalogError::Db(e.into())
}

/// A committed dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRecord {
    pub id: u64,
    pub class: StorageClass,
    pub checksum_block_bytes: u32,
    pub created_unix_ms: i64,
    pub object_count: u64,
    pub total_bytes: u64,
    pub allocated_bytes: u64,
    /// Logical extents holding the dataset's objects, coalesced.
    pub extents: Vec<Extent>,
    /// The tenant that created it ("" without tenants); quotas count it.
    pub owner: String,
    /// Whole rows holding a copy of the dataset's manifest on every device
    /// (see `poolmeta`); `None` for records from before manifests.
    pub manifest: Option<Extent>,
    /// Check values per `ec` unit: the rows of a unit each have a CRC
    /// (`unit_bytes / ec::UNIT_ROW_BYTES` of them), or 1, one CRC over
    /// the whole unit (records from before row CRCs, and `stripe`).
    pub unit_rows: u32,
}

impl DatasetRecord {
    /// Every extent the dataset owns: its data and its manifest.
    pub fn owned_extents(&self) -> Vec<Extent> {
        let mut v = self.extents.clone();
        v.extend(self.manifest);
        v
    }
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    pub size: u64,
    pub logical_offset: u64,
    pub crc32: u32,
    /// CRC-32 of each checksum block of the object, in order.
    pub block_crcs: Vec<u32>,
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CatalogError> {
        if self.b.len() < n {
            return Err(CatalogError::Corrupt(
                self.what.into(),
                "record is truncated".into(),
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, CatalogError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CatalogError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CatalogError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

impl DatasetRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.extents.len() * 16);
        v.push(DATASET_RECORD_VERSION);
        v.push(self.class.code());
        match self.class {
            StorageClass::Stripe => v.extend_from_slice(&[0, 0]),
            StorageClass::Ec {
                data_units,
                parity_units,
            } => v.extend_from_slice(&[data_units, parity_units]),
        }
        v.extend_from_slice(&self.checksum_block_bytes.to_le_bytes());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        v.extend_from_slice(&self.object_count.to_le_bytes());
        v.extend_from_slice(&self.total_bytes.to_le_bytes());
        v.extend_from_slice(&self.allocated_bytes.to_le_bytes());
        v.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for e in &self.extents {
            v.extend_from_slice(&e.offset.to_le_bytes());
            v.extend_from_slice(&e.len.to_le_bytes());
        }
        let owner = &self.owner.as_bytes()[..self.owner.len().min(OWNER_BYTES_MAX)];
        v.push(owner.len() as u8);
        v.extend_from_slice(owner);
        match self.manifest {
            None => v.push(0),
            Some(e) => {
                v.push(1);
                v.extend_from_slice(&e.offset.to_le_bytes());
                v.extend_from_slice(&e.len.to_le_bytes());
            }
        }
        v.extend_from_slice(&self.unit_rows.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, CatalogError> {
        let mut r = Reader {
            b,
            what: "dataset record",
        };
        let version = r.u8()?;
        if !(1..=DATASET_RECORD_VERSION).contains(&version) {
            return Err(CatalogError::Corrupt(
                "dataset record".into(),
                format!("unknown version {version}"),
            ));
        }
        let class_code = r.u8()?;
        let (k, m) = (r.u8()?, r.u8()?);
        let class = match (class_code, k, m) {
            (1, 0, 0) => StorageClass::Stripe,
            (2, 1.., 1..) => StorageClass::Ec {
                data_units: k,
                parity_units: m,
            },
            _ => {
                return Err(CatalogError::Corrupt(
                    "dataset record".into(),
                    format!("unknown storage class {class_code} ({k}+{m})"),
                ));
            }
        };
        let checksum_block_bytes = r.u32()?;
        let id = r.u64()?;
        let created_unix_ms = r.u64()? as i64;
        let object_count = r.u64()?;
        let total_bytes = r.u64()?;
        let allocated_bytes = r.u64()?;
        let n = r.u32()? as usize;
        let mut extents = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            extents.push(Extent {
                offset: r.u64()?,
                len: r.u64()?,
            });
        }
        let owner = if version >= 2 {
            let n = r.u8()? as usize;
            String::from_utf8(r.take(n)?.to_vec()).map_err(|_| {
                CatalogError::Corrupt("dataset record".into(), "owner is not UTF-8".into())
            })?
        } else {
            String::new()
        };
        let manifest = if version >= 3 {
            match r.u8()? {
                0 => None,
                1 => Some(Extent {
                    offset: r.u64()?,
                    len: r.u64()?,
                }),
                f => {
                    return Err(CatalogError::Corrupt(
                        "dataset record".into(),
                        format!("unknown manifest flag {f}"),
                    ));
                }
            }
        } else {
            None
        };
        let unit_rows = if version >= 3 { r.u32()? } else { 1 };
        if unit_rows == 0 || unit_rows > 512 {
            return Err(CatalogError::Corrupt(
                "dataset record".into(),
                format!("{unit_rows} check values per unit"),
            ));
        }
        if !r.b.is_empty() {
            return Err(CatalogError::Corrupt(
                "dataset record".into(),
                format!("{} bytes after the record", r.b.len()),
            ));
        }
        Ok(Self {
            unit_rows,
            manifest,
            owner,
            id,
            class,
            checksum_block_bytes,
            created_unix_ms,
            object_count,
            total_bytes,
            allocated_bytes,
            extents,
        })
    }
}

impl ObjectRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(28 + self.block_crcs.len() * 4);
        v.push(OBJECT_RECORD_VERSION);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(&self.crc32.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.logical_offset.to_le_bytes());
        v.extend_from_slice(&(self.block_crcs.len() as u32).to_le_bytes());
        for c in &self.block_crcs {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v
    }

    /// Decodes the header only: size, offset and whole-object CRC.
    pub fn decode_summary(b: &[u8]) -> Result<(u64, u64, u32), CatalogError> {
        let mut r = Reader {
            b,
            what: "object record",
        };
        let version = r.u8()?;
        if version != OBJECT_RECORD_VERSION {
            return Err(CatalogError::Corrupt(
                "object record".into(),
                format!("unknown version {version}"),
            ));
        }
        r.take(3)?;
        let crc32 = r.u32()?;
        let size = r.u64()?;
        let logical_offset = r.u64()?;
        Ok((size, logical_offset, crc32))
    }

    pub fn decode(b: &[u8]) -> Result<Self, CatalogError> {
        let (size, logical_offset, crc32) = Self::decode_summary(b)?;
        let mut r = Reader {
            b: &b[24..],
            what: "object record",
        };
        let n = r.u32()? as usize;
        let raw = r.take(n.checked_mul(4).ok_or_else(|| {
            CatalogError::Corrupt("object record".into(), "block count overflows".into())
        })?)?;
        if !r.b.is_empty() || b[1..4] != [0, 0, 0] {
            return Err(CatalogError::Corrupt(
                "object record".into(),
                "reserved or trailing bytes are not empty".into(),
            ));
        }
        let block_crcs = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        Ok(Self {
            size,
            logical_offset,
            crc32,
            block_crcs,
        })
    }
}

/// Summary of an object for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}

/// The catalog; see the module docs.
///
/// An I/O error leaves redb refusing every later transaction ("Previous
/// I/O error occurred") until it is opened again, so a failure is kept as
/// a state (`fault`, shown by Status and logged once), and the next
/// operation closes and reopens the database first: once the disk has room
/// again, the catalog works again without a restart. redb's commit
/// protocol leaves the file at its last durable commit, which the reopen
/// finds.
pub struct Catalog {
    /// `None` between closing a failed database and reopening it.
    db: std::sync::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    /// Where the database lives, if not in redb's own file backend.
    backend: Option<BackendFactory>,
    /// Why the catalog is failing, while it is.
    fault: std::sync::Mutex<Option<Fault>>,
}

/// A catalog failure: why, and whether the database must be reopened
/// before the next transaction. It lasts until a write commits.
#[derive(Debug, Clone)]
struct Fault {
    reason: String,
    reopen: bool,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

/// Creates `path` readable by its owner only (0600) if it is missing, and
/// takes group and other permissions off an existing one: the catalog
/// names every object of every tenant.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

impl Catalog {
    /// Opens or creates the catalog for pool `pool_id`. With `reset`, an
    /// existing catalog is discarded (the pool was just re-formatted).
    pub fn open(path: &Path, pool_id: [u8; 16], reset: bool) -> Result<Self, CatalogError> {
        Self::open_on(path, pool_id, reset, None)
    }

    /// As [`open`](Self::open), on the storage `backend` makes.
    pub fn open_on(
        path: &Path,
        pool_id: [u8; 16],
        reset: bool,
        backend: Option<BackendFactory>,
    ) -> Result<Self, CatalogError> {
        if reset && path.exists() {
            std::fs::remove_file(path).map_err(|e| dberr(redb::Error::Io(e)))?;
        }
        create_private(path).map_err(|e| dberr(redb::Error::Io(e)))?;
        let db = open_database(path, backend.as_ref()).map_err(dberr)?;
        let txn = db.begin_write().map_err(dberr)?;
        {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            let existing = meta
                .get("pool_id")
                .map_err(dberr)?
                .map(|g| g.value().to_vec());
            match existing {
                Some(found) if found != pool_id => {
                    return Err(CatalogError::PoolMismatch {
                        expected: crate::device::pool_id_hex(&pool_id),
                        found: found.iter().map(|b| format!("{b:02x}")).collect(),
                    });
                }
                Some(_) => {
                    let v = meta
                        .get("catalog_version")
                        .map_err(dberr)?
                        .map(|g| g.value().to_vec())
                        .unwrap_or_default();
                    if v != CATALOG_VERSION.to_le_bytes() {
                        return Err(CatalogError::Corrupt(
                            path.display().to_string(),
                            format!("unsupported catalog version {v:?}"),
                        ));
                    }
                }
                None => {
                    meta.insert("pool_id", &pool_id[..]).map_err(dberr)?;
                    meta.insert("catalog_version", &CATALOG_VERSION.to_le_bytes()[..])
                        .map_err(dberr)?;
                    meta.insert("next_dataset_id", &1u64.to_le_bytes()[..])
                        .map_err(dberr)?;
                }
            }
            txn.open_table(DATASETS).map_err(dberr)?;
            txn.open_table(OBJECTS).map_err(dberr)?;
            txn.open_table(UNITS).map_err(dberr)?;
        }
        txn.commit().map_err(dberr)?;
        Ok(Self {
            db: std::sync::RwLock::new(Some(db)),
            path: path.to_owned(),
            backend,
            fault: std::sync::Mutex::new(None),
        })
    }

    /// Why the catalog is failing, if it is.
    pub fn fault(&self) -> Option<String> {
        self.lock_fault().as_ref().map(|f| f.reason.clone())
    }

    fn lock_fault(&self) -> std::sync::MutexGuard<'_, Option<Fault>> {
        self.fault.lock().expect("catalog fault poisoned")
    }

    /// For Status: while the catalog is failing, a write that changes
    /// nothing tries it again, so the state shown is the state now, not
    /// the one of the last ingest.
    pub fn health(&self) -> Option<String> {
        if self.fault().is_some() {
            let _ = self.set_meta(&[("health_probe", Some(&[]))]);
        }
        self.fault()
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, CatalogError> {
        self.recover()?;
        let db = self.db.read().expect("catalog lock poisoned");
        let db = db.as_ref().ok_or_else(|| self.failing())?;
        db.begin_read().map_err(|e| self.observe(dberr(e)))
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, CatalogError> {
        self.recover()?;
        let db = self.db.read().expect("catalog lock poisoned");
        let db = db.as_ref().ok_or_else(|| self.failing())?;
        db.begin_write().map_err(|e| self.observe(dberr(e)))
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), CatalogError> {
        txn.commit().map_err(|e| self.observe(dberr(e)))?;
        if self.lock_fault().take().is_some() {
            tracing::info!(path = %self.path.display(), "catalog writes work again");
        }
        Ok(())
    }

    fn failing(&self) -> CatalogError {
        CatalogError::Failing {
            path: self.path.display().to_string(),
            reason: self.fault().unwrap_or_else(|| "closed".into()),
        }
    }

    /// Records an I/O failure as the catalog's state (logged when it
    /// begins) and says what it means: full, or failing.
    fn observe(&self, e: CatalogError) -> CatalogError {
        let io = match e {
            CatalogError::Db(redb::Error::Io(io)) => io,
            CatalogError::Db(redb::Error::PreviousIo) => {
                self.set_fault("an earlier write failed".into());
                return self.failing();
            }
            other => return other,
        };
        let full = matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
        self.set_fault(io.to_string());
        if full {
            CatalogError::Full {
                path: self.path.display().to_string(),
                source: io,
            }
        } else {
            CatalogError::Failing {
                path: self.path.display().to_string(),
                reason: io.to_string(),
            }
        }
    }

    fn set_fault(&self, reason: String) {
        let mut fault = self.lock_fault();
        if fault.is_none() {
            tracing::error!(
                path = %self.path.display(),
                "catalog failing: {reason}; ingests and deletes fail until a write succeeds again"
            );
        }
        *fault = Some(Fault {
            reason,
            reopen: true,
        });
    }

    /// Reopens the database after a failure (redb refuses everything after
    /// one I/O error until then). The fault itself stays until a write
    /// commits.
    fn recover(&self) -> Result<(), CatalogError> {
        if !self.lock_fault().as_ref().is_some_and(|f| f.reopen) {
            return Ok(());
        }
        let mut db = self.db.write().expect("catalog lock poisoned");
        if !self.lock_fault().as_ref().is_some_and(|f| f.reopen) {
            return Ok(()); // another thread just reopened it
        }
        // The old handle holds the file's lock: close it first.
        drop(db.take());
        match open_database(&self.path, self.backend.as_ref()) {
            Ok(reopened) => {
                *db = Some(reopened);
                if let Some(f) = self.lock_fault().as_mut() {
                    f.reopen = false;
                }
                tracing::info!(path = %self.path.display(), "catalog reopened");
                Ok(())
            }
            Err(e) => {
                drop(db);
                Err(self.observe(dberr(e)))
            }
        }
    }

    /// A `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(META).map_err(dberr)?;
        Ok(t.get(key).map_err(dberr)?.map(|g| g.value().to_vec()))
    }

    /// Sets (`Some`) or removes (`None`) `meta` values, in one durable
    /// transaction.
    pub fn set_meta(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<(), CatalogError> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(META).map_err(dberr)?;
            for (k, v) in entries {
                match v {
                    Some(v) => t.insert(*k, *v).map_err(dberr)?,
                    None => t.remove(*k).map_err(dberr)?,
                };
            }
        }
        self.commit(txn)
    }

    /// Device paths recorded by `device replace` (index → path), read
    /// before the pool is assembled: a replaced device is found where it
    /// now is, whatever the configuration still says. Empty when there is
    /// no catalog yet.
    ///
    /// Also returns the raw `meta["replace"]` record of a replacement that
    /// has not finished.
    #[allow(clippy::type_complexity)]
    pub fn device_overrides(
        path: &Path,
    ) -> Result<(Vec<(u32, std::path::PathBuf)>, Option<Vec<u8>>), CatalogError> {
        if !path.exists() {
            return Ok((Vec::new(), None));
        }
        let db = Database::create(path).map_err(dberr)?;
        let txn = db.begin_read().map_err(dberr)?;
        read_overrides(&txn)
    }

    /// As [`device_overrides`](Self::device_overrides), from this open
    /// catalog (for the pool root).
    #[allow(clippy::type_complexity)]
    pub fn replacements(
        &self,
    ) -> Result<(Vec<(u32, std::path::PathBuf)>, Option<Vec<u8>>), CatalogError> {
        read_overrides(&self.begin_read()?)
    }
}

/// `device_path/N` entries and the pending `replace` record of `meta`.
#[allow(clippy::type_complexity)]
fn read_overrides(
    txn: &redb::ReadTransaction,
) -> Result<(Vec<(u32, std::path::PathBuf)>, Option<Vec<u8>>), CatalogError> {
    {
        let t = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), None)),
            Err(e) => return Err(dberr(e)),
        };
        let mut out = Vec::new();
        for item in t.range("device_path/".."device_path0").map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let index = k.value()["device_path/".len()..]
                .parse::<u32>()
                .map_err(|_| {
                    CatalogError::Corrupt("meta".into(), format!("bad key {:?}", k.value()))
                })?;
            let p = String::from_utf8(v.value().to_vec()).map_err(|_| {
                CatalogError::Corrupt("meta".into(), "device path is not UTF-8".into())
            })?;
            out.push((index, p.into()));
        }
        let pending = t.get("replace").map_err(dberr)?.map(|g| g.value().to_vec());
        Ok((out, pending))
    }
}

impl Catalog {
    /// Replaces dataset `name`'s record (its manifest was just written).
    pub fn put_dataset_record(
        &self,
        name: &str,
        record: &DatasetRecord,
    ) -> Result<(), CatalogError> {
        let txn = self.begin_write()?;
        txn.open_table(DATASETS)
            .map_err(dberr)?
            .insert(name, &record.encode()[..])
            .map_err(dberr)?;
        self.commit(txn)
    }

    /// The devices' root generation this catalog matches (0: none yet).
    pub fn root_generation(&self) -> Result<u64, CatalogError> {
        Ok(self
            .meta("root_generation")?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    /// The next dataset id an ingest will take.
    pub fn next_dataset_id(&self) -> Result<u64, CatalogError> {
        Ok(self
            .meta("next_dataset_id")?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(1))
    }

    /// Every object of dataset `id` with its record, in path order (for
    /// its manifest).
    pub fn dataset_objects(&self, id: u64) -> Result<Vec<(String, ObjectRecord)>, CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(OBJECTS).map_err(dberr)?;
        let mut out = Vec::new();
        for item in t.range((id, "")..(id + 1, "")).map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            out.push((k.value().1.to_owned(), ObjectRecord::decode(v.value())?));
        }
        Ok(out)
    }

    pub fn datasets(&self) -> Result<Vec<(String, DatasetRecord)>, CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(DATASETS).map_err(dberr)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            out.push((k.value().to_owned(), DatasetRecord::decode(v.value())?));
        }
        Ok(out)
    }

    /// Makes a dataset visible, atomically with all of its objects. Assigns
    /// and returns the dataset id. The caller has already made the object
    /// bytes durable.
    ///
    /// `record.id` is either 0 (assign the next id) or one returned by
    /// [`reserve_dataset_id`](Self::reserve_dataset_id). `unit_crcs` are the
    /// stripe-unit CRCs of an erasure-coded dataset: `width` per stripe.
    pub fn commit_dataset(
        &self,
        name: &str,
        record: DatasetRecord,
        objects: &[(String, ObjectRecord)],
        unit_crcs: &[u32],
    ) -> Result<DatasetRecord, CatalogError> {
        self.commit_dataset_at(name, record, objects, unit_crcs, None)
    }

    /// As [`commit_dataset`](Self::commit_dataset), recording in the same
    /// transaction that the catalog now matches the devices' root of
    /// `root_generation`. A given id also moves `next_dataset_id` past it
    /// (a dataset imported from the devices keeps its id).
    pub fn commit_dataset_at(
        &self,
        name: &str,
        mut record: DatasetRecord,
        objects: &[(String, ObjectRecord)],
        unit_crcs: &[u32],
        root_generation: Option<u64>,
    ) -> Result<DatasetRecord, CatalogError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            let mut datasets = txn.open_table(DATASETS).map_err(dberr)?;
            if datasets.get(name).map_err(dberr)?.is_some() {
                return Err(CatalogError::DatasetExists(name.to_owned()));
            }
            if record.id == 0 {
                record.id = take_dataset_id(&mut meta)?;
            } else {
                let next = meta_u64(&meta, "next_dataset_id")?;
                if next <= record.id {
                    meta.insert("next_dataset_id", &(record.id + 1).to_le_bytes()[..])
                        .map_err(dberr)?;
                }
            }
            if let Some(g) = root_generation {
                meta.insert("root_generation", &g.to_le_bytes()[..])
                    .map_err(dberr)?;
            }
            let id = record.id;
            if let StorageClass::Ec {
                data_units,
                parity_units,
            } = record.class
            {
                let width = (usize::from(data_units) + usize::from(parity_units))
                    * record.unit_rows.max(1) as usize;
                let mut units = txn.open_table(UNITS).map_err(dberr)?;
                for (stripe, crcs) in unit_crcs.chunks(width).enumerate() {
                    let v: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
                    units.insert((id, stripe as u64), &v[..]).map_err(dberr)?;
                }
            }
            let mut objs = txn.open_table(OBJECTS).map_err(dberr)?;
            for (path, o) in objects {
                objs.insert((id, path.as_str()), &o.encode()[..])
                    .map_err(dberr)?;
            }
            datasets.insert(name, &record.encode()[..]).map_err(dberr)?;
        }
        self.commit(txn)?;
        Ok(record)
    }

    /// Takes a dataset id for an ingest about to start, so that what it
    /// writes can be bound to the id before it commits. An id taken by an
    /// ingest that never commits is simply never used.
    pub fn reserve_dataset_id(&self) -> Result<u64, CatalogError> {
        let txn = self.begin_write()?;
        let id;
        {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            id = take_dataset_id(&mut meta)?;
        }
        self.commit(txn)?;
        Ok(id)
    }

    /// Every stripe's unit CRCs of an erasure-coded dataset, `width` per
    /// stripe, in stripe order (for its manifest).
    pub fn all_unit_crcs(&self, dataset_id: u64, width: usize) -> Result<Vec<u32>, CatalogError> {
        let stripes = {
            let txn = self.begin_read()?;
            let t = txn.open_table(UNITS).map_err(dberr)?;
            t.range((dataset_id, 0)..(dataset_id + 1, 0))
                .map_err(dberr)?
                .count() as u64
        };
        self.unit_crcs(dataset_id, width, 0, stripes)
    }

    /// The unit CRCs of stripes `[first, first + count)` of an
    /// erasure-coded dataset, `width` per stripe, in stripe order. A
    /// missing stripe is a corrupt catalog.
    pub fn unit_crcs(
        &self,
        dataset_id: u64,
        width: usize,
        first: u64,
        count: u64,
    ) -> Result<Vec<u32>, CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(UNITS).map_err(dberr)?;
        let mut out = Vec::with_capacity((count as usize).min(1 << 16) * width);
        let mut expect = first;
        for item in t
            .range((dataset_id, first)..(dataset_id, first + count))
            .map_err(dberr)?
        {
            let (k, v) = item.map_err(dberr)?;
            let v = v.value();
            if k.value().1 != expect || v.len() != width * 4 {
                break;
            }
            out.extend(
                v.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4"))),
            );
            expect += 1;
        }
        if expect != first + count {
            return Err(CatalogError::Corrupt(
                format!("dataset id {dataset_id}"),
                format!("unit checksums of stripe {expect} are missing or malformed"),
            ));
        }
        Ok(out)
    }

    pub fn get_object(
        &self,
        dataset_id: u64,
        path: &str,
    ) -> Result<Option<ObjectRecord>, CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(OBJECTS).map_err(dberr)?;
        match t.get((dataset_id, path)).map_err(dberr)? {
            Some(g) => Ok(Some(ObjectRecord::decode(g.value())?)),
            None => Ok(None),
        }
    }

    /// Looks up many objects in one read transaction.
    pub fn get_objects(
        &self,
        dataset_id: u64,
        paths: &[&str],
    ) -> Result<Vec<Option<ObjectRecord>>, CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(OBJECTS).map_err(dberr)?;
        paths
            .iter()
            .map(|p| match t.get((dataset_id, *p)).map_err(dberr)? {
                Some(g) => Ok(Some(ObjectRecord::decode(g.value())?)),
                None => Ok(None),
            })
            .collect()
    }

    /// Up to `limit` objects whose path starts with `prefix`, after
    /// `start_after` (exclusive), in path order. The flag says whether more
    /// follow.
    pub fn list_objects(
        &self,
        dataset_id: u64,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ObjectSummary>, bool), CatalogError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(OBJECTS).map_err(dberr)?;
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded((dataset_id, after)),
            _ => Bound::Included((dataset_id, prefix)),
        };
        let upper = Bound::Excluded((dataset_id + 1, ""));
        let mut out = Vec::with_capacity(limit.min(10_000));
        for item in t.range::<(u64, &str)>((lower, upper)).map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let (_, path) = k.value();
            if !path.starts_with(prefix) {
                break;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            let (size, _, crc32) = ObjectRecord::decode_summary(v.value())?;
            out.push(ObjectSummary {
                path: path.to_owned(),
                size,
                crc32,
            });
        }
        Ok((out, false))
    }

    /// Removes a dataset and all its objects in one transaction. Returns the
    /// record so the caller can free its extents, or None if absent.
    pub fn delete_dataset(&self, name: &str) -> Result<Option<DatasetRecord>, CatalogError> {
        self.delete_dataset_at(name, None)
    }

    /// As [`delete_dataset`](Self::delete_dataset), recording the devices'
    /// root generation it matches in the same transaction.
    pub fn delete_dataset_at(
        &self,
        name: &str,
        root_generation: Option<u64>,
    ) -> Result<Option<DatasetRecord>, CatalogError> {
        let txn = self.begin_write()?;
        let record;
        {
            if let Some(g) = root_generation {
                txn.open_table(META)
                    .map_err(dberr)?
                    .insert("root_generation", &g.to_le_bytes()[..])
                    .map_err(dberr)?;
            }
            let mut datasets = txn.open_table(DATASETS).map_err(dberr)?;
            record = match datasets.remove(name).map_err(dberr)? {
                Some(g) => DatasetRecord::decode(g.value())?,
                None => return Ok(None),
            };
            let mut objs = txn.open_table(OBJECTS).map_err(dberr)?;
            objs.retain_in::<(u64, &str), _>((record.id, "")..(record.id + 1, ""), |_, _| false)
                .map_err(dberr)?;
            let mut units = txn.open_table(UNITS).map_err(dberr)?;
            units
                .retain_in::<(u64, u64), _>((record.id, 0)..(record.id + 1, 0), |_, _| false)
                .map_err(dberr)?;
        }
        self.commit(txn)?;
        Ok(Some(record))
    }
}

/// A u64 of `meta` (0 when absent or malformed).
fn meta_u64(meta: &redb::Table<&str, &[u8]>, key: &str) -> Result<u64, CatalogError> {
    Ok(meta
        .get(key)
        .map_err(dberr)?
        .map(|g| u64::from_le_bytes(g.value().try_into().unwrap_or([0; 8])))
        .unwrap_or(0))
}

/// Returns `next_dataset_id` and advances it, in the caller's transaction.
fn take_dataset_id(meta: &mut redb::Table<&str, &[u8]>) -> Result<u64, CatalogError> {
    let id = meta
        .get("next_dataset_id")
        .map_err(dberr)?
        .map(|g| u64::from_le_bytes(g.value().try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    if id == 0 {
        return Err(CatalogError::Corrupt(
            "meta".into(),
            "next_dataset_id missing".into(),
        ));
    }
    meta.insert("next_dataset_id", &(id + 1).to_le_bytes()[..])
        .map_err(dberr)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(size: u64, at: u64) -> ObjectRecord {
        ObjectRecord {
            size,
            logical_offset: at,
            crc32: 0xdead_beef,
            block_crcs: vec![1, 2, 3],
        }
    }

    fn ds() -> DatasetRecord {
        DatasetRecord {
            id: 0,
            class: StorageClass::Stripe,
            checksum_block_bytes: 32768,
            created_unix_ms: 5,
            object_count: 3,
            total_bytes: 30,
            allocated_bytes: 12288,
            extents: vec![Extent {
                offset: 0,
                len: 12288,
            }],
            owner: String::new(),
            manifest: None,
            unit_rows: 1,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        // Guards the catalog's record decoders against damaged bytes: any
        // input decodes to a record that encodes back to the same bytes
        // (current version) or to itself, or is a named error; never a
        // panic or a huge allocation.
        #[test]
        fn record_decoders_take_any_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            seed in proptest::prelude::any::<u64>(),
        ) {
            // Mutations of valid records reach deeper than random bytes.
            let mut mutated = ds().encode();
            let mut objrec = obj(70000, 8192).encode();
            if !mutated.is_empty() {
                let i = (seed as usize) % mutated.len();
                mutated[i] ^= (seed >> 32) as u8 | 1;
                let j = (seed as usize >> 8) % objrec.len();
                objrec[j] ^= (seed >> 40) as u8 | 1;
            }
            for b in [&bytes, &mutated, &objrec] {
                if let Ok(r) = DatasetRecord::decode(b) {
                    let again = r.encode();
                    proptest::prop_assert_eq!(DatasetRecord::decode(&again).unwrap(), r);
                    if b[0] == DATASET_RECORD_VERSION {
                        proptest::prop_assert_eq!(&again, b);
                    }
                }
                if let Ok(o) = ObjectRecord::decode(b) {
                    proptest::prop_assert_eq!(&o.encode(), b);
                }
                let _ = ObjectRecord::decode_summary(b);
            }
        }
    }

    #[test]
    fn records_round_trip() {
        let d = DatasetRecord {
            id: 9,
            owner: "vision".into(),
            manifest: Some(Extent {
                offset: 1 << 20,
                len: 4 << 20,
            }),
            ..ds()
        };
        assert_eq!(DatasetRecord::decode(&d.encode()).unwrap(), d);
        // Version 1 (no owner) and 2 (no manifest) records still read.
        let mut v2 = ds().encode();
        v2[0] = 2;
        v2.truncate(v2.len() - 5);
        assert_eq!(DatasetRecord::decode(&v2).unwrap(), ds());
        let mut v1 = v2.clone();
        v1[0] = 1;
        v1.pop();
        assert_eq!(DatasetRecord::decode(&v1).unwrap(), ds());
        let o = obj(70000, 8192);
        assert_eq!(ObjectRecord::decode(&o.encode()).unwrap(), o);
        assert!(ObjectRecord::decode(&o.encode()[..20]).is_err());
        let mut bad = d.encode();
        bad[1] = 99;
        assert!(DatasetRecord::decode(&bad).is_err());
    }

    #[test]
    fn commit_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let c = Catalog::open(&path, [1; 16], false).unwrap();
        let objects: Vec<(String, ObjectRecord)> = ["a/1", "a/2", "b/1"]
            .iter()
            .enumerate()
            .map(|(i, p)| (p.to_string(), obj(10, i as u64 * 4096)))
            .collect();
        let d = c.commit_dataset("ds", ds(), &objects, &[]).unwrap();
        assert_eq!(d.id, 1);
        assert!(matches!(
            c.commit_dataset("ds", ds(), &[], &[]),
            Err(CatalogError::DatasetExists(_))
        ));
        let d2 = c.commit_dataset("other", ds(), &objects, &[]).unwrap();
        assert_eq!(d2.id, 2);
        let (page, more) = c.list_objects(1, "", None, 2).unwrap();
        assert_eq!(
            page.iter().map(|o| o.path.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2"]
        );
        assert!(more);
        let (page, more) = c.list_objects(1, "", Some("a/2"), 2).unwrap();
        assert_eq!(page.len(), 1);
        assert!(!more);
        let (page, _) = c.list_objects(1, "b/", None, 10).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(
            c.get_object(1, "a/2").unwrap().unwrap().logical_offset,
            4096
        );
        assert!(c.get_object(1, "zz").unwrap().is_none());
        drop(c);
        // Reopen: durable, and a different pool is refused.
        assert!(matches!(
            Catalog::open(&path, [2; 16], false),
            Err(CatalogError::PoolMismatch { .. })
        ));
        let c = Catalog::open(&path, [1; 16], false).unwrap();
        assert_eq!(c.datasets().unwrap().len(), 2);
        let gone = c.delete_dataset("ds").unwrap().unwrap();
        assert_eq!(gone.id, 1);
        assert!(c.get_object(1, "a/1").unwrap().is_none());
        assert!(c.get_object(2, "a/1").unwrap().is_some());
        assert!(c.delete_dataset("ds").unwrap().is_none());
    }

    #[test]
    fn ec_record_and_unit_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.redb"), [1; 16], false).unwrap();
        let mut rec = ds();
        rec.class = StorageClass::Ec {
            data_units: 3,
            parity_units: 1,
        };
        assert_eq!(DatasetRecord::decode(&rec.encode()).unwrap(), rec);
        let id = c.reserve_dataset_id().unwrap();
        assert_eq!(id, 1);
        rec.id = id;
        let crcs: Vec<u32> = (0..12).collect();
        let d = c.commit_dataset("ec", rec, &[], &crcs).unwrap();
        assert_eq!(d.id, 1);
        assert_eq!(c.unit_crcs(1, 4, 0, 3).unwrap(), crcs);
        assert_eq!(c.unit_crcs(1, 4, 1, 1).unwrap(), vec![4, 5, 6, 7]);
        // Past the last stripe, or the wrong width: corrupt, never short.
        assert!(matches!(
            c.unit_crcs(1, 4, 2, 2),
            Err(CatalogError::Corrupt(..))
        ));
        assert!(matches!(
            c.unit_crcs(1, 5, 0, 1),
            Err(CatalogError::Corrupt(..))
        ));
        // The next plain commit does not reuse the reserved id.
        assert_eq!(c.commit_dataset("s", ds(), &[], &[]).unwrap().id, 2);
        c.delete_dataset("ec").unwrap().unwrap();
        assert!(c.unit_crcs(1, 4, 0, 1).is_err());
    }
}
