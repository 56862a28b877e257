//! The `storaged.v1.Storaged` gRPC service: converts wire messages to
//! validated domain types at the edge, calls the store, and maps every
//! `StoreError` to its one status code.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use storaged_proto::model::{RangeSpec, ReadSpec, StorageClass};
use storaged_proto::pb::storaged_server::Storaged;
use storaged_proto::pb::{self, ingest_request};
use storaged_proto::{DatasetName, ObjectPath};
use tonic::{Request, Response, Status, Streaming};

use crate::error::StoreError;
use crate::region::{RegionError, Regions};
use crate::store::read_into::ReadIntoItem;
use crate::store::{BatchEvent, DatasetHandle, Store, StoreStatus};

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
}

impl StoragedService {
    pub fn new(
        store: Arc<Store>,
        regions: Arc<Regions>,
        stopping: tokio::sync::watch::Receiver<bool>,
        unix_socket: Option<&Path>,
    ) -> Self {
        Self {
            store,
            regions,
            stopping,
            unix_socket: unix_socket
                .and_then(|p| std::path::absolute(p).ok())
                .map(|p| p.to_string_lossy().into()),
        }
    }

    fn status(&self) -> pb::StatusResponse {
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
        s.regions_fixed = self.regions.fixed_count() as u32;
        let (regions, region_bytes) = self.regions.usage();
        s.regions_registered = regions as u32;
        s.region_bytes_registered = region_bytes;
        s
    }

    fn count_grpc_bytes(&self, n: usize) {
        self.store
            .read_counters
            .grpc_bytes_served
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The credentials of a caller on the Unix socket; regions are for them
/// only.
fn peer_cred<T>(request: &Request<T>) -> Result<tokio::net::unix::UCred, RegionError> {
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or(RegionError::NotLocal)
}

/// The uid of a caller on the Unix socket.
fn peer_uid<T>(request: &Request<T>) -> Result<u32, RegionError> {
    peer_cred(request).map(|c| c.uid())
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn dataset_info(store: &Store, h: &DatasetHandle) -> pb::DatasetInfo {
    let (class, ec_data_units, ec_parity_units) = h.record.class.to_wire();
    pb::DatasetInfo {
        name: h.name.clone(),
        object_count: h.record.object_count,
        total_bytes: h.record.total_bytes,
        storage_class: class as i32,
        created_unix_ms: h.record.created_unix_ms,
        allocated_bytes: h.record.allocated_bytes,
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

fn status_response(store: &Store, s: StoreStatus) -> pb::StatusResponse {
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
            })
            .collect(),
        datasets: s.datasets.iter().map(|h| dataset_info(store, h)).collect(),
        ingests_in_progress: s.ingests_in_progress as u32,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        checksum_block_bytes: crate::device::CHECKSUM_BLOCK_BYTES,
        ..Default::default()
    }
}

/// Polls `stream` on its own task, so that finished device reads are
/// replaced by new ones while the HTTP/2 sender waits for the socket or for
/// flow-control capacity (it does not poll the response body meanwhile).
/// At most `depth` finished messages wait in the channel; dropping the
/// returned stream (the client went away) stops the task, which drops
/// `stream` and with it the reads in flight.
fn drive_ahead<T: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
    depth: usize,
) -> impl Stream<Item = T> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                () = tx.closed() => return,
            };
            let Some(item) = item else { return };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Runs `work` on a task of its own, so it finishes even if the client goes
