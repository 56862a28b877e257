//! The pool describes itself: `catalog.redb` lost, restored from an older
//! copy, or lost together with a device, and storaged serves exactly what
//! was committed, from the manifests and roots on the devices.

use storaged_tests::{Daemon, DaemonOpts, check_all, pattern, write_tree};

fn files(seed: u64, n: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("part/{i:03}.bin"),
                pattern(seed * 1000 + i, 50_000 + i as usize * 7919),
            )
        })
        .collect()
}

/// Ingests `files` as dataset `name` (`class` if given) from a tree under
/// `tmp`.
fn ingest(
    d: &Daemon,
    tmp: &std::path::Path,
    name: &str,
    class: Option<&str>,
    files: &[(String, Vec<u8>)],
) {
    let src = tmp.join(format!("src-{name}"));
    write_tree(&src, files);
    let mut args = vec!["ingest", name, src.to_str().unwrap()];
    if let Some(c) = class {
        args.extend(["--class", c]);
    }
    d.ctl_ok(&args);
}

// Guards against the catalog being the only record of the pool: with
// `catalog.redb` deleted, storaged used to start "healthy" and empty and
// the next ingest overwrote the data. Now every dataset reads back, status
// says the catalog was rebuilt, new ingests go to free space, and the next
// start finds the catalog in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_catalog_is_rebuilt_from_the_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (train, scratch) = (files(1, 40), files(2, 12));
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    ingest(&d, tmp.path(), "train", None, &train);
    ingest(&d, tmp.path(), "scratch", Some("stripe"), &scratch);
    let status = d.status_json();
    assert!(
        status["catalog"]["pool_root_generation"].as_u64() > Some(0),
        "{status}"
    );
    assert_eq!(status["catalog"]["rebuilt"], false, "{status}");
    d.stop();
    std::fs::remove_file(data.join("catalog.redb")).unwrap();

    d = Daemon::start_args(&data, d.args.clone());
    let status = d.status_json();
    assert_eq!(status["catalog"]["rebuilt"], true, "{status}");
    assert_eq!(status["catalog"]["datasets_imported"], 2, "{status}");
    // The human view says so too.
    let text = d.ctl_ok(&["status"]);
    assert!(
        text.contains("REBUILT FROM THE DEVICES") && text.contains("2 datasets imported"),
        "{text}"
    );
    assert!(
        d.stderr().contains("rebuilt from the manifests"),
        "{}",
        d.stderr()
    );
    check_all(&d, "train", &train);
    check_all(&d, "scratch", &scratch);
    // New data lands in free space: nothing committed is overwritten.
    let more = files(3, 30);
    ingest(&d, tmp.path(), "more", None, &more);
    check_all(&d, "train", &train);
    check_all(&d, "scratch", &scratch);
    check_all(&d, "more", &more);
    let out = d.ctl_ok(&["scrub", "train"]);
    assert!(out.contains("0 corrupt"), "{out}");

    d.restart();
    let status = d.status_json();
    assert_eq!(
        status["catalog"]["rebuilt"], false,
        "in step after one start: {status}"
    );
    check_all(&d, "more", &more);
}

// Guards against a catalog restored from a backup over a newer pool
// handing out space that newer datasets own, or resurrecting deleted ones:
// the devices' state wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_catalog_restored_over_a_newer_pool_follows_the_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (a, b, c) = (files(4, 20), files(5, 20), files(6, 20));
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    ingest(&d, tmp.path(), "a", None, &a);
    d.stop();
    let backup = tmp.path().join("catalog.backup");
    std::fs::copy(data.join("catalog.redb"), &backup).unwrap();

    d = Daemon::start_args(&data, d.args.clone());
    ingest(&d, tmp.path(), "b", None, &b);
    d.ctl_ok(&["rm", "a"]);
    d.stop();
    std::fs::copy(&backup, data.join("catalog.redb")).unwrap();

    d = Daemon::start_args(&data, d.args.clone());
    let status = d.status_json();
    assert_eq!(status["catalog"]["datasets_imported"], 1, "{status}");
    assert_eq!(status["catalog"]["datasets_dropped"], 1, "{status}");
    let ls = d.ctl_ok(&["ls"]);
    assert!(
        ls.contains('b') && !ls.lines().any(|l| l.split_whitespace().next() == Some("a")),
        "{ls}"
    );
    check_all(&d, "b", &b);
    ingest(&d, tmp.path(), "c", None, &c);
    check_all(&d, "b", &b);
    check_all(&d, "c", &c);
}

// Guards the copies: the catalog and one device lost together still leave
// every `ec` dataset readable (the manifests are on every device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_and_one_device_lost_together() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let train = files(7, 30);
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    ingest(&d, tmp.path(), "train", None, &train);
    d.stop();
    std::fs::remove_file(data.join("catalog.redb")).unwrap();
    std::fs::remove_file(data.join("dev0.img")).unwrap();

    d = Daemon::start_args(&data, d.args.clone());
    let status = d.status_json();
    assert_eq!(status["degraded"], true, "{status}");
    assert_eq!(status["catalog"]["rebuilt"], true, "{status}");
    check_all(&d, "train", &train);
}

