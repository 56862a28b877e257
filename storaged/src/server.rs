//! The gRPC server: every HTTP/2 limit set explicitly, the storaged service,
//! `grpc.health.v1.Health` and server reflection, and a bounded graceful
//! shutdown (hyper's graceful shutdown has been seen to hang, so draining
//! has a deadline).
//!
//! The same router serves two listeners: TCP, and a Unix socket for
//! same-host clients. Only calls that arrive on the Unix socket carry the
//! peer's credentials (`SO_PEERCRED`), which memory regions require.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use storaged_proto::pb::storaged_server::StoragedServer;
use tonic::transport::Server;

use crate::config::ServerLimits;
use crate::conn::{Admission, ConnLimits, TrackCallsLayer, fit_to_fd_limit};
use crate::deadline::DeadlineLayer;
use crate::region::{RegionLimits, Regions};
use crate::service::{Access, StoragedService};
use crate::store::Store;
use crate::wire::{WireLimits, ZeroCopyReads};

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}{}", bind_hint(source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on Unix socket {path}: {reason}")]
    BindUnix { path: PathBuf, reason: String },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// What to do about a failed bind, where there is an obvious fix.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process has this port: stop it, or pick another with --listen)"
        }
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    }
}

/// Where to listen.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub tcp: SocketAddr,
    /// The TCP bulk channel (`service/bulk.rs`); `None`: not served.
    pub bulk_tcp: Option<SocketAddr>,
    pub unix: PathBuf,
    /// Who may connect to the Unix socket (and so register memory
    /// regions): the socket file's mode and group after binding.
    pub unix_access: UnixAccess,
}

/// Owner, group and mode of the Unix socket file. Connecting needs write
/// permission on it, so the mode decides which local users get the
/// same-host (zero-copy) path; the others use TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAccess {
    /// Permission bits, e.g. 0o660 (owner and group) or 0o666 (every local
    /// user: no more than TCP on loopback already allows).
    pub mode: u32,
    /// Group owning the socket (name or numeric id); `None`: storaged's.
    pub group: Option<String>,
}

impl Default for UnixAccess {
    fn default() -> Self {
        Self {
            mode: 0o660,
            group: None,
        }
    }
}

/// Numeric id of group `name` (a name, or digits).
fn group_id(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("group {name:?} contains NUL"))?;
    // SAFETY: `c` is NUL-terminated and outlives the call; getgrnam returns
    // a pointer to static storage (or NULL) that is read at once, before
    // any other call could reuse it (storaged resolves groups only here, at
    // start).
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    if entry.is_null() {
        return Err(format!("unix_group {name:?}: no such group"));
    }
    // SAFETY: non-NULL: a valid `group` record, see above.
    Ok(unsafe { (*entry).gr_gid })
}

/// Sets the socket file's group and mode.
fn apply_unix_access(path: &Path, access: &UnixAccess) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(group) = &access.group {
        let gid = group_id(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("setting group {group:?}: {e}"))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
        .map_err(|e| format!("setting mode {:o}: {e}", access.mode))
}

/// Binds the TCP listener (writes nothing anywhere).
pub async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// The bound listeners. Bound before storaged opens (and perhaps formats)
/// its devices, so a port in use fails before anything is written.
#[derive(Debug)]
pub struct Listeners {
    tcp: tokio::net::TcpListener,
    unix: tokio::net::UnixListener,
    unix_path: PathBuf,
    /// The bulk channel's socket (`service/bulk.rs`), beside the Unix
    /// socket: `<unix>.bulk`.
    bulk: tokio::net::UnixListener,
    bulk_path: PathBuf,
    /// The TCP bulk channel, for remote clients.
    bulk_tcp: Option<tokio::net::TcpListener>,
    /// The Prometheus endpoint, if metrics are served.
    metrics: Option<(
        tokio::net::TcpListener,
        metrics_exporter_prometheus::PrometheusHandle,
    )>,
}

impl Listeners {
    /// Binds TCP first (nothing on disk changes if the port is taken),
    /// then the Unix socket with its access applied.
    pub async fn bind(endpoints: &Endpoints) -> Result<Self, ServeError> {
        let tcp = bind_tcp(endpoints.tcp).await?;
        Self::with_tcp(tcp, endpoints)
    }

