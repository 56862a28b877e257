//! `storagectl epoch`: shuffled epochs of a dataset read the way a
//! training job reads them, with samples/s and the path each batch took.
//! A cluster dataset is read from its nodes directly, each worker keeping
//! a batch of samples in flight.

use super::*;

/// What `storagectl epoch` runs.
pub(crate) struct EpochRun {
    pub(crate) dataset: String,
    pub(crate) workers: u32,
    pub(crate) batch: usize,
    pub(crate) prefetch_bytes: u64,
    pub(crate) seed: u64,
    pub(crate) hints: bool,
}

pub(crate) async fn run_epoch(client: &Client, run: &EpochRun, epoch: u64) -> anyhow::Result<()> {
    let EpochRun {
        ref dataset,
        workers,
        batch,
        prefetch_bytes,
        seed,
        hints,
    } = *run;
    if let Some(cd) =
        storaged_client::cluster::ClusterDataset::open_if_cluster(client, dataset).await?
    {
        return cluster_epoch(std::sync::Arc::new(cd), run, epoch).await;
    }
    let ds = client.dataset(dataset)?;
    let listing: std::sync::Arc<[ObjectInfo]> = ds.list("").await?.into();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers.max(1) {
        let spec = PlanSpec {
            seed,
            epoch,
            worker,
            num_workers: workers.max(1),
            ..PlanSpec::default()
        };
        let plan = Plan::new(listing.clone(), spec, None)?;
        let options = LoaderOptions {
            hints,
            ..LoaderOptions::default()
        };
        let mut loader = ds.loader_with(plan, batch, prefetch_bytes, options)?;
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut bytes) = (0u64, 0u64);
            while let Some(b) = loader.next().await {
                for s in b?.samples {
                    samples += 1;
                    bytes += s.data.len() as u64;
                }
            }
            Ok::<_, anyhow::Error>((samples, bytes, loader.stats()))
        }));
    }
    let (mut samples, mut bytes, mut hinted) = (0, 0, 0);
    let (mut shm, mut bulk, mut grpc) = (0, 0, 0);
    for t in tasks {
        let (n, b, stats) = t.await??;
        samples += n;
        bytes += b;
        shm += stats.shm_batches;
        bulk += stats.bulk_batches;
        grpc += stats.grpc_batches;
        hinted += stats.hint_objects_accepted;
    }
    let secs = started.elapsed().as_secs_f64();
    outln!(
        "epoch {epoch}: {samples} samples, {} in {secs:.2} s: {:.0} samples/s, {}/s; batches via shm {shm}, via bulk {bulk}, via grpc {grpc}; samples read ahead on hint {hinted}",
        human(bytes),
        samples as f64 / secs,
        human((bytes as f64 / secs) as u64)
    );
    Ok(())
}

/// An epoch of a cluster dataset: the manifest shuffled by (seed, epoch),
/// dealt round-robin to the workers, each reading `batch` samples at once
/// from the nodes that hold them.
async fn cluster_epoch(
    cd: std::sync::Arc<storaged_client::cluster::ClusterDataset>,
    run: &EpochRun,
    epoch: u64,
) -> anyhow::Result<()> {
    let mut order: Vec<(u32, String)> = cd
        .objects()
        .iter()
        .map(|o| {
            let key = crc32fast::hash(format!("{}:{epoch}:{}", run.seed, o.path).as_bytes());
            (key, o.path.clone())
        })
        .collect();
    order.sort_unstable();
    let workers = run.workers.max(1) as usize;
    let batch = run.batch.max(1);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let mine: Vec<String> = order
            .iter()
            .skip(worker)
            .step_by(workers)
            .map(|(_, p)| p.clone())
            .collect();
        let cd = std::sync::Arc::clone(&cd);
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut bytes) = (0u64, 0u64);
            for group in mine.chunks(batch) {
                let read = futures::future::join_all(group.iter().map(|p| cd.read(p))).await;
                for r in read {
                    bytes += r?.len() as u64;
                    samples += 1;
                }
            }
            Ok::<_, anyhow::Error>((samples, bytes))
        }));
    }
    let (mut samples, mut bytes) = (0, 0);
    for t in tasks {
        let (n, b) = t.await??;
        samples += n;
        bytes += b;
    }
    let secs = started.elapsed().as_secs_f64();
    outln!(
        "epoch {epoch}: {samples} samples, {} in {secs:.2} s: {:.0} samples/s, {}/s; cluster dataset over {} nodes, {} reads rebuilt from parity",
        human(bytes),
        samples as f64 / secs,
        human((bytes as f64 / secs) as u64),
        cd.info().nodes.len(),
        cd.degraded_reads()
    );
    Ok(())
}
