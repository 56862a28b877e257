//! The `storaged.v1.Storaged` gRPC service: authenticates each call,
//! converts wire messages to validated domain types at the edge, checks the
//! caller's rights, calls the store, audits writes, admin operations and
//! denials, and maps every error to its one status code.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use storaged_proto::model::{RangeSpec, ReadSpec, StorageClass};
use storaged_proto::pb::storaged_server::Storaged;
use storaged_proto::pb::{self, ingest_request};
use storaged_proto::{DatasetName, ObjectPath};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::ahead::drive_ahead;
use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{
    AuthError, CallPermit, Denied, Presented, Principal, QuotaExceeded, Right, Tenants, Via,
};
use crate::budget::Budget;
use crate::conn::{CloseReason, ConnInfo, ConnState};
use crate::error::{AdminError, ReadError};
use crate::region::{RegionError, Regions};
use crate::store::quota::OwnerQuota;
use crate::store::read_into::ReadIntoItem;
use crate::store::replace::ReplaceOptions;
use crate::store::{BatchEvent, Store, StoreStatus};

/// The service; one per server, sharing the store and the region registry.
#[derive(Debug, Clone)]
pub struct StoragedService {
    store: Arc<Store>,
    regions: Arc<Regions>,
    /// Becomes true when the server starts shutting down: open region
    /// registrations end then, instead of holding the drain to its deadline.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The Unix socket this server also listens on, advertised in `Status`
    /// so same-host clients that came over TCP can switch to it.
    unix_socket: Option<Arc<str>>,
    tenants: Arc<Tenants>,
    audit: Arc<AuditLog>,
    /// A response stream whose client reads nothing for this long ends.
    stream_stall: std::time::Duration,
    /// An ingest that receives nothing for this long is discarded.
    ingest_idle: std::time::Duration,
    /// The server's connection admission (for Status), when serving.
    admission: Option<Arc<crate::conn::Admission>>,
    /// The bulk channel's socket, advertised in `Status`.
    bulk_socket: Option<Arc<str>>,
    /// Largest request frame on the bulk channel (gRPC's decoding limit).
    bulk_frame_bytes_max: usize,
    /// Requests the bulk channel answered (for Status).
    bulk_requests: Arc<std::sync::atomic::AtomicU64>,
    /// The TCP bulk channel, when served.
    bulk_tcp: Option<Arc<bulk::TcpBulk>>,
    /// This node's cluster membership (`serve --cluster`).
    cluster: Option<Arc<crate::cluster::Member>>,
}

/// Who may call, and where their calls are recorded.
#[derive(Debug, Clone)]
pub struct Access {
    pub tenants: Arc<Tenants>,
    pub audit: Arc<AuditLog>,
    /// TLS on the TCP listener (read and checked before serving).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Access {
    /// No tenants (everyone is the operator), no audit log, no TLS.
    pub fn open() -> Self {
        Self {
            tenants: Arc::new(Tenants::default()),
            audit: Arc::new(AuditLog::disabled()),
            tls: None,
        }
    }
}

impl StoragedService {
    pub fn new(
        store: Arc<Store>,
        regions: Arc<Regions>,
        stopping: tokio::sync::watch::Receiver<bool>,
        unix_socket: Option<&Path>,
        access: Access,
        limits: &crate::config::ServerLimits,
    ) -> Self {
        Self {
            stream_stall: std::time::Duration::from_secs(limits.stream_stall_timeout_s),
            ingest_idle: std::time::Duration::from_secs(limits.ingest_idle_timeout_s),
            store,
            regions,
            stopping,
            tenants: access.tenants,
            audit: access.audit,
            unix_socket: unix_socket
                .and_then(|p| std::path::absolute(p).ok())
                .map(|p| p.to_string_lossy().into()),
            admission: None,
            bulk_socket: None,
            bulk_frame_bytes_max: limits.max_decoding_message_bytes,
            bulk_requests: Arc::default(),
            bulk_tcp: None,
            cluster: None,
        }
    }

