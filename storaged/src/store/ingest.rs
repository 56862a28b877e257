//! Ingest: a session writes objects back to back into space it reserves,
//! through a writer that turns the byte stream into stripe-unit device
//! writes (or `ec` stripes), and commits the dataset once every byte is
//! durable.

use super::writer::{ClassWriter, EcIngest, StripeWriter};
use super::*;
use crate::catalog::CatalogError;
use crate::error::{IngestError, Limit};

/// Logical space an ingest takes from the allocator at a time.
pub(super) const RESERVATION_BYTES: u64 = 64 << 20;

impl Store {
    /// Starts an ingest of a new dataset `name`.
    pub fn begin_ingest(
        self: &Arc<Self>,
        name: DatasetName,
        class: StorageClass,
        owner: quota::OwnerQuota,
    ) -> Result<IngestSession, IngestError> {
        let missing = self.missing_devices();
        if missing.iter().any(|m| *m) {
            return Err(IngestError::Degraded {
                missing: (0..missing.len() as u32)
                    .filter(|d| missing[*d as usize])
                    .collect(),
            });
        }
        let geometry = match class {
            StorageClass::Stripe => None,
            StorageClass::Ec {
                data_units,
                parity_units,
            } => {
                let g = EcGeometry::new(u32::from(data_units), u32::from(parity_units))
                    .and_then(|g| g.check_fits(self.layout.device_count).map(|()| g))?;
                Some(g)
            }
        };
        if self
            .data
            .datasets
            .read()
            .expect("dataset map poisoned")
            .contains_key(name.as_str())
        {
            return Err(IngestError::DatasetExists(name.to_string()));
        }
        {
            let mut ing = self.data.ingesting.lock().expect("ingest set poisoned");
            if ing.contains(name.as_str()) {
                return Err(IngestError::InProgress(name.to_string()));
            }
            if ing.len() >= self.limits.ingests_concurrent_max {
                return Err(StoreError::Limit {
                    limit: Limit::IngestsConcurrent,
                    asked: ing.len() as u64,
                    max: self.limits.ingests_concurrent_max as u64,
                }
                .into());
            }
            let (_, datasets) = self.owner_usage(&owner.owner);
            self.data.quota.begin_dataset(&owner, datasets)?;
            ing.insert(name.to_string());
        }
        let writer = match self.class_writer(geometry) {
            Ok(w) => w,
            Err(e) => {
                self.data
                    .ingesting
                    .lock()
                    .expect("ingest set poisoned")
                    .remove(name.as_str());
                self.data.quota.end_dataset(&owner.owner, 0);
                return Err(e.into());
            }
        };
        let owner_bytes = self.owner_usage(&owner.owner).0;
        Ok(IngestSession {
            writer,
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
            total_bytes: 0,
            committed: false,
        })
    }
}

impl Store {
    /// The writer of a new ingest: stripe units, or `ec` stripes of
    /// `geometry` (which take their dataset id now: it is in their CRCs).
    fn class_writer(&self, geometry: Option<EcGeometry>) -> Result<ClassWriter, CatalogError> {
        Ok(match geometry {
            None => ClassWriter::Stripe(StripeWriter::new(
                self.layout,
                self.limits.ingest_write_depth,
            )),
            Some(geometry) => {
                let dataset_id = self.data.catalog.reserve_dataset_id()?;
                ClassWriter::Ec(Box::new(EcIngest {
                    map: EcMap::new(geometry, self.layout, &[]),
                    writer: redundancy::EcWriter::new(
                        dataset_id,
                        geometry,
                        self.layout.stripe_unit_bytes,
                        self.limits.ingest_write_depth,
                    ),
                    data_end: 0,
                    dataset_id,
                }))
            }
        })
    }
}

