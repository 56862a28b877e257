//! The store's status as one snapshot of plain values: space, devices,
//! datasets and their health, and every counter the store keeps (reads,
//! read-ahead, scrub, rebuild, discards, catalog recovery, buffers,
//! injected faults). The service maps it to the Status message in one
//! place (`service/status.rs`); adding a counter means adding it here and
//! there.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{DatasetHandle, Store, replace::RebuildState};
use crate::device::pool_id_hex;

/// What a device is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Ok,
    /// Absent or blank at start, or gone: `ec` reads rebuild its units.
    Missing,
    /// The target of a replacement under way (or interrupted).
    Rebuilding,
}

/// One device as the snapshot shows it.
#[derive(Debug, Clone)]
pub struct DeviceUsage {
    pub index: u32,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub state: DeviceState,
    /// Stripes rebuilt because this device's unit was missing, failed or
    /// bad.
    pub reconstructions: u64,
}

/// A committed dataset, and what its devices' state means for it (empty:
/// every byte readable).
#[derive(Debug, Clone)]
pub struct DatasetStatus {
    pub handle: Arc<DatasetHandle>,
    pub health: String,
}

/// Bytes served per read path, merged reads, checksum mismatches.
#[derive(Debug, Clone, Default)]
pub struct ReadStats {
    pub grpc_bytes_served: u64,
    pub grpc_payload_bytes_copied: u64,
    pub shm_bytes_served: u64,
    pub shm_payload_bytes_copied: u64,
    pub bulk_bytes_served: u64,
    pub bulk_payload_bytes_copied: u64,
    pub device_reads_merged: u64,
    pub checksum_mismatches: u64,
}

/// Read-ahead hints and what came of them.
#[derive(Debug, Clone, Default)]
pub struct ReadAheadStats {
    pub hinted: u64,
    pub prefetched: u64,
    pub skipped: u64,
    pub failed: u64,
    pub hits: u64,
    pub hit_bytes: u64,
    pub expired: u64,
    pub cache_bytes: u64,
}

/// Scrub totals since start.
#[derive(Debug, Clone, Default)]
pub struct ScrubStats {
    pub passes: u64,
    pub bytes_checked: u64,
    pub corrupt: u64,
    pub repaired: u64,
    pub unrecoverable: u64,
    pub running: bool,
}

/// Freed space given back to the devices.
#[derive(Debug, Clone, Default)]
pub struct DiscardStats {
    pub enabled: bool,
    pub discarded_bytes: u64,
    pub pending_bytes: u64,
    pub failures: u64,
    pub unsupported: u64,
    pub startup_pass_done: bool,
}

/// The catalog: failing or not, its copy on the devices, and what this
/// start rebuilt.
#[derive(Debug, Clone, Default)]
pub struct CatalogStatus {
    pub fault: Option<String>,
    pub pool_root_generation: u64,
    pub rebuilt: bool,
    pub datasets_imported: u64,
    pub datasets_dropped: u64,
}

/// The store's whole status; see the module docs.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub pool_id: String,
    pub engine: &'static str,
    pub stripe_unit_bytes: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub devices: Vec<DeviceUsage>,
    pub datasets: Vec<DatasetStatus>,
    pub ingests_in_progress: usize,
    /// Some device is missing.
    pub degraded: bool,
    pub reads: ReadStats,
    pub read_ahead: ReadAheadStats,
    pub scrub: ScrubStats,
    pub rebuild: Option<RebuildState>,
    pub discard: DiscardStats,
    pub catalog: CatalogStatus,
    pub superblocks_repaired: u32,
    /// Faults injected by `--fault-inject` (all kinds, and bit flips).
    pub faults_injected: u64,
    pub fault_flips_injected: u64,
    /// The buffer pool's bytes, and those leased now.
    pub buffer_pool_bytes: u64,
    pub buffer_pool_in_use_bytes: u64,
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl DeviceState {
    /// Device `index`'s state, given whether it is missing and which device
    /// is being rebuilt.
    fn of(index: u32, missing: bool, rebuilding: Option<u32>) -> Self {
        if rebuilding == Some(index) {
            DeviceState::Rebuilding
        } else if missing {
            DeviceState::Missing
        } else {
            DeviceState::Ok
        }
    }
}

impl super::ReadCounters {
    fn snapshot(&self) -> ReadStats {
        ReadStats {
            grpc_bytes_served: load(&self.grpc_bytes_served),
            grpc_payload_bytes_copied: load(&self.grpc_payload_bytes_copied),
            shm_bytes_served: load(&self.shm_bytes_served),
            shm_payload_bytes_copied: load(&self.shm_payload_bytes_copied),
            bulk_bytes_served: load(&self.bulk_bytes_served),
            bulk_payload_bytes_copied: load(&self.bulk_payload_bytes_copied),
            device_reads_merged: load(&self.device_reads_merged),
            checksum_mismatches: load(&self.checksum_mismatches),
        }
    }
}

