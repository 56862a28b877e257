//! A committed dataset survives a clean restart and a `kill -9`.

use storaged_tests::{Daemon, DaemonOpts, pattern, read_tree, write_tree};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_survive_restart_and_kill9() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(
        &src,
        &[
            ("a/x.bin".into(), pattern(1, 300_000)),
            ("b.bin".into(), pattern(2, 1_234_567)),
            ("c".into(), vec![]),
        ],
    );
    let mut d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "keep", src.to_str().unwrap()]);
    let status_before = d.ctl_ok(&["status"]);

    d.restart();
    let out = tmp.path().join("out1");
    d.ctl_ok(&["export", "keep", out.to_str().unwrap()]);
    assert_eq!(read_tree(&out), read_tree(&src));

    // kill -9 right after a commit: the commit was durable when acknowledged.
    d.ctl_ok(&["ingest", "second", src.to_str().unwrap()]);
    d.kill9();
    d = Daemon::start_args(&d.data_dir.clone(), d.args.clone());
    let ls = d.ctl_ok(&["ls"]);
    assert!(ls.contains("keep") && ls.contains("second"), "{ls}");
    let out = tmp.path().join("out2");
    d.ctl_ok(&["export", "second", out.to_str().unwrap()]);
    assert_eq!(read_tree(&out), read_tree(&src));
    let pool_line = |s: &str| s.lines().next().unwrap().to_owned();
    assert_eq!(
        pool_line(&status_before),
        pool_line(&d.ctl_ok(&["status"])),
        "same pool"
    );
}
