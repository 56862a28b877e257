//! Redundancy end to end with the real binaries: a device lost while
//! stopped (degraded start), `storagectl device replace` while a reader
//! keeps reading, resume after kill -9, seeded fault injection through
//! `--fault-inject`, and fsync failures.

use std::time::Duration;

use storaged_tests::{Daemon, DaemonOpts, check_all, eventually, pattern, write_tree};

fn files() -> Vec<(String, Vec<u8>)> {
    (0..24u64)
        .map(|i| {
            (
                format!("shard-{i:02}"),
                pattern(i, 300_000 + i as usize * 4099),
            )
        })
        .chain([("big".to_string(), pattern(99, 6 << 20))])
        .collect()
}

/// A stopped daemon whose dataset "train" holds `files`, and its data dir.
fn trained(tmp: &tempfile::TempDir, files: &[(String, Vec<u8>)]) -> (Daemon, std::path::PathBuf) {
    let src = tmp.path().join("src");
    write_tree(&src, files);
    let data = tmp.path().join("data");
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    d.stop();
    (d, data)
}

/// Whether `storagectl status` shows device `path` in `state`.
fn device_line(status: &str, path: &str, state: &str) -> bool {
    status
        .lines()
        .any(|l| l.contains(path) && l.contains(state))
}

// Guards degraded start and device replacement: with a device file gone,
// storaged starts, says the pool is degraded and what is at risk, serves
// every ec byte, refuses new ingests, and `device replace` rebuilds the
// device while a reader keeps reading, after which the pool is healthy
// across restarts (the configuration still names the old path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_device_degraded_start_then_replace_while_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = files();
    write_tree(&src, &files);
    let scratch = tmp.path().join("scratch");
    write_tree(&scratch, &[("wide".into(), pattern(5, 1 << 20))]);
    let data = tmp.path().join("data");
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    d.ctl_ok(&[
        "ingest",
        "scratch",
        scratch.to_str().unwrap(),
        "--class",
        "stripe",
    ]);
    d.stop();
    std::fs::remove_file(data.join("dev2.img")).unwrap();

    d = Daemon::start_args(&data, d.args.clone());
    let status = d.ctl_ok(&["status"]);
    assert!(status.contains("DEGRADED"), "{status}");
    assert!(device_line(&status, "dev2.img", "missing"), "{status}");
    assert!(status.contains("at risk"), "{status}");
    assert!(
        status.contains("more device loss(es) tolerated"),
        "{status}"
    );
    check_all(&d, "train", &files);
    let out = d.ctl(&["cat", "scratch", "wide"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("UNAVAILABLE") && err.contains("device 2"),
        "{err}"
    );
    let out = d.ctl(&["ingest", "more", scratch.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("degraded"),
        "{err}"
    );

    // A reader loops over the dataset during the rebuild.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let url = d.url.clone();
        let files = files.clone();
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || rounds == 0 {
                for (p, data) in &files {
                    let out = std::process::Command::new(storaged_tests::storagectl_bin())
                        .args(["--server", &url, "cat", "train", p])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success() && out.stdout == *data,
                        "read of {p} during rebuild"
                    );
                }
                rounds += 1;
            }
            rounds
        })
    };
    let new = tmp.path().join("spare").join("new2.img");
    std::fs::create_dir_all(new.parent().unwrap()).unwrap();
    blank_device_like(&data.join("dev0.img"), &new);
    let out = d.ctl_ok(&["device", "replace", "2", new.to_str().unwrap()]);
    assert!(
        out.contains("replaced by") && out.contains("0 units lost"),
        "{out}"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() >= 1);
    let status = d.status_json();
    assert_eq!(status["degraded"], false, "{status}");
    assert!(
        status["devices"][2]["path"]
            .as_str()
            .unwrap()
            .ends_with("new2.img"),
        "{status}"
    );
    // Replacing it again onto a device of the pool is refused.
    let out = d.ctl(&["device", "replace", "1", new.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"));

    d.stop();
    d = Daemon::start_args(&data, d.args.clone());
    let status = d.ctl_ok(&["status"]);
    assert!(
        status.contains("health:      ok") && status.contains("new2.img"),
        "{status}"
    );
    check_all(&d, "train", &files);
    let out = d.ctl_ok(&["scrub", "train"]);
    assert!(out.contains("0 corrupt"), "{out}");
    d.ctl_ok(&["ingest", "more", scratch.to_str().unwrap()]);
}

// Guards resumable replacement: kill -9 in the middle of a rebuild, and the
// same command after the restart carries on from the last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_resumes_after_kill9() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|i| (format!("s{i}"), pattern(i, 4 << 20)))
        .collect();
    write_tree(&src, &files);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("storaged.toml");
    std::fs::write(&config, "replace_checkpoint = \"256KiB\"\n").unwrap();
    let opts = DaemonOpts {
        extra: vec!["--config".into(), config.display().to_string()],
        ..Default::default()
    };
    let mut d = Daemon::start(&data, &opts);
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    d.stop();
    std::fs::remove_file(data.join("dev1.img")).unwrap();
    // Slow reads so the rebuild is still running when it is killed.
    let mut slow = d.args.clone();
    slow.extend([
        "--fault-inject".into(),
        "seed=3,latency_ms=3,latency=1".into(),
    ]);
    d = Daemon::start_args(&data, slow);
    let new = tmp.path().join("new1.img");
    blank_device_like(&data.join("dev0.img"), &new);
    let replace = d.spawn_local_ctl(&["device", "replace", "1", new.to_str().unwrap()]);
    let client = d.client().await;
    assert!(
        eventually(Duration::from_secs(60), async || {
            client
                .status()
                .await
                .ok()
                .and_then(|s| s.rebuild)
                .is_some_and(|r| r.bytes_done * 3 > r.bytes_total)
        })
        .await,
        "the rebuild got a third of the way"
    );
    d.kill9();
    let out = replace.wait_with_output().unwrap();
    assert!(!out.status.success(), "the replace cannot have finished");

    d = Daemon::start_args(&data, d.args.clone());
    let status = d.status_json();
    assert_eq!(status["rebuild"]["running"], false, "interrupted: {status}");
    assert_eq!(status["rebuild"]["device_index"], 1, "{status}");
    assert_eq!(status["devices"][1]["state"], "rebuilding", "{status}");
    let text = d.ctl_ok(&["status"]);
    assert!(text.contains("interrupted"), "{text}");
    assert!(device_line(&text, "new1.img", "rebuilding"), "{text}");
    check_all(&d, "train", &files[..2]);
    let out = d.ctl_ok(&["device", "replace", "1", new.to_str().unwrap()]);
    assert!(
        out.contains("(resumed)") && out.contains("0 units lost"),
        "{out}"
    );
    let status = d.status_json();
    assert_eq!(status["degraded"], false, "{status}");
    assert!(status["rebuild"].is_null(), "{status}");
    check_all(&d, "train", &files);
    let out = d.ctl_ok(&["scrub"]);
    assert!(out.contains("0 corrupt"), "{out}");
}

