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
// truncated file. The kill always lands mid-stream: cat writes into a
// pipe this test stops reading, so cat stops reading the server, whose
// HTTP/2 windows (far below the object's 100 MiB) then hold the rest back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_death_mid_read_fails_the_reader() {
    use std::io::Read;
    const SIZE: usize = 100 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("big".into(), pattern(3, SIZE))]);
    let mut d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let mut cat = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.url, "cat", "ds", "big"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = cat.stdout.take().unwrap();
    // The stream has begun: its first MiB is here.
    let mut first = vec![0u8; 1 << 20];
    out.read_exact(&mut first).unwrap();
    d.kill9();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let status = cat.wait().unwrap();
    let written = first.len() + rest.len();
    assert!(
        written < SIZE,
        "the kill must land mid-stream, but all {written} bytes arrived"
    );
    assert!(
        !status.success(),
        "cat exited 0 after writing only {written} bytes"
    );
    let expected = pattern(3, written);
    assert!(
        first[..] == expected[..first.len()] && rest[..] == expected[first.len()..],
        "what did arrive is the object's prefix"
    );
}
