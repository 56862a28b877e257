//! Rust client for storaged.
//!
//! ```no_run
//! # async fn demo() -> Result<(), storaged_client::ClientError> {
//! let client = storaged_client::Client::connect("http://127.0.0.1:7400").await?;
//! let ds = client.dataset("imagenet-mini")?;
//! let bytes = ds.read("train/n01440764/img_001.JPEG").await?;
//! # Ok(()) }
//! ```
//!
//! The channel is tuned for bulk transfer (16 MiB HTTP/2 frames and large
//! flow-control windows; the client's frame size caps what the server may
//! send). Calls that fail with `UNAVAILABLE` are retried with exponential
//! backoff, a bounded number of times; a range read that breaks mid-stream
//! resumes from the last byte received. A stream that ends before the length
//! the server announced is an error, never a short result.

pub mod admin;
mod bulk;
mod bulk_tcp;
pub mod cluster;
mod ingest;
pub mod loader;
pub mod plan;
pub mod region;
pub mod retry;
mod transport;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use storaged_proto::pb::storaged_client::StoragedClient;
use storaged_proto::pb::{self};
use storaged_proto::{DatasetName, NameError, ObjectPath, http2};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use bulk_tcp::BulkTcpStats;
pub use ingest::{IngestOptions, IngestProgress, Ingested};
pub use loader::{
    Batch, LOADER_HINT_BYTES_MAX, Loader, LoaderOptions, LoaderStats, Plan, ReadPath, Sample,
    SizedRange,
};
pub use plan::{PlanError, PlanSpec, PlanState, PlanTail};
pub use region::{BlockingReader, Region, RegionBatch, RegionRead};
pub use retry::RetryPolicy;
pub use storaged_proto::pb::{DatasetInfo, ObjectInfo, StatResponse, StatusResponse};
pub use transport::Transport;

/// Largest message the client accepts or sends.
pub const MESSAGE_BYTES_MAX: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The reason is the transport's cause chain, each cause once, with
    /// what to check (not a `source`: chains would print it twice).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The URL cannot be used as given (unknown or unsupported scheme).
    #[error("{url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{}", status_text(.0))]
    Status(Status),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error(
        "short read of {path:?}: the server announced {expected} bytes but the stream ended after {got}"
    )]
    ShortRead {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("plan: {0}")]
    Plan(#[from] PlanError),
    /// A path the client was told to take is not there (see
    /// [`Client::connect_transport`]).
    #[error("transport {transport}: {reason}")]
    TransportUnavailable {
        transport: &'static str,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

// Not `#[from]`: that would make the status a `source`, and error chains
// would print its message twice.
/// `CODE: message`, and the transport's causes when the status came from
/// the client side (a TLS alert says why a handshake failed; "transport
/// error" alone does not).
fn status_text(s: &Status) -> String {
    let mut text = format!("{}: {}", code_name(s.code()), s.message());
    if let Some(source) = std::error::Error::source(s) {
        let chain = error_chain(source);
        if chain.starts_with(s.message()) {
            return format!("{}: {chain}", code_name(s.code()));
        }
        if !text.contains(&chain) {
            text.push_str(": ");
            text.push_str(&chain);
        }
    }
    text
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Status(s)
    }
}

impl ClientError {
    /// The gRPC code, where the error came from the server.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Upper-case gRPC code name, as users see it in other gRPC tools.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs `f` again while it fails transiently, within the policy (see
/// `retry`).
async fn with_retry<T, F, Fut>(policy: RetryPolicy, f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    retry::Retrying::new(policy).run(f).await
}

/// The generated gRPC client with this client's credentials on every
/// call: what [`Client::raw`] returns.
pub type Rpc = StoragedClient<InterceptedService<Channel, Credentials>>;

/// Adds `authorization: Bearer <token>` to every call, when there is a
/// token.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Deadline of every call that sets none of its own (`grpc-timeout`).
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Credentials")
            .field("token", &self.bearer.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.bearer {
            request
                .metadata_mut()
                .insert(storaged_proto::auth::AUTHORIZATION_METADATA_KEY, v.clone());
        }
        if let Some(t) = self.timeout
            && !request.metadata().contains_key("grpc-timeout")
        {
            request.set_timeout(t);
        }
        Ok(request)
    }
}

/// How to connect: credentials, and a deadline for each call.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Bearer token (`storagectl token new`); sent with every call.
    pub token: Option<String>,
    /// Deadline of each call (sent as `grpc-timeout`; storaged ends the
    /// call, streams included, when it passes). `None`: no deadline.
    pub call_timeout: Option<Duration>,
    /// For `https://`: the CA that signed storaged's certificate (PEM;
    /// required), and this client's certificate and key (PEM) when
    /// storaged asks for one (`tls_client_ca`).
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Send `ReadInto` over gRPC even where storaged offers its bulk
    /// channel (the faster same-host path); for comparing the two.
    pub read_into_over_grpc: bool,
    /// Whether reads from a storaged on another host take its TCP bulk
    /// channel (see [`BulkTcp`]).
    pub bulk_tcp: BulkTcp,
    /// TCP bulk channel connections this client opens at once at most
    /// (nconnect): each carries one request at a time, and one TCP stream
    /// may not fill a fast link. 0: the default (16).
    pub bulk_tcp_connections: usize,
    /// Where to reach the TCP bulk channel (`host:port`) when the port
    /// storaged advertises is not reachable as such from here (a port
    /// mapping, a NAT, a proxy). `None`: the --server host, Status's port.
    pub bulk_tcp_addr: Option<String>,
}

