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

mod records;
pub use records::{DatasetRecord, OWNER_BYTES_MAX, ObjectRecord, ObjectSummary};

#[cfg(test)]
mod tests;
