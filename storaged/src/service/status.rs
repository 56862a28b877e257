//! The status snapshot: the Status RPC's answer and what the metrics
//! endpoint publishes, mapped in one place from the store's snapshot
//! (`store::status`) and the server's own state (regions, connections).

use super::*;

impl StoragedService {
    /// The whole status: what the Status RPC answers and what the metrics
    /// endpoint publishes. The store's snapshot, plus what the server
    /// knows (regions, connections, its Unix socket).
    pub fn status(&self) -> pb::StatusResponse {
        let mut s = status_response(self.store.status());
        let (open, refused) = self.admission.as_ref().map_or((0, 0), |a| {
            (a.open() as u32, a.refused.load(Ordering::Relaxed))
        });
        s.connections = Some(pb::ConnectionStats {
            open,
            refused,
            unix_socket_path: self.unix_socket.as_deref().unwrap_or_default().to_owned(),
            bulk_socket_path: self.bulk_socket.as_deref().unwrap_or_default().to_owned(),
            bulk_requests: self.bulk_requests.load(Ordering::Relaxed),
            bulk_tcp_port: self.bulk_tcp.as_ref().map_or(0, |b| u32::from(b.port)),
            bulk_tcp_item_bytes_max: self.bulk_tcp.as_ref().map_or(0, |b| b.staging_bytes),
            bulk_tcp_staging_bytes: self.bulk_tcp.as_ref().map_or(0, |b| b.staging_in_use()),
            bulk_tcp_staging_mapped_bytes: self.bulk_tcp.as_ref().map_or(0, |b| b.staging_mapped()),
            bulk_tcp_zerocopy_sends: self
                .bulk_tcp
                .as_ref()
                .map_or(0, |b| b.zerocopy_sends.load(Ordering::Relaxed)),
            bulk_tcp_zerocopy_copied: self
                .bulk_tcp
                .as_ref()
                .map_or(0, |b| b.zerocopy_copied.load(Ordering::Relaxed)),
        });
        let (registered, registered_bytes) = self.regions.usage();
        s.regions = Some(pb::RegionStats {
            registered: registered as u32,
            registered_bytes,
            fixed: self.regions.fixed_count() as u32,
        });
        s
    }
}

pub(super) fn dataset_info(d: &crate::store::status::DatasetStatus) -> pb::DatasetInfo {
    let h = &d.handle;
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
        health: d.health.clone(),
        dataset_id: h.record.id,
        cluster_unit: String::new(),
    }
}

/// The store's snapshot as the Status message: the one place it maps.
pub(super) fn status_response(s: StoreStatus) -> pb::StatusResponse {
    use crate::store::DeviceState;
    pb::StatusResponse {
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
                stable_name: crate::device::stable_name(&d.path).unwrap_or_default(),
                path: d.path.display().to_string(),
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.used_bytes,
                state: match d.state {
                    DeviceState::Ok => "ok",
                    DeviceState::Missing => "missing",
                    DeviceState::Rebuilding => "rebuilding",
                }
                .to_owned(),
                reconstructions: d.reconstructions,
            })
            .collect(),
        datasets: s.datasets.iter().map(dataset_info).collect(),
        ingests_in_progress: s.ingests_in_progress as u32,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        checksum_block_bytes: crate::device::CHECKSUM_BLOCK_BYTES,
        degraded: s.degraded,
        reads: Some(pb::ReadStats {
            grpc_bytes_served: s.reads.grpc_bytes_served,
            grpc_payload_bytes_copied: s.reads.grpc_payload_bytes_copied,
            shm_bytes_served: s.reads.shm_bytes_served,
            shm_payload_bytes_copied: s.reads.shm_payload_bytes_copied,
            bulk_bytes_served: s.reads.bulk_bytes_served,
            bulk_payload_bytes_copied: s.reads.bulk_payload_bytes_copied,
            device_reads_merged: s.reads.device_reads_merged,
            checksum_mismatches: s.reads.checksum_mismatches,
        }),
        read_ahead: Some(pb::ReadAheadStats {
            hinted_objects: s.read_ahead.hinted,
            objects: s.read_ahead.prefetched,
            skipped: s.read_ahead.skipped,
            hits: s.read_ahead.hits,
            hit_bytes: s.read_ahead.hit_bytes,
            expired: s.read_ahead.expired,
            cache_bytes: s.read_ahead.cache_bytes,
            failed: s.read_ahead.failed,
        }),
        scrub: Some(pb::ScrubStats {
            passes: s.scrub.passes,
            bytes_checked: s.scrub.bytes_checked,
            corrupt: s.scrub.corrupt,
            repaired: s.scrub.repaired,
            unrecoverable: s.scrub.unrecoverable,
            running: s.scrub.running,
        }),
        rebuild: s.rebuild.map(|r| pb::RebuildStatus {
            device_index: r.index,
            new_path: r.new_path.display().to_string(),
            bytes_done: r.bytes_done,
            bytes_total: r.bytes_total,
            running: r.running,
        }),
        superblocks_repaired: s.superblocks_repaired,
        faults: Some(pb::FaultStats {
            injected: s.faults_injected,
            flips_injected: s.fault_flips_injected,
        }),
        discard: Some(pb::DiscardStats {
            enabled: s.discard.enabled,
            discarded_bytes: s.discard.discarded_bytes,
            pending_bytes: s.discard.pending_bytes,
            failures: s.discard.failures,
            unsupported: s.discard.unsupported,
            startup_pass_done: s.discard.startup_pass_done,
        }),
        catalog: Some(pb::CatalogStatus {
            fault: s.catalog.fault.unwrap_or_default(),
            pool_root_generation: s.catalog.pool_root_generation,
            rebuilt: s.catalog.rebuilt,
            datasets_imported: s.catalog.datasets_imported,
            datasets_dropped: s.catalog.datasets_dropped,
        }),
        buffers: Some(pb::BufferStats {
            pool_bytes: s.buffer_pool_bytes,
            in_use_bytes: s.buffer_pool_in_use_bytes,
        }),
        // The server's own (see `StoragedService::status`).
        regions: None,
        connections: None,
    }
}