    /// Advertises the TCP bulk channel on `port` in Status, with the
    /// staging memory `limits` give its connections.
    #[must_use]
    pub fn with_bulk_tcp(mut self, port: u16, limits: &crate::config::ServerLimits) -> Self {
        let pool = Arc::new(bulk::TcpBulk::new(port, limits));
        bulk::TcpBulk::sweep_idle(&pool);
        self.bulk_tcp = Some(pool);
        self
    }

    /// Advertises the bulk channel's socket at `path` in Status.
    #[must_use]
    pub fn with_bulk_socket(mut self, path: &Path) -> Self {
        self.bulk_socket = std::path::absolute(path)
            .ok()
            .map(|p| p.to_string_lossy().into());
        self
    }

    /// Answers the cluster RPCs from this node's membership.
    #[must_use]
    pub fn with_cluster(mut self, member: Option<Arc<crate::cluster::Member>>) -> Self {
        self.cluster = member;
        self
    }

    /// Reports the connections `admission` counts in Status.
    #[must_use]
    pub fn with_admission(mut self, admission: Arc<crate::conn::Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The objects and commit of an ingest whose `begin` was accepted.
    async fn ingest_objects(
        &self,
        mut session: crate::store::IngestSession,
        mut stream: Streaming<pb::IngestRequest>,
    ) -> Result<pb::IngestResponse, Status> {
        tracing::info!(dataset = %session.dataset(), "ingest started");
        loop {
            // A client that goes away surfaces here as an error, one that
            // goes quiet as the idle timeout; returning drops the session,
            // which discards the ingest and frees its slot and space.
            let next = tokio::time::timeout(self.ingest_idle, stream.message()).await;
            let Ok(next) = next else {
                tracing::warn!(dataset = %session.dataset(), idle_s = self.ingest_idle.as_secs(), "ingest idle; discarding");
                return Err(Status::deadline_exceeded(format!(
                    "the ingest sent nothing for {} s (ingest_idle_timeout_s); it was discarded",
                    self.ingest_idle.as_secs()
                )));
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(invalid(
                        "ingest stream ended without `commit`; nothing was stored",
                    ));
                }
                Err(status) => {
                    tracing::warn!(dataset = %session.dataset(), %status, "ingest stream broke; discarding");
                    return Err(status);
                }
            };
            match msg.msg {
                Some(ingest_request::Msg::Object(o)) => {
                    let path = ObjectPath::new(o.path).map_err(invalid)?;
                    session.begin_object(path, o.size, o.crc32).await?;
                }
                Some(ingest_request::Msg::Data(d)) => session.data(&d).await?,
                Some(ingest_request::Msg::Commit(c)) => {
                    let handle = session.commit(c.object_count, c.total_bytes).await?;
                    return Ok(pb::IngestResponse {
                        dataset: Some(dataset_info(&self.store.dataset_status(handle))),
                    });
                }
                Some(ingest_request::Msg::Begin(_)) => {
                    return Err(invalid("`begin` sent twice in one ingest"));
                }
                None => return Err(invalid("empty ingest message")),
            }
        }
    }