// Guards the seeded fault layer end to end: with EIO, bit flips and delays
// injected into a live daemon, every read returns the exact bytes or a
// clean error, never wrong bytes, and the daemon counts what it rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_never_serve_a_wrong_byte() {
    let seed = storaged_tests::test_seed("STORAGED_FAULT_SEED", "fault");
    let tmp = tempfile::tempdir().unwrap();
    let files = files();
    let (mut d, data) = trained(&tmp, &files);
    let mut args = d.args.clone();
    args.extend([
        "--fault-inject".into(),
        format!("seed={seed},read_eio=0.02,flip=0.02,latency_ms=1,latency=0.05"),
    ]);
    d = Daemon::start_args(&data, args);
    let (mut exact, mut errors) = (0, 0);
    for round in 0..3 {
        for (p, want) in &files {
            let out = d.ctl(&["cat", "train", p]);
            if out.status.success() {
                assert!(
                    out.stdout == *want,
                    "seed {seed} round {round}: wrong bytes for {p}"
                );
                exact += 1;
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    err.contains("DATA_LOSS") || err.contains("UNAVAILABLE"),
                    "seed {seed}: {err}"
                );
                errors += 1;
            }
        }
    }
    let st = d.client().await.status().await.unwrap();
    println!(
        "seed {seed}: {exact} exact reads, {errors} clean errors, {} rebuilds",
        st.datasets[0].reconstructions
    );
    assert!(
        exact > errors * 4,
        "seed {seed}: {exact} exact vs {errors} errors"
    );
    assert!(
        st.datasets[0].reconstructions > 0,
        "seed {seed}: faults were injected and repaired"
    );
}

