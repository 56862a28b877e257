//! `storagectl status`: the Status message for people (devices, space,
//! datasets, what was served and repaired), or whole as JSON for scripts.

use std::io::Write;

use storaged_proto::pb::StatusResponse;

use super::{class_name, human};

/// Prints `s`, as JSON when `json`.
pub fn print(s: &StatusResponse, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    outln!("pool:        {}", s.pool_id);
    outln!("version:     {}", s.version);
    outln!("engine:      {}", s.engine);
    outln!("stripe unit: {}", human(u64::from(s.stripe_unit_bytes)));
    outln!(
        "capacity:    {}  used {}  free {}",
        human(s.capacity_bytes),
        human(s.used_bytes),
        human(s.free_bytes)
    );
    outln!("used bytes:  {}", s.used_bytes);
    outln!(
        "health:      {}",
        if s.degraded {
            "DEGRADED (devices missing; see below)"
        } else if !s.catalog_fault.is_empty() {
            "CATALOG FAILING (see below)"
        } else {
            "ok"
        }
    );
    if !s.catalog_fault.is_empty() {
        outln!(
            "catalog:     failing: {} (ingests and deletes fail until storaged can reopen it)",
            s.catalog_fault
        );
    }
    if s.catalog_rebuilt {
        outln!(
            "catalog:     REBUILT FROM THE DEVICES at start ({} datasets imported, {} dropped as deleted): the data-dir catalog was missing, damaged, restored or behind",
            s.catalog_datasets_imported,
            s.catalog_datasets_dropped
        );
    }
    outln!(
        "pool root:   generation {} on every device",
        s.pool_root_generation
    );
    outln!(
        "connections: {} open, {} refused since start",
        s.connections_open,
        s.connections_refused
    );
    if let Some(r) = &s.rebuild {
        outln!(
            "rebuild:     device {} onto {}: {} of {}{}",
            r.device_index,
            r.new_path,
            human(r.bytes_done),
            human(r.bytes_total),
            if r.running {
                ""
            } else {
                " (interrupted: run `storagectl device replace` again to resume)"
            }
        );
    }
    outln!(
        "scrub:       {} passes{}, {} checked, {} corrupt, {} repaired, {} unrecoverable",
        s.scrub_passes,
        if s.scrub_running { " (running)" } else { "" },
        human(s.scrub_bytes_checked),
        s.scrub_corrupt,
        s.scrub_repaired,
        s.scrub_unrecoverable
    );
    outln!("ingests in progress: {}", s.ingests_in_progress);
    outln!(
        "served:      grpc {} ({} copied)  shm {} ({} copied)",
        human(s.grpc_bytes_served),
        human(s.grpc_payload_bytes_copied),
        human(s.shm_bytes_served),
        human(s.shm_payload_bytes_copied)
    );
    outln!(
        "scheduling:  {} device reads merged into neighbours",
        s.device_reads_merged
    );
    outln!(
        "integrity:   {} checksum mismatches caught on read, {} superblock copies repaired",
        s.checksum_mismatches,
        s.superblocks_repaired
    );
    outln!(
        "read-ahead:  {} hinted, {} read ahead, {} served ({}), {} skipped, {} failed, {} expired, {} held",
        s.hint_objects,
        s.read_ahead_objects,
        s.read_ahead_hits,
        human(s.read_ahead_hit_bytes),
        s.read_ahead_skipped,
        s.read_ahead_failed,
        s.read_ahead_expired,
        human(s.read_ahead_cache_bytes)
    );
    outln!(
        "discard:     {}",
        if s.discard_enabled {
            format!(
                "on: {} given back to the devices, {} waiting, {} failed, {} unsupported{}",
                human(s.discarded_bytes),
                human(s.discard_pending_bytes),
                s.discard_failures,
                s.discard_unsupported,
                if s.discard_startup_pass_done {
                    ""
                } else {
                    " (start-up pass over free space running)"
                }
            )
        } else {
            "off (config discard = false): freed space stays allocated on the devices".into()
        }
    );
    outln!(
        "regions:     {} registered, {}",
        s.regions_registered,
        human(s.region_bytes_registered)
    );
    outln!("devices:");
    for d in &s.devices {
        outln!(
            "  {:>3}  {:<40} {:<8} capacity {:>10}  used {:>10}  rebuilt {}",
            d.index,
            d.path,
            d.state,
            human(d.capacity_bytes),
            human(d.used_bytes),
            d.reconstructions
        );
        if !d.stable_name.is_empty() {
            outln!("       {}", d.stable_name);
        }
    }
    outln!("datasets: {}", s.datasets.len());
    for d in &s.datasets {
        outln!(
            "  {:<32} {:>10} objects {:>12}  {:<8} rebuilt {}{}",
            d.name,
            d.object_count,
            human(d.total_bytes),
            class_name(d),
            d.reconstructions,
            if d.health.is_empty() {
                String::new()
            } else {
                format!("  {}", d.health)
            }
        );
    }
    Ok(())
}
