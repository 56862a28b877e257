//! A failing catalog filesystem is a state, not a wedge: storaged says so
//! (Status, log), answers RESOURCE_EXHAUSTED while the disk is full, and
//! works again by itself when space returns. The data dir is a small tmpfs
//! mounted by the test (CI runs as root; elsewhere the test fails loudly).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use storaged_tests::{Daemon, eventually, pattern, write_tree};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("running mount(8)");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xaau8; 64 << 10];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // Whatever a page of slack is left goes too.
    while f.write_all(&[0u8; 512]).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_catalog_disk_is_reported_and_recovers_without_a_restart() {
    // Guards against a full catalog filesystem leaving every later ingest
    // and rm failing ("Previous I/O error occurred", INTERNAL) until a
    // restart, while status said `health: ok` and nothing was logged.
    let tmp = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&tmp.path().join("data"), "8m");
    let logs = tmp.path().join("logs");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        mnt.0.to_str().unwrap(),
        "--device-size",
        "64MiB",
        "--stripe-unit",
        "64KiB",
    ]
    .map(String::from)
    .into();
    for i in 0..2 {
        args.push("--device".into());
        args.push(tmp.path().join(format!("dev{i}.img")).display().to_string());
    }
    let d = Daemon::start_args(&logs, args);
    let small = tmp.path().join("small");
    write_tree(&small, &[("a".into(), pattern(1, 4096))]);
    d.ctl_ok(&["ingest", "first", small.to_str().unwrap()]);

    // Many objects: the catalog must grow to commit them.
    let many = tmp.path().join("many");
    let files: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| {
            (
                format!("dir{}/object-with-a-long-name-{i:05}", i % 17),
                pattern(i, 64),
            )
        })
        .collect();
    write_tree(&many, &files);

    let filler = fill(&mnt.0);
    let out = d.ctl(&["ingest", "second", many.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("RESOURCE_EXHAUSTED"), "{err}");
    assert!(err.contains("full"), "{err}");
    let status = d.status_json();
    assert!(
        !status["catalog"]["fault"].as_str().unwrap().is_empty(),
        "{status}"
    );
    let text = d.ctl_ok(&["status"]);
    assert!(text.contains("CATALOG FAILING"), "{text}");
    assert!(d.stderr().contains("catalog failing"), "{}", d.stderr());
    // Reads of what is committed go on.
    let got = d.ctl(&["cat", "first", "a"]);
    assert!(got.status.success());
    assert_eq!(got.stdout, pattern(1, 4096));

    // Space returns: the next operation reopens the catalog.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || d
            .ctl(&["ingest", "second", many.to_str().unwrap()])
            .status
            .success())
        .await,
        "ingest works again without a restart"
    );
    let status = d.status_json();
    assert_eq!(
        status["catalog"]["fault"], "",
        "the catalog works again: {status}"
    );
    assert_eq!(status["degraded"], false, "{status}");
    d.ctl_ok(&["rm", "first", "--yes"]);
    let ls = d.ctl_ok(&["ls"]);
    assert!(ls.contains("second") && !ls.contains("first"), "{ls}");
    assert!(d.stderr().contains("catalog reopened"), "{}", d.stderr());
}
