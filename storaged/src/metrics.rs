//! Metrics for Prometheus: every metric's name (METRICS.md lists them with
//! their meaning), the recorder and its histogram buckets, the mapping of a
//! status snapshot onto gauges and counters, and the HTTP endpoint
//! (`endpoint`) that serves them.
//!
//! Two kinds of metric. Hot-path ones are recorded where they happen, on
//! handles made once: device I/O by `engine::metered::MeteredBackend`, RPCs
//! by [`rpc::RpcMetricsLayer`]. Everything the status RPC already reports
//! (space, scrub, read-ahead, regions, ...) is copied from one
//! `StatusResponse` when Prometheus scrapes ([`publish_status`]), so the
//! two views can never disagree and nothing is counted twice.
//!
//! The recorder is the process's global one (the `metrics` facade), set
//! once by [`install`]; without it every handle is a no-op, which is what
//! in-process tests and `storaged serve` without `--metrics` get.

pub mod endpoint;
pub mod rpc;

use storaged_proto::pb;

/// Device bytes read, by device.
pub const DEVICE_READ_BYTES: &str = "storaged_device_read_bytes_total";
/// Device bytes written, by device.
pub const DEVICE_WRITTEN_BYTES: &str = "storaged_device_written_bytes_total";
/// Device read operations, by device.
pub const DEVICE_READS: &str = "storaged_device_reads_total";
/// Device write operations, by device.
pub const DEVICE_WRITES: &str = "storaged_device_writes_total";
/// Device operations that failed, by device and op.
pub const DEVICE_ERRORS: &str = "storaged_device_errors_total";
/// fdatasync calls, by device.
pub const DEVICE_SYNCS: &str = "storaged_device_syncs_total";
/// Time from submission to completion of one device operation, by device
/// and op (read, write).
pub const DEVICE_IO_SECONDS: &str = "storaged_device_io_seconds";
/// Operations submitted to a device and not yet completed.
pub const DEVICE_QUEUE_DEPTH: &str = "storaged_device_queue_depth";

/// Time from request to the end of the response, by method and gRPC code.
pub const RPC_SECONDS: &str = "storaged_rpc_seconds";

/// Pool space.
pub const CAPACITY_BYTES: &str = "storaged_capacity_bytes";
pub const USED_BYTES: &str = "storaged_used_bytes";
/// Per device: space used, whether it is present (1) or missing or
/// rebuilding (0), stripes rebuilt because its unit was lost or bad.
pub const DEVICE_USED_BYTES: &str = "storaged_device_used_bytes";
pub const DEVICE_UP: &str = "storaged_device_up";
pub const DEVICE_RECONSTRUCTIONS: &str = "storaged_device_reconstructions_total";
/// Some device is missing.
pub const DEGRADED: &str = "storaged_degraded";
pub const DATASETS: &str = "storaged_datasets";
pub const INGESTS_IN_PROGRESS: &str = "storaged_ingests_in_progress";
/// Bytes delivered by each read path, and payload bytes copied in user
/// space to deliver them.
pub const GRPC_SERVED_BYTES: &str = "storaged_grpc_served_bytes_total";
pub const GRPC_COPIED_BYTES: &str = "storaged_grpc_payload_copied_bytes_total";
pub const SHM_SERVED_BYTES: &str = "storaged_shm_served_bytes_total";
pub const SHM_COPIED_BYTES: &str = "storaged_shm_payload_copied_bytes_total";
pub const DEVICE_READS_MERGED: &str = "storaged_device_reads_merged_total";
/// Checksum blocks that failed verification on read (never served).
pub const CHECKSUM_MISMATCHES: &str = "storaged_checksum_mismatches_total";
/// Registered client memory regions.
pub const REGIONS: &str = "storaged_regions";
pub const REGION_BYTES: &str = "storaged_region_bytes";
pub const REGIONS_FIXED: &str = "storaged_regions_fixed";
/// Read-ahead hints and what came of them.
pub const READ_AHEAD_HINTED: &str = "storaged_read_ahead_hinted_objects_total";
pub const READ_AHEAD_READ: &str = "storaged_read_ahead_objects_total";
pub const READ_AHEAD_SKIPPED: &str = "storaged_read_ahead_skipped_total";
pub const READ_AHEAD_FAILED: &str = "storaged_read_ahead_failed_total";
pub const READ_AHEAD_HITS: &str = "storaged_read_ahead_hits_total";
pub const READ_AHEAD_HIT_BYTES: &str = "storaged_read_ahead_hit_bytes_total";
pub const READ_AHEAD_EXPIRED: &str = "storaged_read_ahead_expired_total";
pub const READ_AHEAD_CACHE_BYTES: &str = "storaged_read_ahead_cache_bytes";
/// Scrub totals since start.
pub const SCRUB_PASSES: &str = "storaged_scrub_passes_total";
pub const SCRUB_CHECKED_BYTES: &str = "storaged_scrub_checked_bytes_total";
pub const SCRUB_CORRUPT: &str = "storaged_scrub_corrupt_total";
pub const SCRUB_REPAIRED: &str = "storaged_scrub_repaired_total";
pub const SCRUB_UNRECOVERABLE: &str = "storaged_scrub_unrecoverable_total";
pub const SCRUB_RUNNING: &str = "storaged_scrub_running";
/// A device replacement: bytes rebuilt so far and in all, running or not.
pub const REBUILD_DONE_BYTES: &str = "storaged_rebuild_done_bytes";
pub const REBUILD_TOTAL_BYTES: &str = "storaged_rebuild_total_bytes";
pub const REBUILD_RUNNING: &str = "storaged_rebuild_running";
/// Freed space given back to the devices.
pub const DISCARDED_BYTES: &str = "storaged_discarded_bytes_total";
pub const DISCARD_PENDING_BYTES: &str = "storaged_discard_pending_bytes";
pub const DISCARD_FAILURES: &str = "storaged_discard_failures_total";
/// The catalog is failing (its filesystem full, an I/O error).
pub const CATALOG_FAILING: &str = "storaged_catalog_failing";
pub const POOL_ROOT_GENERATION: &str = "storaged_pool_root_generation";
/// Connections open now, and refused by the connection limits.
pub const CONNECTIONS_OPEN: &str = "storaged_connections_open";
pub const CONNECTIONS_REFUSED: &str = "storaged_connections_refused_total";
/// The I/O buffer pool: its size, and the bytes leased now (reads and
/// writes in flight, read-ahead, responses not yet sent).
pub const BUFFER_POOL_BYTES: &str = "storaged_buffer_pool_bytes";
pub const BUFFER_POOL_IN_USE_BYTES: &str = "storaged_buffer_pool_in_use_bytes";