// Guards the commit order: an fdatasync failure fails the ingest with a
// clear error, and the dataset is never committed (not even after a
// restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_failure_fails_the_ingest_and_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("x".into(), pattern(1, 1 << 20))]);
    let data = tmp.path().join("data");
    let opts = DaemonOpts {
        extra: vec!["--fault-inject".into(), "seed=1,fsync_fail=1".into()],
        ..Default::default()
    };
    let mut d = Daemon::start(&data, &opts);
    let out = d.ctl(&["ingest", "ds", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INTERNAL") && err.contains("fdatasync"),
        "{err}"
    );
    let st = d.client().await.status().await.unwrap();
    assert!(st.datasets.is_empty());
    d.stop();
    d = Daemon::start_args(&data, DaemonOpts::default().args(&data));
    let st = d.client().await.status().await.unwrap();
    assert!(st.datasets.is_empty() && st.used_bytes == 0, "{st:?}");
}

// Guards torn-write detection: with writes torn by the fault layer during
// the ingest (half the unit reaches the device, success is reported), the
// dataset still reads back exact (torn units fail their CRC and are rebuilt)
// and a scrub finds and repairs every torn unit. The seed is fixed so the
// torn writes are the same every run (ingest writes are submitted in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_writes_are_detected_rebuilt_and_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = files();
    write_tree(&src, &files);
    let data = tmp.path().join("data");
    let opts = DaemonOpts {
        extra: vec!["--fault-inject".into(), "seed=11,torn=0.02".into()],
        ..Default::default()
    };
    let mut d = Daemon::start(&data, &opts);
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    let torn = d.client().await.status().await.unwrap().faults().injected;
    println!("seed 11: {torn} torn writes");
    assert!(torn > 0, "the seed tears some writes");
    d.stop();
    d = Daemon::start_args(&data, DaemonOpts::default().args(&data));
    check_all(&d, "train", &files);
    let st = d.client().await.status().await.unwrap();
    assert!(st.datasets[0].reconstructions > 0);
    let out = d.ctl_ok(&["scrub"]);
    assert!(
        out.contains(&format!("{torn} corrupt, {torn} repaired, 0 unrecoverable")),
        "{out}"
    );
    let out = d.ctl_ok(&["scrub"]);
    assert!(out.contains("0 corrupt"), "{out}");
}

// Guards a device that disappears while storaged runs (the fault layer's
// `vanish`): reads of ec data keep coming back exact, rebuilt from parity
// and counted against that device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_vanishing_mid_run_is_read_around() {
    let tmp = tempfile::tempdir().unwrap();
    let files = files();
    let (mut d, data) = trained(&tmp, &files);
    let mut args = d.args.clone();
    args.extend(["--fault-inject".into(), "seed=5,vanish=3@20".into()]);
    d = Daemon::start_args(&data, args);
    check_all(&d, "train", &files);
    let st = d.client().await.status().await.unwrap();
    assert!(st.devices[3].reconstructions > 0, "{:?}", st.devices[3]);
    assert_eq!(
        st.devices.iter().map(|x| x.reconstructions).sum::<u64>(),
        st.devices[3].reconstructions
    );
}

// Guards the background scrub: with a short interval it finds and repairs
// rot by itself, and status reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_scrub_repairs_rot_by_itself() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("x".into(), pattern(1, 2 << 20))]);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("storaged.toml");
    std::fs::write(&config, "scrub_interval_s = 1\nscrub_rate_mib_s = 1000\n").unwrap();
    let opts = DaemonOpts {
        extra: vec!["--config".into(), config.display().to_string()],
        ..Default::default()
    };
    let d = Daemon::start(&data, &opts);
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let st = d
        .client()
        .await
        .dataset("ds")
        .unwrap()
        .stat("x")
        .await
        .unwrap();
    let e = st.extents[3];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data.join(format!("dev{}.img", e.device_index)))
        .unwrap();
    f.write_all_at(&[0xAB; 16], e.device_offset + 10).unwrap();
    f.sync_all().unwrap();
    let client = d.client().await;
    assert!(
        eventually(Duration::from_secs(20), async || {
            client
                .status()
                .await
                .map(|s| s.scrub().repaired >= 1)
                .unwrap_or(false)
        })
        .await,
        "the background scrub repaired the unit"
    );
    let st = client.status().await.unwrap();
    assert_eq!(st.scrub().unrecoverable, 0);
    assert!(d.ctl_ok(&["status"]).contains("1 repaired"));
}

