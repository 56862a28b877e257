//! Round trip through the real binaries on loopback: ingest a generated tree
//! with `storagectl`, list it, read ranges, export it, and require a
//! byte-identical result.

use futures::StreamExt;
use storaged_client::BatchItem;
use storaged_tests::{Daemon, DaemonOpts, pattern, read_tree, write_tree};

fn tree() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("sizes/1".into(), pattern(1, 1)),
        ("sizes/4095".into(), pattern(2, 4095)),
        ("sizes/4096".into(), pattern(3, 4096)),
        ("sizes/4097".into(), pattern(4, 4097)),
        // 64 KiB stripe unit: this spans about 80 stripes over 4 devices.
        (
            "shards/many-stripes.bin".into(),
            pattern(5, 5 * 1024 * 1024 + 123),
        ),
        (
            "deep/a/b/c/d/e/f/g/h/i/j/k/leaf.txt".into(),
            pattern(6, 777),
        ),
        ("ünïcødé/日本語/файл.jpeg".into(), pattern(7, 12_345)),
        ("train/n01440764/img_001.JPEG".into(), pattern(8, 110_000)),
        ("dir with spaces/and 'quotes'.bin".into(), pattern(9, 3)),
    ];
    for i in 0..150 {
        files.push((
            format!("small/{i:04}.bin"),
            pattern(100 + i, (i as usize * 97) % 9000),
        ));
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_list_read_export_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = tree();
    write_tree(&src, &files);
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());

    let out = d.ctl_ok(&["ingest", "imagenet-mini", src.to_str().unwrap()]);
    assert!(out.contains(&format!("{} objects", files.len())), "{out}");

    let ls = d.ctl_ok(&["ls"]);
    let line = ls
        .lines()
        .find(|l| l.starts_with("imagenet-mini"))
        .expect(&ls);
    assert!(
        line.contains(&files.len().to_string()) && line.contains("ec:3+1"),
        "{line}"
    );

    // Paginated listing returns every object once, in order.
    let objects = d.ctl_ok(&["ls", "imagenet-mini", "--page-size", "7"]);
    let mut lines = objects.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["SIZE", "CRC32", "PATH"]);
    let listed: Vec<&str> = lines.map(|l| l.split("  ").last().unwrap()).collect();
    let mut expected: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    let sizes = d.ctl_ok(&["ls", "imagenet-mini", "--prefix", "sizes/"]);
    assert_eq!(
        sizes.lines().count(),
        1 + 4,
        "header and 4 objects: {sizes}"
    );
    assert_eq!(
        d.ctl_ok(&["ls", "imagenet-mini", "--limit", "3"])
            .lines()
            .count(),
        1 + 3
    );

    // cat writes raw bytes.
    let out = d.ctl(&["cat", "imagenet-mini", "train/n01440764/img_001.JPEG"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, pattern(8, 110_000));
    let out = d.ctl(&[
        "cat",
        "imagenet-mini",
        "sizes/4097",
        "--offset",
        "4000",
        "--length",
        "97",
    ]);
    assert_eq!(out.stdout, &pattern(4, 4097)[4000..]);

    // Export and compare every byte, empty files included.
    let restored = tmp.path().join("restored");
    d.ctl_ok(&["export", "imagenet-mini", restored.to_str().unwrap()]);
    assert_eq!(read_tree(&restored), read_tree(&src));

    // Library reads that cross stripe-unit and checksum-block boundaries.
    let client = d.client().await;
    let ds = client.dataset("imagenet-mini").unwrap();
    let shard = pattern(5, 5 * 1024 * 1024 + 123);
    for (off, len) in [
        (65_536 - 10, 100u64),
        (32_767, 70_000),
        (1 << 20, 3 << 20),
        (shard.len() as u64 - 1, 1),
    ] {
        let got = ds
            .read_range("shards/many-stripes.bin", off, len)
            .await
            .unwrap();
        assert_eq!(
            &got[..],
            &shard[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    let st = ds.stat("shards/many-stripes.bin").await.unwrap();
    let devices: std::collections::BTreeSet<u32> =
        st.extents.iter().map(|e| e.device_index).collect();
    assert_eq!(devices.len(), 4, "a large object stripes over every device");
    assert_eq!(
        st.extents.iter().map(|e| e.length).sum::<u64>(),
        shard.len() as u64
    );

    // ReadBatch: request order, per-item errors in-band.
    let items = vec![
        BatchItem {
            path: "sizes/4096".into(),
            offset: 0,
            length: None,
        },
        BatchItem {
            path: "no/such".into(),
            offset: 0,
            length: None,
        },
        BatchItem {
            path: "shards/many-stripes.bin".into(),
            offset: 100,
            length: Some(2 << 20),
        },
        BatchItem {
            path: "../escape".into(),
            offset: 0,
            length: None,
        },
        BatchItem {
            path: "empty".into(),
            offset: 0,
            length: None,
        },
    ];
    let results: Vec<_> = ds.read_batch(items, 4).collect().await;
    assert_eq!(results.len(), 5);
    let r: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(r[0].data.as_ref().unwrap()[..], pattern(3, 4096)[..]);
    assert_eq!(
        r[1].data.as_ref().unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(r[2].data.as_ref().unwrap()[..], shard[100..100 + (2 << 20)]);
    assert_eq!(
        r[3].data.as_ref().unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert!(r[4].data.as_ref().unwrap().is_empty());

    // Any-order ReadBatch: every item once, its own bytes, errors in-band.
    let items: Vec<BatchItem> = (0..150)
        .map(|i| BatchItem {
            path: format!("small/{i:04}.bin"),
            offset: 0,
            length: None,
        })
        .chain([BatchItem {
            path: "nope".into(),
            offset: 0,
            length: None,
        }])
        .collect();
    let results: Vec<_> = ds.read_batch_any_order(items, 16).collect().await;
    assert_eq!(results.len(), 151);
    let mut seen = std::collections::BTreeSet::new();
    for r in results {
        let r = r.unwrap();
        assert!(seen.insert(r.index), "item {} twice", r.index);
        if r.index == 150 {
            assert_eq!(r.data.unwrap_err().code(), tonic::Code::NotFound);
        } else {
            let i = u64::from(r.index);
            assert_eq!(
                r.data.unwrap()[..],
                pattern(100 + i, (i as usize * 97) % 9000)[..]
            );
        }
    }

    // rm frees the space.
    let before = client.status().await.unwrap();
    assert!(before.used_bytes > 0);
    d.ctl_ok(&["rm", "imagenet-mini"]);
    let after = client.status().await.unwrap();
    assert_eq!(after.used_bytes, 0);
    assert!(after.datasets.is_empty());
    assert_eq!(
        d.ctl(&["cat", "imagenet-mini", "empty"]).status.code(),
        Some(1)
    );
}
