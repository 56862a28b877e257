//! The status snapshot: the Status RPC's answer and what the metrics
//! endpoint publishes, built in one place from the store, the regions and
//! the connections.

use super::*;

impl StoragedService {
    /// The whole status: what the Status RPC answers and what the metrics
    /// endpoint publishes.
    pub fn status(&self) -> pb::StatusResponse {
        let mut s = status_response(&self.store, self.store.status());
        let c = &self.store.read_counters;
        s.grpc_bytes_served = c.grpc_bytes_served.load(Ordering::Relaxed);
        s.grpc_payload_bytes_copied = c.grpc_payload_bytes_copied.load(Ordering::Relaxed);
        s.shm_bytes_served = c.shm_bytes_served.load(Ordering::Relaxed);
        s.shm_payload_bytes_copied = c.shm_payload_bytes_copied.load(Ordering::Relaxed);
        s.device_reads_merged = c.device_reads_merged.load(Ordering::Relaxed);
        s.checksum_mismatches = c.checksum_mismatches.load(Ordering::Relaxed);
        let ra = &self.store.read_ahead.counters;
        s.hint_objects = ra.hinted.load(Ordering::Relaxed);
        s.read_ahead_objects = ra.prefetched.load(Ordering::Relaxed);
        s.read_ahead_skipped = ra.skipped.load(Ordering::Relaxed);
        s.read_ahead_hits = ra.hits.load(Ordering::Relaxed);
        s.read_ahead_hit_bytes = ra.hit_bytes.load(Ordering::Relaxed);
        s.read_ahead_expired = ra.expired.load(Ordering::Relaxed);
        s.read_ahead_failed = ra.failed.load(Ordering::Relaxed);
        s.read_ahead_cache_bytes = self.store.read_ahead.used_bytes();
        s.unix_socket_path = self.unix_socket.as_deref().unwrap_or_default().to_owned();
        s.catalog_fault = self.store.catalog_fault().unwrap_or_default();
        if let Some(a) = &self.admission {
            s.connections_open = a.open() as u32;
            s.connections_refused = a.refused.load(Ordering::Relaxed);
        }
        s.regions_fixed = self.regions.fixed_count() as u32;
        let (regions, region_bytes) = self.regions.usage();
        s.regions_registered = regions as u32;
        s.region_bytes_registered = region_bytes;
        s
    }
}

pub(super) fn dataset_info(store: &Store, h: &DatasetHandle) -> pb::DatasetInfo {
    let (class, ec_data_units, ec_parity_units) = h.record.class.to_wire();
    pb::DatasetInfo {
        name: h.name.clone(),
        object_count: h.record.object_count,
        total_bytes: h.record.total_bytes,
        storage_class: class as i32,
        created_unix_ms: h.record.created_unix_ms,
        allocated_bytes: h.record.owned_extents().iter().map(|e| e.len).sum(),
        ec_data_units,
        ec_parity_units,
        reconstructions: h.reconstructions.load(Ordering::Relaxed),
        health: crate::store::redundancy::dataset_health(
            h,
            store.layout(),
            &store.missing_devices(),
        ),
    }
}

pub(super) fn status_response(store: &Store, s: StoreStatus) -> pb::StatusResponse {
    let missing = store.missing_devices();
    let rebuilt = store.device_reconstructions();
    let sc = &store.scrub_counters;
    let rebuild = store.rebuild_state();
    let (faults_injected, fault_flips_injected) = store
        .injected
        .as_ref()
        .map(|c| {
            let flips = c.flips.load(Ordering::Relaxed);
            let others = [
                &c.read_eio,
                &c.write_eio,
                &c.torn,
                &c.vanished_ops,
                &c.fsync_failures,
            ]
            .iter()
            .map(|x| x.load(Ordering::Relaxed))
            .sum::<u64>();
            (flips + others, flips)
        })
        .unwrap_or((0, 0));
    let dc = store.discard_counters();
    pb::StatusResponse {
        discard_enabled: dc.enabled.load(Ordering::Relaxed),
        discarded_bytes: dc.discarded_bytes.load(Ordering::Relaxed),
        discard_pending_bytes: dc.pending_bytes.load(Ordering::Relaxed),
        discard_failures: dc.failures.load(Ordering::Relaxed),
        discard_unsupported: dc.unsupported.load(Ordering::Relaxed),
        discard_startup_pass_done: dc.startup_pass_done.load(Ordering::Relaxed),
        superblocks_repaired: store.superblocks_repaired,
        pool_root_generation: store.pool_root_generation(),
        catalog_rebuilt: store.recovery.catalog_behind,
        catalog_datasets_imported: store.recovery.datasets_imported,
        catalog_datasets_dropped: store.recovery.datasets_dropped,
        faults_injected,
        fault_flips_injected,
        rebuild: rebuild.as_ref().map(|r| pb::RebuildStatus {
            device_index: r.index,
            new_path: r.new_path.display().to_string(),
            bytes_done: r.bytes_done,
            bytes_total: r.bytes_total,
            running: r.running,
        }),
        degraded: missing.iter().any(|m| *m),
        scrub_passes: sc.passes.load(Ordering::Relaxed),
        scrub_bytes_checked: sc.bytes_checked.load(Ordering::Relaxed),
        scrub_corrupt: sc.corrupt.load(Ordering::Relaxed),
        scrub_repaired: sc.repaired.load(Ordering::Relaxed),
        scrub_unrecoverable: sc.unrecoverable.load(Ordering::Relaxed),
        scrub_running: sc.running.load(Ordering::Relaxed),
        pool_id: s.pool_id,
        engine: s.engine.to_owned(),
        stripe_unit_bytes: s.stripe_unit_bytes as u32,
        capacity_bytes: s.capacity_bytes,
        used_bytes: s.used_bytes,
        free_bytes: s.capacity_bytes - s.used_bytes,
        devices: s
            .devices
            .into_iter()
            .map(|d| pb::DeviceStatus {
                index: d.index,
                path: d.path.display().to_string(),
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.used_bytes,
                state: if rebuild.as_ref().is_some_and(|r| r.index == d.index) {
                    "rebuilding"
                } else if missing[d.index as usize] {
                    "missing"
                } else {
                    "ok"
                }
                .to_owned(),
                reconstructions: rebuilt[d.index as usize],
                stable_name: crate::device::stable_name(&d.path).unwrap_or_default(),
            })
            .collect(),
        datasets: s.datasets.iter().map(|h| dataset_info(store, h)).collect(),
        ingests_in_progress: s.ingests_in_progress as u32,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        buffer_pool_bytes: store.buffer_pool_usage().0,
        buffer_pool_in_use_bytes: store.buffer_pool_usage().1,
        checksum_block_bytes: crate::device::CHECKSUM_BLOCK_BYTES,
        ..Default::default()
    }
}