fn storaged(args: &[&str]) -> std::process::Output {
    std::process::Command::new(storaged_tests::storaged_bin())
        .args(args)
        .output()
        .unwrap()
}

/// `storaged recover` on `devices` into `data_dir` (`--dry-run` when
/// `dry_run`); its stdout, and stderr, and whether it succeeded.
fn recover(data_dir: &str, devices: &[&str], dry_run: bool) -> (bool, String, String) {
    let mut args = vec!["recover", "--data-dir", data_dir];
    if dry_run {
        args.push("--dry-run");
    }
    for d in devices {
        args.extend(["--device", d]);
    }
    let out = storaged(&args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Guards `storaged recover`: the catalog rebuilt explicitly from devices
// given in any order with one left out, read-only on them, an existing
// catalog moved aside; devices of two pools, or one device twice, are
// refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storaged_recover_rebuilds_the_catalog_from_shuffled_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let train = files(8, 25);
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    ingest(&d, tmp.path(), "train", None, &train);
    ingest(&d, tmp.path(), "tiny", Some("stripe"), &files(9, 3));
    d.stop();
    let dev = |i: usize| data.join(format!("dev{i}.img")).display().to_string();
    let sums: Vec<Vec<u8>> = (0..4).map(|i| std::fs::read(dev(i)).unwrap()).collect();
    let data_s = data.display().to_string();

    let (ok, text, err) = recover(&data_s, &[&dev(3), &dev(1), &dev(2)], true);
    assert!(ok, "{err}");
    assert!(
        text.contains("2 datasets") && text.contains("train") && text.contains("tiny"),
        "{text}"
    );
    assert!(
        text.contains("device 0: not given") && text.contains("dry run"),
        "{text}"
    );

    let (ok, text, err) = recover(&data_s, &[&dev(2), &dev(0), &dev(3), &dev(1)], false);
    assert!(ok, "{err}");
    assert!(
        text.contains("moved to") && text.contains("wrote"),
        "{text}"
    );
    for (i, before) in sums.iter().enumerate() {
        assert!(
            std::fs::read(dev(i)).unwrap() == *before,
            "device {i} was written"
        );
    }
    d = Daemon::start_args(&data, d.args.clone());
    let status = d.status_json();
    assert_eq!(
        status["catalog"]["rebuilt"], false,
        "the recovered catalog is in step: {status}"
    );
    check_all(&d, "train", &train);
    d.stop();

    // Refusals.
    let other = tmp.path().join("other");
    let mut o = Daemon::start(&other, &DaemonOpts::default());
    o.stop();
    let foreign = other.join("dev0.img").display().to_string();
    let (ok, _, err) = recover(&data_s, &[&dev(0), &foreign], true);
    assert!(!ok && err.contains("different pools"), "{err}");
    let (ok, _, err) = recover(&data_s, &[&dev(1), &dev(1)], true);
    assert!(!ok && err.contains("both device 1"), "{err}");
}

// Guards against manifests living only on the original devices: a device
// rebuilt by `device replace` gets every manifest and the root too, so it
// alone can give the catalog back; and against a lost catalog forgetting
// where a replaced device is (the root records it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_device_holds_the_pool_metadata_too() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let train = files(10, 20);
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    ingest(&d, tmp.path(), "train", None, &train);
    d.stop();
    let old = data.join("dev2.img");
    let size = std::fs::metadata(&old).unwrap().len();
    std::fs::remove_file(&old).unwrap();
    d = Daemon::start_args(&data, d.args.clone());
    let new = tmp.path().join("new2.img");
    std::fs::File::create(&new).unwrap().set_len(size).unwrap();
    d.ctl_ok(&["device", "replace", "2", new.to_str().unwrap()]);
    d.stop();
    let elsewhere = tmp.path().join("elsewhere").display().to_string();
    let (ok, text, err) = recover(&elsewhere, &[new.to_str().unwrap()], true);
    assert!(
        ok && text.contains("1 datasets") && text.contains("train"),
        "{text}{err}"
    );
    // The catalog lost too: the devices remember where device 2 went,
    // though the configuration still names the old, gone path.
    std::fs::remove_file(data.join("catalog.redb")).unwrap();
    d = Daemon::start_args(&data, d.args.clone());
    let status = d.status_json();
    assert_eq!(status["degraded"], false, "{status}");
    let devices = status["devices"].as_array().unwrap();
    assert!(
        devices.iter().all(|d| d["state"] == "ok")
            && devices
                .iter()
                .any(|d| d["path"].as_str().unwrap().ends_with("new2.img")),
        "{status}"
    );
    check_all(&d, "train", &train);
}