/// Whether a remote client reads over storaged's TCP bulk channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BulkTcp {
    /// When storaged offers it (Status says its port).
    #[default]
    Auto,
    /// Never: reads go over gRPC.
    Off,
    /// Always: reads that would take it fail (FAILED_PRECONDITION) where
    /// storaged does not offer it.
    Required,
}

/// What a client knows of its storaged's TCP bulk channel.
#[derive(Debug, Default)]
enum BulkTcpKnown {
    /// Not asked yet, or forgotten (its port stopped answering: storaged
    /// restarted, perhaps on another port).
    #[default]
    Unknown,
    /// Not offered.
    Absent,
    Offered(std::sync::Arc<bulk_tcp::TcpBulkPool>),
}

/// How long an unreachable TCP bulk channel address is left alone (reads
/// go over gRPC meanwhile, unless the channel is required).
const BULK_TCP_UNREACHABLE_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// TCP bulk channel connections per client unless told otherwise.
const BULK_TCP_CONNECTIONS_DEFAULT: usize = 16;

/// Environment variables [`ConnectOptions::from_env`] reads for TLS.
pub const TLS_CA_ENV: &str = "STORAGED_CA";
pub const TLS_CERT_ENV: &str = "STORAGED_CERT";
pub const TLS_KEY_ENV: &str = "STORAGED_KEY";

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("call_timeout", &self.call_timeout)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("read_into_over_grpc", &self.read_into_over_grpc)
            .field("bulk_tcp", &self.bulk_tcp)
            .field("bulk_tcp_connections", &self.bulk_tcp_connections)
            .field("bulk_tcp_addr", &self.bulk_tcp_addr)
            .finish()
    }
}

impl ConnectOptions {
    /// From the environment: the token in `STORAGED_TOKEN`, and the TLS
    /// files in `STORAGED_CA`, `STORAGED_CERT`, `STORAGED_KEY` (each if set
    /// and not empty).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            token: var(storaged_proto::auth::TOKEN_ENV),
            call_timeout: None,
            tls_ca: var(TLS_CA_ENV).map(Into::into),
            tls_cert: var(TLS_CERT_ENV).map(Into::into),
            tls_key: var(TLS_KEY_ENV).map(Into::into),
            read_into_over_grpc: false,
            bulk_tcp: BulkTcp::Auto,
            bulk_tcp_connections: 0,
            bulk_tcp_addr: None,
        }
    }

    /// The TLS configuration of an `https://` connection to `url`.
    fn tls_config(&self, url: &str) -> Result<tonic::transport::ClientTlsConfig, ClientError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| ClientError::BadUrl {
                url: url.to_owned(),
                reason: format!("cannot read the {what} {}: {e}", path.display()),
            })
        };
        let Some(ca) = &self.tls_ca else {
            return Err(ClientError::BadUrl {
                url: url.to_owned(),
                reason: format!(
                    "https:// needs the CA certificate that signed storaged's (--ca, or {TLS_CA_ENV})"
                ),
            });
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", ca)?));
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::BadUrl {
                    url: url.to_owned(),
                    reason: format!(
                        "a client certificate needs both the certificate and its key (--cert and --key, or {TLS_CERT_ENV} and {TLS_KEY_ENV})"
                    ),
                });
            }
        }
        Ok(config)
    }

    fn credentials(&self) -> Result<Credentials, ClientError> {
        let bearer = match &self.token {
            None => None,
            Some(t) => Some(storaged_proto::auth::bearer(t).parse().map_err(|_| {
                ClientError::InvalidArgument(
                    "the token holds characters that cannot travel in gRPC metadata".into(),
                )
            })?),
        };
        Ok(Credentials {
            bearer,
            timeout: self.call_timeout,
        })
    }
}

/// A new random bearer token: `sdt_` and 64 hex digits (256 bits).
pub fn new_token() -> Result<String, ClientError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| ClientError::Io {
        path: "getrandom".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(format!(
        "{}{}",
        storaged_proto::auth::TOKEN_PREFIX,
        storaged_proto::auth::hex(&b)
    ))
}

/// A connection to one storaged. Cheap to clone; clones share the channel.
#[derive(Debug, Clone)]
pub struct Client {
    rpc: Rpc,
    options: ConnectOptions,
    retry: RetryPolicy,
    /// Connected over storaged's Unix socket: same host, so memory regions
    /// (the zero-copy path) are available.
    local: bool,
    /// Why `connect_auto` stayed on TCP (for the errors of calls that need
    /// the Unix socket).
    not_local_because: Option<std::sync::Arc<str>>,
    /// Idle regions, shared by clones, reused by loaders.
    regions: std::sync::Arc<region::RegionCache>,
    /// The bulk channel, once asked for (`None` inside: not offered, or
    /// not on this host).
    bulk: std::sync::Arc<tokio::sync::OnceCell<Option<std::sync::Arc<bulk::BulkPool>>>>,
    /// The host of a TCP connection's URL (where the TCP bulk channel is).
    tcp_host: Option<std::sync::Arc<str>>,
    /// The TCP bulk channel as last learnt from Status.
    bulk_tcp: std::sync::Arc<std::sync::Mutex<BulkTcpKnown>>,
    /// The channel's address that last did not answer, and when: not tried
    /// again for `BULK_TCP_UNREACHABLE_BACKOFF` (a firewall that drops the
    /// port would cost every read a connect timeout).
    bulk_tcp_unreachable: std::sync::Arc<std::sync::Mutex<Option<(String, std::time::Instant)>>>,
    bulk_tcp_counters: std::sync::Arc<bulk_tcp::BulkTcpCounters>,
    /// The read path this client was told to take
    /// ([`Client::connect_transport`]; `Auto` otherwise).
    transport: Transport,
    /// Asked for over TLS (`https://`), even if it then moved to the Unix
    /// socket: clients it makes for other servers use TLS too.
    tls: bool,
}

