//! Clients that hold on to what storaged gives them: ingests that go
//! quiet. Real daemon, raw gRPC clients. (Streams that are never read are
//! covered by `storaged::ahead`'s unit tests; the end-to-end victim test
//! waits on per-connection buffer budgets.)

use std::time::Duration;

use storaged_tests::{Daemon, DaemonOpts, OpenIngest, eventually, ingest_msg, pattern, write_tree};
use tonic::Code;

fn daemon_with(tmp: &tempfile::TempDir, config: &str) -> Daemon {
    let path = tmp.path().join("storaged.toml");
    std::fs::write(&path, config).unwrap();
    Daemon::start(
        &tmp.path().join("data"),
        &DaemonOpts {
            extra: vec!["--config".into(), path.display().to_string()],
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ingests_time_out_and_free_their_slot_and_space() {
    // Guards against 16 ingests that send a begin and one header and then
    // idle locking out every other ingest and reserving space forever.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("a".into(), pattern(1, 1000))]);
    let d = daemon_with(&tmp, "ingest_idle_timeout_s = 3\n");
    let client = d.client().await;
    let mut idle = Vec::new();
    for i in 0..16 {
        let open = OpenIngest::start(&client).await;
        open.send(vec![
            ingest_msg::begin(&format!("idle{i}"), 0),
            ingest_msg::object("x", 1 << 20),
        ])
        .await;
        idle.push(open);
    }
    // The slots are full for now...
    assert!(
        eventually(Duration::from_secs(10), async || {
            client.status().await.unwrap().ingests_in_progress == 16
        })
        .await
    );
    let out = d.ctl(&["ingest", "now", src.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("RESOURCE_EXHAUSTED"));
    // ...until the idle ones time out: then ingests work again, and the
    // idle ones were told why.
    assert!(
        eventually(Duration::from_secs(30), async || {
            d.ctl(&["ingest", "later", src.to_str().unwrap()])
                .status
                .success()
        })
        .await,
        "an ingest got a slot"
    );
    for open in idle {
        let err = open.call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
        assert!(err.message().contains("ingest_idle_timeout_s"));
    }
    let s = client.status().await.unwrap();
    assert_eq!(s.ingests_in_progress, 0);
    assert_eq!(s.datasets.len(), 1);
}
