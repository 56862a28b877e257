//! `kill -9` of storaged during an ingest, then a restart: the dataset is not
//! visible and its space is free again.

use std::time::Duration;

use storaged_tests::{Daemon, DaemonOpts, OpenIngest, eventually, ingest_msg, pattern, write_tree};

// Guards against a partially ingested dataset becoming visible, or its
// space leaking, after a crash in the middle of an ingest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_ingest_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let client = d.client().await;
    let open = OpenIngest::start(&client).await;
    let mut msgs = vec![
        ingest_msg::begin("partial", 0),
        ingest_msg::object("a", 8 << 20),
    ];
    msgs.extend((0..4u64).map(|i| ingest_msg::data(pattern(i, 1 << 20))));
    open.send(msgs).await;
    assert!(
        eventually(Duration::from_secs(20), async || {
            let s = client.status().await.unwrap();
            s.ingests_in_progress == 1 && s.used_bytes >= 4 << 20
        })
        .await,
        "ingest in progress with space allocated"
    );
    d.kill9();
    assert!(
        open.close().await.is_err(),
        "the ingest cannot have succeeded"
    );

    d = Daemon::start_args(&d.data_dir.clone(), d.args.clone());
    let c2 = d.client().await;
    let s = c2.status().await.unwrap();
    assert!(s.datasets.is_empty(), "{:?}", s.datasets);
    assert_eq!(s.used_bytes, 0);
    assert!(d.ctl_ok(&["ls"]).lines().count() == 1, "only the header");
    // The space is really usable again.
    let src = tmp.path().join("src");
    write_tree(&src, &[("x".into(), pattern(9, 3 << 20))]);
    d.ctl_ok(&["ingest", "partial", src.to_str().unwrap()]);
}

// The same through the CLI, killed at whatever point the ingest has reached
// once it has taken space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_storagectl_ingest() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("f{i:02}"), pattern(i, 3 << 20)))
        .collect();
    write_tree(&src, &files);
    let mut d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let client = d.client().await;
    let ingest = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.url, "ingest", "big", src.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || {
            client
                .status()
                .await
                .map(|s| s.used_bytes > 0 && s.ingests_in_progress == 1)
                .unwrap_or(false)
        })
        .await
    );
    d.kill9();
    let out = ingest.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "storagectl must fail when the server dies"
    );
    d = Daemon::start_args(&d.data_dir.clone(), d.args.clone());
    let s = d.client().await.status().await.unwrap();
    assert!(s.datasets.is_empty());
    assert_eq!(s.used_bytes, 0);
}

// Guards against a silently short result: if the server dies while
// `storagectl cat` streams an object, cat must fail, not exit 0 with a
// truncated file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_death_mid_read_fails_the_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("big".into(), pattern(3, 100 << 20))]);
    let mut d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let out_path = tmp.path().join("out.bin");
    let mut cat = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.url, "cat", "ds", "big"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server once some, but not all, bytes have arrived.
    let started = std::time::Instant::now();
    while std::fs::metadata(&out_path).unwrap().len() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cat produced nothing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    d.kill9();
    let status = cat.wait().unwrap();
    let written = std::fs::metadata(&out_path).unwrap().len();
    if written == 100 << 20 {
        // The whole object made it before the kill: nothing to check.
        assert!(status.success());
    } else {
        assert!(
            !status.success(),
            "cat exited 0 after writing only {written} bytes"
        );
    }
}
