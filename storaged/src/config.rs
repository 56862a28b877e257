//! Configuration of `storaged serve`: defaults, the TOML file, and flags.
//!
//! Precedence is flags over the file over defaults. Every limit the daemon
//! enforces is here with its default, so `storaged serve --help` and the
//! README list them in one place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use storaged_proto::http2;

use crate::engine::EngineKind;
use crate::size::parse_size;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
pub const DEFAULT_DATA_DIR: &str = "./storaged-data";
pub const DEFAULT_DEVICE_COUNT: usize = 4;
pub const DEFAULT_DEVICE_SIZE: &str = "4GiB";
pub const DEFAULT_STRIPE_UNIT: &str = "1MiB";

/// Why a configuration was refused. Each names the setting (config key or
/// flag) it is about, so callers can tell which without reading text.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// A value that is malformed, out of its range, or inconsistent with
    /// another; `why` says which and what would do.
    #[error("{why}")]
    Invalid { key: &'static str, why: String },
    #[error("printing the configuration: {0}")]
    Print(#[from] toml::ser::Error),
}

impl ConfigError {
    /// The setting a refusal is about.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

fn invalid(key: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        why: why.into(),
    }
}

/// What `--print-config` shows in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// The TOML file. Every field is optional; sizes are strings like "4GiB".
/// (Tables come last: TOML writes plain keys before them.)
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The TCP bulk channel (payload without HTTP/2, for remote clients):
    /// "auto" (the default: `listen`'s address, a free port, advertised in
    /// Status; off when TLS is on, since it has no TLS yet), "off", or an
    /// address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_listen: Option<String>,
    /// Address of the Prometheus endpoint (`GET /metrics`); none: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<PathBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripe_unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_ahead: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint_cache: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_merge: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix: Option<PathBuf>,
    /// Octal permission bits of the Unix socket, e.g. "0660" or "0666".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_mode: Option<String>,
    /// Group of the Unix socket (name or id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_bytes_per_client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_bytes_total: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded_cache: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub_rate_mib_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub_interval_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_checkpoint: Option<String>,
    /// Give freed space back to the devices (hole punching, TRIM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard: Option<bool>,
    /// Append-only JSON-lines audit log of writes, admin operations and
    /// denied requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    /// Fail an operation whose audit line cannot be written (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_required: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_stall_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_idle_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_per_peer_max: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preface_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_idle_timeout_s: Option<u64>,
    /// Pool bytes one connection's calls may hold ("128MiB").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_inflight: Option<String>,
    /// Pool bytes one tenant's calls may hold, unless its quota says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_inflight: Option<String>,
    /// Staging memory of one TCP bulk channel connection ("16MiB"): the
    /// most one of its requests holds read at once, and the largest item
    /// span it serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_staging: Option<String>,
    /// Staging memory of all TCP bulk channel connections together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_staging_total: Option<String>,
    /// Seconds a staging region no connection holds stays mapped for the
    /// next one (a fresh one costs zeroing and pinning its pages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_staging_keep_s: Option<u64>,
    /// Send TCP bulk windows with MSG_ZEROCOPY (a NIC then sends them by
    /// DMA from the staging; loopback and veth copy them anyway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_send_zerocopy: Option<bool>,
    /// Cluster mode: the control plane's URL (etcd://HOST:PORT[,...]).
    /// Absent: a single node, as without cluster mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The cluster's name (several clusters may share one etcd).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// This node's id in the cluster (a-z, 0-9, '-', '_').
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// HOST:PORT clients and other nodes reach this node's gRPC at
    /// (default: the bound listen address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Seconds a node's lease lasts without a heartbeat: how long a dead
    /// node still looks live (heartbeats every third of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_lease_ttl_s: Option<u64>,
    /// Seconds one control-plane request may take before it counts as
    /// unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_request_timeout_s: Option<u64>,
    /// Seconds between sweeps for this node's orphaned cluster units
    /// (shares of ingests that never committed, of removed datasets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_sweep_interval_s: Option<u64>,
    /// Seconds a member may be down before the cluster rebuilds its
    /// shares on other nodes (checked every sweep interval); 0: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_rebuild_after_s: Option<u64>,
    /// Move shares, one per sweep interval, from the node holding the
    /// most bytes to the one holding the least (a node that joins fills
    /// up over time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_rebalance: Option<bool>,
    /// With tenants: a file holding the bearer token nodes present to
    /// each other (a tenant's with write on `cluster.`, the unit datasets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_token_file: Option<PathBuf>,
    /// With TLS: the CA certificate (PEM) that signed every node's
    /// certificate; nodes verify each other against it and present their
    /// own certificate as a client's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_ca: Option<PathBuf>,
    /// TLS on the TCP listener: the server's certificate chain and key
    /// (PEM), and CAs of accepted client certificates (then required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Tenants (`[[tenant]]` tables); none: every caller is the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Vec<crate::auth::TenantSpec>>,
    /// JWTs from an identity provider as bearer tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<crate::jwt::JwtSpec>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }
}