/// away, and streams its progress (at most every 200 ms, dropped when
/// nobody listens) and then its final event or error.
fn with_progress<E, Fut>(
    progress_event: impl Fn(u64, u64) -> E + Send + 'static,
    work: impl FnOnce(Box<dyn FnMut(u64, u64) + Send>) -> Fut + Send + 'static,
) -> BoxStream<E>
where
    E: Send + 'static,
    Fut: std::future::Future<Output = Result<E, StoreError>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let ptx = tx.clone();
    let mut last = std::time::Instant::now();
    let progress = Box::new(move |done, total| {
        if last.elapsed() >= std::time::Duration::from_millis(200) {
            last = std::time::Instant::now();
            let _ = ptx.try_send(Ok(progress_event(done, total)));
        }
    });
    tokio::spawn(async move {
        let end = work(progress).await.map_err(Status::from);
        let _ = tx.send(end).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Storaged for StoragedService {
    #[tracing::instrument(skip_all)]
    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let mut stream = request.into_inner();
        let begin = match stream.message().await? {
            Some(pb::IngestRequest {
                msg: Some(ingest_request::Msg::Begin(b)),
            }) => b,
            Some(_) => return Err(invalid("the first ingest message must be `begin`")),
            None => return Err(invalid("empty ingest stream")),
        };
        let name = DatasetName::new(begin.dataset).map_err(invalid)?;
        let class = StorageClass::from_wire(
            begin.storage_class,
            begin.ec_data_units,
            begin.ec_parity_units,
        )
        .map_err(invalid)?
        .unwrap_or_else(|| self.store.default_class());
        let mut session = self.store.begin_ingest(name, class)?;
        tracing::info!(dataset = %session.dataset(), "ingest started");
        loop {
            // A client that goes away surfaces here as an error; returning
            // drops the session, which discards the ingest.
            let msg = match stream.message().await {
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
                    return Ok(Response::new(pb::IngestResponse {
                        dataset: Some(dataset_info(&self.store, &handle)),
                    }));
                }
                Some(ingest_request::Msg::Begin(_)) => {
                    return Err(invalid("`begin` sent twice in one ingest"));
                }
                None => return Err(invalid("empty ingest message")),
            }
        }
    }

    async fn list_datasets(
        &self,
        _request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let datasets = self
            .store
            .list_datasets()
            .iter()
            .map(|h| dataset_info(&self.store, h))
            .collect();
        Ok(Response::new(pb::ListDatasetsResponse { datasets }))
    }

    async fn list_objects(
        &self,
        request: Request<pb::ListObjectsRequest>,
    ) -> Result<Response<pb::ListObjectsResponse>, Status> {
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
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
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        let path = ObjectPath::new(r.path).map_err(invalid)?;
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
        let spec = ReadSpec::try_from(request.get_ref()).map_err(invalid)?;
        let obj = self.store.lookup(&spec.dataset, &spec.range.path)?;
        let (start, len) = Store::resolve_range(&obj, spec.range.offset, spec.range.length)?;
        let object_size = obj.record.size;
        let service = self.clone();
        let stream = self
            .store
            .read_stream(Arc::new(obj), start, len)
            .map(move |r| match r {
                Ok((offset, data)) => {
                    service.count_grpc_bytes(data.len());
                    Ok(pb::ReadResponse {
                        offset,
                        data,
                        object_size,
                        range_length: len,
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "read failed");
                    Err(Status::from(e))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    type ReadBatchStream = BoxStream<pb::ReadBatchResponse>;

    async fn read_batch(
        &self,
        request: Request<pb::ReadBatchRequest>,
    ) -> Result<Response<Self::ReadBatchStream>, Status> {
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        let items = r
            .items
            .iter()
            .map(|i| RangeSpec::try_from(i).map_err(StoreError::from))
            .collect();
        let in_flight = match r.max_in_flight {
            0 => self.store.limits().batch_in_flight_default,
            n => n,
        };
        let events: std::pin::Pin<Box<dyn Stream<Item = BatchEvent> + Send>> = if r.any_order {
            Box::pin(self.store.read_batch_any_order(&name, items, in_flight)?)
        } else {
            Box::pin(self.store.read_batch(&name, items, in_flight)?)
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
                } => {
                    service.count_grpc_bytes(data.len());
                    pb::ReadBatchResponse {
                        index,
                        offset,
                        data,
                        last,
                        error: None,
                        item_length,
                    }
                }
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
        Ok(Response::new(Box::pin(drive_ahead(
            stream,
            in_flight as usize,
        ))))
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        let name = DatasetName::new(request.into_inner().dataset).map_err(invalid)?;
        let freed_bytes = self.store.delete(&name).await?;
        tracing::info!(dataset = %name, freed_bytes, "dataset deleted");
        Ok(Response::new(pb::DeleteDatasetResponse { freed_bytes }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    type RegisterRegionStream = BoxStream<pb::RegionEvent>;

    async fn register_region(
        &self,
        request: Request<pb::RegisterRegionRequest>,
    ) -> Result<Response<Self::RegisterRegionStream>, Status> {
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
        let registration = self
            .regions
            .register(pid, memfd, r.size_bytes, cred.uid())?;
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
        let uid = peer_uid(&request)?;
        let r = request.into_inner();
        let region = self.regions.get(r.region_id, uid)?;
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
        let items = r
            .items
            .into_iter()
            .map(|i| {
                let range = RangeSpec::try_from(&pb::ReadItem {
                    path: i.path,
                    offset: i.offset,
                    length: i.length,
                })
                .map_err(StoreError::from)?;
                Ok(ReadIntoItem {
                    range,
                    region_offset: i.region_offset,
                })
            })
            .collect();
        let in_flight = match r.max_in_flight {
            0 => self.store.limits().batch_in_flight_default,
            n => n,
        };
        let completions =
            self.store
                .read_into(region, &name, items, in_flight)?
                .map(|(index, result)| {
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
        Ok(Response::new(Box::pin(drive_ahead(
            completions,
            in_flight as usize,
        ))))
    }

    async fn hint(
        &self,
        request: Request<pb::HintRequest>,
    ) -> Result<Response<pb::HintResponse>, Status> {
        let r = request.into_inner();
        let name = DatasetName::new(r.dataset).map_err(invalid)?;
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
            return Err(StoreError::Busy("a scrub is already running".into()).into());
        }
        let store = Arc::clone(&self.store);
        // The scrub runs to the end even if the client goes away (a
        // half-done repair pass is worth finishing).
        Ok(Response::new(with_progress(
            |done, total| pb::ScrubEvent {
                event: Some(pb::scrub_event::Event::Progress(pb::ScrubProgress {
                    bytes_done: done,
                    bytes_total: total,
                })),
            },
            move |mut progress| async move {
                let rep = store
                    .scrub(name.as_ref(), rate, move |(done, total)| {
                        progress(done, total)
                    })
                    .await?;
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
        let r = request.into_inner();
        if r.old.is_empty() || r.new_path.is_empty() {
            return Err(invalid("both the old device and the new path are needed"));
        }
        self.store.device_index(&r.old)?;
        let store = Arc::clone(&self.store);
        // The rebuild runs to the end even if the client goes away.
        Ok(Response::new(with_progress(
            |done, total| pb::ReplaceDeviceEvent {
                event: Some(pb::replace_device_event::Event::Progress(
                    pb::ReplaceProgress {
                        bytes_done: done,
                        bytes_total: total,
                    },
                )),
            },
            move |progress| async move {
                let rep = store
                    .replace_device(&r.old, Path::new(&r.new_path), progress)
                    .await?;
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