impl super::readahead::ReadAhead {
    fn snapshot(&self) -> ReadAheadStats {
        let ra = &self.counters;
        ReadAheadStats {
            hinted: load(&ra.hinted),
            prefetched: load(&ra.prefetched),
            skipped: load(&ra.skipped),
            failed: load(&ra.failed),
            hits: load(&ra.hits),
            hit_bytes: load(&ra.hit_bytes),
            expired: load(&ra.expired),
            cache_bytes: self.used_bytes(),
        }
    }
}

impl super::scrub::ScrubCounters {
    fn snapshot(&self) -> ScrubStats {
        ScrubStats {
            passes: load(&self.passes),
            bytes_checked: load(&self.bytes_checked),
            corrupt: load(&self.corrupt),
            repaired: load(&self.repaired),
            unrecoverable: load(&self.unrecoverable),
            running: self.running.load(Ordering::Relaxed),
        }
    }
}

impl super::discard::DiscardCounters {
    fn snapshot(&self) -> DiscardStats {
        DiscardStats {
            enabled: self.enabled.load(Ordering::Relaxed),
            discarded_bytes: load(&self.discarded_bytes),
            pending_bytes: load(&self.pending_bytes),
            failures: load(&self.failures),
            unsupported: load(&self.unsupported),
            startup_pass_done: self.startup_pass_done.load(Ordering::Relaxed),
        }
    }
}

impl Store {
    /// The whole status now; see the module docs.
    pub fn status(&self) -> StoreStatus {
        let (capacity_bytes, used_bytes, per_device_used) = self.space_used();
        let missing = self.missing_devices();
        let rebuilt = self.device_reconstructions();
        let rebuild = self.rebuild_state();
        let paths = self
            .redundancy
            .device_paths
            .read()
            .expect("paths poisoned")
            .clone();
        let rebuilding = rebuild.as_ref().map(|r| r.index);
        let devices = paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| DeviceUsage {
                index: i as u32,
                path,
                capacity_bytes: self.layout.device_data_bytes,
                used_bytes: per_device_used[i],
                state: DeviceState::of(i as u32, missing[i], rebuilding),
                reconstructions: rebuilt[i],
            })
            .collect();
        let datasets = self
            .list_datasets()
            .into_iter()
            .map(|h| DatasetStatus {
                health: super::redundancy::dataset_health(&h, self.layout, &missing),
                handle: h,
            })
            .collect();
        let (faults_injected, fault_flips_injected) = self
            .injected
            .as_ref()
            .map_or((0, 0), |f| (f.total(), load(&f.flips)));
        let (buffer_pool_bytes, buffer_pool_in_use_bytes) = self.buffer_pool_usage();
        StoreStatus {
            pool_id: pool_id_hex(&self.pool_id),
            engine: self.io.engine.kind(),
            stripe_unit_bytes: self.layout.stripe_unit_bytes,
            capacity_bytes,
            used_bytes,
            devices,
            datasets,
            ingests_in_progress: self.data.ingesting.lock().expect("poisoned").len(),
            degraded: missing.iter().any(|m| *m),
            reads: self.read_counters.snapshot(),
            read_ahead: self.read_ahead.snapshot(),
            scrub: self.scrub_counters.snapshot(),
            rebuild,
            discard: self.discard_counters().snapshot(),
            catalog: CatalogStatus {
                fault: self.catalog_fault(),
                pool_root_generation: self.pool_root_generation(),
                rebuilt: self.recovery.catalog_behind,
                datasets_imported: self.recovery.datasets_imported,
                datasets_dropped: self.recovery.datasets_dropped,
            },
            superblocks_repaired: self.superblocks_repaired,
            faults_injected,
            fault_flips_injected,
            buffer_pool_bytes,
            buffer_pool_in_use_bytes,
        }
    }

    /// One dataset with its health now.
    pub fn dataset_status(&self, handle: Arc<DatasetHandle>) -> DatasetStatus {
        DatasetStatus {
            health: super::redundancy::dataset_health(
                &handle,
                self.layout,
                &self.missing_devices(),
            ),
            handle,
        }
    }

    /// The pool's data capacity and the bytes allocated now (what a
    /// cluster node advertises).
    pub fn capacity_and_used_bytes(&self) -> (u64, u64) {
        let (capacity, used, _) = self.space_used();
        (capacity, used)
    }

    /// (capacity, used, used per device): freed space waiting for its
    /// discard (and the start-up pass's piece) belongs to nobody, so it is
    /// reported free, though the allocator hands it out only after the
    /// discard. Read under the allocator's lock, which every change to it
    /// holds too.
    fn space_used(&self) -> (u64, u64, Vec<u64>) {
        let alloc = self.data.alloc.lock().expect("allocator poisoned");
        let n = self.layout.device_count as usize;
        let mut free_per_device = vec![0u64; n];
        for e in alloc.free_extents() {
            self.layout
                .bytes_per_device(e.offset, e.len, &mut free_per_device);
        }
        let mut held_bytes = 0;
        for e in self.data.space.held_extents() {
            held_bytes += e.len;
            self.layout
                .bytes_per_device(e.offset, e.len, &mut free_per_device);
        }
        let used = free_per_device
            .iter()
            .map(|free| self.layout.device_data_bytes - free)
            .collect();
        (
            alloc.capacity_bytes(),
            alloc.used_bytes() - held_bytes,
            used,
        )
    }
}
