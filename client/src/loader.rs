//! Plans resolved to objects, and the prefetching loader that reads them.
//!
//! A [`Plan`] is one (rank, worker)'s sequence from [`crate::plan`] applied
//! to the dataset's listing. The listing is shared (`Arc`) so the workers of
//! one process list the dataset once.
//!
//! The [`Loader`] cuts the plan into batches and keeps several `ReadBatch`
//! calls running ahead of the consumer, as many as fit in
//! `prefetch_bytes_max` (object sizes are known from the listing; one batch
//! always runs, however large). Each call asks for its items in completion
//! order, so no sample waits behind a slow one on the server, and the loader
//! puts them back in plan order; batches are yielded strictly in plan order.
//! Memory is bounded by `prefetch_bytes_max` plus one batch waiting to be
//! taken by the consumer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use tonic::Status;

use crate::plan::{PlanError, PlanSpec, PlanState, worker_sequence};
use crate::{BatchItem, ClientError, Dataset, ObjectInfo, async_stream_bounded};

/// Largest batch a loader accepts: one `ReadBatch` call per batch.
pub const LOADER_BATCH_ITEMS_MAX: usize = 16_384;

/// Items each `ReadBatch` call of the loader keeps in flight on the server.
pub const LOADER_CALL_IN_FLIGHT_MAX: u32 = 256;

/// One (rank, worker)'s read order for an epoch, resolved to objects.
#[derive(Debug, Clone)]
pub struct Plan {
    spec: PlanSpec,
    objects: Arc<[ObjectInfo]>,
    indices: Vec<u64>,
}

impl Plan {
    /// Applies `spec` (and `resume`) to a listing of the dataset, which must
    /// be in listing order (as [`Dataset::list`] returns it).
    pub fn new(
        objects: Arc<[ObjectInfo]>,
        spec: PlanSpec,
        resume: Option<&PlanState>,
    ) -> Result<Self, PlanError> {
        let indices = worker_sequence(objects.len() as u64, &spec, resume)?;
        Ok(Self {
            spec,
            objects,
            indices,
        })
    }

    pub fn spec(&self) -> &PlanSpec {
        &self.spec
    }

    /// Samples in this worker's sequence.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Object indices (positions in the listing), in read order.
    pub fn indices(&self) -> &[u64] {
        &self.indices
    }

    /// The objects in read order.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectInfo> + '_ {
        self.indices.iter().map(|&i| &self.objects[i as usize])
    }

    /// The dataset's listing this plan indexes into.
    pub fn listing(&self) -> &Arc<[ObjectInfo]> {
        &self.objects
    }
}

/// One sample: exactly the object's bytes.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Position in the dataset's listing.
    pub object_index: u64,
    pub path: String,
    pub data: Bytes,
}

/// Consecutive samples of a plan.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position of the first sample in the plan (after any resume).
    pub first_position: u64,
    pub samples: Vec<Sample>,
}

/// A stream of [`Batch`]es in plan order; see the module documentation.
pub struct Loader {
    batches: Pin<Box<dyn Stream<Item = Result<Batch, ClientError>> + Send>>,
    consumed: Arc<AtomicU64>,
    total: u64,
}

impl Loader {
    /// Samples handed to the consumer so far: this worker's entry in the
    /// `positions` of a [`PlanState`] checkpoint.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }

    /// Samples in the plan.
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl Stream for Loader {
    type Item = Result<Batch, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.batches.poll_next_unpin(cx);
        if let Poll::Ready(Some(Ok(batch))) = &next {
            self.consumed
                .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
        }
        next
    }
}

/// What one batch call needs: its samples and their bytes in all.
struct BatchPlan {
    first_position: u64,
    samples: Vec<(u64, String)>,
    bytes: u64,
}

impl Dataset {
    /// Lists the dataset and returns this (rank, worker)'s plan.
    pub async fn plan(&self, spec: PlanSpec) -> Result<Plan, ClientError> {
        self.plan_resumed(spec, None).await
    }