/// Limits of the store layer.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    /// Largest `data` payload per Read/ReadBatch message; a multiple of the
    /// checksum block.
    pub message_bytes: u64,
    /// Bytes read ahead of the consumer for one Read stream.
    pub read_ahead_bytes: u64,
    /// Items (windows) in flight for one ReadBatch, when the client does not
    /// ask for fewer.
    pub batch_in_flight_default: u32,
    pub batch_in_flight_max: u32,
    /// Finished ReadBatch bytes that may wait behind a slow item, so the
    /// devices stay busy (see `store::pipeline`).
    pub batch_reorder_bytes_max: u64,
    /// Largest item of an any-order ReadBatch (its bytes are held whole).
    pub batch_any_order_item_bytes_max: u64,
    pub batch_items_max: usize,
    /// Largest device read that scheduled reads of neighbouring pieces are
    /// merged into (`ReadInto` groups, read-ahead); 0 turns merging off.
    pub read_merge_bytes_max: u64,
    /// Read-ahead hints: objects per hint, pool buffer bytes the read-ahead
    /// cache may hold, and how long an unread entry stays.
    pub hint_items_max: usize,
    pub hint_cache_bytes_max: u64,
    pub hint_ttl_ms: u64,
    /// Rebuilt stripes kept for the degraded reads that follow (bytes of
    /// data units).
    pub degraded_cache_bytes_max: u64,
    /// Scrub speed (background and `storagectl scrub` alike), and how long
    /// after start and between background passes (0: no background scrub).
    pub scrub_rate_mib_s: u64,
    pub scrub_interval_s: u64,
    /// Bytes `device replace` rebuilds between durable checkpoints.
    pub replace_checkpoint_bytes: u64,
    /// Device writes in flight per ingest.
    pub ingest_write_depth: usize,
    pub ingest_objects_max: usize,
    pub ingests_concurrent_max: usize,
    pub list_page_size_default: u32,
    pub list_page_size_max: u32,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            message_bytes: 1 << 20,
            read_ahead_bytes: 64 << 20,
            batch_in_flight_default: 64,
            batch_in_flight_max: 512,
            batch_reorder_bytes_max: 32 << 20,
            batch_any_order_item_bytes_max: storaged_proto::model::BATCH_ANY_ORDER_ITEM_BYTES_MAX,
            batch_items_max: 100_000,
            read_merge_bytes_max: 1 << 20,
            hint_items_max: 4096,
            hint_cache_bytes_max: 96 << 20,
            hint_ttl_ms: 30_000,
            degraded_cache_bytes_max: 256 << 20,
            scrub_rate_mib_s: 64,
            scrub_interval_s: 24 * 3600,
            replace_checkpoint_bytes: 64 << 20,
            ingest_write_depth: 16,
            ingest_objects_max: 10_000_000,
            ingests_concurrent_max: 16,
            list_page_size_default: 1000,
            list_page_size_max: 10_000,
        }
    }
}

/// Everything the store needs to open.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub devices: Vec<PathBuf>,
    pub device_size_bytes: u64,
    pub stripe_unit_bytes: u64,
    pub force: bool,
    pub engine: EngineKind,
    pub queue_depth_per_device_max: u32,
    pub buffer_pool_bytes: u64,
    pub limits: StoreLimits,
    /// Freed space is given back to the devices (punched holes in device
    /// files, BLKDISCARD on block devices) by a background thread.
    pub discard: bool,
    /// Seeded fault injection (hidden `--fault-inject SPEC`; tests and
    /// reliability campaigns only). See `engine::fault::FaultSpec`.
    pub fault_inject: Option<crate::engine::fault::FaultSpec>,
    /// Count and time every device operation for the metrics endpoint
    /// (set when `--metrics` is given).
    pub io_metrics: bool,
}

impl StoreConfig {
    /// Defaults rooted at `data_dir`: four sparse 4 GiB device files.
    pub fn with_defaults(data_dir: PathBuf) -> Self {
        let devices = (0..DEFAULT_DEVICE_COUNT)
            .map(|i| data_dir.join(format!("dev{i}.img")))
            .collect();
        Self {
            data_dir,
            devices,
            device_size_bytes: parse_size(DEFAULT_DEVICE_SIZE).expect("valid default"),
            stripe_unit_bytes: parse_size(DEFAULT_STRIPE_UNIT).expect("valid default"),
            force: false,
            engine: EngineKind::Auto,
            queue_depth_per_device_max: 32,
            buffer_pool_bytes: 256 << 20,
            limits: StoreLimits::default(),
            discard: true,
            fault_inject: None,
            io_metrics: false,
        }
    }
}