/// Device latency buckets, seconds: 20 µs (tmpfs, page cache) to 1 s (a
/// device in trouble).
const DEVICE_BUCKETS_S: &[f64] = &[
    0.000_02, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

/// RPC latency buckets, seconds: 100 µs (a small read on the same host) to
/// 5 minutes (a streamed dataset, a scrub).
const RPC_BUCKETS_S: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// What a metric is, for the exposition's `# HELP` line.
const HELP: &[(&str, &str)] = &[
    (DEVICE_READ_BYTES, "Device bytes read."),
    (DEVICE_WRITTEN_BYTES, "Device bytes written."),
    (DEVICE_READS, "Device read operations."),
    (DEVICE_WRITES, "Device write operations."),
    (DEVICE_ERRORS, "Device operations that failed."),
    (DEVICE_SYNCS, "fdatasync calls."),
    (
        DEVICE_IO_SECONDS,
        "Submission to completion of one device operation.",
    ),
    (
        DEVICE_QUEUE_DEPTH,
        "Operations submitted to the device and not completed.",
    ),
    (
        RPC_SECONDS,
        "Request to end of response, by method and gRPC code.",
    ),
    (CAPACITY_BYTES, "Pool capacity."),
    (
        USED_BYTES,
        "Pool space used (datasets, ingests, pending discards).",
    ),
    (DEVICE_USED_BYTES, "Device space used."),
    (
        DEVICE_UP,
        "1 if the device is present, 0 if missing or rebuilding.",
    ),
    (
        DEVICE_RECONSTRUCTIONS,
        "Stripes rebuilt because this device's unit was lost or bad.",
    ),
    (DEGRADED, "1 if a device is missing."),
    (DATASETS, "Committed datasets."),
    (INGESTS_IN_PROGRESS, "Ingests in progress."),
    (GRPC_SERVED_BYTES, "Bytes delivered over gRPC."),
    (
        GRPC_COPIED_BYTES,
        "Payload bytes copied in user space for gRPC.",
    ),
    (SHM_SERVED_BYTES, "Bytes delivered into registered regions."),
    (
        SHM_COPIED_BYTES,
        "Payload bytes copied in user space for regions.",
    ),
    (
        DEVICE_READS_MERGED,
        "Device read pieces merged into a neighbour's read.",
    ),
    (
        CHECKSUM_MISMATCHES,
        "Checksum blocks that failed verification on read.",
    ),
    (REGIONS, "Registered client memory regions."),
    (REGION_BYTES, "Bytes of registered client memory regions."),
    (
        REGIONS_FIXED,
        "Regions registered as io_uring fixed buffers.",
    ),
    (READ_AHEAD_HINTED, "Objects hinted for read-ahead."),
    (READ_AHEAD_READ, "Objects read ahead."),
    (READ_AHEAD_SKIPPED, "Hinted objects not read ahead."),
    (READ_AHEAD_FAILED, "Read-aheads that failed (never served)."),
    (READ_AHEAD_HITS, "Reads served from read-ahead."),
    (READ_AHEAD_HIT_BYTES, "Bytes served from read-ahead."),
    (READ_AHEAD_EXPIRED, "Read-ahead objects expired unread."),
    (
        READ_AHEAD_CACHE_BYTES,
        "Buffer bytes the read-ahead cache holds.",
    ),
    (SCRUB_PASSES, "Scrub passes."),
    (SCRUB_CHECKED_BYTES, "Bytes checked by scrub."),
    (SCRUB_CORRUPT, "Units or blocks scrub found corrupt."),
    (SCRUB_REPAIRED, "Units or blocks scrub repaired."),
    (
        SCRUB_UNRECOVERABLE,
        "Units or blocks scrub could not repair.",
    ),
    (SCRUB_RUNNING, "1 while a scrub runs."),
    (
        REBUILD_DONE_BYTES,
        "Bytes a device replacement has rebuilt.",
    ),
    (
        REBUILD_TOTAL_BYTES,
        "Bytes a device replacement rebuilds in all.",
    ),
    (REBUILD_RUNNING, "1 while a device replacement runs."),
    (
        DISCARDED_BYTES,
        "Device bytes discarded (holes punched, TRIM).",
    ),
    (
        DISCARD_PENDING_BYTES,
        "Freed bytes waiting for their discard.",
    ),
    (DISCARD_FAILURES, "Discards that failed."),
    (CATALOG_FAILING, "1 while the catalog is failing."),
    (
        POOL_ROOT_GENERATION,
        "Generation of the pool root on the devices.",
    ),
    (CONNECTIONS_OPEN, "Connections open."),
    (
        CONNECTIONS_REFUSED,
        "Connections refused by the connection limits.",
    ),
    (BUFFER_POOL_BYTES, "Size of the I/O buffer pool."),
    (
        BUFFER_POOL_IN_USE_BYTES,
        "I/O buffer pool bytes leased now.",
    ),
];

/// Every metric name this daemon exports.
pub fn names() -> impl Iterator<Item = &'static str> {
    HELP.iter().map(|(n, _)| *n)
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("setting up the metrics recorder: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the metrics listener's address: {0}")]
    Address(std::io::Error),
}