    /// Serves `stream` as a response: its reads charged to `caller`'s
    /// budget, driven up to `depth` messages ahead, and ended, with its
    /// connection, when the client reads nothing for the stall timeout
    /// (only closing the connection frees what HTTP/2 holds for it).
    fn respond<T: Send + 'static>(
        &self,
        caller: &Caller,
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
        depth: usize,
    ) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
        let conn = caller.conn.clone();
        // tonic's own deadline covers a call only until its response
        // starts; a response stream ends at the deadline here.
        let stream: Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> = match caller.deadline {
            None => Box::pin(stream),
            Some(at) => Box::pin(
                stream
                    .map(Some)
                    .take_until(tokio::time::sleep_until(at))
                    .chain(futures::stream::once(async move {
                        (tokio::time::Instant::now() >= at).then(|| {
                            Err(Status::deadline_exceeded(
                                "the call's deadline (grpc-timeout) passed before its response ended",
                            ))
                        })
                    }))
                    .filter_map(futures::future::ready),
            ),
        };
        drive_ahead(
            caller.budget.clone().scope_stream(stream),
            depth,
            self.stream_stall,
            move || {
                if let Some(c) = conn {
                    c.close(CloseReason::StalledStream);
                }
            },
            stalled_status,
        )
    }

    fn count_grpc_bytes(&self, n: usize) {
        self.store
            .read_counters
            .grpc_bytes_served
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

mod bulk;
use bulk::ReadIntoCall;
mod caller;
mod cluster;
pub mod codes;
mod progress;
mod status;
mod zerocopy;
use caller::*;
pub use caller::{CallId, Caller, REQUEST_ID_METADATA_KEY};
pub use codes::GrpcCode;
use progress::*;
use status::*;
pub use zerocopy::TcpSocket;

#[tonic::async_trait]
impl Storaged for StoragedService {
    #[tracing::instrument(skip_all)]
    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let caller = self.caller(&request, "ingest")?;
        let mut stream = request.into_inner();
        let begin = match stream.message().await? {
            Some(pb::IngestRequest {
                msg: Some(ingest_request::Msg::Begin(b)),
            }) => b,
            Some(_) => return Err(invalid("the first ingest message must be `begin`")),
            None => return Err(invalid("empty ingest stream")),
        };
        let name = DatasetName::new(begin.dataset).map_err(invalid)?;
        self.authorize(&caller, "ingest", Right::Write, name.as_str())?;
        self.audit_ready(&caller)?;
        let _ingesting = caller
            .principal
            .ingest_permit()
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let asked = StorageClass::from_wire(
            begin.storage_class,
            begin.ec_data_units,
            begin.ec_parity_units,
        )
        .map_err(invalid)?;
        let unit_name = name
            .as_str()
            .starts_with(storaged_proto::cluster::UNIT_PREFIX);
        match (&self.cluster, begin.cluster_unit) {
            (Some(member), false) => {
                if unit_name {
                    return Err(invalid(format!(
                        "dataset names beginning with {:?} are the cluster's own",
                        storaged_proto::cluster::UNIT_PREFIX
                    )));
                }
                if let Some(t) = caller
                    .principal
                    .tenant
                    .as_ref()
                    .filter(|t| t.quota.bytes_max.is_some() || t.quota.datasets_max.is_some())
                {
                    // A cluster dataset's bytes are on many nodes, each of
                    // which counts only its own: a quota checked here
                    // would be a quota any tenant could step around.
                    return Err(Status::failed_precondition(format!(
                        "tenant {:?} has a bytes or datasets quota, and quotas are not enforced across a cluster yet: ingest as a tenant without one",
                        t.name
                    )));
                }
                let result = cluster::ingest(member, &name, asked, stream, self.ingest_idle).await;
                let bytes = result
                    .as_ref()
                    .map(|r| r.dataset.as_ref().map_or(0, |d| d.total_bytes));
                let audited = self.audit(&caller, "ingest", Some(name.as_str()), bytes);
                let response = result?;
                audited?;
                return Ok(Response::new(response));
            }
            (None, true) => return Err(cluster::not_clustered()),
            (Some(_), true) if !unit_name => {
                return Err(invalid(format!(
                    "a cluster unit's dataset name begins with {:?}",
                    storaged_proto::cluster::UNIT_PREFIX
                )));
            }
            _ => {}
        }
        let class = asked.unwrap_or_else(|| self.store.default_class());
        let quota = caller
            .principal
            .tenant
            .as_ref()
            .map(|t| t.quota.clone())
            .unwrap_or_default();
        let owner = OwnerQuota {
            owner: caller.principal.owner().to_owned(),
            bytes_max: quota.bytes_max,
            datasets_max: quota.datasets_max,
        };
        let result = match self.store.begin_ingest(name.clone(), class, owner) {
            Ok(session) => self.ingest_objects(session, stream).await,
            Err(e) => Err(Status::from(e)),
        };
        let bytes = result
            .as_ref()
            .map(|r| r.dataset.as_ref().map_or(0, |d| d.total_bytes));
        let audited = self.audit(&caller, "ingest", Some(name.as_str()), bytes);
        let response = result?;
        audited?;
        Ok(Response::new(response))
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let caller = self.caller(&request, "list_datasets")?;
        // Only what the caller may read: other tenants' names stay unseen.
        let mut datasets: Vec<pb::DatasetInfo> = self
            .store
            .list_datasets()
            .into_iter()
            .filter(|h| caller.principal.allows(Right::Read, &h.name))
            .filter(|h| {
                // A node's shares of cluster datasets are listed as the
                // cluster datasets they belong to.
                self.cluster.is_none() || !h.name.starts_with(storaged_proto::cluster::UNIT_PREFIX)
            })
            .map(|h| dataset_info(&self.store.dataset_status(h)))
            .collect();
        if let Some(member) = &self.cluster {
            datasets.extend(
                cluster::list(member)
                    .await?
                    .into_iter()
                    .filter(|d| caller.principal.allows(Right::Read, &d.name)),
            );
            datasets.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(Response::new(pb::ListDatasetsResponse { datasets }))
    }

    async fn list_objects(
        &self,
        request: Request<pb::ListObjectsRequest>,
    ) -> Result<Response<pb::ListObjectsResponse>, Status> {
        let caller = self.caller(&request, "list_objects")?;
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        self.authorize_read(&caller, "list_objects", name.as_str())
            .await?;
        if r.prefix.len() > storaged_proto::model::OBJECT_PATH_BYTES_MAX || r.prefix.contains('\0')
        {
            return Err(invalid("prefix is longer than 4096 bytes or contains NUL"));
        }
        let (objects, next) =
            self.store
                .list_objects(&name, &r.prefix, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListObjectsResponse {
            objects: objects
                .into_iter()
                .map(|o| pb::ObjectInfo {
                    path: o.path,
                    size: o.size,
                    crc32: o.crc32,
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let caller = self.caller(&request, "stat")?;
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        self.authorize_read(&caller, "stat", name.as_str()).await?;
        let path = ObjectPath::new(r.path).map_err(invalid)?;
        tracing::Span::current().record("object", path.as_str());
        let obj = self.store.lookup(&name, &path)?;
        let extents = if r.include_extents {
            self.store
                .object_extents(&obj)
                .into_iter()
                .map(|(object_offset, s)| pb::Extent {
                    object_offset,
                    device_index: s.device,
                    device_offset: s.device_offset,
                    length: s.len,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::StatResponse {
            object: Some(pb::ObjectInfo {
                path: obj.path.clone(),
                size: obj.record.size,
                crc32: obj.record.crc32,
            }),
            logical_offset: obj.record.logical_offset,
            checksum_block_bytes: obj.dataset.record.checksum_block_bytes,
            extents,
        }))
    }

    type ReadStream = BoxStream<pb::ReadResponse>;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = self.caller(&request, "read")?;
        let spec = ReadSpec::try_from(request.get_ref()).map_err(invalid)?;
        self.authorize_read(&caller, "read", spec.dataset.as_str())
            .await?;
        tracing::Span::current().record("object", spec.range.path.as_str());
        let obj = self.store.lookup_pinned(
            &spec.dataset,
            request.get_ref().dataset_id,
            &spec.range.path,
        )?;
        let (start, len) = Store::resolve_range(&obj, spec.range.offset, spec.range.length)?;
        let object_size = obj.record.size;
        let service = self.clone();
        let stream = self
            .store
            .read_stream(Arc::new(obj), start, len)
            .map(move |r| match r {
                Ok((offset, data)) => Ok(pb::ReadResponse {
                    offset,
                    // Verified in the store; plain bytes from here, on the wire.
                    data: data.into_bytes(),
                    object_size,
                    range_length: len,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "read failed");
                    Err(Status::from(e))
                }
            });
        // The stream's own read-ahead keeps the devices busy; two finished
        // messages wait at most, and a client that stops reading loses the
        // stream (and its buffers) after the stall timeout.
        let stream = self.respond(&caller, stream, 2).inspect(move |r| {
            // The call counts against its tenant until it ends.
            let _call = &caller.permit;
            if let Ok(m) = r {
                // Counted when handed to HTTP/2, not when read.
                service.count_grpc_bytes(m.data.len());
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ReadBatchStream = BoxStream<pb::ReadBatchResponse>;

    async fn read_batch(
        &self,
        request: Request<pb::ReadBatchRequest>,
    ) -> Result<Response<Self::ReadBatchStream>, Status> {
        let caller = self.caller(&request, "read_batch")?;
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        self.authorize_read(&caller, "read_batch", name.as_str())
            .await?;
        let items = r
            .items
            .iter()
            .map(|i| RangeSpec::try_from(i).map_err(ReadError::from))
            .collect();
        let in_flight = match r.max_in_flight {
            0 => self.store.limits().batch_in_flight_default,
            n => n,
        };
        let events: std::pin::Pin<Box<dyn Stream<Item = BatchEvent> + Send>> = if r.any_order {
            Box::pin(
                self.store
                    .read_batch_any_order(&name, r.dataset_id, items, in_flight)?,
            )
        } else {
            Box::pin(
                self.store
                    .read_batch(&name, r.dataset_id, items, in_flight)?,
            )
        };
        let service = self.clone();
        let stream = events.map(move |e| {
            Ok(match e {
                BatchEvent::Data {
                    index,
                    offset,
                    data,
                    item_length,
                    last,
                } => pb::ReadBatchResponse {
                    index,
                    offset,
                    // Verified in the store; plain bytes from here, on the wire.
                    data: data.into_bytes(),
                    last,
                    error: None,
                    item_length,
                },
                BatchEvent::Error { index, error } => {
                    if error.code() == tonic::Code::DataLoss {
                        tracing::warn!(%error, "batch item failed");
                    }
                    pb::ReadBatchResponse {
                        index,
                        offset: 0,
                        data: bytes::Bytes::new(),
                        last: true,
                        error: Some(pb::ItemError {
                            code: error.code() as i32,
                            message: error.to_string(),
                        }),
                        item_length: 0,
                    }
                }
            })
        });
        let stream = self.respond(&caller, stream, in_flight as usize).inspect(
            move |r: &Result<pb::ReadBatchResponse, Status>| {
                // The call counts against its tenant until it ends.
                let _call = &caller.permit;
                if let Ok(m) = r {
                    // Counted when handed to HTTP/2, not when read.
                    service.count_grpc_bytes(m.data.len());
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        let caller = self.caller(&request, "delete_dataset")?;
        let name = DatasetName::new(request.into_inner().dataset).map_err(invalid)?;
        self.authorize(&caller, "delete_dataset", Right::Write, name.as_str())?;
        self.audit_ready(&caller)?;
        let result = match &self.cluster {
            Some(member) if self.store.dataset(&name).is_err() => {
                cluster::remove(member, &self.store, &name).await
            }
            _ => self.store.delete(&name).await.map_err(Status::from),
        };
        self.audit(
            &caller,
            "delete_dataset",
            Some(name.as_str()),
            result.as_ref().copied(),
        )?;
        let freed_bytes = result?;
        tracing::info!(dataset = %name, freed_bytes, tenant = caller.principal.name(), "dataset deleted");
        Ok(Response::new(pb::DeleteDatasetResponse { freed_bytes }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let caller = self.caller(&request, "status")?;
        let mut status = self.status();
        if !caller.principal.is_admin() {
            // Device paths and other tenants' datasets are the operator's.
            for d in &mut status.devices {
                d.path.clear();
            }
            if let Some(r) = &mut status.rebuild {
                r.new_path.clear();
            }
            status
                .datasets
                .retain(|d| caller.principal.allows(Right::Read, &d.name));
        }
        Ok(Response::new(status))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let caller = self.caller(&request, "cluster_status")?;
        let member = self.cluster.as_ref().ok_or_else(cluster::not_clustered)?;
        let may_read = |name: &str| caller.principal.allows(Right::Read, name);
        Ok(Response::new(
            cluster::cluster_status(member, may_read).await?,
        ))
    }

    async fn get_cluster_dataset(
        &self,
        request: Request<pb::GetClusterDatasetRequest>,
    ) -> Result<Response<pb::ClusterDataset>, Status> {
        let caller = self.caller(&request, "get_cluster_dataset")?;
        let name = DatasetName::new(request.into_inner().dataset).map_err(invalid)?;
        if name
            .as_str()
            .starts_with(storaged_proto::cluster::UNIT_PREFIX)
        {
            // Never a cluster dataset (the names are the units'): said
            // before the rights, so a reader of a unit (whose rights are
            // its dataset's) falls through to the node's own read.
            return Err(Status::not_found(format!(
                "{:?} is a cluster unit, not a cluster dataset",
                name.as_str()
            )));
        }
        self.authorize(&caller, "get_cluster_dataset", Right::Read, name.as_str())?;
        let member = self.cluster.as_ref().ok_or_else(cluster::not_clustered)?;
        Ok(Response::new(cluster::dataset(member, &name).await?))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let caller = self.caller(&request, "drain_node")?;
        self.authorize(&caller, "drain_node", Right::Admin, "")?;
        self.audit_ready(&caller)?;
        let node = request.into_inner().node_id;
        crate::cluster::records::check_name("node id", &node).map_err(invalid)?;
        let member = self.cluster.as_ref().ok_or_else(cluster::not_clustered)?;
        let result = cluster::drain(member, &node).await;
        self.audit(
            &caller,
            "drain_node",
            Some(node.as_str()),
            result.as_ref().map(|r| r.bytes_moved),
        )?;
        Ok(Response::new(result?))
    }

    type RegisterRegionStream = BoxStream<pb::RegionEvent>;

    async fn register_region(
        &self,
        request: Request<pb::RegisterRegionRequest>,
    ) -> Result<Response<Self::RegisterRegionStream>, Status> {
        let caller = self.caller(&request, "register_region")?;
        let cred = peer_cred(&request)?;
        let r = request.into_inner();
        if !r.path.is_empty() {
            return Err(RegionError::ByPath.into());
        }
        let Some(memfd) = r.memfd else {
            return Err(invalid(
                "RegisterRegion needs `memfd`: the caller's sealed memfd",
            ));
        };
        let pid = cred.pid().ok_or(RegionError::NoPeerPid)?;
        let registration = self.regions.register(
            pid,
            memfd,
            r.size_bytes,
            cred.uid(),
            caller.principal.owner(),
        )?;
        // Pinning faults in every page of the region, so it runs off the
        // runtime and in the background: reads that come first are plain
        // READs (and fault pages in themselves), later ones READ_FIXED. It
        // holds only a weak reference, so a region dropped meanwhile is not
        // kept alive by it.
        let (store, region) = (
            Arc::clone(&self.store),
            Arc::downgrade(&registration.region),
        );
        tokio::task::spawn_blocking(move || {
            if let Some(region) = region.upgrade() {
                store.fix_region(&region);
            }
        });
        let event = pb::RegionEvent {
            region_id: registration.region.id,
            size_bytes: r.size_bytes,
            align_bytes: crate::engine::DIRECT_IO_ALIGN_BYTES as u32,
            checksum_block_bytes: crate::device::CHECKSUM_BLOCK_BYTES,
        };
        // The id, then nothing until the client cancels or goes away, or
        // the server stops: the stream owns the registration, and dropping
        // it deregisters.
        let mut stopping = self.stopping.clone();
        let end = futures::stream::once(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        })
        .filter_map(|()| async { None });
        let stream = futures::stream::once(async move { Ok(event) })
            .chain(end)
            .map(move |event| {
                let _registered = &registration;
                event
            });
        Ok(Response::new(Box::pin(stream)))
    }

    type ReadIntoStream = BoxStream<pb::ReadIntoCompletion>;

    async fn read_into(
        &self,
        request: Request<pb::ReadIntoRequest>,
    ) -> Result<Response<Self::ReadIntoStream>, Status> {
        let caller = self.caller(&request, "read_into")?;
        let uid = peer_uid(&request)?;
        let r = request.into_inner();
        let call = ReadIntoCall {
            dataset: r.dataset,
            dataset_id: r.dataset_id,
            region_id: r.region_id,
            max_in_flight: r.max_in_flight,
            items: r.items,
        };
        self.learn_unit(&caller, &call.dataset).await;
        let (completions, in_flight) = self.start_read_into(&caller, uid, call)?;
        let respond = |completions| self.respond(&caller, completions, in_flight as usize);
        let completions = completions.map(move |(index, result)| {
            Ok(match result {
                Ok(done) => pb::ReadIntoCompletion {
                    index,
                    error: None,
                    data_offset: done.data_offset,
                    length: done.length,
                    span_bytes: done.span_bytes,
                },
                Err(error) => {
                    if error.code() == tonic::Code::DataLoss {
                        tracing::warn!(%error, "ReadInto item failed");
                    }
                    pb::ReadIntoCompletion {
                        index,
                        error: Some(pb::ItemError {
                            code: error.code() as i32,
                            message: error.to_string(),
                        }),
                        ..Default::default()
                    }
                }
            })
        });
        let completions = respond(completions).inspect(move |_| {
            // The call counts against its tenant until it ends.
            let _call = &caller.permit;
        });
        Ok(Response::new(Box::pin(completions)))
    }

    async fn hint(
        &self,
        request: Request<pb::HintRequest>,
    ) -> Result<Response<pb::HintResponse>, Status> {
        let caller = self.caller(&request, "hint")?;
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        self.authorize_read(&caller, "hint", name.as_str()).await?;
        // The item limit is the store's to enforce; the message itself is
        // bounded by the server's decoding limit.
        let paths = r
            .paths
            .into_iter()
            .map(|p| ObjectPath::new(p).map_err(invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let outcome = self.store.hint(&name, &paths)?;
        Ok(Response::new(pb::HintResponse {
            accepted: outcome.accepted,
            accepted_bytes: outcome.accepted_bytes,
            device_reads: outcome.device_reads,
        }))
    }

    type ScrubStream = BoxStream<pb::ScrubEvent>;

    async fn scrub(
        &self,
        request: Request<pb::ScrubRequest>,
    ) -> Result<Response<Self::ScrubStream>, Status> {
        let caller = self.caller(&request, "scrub")?;
        self.authorize(&caller, "scrub", Right::Admin, "")?;
        self.audit_ready(&caller)?;
        let r = request.into_inner();
        let name = if r.dataset.is_empty() {
            None
        } else {
            let n = DatasetName::new(r.dataset).map_err(invalid)?;
            self.store.dataset(&n)?;
            Some(n)
        };
        let rate = if r.rate_mib_s == 0 {
            self.store.limits().scrub_rate_mib_s
        } else {
            r.rate_mib_s.min(100_000)
        };
        if self.store.scrub_counters.running.load(Ordering::SeqCst) {
            return Err(AdminError::ScrubRunning.to_status());
        }
        let store = Arc::clone(&self.store);
        let service = self.clone();
        // Cancelling the call stops the scrub (units already repaired stay
        // repaired), so the next one can start.
        Ok(Response::new(with_progress(
            OnCancel::Stop,
            caller.deadline,
            |done, total| pb::ScrubEvent {
                event: Some(pb::scrub_event::Event::Progress(pb::ScrubProgress {
                    bytes_done: done,
                    bytes_total: total,
                })),
            },
            move |mut progress| async move {
                let scrubbed = store
                    .scrub(name.as_ref(), rate, move |(done, total)| {
                        progress(done, total)
                    })
                    .await;
                let dataset = name.as_ref().map(|n| n.as_str());
                let outcome = scrubbed
                    .as_ref()
                    .map(|r| r.bytes_checked)
                    .map_err(|e| e.to_status());
                if let Err(status) =
                    service.audit(&caller, "scrub", dataset, outcome.as_ref().copied())
                {
                    // Done, but not on the record: the caller must not
                    // take it as done.
                    return Err(Status::unavailable(status.message().to_owned()));
                }
                let rep = scrubbed.map_err(|e| e.to_status())?;
                Ok(pb::ScrubEvent {
                    event: Some(pb::scrub_event::Event::Report(pb::ScrubReport {
                        datasets: rep.datasets,
                        bytes_checked: rep.bytes_checked,
                        units_checked: rep.units_checked,
                        corrupt: rep.corrupt,
                        repaired: rep.repaired,
                        unrecoverable: rep.unrecoverable,
                        missing: rep.missing,
                        problems: rep.problems,
                        rows_corrupt: rep.rows_corrupt,
                        rows_repaired: rep.rows_repaired,
                    })),
                })
            },
        )))
    }

    type ReplaceDeviceStream = BoxStream<pb::ReplaceDeviceEvent>;

    async fn replace_device(
        &self,
        request: Request<pb::ReplaceDeviceRequest>,
    ) -> Result<Response<Self::ReplaceDeviceStream>, Status> {
        let caller = self.caller(&request, "replace_device")?;
        self.authorize(&caller, "replace_device", Right::Admin, "")?;
        self.audit_ready(&caller)?;
        let r = request.into_inner();
        if r.old.is_empty() || r.new_path.is_empty() {
            return Err(invalid("both the old device and the new path are needed"));
        }
        self.store.device_index(&r.old).map_err(|e| e.to_status())?;
        let store = Arc::clone(&self.store);
        let service = self.clone();
        let options = ReplaceOptions {
            allow_healthy: r.allow_healthy,
            overwrite: r.overwrite,
        };
        // The rebuild runs to the end even if the client goes away.
        Ok(Response::new(with_progress(
            OnCancel::Finish,
            caller.deadline,
            |done, total| pb::ReplaceDeviceEvent {
                event: Some(pb::replace_device_event::Event::Progress(
                    pb::ReplaceProgress {
                        bytes_done: done,
                        bytes_total: total,
                    },
                )),
            },
            move |progress| async move {
                let replaced = store
                    .replace_device(&r.old, Path::new(&r.new_path), options, progress)
                    .await;
                let what = format!("device {} -> {}", r.old, r.new_path);
                let outcome = replaced
                    .as_ref()
                    .map(|r| r.bytes_rebuilt)
                    .map_err(|e| e.to_status());
                if let Err(status) = service.audit(
                    &caller,
                    "replace_device",
                    Some(&what),
                    outcome.as_ref().copied(),
                ) {
                    return Err(Status::unavailable(status.message().to_owned()));
                }
                let rep = replaced.map_err(|e| e.to_status())?;
                Ok(pb::ReplaceDeviceEvent {
                    event: Some(pb::replace_device_event::Event::Report(pb::ReplaceReport {
                        units_rebuilt: rep.units_rebuilt,
                        bytes_rebuilt: rep.bytes_rebuilt,
                        units_lost: rep.units_lost,
                        stripe_bytes_lost: rep.stripe_bytes_lost,
                        seconds: rep.seconds,
                        resumed: rep.resumed,
                    })),
                })
            },
        )))
    }
}
