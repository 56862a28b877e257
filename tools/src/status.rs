//! `storagectl status`: the Status message for people (devices, space,
//! datasets, what was served and repaired), or whole as JSON for scripts.

use std::io::Write;

use storaged_proto::pb::{ClusterStatusResponse, StatusResponse};

use super::{class_name, human};

/// Prints `s`, as JSON when `json`.
pub fn print(s: &StatusResponse, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print_pool(s)?;
    print_jobs(s)?;
    print_activity(s)?;
    print_devices(s)?;
    print_datasets(s)?;
    Ok(())
}

/// Prints the cluster's status, as JSON when `json`.
pub fn print_cluster(s: &ClusterStatusResponse, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let up = s.nodes.iter().filter(|n| n.state == "up").count();
    outln!("cluster:         {} (id {})", s.cluster_name, s.cluster_id);
    outln!("control plane:   {}", s.control_plane);
    outln!("answered by:     {}", s.this_node);
    outln!("nodes:           {} members, {up} up", s.nodes.len());
    outln!(
        "placement epoch: {}  nodes: {}",
        s.placement_epoch,
        s.placement_nodes.join(" ")
    );
    let (capacity, used) = s
        .nodes
        .iter()
        .filter(|n| n.state == "up")
        .fold((0, 0), |(c, u), n| (c + n.capacity_bytes, u + n.used_bytes));
    outln!("capacity (up):   {}  used {}", human(capacity), human(used));
    if s.rebuild_after_s == 0 {
        outln!("repair:          off (a member down stays down until drained)");
    } else {
        outln!(
            "repair:          a member down {} s is rebuilt on other nodes",
            s.rebuild_after_s
        );
    }
    outln!(
        "{:<16} {:<8} {:<9} {:<22} {:>10} {:>10} {:>10}  placed",
        "NODE",
        "STATE",
        "MEMBER",
        "ADDRESS",
        "LEASE",
        "CAPACITY",
        "USED"
    );
    for n in &s.nodes {
        let lease = if n.state == "up" {
            format!("{}s", n.lease_ttl_s)
        } else if n.down_since_unix_s > 0 {
            // How long it has been down, in the lease's column.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("down {}s", now.saturating_sub(n.down_since_unix_s))
        } else {
            "-".to_owned()
        };
        outln!(
            "{:<16} {:<8} {:<9} {:<22} {:>10} {:>10} {:>10}  {}",
            n.node_id,
            n.state,
            n.member_state,
            if n.advertise.is_empty() {
                "-"
            } else {
                &n.advertise
            },
            lease,
            if n.state == "up" {
                human(n.capacity_bytes)
            } else {
                "-".to_owned()
            },
            if n.state == "up" {
                human(n.used_bytes)
            } else {
                "-".to_owned()
            },
            if n.placed { "yes" } else { "no" }
        );
    }
    if s.at_risk.is_empty() {
        outln!("datasets at risk: none");
    } else {
        outln!("datasets at risk:");
        outln!(
            "{:<32} {:<8} {:<24} readable",
            "DATASET",
            "CLASS",
            "NODES DOWN"
        );
        for d in &s.at_risk {
            outln!(
                "{:<32} {:<8} {:<24} {}",
                d.name,
                format!("ec:{}+{}", d.ec_data_units, d.ec_parity_units),
                d.nodes_down.join(","),
                if d.readable { "yes, from parity" } else { "NO" }
            );
        }
    }
    Ok(())
}

/// Identity, space, health, the catalog and connections.
fn print_pool(s: &StatusResponse) -> anyhow::Result<()> {
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
        } else if !s.catalog().fault.is_empty() {
            "CATALOG FAILING (see below)"
        } else {
            "ok"
        }
    );
    if !s.catalog().fault.is_empty() {
        outln!(
            "catalog:     failing: {} (ingests and deletes fail until storaged can reopen it)",
            s.catalog().fault
        );
    }
    if s.catalog().rebuilt {
        outln!(
            "catalog:     REBUILT FROM THE DEVICES at start ({} datasets imported, {} dropped as deleted): the data-dir catalog was missing, damaged, restored or behind",
            s.catalog().datasets_imported,
            s.catalog().datasets_dropped
        );
    }
    outln!(
        "pool root:   generation {} on every device",
        s.catalog().pool_root_generation
    );
    outln!(
        "connections: {} open, {} refused since start",
        s.connections().open,
        s.connections().refused
    );
    let c = s.connections();
    if c.bulk_tcp_port == 0 {
        outln!("bulk tcp:    off");
    } else {
        outln!(
            "bulk tcp:    port {}, staging {} held ({} mapped), items up to {}",
            c.bulk_tcp_port,
            human(c.bulk_tcp_staging_bytes),
            human(c.bulk_tcp_staging_mapped_bytes),
            human(c.bulk_tcp_item_bytes_max)
        );
        if c.bulk_tcp_zerocopy_sends > 0 {
            outln!(
                "             {} zero-copy sends, {} of them copied by the kernel",
                c.bulk_tcp_zerocopy_sends,
                c.bulk_tcp_zerocopy_copied
            );
        }
    }
    Ok(())
}

/// Rebuild, scrub and ingests under way or done.
fn print_jobs(s: &StatusResponse) -> anyhow::Result<()> {
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
        s.scrub().passes,
        if s.scrub().running { " (running)" } else { "" },
        human(s.scrub().bytes_checked),
        s.scrub().corrupt,
        s.scrub().repaired,
        s.scrub().unrecoverable
    );
    outln!("ingests in progress: {}", s.ingests_in_progress);
    Ok(())
}

/// What was served and how: copies, merged reads, integrity, read-ahead,
/// discard and regions.
fn print_activity(s: &StatusResponse) -> anyhow::Result<()> {
    outln!(
        "served:      grpc {} ({} copied)  shm {} ({} copied)  bulk tcp {} ({} copied)",
        human(s.reads().grpc_bytes_served),
        human(s.reads().grpc_payload_bytes_copied),
        human(s.reads().shm_bytes_served),
        human(s.reads().shm_payload_bytes_copied),
        human(s.reads().bulk_bytes_served),
        human(s.reads().bulk_payload_bytes_copied)
    );
    outln!(
        "scheduling:  {} device reads merged into neighbours",
        s.reads().device_reads_merged
    );
    outln!(
        "integrity:   {} checksum mismatches caught on read, {} superblock copies repaired",
        s.reads().checksum_mismatches,
        s.superblocks_repaired
    );
    outln!(
        "read-ahead:  {} hinted, {} read ahead, {} served ({}), {} skipped, {} failed, {} expired, {} held",
        s.read_ahead().hinted_objects,
        s.read_ahead().objects,
        s.read_ahead().hits,
        human(s.read_ahead().hit_bytes),
        s.read_ahead().skipped,
        s.read_ahead().failed,
        s.read_ahead().expired,
        human(s.read_ahead().cache_bytes)
    );
    outln!(
        "discard:     {}",
        if s.discard().enabled {
            format!(
                "on: {} given back to the devices, {} waiting, {} failed, {} unsupported{}",
                human(s.discard().discarded_bytes),
                human(s.discard().pending_bytes),
                s.discard().failures,
                s.discard().unsupported,
                if s.discard().startup_pass_done {
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
        s.regions().registered,
        human(s.regions().registered_bytes)
    );
    Ok(())
}

fn print_devices(s: &StatusResponse) -> anyhow::Result<()> {
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
    Ok(())
}

fn print_datasets(s: &StatusResponse) -> anyhow::Result<()> {
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
