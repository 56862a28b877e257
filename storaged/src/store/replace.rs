//! `device replace`: rebuild a lost device's units onto a new device while
//! reads go on.
//!
//! The new device gets the old one's superblock (same pool, same index). A
//! record in the catalog (`meta["replace"]`: index, checkpoint, new path)
//! says a replacement is under way; while it is, the device's slot is
//! *missing*, so every read of its units is rebuilt from the other devices
//! and nothing reads the half-written new device. The rebuild walks the
//! erasure-coded datasets in id order and each stripe that has a unit on
//! the device: the unit is rebuilt from the survivors (and checked against
//! its CRC, see `redundancy`) and written to the new device. Every
//! `replace_checkpoint_bytes` (64 MiB) the new device is fdatasync'ed and then the
//! checkpoint is committed, so a restart resumes where the last durable
//! checkpoint was (storaged starts with the device still missing and
//! `storagectl device replace` with the same arguments carries on).
//! Units of `stripe` datasets on the lost device cannot be rebuilt; they
//! are counted as lost, and reading them stays an error naming the device.
//! At the end the new path is recorded (`meta["device_path/<i>"]`, used at
//! every later start, whatever the configuration says), the record is
//! removed and the slot points at the new device: the pool is healthy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::class::DatasetLayout;
use super::redundancy::EcDataset;
use super::{DatasetHandle, Store};
use crate::engine::{self, route::Slot};
use crate::error::{AdminError, StoreError};

/// A replacement under way, as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaceRecord {
    pub index: u32,
    pub new_path: PathBuf,
    /// Datasets with a smaller id are done; this one is done below
    /// `stripe`.
    pub dataset_id: u64,
    pub stripe: u64,
}

impl ReplaceRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20 + self.new_path.as_os_str().len());
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.dataset_id.to_le_bytes());
        v.extend_from_slice(&self.stripe.to_le_bytes());
        v.extend_from_slice(self.new_path.to_string_lossy().as_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 20 {
            return None;
        }
        Some(Self {
            index: u32::from_le_bytes(b[0..4].try_into().ok()?),
            dataset_id: u64::from_le_bytes(b[4..12].try_into().ok()?),
            stripe: u64::from_le_bytes(b[12..20].try_into().ok()?),
            new_path: PathBuf::from(String::from_utf8(b[20..].to_vec()).ok()?),
        })
    }
}

/// Progress of a replacement (Status).
#[derive(Debug, Clone, Default)]
pub struct RebuildState {
    pub index: u32,
    pub new_path: PathBuf,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// False when a replacement was interrupted (by a restart) and waits to
    /// be resumed.
    pub running: bool,
}

/// What a finished replacement did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplaceReport {
    pub units_rebuilt: u64,
    pub bytes_rebuilt: u64,
    /// Units that could not be rebuilt (too many other units lost).
    pub units_lost: u64,
    /// Bytes of `stripe` datasets that were on the device: gone.
    pub stripe_bytes_lost: u64,
    pub seconds: f64,
    pub resumed: bool,
}

impl super::RedundancyState {
    /// Changes the state of the rebuild under way, if there is one.
    fn update_rebuild(&self, change: impl FnOnce(&mut RebuildState)) {
        if let Some(r) = self.rebuild.lock().expect("rebuild poisoned").as_mut() {
            change(r);
        }
    }
}

/// Clears the "replacing" flag however the rebuild ends.
struct Replacing<'a>(&'a Store);

impl Drop for Replacing<'_> {
    fn drop(&mut self) {
        self.0.redundancy.replacing.store(false, Ordering::SeqCst);
        self.0.redundancy.update_rebuild(|r| r.running = false);
    }
}

/// Admin overrides of a device replacement's safety checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplaceOptions {
    /// Replace a device that is present and healthy.
    pub allow_healthy: bool,
    /// Use a new device that holds data (another pool's, a file system).
    pub overwrite: bool,
}

