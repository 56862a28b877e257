//! The catalog kept in step with the pool's root on the devices
//! (`crate::poolmeta` has the formats and the ordering rule).
//!
//! Every commit and delete changes the root first and the catalog second,
//! both under one lock, so the catalog's `root_generation` is the root's
//! or one behind it (a crash between the two). At start [`reconcile`]
//! brings a missing, damaged, restored or lagging catalog up to the root,
//! reading each dataset it lacks from its manifest; [`PoolRoot::adopt`]
//! gives manifests to datasets from before roots and writes the first
//! root.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::alloc::Extent;
use crate::catalog::{Catalog, DatasetRecord, ObjectRecord};
use crate::error::{OpenError, StoreError};
use crate::poolmeta::{Manifest, MetaDevices, PoolMetaError, Root, RootEntry, manifest_rows_len};

use super::discard::FreeSpace;

/// What start-up found on the devices and did to the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The data-dir catalog was missing, empty or behind the devices.
    pub catalog_behind: bool,
    /// Datasets added to the catalog from their manifests.
    pub datasets_imported: u64,
    /// Datasets the catalog had that the devices say were deleted.
    pub datasets_dropped: u64,
    /// Datasets given a manifest at this start (from before manifests).
    pub manifests_written: u64,
    /// The root's generation after start.
    pub generation: u64,
}

/// Where a commit's time went: the manifest and root on the devices
/// (encoding, writes, fdatasyncs), and the catalog transaction.
#[derive(Debug, Clone, Copy)]
pub struct CommitTimes {
    pub devices_ms: f64,
    pub catalog_ms: f64,
}

/// The devices' metadata and the root they hold now.
#[derive(Debug)]
pub struct PoolRoot {
    /// Written only when a replaced device joins (under `root`'s lock).
    devices: std::sync::RwLock<MetaDevices>,
    layout: crate::layout::StripeLayout,
    /// The current root. Held across a change's root write and catalog
    /// transaction, which keeps the two in the same order.
    root: Mutex<Root>,
}

/// Brings `catalog` up to the newest root on the devices, if it is behind.
/// Returns that root (or an empty one of generation 0 when the devices
/// hold none: a new pool, or one from before roots).
pub fn reconcile(
    catalog: &Catalog,
    devices: &MetaDevices,
    pool_id: [u8; 16],
) -> Result<(Root, Recovery), OpenError> {
    let mut recovery = Recovery::default();
    let Some(root) = devices.read_newest_root(pool_id) else {
        return Ok((
            Root {
                pool_id,
                ..Root::default()
            },
            recovery,
        ));
    };
    let at = catalog.root_generation()?;
    if at >= root.generation {
        recovery.generation = root.generation;
        return Ok((root, recovery));
    }
    recovery.catalog_behind = true;
    let have: BTreeMap<String, DatasetRecord> = catalog.datasets()?.into_iter().collect();
    let wanted: BTreeMap<&str, &RootEntry> =
        root.entries.iter().map(|e| (e.name.as_str(), e)).collect();
    for (name, record) in &have {
        if wanted
            .get(name.as_str())
            .is_none_or(|e| e.dataset_id != record.id)
        {
            catalog.delete_dataset(name)?;
            recovery.datasets_dropped += 1;
            tracing::warn!(dataset = %name, id = record.id, "the devices say this dataset was deleted; dropped from the catalog");
        }
    }
    for entry in &root.entries {
        if have
            .get(&entry.name)
            .is_some_and(|r| r.id == entry.dataset_id)
        {
            continue;
        }
        let m = devices.read_manifest(entry)?;
        catalog.commit_dataset(&m.name, m.record, &m.objects, &m.unit_crcs)?;
        recovery.datasets_imported += 1;
    }
    let next = catalog.next_dataset_id()?.max(root.next_dataset_id);
    // Where replaced devices are, and a replacement under way, as the
    // devices remember them.
    let keys: Vec<String> = root
        .replaced
        .iter()
        .map(|(i, _)| format!("device_path/{i}"))
        .collect();
    let next_bytes = next.to_le_bytes();
    let generation_bytes = root.generation.to_le_bytes();
    let mut entries: Vec<(&str, Option<&[u8]>)> = vec![
        ("next_dataset_id", Some(&next_bytes[..])),
        ("root_generation", Some(&generation_bytes[..])),
        ("replace", root.replacing.as_deref()),
    ];
    for (k, (_, p)) in keys.iter().zip(&root.replaced) {
        entries.push((k.as_str(), Some(p.as_bytes())));
    }
    catalog.set_meta(&entries)?;
    recovery.generation = root.generation;
    tracing::warn!(
        generation = root.generation,
        catalog_was_at = at,
        imported = recovery.datasets_imported,
        dropped = recovery.datasets_dropped,
        "the catalog was behind the pool's devices (lost, damaged or restored from a backup); rebuilt from the manifests on the devices"
    );
    Ok((root, recovery))
}