impl Client {
    /// Connects to `url`: `http://127.0.0.1:7400` (TCP), or
    /// `unix:///path/to/storaged.sock` for a server on this host, which
    /// also enables memory regions ([`Client::register_region`]).
    /// Credentials come from the environment ([`ConnectOptions::from_env`]).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &ConnectOptions::from_env()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        check_url(url)?;
        let credentials = options.credentials()?;
        let connect_err = |source: tonic::transport::Error| ClientError::Connect {
            url: url.to_owned(),
            reason: format!(
                "{} (is storaged running at {url}? start it with `storaged serve`)",
                error_chain(&source)
            ),
        };
        let unix_path = url.strip_prefix("unix://").map(std::path::PathBuf::from);
        // A Unix socket still needs an HTTP authority; it is not used.
        let http_url = if unix_path.is_some() {
            "http://storaged.local".to_owned()
        } else {
            url.to_owned()
        };
        let endpoint = Endpoint::from_shared(http_url)
            .map_err(connect_err)?
            .connect_timeout(http2::CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .max_frame_size(http2::MAX_FRAME_BYTES)
            .initial_stream_window_size(http2::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(http2::CONNECTION_WINDOW_BYTES)
            .http2_keep_alive_interval(http2::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(http2::KEEPALIVE_TIMEOUT);
        let endpoint = if url.starts_with("https://") {
            endpoint
                .tls_config(options.tls_config(url)?)
                .map_err(connect_err)?
        } else {
            endpoint
        };
        let channel = match &unix_path {
            None => endpoint.connect().await.map_err(connect_err)?,
            Some(path) => {
                let path = path.clone();
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
                    .map_err(connect_err)?
            }
        };
        let rpc = StoragedClient::with_interceptor(channel, credentials)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        Ok(Self {
            rpc,
            options: options.clone(),
            retry: RetryPolicy::default(),
            local: unix_path.is_some(),
            not_local_because: None,
            regions: region::RegionCache::new(),
            bulk: std::sync::Arc::default(),
            tcp_host: url_host(url).map(Into::into),
            bulk_tcp: std::sync::Arc::default(),
            bulk_tcp_unreachable: std::sync::Arc::default(),
            bulk_tcp_counters: std::sync::Arc::default(),
            transport: Transport::Auto,
            tls: url.starts_with("https://"),
        })
    }

    /// Like [`connect`](Self::connect), and auto-detects a same-host
    /// server: when `url` is TCP on a loopback address and the server
    /// advertises a Unix socket (`Status.connections().unix_socket_path`) that this
    /// process can connect to, and the server there has the same pool id,
    /// the client uses that socket instead, so loaders take the zero-copy
    /// path. In every other case (remote host, no socket, no permission,
    /// another server behind it) it is the TCP connection as given.
    pub async fn connect_auto(url: &str) -> Result<Self, ClientError> {
        Self::connect_auto_with(url, &ConnectOptions::from_env()).await
    }

    /// [`connect_auto`](Self::connect_auto) with explicit options.
    pub async fn connect_auto_with(
        url: &str,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let tcp = Self::connect_with(url, options).await?;
        if tcp.is_local() {
            return Ok(tcp);
        }
        // Why the Unix socket was not taken, for errors that need it.
        let tcp_because = |why: String| Self {
            not_local_because: Some(std::sync::Arc::from(why)),
            ..tcp.clone()
        };
        if !is_loopback_url(url) {
            return Ok(tcp_because(format!("{url} is not a loopback address")));
        }
        let advertised = match tcp.status().await {
            Ok(s) => s,
            Err(e) => return Ok(tcp_because(format!("Status failed: {e}"))),
        };
        if advertised.connections().unix_socket_path.is_empty() {
            return Ok(tcp_because(
                "the server advertises no Unix socket".to_owned(),
            ));
        }
        let socket = &advertised.connections().unix_socket_path;
        // Checked first for a clear message: connecting needs write
        // permission on the socket file (storaged's `unix_mode` and
        // `unix_group` say who has it).
        if let Err(e) = unix_socket_writable(socket) {
            return Ok(tcp_because(format!(
                "this process may not use storaged's Unix socket {socket}: {e} (the server's unix_mode / unix_group decide who may)"
            )));
        }
        let unix_url = format!("unix://{socket}");
        let local = match Self::connect_with(&unix_url, options).await {
            Ok(local) => local,
            Err(e) => {
                return Ok(tcp_because(format!(
                    "cannot connect to storaged's Unix socket {socket}: {e}"
                )));
            }
        };
        match local.status().await {
            Ok(s) if s.pool_id == advertised.pool_id => Ok(Self {
                tls: tcp.tls,
                ..local
            }),
            Ok(_) => Ok(tcp_because(format!(
                "the server behind {socket} has another pool"
            ))),
            Err(e) => Ok(tcp_because(format!("Status over {socket} failed: {e}"))),
        }
    }

    /// Why this TCP connection is not on the server's Unix socket, when
    /// [`connect_auto`](Self::connect_auto) tried; shown by calls that need
    /// a same-host connection.
    pub fn not_local_because(&self) -> Option<&str> {
        self.not_local_because.as_deref()
    }

    /// Whether this connection is to a server on this host (Unix socket).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// Whether this client was asked for over TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The read path this client was told to take (`Auto` unless made by
    /// [`Client::connect_transport`]); clients it makes for other servers
    /// (a cluster's nodes) follow it.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The policy this client's calls are tried again under.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// A handle on dataset `name` (validated here; existence is checked by
    /// the calls).
    pub fn dataset(&self, name: &str) -> Result<Dataset, ClientError> {
        Ok(Dataset {
            client: self.clone(),
            name: DatasetName::new(name)?,
            id: None,
        })
    }

    /// A handle on the dataset `name` whose id is `id`
    /// (`DatasetInfo::dataset_id`): its reads fail with NOT_FOUND once the
    /// name belongs to another dataset (removed and created again), and
    /// never return that one's bytes.
    pub fn dataset_pinned(&self, name: &str, id: u64) -> Result<Dataset, ClientError> {
        Ok(Dataset {
            id: Some(id),
            ..self.dataset(name)?
        })
    }

    pub async fn list_datasets(&self) -> Result<Vec<DatasetInfo>, ClientError> {
        let r = with_retry(self.retry, || {
            let mut rpc = self.rpc.clone();
            async move { rpc.list_datasets(pb::ListDatasetsRequest {}).await }
        })
        .await?;
        Ok(r.into_inner().datasets)
    }

    /// The bulk channel of this host's storaged, when it offers one and
    /// this client is on its Unix socket (asked once; a failed ask is
    /// asked again by the next call).
    pub(crate) async fn bulk(&self) -> Option<std::sync::Arc<bulk::BulkPool>> {
        if !self.local || self.options.read_into_over_grpc {
            return None;
        }
        let pool = self
            .bulk
            .get_or_try_init(|| async {
                // Not retried: a caller that waits out a restart asks again.
                let status = self.rpc.clone().status(pb::StatusRequest {}).await?;
                let path = status
                    .into_inner()
                    .connections
                    .map(|c| c.bulk_socket_path)
                    .unwrap_or_default();
                Ok::<_, ClientError>((!path.is_empty()).then(|| {
                    let authorization = self
                        .options
                        .token
                        .as_deref()
                        .map(storaged_proto::auth::bearer);
                    std::sync::Arc::new(bulk::BulkPool::new(path.into(), authorization))
                }))
            })
            .await;
        pool.ok().cloned().flatten()
    }

    /// The TCP bulk channel of a storaged on another host, when it offers
    /// one and this client may use it (asked once; a failed ask is asked
    /// again by the next call).
    pub(crate) async fn bulk_tcp(&self) -> Option<std::sync::Arc<bulk_tcp::TcpBulkPool>> {
        if self.local || self.options.bulk_tcp == BulkTcp::Off {
            return None;
        }
        match &*self.bulk_tcp.lock().expect("poisoned") {
            BulkTcpKnown::Offered(pool) => return Some(std::sync::Arc::clone(pool)),
            BulkTcpKnown::Absent => return None,
            BulkTcpKnown::Unknown => {}
        }
        let host = self.tcp_host.clone()?;
        // Not retried: a caller that waits out a restart asks again.
        let status = self.rpc.clone().status(pb::StatusRequest {}).await.ok()?;
        let status = status.into_inner();
        let block = u64::from(status.checksum_block_bytes);
        let c = status.connections.unwrap_or_default();
        let known = if c.bulk_tcp_port == 0 || block == 0 {
            BulkTcpKnown::Absent
        } else {
            let authorization = self
                .options
                .token
                .as_deref()
                .map(storaged_proto::auth::bearer);
            let connections = match self.options.bulk_tcp_connections {
                0 => BULK_TCP_CONNECTIONS_DEFAULT,
                n => n,
            };
            let addr = match &self.options.bulk_tcp_addr {
                Some(addr) => addr.clone(),
                None => format!("{host}:{}", c.bulk_tcp_port),
            };
            let unreachable = self.bulk_tcp_unreachable.lock().expect("poisoned");
            if unreachable.as_ref().is_some_and(|(failed, at)| {
                *failed == addr && at.elapsed() < BULK_TCP_UNREACHABLE_BACKOFF
            }) {
                // Still the address that did not answer: gRPC for now,
                // asked again on a later call.
                return None;
            }
            drop(unreachable);
            BulkTcpKnown::Offered(std::sync::Arc::new(bulk_tcp::TcpBulkPool::new(
                addr,
                authorization,
                c.bulk_tcp_item_bytes_max,
                block,
                connections,
                std::sync::Arc::clone(&self.bulk_tcp_counters),
            )))
        };
        let pool = match &known {
            BulkTcpKnown::Offered(pool) => Some(std::sync::Arc::clone(pool)),
            _ => None,
        };
        *self.bulk_tcp.lock().expect("poisoned") = known;
        pool
    }

    /// Forgets `pool` (its address stopped answering), so that the next
    /// read asks Status again: a restarted storaged listens on a new port
    /// unless `bulk_listen` names one.
    pub(crate) fn forget_bulk_tcp(&self, pool: &std::sync::Arc<bulk_tcp::TcpBulkPool>) {
        let mut known = self.bulk_tcp.lock().expect("poisoned");
        if matches!(&*known, BulkTcpKnown::Offered(p) if std::sync::Arc::ptr_eq(p, pool)) {
            *known = BulkTcpKnown::Unknown;
        }
        *self.bulk_tcp_unreachable.lock().expect("poisoned") =
            Some((pool.addr.clone(), std::time::Instant::now()));
    }

    /// Whether reads of this client land in regions (its own memory named
    /// in the request): on the same host through shared memory, from
    /// another host over the TCP bulk channel. Otherwise they come as
    /// gRPC messages.
    pub async fn reads_into_regions(&self) -> bool {
        self.local || self.bulk_tcp().await.is_some()
    }

    /// What this client's TCP bulk channel has carried, and the damaged
    /// windows it caught (by where the damage was).
    pub fn bulk_tcp_stats(&self) -> BulkTcpStats {
        self.bulk_tcp_counters.snapshot()
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let r = with_retry(self.retry, || {
            let mut rpc = self.rpc.clone();
            async move { rpc.status(pb::StatusRequest {}).await }
        })
        .await?;
        Ok(r.into_inner())
    }

    /// The cluster the server belongs to, as its control plane says now.
    /// Not retried: UNAVAILABLE here usually means the control plane is
    /// out of reach, which a retry at once does not mend.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, ClientError> {
        let mut rpc = self.rpc.clone();
        let r = rpc.cluster_status(pb::ClusterStatusRequest {}).await?;
        Ok(r.into_inner())
    }

    /// Moves every share `node` holds to other nodes; see `DrainNode` in
    /// the proto. Not retried (calling it again resumes it).
    pub async fn drain_node(&self, node: &str) -> Result<pb::DrainNodeResponse, ClientError> {
        let mut rpc = self.rpc.clone();
        let r = rpc
            .drain_node(pb::DrainNodeRequest {
                node_id: node.to_owned(),
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Where cluster dataset `name`'s bytes live (see [`cluster`]).
    pub async fn get_cluster_dataset(&self, name: &str) -> Result<pb::ClusterDataset, ClientError> {
        let name = DatasetName::new(name)?;
        let r = with_retry(self.retry, || {
            let mut rpc = self.rpc.clone();
            let req = pb::GetClusterDatasetRequest {
                dataset: name.to_string(),
            };
            async move { rpc.get_cluster_dataset(req).await }
        })
        .await?;
        Ok(r.into_inner())
    }

    /// Deletes a dataset; returns the bytes freed.
    pub async fn delete_dataset(&self, name: &str) -> Result<u64, ClientError> {
        let name = DatasetName::new(name)?;
        let r = with_retry(self.retry, || {
            let mut rpc = self.rpc.clone();
            let dataset = name.to_string();
            async move {
                rpc.delete_dataset(pb::DeleteDatasetRequest { dataset })
                    .await
            }
        })
        .await?;
        Ok(r.into_inner().freed_bytes)
    }

    /// Uploads every regular file under `dir` as dataset `name`, calling
    /// `progress` as bytes are sent. Nothing is visible until the commit.
    pub async fn ingest_dir(
        &self,
        name: &str,
        dir: &std::path::Path,
        progress: impl FnMut(IngestProgress) + Send + 'static,
    ) -> Result<DatasetInfo, ClientError> {
        self.ingest_dir_as(name, dir, None, progress).await
    }

    /// [`ingest_dir`](Self::ingest_dir) with a storage class (`None`: the
    /// server's default, which the returned info names).
    pub async fn ingest_dir_as(
        &self,
        name: &str,
        dir: &std::path::Path,
        class: Option<storaged_proto::model::StorageClass>,
        progress: impl FnMut(IngestProgress) + Send + 'static,
    ) -> Result<DatasetInfo, ClientError> {
        let options = IngestOptions {
            class,
            ..IngestOptions::default()
        };
        Ok(self
            .ingest_dir_with(name, dir, options, progress)
            .await?
            .info)
    }

    /// [`ingest_dir`](Self::ingest_dir) with every option; says what was
    /// left out.
    pub async fn ingest_dir_with(
        &self,
        name: &str,
        dir: &std::path::Path,
        options: IngestOptions,
        progress: impl FnMut(IngestProgress) + Send + 'static,
    ) -> Result<Ingested, ClientError> {
        ingest::ingest_dir(
            self.rpc.clone(),
            DatasetName::new(name)?,
            dir,
            options,
            progress,
        )
        .await
    }

    /// The raw generated client, for calls this crate does not wrap.
    /// The options this client connected with (to connect again alike,
    /// e.g. from a worker process).
    pub fn connect_options(&self) -> &ConnectOptions {
        &self.options
    }

    pub fn raw(&self) -> Rpc {
        self.rpc.clone()
    }
}

/// One item of a [`Dataset::read_batch`] call.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub path: String,
    pub offset: u64,
    pub length: Option<u64>,
}

/// The result of one batch item: its bytes or its own error.
#[derive(Debug)]
pub struct BatchResult {
    pub index: u32,
    pub data: Result<Bytes, Status>,
}

/// A dataset on a server.
#[derive(Debug, Clone)]
pub struct Dataset {
    client: Client,
    name: DatasetName,
    /// The dataset's id, when the handle is pinned to it.
    id: Option<u64>,
}

impl Dataset {
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The connection this handle uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// One page of objects; returns the objects and the next page token.
    pub async fn list_page(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ObjectInfo>, Option<String>), ClientError> {
        let r = with_retry(self.client.retry, || {
            let mut rpc = self.client.rpc.clone();
            let req = pb::ListObjectsRequest {
                dataset: self.name.to_string(),
                prefix: prefix.to_owned(),
                page_size,
                page_token: page_token.to_owned(),
            };
            async move { rpc.list_objects(req).await }
        })
        .await?
        .into_inner();
        let next = (!r.next_page_token.is_empty()).then_some(r.next_page_token);
        Ok((r.objects, next))
    }

    /// Every object under `prefix`, following pages.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ClientError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (objs, next) = self.list_page(prefix, 0, &token).await?;
            out.extend(objs);
            match next {
                Some(t) => token = t,
                None => return Ok(out),
            }
        }
    }

    pub async fn stat(&self, path: &str) -> Result<StatResponse, ClientError> {
        let path = ObjectPath::new(path)?;
        let r = with_retry(self.client.retry, || {
            let mut rpc = self.client.rpc.clone();
            let req = pb::StatRequest {
                dataset: self.name.to_string(),
                path: path.to_string(),
                include_extents: true,
            };
            async move { rpc.stat(req).await }
        })
        .await?;
        Ok(r.into_inner())
    }

    /// Tells storaged that `paths` will be read soon, so it reads them
    /// ahead (see `Hint` in the proto). Advice only: objects it cannot take
    /// are simply not read ahead. Not retried; a lost hint costs nothing.
    pub async fn hint(&self, paths: &[String]) -> Result<pb::HintResponse, ClientError> {
        let mut rpc = self.client.rpc.clone();
        let r = rpc
            .hint(pb::HintRequest {
                dataset: self.name.to_string(),
                paths: paths.to_vec(),
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The whole object.
    pub async fn read(&self, path: &str) -> Result<Bytes, ClientError> {
        self.read_range_inner(path, 0, None).await
    }

    /// `length` bytes from `offset`. Asking past the end is OUT_OF_RANGE.
    pub async fn read_range(
        &self,
        path: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, ClientError> {
        self.read_range_inner(path, offset, Some(length)).await
    }

    async fn read_range_inner(
        &self,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<Bytes, ClientError> {
        let mut s = std::pin::pin!(self.read_stream(path, offset, length));
        let mut out: Option<BytesMut> = None;
        let mut single: Option<Bytes> = None;
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            // Avoid a copy for single-message objects.
            match (&mut out, single.take()) {
                (None, None) => single = Some(chunk),
                (None, Some(first)) => {
                    let mut b = BytesMut::with_capacity(first.len() + chunk.len());
                    b.extend_from_slice(&first);
                    b.extend_from_slice(&chunk);
                    out = Some(b);
                }
                (Some(b), _) => b.extend_from_slice(&chunk),
            }
        }
        Ok(match (out, single) {
            (Some(b), _) => b.freeze(),
            (None, Some(s)) => s,
            (None, None) => Bytes::new(),
        })
    }

    /// Streams a range in order. Resumes after UNAVAILABLE mid-stream; ends
    /// with [`ClientError::ShortRead`] if the server stops early.
    pub fn read_stream(
        &self,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static {
        let rpc = self.client.rpc.clone();
        let retry = self.client.retry;
        let dataset = self.name.to_string();
        let dataset_id = self.id;
        let path = path.to_owned();
        async_stream(move |tx| async move {
            if let Err(e) = ObjectPath::new(path.as_str()) {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            let mut received = 0u64;
            let mut expected: Option<u64> = None;
            let mut retrying = retry::Retrying::new(retry);
            loop {
                let req = pb::ReadRequest {
                    dataset: dataset.clone(),
                    path: path.clone(),
                    offset: offset + received,
                    length: match (expected, length) {
                        (Some(total), _) => Some(total - received),
                        (None, l) => l,
                    },
                    dataset_id,
                };
                let mut rpc = rpc.clone();
                let result: Result<(), Status> = async {
                    let mut stream = rpc.read(req).await?.into_inner();
                    while let Some(msg) = stream.message().await? {
                        let total = *expected.get_or_insert(received + msg.range_length);
                        if msg.offset != offset + received {
                            return Err(Status::internal(format!(
                                "chunk at offset {} where {} was expected",
                                msg.offset,
                                offset + received
                            )));
                        }
                        received += msg.data.len() as u64;
                        if received > total {
                            return Err(Status::internal("server sent more than announced"));
                        }
                        if tx.send(Ok(msg.data)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => {
                        let want = expected.unwrap_or(0);
                        if received < want {
                            let _ = tx
                                .send(Err(ClientError::ShortRead {
                                    path: path.clone(),
                                    expected: want,
                                    got: received,
                                }))
                                .await;
                        }
                        return;
                    }
                    Err(s) => {
                        // Resumed after the bytes already delivered.
                        if let Err(s) = retrying.again(s).await {
                            let _ = tx.send(Err(s.into())).await;
                            return;
                        }
                    }
                }
            }
        })
    }

    /// Reads many ranges in one call. Results come in request order, one
    /// per item; an item's error does not stop the others.
    pub fn read_batch(
        &self,
        items: Vec<BatchItem>,
        max_in_flight: u32,
    ) -> impl Stream<Item = Result<BatchResult, ClientError>> + Send + 'static {
        self.batch(items, max_in_flight, false)
    }

    /// Like [`read_batch`](Self::read_batch), but results come as items
    /// complete (each tagged with its index), so no item waits behind a
    /// slower one. Items over
    /// [`BATCH_ANY_ORDER_ITEM_BYTES_MAX`](storaged_proto::model::BATCH_ANY_ORDER_ITEM_BYTES_MAX)
    /// fail in this mode (RESOURCE_EXHAUSTED): read them in order.
    pub fn read_batch_any_order(
        &self,
        items: Vec<BatchItem>,
        max_in_flight: u32,
    ) -> impl Stream<Item = Result<BatchResult, ClientError>> + Send + 'static {
        self.batch(items, max_in_flight, true)
    }

    fn batch(
        &self,
        items: Vec<BatchItem>,
        max_in_flight: u32,
        any_order: bool,
    ) -> impl Stream<Item = Result<BatchResult, ClientError>> + Send + 'static {
        let mut rpc = self.client.rpc.clone();
        let dataset = self.name.to_string();
        let dataset_id = self.id;
        async_stream(move |tx| async move {
            let n = items.len();
            let req = pb::ReadBatchRequest {
                dataset,
                dataset_id,
                items: items
                    .into_iter()
                    .map(|i| pb::ReadItem {
                        path: i.path,
                        offset: i.offset,
                        length: i.length,
                    })
                    .collect(),
                max_in_flight,
                any_order,
            };
            let result: Result<(), ClientError> = async {
                let mut stream = rpc.read_batch(req).await?.into_inner();
                let mut items = BatchAssembler::new(n, any_order);
                while let Some(msg) = stream.message().await? {
                    if let Some(item) = items.accept(msg)?
                        && tx.send(Ok(item)).await.is_err()
                    {
                        return Ok(());
                    }
                }
                items.finish()
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        })
    }
}

/// Puts a ReadBatch response stream back into items: checks that each
/// item's messages come together, in request order unless `any_order`,
/// each item once, with the bytes announced; an item of one message is
/// handed out without a copy.
struct BatchAssembler {
    items: usize,
    any_order: bool,
    next_index: u32,
    delivered: usize,
    seen: Vec<bool>,
    /// The item whose messages are arriving (they come together).
    open_index: Option<u32>,
    cur: Option<BytesMut>,
    cur_len: u64,
}

impl BatchAssembler {
    fn new(items: usize, any_order: bool) -> Self {
        Self {
            items,
            any_order,
            next_index: 0,
            delivered: 0,
            seen: vec![false; items],
            open_index: None,
            cur: None,
            cur_len: 0,
        }
    }

    /// Takes the next message: a finished item, `None` while one is still
    /// arriving, or the protocol violation.
    fn accept(&mut self, msg: pb::ReadBatchResponse) -> Result<Option<BatchResult>, ClientError> {
        let expected = if self.any_order {
            self.open_index.unwrap_or(msg.index)
        } else {
            self.next_index
        };
        let fresh = self.seen.get(msg.index as usize).is_some_and(|s| !*s)
            || self.open_index == Some(msg.index);
        if msg.index != expected || !fresh {
            return Err(ClientError::Protocol(format!(
                "batch item {} arrived out of place (expected {expected})",
                msg.index
            )));
        }
        self.open_index = Some(msg.index);
        let announced = |len: usize, want: u64| {
            if len as u64 == want {
                Ok(())
            } else {
                Err(ClientError::Protocol(format!(
                    "batch item {} has {len} bytes; {want} were announced",
                    msg.index
                )))
            }
        };
        let data = if let Some(err) = msg.error {
            self.cur = None;
            Err(Status::new(Code::from(err.code), err.message))
        } else if self.cur.is_none() && msg.last {
            announced(msg.data.len(), msg.item_length)?;
            Ok(msg.data)
        } else {
            if self.cur.is_none() {
                self.cur_len = msg.item_length;
                self.cur = Some(BytesMut::with_capacity(msg.item_length as usize));
            }
            self.cur.as_mut().expect("set").extend_from_slice(&msg.data);
            if !msg.last {
                return Ok(None);
            }
            let b = self.cur.take().expect("set").freeze();
            announced(b.len(), self.cur_len)?;
            Ok(b)
        };
        self.seen[msg.index as usize] = true;
        self.open_index = None;
        self.delivered += 1;
        self.next_index += 1;
        Ok(Some(BatchResult {
            index: msg.index,
            data,
        }))
    }

    /// At the end of the stream: every item must have come.
    fn finish(&self) -> Result<(), ClientError> {
        if self.delivered < self.items {
            return Err(ClientError::Protocol(format!(
                "batch stream ended after {} of {} items",
                self.delivered, self.items
            )));
        }
        Ok(())
    }
}

/// A stream fed by a spawned producer through a small bounded channel.
fn async_stream<T, F, Fut>(f: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    async_stream_bounded(4, f)
}

/// [`async_stream`] with `capacity` items waiting at most.
fn async_stream_bounded<T, F, Fut>(capacity: usize, f: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    let handle = tokio::spawn(f(tx));
    let guard = AbortOnDrop(handle);
    tokio_stream::wrappers::ReceiverStream::new(rx).map(move |x| {
        let _keep = &guard;
        x
    })
}

/// Stops the producer when the consumer drops the stream.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32, data: &[u8], last: bool, item_length: u64) -> pb::ReadBatchResponse {
        pb::ReadBatchResponse {
            index,
            offset: 0,
            data: Bytes::copy_from_slice(data),
            last,
            error: None,
            item_length,
        }
    }

    // Guards against a ReadBatch stream the client accepts though the
    // server broke its contract: items out of order, twice, interleaved,
    // with other than the announced bytes, or missing at the end.
    #[test]
    fn batch_streams_are_checked_item_by_item() {
        let mut a = BatchAssembler::new(3, false);
        let whole = a.accept(chunk(0, b"abc", true, 3)).unwrap().unwrap();
        assert_eq!(
            (whole.index, whole.data.unwrap()),
            (0, Bytes::from_static(b"abc"))
        );
        assert!(a.accept(chunk(1, b"ab", false, 4)).unwrap().is_none());
        let two = a.accept(chunk(1, b"cd", true, 4)).unwrap().unwrap();
        assert_eq!(two.data.unwrap(), Bytes::from_static(b"abcd"));
        assert!(a.finish().is_err(), "item 2 never came");
        assert!(a.accept(chunk(0, b"x", true, 1)).is_err(), "item 0 twice");

        let mut a = BatchAssembler::new(2, false);
        assert!(a.accept(chunk(1, b"x", true, 1)).is_err(), "out of order");
        let mut a = BatchAssembler::new(2, true);
        assert!(a.accept(chunk(1, b"x", true, 1)).unwrap().is_some());
        assert!(a.accept(chunk(0, b"ab", false, 2)).unwrap().is_none());
        assert!(a.accept(chunk(1, b"y", true, 1)).is_err(), "interleaved");
        let mut a = BatchAssembler::new(1, true);
        assert!(a.accept(chunk(0, b"abc", true, 4)).is_err(), "short item");
        let mut a = BatchAssembler::new(1, false);
        let mut failed = chunk(0, b"", true, 0);
        failed.error = Some(pb::ItemError {
            code: Code::NotFound as i32,
            message: "gone".into(),
        });
        let r = a.accept(failed).unwrap().unwrap();
        assert_eq!(r.data.unwrap_err().code(), Code::NotFound);
        a.finish().unwrap();
    }

    // Guards against https:// URLs being used as plaintext and URLs without
    // a scheme failing with an unclear message (issue 13, items 7 and 15).
    #[tokio::test]
    async fn urls_that_cannot_work_are_refused_by_name() {
        let e = Client::connect_with("https://127.0.0.1:1", &ConnectOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::BadUrl { .. }), "{e}");
        assert!(e.to_string().contains("needs the CA certificate"), "{e}");
        let e = Client::connect("127.0.0.1:7400").await.unwrap_err();
        assert!(e.to_string().contains("add http:// to the URL"), "{e}");
        let e = Client::connect("ftp://x").await.unwrap_err();
        assert!(e.to_string().contains("unknown scheme"), "{e}");
    }

    // Guards against connection errors repeating their causes
    // ("transport error: transport error: tcp connect error: ...") and not
    // saying what to check.
    #[tokio::test]
    async fn connect_errors_name_each_cause_once() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let e = Client::connect(&url).await.unwrap_err();
        let text = error_chain(&e);
        assert!(text.contains("is storaged running at"), "{text}");
        for part in ["transport error", "tcp connect error"] {
            assert!(text.matches(part).count() <= 1, "{part} repeated: {text}");
        }
    }

    #[test]
    fn error_display_names_the_code() {
        let e = ClientError::from(Status::new(Code::DataLoss, "bad block"));
        assert_eq!(e.to_string(), "DATA_LOSS: bad block");
        assert_eq!(e.code(), Some(Code::DataLoss));
    }
}

/// Refuses URLs the client cannot use as given, before any connection:
/// unknown schemes and addresses without a scheme. (`https://` is always
/// TLS: without a CA it fails in `ConnectOptions::tls_config`, never
/// falling back to plaintext.)
fn check_url(url: &str) -> Result<(), ClientError> {
    let bad = |reason: &str| {
        Err(ClientError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        })
    };
    match url.split_once("://") {
        Some(("http" | "https" | "unix", _)) => Ok(()),
        Some((scheme, _)) => bad(&format!(
            "unknown scheme {scheme:?}: use http://HOST:PORT, https://HOST:PORT or unix:///path/storaged.sock"
        )),
        None => bad(&format!(
            "no scheme: add http:// to the URL (http://{url}), or use unix:///path/storaged.sock"
        )),
    }
}

/// Whether this process may connect to the Unix socket at `path` (write
/// permission on the socket file, as `connect(2)` checks it).
fn unix_socket_writable(path: &str) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the
    // call; access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An error and its causes, each once: libraries often repeat their
/// source's message in their own ("transport error: transport error"), so
/// a cause already contained in the text so far is left out.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// Whether `url` names a loopback address (`localhost`, 127.0.0.0/8, ::1).
/// The host of a TCP URL (`http://HOST:PORT`), as it can be joined to
/// another port (an IPv6 address keeps its brackets); `None` for `unix://`.
fn url_host(url: &str) -> Option<String> {
    if url.starts_with("unix://") {
        return None;
    }
    let uri = url.parse::<tonic::codegen::http::Uri>().ok()?;
    uri.host().map(str::to_owned)
}

fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

#[cfg(test)]
mod transport_tests {
    use super::is_loopback_url;

    #[test]
    fn loopback_urls_are_recognised() {
        for url in [
            "http://127.0.0.1:7400",
            "http://127.9.9.9:1",
            "http://localhost:7400",
            "http://[::1]:7400",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:7400",
            "http://storage.example:7400",
            "unix:///tmp/s.sock",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }
}