impl Store {
    /// Which device `old` names: an index, or a path of the pool.
    pub fn device_index(&self, old: &str) -> Result<u32, AdminError> {
        let n = self.layout.device_count;
        if let Ok(index) = old.parse::<u32>() {
            if index < n {
                return Ok(index);
            }
            return Err(AdminError::NoSuchIndex {
                index,
                device_count: n,
            });
        }
        let paths = self.redundancy.device_paths.read().expect("paths poisoned");
        paths
            .iter()
            .position(|p| p == Path::new(old))
            .map(|i| i as u32)
            .ok_or_else(|| AdminError::NoSuchDevice(old.to_owned()))
    }

    /// The replacement recorded in the catalog, if one is under way.
    fn replace_record(&self) -> Result<Option<ReplaceRecord>, StoreError> {
        Ok(self
            .data
            .catalog
            .meta("replace")?
            .and_then(|b| ReplaceRecord::decode(&b)))
    }

    /// Rebuilds device `old`'s units onto `new_path`; see the module docs.
    pub async fn replace_device(
        self: &Arc<Self>,
        old: &str,
        new_path: &Path,
        options: ReplaceOptions,
        progress: impl FnMut(u64, u64) + Send,
    ) -> Result<ReplaceReport, AdminError> {
        let index = self.device_index(old)?;
        let pending = self.check_replace(index, new_path, options)?;
        if self
            .redundancy
            .replacing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(AdminError::ReplaceRunning);
        }
        let _replacing = Replacing(self);
        let started = Instant::now();
        let mut report = ReplaceReport {
            resumed: pending.is_some(),
            ..Default::default()
        };
        let record = pending.unwrap_or(ReplaceRecord {
            index,
            new_path: new_path.to_path_buf(),
            dataset_id: 0,
            stripe: 0,
        });
        let (target, meta_file) = self.start_target(&record, options.overwrite).await?;