pub(super) struct CurrentObject {
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

/// An ingest in progress; see the module docs. Dropping it without
/// [`commit`](Self::commit) discards everything.
pub struct IngestSession {
    writer: ClassWriter,
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
    pub(super) fn carve_ec(&mut self, len: u64) -> Result<u64, StoreError> {
        let len = len.next_multiple_of(BLOCK_BYTES);
        let layout = self.store.layout;
        let row = layout.stripe_unit_bytes * u64::from(layout.device_count);
        let ClassWriter::Ec(ec) = &mut self.writer else {
            unreachable!("carve_ec is only called for an ec ingest")
        };
        let g = ec.map.geometry;
        while ec.data_end + len > ec.map.data_capacity_bytes() {
            let short = ec.data_end + len - ec.map.data_capacity_bytes();
            // Rows holding `short` data bytes, plus one for the stripe
            // that straddles the last row.
            let rows = (short * u64::from(g.width())).div_ceil(g.k() as u64 * row) + 1;
            let got = self
                .store
                .data
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

    pub(super) fn carve(&mut self, len: u64) -> Result<u64, StoreError> {
        if let ClassWriter::Ec(_) = self.writer {
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
        self.release_reservation();
        let got = self
            .store
            .data
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
    pub(super) fn check_tree(&mut self, path: &str) -> Result<(), IngestError> {
        let conflict = |other: &str| IngestError::TreeConflict {
            dataset: self.name.to_string(),
            path: path.to_owned(),
            other: other.to_owned(),
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
    ) -> Result<(), IngestError> {
        if let Some(cur) = &self.current {
            return Err(IngestError::ObjectIncomplete {
                path: cur.path.clone(),
                received: cur.received,
                size: cur.size,
            });
        }
        if self.objects.len() >= self.store.limits.ingest_objects_max {
            return Err(StoreError::Limit {
                limit: Limit::DatasetObjects,
                asked: self.objects.len() as u64 + 1,
                max: self.store.limits.ingest_objects_max as u64,
            }
            .into());
        }
        let capacity = self.store.layout.capacity_bytes();
        if size > capacity {
            // Checked before any arithmetic on `size`: a hostile header must
            // not overflow the rounding or size a huge checksum vector.
            return Err(StoreError::NoSpace {
                needed: size,
                free: self
                    .store
                    .data
                    .alloc
                    .lock()
                    .expect("allocator poisoned")
                    .free_bytes(),
                largest_free: capacity,
            }
            .into());
        }
        // Before any byte of it is written (and before the tree check,
        // so a refused object leaves no trace): a tenant over its quota
        // fails here.
        self.store
            .data
            .quota
            .add_bytes(&self.owner, self.owner_bytes, size)?;
        self.declared_bytes += size;
        if self.paths.contains(path.as_str()) {
            return Err(IngestError::DuplicateObject {
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
    pub async fn data(&mut self, bytes: &[u8]) -> Result<(), IngestError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(IngestError::DataOutsideObject);
        };
        if cur.received + bytes.len() as u64 > cur.size {
            return Err(IngestError::TooMuchData {
                path: cur.path.clone(),
                size: cur.size,
            });
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
        self.writer.write_at(&store.write_io(), at, bytes).await?;
        if done {
            self.end_object().await?;
        }
        Ok(())
    }

    pub(super) async fn end_object(&mut self) -> Result<(), IngestError> {
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
            return Err(IngestError::CrcMismatch {
                path: cur.path,
                client: c,
                actual: crc32,
            });
        }
        if cur.size > 0 {
            let store = Arc::clone(&self.store);
            self.writer.pad_to_block(&store.write_io()).await?;
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
    ///
    /// Runs to its end on its own task even if the caller stops waiting
    /// (a client that disconnects during its commit drops the handler's
    /// future): a commit cut between its steps would leave the dataset
    /// durable on the devices but not visible, its space held by nobody.
    /// Either the dataset is committed and visible or it is aborted and
    /// its space freed.
    pub async fn commit(
        self,
        object_count: u64,
        total_bytes: u64,
    ) -> Result<Arc<DatasetHandle>, IngestError> {
        tokio::spawn(self.commit_to_the_end(object_count, total_bytes)).await?
    }

    async fn commit_to_the_end(
        mut self,
        object_count: u64,
        total_bytes: u64,
    ) -> Result<Arc<DatasetHandle>, IngestError> {
        if let Some(cur) = &self.current {
            return Err(IngestError::CommitWhileOpen {
                path: cur.path.clone(),
                received: cur.received,
                size: cur.size,
            });
        }
        if object_count != self.objects.len() as u64 || total_bytes != self.total_bytes {
            return Err(IngestError::CommitMismatch {
                said_objects: object_count,
                said_bytes: total_bytes,
                objects: self.objects.len() as u64,
                bytes: self.total_bytes,
            });
        }
        let store = Arc::clone(&self.store);
        self.writer.finish(&store.write_io()).await?;
        // Data durable before the catalog refers to it.
        store.sync_all().await?;
        let (extents, unit_crcs, id) = self.settle_extents();
        let allocated_bytes = extents.iter().map(|e| e.len).sum();
        // The manifest names the dataset id: a stripe dataset takes its id
        // now (an ec one took it when it started).
        let id = match id {
            Some(id) => id,
            None => match reserve_dataset_id(&store).await {
                Ok(id) => id,
                Err(e) => {
                    self.extents = extents;
                    return Err(e);
                }
            },
        };
        let record = DatasetRecord {
            manifest: None,
            unit_rows: self.writer.unit_rows(),
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
        let manifest = crate::poolmeta::Manifest {
            name: self.name.to_string(),
            record,
            objects: std::mem::take(&mut self.objects),
            unit_crcs,
        };
        let (committed, times) = self.commit_manifest(manifest).await?;
        self.committed = true;
        let handle = Arc::new(DatasetHandle::new(
            self.name.to_string(),
            committed,
            store.layout,
            Arc::clone(&store.data.space),
        ));
        store
            .data
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

    /// Gives the unused part of the current reservation back to the
    /// allocator (it was never written).
    fn release_reservation(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.store
                .data
                .alloc
                .lock()
                .expect("allocator poisoned")
                .release(r)
                .expect("reservation is ours");
        }
    }

    /// Gives back the unused reservation (and an `ec` ingest's spare rows)
    /// and returns the extents the dataset keeps, its unit CRCs, and its id
    /// if it took one already.
    fn settle_extents(&mut self) -> (Vec<Extent>, Vec<u32>, Option<u64>) {
        self.release_reservation();
        let store = Arc::clone(&self.store);
        match &mut self.writer {
            ClassWriter::Stripe(_) => {
                let mut extents = std::mem::take(&mut self.extents);
                coalesce(&mut extents);
                (extents, Vec::new(), None)
            }
            ClassWriter::Ec(ec) => {
                let layout = store.layout;
                let row = layout.stripe_unit_bytes * u64::from(layout.device_count);
                let units = ec.writer.stripes() * u64::from(ec.map.geometry.width());
                let rows_used = units.div_ceil(u64::from(layout.device_count));
                let (kept, spare) = split_rows(std::mem::take(&mut self.extents), rows_used, row);
                let mut alloc = store.data.alloc.lock().expect("allocator poisoned");
                for e in spare {
                    alloc.release(e).expect("rows are ours");
                }
                drop(alloc);
                (
                    kept,
                    std::mem::take(&mut ec.writer.unit_crcs),
                    Some(ec.dataset_id),
                )
            }
        }
    }

    /// Writes the manifest to rows of its own on every device and commits
    /// the catalog: the moment the dataset exists. On failure the extents
    /// go back to the session, whose drop frees them.
    async fn commit_manifest(
        &mut self,
        mut manifest: crate::poolmeta::Manifest,
    ) -> Result<(DatasetRecord, pool_root::CommitTimes), IngestError> {
        let store = Arc::clone(&self.store);
        // Its length does not depend on where its rows are.
        manifest.record.manifest = Some(Extent { offset: 0, len: 0 });
        let bytes = manifest.encoded_len() as u64;
        let rows = match store.data.pool_root.allocate_rows(&store.data.space, bytes) {
            Ok(r) => r,
            Err(e) => {
                self.extents = std::mem::take(&mut manifest.record.extents);
                return Err(e.into());
            }
        };
        manifest.record.manifest = Some(rows);
        let committed = tokio::task::spawn_blocking(move || {
            let r = store.data.pool_root.commit(&store.data.catalog, &manifest);
            (r, manifest.record)
        })
        .await;
        match committed {
            Ok((Ok(r), _)) => Ok(r),
            Ok((Err(e), record)) => {
                // Put the extents back so Drop frees them.
                self.extents = record.owned_extents();
                Err(e.into())
            }
            // The task panicked: its rows are lost until restart (the
            // catalog did not commit, so they are free then).
            Err(e) => Err(IngestError::TaskFailed(e)),
        }
    }
}

/// A new dataset id from the catalog, off the runtime's threads.
async fn reserve_dataset_id(store: &Arc<Store>) -> Result<u64, IngestError> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || store.data.catalog.reserve_dataset_id()).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(IngestError::TaskFailed(e)),
    }
}

impl Drop for IngestSession {
    fn drop(&mut self) {
        self.store
            .data
            .ingesting
            .lock()
            .expect("ingest set poisoned")
            .remove(self.name.as_str());
        self.store
            .data
            .quota
            .end_dataset(&self.owner.owner, self.declared_bytes);
        if self.committed {
            return;
        }
        let mut space = std::mem::take(&mut self.extents);
        space.extend(self.reservation.take());
        let writes = self.writer.take_writes();
        let free = Arc::clone(&self.store.data.space);
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
pub(super) fn split_rows(
    extents: Vec<Extent>,
    mut rows: u64,
    row: u64,
) -> (Vec<Extent>, Vec<Extent>) {
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
