//! A byte flipped in a device file under a stored object gives DATA_LOSS
//! naming the dataset, object and device, while other objects still read
//! (class stripe); an erasure-coded dataset serves the right bytes instead.

use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_gives_data_loss_for_that_object_only() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let victim = pattern(1, 500_000);
    let bystander = pattern(2, 500_000);
    write_tree(
        &src,
        &[
            ("victim".into(), victim.clone()),
            ("bystander".into(), bystander.clone()),
        ],
    );
    let data = tmp.path().join("data");
    let d = Daemon::start(&data, &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap(), "--class", "stripe"]);

    let client = d.client().await;
    let e = &rot(&d, &data, "ds", "victim").await;

    let out = d.ctl(&["cat", "ds", "victim"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATA_LOSS"), "{err}");
    assert!(
        err.contains("\"victim\"") && err.contains("\"ds\""),
        "{err}"
    );
    assert!(err.contains(&format!("device {}", e.device_index)), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    // No wrong byte was written out before the error.
    let good_prefix = (e.object_offset + e.length / 2) / 32768 * 32768;
    assert!(out.stdout.len() as u64 <= good_prefix);
    assert_eq!(out.stdout[..], victim[..out.stdout.len()]);

    let err = client
        .dataset("ds")
        .unwrap()
        .read("victim")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::DataLoss));
    assert_eq!(d.ctl(&["cat", "ds", "bystander"]).stdout, bystander);
    // Ranges of the victim away from the bad block still read.
    let head = client
        .dataset("ds")
        .unwrap()
        .read_range("victim", 0, 4096)
        .await
        .unwrap();
    assert_eq!(&head[..], &victim[..4096]);
}

/// Flips one byte in the middle of `path`'s device bytes (in its middle
/// extent, which it returns).
async fn rot(
    d: &Daemon,
    data: &std::path::Path,
    ds: &str,
    path: &str,
) -> storaged_proto::pb::Extent {
    let st = d
        .client()
        .await
        .dataset(ds)
        .unwrap()
        .stat(path)
        .await
        .unwrap();
    let e = st.extents[st.extents.len() / 2];
    let at = e.device_offset + e.length / 2;
    let dev = data.join(format!("dev{}.img", e.device_index));
    storaged_tests::flip_byte(&dev, at, 0x01);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_rot_is_served_correct_counted_and_scrubbed_away() {
    // Guards degraded reads and scrub repair end to end: bit rot under an
    // ec:3+1 object is rebuilt on read, counted per dataset and device, and
    // `storagectl scrub` rewrites the unit so the next scrub is clean.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let victim = pattern(1, 900_000);
    write_tree(&src, &[("victim".into(), victim.clone())]);
    let data = tmp.path().join("data");
    let d = Daemon::start(&data, &DaemonOpts::default());
    let out = d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    assert!(out.contains("class ec:3+1 (the server's default"), "{out}");
    let dev = rot(&d, &data, "ds", "victim").await.device_index;
    assert_eq!(d.ctl(&["cat", "ds", "victim"]).stdout, victim);
    let st = d.client().await.status().await.unwrap();
    assert!(st.datasets[0].reconstructions > 0);
    assert!(st.devices[dev as usize].reconstructions > 0);
    let status = d.status_json();
    assert!(
        status["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ds| ds["storage_class"] == "STORAGE_CLASS_EC" && ds["reconstructions"] == 1),
        "{status}"
    );

    let out = d.ctl_ok(&["scrub", "ds"]);
    assert!(
        out.contains("1 corrupt, 1 repaired, 0 unrecoverable"),
        "{out}"
    );
    let out = d.ctl_ok(&["scrub"]);
    assert!(
        out.contains("0 corrupt, 0 repaired, 0 unrecoverable"),
        "{out}"
    );
    let st = d.client().await.status().await.unwrap();
    assert_eq!((st.scrub().passes, st.scrub().repaired), (2, 1));
    // A stripe dataset with rot: scrub reports it and exits 1.
    let src2 = tmp.path().join("src2");
    write_tree(&src2, &[("x".into(), pattern(3, 300_000))]);
    d.ctl_ok(&[
        "ingest",
        "plain",
        src2.to_str().unwrap(),
        "--class",
        "stripe",
    ]);
    rot(&d, &data, "plain", "x").await;
    let out = d.ctl(&["scrub", "plain"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 unrecoverable"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be repaired"));
    // Bad input: a missing dataset, a malformed class.
    let out = d.ctl(&["scrub", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));
    let out = d.ctl(&["ingest", "bad", src2.to_str().unwrap(), "--class", "ec:9"]);
    assert_eq!(out.status.code(), Some(2));
    let out = d.ctl(&["ingest", "bad", src2.to_str().unwrap(), "--class", "ec:4+1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("needs 5 devices"),
        "{err}"
    );
}
