//! Bad input gets a clear error with the right code, and never leaves
//! anything behind: client disconnects, bad names, a full pool, foreign and
//! mismatched devices.

use std::time::Duration;

use bytes::Bytes;
use storaged_proto::pb;
use storaged_tests::{Daemon, DaemonOpts, OpenIngest, eventually, ingest_msg, pattern, write_tree};
use tonic::Code;

// Guards against an abandoned upload leaving a visible dataset or
// allocated space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_ingest_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let client = d.client().await;
    {
        // A separate connection, dropped whole: the server sees a reset.
        let other = d.client().await;
        let open = OpenIngest::start(&other).await;
        open.send(vec![
            ingest_msg::begin("gone", 0),
            ingest_msg::object("a", 4 << 20),
            ingest_msg::data(pattern(1, 1 << 20)),
        ])
        .await;
        assert!(
            eventually(Duration::from_secs(20), async || client
                .status()
                .await
                .unwrap()
                .ingests_in_progress
                == 1)
            .await
        );
        open.call.abort();
        drop(other);
    }
    assert!(
        eventually(Duration::from_secs(20), async || {
            let s = client.status().await.unwrap();
            s.ingests_in_progress == 0 && s.used_bytes == 0
        })
        .await,
        "space released after the disconnect"
    );
    assert!(client.list_datasets().await.unwrap().is_empty());

    // A stream that just ends without commit is discarded too.
    let open = OpenIngest::start(&client).await;
    open.send(vec![
        ingest_msg::begin("nocommit", 0),
        ingest_msg::object("a", 3),
        ingest_msg::data(Bytes::from_static(b"abc")),
    ])
    .await;
    let err = open.close().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("commit"), "{}", err.message());
    assert_eq!(client.status().await.unwrap().used_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_invalid_argument() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let src = tmp.path().join("src");
    write_tree(&src, &[("ok".into(), b"x".to_vec())]);
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let mut rpc = d.client().await.raw();
    let long_path = "a/".repeat(2100) + "b";
    for (dataset, path) in [
        ("bad name", "ok"),
        ("", "ok"),
        (&"n".repeat(129)[..], "ok"),
        ("ds/..", "ok"),
        ("ds", "../../etc/passwd"),
        ("ds", "/etc/passwd"),
        ("ds", "a/./b"),
        ("ds", "a\0b"),
        ("ds", ""),
        ("ds", long_path.as_str()),
    ] {
        let r = rpc
            .stat(pb::StatRequest {
                dataset: dataset.into(),
                path: path.into(),
                include_extents: false,
            })
            .await
            .unwrap_err();
        assert_eq!(
            r.code(),
            Code::InvalidArgument,
            "{dataset:?} {path:?}: {}",
            r.message()
        );
        assert!(!r.message().is_empty());
    }
    let r = rpc
        .stat(pb::StatRequest {
            dataset: "nope".into(),
            path: "ok".into(),
            include_extents: false,
        })
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::NotFound);
    let r = rpc
        .stat(pb::StatRequest {
            dataset: "ds".into(),
            path: "nope".into(),
            include_extents: false,
        })
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::NotFound);
    let r = rpc
        .delete_dataset(pb::DeleteDatasetRequest {
            dataset: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::NotFound);
    let r = rpc
        .list_objects(pb::ListObjectsRequest {
            dataset: "ds".into(),
            page_size: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::InvalidArgument);

    // An ingest whose object path escapes is refused and leaves nothing.
    let client = d.client().await;
    let open = OpenIngest::start(&client).await;
    open.send(vec![
        ingest_msg::begin("evil", 0),
        ingest_msg::object("../../x", 1),
    ])
    .await;
    let r = open.close().await.unwrap_err();
    assert_eq!(r.code(), Code::InvalidArgument);
    // An unknown storage class is refused.
    let open = OpenIngest::start(&client).await;
    open.send(vec![ingest_msg::begin("ec", 42)]).await;
    let r = open.close().await.unwrap_err();
    assert_eq!(r.code(), Code::InvalidArgument);
    // Reads past the end are OUT_OF_RANGE.
    let e = client
        .dataset("ds")
        .unwrap()
        .read_range("ok", 0, 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::OutOfRange));

    // The CLI reports a one-line error and exits non-zero.
    let out = d.ctl(&["cat", "ds", "../x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("storagectl: error:") && err.trim().lines().count() == 1,
        "{err}"
    );
    let out = d.ctl(&["ingest", "ds", src.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ALREADY_EXISTS"));
    assert!(client.list_datasets().await.unwrap().len() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_is_resource_exhausted_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // Two devices with 2 MiB of data area each: 4 MiB of capacity.
    let opts = DaemonOpts {
        devices: 2,
        device_size: "3MiB".into(),
        ..Default::default()
    };
    let d = Daemon::start(&tmp.path().join("data"), &opts);
    let src = tmp.path().join("src");
    write_tree(
        &src,
        &[
            ("a".into(), pattern(1, 3 << 20)),
            ("b".into(), pattern(2, 3 << 20)),
        ],
    );
    let out = d.ctl(&["ingest", "toobig", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RESOURCE_EXHAUSTED"), "{err}");
    let client = d.client().await;
    assert!(
        eventually(Duration::from_secs(10), async || client
            .status()
            .await
            .unwrap()
            .used_bytes
            == 0)
        .await,
        "space of the failed ingest released"
    );
    assert!(client.list_datasets().await.unwrap().is_empty());
    // What fits still goes in.
    let small = tmp.path().join("small");
    write_tree(&small, &[("a".into(), pattern(1, 3 << 20))]);
    d.ctl_ok(&["ingest", "fits", small.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_mismatched_devices_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let opts = DaemonOpts {
        devices: 2,
        ..Default::default()
    };
    // Something that is not ours on device 1.
    std::fs::write(data.join("dev1.img"), pattern(7, 2 << 20)).unwrap();
    let f = Daemon::try_start_args(&data, opts.args(&data))
        .err()
        .expect("must refuse");
    assert_ne!(f.code, Some(0));
    assert!(
        f.stderr.contains("dev1.img") && f.stderr.contains("--force"),
        "{}",
        f.stderr
    );
    assert_eq!(
        std::fs::read(data.join("dev1.img")).unwrap(),
        pattern(7, 2 << 20),
        "not touched"
    );

    // --force takes it over.
    let mut forced = opts.args(&data);
    forced.push("--force".into());
    let mut d = Daemon::start_args(&data, forced);
    d.stop();

    // Devices in another order: found by their superblocks.
    let mut swapped = opts.args(&data);
    let (i0, i1) = (swapped.len() - 3, swapped.len() - 1);
    swapped.swap(i0, i1);
    let mut d = Daemon::start_args(&data, swapped);
    let st = d.client().await.status().await.unwrap();
    assert!(
        st.devices[0].path.ends_with("dev0.img") && st.devices[1].path.ends_with("dev1.img"),
        "{:?}",
        st.devices
    );
    d.stop();

    // A device of another pool.
    let other = tmp.path().join("other");
    let mut o = Daemon::start(&other, &opts);
    o.stop();
    let mut mixed = opts.args(&data);
    let last = mixed.len() - 1;
    mixed[last] = other.join("dev1.img").display().to_string();
    let f = Daemon::try_start_args(&data, mixed)
        .err()
        .expect("must refuse another pool");
    assert!(
        f.stderr.contains("belongs to pool") && f.stderr.contains("other/dev1.img"),
        "{}",
        f.stderr
    );

    // A damaged primary superblock is rebuilt from its copy.
    use std::os::unix::fs::FileExt;
    let dev0 = data.join("dev0.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev0)
        .unwrap();
    file.write_all_at(&99u32.to_le_bytes(), 8).unwrap();
    let mut d = Daemon::start_args(&data, opts.args(&data));
    let st = d.client().await.status().await.unwrap();
    assert_eq!(st.superblocks_repaired, 1);
    d.stop();
    // An unknown format version (a valid superblock, both copies).
    let mut sb = vec![0u8; 4096];
    file.read_exact_at(&mut sb, 0).unwrap();
    sb[8..12].copy_from_slice(&99u32.to_le_bytes());
    let crc = crc32fast::hash(&sb[..4092]);
    sb[4092..].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&sb, 0).unwrap();
    file.write_all_at(&sb, 4096).unwrap();
    let f = Daemon::try_start_args(&data, opts.args(&data))
        .err()
        .expect("must refuse");
    assert!(f.stderr.contains("format version 99"), "{}", f.stderr);
    // Both copies damaged: a bad checksum, named.
    file.write_all_at(&[1, 2, 3], 40).unwrap();
    file.write_all_at(&[1, 2, 3], 4096 + 40).unwrap();
    let f = Daemon::try_start_args(&data, opts.args(&data))
        .err()
        .expect("must refuse");
    assert!(
        f.stderr.contains("checksum") && f.stderr.contains("dev0.img"),
        "{}",
        f.stderr
    );

    // Bad flags: a clear message and a non-zero exit.
    let bad_opts = DaemonOpts {
        device_size: "12XB".into(),
        ..opts.clone()
    };
    let bad = bad_opts.args(&data);
    let f = Daemon::try_start_args(&data, bad)
        .err()
        .expect("must refuse");
    assert!(f.stderr.contains("12XB"), "{}", f.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_fail_on_every_rpc() {
    // Guards against names tools misread (`.`, `..`, `-rf`, `--help`) and
    // object paths with control characters and terminal escapes reaching
    // the catalog, and so `ls`, export and terminals.
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let src = tmp.path().join("src");
    write_tree(&src, &[("ok".into(), b"x".to_vec())]);
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let local = d.local_client().await;
    let mut rpc = local.raw();
    let region = local.register_region(4096).await.unwrap();
    let corpus: Vec<(&str, &str)> = vec![
        (".", "ok"),
        ("..", "ok"),
        ("-rf", "ok"),
        ("--help", "ok"),
        ("ds", "a\u{1b}[2J\u{1b}[31mred"),
        ("ds", "line\nbreak"),
        ("ds", "bell\u{7}"),
        ("ds", "c1\u{9b}x"),
        ("ds", "../../etc/passwd"),
        ("ds", "a/../../b"),
    ];
    for (dataset, path) in corpus {
        let what = format!("{dataset:?} {path:?}");
        let check = |r: Result<(), tonic::Status>, rpc: &str| {
            let e = r.expect_err(&format!("{rpc} {what}"));
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{rpc} {what}: {}",
                e.message()
            );
        };
        let item = pb::ReadItem {
            path: path.into(),
            offset: 0,
            length: None,
        };
        check(
            rpc.stat(pb::StatRequest {
                dataset: dataset.into(),
                path: path.into(),
                include_extents: false,
            })
            .await
            .map(drop),
            "stat",
        );
        check(
            rpc.read(pb::ReadRequest {
                dataset: dataset.into(),
                path: path.into(),
                ..Default::default()
            })
            .await
            .map(drop),
            "read",
        );
        // ReadBatch: a bad dataset fails the call, a bad path its item.
        match rpc
            .read_batch(pb::ReadBatchRequest {
                dataset: dataset.into(),
                items: vec![item.clone()],
                ..Default::default()
            })
            .await
        {
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "read_batch {what}"),
            Ok(r) => {
                let first = r.into_inner().message().await.unwrap().unwrap();
                let e = first.error.expect("the item fails");
                assert_eq!(e.code, Code::InvalidArgument as i32, "read_batch {what}");
            }
        }
        check(
            rpc.hint(pb::HintRequest {
                dataset: dataset.into(),
                paths: vec![path.into()],
            })
            .await
            .map(drop),
            "hint",
        );
        match rpc
            .read_into(pb::ReadIntoRequest {
                region_id: region.id(),
                dataset: dataset.into(),
                items: vec![pb::ReadIntoItem {
                    path: path.into(),
                    offset: 0,
                    length: None,
                    region_offset: 0,
                }],
                max_in_flight: 0,
                dataset_id: None,
            })
            .await
        {
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "read_into {what}"),
            Ok(r) => {
                let first = r.into_inner().message().await.unwrap().unwrap();
                let e = first.error.expect("the item fails");
                assert_eq!(e.code, Code::InvalidArgument as i32, "read_into {what}");
            }
        }
        if dataset != "ds" {
            check(
                rpc.list_objects(pb::ListObjectsRequest {
                    dataset: dataset.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
                "list_objects",
            );
            check(
                rpc.delete_dataset(pb::DeleteDatasetRequest {
                    dataset: dataset.into(),
                })
                .await
                .map(drop),
                "delete_dataset",
            );
        }
        // Ingest: refused at `begin` or at the object header.
        let open = OpenIngest::start(&local).await;
        let target = if dataset == "ds" { "fresh" } else { dataset };
        open.send(vec![
            ingest_msg::begin(target, 0),
            ingest_msg::object(path, 1),
            ingest_msg::data(vec![0u8]),
        ])
        .await;
        check(open.close().await.map(drop), "ingest");
    }
    // The CLI refuses an option-like name rather than reading it as one.
    let out = d.ctl(&["ingest", "--", "-rf", src.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not be"),
        "{out:?}"
    );
    let names: Vec<String> = local
        .list_datasets()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["ds"], "nothing hostile was stored");
}

#[test]
fn export_never_follows_a_planted_symlink() {
    // Guards against `export` writing through a symlink already present
    // in the target directory (out/sub -> somewhere else).
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let src = tmp.path().join("src");
    write_tree(
        &src,
        &[
            ("sub/file".into(), b"data".to_vec()),
            ("top".into(), b"t".to_vec()),
        ],
    );
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let out_dir = tmp.path().join("out");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out_dir.join("sub")).unwrap();
    let out = d.ctl(&["export", "ds", out_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sub"), "{err}");
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "nothing was written through the symlink"
    );
}
