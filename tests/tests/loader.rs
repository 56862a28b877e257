//! Shuffle plans and the prefetching loader against a real daemon: ranks
//! and workers together read every sample exactly once per epoch, byte for
//! byte, in plan order; checkpoints resume exactly, also with another
//! worker count.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use storaged_client::{
    ClientError, Dataset, LoaderOptions, ObjectInfo, Plan, PlanSpec, PlanState, PlanTail, ReadPath,
};
use storaged_tests::{Daemon, DaemonOpts, daemon_with_dataset, pattern, write_tree};

const SAMPLES: usize = 300;

fn samples() -> Vec<(String, Vec<u8>)> {
    (0..SAMPLES)
        .map(|i| {
            // Sizes from 1 byte to ~200 KiB, crossing 4 KiB and checksum
            // block boundaries.
            let len = 1 + (i * 7919) % 200_000;
            (format!("train/{i:05}.jpg"), pattern(i as u64, len))
        })
        .collect()
}

/// A daemon holding the `imagenet` dataset of [`samples`], and the bytes
/// each path must read back as.
async fn imagenet() -> (
    tempfile::TempDir,
    Daemon,
    Dataset,
    Arc<BTreeMap<String, Vec<u8>>>,
) {
    daemon_with_dataset("imagenet", samples()).await
}

/// Runs one loader to the end; returns (object_index, path) in yield order
/// after checking every sample's bytes.
async fn drain(
    ds: &Dataset,
    plan: Plan,
    expected: &BTreeMap<String, Vec<u8>>,
    stop_after_batches: Option<usize>,
) -> (Vec<(u64, String)>, u64) {
    let planned: Vec<u64> = plan.indices().to_vec();
    let mut loader = ds.loader(plan, 16, 1 << 20).unwrap();
    let mut seen = Vec::new();
    let mut batches = 0;
    while let Some(batch) = loader.next().await {
        let batch = batch.unwrap();
        assert_eq!(batch.first_position as usize, seen.len());
        // Same host (Unix socket): the zero-copy path serves every batch
        // here (samples are dropped as they are checked); over TCP the TCP
        // bulk channel does.
        let want = if ds.client().is_local() {
            ReadPath::Shm
        } else {
            ReadPath::Bulk
        };
        assert_eq!(batch.served_by, want);
        for s in batch.samples {
            assert_eq!(&s.data[..], &expected[&s.path][..], "{}", s.path);
            seen.push((s.object_index, s.path));
        }
        batches += 1;
        if Some(batches) == stop_after_batches {
            break;
        }
    }
    let order: Vec<u64> = seen.iter().map(|(i, _)| *i).collect();
    assert_eq!(order[..], planned[..order.len()], "plan order");
    let stats = loader.stats();
    assert_eq!(
        stats.grpc_batches + stats.shm_batches + stats.bulk_batches,
        batches as u64,
        "{stats:?}"
    );
    (seen, loader.consumed())
}