// Guards misdirected writes: a whole unit of valid bytes written to the
// wrong place (another unit's address) is detected, because each unit's
// CRC is bound to its dataset, stripe and position: reads serve the right
// bytes, and scrub puts the right unit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misdirected_unit_is_caught_and_repaired() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let big = pattern(8, 3 << 20);
    write_tree(&src, &[("big".into(), big.clone())]);
    let data = tmp.path().join("data");
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let st = d
        .client()
        .await
        .dataset("ds")
        .unwrap()
        .stat("big")
        .await
        .unwrap();
    d.stop();
    // Whole 64 KiB data units of the object: copy unit 0 over unit 7.
    let (from, to) = (st.extents[0], st.extents[7]);
    assert_eq!((from.length, to.length), (65536, 65536));
    let read = |e: &storaged_proto::pb::Extent| {
        let f = std::fs::File::open(data.join(format!("dev{}.img", e.device_index))).unwrap();
        let mut b = vec![0u8; e.length as usize];
        f.read_exact_at(&mut b, e.device_offset).unwrap();
        b
    };
    let stray = read(&from);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(data.join(format!("dev{}.img", to.device_index)))
        .unwrap();
    f.write_all_at(&stray, to.device_offset).unwrap();
    f.sync_all().unwrap();
    d = Daemon::start_args(&data, d.args.clone());
    assert!(d.ctl(&["cat", "ds", "big"]).stdout == big);
    let out = d.ctl_ok(&["scrub"]);
    assert!(
        out.contains("1 corrupt, 1 repaired, 0 unrecoverable"),
        "{out}"
    );
    assert_ne!(read(&to), stray, "the right unit is back on the device");
}

/// Creates `new` as a blank (sparse) file the size of `like`: storaged
/// never creates replacement devices itself.
fn blank_device_like(like: &std::path::Path, new: &std::path::Path) {
    let len = std::fs::metadata(like).unwrap().len();
    std::fs::File::create(new).unwrap().set_len(len).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_batches_finish_under_a_small_connection_budget() {
    // Guards against a degraded read waiting on its call's own budget
    // while the call's later windows hold that budget and wait for it: a
    // large ReadBatch over a pool with a device missing, on a connection
    // allowed 4 MiB of buffers, must finish with every byte right.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files: Vec<(String, Vec<u8>)> = (0..16u64)
        .map(|i| {
            (
                format!("obj{i:02}"),
                pattern(100 + i, (1 << 20) + i as usize * 4099),
            )
        })
        .collect();
    write_tree(&src, &files);
    let data = tmp.path().join("data");
    let config = tmp.path().join("storaged.toml");
    std::fs::write(&config, "connection_inflight = \"4MiB\"\n").unwrap();
    let mut d = Daemon::start_with_config(&data, &config);
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    d.stop();
    std::fs::remove_file(data.join("dev1.img")).unwrap();
    d = Daemon::start_args(&data, d.args.clone());
    let client = d.client().await;
    let ds = client.dataset("train").unwrap();
    let items: Vec<storaged_client::BatchItem> = (0..4)
        .flat_map(|_| files.iter())
        .map(|(p, _)| storaged_client::BatchItem {
            path: p.clone(),
            offset: 0,
            length: None,
        })
        .collect();
    for any_order in [false, true] {
        let read = async {
            let mut s = if any_order {
                futures::StreamExt::boxed(ds.read_batch_any_order(items.clone(), 64))
            } else {
                futures::StreamExt::boxed(ds.read_batch(items.clone(), 64))
            };
            let mut n = 0;
            while let Some(r) = futures::StreamExt::next(&mut s).await {
                let r = r.unwrap();
                let (_, want) = &files[r.index as usize % files.len()];
                assert!(r.data.unwrap() == want.as_slice(), "item {}", r.index);
                n += 1;
            }
            n
        };
        let n = tokio::time::timeout(Duration::from_secs(120), read)
            .await
            .expect("a degraded batch finished under a small budget");
        assert_eq!(n, items.len());
    }
}