impl PoolRoot {
    pub fn new(devices: MetaDevices, root: Root) -> Self {
        Self {
            layout: devices.layout,
            devices: std::sync::RwLock::new(devices),
            root: Mutex::new(root),
        }
    }

    fn devices(&self) -> std::sync::RwLockReadGuard<'_, MetaDevices> {
        self.devices.read().expect("pool root devices poisoned")
    }

    /// A replaced device joins: it gets a copy of every manifest (read
    /// from the others) and, with every device, the next root. Blocking.
    pub fn add_device(
        &self,
        index: u32,
        file: Arc<dyn crate::engine::DeviceFile>,
    ) -> Result<(), StoreError> {
        let mut root = self.lock();
        let mut devices = self.devices.write().expect("pool root devices poisoned");
        if let Some(slot) = devices.files.get_mut(index as usize) {
            *slot = None;
        }
        let mut copies = Vec::with_capacity(root.entries.len());
        for entry in &root.entries {
            copies.push((entry.manifest_rows, devices.read_manifest(entry)?.encode()));
        }
        if let Some(slot) = devices.files.get_mut(index as usize) {
            *slot = Some(file);
        }
        for (rows, encoded) in copies {
            devices.write_manifest_to(index, rows, &encoded)?;
        }
        let mut next = root.clone();
        next.generation += 1;
        devices.write_root(&next)?;
        *root = next;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Root> {
        self.root.lock().expect("pool root poisoned")
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Rows for a manifest of `bytes`, from the allocator.
    pub fn allocate_rows(&self, space: &FreeSpace, bytes: u64) -> Result<Extent, StoreError> {
        let layout = self.layout;
        let row = layout.stripe_unit_bytes * u64::from(layout.device_count);
        let len = manifest_rows_len(layout, bytes);
        space
            .allocate(|a| a.allocate_aligned(len, row))
            .map_err(|room| StoreError::NoSpace {
                needed: len,
                free: room.free_bytes,
                largest_free: room.largest_free_bytes,
            })
    }

    /// Writes `manifest` (whose record names its rows) to every device,
    /// then the root with it, then commits it to `catalog`. Blocking.
    pub fn commit(
        &self,
        catalog: &Catalog,
        manifest: &Manifest,
    ) -> Result<(DatasetRecord, CommitTimes), StoreError> {
        let started = std::time::Instant::now();
        let rows = manifest
            .record
            .manifest
            .expect("a manifest's record names its rows");
        let encoded = manifest.encode();
        self.devices().write_manifest(rows, &encoded)?;
        let mut root = self.lock();
        let mut next = root.clone();
        next.generation += 1;
        next.next_dataset_id = catalog.next_dataset_id()?.max(manifest.record.id + 1);
        next.entries.retain(|e| e.name != manifest.name);
        next.entries.push(RootEntry {
            name: manifest.name.clone(),
            dataset_id: manifest.record.id,
            manifest_rows: rows,
            manifest_bytes: encoded.len() as u64,
            manifest_crc: crc32fast::hash(&encoded),
        });
        self.devices().write_root(&next)?;
        let on_devices = started.elapsed();
        match catalog.commit_dataset_at(
            &manifest.name,
            manifest.record.clone(),
            &manifest.objects,
            &manifest.unit_crcs,
            Some(next.generation),
        ) {
            Ok(r) => {
                *root = next;
                let times = CommitTimes {
                    devices_ms: on_devices.as_secs_f64() * 1e3,
                    catalog_ms: (started.elapsed() - on_devices).as_secs_f64() * 1e3,
                };
                Ok((r, times))
            }
            Err(e) => {
                // The devices must not keep a dataset the catalog refused:
                // its space is about to be freed.
                self.roll_back(&mut root, next.generation);
                Err(e.into())
            }
        }
    }

    /// Writes the root without dataset `name`, then deletes it from
    /// `catalog`. Blocking.
    pub fn delete(
        &self,
        catalog: &Catalog,
        name: &str,
    ) -> Result<Option<DatasetRecord>, StoreError> {
        let mut root = self.lock();
        let mut next = root.clone();
        next.generation += 1;
        next.entries.retain(|e| e.name != name);
        if next.entries.len() != root.entries.len() {
            self.devices().write_root(&next)?;
        }
        match catalog.delete_dataset_at(name, Some(next.generation)) {
            Ok(r) => {
                if next.entries.len() != root.entries.len() {
                    *root = next;
                }
                Ok(r)
            }
            Err(e) => {
                if next.entries.len() != root.entries.len() {
                    self.roll_back(&mut root, next.generation);
                }
                Err(e.into())
            }
        }
    }

    /// Copies the catalog's replacement records (`device_path/N`, the
    /// pending `replace`) into the next root on every device, so a lost
    /// catalog does not forget where a replaced device is. Blocking.
    pub fn record_replacements(&self, catalog: &Catalog) -> Result<(), StoreError> {
        let (replaced, replacing) = catalog.replacements()?;
        let replaced: Vec<(u32, String)> = replaced
            .into_iter()
            .map(|(i, p)| (i, p.to_string_lossy().into_owned()))
            .collect();
        let mut root = self.lock();
        if root.replaced == replaced && root.replacing == replacing {
            return Ok(());
        }
        let mut next = root.clone();
        next.generation += 1;
        next.replaced = replaced;
        next.replacing = replacing;
        self.devices().write_root(&next)?;
        catalog.set_meta(&[("root_generation", Some(&next.generation.to_le_bytes()[..]))])?;
        *root = next;
        Ok(())
    }

    /// Puts `root`'s contents back on the devices as a generation after
    /// `failed` (a change the catalog refused).
    fn roll_back(&self, root: &mut Root, failed: u64) {
        let mut back = root.clone();
        back.generation = failed + 1;
        match self.devices().write_root(&back) {
            Ok(()) => *root = back,
            Err(e) => {
                tracing::error!(error = %e, "could not roll the pool's root back after a failed catalog change; the next start follows the devices")
            }
        }
    }

    /// Gives every dataset of `catalog` without a manifest one (a pool
    /// from before manifests), then writes a root naming them all if the
    /// devices hold none or an older one. Blocking; at start, before
    /// any ingest.
    pub fn adopt(
        &self,
        catalog: &Catalog,
        space: &FreeSpace,
        recovery: &mut Recovery,
    ) -> Result<(), OpenError> {
        let store_err = |e: StoreError| match e {
            StoreError::PoolMeta(p) => OpenError::PoolMeta(p),
            StoreError::Catalog(c) => OpenError::Catalog(c),
            other => OpenError::PoolMeta(PoolMetaError::Corrupt {
                what: "pool root".into(),
                why: other.to_string(),
            }),
        };
        let mut root = self.lock();
        let mut entries = Vec::new();
        let mut changed = false;
        for (name, mut record) in catalog.datasets()? {
            // Already on the devices: nothing to read (a start must not
            // load every object of every dataset).
            let existing = root
                .entries
                .iter()
                .find(|e| e.name == name && e.dataset_id == record.id);
            if let (Some(e), Some(_)) = (existing, record.manifest) {
                entries.push(e.clone());
                continue;
            }
            let objects: Vec<(String, ObjectRecord)> = catalog.dataset_objects(record.id)?;
            let unit_crcs = match record.class {
                storaged_proto::model::StorageClass::Ec {
                    data_units,
                    parity_units,
                } => {
                    let width = (usize::from(data_units) + usize::from(parity_units))
                        * record.unit_rows.max(1) as usize;
                    catalog.all_unit_crcs(record.id, width)?
                }
                storaged_proto::model::StorageClass::Stripe => Vec::new(),
            };
            let mut manifest = Manifest {
                name: name.clone(),
                record: record.clone(),
                objects,
                unit_crcs,
            };
            manifest.record.manifest = Some(Extent { offset: 0, len: 0 });
            let bytes = manifest.encoded_len() as u64;
            let rows = match record.manifest {
                Some(r) if manifest_rows_len(self.layout, bytes) <= r.len => r,
                _ => self.allocate_rows(space, bytes).map_err(store_err)?,
            };
            record.manifest = Some(rows);
            manifest.record = record.clone();
            let encoded = manifest.encode();
            self.devices().write_manifest(rows, &encoded)?;
            catalog.put_dataset_record(&name, &record)?;
            entries.push(RootEntry {
                name,
                dataset_id: record.id,
                manifest_rows: rows,
                manifest_bytes: encoded.len() as u64,
                manifest_crc: crc32fast::hash(&encoded),
            });
            recovery.manifests_written += 1;
            changed = true;
        }
        let at = catalog.root_generation()?;
        if !changed && root.generation > 0 && at == root.generation {
            return Ok(());
        }
        let (replaced, replacing) = catalog.replacements()?;
        let next = Root {
            generation: root.generation.max(at) + 1,
            pool_id: root.pool_id,
            next_dataset_id: catalog.next_dataset_id()?,
            entries,
            replaced: replaced
                .into_iter()
                .map(|(i, p)| (i, p.to_string_lossy().into_owned()))
                .collect(),
            replacing,
        };
        self.devices().write_root(&next)?;
        catalog.set_meta(&[("root_generation", Some(&next.generation.to_le_bytes()[..]))])?;
        recovery.generation = next.generation;
        if recovery.manifests_written > 0 {
            tracing::info!(
                datasets = recovery.manifests_written,
                generation = next.generation,
                "datasets from before manifests now have their catalog entries on the devices too"
            );
        }
        *root = next;
        Ok(())
    }
}