fn spec(epoch: u64, rank: u32, worker: u32, num_workers: u32) -> PlanSpec {
    PlanSpec {
        seed: 1234,
        epoch,
        rank,
        world_size: 2,
        worker,
        num_workers,
        shuffle: true,
        block_size: 8,
        tail: PlanTail::Pad,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_two_workers_cover_each_epoch_exactly_once() {
    let (_tmp, daemon, tcp, expected) = imagenet().await;
    let local = daemon.local_client().await.dataset("imagenet").unwrap();
    let listing: Arc<[ObjectInfo]> = tcp.list("").await.unwrap().into();

    let mut epoch_orders = Vec::new();
    // Epoch 0 over TCP (gRPC), epoch 1 on the same host (shared memory).
    for (epoch, ds) in [(0, &tcp), (1, &local)] {
        let mut tasks = Vec::new();
        for rank in 0..2 {
            for worker in 0..2 {
                let plan = Plan::new(listing.clone(), spec(epoch, rank, worker, 2), None).unwrap();
                let (ds, expected) = (ds.clone(), expected.clone());
                tasks.push(tokio::spawn(async move {
                    drain(&ds, plan, &expected, None).await.0
                }));
            }
        }
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        let mut order = Vec::new();
        let mut rank_lengths = [0usize; 2];
        for (i, t) in tasks.into_iter().enumerate() {
            let seen = t.await.unwrap();
            rank_lengths[i / 2] += seen.len();
            for (_, path) in seen {
                *counts.entry(path.clone()).or_default() += 1;
                order.push(path);
            }
        }
        assert_eq!(
            rank_lengths,
            [SAMPLES / 2, SAMPLES / 2],
            "equal rank lengths"
        );
        assert_eq!(counts.len(), SAMPLES, "every sample read");
        assert!(counts.values().all(|&c| c == 1), "each sample once");
        epoch_orders.push(order);
    }
    assert_ne!(epoch_orders[0], epoch_orders[1], "epochs reshuffle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_resumes_exactly_with_another_worker_count() {
    let (_tmp, _daemon, ds, expected) = imagenet().await;

    // Rank 1 of 2, three workers stop after 1, 2 and 3 batches.
    let mut read = Vec::new();
    let mut positions = Vec::new();
    for worker in 0..3 {
        let plan = ds.plan(spec(5, 1, worker, 3)).await.unwrap();
        let (seen, consumed) = drain(&ds, plan, &expected, Some(worker as usize + 1)).await;
        assert_eq!(consumed as usize, seen.len());
        positions.push(consumed);
        read.extend(seen.into_iter().map(|(_, p)| p));
    }
    let checkpoint = PlanState {
        epoch: 5,
        num_workers: 3,
        positions,
        resumed_from: None,
    };
    // The checkpoint travels as JSON, and the job restarts with 2 workers.
    let json = serde_json::to_string(&checkpoint).unwrap();
    let resumed = serde_json::from_str::<PlanState>(&json)
        .unwrap()
        .resume_with(2);
    for worker in 0..2 {
        let plan = ds
            .plan_resumed(spec(5, 1, worker, 2), Some(&resumed))
            .await
            .unwrap();
        read.extend(
            drain(&ds, plan, &expected, None)
                .await
                .0
                .into_iter()
                .map(|(_, p)| p),
        );
    }
    let whole_rank = ds.plan(spec(5, 1, 0, 1)).await.unwrap();
    let mut want: Vec<String> = whole_rank.objects().map(|o| o.path.clone()).collect();
    want.sort();
    read.sort();
    assert_eq!(read, want, "consumed + resumed = the rank's epoch, exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_loader_arguments_and_missing_samples_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(
        &src,
        &[("a".into(), b"x".to_vec()), ("b".into(), b"y".to_vec())],
    );
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "small", src.to_str().unwrap()]);
    let client = d.client().await;
    let ds = client.dataset("small").unwrap();
    let plan = ds.plan(PlanSpec::default()).await.unwrap();
    assert!(matches!(
        ds.loader(plan.clone(), 0, 1 << 20),
        Err(ClientError::InvalidArgument(m)) if m.contains("batch_size")
    ));
    assert!(matches!(
        ds.loader(plan.clone(), 4, 0),
        Err(ClientError::InvalidArgument(m)) if m.contains("prefetch_bytes_max")
    ));
    let err = ds
        .plan(PlanSpec {
            rank: 3,
            world_size: 2,
            ..PlanSpec::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rank 3"), "{err}");

    // The dataset disappears under a planned loader: the error names the
    // sample and says NOT_FOUND.
    d.ctl_ok(&["rm", "small"]);
    let mut loader = ds.loader(plan, 4, 1 << 20).unwrap();
    let err = loader.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(
        loader.next().await.is_none(),
        "the loader stops after an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_keeps_every_sample_still_gets_every_batch() {
    // Guards against a shm loader that waits forever for regions its
    // consumer never gives back: it falls back to gRPC instead, and the
    // kept samples stay intact (their regions are not reused).
    let (_tmp, daemon, _tcp, expected) = imagenet().await;
    let ds = daemon.local_client().await.dataset("imagenet").unwrap();
    let plan = ds.plan(spec(0, 0, 0, 1)).await.unwrap();
    let total = plan.len();
    // Without read-ahead hints, whose hits storaged copies into regions:
    // this also checks the shm path copies nothing then.
    let options = LoaderOptions {
        hints: false,
        ..LoaderOptions::default()
    };
    let mut loader = ds.loader_with(plan, 16, 1, options).unwrap();
    let mut kept = Vec::new();
    while let Some(batch) = loader.next().await {
        kept.push(batch.unwrap());
    }
    let stats = loader.stats();
    assert!(
        stats.shm_batches >= 1 && stats.grpc_batches >= 1,
        "{stats:?}"
    );
    let samples: Vec<_> = kept.iter().flat_map(|b| &b.samples).collect();
    assert_eq!(samples.len(), total);
    for s in samples {
        assert_eq!(&s.data[..], &expected[&s.path][..], "{}", s.path);
    }
    let status = daemon.client().await.status().await.unwrap();
    assert_eq!(status.reads().shm_payload_bytes_copied, 0);
    assert_eq!(status.reads().shm_bytes_served, stats.shm_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaders_of_one_client_reuse_its_regions() {
    // Guards against registering (and faulting in) fresh shared memory for
    // every epoch: a client's regions go back to it and the next loader
    // takes them.
    let (_tmp, daemon, tcp, expected) = imagenet().await;
    let ds = daemon.local_client().await.dataset("imagenet").unwrap();
    let mut registered = Vec::new();
    for epoch in 0..3 {
        let plan = ds.plan(spec(epoch, 0, 0, 1)).await.unwrap();
        drain(&ds, plan, &expected, None).await;
        registered.push(tcp.client().status().await.unwrap().regions().registered);
    }
    assert!(registered[0] > 0, "{registered:?}");
    assert!(
        registered.windows(2).all(|w| w[0] == w[1]),
        "no new regions after the first epoch: {registered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outlives_a_storaged_restart_on_the_shm_path() {
    // Guards against cached regions the restarted server no longer knows:
    // the next loader registers fresh ones instead of failing.
    let (_tmp, mut daemon, _tcp, expected) = imagenet().await;
    let ds = daemon.local_client().await.dataset("imagenet").unwrap();
    let plan = ds.plan(spec(0, 0, 0, 1)).await.unwrap();
    drain(&ds, plan, &expected, None).await;
    tokio::task::block_in_place(|| daemon.restart());
    let status = daemon.client().await.status().await.unwrap();
    assert_eq!(
        status.regions().registered,
        0,
        "a new server knows no regions"
    );
    let plan = ds.plan(spec(1, 0, 0, 1)).await.unwrap();
    let (seen, _) = drain(&ds, plan, &expected, None).await;
    assert_eq!(seen.len(), SAMPLES / 2, "rank 0 of 2 reads half");
}

/// Reads `ds`'s rank-0 plan of epoch 0 in batches of 16 with `options`,
/// restarting or stopping `daemon` after two batches; returns what the
/// loader yielded: the samples (bytes checked) and the error that ended it,
/// if any.
async fn read_across(
    daemon: &mut Daemon,
    ds: &Dataset,
    expected: &BTreeMap<String, Vec<u8>>,
    options: LoaderOptions,
    restart: bool,
) -> (Vec<u64>, Option<ClientError>) {
    let plan = ds.plan(spec(0, 0, 0, 1)).await.unwrap();
    let planned = plan.indices().to_vec();
    let mut loader = ds.loader_with(plan, 16, 64 << 10, options).unwrap();
    let mut seen = Vec::new();
    while let Some(batch) = loader.next().await {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => return (seen, Some(e)),
        };
        for s in &batch.samples {
            assert_eq!(&s.data[..], &expected[&s.path][..], "{}", s.path);
            seen.push(s.object_index);
        }
        if seen.len() == 32 {
            tokio::task::block_in_place(|| {
                if restart {
                    daemon.restart_same_port();
                } else {
                    daemon.stop();
                }
            });
        }
    }
    assert_eq!(seen, planned[..seen.len()], "plan order kept");
    (seen, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_reads_on_across_a_storaged_restart_mid_epoch() {
    // Guards against an epoch that dies with the server: batches that fail
    // while storaged restarts are read again, on both transports, and the
    // epoch completes exactly once in plan order.
    for local in [true, false] {
        let (_tmp, mut daemon, tcp, expected) = imagenet().await;
        let ds = if local {
            daemon.local_client().await.dataset("imagenet").unwrap()
        } else {
            tcp
        };
        let (seen, err) =
            read_across(&mut daemon, &ds, &expected, LoaderOptions::default(), true).await;
        assert!(err.is_none(), "local={local}: {err:?}");
        assert_eq!(
            seen.len(),
            SAMPLES / 2,
            "local={local}: rank 0 of 2 reads half"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_gives_up_with_unavailable_after_its_retry_budget() {
    // Guards against a loader that retries forever (a hang) when storaged
    // does not come back: the error names UNAVAILABLE and the budget spent.
    let (_tmp, mut daemon, _tcp, expected) = imagenet().await;
    let ds = daemon.local_client().await.dataset("imagenet").unwrap();
    let options = LoaderOptions {
        retry_budget: std::time::Duration::from_millis(800),
        ..LoaderOptions::default()
    };
    let started = std::time::Instant::now();
    let (seen, err) = read_across(&mut daemon, &ds, &expected, options, false).await;
    let err = err.expect("the loader must fail once storaged is gone");
    assert!(seen.len() >= 32 && seen.len() < SAMPLES / 2);
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    assert!(err.to_string().contains("gave up"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_without_regions_to_spare_reads_with_fewer_or_over_grpc() {
    // Guards against a loader that fails (or crawls at depth 1) when the
    // server's per-uid region limit is used up by others: it reads with
    // the regions it gets, or over gRPC at full depth.
    let (_tmp, daemon, _tcp, expected) = imagenet().await;
    let hog = daemon.local_client().await;
    let mut held = Vec::new();
    while let Ok(r) = hog.register_region(4096).await {
        held.push(r);
        assert!(held.len() <= 1024, "the server must limit regions per uid");
    }
    let ds = daemon.local_client().await.dataset("imagenet").unwrap();
    for (spare, want_shm) in [(0, false), (2, true)] {
        held.truncate(held.len() - spare);
        // The server frees a region when its stream ends: wait until it
        // has, instead of hoping the loader starts late enough.
        let left = held.len() as u32;
        let freed = storaged_tests::eventually(std::time::Duration::from_secs(30), async || {
            hog.status()
                .await
                .is_ok_and(|s| s.regions().registered == left)
        })
        .await;
        assert!(freed, "the server frees dropped regions");
        let plan = ds.plan(spec(0, 0, 0, 1)).await.unwrap();
        let mut loader = ds.loader(plan, 16, 64 << 20).unwrap();
        let mut seen = 0;
        while let Some(batch) = loader.next().await {
            for s in batch.unwrap().samples {
                assert_eq!(&s.data[..], &expected[&s.path][..], "{}", s.path);
                seen += 1;
            }
        }
        assert_eq!(seen, SAMPLES / 2);
        let stats = loader.stats();
        assert_eq!(stats.shm_batches > 0, want_shm, "{spare} spare: {stats:?}");
        if !want_shm {
            assert!(stats.grpc_batches > 0, "{spare} spare: {stats:?}");
        }
    }
}
