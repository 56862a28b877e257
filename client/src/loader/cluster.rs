//! The loader over a cluster dataset.
//!
//! The same plans, batches, prefetch bound and retry budget as the loader
//! over one node, and the same [`Loader`] out; only the fetch differs:
//! each batch's samples are read whole through
//! [`ClusterDataset::read_objects_carried`] (one call per node for the
//! chunks it holds, over shm, the bulk channel or gRPC as for one node;
//! parity in place of a node that fails; every object checked against its
//! CRC-32); each batch counts as served by the path that carried most of
//! its bytes. No read-ahead hints (a node would need the chunks' paths).
//! A batch that fails transiently (more nodes down than the parity covers,
//! for a while) is read again within `LoaderOptions::retry_budget`.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesOrdered;

use super::scheduler::Scheduler;
use super::{
    Batch, BatchPlan, Loader, LoaderOptions, Plan, Sample, batch_plans, check_loader_args,
};
use crate::cluster::ClusterDataset;
use crate::retry::{RetryPolicy, Retrying};
use crate::{ClientError, async_stream_bounded};

impl ClusterDataset {
    /// A prefetching loader of `plan` (made from [`listing`](Self::listing))
    /// in batches of `batch_size`, keeping batches of up to
    /// `prefetch_bytes_max` in flight (one always runs); see the module
    /// docs. `options.hints` is ignored (nothing to hint across nodes).
    pub fn loader(
        self: &Arc<Self>,
        plan: Plan,
        batch_size: usize,
        prefetch_bytes_max: u64,
        options: LoaderOptions,
    ) -> Result<Loader, ClientError> {
        check_loader_args(batch_size, prefetch_bytes_max)?;
        let total = plan.len() as u64;
        let batches = batch_plans(&plan, batch_size);
        let dataset = Arc::clone(self);
        let stream = async_stream_bounded(1, move |tx| async move {
            let mut scheduler: Scheduler<()> = Scheduler::new(batches, prefetch_bytes_max, None);
            let mut running = FuturesOrdered::new();
            loop {
                while let Some((batch, _)) = scheduler.start_next() {
                    running.push_back(fetch_retrying(
                        Arc::clone(&dataset),
                        batch,
                        options.retry_budget,
                    ));
                }
                let Some((bytes, result)) = running.next().await else {
                    return;
                };
                scheduler.finished(bytes, None);
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Loader::new(stream, total, Arc::default()))
    }
}

/// Reads one batch, again while it fails transiently and `budget` allows.
/// Gives back the batch's planned bytes with the result.
async fn fetch_retrying(
    dataset: Arc<ClusterDataset>,
    batch: BatchPlan,
    budget: std::time::Duration,
) -> (u64, Result<Batch, ClientError>) {
    let paths: Vec<String> = batch.samples.iter().map(|(_, p, _)| p.clone()).collect();
    let mut retrying = Retrying::new(RetryPolicy::default().with_budget_only(budget));
    let (datas, carried) = loop {
        match dataset.read_objects_carried(&paths).await {
            Ok(read) => break read,
            Err(e) => {
                if let Err(e) = retrying.again(e).await {
                    return (batch.bytes, Err(e));
                }
            }
        }
    };
    let samples = batch
        .samples
        .into_iter()
        .zip(datas)
        .map(|((object_index, path, _), data)| Sample {
            object_index,
            path,
            data,
        })
        .collect();
    (
        batch.bytes,
        Ok(Batch {
            first_position: batch.first_position,
            samples,
            served_by: carried.most(),
        }),
    )
}