        let mut datasets = self.list_datasets();
        datasets.sort_by_key(|d| d.record.id);
        // Bytes to rebuild: the device's share of every dataset with
        // redundancy; a stripe dataset's share is lost.
        let mut total = 0;
        for ds in &datasets {
            let mut per_device = vec![0u64; self.layout.device_count as usize];
            for e in &ds.record.extents {
                self.layout
                    .bytes_per_device(e.offset, e.len, &mut per_device);
            }
            match &ds.layout {
                DatasetLayout::Ec(_) => total += per_device[index as usize],
                DatasetLayout::Stripe(_) => report.stripe_bytes_lost += per_device[index as usize],
            }
        }
        *self.redundancy.rebuild.lock().expect("rebuild poisoned") = Some(RebuildState {
            index,
            new_path: new_path.to_path_buf(),
            bytes_done: 0,
            bytes_total: total,
            running: true,
        });
        let mut rebuild = Rebuild {
            store: self,
            target: &target,
            record,
            report,
            done: 0,
            total,
            progress,
        };
        for ds in &datasets {
            if let DatasetLayout::Ec(ec) = &ds.layout {
                rebuild.dataset(ds, ec).await?;
            }
        }
        rebuild.progress(total);
        let (record, mut report) = (rebuild.record, rebuild.report);
        sync_target(&target, index).await?;
        self.finish_replace(&record, target, meta_file).await?;
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(?report, device = index, path = %new_path.display(), "device replaced");
        Ok(report)
    }

    /// Refuses a replacement that cannot start; returns the one under way
    /// that this call resumes, if any.
    fn check_replace(
        &self,
        index: u32,
        new_path: &Path,
        options: ReplaceOptions,
    ) -> Result<Option<ReplaceRecord>, AdminError> {
        if !new_path.is_absolute() {
            return Err(AdminError::RelativePath(new_path.to_path_buf()));
        }
        let pending = self.replace_record()?;
        let resume = match &pending {
            Some(r) if r.index == index && r.new_path == new_path => true,
            Some(r) => {
                return Err(AdminError::OtherReplacePending {
                    index: r.index,
                    path: r.new_path.clone(),
                });
            }
            None => false,
        };
        {
            let paths = self.redundancy.device_paths.read().expect("paths poisoned");
            if let Some(i) = paths
                .iter()
                .position(|p| p == new_path)
                .filter(|i| !(resume && *i == index as usize))
            {
                return Err(AdminError::AlreadyInPool {
                    path: new_path.to_path_buf(),
                    index: i,
                });
            }
        }
        if !resume && !options.allow_healthy && !self.missing_devices()[index as usize] {
            return Err(AdminError::DeviceHealthy(index));
        }
        Ok(pending)
    }

    /// Prepares the new device, records the replacement in the catalog and
    /// on the devices, and from then on rebuilds reads of the old one.
    /// Returns the engine that writes the new device and its metadata file.
    async fn start_target(
        &self,
        record: &ReplaceRecord,
        overwrite: bool,
    ) -> Result<
        (
            Arc<dyn engine::IoBackend>,
            Arc<dyn crate::engine::DeviceFile>,
        ),
        AdminError,
    > {
        let (index, new_path) = (record.index, record.new_path.clone());
        let reference = self.redundancy.superblock.clone();
        let path = new_path.clone();
        let file = tokio::task::spawn_blocking(move || {
            crate::device::prepare_replacement(&path, &reference, index, overwrite)
        })
        .await
        .map_err(|source| StoreError::TaskFailed {
            what: "prepare",
            source,
        })??;
        self.data
            .catalog
            .set_meta(&[("replace", Some(&record.encode()))])?;
        self.data
            .pool_root
            .record_replacements(&self.data.catalog)?;
        // The pool's metadata reaches the new device once it is rebuilt.
        let meta_file = file
            .try_clone()
            .map_err(|source| crate::device::DeviceError::Io {
                path: new_path.clone(),
                source,
            })?;
        let meta_file = self.io.hooks.meta_file(meta_file, &new_path);
        // From here on, reads of the device's units are rebuilt.
        self.io.slots.set(index, Slot::Missing);
        let target = engine::build(
            self.io.engine_kind,
            vec![file],
            Arc::clone(&self.io.pool),
            self.io.engine_limits,
        )
        .map_err(AdminError::NewDeviceEngine)?;
        Ok((self.io.hooks.engine(target, &[new_path]), meta_file))
    }

    /// Puts the pool's metadata on the rebuilt device, records it as the
    /// device's path, and serves reads from it again.
    async fn finish_replace(
        self: &Arc<Self>,
        record: &ReplaceRecord,
        target: Arc<dyn engine::IoBackend>,
        meta_file: Arc<dyn crate::engine::DeviceFile>,
    ) -> Result<(), StoreError> {
        let index = record.index;
        // Every manifest and the root on the new device too, or a pool
        // whose devices were all replaced in turn would hold none.
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || store.data.pool_root.add_device(index, meta_file))
            .await
            .map_err(|source| StoreError::TaskFailed {
                what: "replace",
                source,
            })??;
        let key = format!("device_path/{index}");
        let path_bytes = record.new_path.to_string_lossy().into_owned();
        self.data.catalog.set_meta(&[
            (key.as_str(), Some(path_bytes.as_bytes())),
            ("replace", None),
        ])?;
        self.data
            .pool_root
            .record_replacements(&self.data.catalog)?;
        self.redundancy
            .device_paths
            .write()
            .expect("paths poisoned")[index as usize] = record.new_path.clone();
        self.io.slots.set(index, Slot::Replaced(target));
        *self.redundancy.rebuild.lock().expect("rebuild poisoned") = None;
        Ok(())
    }

    /// The replacement under way or waiting to be resumed, if any.
    pub fn rebuild_state(&self) -> Option<RebuildState> {
        self.redundancy
            .rebuild
            .lock()
            .expect("rebuild poisoned")
            .clone()
    }
}

/// One replacement's rebuild: where it writes, how far it got (the
/// checkpoint record), what it did, and its progress.
struct Rebuild<'a, P> {
    store: &'a Store,
    target: &'a Arc<dyn engine::IoBackend>,
    record: ReplaceRecord,
    report: ReplaceReport,
    /// Bytes of the whole replacement done, of `total`.
    done: u64,
    total: u64,
    progress: P,
}

