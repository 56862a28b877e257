//! Read-ahead hints against a real daemon: loaders that hint get every
//! sample byte for byte, mostly from storaged's read-ahead, which reads
//! neighbours with merged device reads; loaders that do not hint get none;
//! and the Hint RPC refuses bad requests with the right status while
//! treating objects it cannot take as advice.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use storaged_client::{Dataset, LoaderOptions, ObjectInfo, Plan, PlanSpec, PlanTail};
use storaged_proto::pb;
use storaged_tests::{Daemon, daemon_with_dataset, pattern};

/// 600 samples of 1 B to ~60 KiB: small enough that one batch's window of
/// every worker fits storaged's read-ahead cache.
fn samples() -> Vec<(String, Vec<u8>)> {
    (0..600)
        .map(|i| {
            let len = 1 + (i * 7919) % 60_000;
            (format!("train/{i:05}.jpg"), pattern(i as u64, len))
        })
        .collect()
}

async fn dataset() -> (
    tempfile::TempDir,
    Daemon,
    Dataset,
    Arc<BTreeMap<String, Vec<u8>>>,
) {
    daemon_with_dataset("imagenet", samples()).await
}

/// One epoch through 2 workers of one rank; checks every byte and
/// that each sample came exactly once. Returns the hinted objects storaged
/// accepted.
async fn epoch(ds: &Dataset, expected: &Arc<BTreeMap<String, Vec<u8>>>, hints: bool) -> u64 {
    let listing: Arc<[ObjectInfo]> = ds.list("").await.unwrap().into();
    let mut tasks = Vec::new();
    for worker in 0..2 {
        let spec = PlanSpec {
            seed: 7,
            epoch: 0,
            rank: 0,
            world_size: 1,
            worker,
            num_workers: 2,
            shuffle: true,
            block_size: 32,
            tail: PlanTail::Pad,
        };
        let plan = Plan::new(listing.clone(), spec, None).unwrap();
        let options = LoaderOptions {
            hints,
            ..LoaderOptions::default()
        };
        let mut loader = ds.loader_with(plan, 32, 1 << 20, options).unwrap();
        let expected = Arc::clone(expected);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(batch) = loader.next().await {
                for s in batch.unwrap().samples {
                    assert_eq!(&s.data[..], &expected[&s.path][..], "{}", s.path);
                    seen.push(s.path);
                }
            }
            (seen, loader.stats())
        }));
    }
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut accepted = 0;
    for t in tasks {
        let (seen, stats) = t.await.unwrap();
        assert_eq!(stats.hints_failed, 0, "{stats:?}");
        assert_eq!(stats.hints_sent > 0, hints, "{stats:?}");
        accepted += stats.hint_objects_accepted;
        for p in seen {
            *counts.entry(p).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), expected.len(), "every sample");
    assert!(counts.values().all(|&c| c == 1), "each sample once");
    accepted
}

// Guards the hints end to end, over gRPC and on the shm path: with hints,
// samples come from read-ahead (merged device reads) and are
// byte-identical, the shm path copying exactly what read-ahead served into
// its regions; without, read-ahead serves nothing and the shm path copies
// nothing. The epoch without hints runs first: read-ahead left from a
// hinted epoch (kept up to hint_ttl_ms) would serve the next epoch's
// reads, which once made this test fail for the wrong reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hinted_epochs_are_served_from_read_ahead_byte_for_byte() {
    for local in [false, true] {
        let (_tmp, daemon, tcp, expected) = dataset().await;
        let ds = if local {
            daemon.local_client().await.dataset("imagenet").unwrap()
        } else {
            tcp
        };
        let client = daemon.client().await;

        let before = client.status().await.unwrap();
        let accepted = epoch(&ds, &expected, false).await;
        assert_eq!(accepted, 0);
        let plain = client.status().await.unwrap();
        assert_eq!(
            plain.read_ahead().hinted_objects,
            before.read_ahead().hinted_objects,
            "no hints sent"
        );
        assert_eq!(
            plain.read_ahead().hits,
            before.read_ahead().hits,
            "no read-ahead served"
        );
        assert_eq!(
            plain.reads().shm_payload_bytes_copied,
            before.reads().shm_payload_bytes_copied,
            "without hints the shm path copies nothing"
        );

        let accepted = epoch(&ds, &expected, true).await;
        assert!(accepted > 0);
        let s = client.status().await.unwrap();
        assert!(s.read_ahead().hinted_objects > 0, "{s:?}");
        let hits = s.read_ahead().hits - plain.read_ahead().hits;
        assert!(
            hits > 100,
            "local={local}: most samples should come from read-ahead: {hits} hits of 600"
        );
        assert_eq!(s.read_ahead().failed, 0);
        let merged = s.reads().device_reads_merged - plain.reads().device_reads_merged;
        assert!(
            merged > s.read_ahead().objects / 2,
            "neighbours are merged: {merged} merged for {} objects",
            s.read_ahead().objects
        );
        if local {
            assert_eq!(
                s.reads().grpc_bytes_served,
                0,
                "every batch went through regions"
            );
            assert_eq!(
                s.reads().shm_payload_bytes_copied - plain.reads().shm_payload_bytes_copied,
                s.read_ahead().hit_bytes - plain.read_ahead().hit_bytes
            );
        }
    }
}

// Guards the Hint RPC's contract: bad requests get the right status; objects
// that are missing are advice, not errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_requests_are_checked() {
    let (_tmp, daemon, ds, _) = dataset().await;
    let client = daemon.client().await;
    let mut rpc = client.raw();
    let hint = |dataset: &str, paths: Vec<String>| pb::HintRequest {
        dataset: dataset.into(),
        paths,
    };

    let e = rpc
        .hint(hint("nope", vec!["train/00001.jpg".into()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = rpc.hint(hint("bad name!", vec![])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = rpc
        .hint(hint("imagenet", vec!["../etc/passwd".into()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(".."), "{e:?}");
    let e = rpc
        .hint(hint("imagenet", vec!["train/00001.jpg".into(); 4097]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("4096"), "{e:?}");

    // Missing objects are skipped; real ones are taken, once each.
    let r = rpc
        .hint(hint(
            "imagenet",
            vec![
                "train/00001.jpg".into(),
                "train/missing.jpg".into(),
                "train/00001.jpg".into(),
                "train/00002.jpg".into(),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 2, "{r:?}");
    let size = |i: usize| (1 + (i * 7919) % 60_000) as u64;
    assert_eq!(r.accepted_bytes, size(1) + size(2));
    assert!(r.device_reads >= 1 && r.device_reads <= 2, "{r:?}");
    let got = ds.read("train/00002.jpg").await.unwrap();
    assert_eq!(&got[..], &pattern(2, size(2) as usize)[..]);
}
