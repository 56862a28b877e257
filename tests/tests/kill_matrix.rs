//! Kill matrix: `kill -9` storaged at random points during the ingest of an
//! erasure-coded dataset and during `rm`, 24 times, restarting after each.
//!
//! After every restart: every committed dataset reads back byte-identical
//! (`storagectl verify` checks every object's CRC, and the base dataset is
//! compared byte for byte), no uncommitted dataset is visible, and the used
//! space is exactly what the visible datasets hold, which is what `status`
//! reported before the interrupted operation (or that plus the new
//! dataset, or minus the removed one, if the operation got to commit).

use std::collections::BTreeMap;
use std::time::Duration;

use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};

const RUNS: u64 = 24;

/// Datasets the daemon shows, by name, with their allocated bytes.
async fn visible(d: &Daemon) -> (BTreeMap<String, u64>, u64) {
    let s = d.client().await.status().await.unwrap();
    let ds = s
        .datasets
        .iter()
        .map(|x| (x.name.clone(), x.allocated_bytes))
        .collect();
    (ds, s.used_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_random_points_during_ec_ingest_and_rm() {
    let seed = storaged_tests::test_seed("STORAGED_KILL_SEED", "kill matrix");
    let mut rng = storaged::testkit::XorShift::new(seed);
    let mut rnd = move |n: u64| rng.below(n);

    let tmp = tempfile::tempdir().unwrap();
    let base_src = tmp.path().join("base");
    let base: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| (format!("b{i}"), pattern(i, 500_000)))
        .collect();
    write_tree(&base_src, &base);
    let new_src = tmp.path().join("new");
    write_tree(
        &new_src,
        &(0..24u64)
            .map(|i| (format!("n{i:02}"), pattern(100 + i, 1_000_000)))
            .collect::<Vec<_>>(),
    );
    let data = tmp.path().join("data");
    let opts = DaemonOpts {
        device_size: "128MiB".into(),
        ..Default::default()
    };
    let mut d = Daemon::start(&data, &opts);
    let normal = d.args.clone();
    // The interrupted operations run on a daemon whose device I/O takes
    // 4 ms more, so that the kills land inside them rather than after;
    // the checks run on a normal restart.
    let mut slow = normal.clone();
    slow.extend([
        "--fault-inject".into(),
        format!("seed={seed},latency_ms=4,latency=1"),
    ]);
    d.ctl_ok(&["ingest", "base", base_src.to_str().unwrap()]);
    d.stop();
    d = Daemon::start_args(&data, slow.clone());
    // How long each operation takes here, so that kill points spread over
    // the operation (and a little past it).
    let t = std::time::Instant::now();
    d.spawn_local_ctl(&["ingest", "calibrate", new_src.to_str().unwrap()])
        .wait()
        .unwrap();
    let ingest_ms = t.elapsed().as_millis() as u64;
    let t = std::time::Instant::now();
    d.spawn_local_ctl(&["rm", "calibrate"]).wait().unwrap();
    let rm_ms = t.elapsed().as_millis() as u64;
    println!("ingest takes {ingest_ms} ms, rm {rm_ms} ms");
    let mut interrupted = 0;
    let mut committed_new = 0;
    for run in 0..RUNS {
        let (before, used_before) = visible(&d).await;
        let ingest = run % 2 == 0;
        let name = format!("ds{run}");
        let child = if ingest {
            d.spawn_local_ctl(&["ingest", &name, new_src.to_str().unwrap()])
        } else {
            // Something to remove: the newest dataset other than base, or
            // a fresh one.
            let victim = before.keys().rev().find(|k| *k != "base").cloned();
            let victim = match victim {
                Some(v) => v,
                None => {
                    d.ctl_ok(&["ingest", &name, new_src.to_str().unwrap()]);
                    name.clone()
                }
            };
            d.spawn_local_ctl(&["rm", &victim])
        };
        let (before, used_before) = if ingest {
            (before, used_before)
        } else {
            visible(&d).await
        };
        let span_ms = if ingest { ingest_ms } else { rm_ms } * 6 / 5;
        std::thread::sleep(Duration::from_millis(rnd(span_ms.max(2))));
        d.kill9();
        let out = child.wait_with_output().unwrap();
        d = Daemon::start_args(&data, normal.clone());

        let (after, used_after) = visible(&d).await;
        // No dataset appears except the one being ingested, and none
        // disappears except the one being removed.
        for k in after.keys() {
            assert!(
                before.contains_key(k) || (ingest && *k == name),
                "seed {seed} run {run}: unexpected dataset {k}"
            );
        }
        let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        assert!(
            removed.is_empty() || (!ingest && removed.len() == 1),
            "seed {seed} run {run}: lost {removed:?}"
        );
        // Free space is exactly what the visible datasets leave.
        let held: u64 = after.values().sum();
        assert_eq!(used_after, held, "seed {seed} run {run}: used space leaked");
        let expected = if ingest {
            used_before + after.get(&name).copied().unwrap_or(0)
        } else {
            used_before - removed.iter().map(|k| before[*k]).sum::<u64>()
        };
        assert_eq!(used_after, expected, "seed {seed} run {run}");
        let finished = if ingest {
            after.contains_key(&name)
        } else {
            !removed.is_empty()
        };
        if finished {
            committed_new += u64::from(ingest);
        } else {
            interrupted += 1;
            assert!(
                !out.status.success() || !ingest,
                "seed {seed} run {run}: ingest said ok"
            );
        }
        // Everything visible reads back exactly.
        for k in after.keys() {
            d.ctl_ok(&["verify", k]);
        }
        for (p, want) in &base {
            assert!(
                d.ctl(&["cat", "base", p]).stdout == *want,
                "seed {seed} run {run}: base/{p}"
            );
        }
        d.stop();
        d = Daemon::start_args(&data, slow.clone());
    }
    println!(
        "kill matrix seed {seed}: {RUNS} runs, {interrupted} operations interrupted, {committed_new} ingests committed before the kill, 0 datasets lost"
    );
    assert!(
        interrupted >= 6,
        "seed {seed}: the kills should interrupt some operations"
    );
}