    /// Adds the Unix socket to a TCP listener bound with [`bind_tcp`] (the
    /// daemon locks its data dir in between).
    pub fn with_tcp(
        tcp: tokio::net::TcpListener,
        endpoints: &Endpoints,
    ) -> Result<Self, ServeError> {
        let bind = |path: &Path| {
            let listener = bind_unix(path)?;
            if let Err(reason) = apply_unix_access(path, &endpoints.unix_access) {
                let _ = std::fs::remove_file(path);
                return Err(ServeError::BindUnix {
                    path: path.to_path_buf(),
                    reason,
                });
            }
            Ok(listener)
        };
        // TCP first: nothing on disk changes if its port is taken.
        let bulk_tcp = endpoints
            .bulk_tcp
            .map(|addr| {
                std::net::TcpListener::bind(addr)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(l)
                    })
                    .map_err(|source| ServeError::Bind { addr, source })
            })
            .transpose()?;
        let unix = bind(&endpoints.unix)?;
        let bulk_path = bulk_socket_path(&endpoints.unix);
        let bulk = bind(&bulk_path).inspect_err(|_| {
            let _ = std::fs::remove_file(&endpoints.unix);
        })?;
        Ok(Self {
            tcp,
            unix,
            unix_path: endpoints.unix.clone(),
            bulk,
            bulk_path,
            bulk_tcp,
            metrics: None,
        })
    }

    /// Serves the metrics `handle` records on `listener` too (see
    /// `metrics::endpoint`).
    #[must_use]
    pub fn with_metrics(
        mut self,
        listener: tokio::net::TcpListener,
        handle: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Self {
        self.metrics = Some((listener, handle));
        self
    }

    /// The bound TCP address (the real port when 0 was asked for).
    pub fn tcp_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The bound TCP bulk channel's address, when it is served.
    pub fn bulk_tcp_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.bulk_tcp.as_ref().map(|l| l.local_addr()).transpose()
    }
}

/// What a server serves: the node's store and, in cluster mode, its
/// membership (which answers the cluster RPCs).
#[derive(Debug)]
pub struct Node {
    pub store: Arc<Store>,
    pub cluster: Option<Arc<crate::cluster::Member>>,
}

impl From<Arc<Store>> for Node {
    /// A single node, not in a cluster.
    fn from(store: Arc<Store>) -> Self {
        Node {
            store,
            cluster: None,
        }
    }
}

/// The bulk channel's socket beside the Unix socket at `unix`.
pub fn bulk_socket_path(unix: &Path) -> PathBuf {
    let mut path = unix.as_os_str().to_owned();
    path.push(".bulk");
    path.into()
}

/// Longest Unix socket path (`sun_path` minus its terminating NUL).
const UNIX_PATH_BYTES_MAX: usize = 107;

