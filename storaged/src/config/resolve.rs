//! How flags, the config file and defaults become each part of the
//! configuration (`ServeConfig::resolve` puts the parts together).

use super::*;

/// Octal permission bits ("0660", "660", "0o666"), at most 0o777.
pub(super) fn parse_mode(v: &str) -> Result<u32, ConfigError> {
    let digits = v.trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(invalid(
            "unix_mode",
            format!("unix_mode {v:?}: expected octal permission bits such as \"0660\" or \"0666\""),
        )),
    }
}

/// The store's part of the configuration: flags over the file over
/// defaults.
pub(super) fn store_config(
    data_dir: PathBuf,
    flags: &mut ServeFlags,
    file: &FileConfig,
) -> Result<StoreConfig, ConfigError> {
    let mut store = StoreConfig::with_defaults(data_dir);
    let devices = if !flags.devices.is_empty() {
        Some(std::mem::take(&mut flags.devices))
    } else {
        file.devices.clone()
    };
    if let Some(d) = devices {
        if d.is_empty() {
            return Err(invalid("devices", "devices: at least one device is needed"));
        }
        store.devices = expand_devices(&d).map_err(|why| invalid("devices", why))?;
    }
    if let Some(s) = flags.device_size.take().or(file.device_size.clone()) {
        store.device_size_bytes = size_field("device size", &s)?;
    }
    if let Some(s) = flags.stripe_unit.take().or(file.stripe_unit.clone()) {
        store.stripe_unit_bytes = size_field("stripe unit", &s)?;
    }
    store.force = flags.force || file.force.unwrap_or(false);
    if let Some(e) = flags.engine.or(file.engine) {
        store.engine = e;
    }
    if let Some(q) = file.queue_depth {
        if !(1..=1024).contains(&q) {
            return Err(invalid(
                "queue_depth",
                format!("queue_depth {q} must be 1 to 1024"),
            ));
        }
        store.queue_depth_per_device_max = q;
    }
    if let Some(s) = &file.buffer_pool {
        store.buffer_pool_bytes = size_field("buffer_pool", s)?;
    }
    if let Some(s) = &file.message_size {
        store.limits.message_bytes = size_field("message_size", s)?;
    }
    if let Some(s) = &file.read_ahead {
        store.limits.read_ahead_bytes = size_field("read_ahead", s)?;
    }
    // Unless set, read-ahead may hold 3/8 of the pool (96 MiB of the
    // default 256 MiB), so a small pool gets a small cache.
    store.limits.hint_cache_bytes_max = match &file.hint_cache {
        Some(s) => size_field("hint_cache", s)?,
        None => store.buffer_pool_bytes / 8 * 3,
    };
    if let Some(s) = &file.read_merge {
        store.limits.read_merge_bytes_max = size_field("read_merge", s)?;
    }
    if let Some(s) = &file.degraded_cache {
        store.limits.degraded_cache_bytes_max = size_field("degraded_cache", s)?;
    }
    if let Some(r) = file.scrub_rate_mib_s {
        store.limits.scrub_rate_mib_s = r;
    }
    if let Some(i) = file.scrub_interval_s {
        store.limits.scrub_interval_s = i;
    }
    if let Some(s) = &file.replace_checkpoint {
        store.limits.replace_checkpoint_bytes = size_field("replace_checkpoint", s)?.max(1);
    }
    if let Some(d) = file.discard {
        store.discard = d;
    }
    if let Some(spec) = &flags.fault_inject {
        store.fault_inject = Some(
            spec.parse()
                .map_err(|e| invalid("fault_inject", format!("--fault-inject {spec:?}: {e}")))?,
        );
    }
    Ok(store)
}

/// The server's limits: the file over defaults. Unless set, one
/// connection may hold half the pool (`buffer_pool_bytes`), and so may one
/// tenant: a client that stops reading cannot take it all.
pub(super) fn server_limits(
    file: &FileConfig,
    buffer_pool_bytes: u64,
) -> Result<ServerLimits, ConfigError> {
    let mut server = ServerLimits::default();
    if let Some(m) = file.max_concurrent_streams {
        server.max_concurrent_streams = m;
    }
    if let Some(t) = file.stream_stall_timeout_s {
        server.stream_stall_timeout_s = t;
    }
    if let Some(t) = file.ingest_idle_timeout_s {
        server.ingest_idle_timeout_s = t;
    }
    if let Some(n) = file.connections_max {
        server.connections_max = n;
    }
    if let Some(n) = file.connections_per_peer_max {
        server.connections_per_peer_max = n;
    }
    if let Some(t) = file.preface_timeout_s {
        server.preface_timeout_s = t;
    }
    if let Some(t) = file.connection_idle_timeout_s {
        server.connection_idle_timeout_s = t;
    }
    server.connection_inflight_bytes_max = match &file.connection_inflight {
        Some(s) => size_field("connection_inflight", s)?,
        None => buffer_pool_bytes / 2,
    };
    if let Some(s) = &file.bulk_staging {
        server.bulk_staging_bytes = size_field("bulk_staging", s)?;
    }
    if let Some(s) = &file.bulk_staging_total {
        server.bulk_staging_bytes_total_max = size_field("bulk_staging_total", s)?;
    }
    if let Some(t) = file.bulk_staging_keep_s {
        server.bulk_staging_keep_s = t;
    }
    if let Some(z) = file.bulk_send_zerocopy {
        server.bulk_send_zerocopy = z;
    }
    Ok(server)
}

/// The TLS files: none, or a certificate and key (and a client CA only
/// with them).
pub(super) fn tls_files(file: &FileConfig) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
    match (&file.tls_cert, &file.tls_key, &file.tls_client_ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), client_ca) => Ok(Some(crate::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.clone(),
        })),
        (None, _, Some(_)) | (Some(_), None, _) | (None, Some(_), None) => Err(invalid(
            "tls_cert",
            "TLS needs both tls_cert and tls_key (and tls_client_ca only with them)",
        )),
    }
}

pub(super) fn size_field(name: &'static str, v: &str) -> Result<u64, ConfigError> {
    parse_size(v).map_err(|e| invalid(name, format!("{name}: {e}")))
}