impl<P: FnMut(u64, u64) + Send> Rebuild<'_, P> {
    fn progress(&mut self, done: u64) {
        self.store
            .redundancy
            .update_rebuild(|r| r.bytes_done = done);
        (self.progress)(done, self.total);
    }

    /// Rebuilds the units of `ds` that lived on the replaced device onto
    /// the target, from where the record says the last checkpoint was,
    /// checkpointing every `replace_checkpoint_bytes`.
    async fn dataset(&mut self, ds: &Arc<DatasetHandle>, ec: &EcDataset) -> Result<(), StoreError> {
        let store = self.store;
        let index = self.record.index;
        let unit = store.layout.stripe_unit_bytes;
        if ds.record.id < self.record.dataset_id {
            // Rebuilt before the checkpoint this run resumes from.
            self.done += (ec.map.stripes() * u64::from(ec.geometry().width()))
                .div_ceil(u64::from(store.layout.device_count))
                * unit;
            return Ok(());
        }
        let first = if ds.record.id == self.record.dataset_id {
            self.record.stripe
        } else {
            0
        };
        let mut since_checkpoint = 0u64;
        for stripe in first..ec.map.stripes() {
            if ds.deleted.load(Ordering::SeqCst) {
                break;
            }
            let Some(p) =
                (0..ec.geometry().width()).find(|p| ec.map.unit_location(stripe, *p).0 == index)
            else {
                continue;
            };
            self.done += unit;
            let mut read = store.read_stripe(ds, ec, stripe, false).await?;
            if let Err(e) = store.rebuild_stripe(ds, ec, stripe, &mut read) {
                tracing::error!(error = %e, "replace: unit lost");
                self.report.units_lost += 1;
                continue;
            }
            let (_, offset) = ec.map.unit_location(stripe, p);
            let lease = read.units.swap_remove(p as usize);
            engine::write_all(&**self.target, 0, offset, lease)
                .await
                .map_err(|e| StoreError::from_io(index, offset, e))?;
            self.report.units_rebuilt += 1;
            self.report.bytes_rebuilt += unit;
            since_checkpoint += unit;
            if since_checkpoint >= store.limits.replace_checkpoint_bytes {
                since_checkpoint = 0;
                self.record.dataset_id = ds.record.id;
                self.record.stripe = stripe + 1;
                self.checkpoint().await?;
            }
            self.progress(self.done);
        }
        Ok(())
    }

    /// Makes the new device's writes durable, then the checkpoint.
    async fn checkpoint(&mut self) -> Result<(), StoreError> {
        sync_target(self.target, self.record.index).await?;
        let data = &self.store.data;
        data.catalog
            .set_meta(&[("replace", Some(&self.record.encode()))])?;
        data.pool_root.record_replacements(&data.catalog)?;
        Ok(())
    }
}

/// fdatasync of the replacement device (device `index` of the pool).
async fn sync_target(target: &Arc<dyn engine::IoBackend>, index: u32) -> Result<(), StoreError> {
    let t = Arc::clone(target);
    tokio::task::spawn_blocking(move || t.sync(0))
        .await
        .map_err(|source| StoreError::TaskFailed {
            what: "sync",
            source,
        })?
        .map_err(|source| StoreError::Sync {
            device: index,
            source,
        })
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        // Guards the replace record's decoder against damaged bytes.
        #[test]
        fn replace_records_decode_or_refuse(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            if let Some(r) = super::ReplaceRecord::decode(&bytes) {
                proptest::prop_assert_eq!(r.encode(), bytes);
            }
        }
    }

    use super::*;

    #[test]
    fn record_round_trip() {
        let r = ReplaceRecord {
            index: 2,
            new_path: "/dev/new disk".into(),
            dataset_id: 7,
            stripe: 99,
        };
        assert_eq!(ReplaceRecord::decode(&r.encode()), Some(r));
        assert_eq!(ReplaceRecord::decode(&[1, 2, 3]), None);
    }
}