/// HTTP/2 and gRPC limits, all set explicitly (tonic leaves some unlimited).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_concurrent_streams: u32,
    pub max_local_error_reset_streams: usize,
    pub max_decoding_message_bytes: usize,
    pub max_encoding_message_bytes: usize,
    pub max_frame_bytes: u32,
    pub initial_stream_window_bytes: u32,
    pub initial_connection_window_bytes: u32,
    pub keepalive_interval_s: u64,
    pub keepalive_timeout_s: u64,
    pub shutdown_grace_s: u64,
    /// A response stream whose client reads nothing for this long is
    /// ended and its buffers returned.
    pub stream_stall_timeout_s: u64,
    /// An ingest that receives nothing for this long is discarded (its
    /// slot and space freed).
    pub ingest_idle_timeout_s: u64,
    /// Connections open at once (TCP and Unix together), and from one
    /// peer (IP address, or uid on the Unix socket).
    pub connections_max: usize,
    pub connections_per_peer_max: usize,
    /// A connection must send its first 24 bytes (HTTP/2 preface, TLS
    /// hello) within this.
    pub preface_timeout_s: u64,
    /// A connection with no call for this long is closed.
    pub connection_idle_timeout_s: u64,
    /// Pool bytes the calls of one connection may hold at once; 0 means
    /// half the buffer pool (set when the config is resolved).
    pub connection_inflight_bytes_max: u64,
    /// Staging memory of one TCP bulk channel connection, and of all of
    /// them (a connection takes its staging at its first read and holds
    /// it until it closes; past the total, reads are refused with
    /// RESOURCE_EXHAUSTED).
    pub bulk_staging_bytes: u64,
    pub bulk_staging_bytes_total_max: u64,
    /// How long idle staging stays mapped (within the total) before it
    /// is unmapped.
    pub bulk_staging_keep_s: u64,
    /// Whether TCP bulk windows are sent with MSG_ZEROCOPY.
    pub bulk_send_zerocopy: bool,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            max_local_error_reset_streams: 1024,
            max_decoding_message_bytes: 8 << 20,
            max_encoding_message_bytes: 8 << 20,
            max_frame_bytes: http2::MAX_FRAME_BYTES,
            initial_stream_window_bytes: http2::STREAM_WINDOW_BYTES,
            initial_connection_window_bytes: http2::CONNECTION_WINDOW_BYTES,
            keepalive_interval_s: http2::KEEPALIVE_INTERVAL.as_secs(),
            keepalive_timeout_s: http2::KEEPALIVE_TIMEOUT.as_secs(),
            shutdown_grace_s: 10,
            stream_stall_timeout_s: 30,
            ingest_idle_timeout_s: 60,
            connections_max: 1024,
            connections_per_peer_max: 256,
            preface_timeout_s: 10,
            connection_idle_timeout_s: 300,
            connection_inflight_bytes_max: 0,
            bulk_staging_bytes: 16 << 20,
            bulk_staging_bytes_total_max: 1 << 30,
            bulk_staging_keep_s: 60,
            bulk_send_zerocopy: false,
        }
    }
}

/// The resolved configuration of `storaged serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// The TCP bulk channel's address (port 0: any free one); `None`: off.
    pub bulk_listen: Option<SocketAddr>,
    /// Where Prometheus scrapes `GET /metrics`; `None`: not served.
    pub metrics: Option<SocketAddr>,
    /// Unix socket for same-host clients (and the only way to register
    /// memory regions).
    pub unix: PathBuf,
    /// Who may use the Unix socket.
    pub unix_access: crate::server::UnixAccess,
    pub regions: crate::region::RegionLimits,
    pub store: StoreConfig,
    pub server: ServerLimits,
    pub worker_threads: usize,
    pub tenants: std::sync::Arc<crate::auth::Tenants>,
    pub audit_log: Option<PathBuf>,
    pub audit_required: bool,
    /// Listening on a non-loopback address without tenants and TLS was
    /// asked for explicitly (`--insecure`).
    pub insecure: bool,
    /// TLS on the TCP listener.
    pub tls: Option<crate::tls::TlsFiles>,
    /// What the config file said of tenants and JWTs, and the default
    /// in-flight bytes per tenant (for [`effective`](Self::effective)).
    pub tenant_specs: Vec<crate::auth::TenantSpec>,
    pub jwt_spec: Option<crate::jwt::JwtSpec>,
    pub tenant_inflight_bytes: u64,
    /// Cluster mode, when `cluster` is set.
    pub cluster: Option<ClusterSettings>,
}

/// Defaults of cluster mode.
pub const DEFAULT_CLUSTER_NAME: &str = "default";
pub const DEFAULT_CLUSTER_LEASE_TTL_S: u64 = 10;
pub const DEFAULT_CLUSTER_REQUEST_TIMEOUT_S: u64 = 5;
pub const DEFAULT_CLUSTER_SWEEP_INTERVAL_S: u64 = 30;
pub const DEFAULT_CLUSTER_REBUILD_AFTER_S: u64 = 600;