    /// Like [`plan`](Self::plan), continuing after what `resume` consumed.
    pub async fn plan_resumed(
        &self,
        spec: PlanSpec,
        resume: Option<&PlanState>,
    ) -> Result<Plan, ClientError> {
        let objects: Arc<[ObjectInfo]> = self.list("").await?.into();
        Ok(Plan::new(objects, spec, resume)?)
    }

    /// Reads `plan` in batches of `batch_size` samples (the last may be
    /// shorter), keeping up to `prefetch_bytes_max` of reads ahead of the
    /// consumer.
    pub fn loader(
        &self,
        plan: Plan,
        batch_size: usize,
        prefetch_bytes_max: u64,
    ) -> Result<Loader, ClientError> {
        if batch_size == 0 || batch_size > LOADER_BATCH_ITEMS_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "batch_size {batch_size} must be 1 to {LOADER_BATCH_ITEMS_MAX}"
            )));
        }
        if prefetch_bytes_max == 0 {
            return Err(ClientError::InvalidArgument(
                "prefetch_bytes_max must be at least 1 byte".into(),
            ));
        }
        let total = plan.len() as u64;
        let batches: Vec<BatchPlan> = plan
            .indices
            .chunks(batch_size)
            .enumerate()
            .map(|(b, chunk)| {
                let samples: Vec<(u64, String)> = chunk
                    .iter()
                    .map(|&i| (i, plan.objects[i as usize].path.clone()))
                    .collect();
                let bytes = chunk.iter().map(|&i| plan.objects[i as usize].size).sum();
                BatchPlan {
                    first_position: (b * batch_size) as u64,
                    samples,
                    bytes,
                }
            })
            .collect();
        let dataset = self.clone();
        let stream = async_stream_bounded(1, move |tx| async move {
            let mut pending = batches.into_iter().peekable();
            let mut running = FuturesOrdered::new();
            let mut running_bytes = 0u64;
            loop {
                while let Some(next) = pending.peek() {
                    let fits = running_bytes.saturating_add(next.bytes) <= prefetch_bytes_max;
                    if !running.is_empty() && !fits {
                        break;
                    }
                    let batch = pending.next().expect("peeked");
                    running_bytes += batch.bytes;
                    running.push_back(fetch(dataset.clone(), batch));
                }
                let Some((bytes, result)) = running.next().await else {
                    return;
                };
                running_bytes -= bytes;
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Loader {
            batches: Box::pin(stream),
            consumed: Arc::new(AtomicU64::new(0)),
            total,
        })
    }
}

/// Reads one batch with a completion-order `ReadBatch` and puts the samples
/// back in plan order. Returns the batch's planned bytes with the result.
async fn fetch(dataset: Dataset, batch: BatchPlan) -> (u64, Result<Batch, ClientError>) {
    let items = batch
        .samples
        .iter()
        .map(|(_, path)| BatchItem {
            path: path.clone(),
            offset: 0,
            length: None,
        })
        .collect();
    let in_flight = (batch.samples.len() as u32).min(LOADER_CALL_IN_FLIGHT_MAX);
    let mut data: Vec<Option<Bytes>> = vec![None; batch.samples.len()];
    let mut results = Box::pin(dataset.read_batch_any_order(items, in_flight));
    let outcome: Result<(), ClientError> = async {
        while let Some(result) = results.next().await {
            let result = result?;
            let slot = data.get_mut(result.index as usize).ok_or_else(|| {
                ClientError::Protocol(format!("batch item {} does not exist", result.index))
            })?;
            let (_, path) = &batch.samples[result.index as usize];
            *slot = Some(result.data.map_err(|s| {
                ClientError::Status(Status::new(s.code(), format!("{path}: {}", s.message())))
            })?);
        }
        Ok(())
    }
    .await;
    let result = outcome.and_then(|()| {
        let samples = batch
            .samples
            .into_iter()
            .zip(data)
            .map(|((object_index, path), data)| match data {
                Some(data) => Ok(Sample {
                    object_index,
                    path,
                    data,
                }),
                None => Err(ClientError::Protocol(format!("{path}: no data arrived"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            first_position: batch.first_position,
            samples,
        })
    });
    (batch.bytes, result)
}
