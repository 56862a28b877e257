//! Clients that walk away mid-read: every pool buffer their reads held must
//! come back, or the daemon would stall for everyone else. The pool here is
//! the 16 MiB minimum, and each abandoned request could pin up to 16 MiB.

use std::time::Duration;

use futures::StreamExt;
use storaged_client::BatchItem;
use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_reads_and_batches_release_their_buffers() {
    // Guards against buffers leaked by a response body dropped mid-stream
    // (zero-copy framing, the batch drive-ahead task, reorder buffers).
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("storaged.toml");
    std::fs::write(&config, "buffer_pool = \"16MiB\"\nread_ahead = \"8MiB\"\n").unwrap();
    let src = tmp.path().join("src");
    let files: Vec<(String, Vec<u8>)> = (0..64)
        .map(|i| {
            (
                format!("s/{i:03}"),
                pattern(i, 256 * 1024 + 77 * i as usize),
            )
        })
        .collect();
    write_tree(&src, &files);
    let opts = DaemonOpts {
        device_size: "128MiB".into(),
        extra: vec!["--config".into(), config.display().to_string()],
        ..DaemonOpts::default()
    };
    let d = Daemon::start(&tmp.path().join("data"), &opts);
    d.ctl_ok(&["ingest", "abandon", src.to_str().unwrap()]);
    let client = d.client().await;
    let ds = client.dataset("abandon").unwrap();
    let items: Vec<BatchItem> = files
        .iter()
        .map(|(p, _)| BatchItem {
            path: p.clone(),
            offset: 0,
            length: None,
        })
        .collect();

    // A leak shows up as a stall, in the rounds or in the final read.
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        for round in 0..12 {
            // Take one message, then drop the stream with reads in flight.
            let mut batch = Box::pin(if round % 2 == 0 {
                ds.read_batch(items.clone(), 64).boxed()
            } else {
                ds.read_batch_any_order(items.clone(), 64).boxed()
            });
            batch.next().await.unwrap().unwrap();
            drop(batch);
            let mut stream = Box::pin(ds.read_stream("s/063", 0, None));
            stream.next().await.unwrap().unwrap();
            drop(stream);
        }
        // Everything must still be readable, byte for byte.
        let mut got = Vec::new();
        let mut batch = Box::pin(ds.read_batch(items.clone(), 16));
        while let Some(r) = batch.next().await {
            got.push(r.unwrap());
        }
        got
    })
    .await
    .expect("reads stalled: abandoned requests kept pool buffers");
    assert_eq!(all.len(), files.len());
    for (r, (path, data)) in all.iter().zip(&files) {
        assert_eq!(r.data.as_ref().unwrap()[..], data[..], "{path}");
    }
}