/// Installs the process's Prometheus recorder (once; later handles record
/// into it) and describes every metric.
pub fn install() -> Result<metrics_exporter_prometheus::PrometheusHandle, MetricsError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DEVICE_IO_SECONDS.into()), DEVICE_BUCKETS_S)?
        .set_buckets_for_metric(Matcher::Full(RPC_SECONDS.into()), RPC_BUCKETS_S)?
        .install_recorder()?;
    for (name, help) in HELP {
        let kind = if name.ends_with("_total") {
            Kind::Counter
        } else if name.ends_with("_seconds") {
            Kind::Histogram
        } else {
            Kind::Gauge
        };
        let unit = if name.contains("bytes") {
            Some(metrics::Unit::Bytes)
        } else if name.ends_with("_seconds") {
            Some(metrics::Unit::Seconds)
        } else {
            None
        };
        match (kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(*name, u, *help),
            (Kind::Counter, None) => metrics::describe_counter!(*name, *help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(*name, u, *help),
            (Kind::Gauge, None) => metrics::describe_gauge!(*name, *help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(*name, u, *help),
            (Kind::Histogram, None) => metrics::describe_histogram!(*name, *help),
        }
    }
    Ok(handle)
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Copies a status snapshot onto the metrics (at each scrape): the one
/// place the status maps to metrics.
pub fn publish_status(s: &pb::StatusResponse) {
    use metrics::{counter, gauge};
    gauge!(CAPACITY_BYTES).set(s.capacity_bytes as f64);
    gauge!(USED_BYTES).set(s.used_bytes as f64);
    for d in &s.devices {
        let device = d.index.to_string();
        gauge!(DEVICE_USED_BYTES, "device" => device.clone()).set(d.used_bytes as f64);
        gauge!(DEVICE_UP, "device" => device.clone()).set(flag(d.state == "ok"));
        counter!(DEVICE_RECONSTRUCTIONS, "device" => device).absolute(d.reconstructions);
    }
    gauge!(DEGRADED).set(flag(s.degraded));
    gauge!(DATASETS).set(s.datasets.len() as f64);
    gauge!(INGESTS_IN_PROGRESS).set(f64::from(s.ingests_in_progress));
    counter!(GRPC_SERVED_BYTES).absolute(s.reads().grpc_bytes_served);
    counter!(GRPC_COPIED_BYTES).absolute(s.reads().grpc_payload_bytes_copied);
    counter!(SHM_SERVED_BYTES).absolute(s.reads().shm_bytes_served);
    counter!(SHM_COPIED_BYTES).absolute(s.reads().shm_payload_bytes_copied);
    counter!(DEVICE_READS_MERGED).absolute(s.reads().device_reads_merged);
    counter!(CHECKSUM_MISMATCHES).absolute(s.reads().checksum_mismatches);
    gauge!(REGIONS).set(f64::from(s.regions().registered));
    gauge!(REGION_BYTES).set(s.regions().registered_bytes as f64);
    gauge!(REGIONS_FIXED).set(f64::from(s.regions().fixed));
    counter!(READ_AHEAD_HINTED).absolute(s.read_ahead().hinted_objects);
    counter!(READ_AHEAD_READ).absolute(s.read_ahead().objects);
    counter!(READ_AHEAD_SKIPPED).absolute(s.read_ahead().skipped);
    counter!(READ_AHEAD_FAILED).absolute(s.read_ahead().failed);
    counter!(READ_AHEAD_HITS).absolute(s.read_ahead().hits);
    counter!(READ_AHEAD_HIT_BYTES).absolute(s.read_ahead().hit_bytes);
    counter!(READ_AHEAD_EXPIRED).absolute(s.read_ahead().expired);
    gauge!(READ_AHEAD_CACHE_BYTES).set(s.read_ahead().cache_bytes as f64);
    counter!(SCRUB_PASSES).absolute(s.scrub().passes);
    counter!(SCRUB_CHECKED_BYTES).absolute(s.scrub().bytes_checked);
    counter!(SCRUB_CORRUPT).absolute(s.scrub().corrupt);
    counter!(SCRUB_REPAIRED).absolute(s.scrub().repaired);
    counter!(SCRUB_UNRECOVERABLE).absolute(s.scrub().unrecoverable);
    gauge!(SCRUB_RUNNING).set(flag(s.scrub().running));
    let (done, total, running) = s
        .rebuild
        .as_ref()
        .map_or((0, 0, false), |r| (r.bytes_done, r.bytes_total, r.running));
    gauge!(REBUILD_DONE_BYTES).set(done as f64);
    gauge!(REBUILD_TOTAL_BYTES).set(total as f64);
    gauge!(REBUILD_RUNNING).set(flag(running));
    counter!(DISCARDED_BYTES).absolute(s.discard().discarded_bytes);
    gauge!(DISCARD_PENDING_BYTES).set(s.discard().pending_bytes as f64);
    counter!(DISCARD_FAILURES).absolute(s.discard().failures);
    gauge!(CATALOG_FAILING).set(flag(!s.catalog().fault.is_empty()));
    gauge!(POOL_ROOT_GENERATION).set(s.catalog().pool_root_generation as f64);
    gauge!(CONNECTIONS_OPEN).set(f64::from(s.connections().open));
    counter!(CONNECTIONS_REFUSED).absolute(s.connections().refused);
    gauge!(BUFFER_POOL_BYTES).set(s.buffers().pool_bytes as f64);
    gauge!(BUFFER_POOL_IN_USE_BYTES).set(s.buffers().in_use_bytes as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against a metric that is exported but not described (or
    /// named against Prometheus conventions), which METRICS.md would then
    /// miss too.
    #[test]
    fn every_name_follows_the_conventions_and_is_in_metrics_md() {
        let doc = include_str!("../../METRICS.md");
        let mut seen = std::collections::HashSet::new();
        for name in names() {
            assert!(seen.insert(name), "{name} twice");
            assert!(name.starts_with("storaged_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in METRICS.md"
            );
        }
    }

    /// Guards against a dashboard that plots metrics storaged does not
    /// export (renamed or mistyped), which would show empty panels.
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../tools/grafana/storaged.json"))
                .expect("the dashboard is JSON");
        let known: std::collections::HashSet<&str> = names().collect();
        let mut used = 0;
        for panel in doc["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                let mut rest = expr;
                while let Some(at) = rest.find("storaged_") {
                    let name: String = rest[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[at + name.len()..];
                    let base = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                        .unwrap_or(&name);
                    assert!(known.contains(base), "{name} in {:?}", panel["title"]);
                    used += 1;
                }
            }
        }
        assert!(used > 20, "{used}");
    }
}