/// Cluster mode's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// etcd://HOST:PORT[,HOST:PORT...]
    pub url: String,
    pub cluster_name: String,
    pub node_id: String,
    /// `None`: the bound listen address.
    pub advertise: Option<String>,
    pub lease_ttl_s: u64,
    pub request_timeout_s: u64,
    pub sweep_interval_s: u64,
    /// Seconds a member may be down before its shares are rebuilt on
    /// other nodes; 0: never (an operator drains it).
    pub rebuild_after_s: u64,
    /// Even out the nodes' data, a share at a time.
    pub rebalance: bool,
    /// The token nodes present to each other (with tenants).
    pub peer_token: Option<PeerToken>,
    pub token_file: Option<PathBuf>,
    /// The CA of the nodes' certificates (with TLS).
    pub peer_ca: Option<PathBuf>,
}

/// A bearer token, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerToken(pub String);

impl std::fmt::Debug for PeerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerToken(<redacted>)")
    }
}

/// The flags of `storaged serve` that the config file can also set;
/// `None` means "not given" (the file, then the default, decides).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeFlags {
    /// Address for gRPC (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<String>,
    /// The TCP bulk channel for remote clients: auto (gRPC's address, a
    /// free port; off with TLS), off, or ADDR.
    #[arg(long, value_name = "auto|off|ADDR")]
    pub bulk_listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9464; port 0 picks one). Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Where the catalog (and the default devices) live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A device: a regular file (created if missing) or a block device, in
    /// any order; a glob or a directory is expanded. Repeat for each.
    #[arg(long = "device")]
    pub devices: Vec<PathBuf>,
    /// Size of device files that must be created, e.g. 640MiB, 16GiB.
    #[arg(long)]
    pub device_size: Option<String>,
    /// Stripe unit of a new pool (64KiB to 16MiB, power of two).
    #[arg(long)]
    pub stripe_unit: Option<String>,
    /// Erase devices holding data storaged does not recognize.
    #[arg(long)]
    pub force: bool,
    /// I/O engine: auto, uring or psync.
    #[arg(long)]
    pub engine: Option<EngineKind>,
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Tokio worker threads for gRPC.
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Unix socket for same-host clients and memory regions
    /// (default: storaged.sock in the data dir).
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Seeded fault injection for tests and reliability campaigns, e.g.
    /// `seed=7,read_eio=0.01,flip=0.01,vanish=2@1000` (keys: seed,
    /// read_eio, write_eio, flip, latency_ms, latency, torn, vanish,
    /// fsync_fail). Never for production.
    #[arg(long, hide = true)]
    pub fault_inject: Option<String>,
    /// Join a cluster whose control plane is this etcd
    /// (etcd://HOST:PORT[,HOST:PORT...]).
    #[arg(long, value_name = "etcd://HOST:PORT")]
    pub cluster: Option<String>,
    /// The cluster's name in etcd (default "default").
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// This node's id in the cluster (needed with --cluster).
    #[arg(long)]
    pub node_id: Option<String>,
    /// HOST:PORT others reach this node's gRPC at (default: the bound
    /// listen address).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Listen on a non-loopback address even without tenants or TLS:
    /// whoever reaches it gets what the config gives them, unencrypted.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeConfig {
    /// Resolves flags over the optional TOML file over defaults.
    pub fn resolve(mut flags: ServeFlags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let data_dir = flags
            .data_dir
            .take()
            .or(file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let unix = flags
            .unix
            .take()
            .or(file.unix.clone())
            .unwrap_or_else(|| data_dir.join("storaged.sock"));
        let mut unix_access = crate::server::UnixAccess::default();
        if let Some(m) = &file.unix_mode {
            unix_access.mode = parse_mode(m)?;
        }
        unix_access.group = file.unix_group.clone();
        let mut regions = crate::region::RegionLimits::default();
        if let Some(s) = &file.region_bytes_per_client {
            regions.bytes_per_client_max = size_field("region_bytes_per_client", s)?;
        }
        if let Some(s) = &file.region_bytes_total {
            regions.bytes_total_max = size_field("region_bytes_total", s)?;
        }
        let metrics = flags
            .metrics
            .clone()
            .or(file.metrics.clone())
            .map(|m| {
                m.parse::<SocketAddr>()
                    .map_err(|e| invalid("metrics", format!("metrics address {m:?}: {e}")))
            })
            .transpose()?;
        let mut store = store_config(data_dir, &mut flags, &file)?;
        store.io_metrics = metrics.is_some();
        let server = server_limits(&file, store.buffer_pool_bytes)?;
        let tenant_inflight_bytes = match &file.tenant_inflight {
            Some(s) => size_field("tenant_inflight", s)?,
            None => store.buffer_pool_bytes / 2,
        };
        let listen_s = flags
            .listen
            .take()
            .or(file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_s
            .parse()
            .map_err(|e| invalid("listen", format!("listen address {listen_s:?}: {e}")))?;
        let worker_threads = flags.worker_threads.or(file.worker_threads).unwrap_or(2);
        let tenant_specs = file.tenant.clone().unwrap_or_default();
        let mut tenants = crate::auth::Tenants::from_specs(
            &tenant_specs,
            tenant_inflight_bytes,
            file.jwt.is_some(),
        )
        .map_err(|why| invalid("tenant", why))?;
        if let Some(spec) = &file.jwt {
            if !tenants.enabled() {
                return Err(invalid(
                    "jwt",
                    "[jwt] names tenants: add [[tenant]] tables too",
                ));
            }
            tenants = tenants
                .with_jwt(crate::jwt::JwtVerifier::load(spec).map_err(|why| invalid("jwt", why))?);
        }
        let tls = tls_files(&file)?;
        let bulk_listen_s = flags
            .bulk_listen
            .take()
            .or(file.bulk_listen.clone())
            .unwrap_or_else(|| "auto".to_owned());
        let bulk_listen = bulk_listen_address(&bulk_listen_s, listen, tls.is_some())?;
        let cluster = cluster_settings(&mut flags, &file, listen, &tenants, tls.as_ref())?;
        let cfg = Self {
            cluster,
            tls,
            listen,
            bulk_listen,
            metrics,
            unix,
            unix_access,
            regions,
            store,
            server,
            worker_threads,
            tenants: std::sync::Arc::new(tenants),
            audit_log: file.audit_log,
            audit_required: file.audit_required.unwrap_or(true),
            insecure: flags.insecure,
            tenant_specs,
            jwt_spec: file.jwt,
            tenant_inflight_bytes,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration in force, as a config file with every key
    /// (`storaged serve --print-config`). Token hashes are redacted.
    pub fn effective(&self) -> FileConfig {
        use crate::size::exact_size;
        let s = &self.store;
        let l = &s.limits;
        let v = &self.server;
        FileConfig {
            listen: Some(self.listen.to_string()),
            bulk_listen: Some(
                self.bulk_listen
                    .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            ),
            metrics: self.metrics.map(|m| m.to_string()),
            data_dir: Some(s.data_dir.clone()),
            devices: Some(s.devices.clone()),
            device_size: Some(exact_size(s.device_size_bytes)),
            stripe_unit: Some(exact_size(s.stripe_unit_bytes)),
            force: Some(s.force),
            engine: Some(s.engine),
            queue_depth: Some(s.queue_depth_per_device_max),
            buffer_pool: Some(exact_size(s.buffer_pool_bytes)),
            message_size: Some(exact_size(l.message_bytes)),
            read_ahead: Some(exact_size(l.read_ahead_bytes)),
            hint_cache: Some(exact_size(l.hint_cache_bytes_max)),
            read_merge: Some(exact_size(l.read_merge_bytes_max)),
            max_concurrent_streams: Some(v.max_concurrent_streams),
            worker_threads: Some(self.worker_threads),
            unix: Some(self.unix.clone()),
            unix_mode: Some(format!("{:04o}", self.unix_access.mode)),
            unix_group: self.unix_access.group.clone(),
            region_bytes_per_client: Some(exact_size(self.regions.bytes_per_client_max)),
            region_bytes_total: Some(exact_size(self.regions.bytes_total_max)),
            degraded_cache: Some(exact_size(l.degraded_cache_bytes_max)),
            scrub_rate_mib_s: Some(l.scrub_rate_mib_s),
            scrub_interval_s: Some(l.scrub_interval_s),
            replace_checkpoint: Some(exact_size(l.replace_checkpoint_bytes)),
            discard: Some(s.discard),
            audit_log: self.audit_log.clone(),
            audit_required: Some(self.audit_required),
            stream_stall_timeout_s: Some(v.stream_stall_timeout_s),
            ingest_idle_timeout_s: Some(v.ingest_idle_timeout_s),
            connections_max: Some(v.connections_max),
            connections_per_peer_max: Some(v.connections_per_peer_max),
            preface_timeout_s: Some(v.preface_timeout_s),
            connection_idle_timeout_s: Some(v.connection_idle_timeout_s),
            connection_inflight: Some(exact_size(v.connection_inflight_bytes_max)),
            tenant_inflight: Some(exact_size(self.tenant_inflight_bytes)),
            bulk_staging: Some(exact_size(v.bulk_staging_bytes)),
            bulk_staging_total: Some(exact_size(v.bulk_staging_bytes_total_max)),
            bulk_staging_keep_s: Some(v.bulk_staging_keep_s),
            bulk_send_zerocopy: Some(v.bulk_send_zerocopy),
            tls_cert: self.tls.as_ref().map(|t| t.cert.clone()),
            tls_key: self.tls.as_ref().map(|t| t.key.clone()),
            tls_client_ca: self.tls.as_ref().and_then(|t| t.client_ca.clone()),
            tenant: (!self.tenant_specs.is_empty()).then(|| {
                self.tenant_specs
                    .iter()
                    .map(|t| crate::auth::TenantSpec {
                        tokens_sha256: t
                            .tokens_sha256
                            .iter()
                            .map(|_| REDACTED.to_owned())
                            .collect(),
                        ..t.clone()
                    })
                    .collect()
            }),
            jwt: self.jwt_spec.clone(),
            cluster: self.cluster.as_ref().map(|c| c.url.clone()),
            cluster_name: self.cluster.as_ref().map(|c| c.cluster_name.clone()),
            node_id: self.cluster.as_ref().map(|c| c.node_id.clone()),
            advertise: self.cluster.as_ref().and_then(|c| c.advertise.clone()),
            cluster_lease_ttl_s: self.cluster.as_ref().map(|c| c.lease_ttl_s),
            cluster_request_timeout_s: self.cluster.as_ref().map(|c| c.request_timeout_s),
            cluster_sweep_interval_s: self.cluster.as_ref().map(|c| c.sweep_interval_s),
            cluster_rebuild_after_s: self.cluster.as_ref().map(|c| c.rebuild_after_s),
            cluster_rebalance: self.cluster.as_ref().map(|c| c.rebalance),
            cluster_token_file: self.cluster.as_ref().and_then(|c| c.token_file.clone()),
            cluster_ca: self.cluster.as_ref().and_then(|c| c.peer_ca.clone()),
        }
    }

    /// [`effective`](Self::effective) as TOML.
    pub fn effective_toml(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(&self.effective())?)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        let block = u64::from(crate::device::CHECKSUM_BLOCK_BYTES);
        let m = s.limits.message_bytes;
        if m < block || !m.is_multiple_of(block) || m > 4 << 20 {
            return Err(invalid(
                "message_size",
                format!("message_size {m} must be a multiple of {block} bytes and at most 4 MiB"),
            ));
        }
        if s.limits.read_ahead_bytes < m {
            return Err(invalid(
                "read_ahead",
                "read_ahead must be at least message_size",
            ));
        }
        if s.buffer_pool_bytes < 16 << 20 {
            return Err(invalid(
                "buffer_pool",
                "buffer_pool must be at least 16 MiB",
            ));
        }
        if s.limits.hint_cache_bytes_max > s.buffer_pool_bytes / 2 {
            return Err(invalid(
                "hint_cache",
                format!(
                    "hint_cache ({} bytes) may take at most half of buffer_pool ({} bytes): foreground reads need the rest",
                    s.limits.hint_cache_bytes_max, s.buffer_pool_bytes
                ),
            ));
        }
        if s.limits.read_merge_bytes_max > 16 << 20 {
            return Err(invalid(
                "read_merge",
                "read_merge must be at most 16 MiB (0 turns merging off)",
            ));
        }
        if !(1..=100_000).contains(&s.limits.scrub_rate_mib_s) {
            return Err(invalid(
                "scrub_rate_mib_s",
                "scrub_rate_mib_s must be 1 to 100000",
            ));
        }
        if s.limits.degraded_cache_bytes_max > 4 << 30 {
            return Err(invalid(
                "degraded_cache",
                "degraded_cache must be at most 4 GiB",
            ));
        }
        if self.worker_threads == 0 || self.worker_threads > 64 {
            return Err(invalid("worker_threads", "worker_threads must be 1 to 64"));
        }
        for (name, v) in [
            ("stream_stall_timeout_s", self.server.stream_stall_timeout_s),
            ("ingest_idle_timeout_s", self.server.ingest_idle_timeout_s),
            ("bulk_staging_keep_s", self.server.bulk_staging_keep_s),
        ] {
            if !(1..=86_400).contains(&v) {
                return Err(invalid(name, format!("{name} must be 1 to 86400 seconds")));
            }
        }
        let staging = self.server.bulk_staging_bytes;
        if !(1 << 20..=1 << 30).contains(&staging) || !staging.is_multiple_of(1 << 20) {
            return Err(invalid(
                "bulk_staging",
                "bulk_staging must be whole MiB, 1 MiB to 1 GiB",
            ));
        }
        if self.server.bulk_staging_bytes_total_max < staging {
            return Err(invalid(
                "bulk_staging_total",
                "bulk_staging_total must be at least bulk_staging",
            ));
        }
        if let Some(why) = self.exposure()
            && !self.insecure
        {
            return Err(invalid(
                "listen",
                format!(
                    "refusing to listen on {}: {why}. Listen on a loopback address (127.0.0.1), or pass --insecure to do it anyway",
                    self.listen
                ),
            ));
        }
        if let Some(bulk) = self.bulk_listen
            && !bulk.ip().is_loopback()
            && !self.insecure
        {
            return Err(invalid(
                "bulk_listen",
                format!(
                    "refusing to serve the bulk channel on {bulk}: it has no TLS, so data would cross the network unencrypted. Use a loopback address, bulk_listen = \"off\", or pass --insecure on a trusted fabric"
                ),
            ));
        }
        Ok(())
    }

    /// Why listening where configured exposes the pool, if it does: a
    /// non-loopback address without tenants (every caller would be the
    /// operator) or without TLS (tokens and data would cross the network
    /// in the clear).
    pub fn exposure(&self) -> Option<String> {
        if self.listen.ip().is_loopback() {
            return None;
        }
        if self.tenants.enabled() && self.tls.is_some() {
            return None;
        }
        Some(if self.tenants.enabled() {
            "tokens and data would cross the network unencrypted (set tls_cert and tls_key)"
                .to_owned()
        } else {
            "no tenants are configured, so every caller that reaches this address would have every right, including deleting datasets".to_owned()
        })
    }
}

/// The TCP bulk channel's address from `bulk_listen`: "auto" is gRPC's
/// address with a free port, unless TLS is on (the bulk channel has none
/// yet, so it stays off rather than sending in the clear what gRPC
/// encrypts); "off" is none.
fn bulk_listen_address(
    value: &str,
    listen: SocketAddr,
    tls: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    match value {
        "off" => Ok(None),
        "auto" if tls => Ok(None),
        "auto" => Ok(Some(SocketAddr::new(listen.ip(), 0))),
        addr => {
            if tls {
                return Err(invalid(
                    "bulk_listen",
                    "the bulk channel has no TLS yet: with tls_cert set, bulk_listen must be auto or off",
                ));
            }
            addr.parse().map(Some).map_err(|e| {
                invalid(
                    "bulk_listen",
                    format!("bulk_listen {addr:?}: {e} (auto, off, or an address)"),
                )
            })
        }
    }
}

/// Cluster mode's settings from flags over the file; `None` without
/// `cluster`. Every cluster key without `cluster` is refused, so a typo'd
/// URL key does not silently start a single node.
fn cluster_settings(
    flags: &mut ServeFlags,
    file: &FileConfig,
    listen: SocketAddr,
    tenants: &crate::auth::Tenants,
    tls: Option<&crate::tls::TlsFiles>,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let url = flags.cluster.take().or(file.cluster.clone());
    let cluster_name = flags.cluster_name.take().or(file.cluster_name.clone());
    let node_id = flags.node_id.take().or(file.node_id.clone());
    let advertise = flags.advertise.take().or(file.advertise.clone());
    let Some(url) = url else {
        for (key, given) in [
            ("cluster_name", cluster_name.is_some()),
            ("node_id", node_id.is_some()),
            ("advertise", advertise.is_some()),
            ("cluster_lease_ttl_s", file.cluster_lease_ttl_s.is_some()),
            (
                "cluster_request_timeout_s",
                file.cluster_request_timeout_s.is_some(),
            ),
            (
                "cluster_sweep_interval_s",
                file.cluster_sweep_interval_s.is_some(),
            ),
            ("cluster_token_file", file.cluster_token_file.is_some()),
            (
                "cluster_rebuild_after_s",
                file.cluster_rebuild_after_s.is_some(),
            ),
            ("cluster_rebalance", file.cluster_rebalance.is_some()),
            ("cluster_ca", file.cluster_ca.is_some()),
        ] {
            if given {
                return Err(invalid(
                    key,
                    format!("{key} is for cluster mode: give --cluster etcd://HOST:PORT too"),
                ));
            }
        }
        return Ok(None);
    };
    crate::cluster::etcd::parse_etcd_url(&url).map_err(|e| invalid("cluster", e.to_string()))?;
    let cluster_name = cluster_name.unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_owned());
    crate::cluster::records::check_name("cluster name", &cluster_name)
        .map_err(|e| invalid("cluster_name", e.to_string()))?;
    let node_id = node_id.ok_or_else(|| {
        invalid(
            "node_id",
            "--cluster needs --node-id: this node's id in the cluster",
        )
    })?;
    crate::cluster::records::check_name("node id", &node_id)
        .map_err(|e| invalid("node_id", e.to_string()))?;
    if let Some(a) = &advertise {
        if !crate::cluster::records::is_host_port(a) {
            return Err(invalid(
                "advertise",
                format!("advertise {a:?} must be HOST:PORT"),
            ));
        }
    } else if listen.ip().is_unspecified() {
        return Err(invalid(
            "advertise",
            format!(
                "listen is {listen}: give --advertise HOST:PORT, the address other nodes and clients reach this node at"
            ),
        ));
    }
    let lease_ttl_s = file
        .cluster_lease_ttl_s
        .unwrap_or(DEFAULT_CLUSTER_LEASE_TTL_S);
    if !(2..=300).contains(&lease_ttl_s) {
        return Err(invalid(
            "cluster_lease_ttl_s",
            "cluster_lease_ttl_s must be 2 to 300 seconds",
        ));
    }
    let request_timeout_s = file
        .cluster_request_timeout_s
        .unwrap_or(DEFAULT_CLUSTER_REQUEST_TIMEOUT_S);
    if !(1..=60).contains(&request_timeout_s) {
        return Err(invalid(
            "cluster_request_timeout_s",
            "cluster_request_timeout_s must be 1 to 60 seconds",
        ));
    }
    let sweep_interval_s = file
        .cluster_sweep_interval_s
        .unwrap_or(DEFAULT_CLUSTER_SWEEP_INTERVAL_S);
    if !(1..=3600).contains(&sweep_interval_s) {
        return Err(invalid(
            "cluster_sweep_interval_s",
            "cluster_sweep_interval_s must be 1 to 3600 seconds",
        ));
    }
    let rebuild_after_s = file
        .cluster_rebuild_after_s
        .unwrap_or(DEFAULT_CLUSTER_REBUILD_AFTER_S);
    if rebuild_after_s != 0 && rebuild_after_s < lease_ttl_s {
        return Err(invalid(
            "cluster_rebuild_after_s",
            format!(
                "cluster_rebuild_after_s {rebuild_after_s} is shorter than cluster_lease_ttl_s {lease_ttl_s}: a node would be rebuilt before it could be seen back (0 turns the rebuild off)"
            ),
        ));
    }
    let peer_token = peer_token(file, tenants)?;
    let peer_ca = match (&file.cluster_ca, tls) {
        (Some(ca), Some(_)) => Some(ca.clone()),
        (None, Some(_)) => {
            return Err(invalid(
                "cluster_ca",
                "with TLS, nodes call each other over TLS: set cluster_ca to the CA certificate (PEM) that signed every node's certificate",
            ));
        }
        (Some(_), None) => {
            return Err(invalid(
                "cluster_ca",
                "cluster_ca is for nodes serving TLS: set tls_cert and tls_key too",
            ));
        }
        (None, None) => None,
    };
    Ok(Some(ClusterSettings {
        rebuild_after_s,
        rebalance: file.cluster_rebalance.unwrap_or(true),
        peer_token,
        token_file: file.cluster_token_file.clone(),
        peer_ca,
        sweep_interval_s,
        url,
        cluster_name,
        node_id,
        advertise,
        lease_ttl_s,
        request_timeout_s,
    }))
}

/// The token of `cluster_token_file`: required with tenants (nodes call
/// each other as a tenant like any client), and it must be a tenant's
/// with write on the unit datasets (`cluster.`), which is checked here
/// rather than found out at the first ingest.
fn peer_token(
    file: &FileConfig,
    tenants: &crate::auth::Tenants,
) -> Result<Option<PeerToken>, ConfigError> {
    let Some(path) = &file.cluster_token_file else {
        if tenants.enabled() {
            return Err(invalid(
                "cluster_token_file",
                "with tenants, nodes call each other with a token: set cluster_token_file to a file holding the token of a tenant with write = [\"cluster.\"]",
            ));
        }
        return Ok(None);
    };
    if !tenants.enabled() {
        return Err(invalid(
            "cluster_token_file",
            "cluster_token_file is for clusters with tenants: add [[tenant]] tables (one for the nodes)",
        ));
    }
    let token = std::fs::read_to_string(path)
        .map_err(|e| {
            invalid(
                "cluster_token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?
        .trim()
        .to_owned();
    let bearer = format!("Bearer {token}");
    let principal = tenants
        .authenticate(crate::auth::Presented {
            authorization: Some(&bearer),
            unix_uid: None,
            unix_gid: None,
            cert_names: &[],
        })
        .map_err(|e| {
            invalid(
                "cluster_token_file",
                format!(
                    "the token in {} is no tenant's ({e}): make one with `storagectl token new --tenant NAME` and add its hash to that tenant on every node",
                    path.display()
                ),
            )
        })?;
    let unit = format!("{}0000000000000000", storaged_proto::cluster::UNIT_PREFIX);
    if !principal.allows(crate::auth::Right::Write, &unit) {
        return Err(invalid(
            "cluster_token_file",
            format!(
                "the token in {} is tenant {:?}'s, which may not write the unit datasets: give it write = [\"{}\"]",
                path.display(),
                principal.name(),
                storaged_proto::cluster::UNIT_PREFIX
            ),
        ));
    }
    Ok(Some(PeerToken(token)))
}

mod devices;
pub use devices::expand_devices;
mod resolve;
use resolve::{parse_mode, server_limits, size_field, store_config, tls_files};

#[cfg(test)]
mod tests;