/// Binds the Unix socket, replacing a stale socket file but never a live
/// server's or a file that is not a socket.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let fail = |reason: String| ServeError::BindUnix {
        path: path.to_owned(),
        reason,
    };
    if path.as_os_str().len() > UNIX_PATH_BYTES_MAX {
        return Err(fail(format!(
            "the path is {} bytes; Unix sockets allow {UNIX_PATH_BYTES_MAX} (use --unix with a shorter path)",
            path.as_os_str().len()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail("another server is listening there".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => return Err(fail("a file that is not a socket is in the way".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating its directory: {e}")))?;
    }
    tokio::net::UnixListener::bind(path).map_err(|e| fail(e.to_string()))
}

/// Serves the Prometheus endpoint on `listener`, each scrape taking the
/// service's status snapshot; returns where it listens.
fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    storaged: &StoragedService,
) -> Result<SocketAddr, ServeError> {
    let status = storaged.clone();
    let snapshot = Arc::new(move || status.status());
    Ok(crate::metrics::endpoint::serve(listener, handle, snapshot)?)
}

/// The storaged service as served: tonic's generated router with the
/// message size limits, and Read and ReadBatch taken off it for the
/// zero-copy framing (`wire`).
fn storaged_routes(
    storaged: StoragedService,
    limits: &ServerLimits,
) -> ZeroCopyReads<StoragedServer<StoragedService>> {
    let generated = StoragedServer::new(storaged.clone())
        .max_decoding_message_size(limits.max_decoding_message_bytes)
        .max_encoding_message_size(limits.max_encoding_message_bytes);
    ZeroCopyReads::new(
        generated,
        storaged,
        WireLimits {
            max_decoding_message_bytes: limits.max_decoding_message_bytes,
            max_encoding_message_bytes: limits.max_encoding_message_bytes,
        },
    )
}

/// The admission limits of connections, from the server's limits (no more
/// connections than the process may open files).
fn conn_limits(limits: &ServerLimits) -> ConnLimits {
    ConnLimits {
        connections_max: fit_to_fd_limit(limits.connections_max),
        connections_per_peer_max: limits.connections_per_peer_max,
        preface_timeout: Duration::from_secs(limits.preface_timeout_s),
        idle_timeout: Duration::from_secs(limits.connection_idle_timeout_s),
        inflight_bytes_max: usize::try_from(limits.connection_inflight_bytes_max)
            .unwrap_or(usize::MAX),
    }
}

/// Runs `server` until it ends or `shutdown` resolves; then `stop` (health
/// NOT_SERVING, listeners told to stop) and at most `grace_s` seconds of
/// draining before the remaining streams are closed.
async fn until_shutdown(
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: impl std::future::Future<Output = ()>,
    stop: impl std::future::Future<Output = ()>,
    grace_s: u64,
) -> Result<(), ServeError> {
    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(ServeError::from),
        () = shutdown => {
            tracing::info!("shutting down");
            stop.await;
            match tokio::time::timeout(Duration::from_secs(grace_s), server).await {
                Ok(r) => r.map_err(ServeError::from),
                Err(_) => {
                    tracing::warn!(grace_s, "drain deadline passed; closing remaining streams");
                    Ok(())
                }
            }
        }
    }
}

/// gRPC server reflection (v1 and v1alpha) over storaged's and the health
/// service's descriptors, so grpcurl and friends need no .proto files.
#[allow(clippy::type_complexity)]
fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(storaged_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((reflection().build_v1()?, reflection().build_v1alpha()?))
}

/// Serves until `shutdown` resolves, then drains for at most
/// `limits.shutdown_grace_s`. `on_bound` gets the bound TCP address
/// (useful with port 0).
pub async fn serve(
    node: impl Into<Node>,
    listeners: Listeners,
    region_limits: RegionLimits,
    access: Access,
    limits: &ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let Node { store, cluster } = node.into();
    let Listeners {
        tcp: listener,
        unix: unix_listener,
        unix_path,
        bulk: bulk_listener,
        bulk_path,
        bulk_tcp,
        metrics,
    } = listeners;
    let bound = listener.local_addr()?;
    let admission = Admission::new(conn_limits(limits));
    let incoming = admission.tcp(listener);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<StoragedServer<StoragedService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection_services()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tls = access.tls.clone();
    let storaged = StoragedService::new(
        store,
        Regions::new(region_limits),
        stop_rx.clone(),
        Some(&unix_path),
        access,
        limits,
    )
    .with_admission(Arc::clone(&admission))
    .with_bulk_socket(&bulk_path)
    .with_cluster(cluster);
    let storaged = match &bulk_tcp {
        Some(l) => storaged.with_bulk_tcp(l.local_addr()?.port(), limits),
        None => storaged,
    };
    // Registered for reading only: the bulk channel's replies are small
    // and taken at once, and EPOLLOUT after each would wake the reactor
    // for nothing.
    let bulk_conns = futures::StreamExt::map(admission.unix(bulk_listener), |conn| {
        conn.and_then(|c| c.map_io(crate::conn::read_interest::ReadInterestStream::new))
    });
    let bulk_unix = storaged.clone().serve_bulk(bulk_conns);
    let bulk_tcp = bulk_tcp.map(|l| storaged.clone().serve_bulk(admission.tcp(l)));
    let bulk = async move {
        match bulk_tcp {
            Some(tcp) => drop(tokio::join!(bulk_unix, tcp)),
            None => bulk_unix.await,
        }
    };
    let metrics_bound = match metrics {
        Some((listener, handle)) => Some(serve_metrics(listener, handle, &storaged)?),
        None => None,
    };
    let rpc_metrics = crate::metrics::rpc::RpcMetricsLayer::new(&[
        storaged_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]);
    let service = storaged_routes(storaged, limits);

    let builder = || {
        Server::builder()
            .layer(rpc_metrics.clone())
            .layer(TrackCallsLayer)
            .layer(DeadlineLayer)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
            .max_frame_size(limits.max_frame_bytes)
            .initial_stream_window_size(limits.initial_stream_window_bytes)
            .initial_connection_window_size(limits.initial_connection_window_bytes)
            .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_s)))
            .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_s)))
    };
    // TLS on TCP only: the Unix socket's peers are known by uid.
    let mut tcp_builder = match tls {
        Some(config) => builder().tls_config(config)?,
        None => builder(),
    };
    let tcp_router = tcp_builder
        .add_service(health_service.clone())
        .add_service(reflection_v1.clone())
        .add_service(reflection_v1alpha.clone())
        .add_service(service.clone());
    let router = builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let tcp = tcp_router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    let unix = router.serve_with_incoming_shutdown(admission.unix(unix_listener), stopped(stop_rx));
    let server = async move {
        let (a, b, ()) = tokio::join!(tcp, unix, bulk);
        a.and(b)
    };
    on_bound(bound);
    if let Some(m) = metrics_bound {
        // After the gRPC line, which launchers read first.
        println!("storaged metrics on http://{m}/metrics");
    }
    tracing::info!(%bound, unix = %unix_path.display(), "serving gRPC");
    let result = until_shutdown(
        server,
        shutdown,
        async move {
            health_reporter
                .set_not_serving::<StoragedServer<StoragedService>>()
                .await;
            let _ = stop_tx.send(true);
        },
        limits.shutdown_grace_s,
    )
    .await;
    let _ = std::fs::remove_file(&unix_path);
    let _ = std::fs::remove_file(&bulk_path);
    result?;
    Ok(())
}
