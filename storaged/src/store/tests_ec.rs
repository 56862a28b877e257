//! Store-level tests of erasure-coded datasets: layout round trips,
//! degraded reads through injected faults, scrub repair, degraded start.

use std::os::unix::fs::FileExt;

use super::tests::{config, ingest_class, pattern, read_all};
use super::*;
use crate::engine::OpKind;
use crate::engine::fault::{Fault, FaultPlan, FaultRule, FaultyBackend};
use crate::error::{AdminError, IngestError};
use crate::service::GrpcCode;

const EC31: StorageClass = StorageClass::Ec {
    data_units: 3,
    parity_units: 1,
};

fn objects() -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("empty".to_string(), vec![]),
        ("one".to_string(), pattern(2, 1)),
        ("a/4095".to_string(), pattern(3, 4095)),
        ("big".to_string(), pattern(4, (1 << 20) + 12_345)),
        ("mid".to_string(), pattern(5, 70_000)),
    ];
    for i in 0..40 {
        v.push((
            format!("small/{i:03}"),
            pattern(100 + i, 3000 + i as usize * 37),
        ));
    }
    v
}

fn as_refs(v: &[(String, Vec<u8>)]) -> Vec<(&str, Vec<u8>)> {
    v.iter().map(|(p, d)| (p.as_str(), d.clone())).collect()
}

/// A 4-device store under `dir` holding `objects()` as ec:3+1 dataset "e".
async fn store_with_ec_dataset(
    dir: &std::path::Path,
) -> (
    crate::config::StoreConfig,
    Arc<Store>,
    Vec<(String, Vec<u8>)>,
) {
    let cfg = config(dir, 16, 64 << 10);
    let store = Store::open(&cfg).unwrap();
    let objs = objects();
    ingest_class(&store, "e", EC31, &as_refs(&objs))
        .await
        .unwrap();
    (cfg, store, objs)
}

async fn check_all(store: &Arc<Store>, ds: &str, objs: &[(String, Vec<u8>)]) {
    for (p, d) in objs {
        let got = read_all(store, ds, p, 0, None).await.unwrap();
        assert!(got == *d, "{ds}/{p}: bytes differ");
    }
}

fn faulty(cfg: &crate::config::StoreConfig) -> (Arc<Store>, Arc<FaultPlan>) {
    let plan = Arc::new(FaultPlan::default());
    let p2 = Arc::clone(&plan);
    let store = Store::open_with(cfg, move |e| Arc::new(FaultyBackend::new(e, p2))).unwrap();
    (store, plan)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_round_trip_reopen_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.default_class(), EC31, "4 devices: ec:3+1");
    let objs = objects();
    let h = ingest_class(&store, "e", EC31, &as_refs(&objs))
        .await
        .unwrap();
    assert_eq!(h.record.class, EC31);
    let row = 4 * (64 << 10);
    assert_eq!(h.record.allocated_bytes % row, 0);
    // About 4/3 of the data, in whole rows.
    assert!(
        h.record.allocated_bytes <= (h.record.total_bytes * 4 / 3).next_multiple_of(row) + 2 * row
    );
    check_all(&store, "e", &objs).await;
    let big = &objs[3].1;
    for (off, len) in [
        (65_535u64, 2u64),
        (196_607, 70_000),
        (big.len() as u64 - 1, 1),
    ] {
        let got = read_all(&store, "e", "big", off, Some(len)).await.unwrap();
        assert_eq!(got, &big[off as usize..(off + len) as usize]);
    }
    // Other geometries on the same pool; too wide is refused.
    let h22 = ingest_class(
        &store,
        "e22",
        StorageClass::Ec {
            data_units: 2,
            parity_units: 2,
        },
        &as_refs(&objs[..5]),
    )
    .await
    .unwrap();
    assert!(h22.layout.ec().is_some());
    let err = ingest_class(
        &store,
        "wide",
        StorageClass::Ec {
            data_units: 4,
            parity_units: 1,
        },
        &[],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("needs 5 devices"), "{err}");
    check_all(&store, "e22", &objs[..5]).await;
    drop(h);
    drop(h22);
    let used = store.status().used_bytes;
    drop(store);

    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.status().used_bytes, used);
    check_all(&store, "e", &objs).await;
    store.delete(&DatasetName::new("e").unwrap()).await.unwrap();
    store
        .delete(&DatasetName::new("e22").unwrap())
        .await
        .unwrap();
    super::tests::discards_settled(&store).await;
    assert_eq!(store.status().used_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_device_and_bad_bytes_are_rebuilt_from_parity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let (store, plan) = faulty(&cfg);
    let objs = objects();
    let h = ingest_class(&store, "e", EC31, &as_refs(&objs))
        .await
        .unwrap();

    // Device 1 returns EIO on every read.
    plan.add(FaultRule {
        device: Some(1),
        kind: Some(OpKind::Read),
        device_range: None,
        fault: Fault::Errno(libc::EIO),
        remaining: None,
    });
    check_all(&store, "e", &objs).await;
    let rebuilt = h.reconstructions.load(Ordering::Relaxed);
    assert!(rebuilt > 0);
    let per_device = store.device_reconstructions();
    assert!(per_device[1] > 0);
    assert_eq!(per_device[0] + per_device[2] + per_device[3], 0);
    plan.clear();
    // Rebuilt stripes are cached; start the next case from the devices.
    store.redundancy.stripe_cache.lock().unwrap().clear();

    // Bit rot in a data unit: the checksum catches it, parity repairs it.
    let obj = store
        .lookup(
            &DatasetName::new("e").unwrap(),
            &ObjectPath::new("mid").unwrap(),
        )
        .unwrap();
    let (_, seg) = store.object_extents(&obj)[0];
    plan.add(FaultRule {
        device: Some(seg.device),
        kind: Some(OpKind::Read),
        device_range: None,
        fault: Fault::FlipAt(seg.device_offset + 100),
        remaining: None,
    });
    assert_eq!(
        read_all(&store, "e", "mid", 0, None).await.unwrap(),
        objs[4].1
    );
    assert!(h.reconstructions.load(Ordering::Relaxed) > rebuilt);
    plan.clear();
    store.redundancy.stripe_cache.lock().unwrap().clear();

    // Two units of a stripe gone is more than ec:3+1 can rebuild: an error
    // naming the devices, never wrong bytes.
    for d in [0, 1] {
        plan.add(FaultRule {
            device: Some(d),
            kind: Some(OpKind::Read),
            device_range: None,
            fault: Fault::Errno(libc::EIO),
            remaining: None,
        });
    }
    let err = read_all(&store, "e", "big", 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        matches!(
            err,
            crate::error::ReadError::Store(StoreError::Unrecoverable { .. })
        ),
        "{err}"
    );
    plan.clear();
    store.redundancy.stripe_cache.lock().unwrap().clear();
    // Bad bytes (not I/O errors) on two devices: DATA_LOSS.
    let segs = store.object_extents(&obj);
    for (_, s) in segs.iter().take(1) {
        for d in [s.device, (s.device + 1) % 4] {
            plan.add(FaultRule {
                device: Some(d),
                kind: Some(OpKind::Read),
                device_range: None,
                fault: Fault::FlipByte(5),
                remaining: None,
            });
        }
    }
    let err = read_all(&store, "e", "mid", 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_ingest_fails_cleanly_on_fsync_failure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let (store, plan) = faulty(&cfg);
    plan.set_fail_sync(true);
    let err = ingest_class(&store, "e", EC31, &[("x", pattern(1, 500_000))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, IngestError::Store(StoreError::Sync { .. })),
        "{err}"
    );
    assert!(store.list_datasets().is_empty(), "never committed");
    super::tests::used_settles_to(&store, 0).await;
}

/// Writes `bytes` at `offset` of device file `d` (bypassing storaged).
fn poke(cfg: &crate::config::StoreConfig, d: u32, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.devices[d as usize])
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn peek(cfg: &crate::config::StoreConfig, d: u32, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(&cfg.devices[d as usize]).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_repairs_rot_torn_and_misdirected_units() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let store = Store::open(&cfg).unwrap();
    let objs = objects();
    let h = ingest_class(&store, "e", EC31, &as_refs(&objs))
        .await
        .unwrap();
    let s_obj = vec![("s".to_string(), pattern(9, 200_000))];
    ingest_class(&store, "s", StorageClass::Stripe, &as_refs(&s_obj))
        .await
        .unwrap();
    let clean = store.scrub(None, 1000, |_| {}).await.unwrap();
    assert_eq!(
        (clean.corrupt, clean.repaired, clean.unrecoverable),
        (0, 0, 0),
        "{clean:?}"
    );
    assert!(clean.units_checked > 0);
    let ec = h.layout.ec().unwrap();
    let unit = 64 << 10;
    let stripes = ec.map.stripes();
    assert!(stripes >= 3);
    // Rot: a flipped byte in stripe 0's data unit 1.
    let (d, off) = ec.map.unit_location(0, 1);
    let mut b = peek(&cfg, d, off + 777, 1);
    b[0] ^= 0x40;
    poke(&cfg, d, off + 777, &b);
    // Torn: the second half of stripe 1's parity unit is stale zeros.
    let (d, off) = ec.map.unit_location(1, 3);
    poke(&cfg, d, off + unit / 2, &vec![0; unit as usize / 2]);
    // Misdirected: stripe 2's unit 0 got the bytes of stripe 0's unit 0 (a
    // valid unit, written to the wrong place).
    let (d0, off0) = ec.map.unit_location(0, 0);
    let (d2, off2) = ec.map.unit_location(2, 0);
    let stray = peek(&cfg, d0, off0, unit as usize);
    poke(&cfg, d2, off2, &stray);
    // And rot in the stripe dataset, which nothing can repair.
    let s = store
        .lookup(
            &DatasetName::new("s").unwrap(),
            &ObjectPath::new("s").unwrap(),
        )
        .unwrap();
    let (_, seg) = store.object_extents(&s)[1];
    let mut b = peek(&cfg, seg.device, seg.device_offset, 1);
    b[0] ^= 1;
    poke(&cfg, seg.device, seg.device_offset, &b);

    let report = store.scrub(None, 1000, |_| {}).await.unwrap();
    assert_eq!(report.corrupt, 4, "{report:?}");
    assert_eq!(report.repaired, 3, "{report:?}");
    assert_eq!(report.unrecoverable, 1, "{report:?}");
    assert_eq!(report.problems.len(), 1, "{report:?}");
    let again = store
        .scrub(Some(&DatasetName::new("e").unwrap()), 1000, |_| {})
        .await
        .unwrap();
    assert_eq!((again.corrupt, again.repaired), (0, 0), "{again:?}");
    check_all(&store, "e", &objs).await;
    // The repaired bytes are on disk, not just served.
    let (d, off) = ec.map.unit_location(2, 0);
    assert_ne!(peek(&cfg, d, off, unit as usize), stray);
    assert_eq!(store.scrub_counters.repaired.load(Ordering::Relaxed), 3);
    let err = read_all(&store, "s", "s", 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_start_serves_ec_and_names_the_lost_device() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, store, objs) = store_with_ec_dataset(dir.path()).await;
    let s_objs = vec![
        ("wide".to_string(), pattern(7, 600_000)),
        ("tiny".to_string(), pattern(8, 100)),
    ];
    ingest_class(&store, "s", StorageClass::Stripe, &as_refs(&s_objs))
        .await
        .unwrap();
    let wide = store
        .lookup(
            &DatasetName::new("s").unwrap(),
            &ObjectPath::new("wide").unwrap(),
        )
        .unwrap();
    let tiny = store
        .lookup(
            &DatasetName::new("s").unwrap(),
            &ObjectPath::new("tiny").unwrap(),
        )
        .unwrap();
    let tiny_device = store.object_extents(&tiny)[0].1.device;
    drop((wide, tiny));
    drop(store);

    // Lose a device that is not the tiny object's.
    let lost = (tiny_device + 1) % 4;
    std::fs::remove_file(&cfg.devices[lost as usize]).unwrap();
    let store = Store::open(&cfg).unwrap();
    let missing = store.missing_devices();
    assert!(missing[lost as usize] && missing.iter().filter(|m| **m).count() == 1);
    check_all(&store, "e", &objs).await;
    assert!(store.device_reconstructions()[lost as usize] > 0);
    let err = read_all(&store, "s", "wide", 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.to_string().contains(&format!("device {lost}")), "{err}");
    assert_eq!(
        read_all(&store, "s", "tiny", 0, None).await.unwrap(),
        s_objs[1].1
    );
    let e = store.dataset(&DatasetName::new("e").unwrap()).unwrap();
    let s = store.dataset(&DatasetName::new("s").unwrap()).unwrap();
    let health_e = redundancy::dataset_health(&e, store.layout(), &missing);
    let health_s = redundancy::dataset_health(&s, store.layout(), &missing);
    assert!(health_e.starts_with("degraded"), "{health_e}");
    assert!(health_s.starts_with("at risk"), "{health_s}");
    let err = ingest_class(&store, "new", EC31, &[]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        matches!(&err, IngestError::Degraded { missing } if missing == &[2]),
        "{err:?}"
    );
    drop((e, s));
    drop(store);

    // Two devices gone: ec:3+1 cannot be served, so storaged will not start.
    std::fs::remove_file(&cfg.devices[((lost + 1) % 4) as usize]).unwrap();
    let err = Store::open(&cfg).unwrap_err();
    assert!(
        matches!(err, crate::error::OpenError::TooDegraded(_)),
        "{err}"
    );
    assert!(err.to_string().contains("\"e\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_replace_rebuilds_resumes_and_heals_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 16, 64 << 10);
    cfg.limits.replace_checkpoint_bytes = 128 << 10;
    let store = Store::open(&cfg).unwrap();
    let objs = objects();
    ingest_class(&store, "e", EC31, &as_refs(&objs))
        .await
        .unwrap();
    let more = vec![("more".to_string(), pattern(77, 2 << 20))];
    ingest_class(&store, "e2", EC31, &as_refs(&more))
        .await
        .unwrap();
    drop(store);
    let device_bytes = std::fs::metadata(&cfg.devices[2]).unwrap().len();
    std::fs::remove_file(&cfg.devices[2]).unwrap();
    let new = dir.path().join("new2.img");
    std::fs::File::create(&new)
        .unwrap()
        .set_len(device_bytes)
        .unwrap();

    // First attempt: interrupted half way (the future is dropped, as when
    // storaged dies), after some checkpoints.
    let store = Store::open(&cfg).unwrap();
    assert!(store.missing_devices()[2]);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut tx = Some(tx);
    {
        let replace = store.replace_device("2", &new, Default::default(), move |done, total| {
            if done * 2 >= total
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        });
        tokio::select! {
            r = replace => panic!("finished before the interruption: {r:?}"),
            _ = rx => {}
        }
    }
    drop(store);
    let store = Store::open(&cfg).unwrap();
    let state = store.rebuild_state().expect("interrupted rebuild is known");
    assert!(!state.running && state.index == 2);
    assert!(store.missing_devices()[2], "not trusted until resumed");
    check_all(&store, "e", &objs).await;
    // Another replacement is refused until this one is resumed.
    let other = store
        .replace_device(
            "1",
            &dir.path().join("x.img"),
            Default::default(),
            |_, _| {},
        )
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::FailedPrecondition, "{other}");
    assert!(
        matches!(other, AdminError::OtherReplacePending { index: 2, .. }),
        "{other:?}"
    );
    // Bad input.
    let e = store
        .replace_device("9", &new, Default::default(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        matches!(
            e,
            AdminError::NoSuchIndex {
                index: 9,
                device_count: 4
            }
        ),
        "{e:?}"
    );
    let e = store
        .replace_device("2", "relative.img".as_ref(), Default::default(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(matches!(e, AdminError::RelativePath(_)), "{e:?}");
    let report = store
        .replace_device("2", &new, Default::default(), |_, _| {})
        .await
        .unwrap();
    assert!(report.resumed && report.units_lost == 0, "{report:?}");
    assert!(report.units_rebuilt > 0);
    assert!(store.rebuild_state().is_none());
    assert!(!store.missing_devices().iter().any(|m| *m), "healthy");
    assert_eq!(store.status().devices[2].path, new);
    store.redundancy.stripe_cache.lock().unwrap().clear();
    let before = store.device_reconstructions()[2];
    check_all(&store, "e", &objs).await;
    check_all(&store, "e2", &more).await;
    assert_eq!(
        store.device_reconstructions()[2],
        before,
        "no more rebuilding"
    );
    let scrub = store.scrub(None, 1000, |_| {}).await.unwrap();
    assert_eq!((scrub.corrupt, scrub.missing), (0, 0), "{scrub:?}");
    drop(store);

    // The configuration still names the old path; the catalog knows better.
    let store = Store::open(&cfg).unwrap();
    assert!(!store.missing_devices().iter().any(|m| *m));
    assert_eq!(store.status().devices[2].path, new);
    check_all(&store, "e2", &more).await;
    // Healthy again: new data is accepted.
    ingest_class(&store, "after", EC31, &[("x", pattern(1, 10_000))])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_refuses_healthy_devices_missing_paths_and_used_devices() {
    // Guards against ReplaceDevice destroying a healthy pool: storaged
    // pointed a healthy device at any path, creating it and its parents.
    use crate::store::replace::ReplaceOptions;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, store, objs) = store_with_ec_dataset(dir.path()).await;
    let device_bytes = std::fs::metadata(&cfg.devices[0]).unwrap().len();
    let replace = |new: std::path::PathBuf, options: ReplaceOptions| {
        let store = Arc::clone(&store);
        async move { store.replace_device("0", &new, options, |_, _| {}).await }
    };
    // Missing: never created, nor its directories.
    let nowhere = dir.path().join("no").join("such").join("dev.img");
    let healthy_ok = ReplaceOptions {
        allow_healthy: true,
        overwrite: false,
    };
    let err = replace(nowhere.clone(), healthy_ok).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!dir.path().join("no").exists(), "no directory was created");
    // Healthy device: refused without the explicit flag.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(device_bytes)
        .unwrap();
    let err = replace(blank.clone(), ReplaceOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(matches!(err, AdminError::DeviceHealthy(0)), "{err:?}");
    // Too small, and holding data: refused even with the flag.
    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = replace(small, healthy_ok).await.unwrap_err();
    assert!(err.to_string().contains("small"), "{err}");
    assert!(
        matches!(
            err,
            AdminError::NewDevice(crate::device::DeviceError::TooSmall { .. })
        ),
        "{err:?}"
    );
    let used = dir.path().join("used.img");
    std::fs::write(&used, b"a file system, say").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&used)
        .unwrap()
        .set_len(device_bytes)
        .unwrap();
    let err = replace(used.clone(), healthy_ok).await.unwrap_err();
    assert!(err.to_string().contains("holds data"), "{err}");
    // Another device of a pool.
    let err = replace(cfg.devices[1].clone(), healthy_ok)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already device 1"), "{err}");
    assert!(
        matches!(err, AdminError::AlreadyInPool { index: 1, .. }),
        "{err:?}"
    );
    assert!(
        store.missing_devices().iter().all(|m| !m),
        "nothing changed"
    );
    check_all(&store, "e", &objs).await;
    // The admin's explicit flags: a healthy device onto a used file.
    let report = replace(
        used,
        ReplaceOptions {
            allow_healthy: true,
            overwrite: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.units_lost, 0, "{report:?}");
    check_all(&store, "e", &objs).await;
}

// Guards reconstruction as fine as the checksums: single flipped bytes in
// every unit of several ec:3+1 stripes, each in a different 32 KiB row,
// used to make the stripe unrecoverable ("units on devices [..] are lost
// or corrupt") although every row kept K good units. Now every object
// reads back exactly, scrub repairs every row and counts rows, and two
// flips in one row (M = 1) give DATA_LOSS, never wrong bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rot_scattered_over_every_unit_is_rebuilt_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let unit: u64 = 128 << 10;
    let cfg = config(dir.path(), 16, unit);
    let store = Store::open(&cfg).unwrap();
    let objs = objects();
    let h = ingest_class(&store, "e", EC31, &as_refs(&objs))
        .await
        .unwrap();
    assert_eq!(h.record.unit_rows, 4, "128 KiB units, 32 KiB rows");
    let ec = h.layout.ec().unwrap();
    let stripes = ec.map.stripes().min(3);
    assert!(stripes >= 2);
    for stripe in 0..stripes {
        for p in 0..4u32 {
            // Unit p rots in row p: every unit is bad, every row has one.
            let (d, off) = ec.map.unit_location(stripe, p);
            let at = off + u64::from(p) * (32 << 10) + 1000 + stripe * 7;
            let mut b = peek(&cfg, d, at, 1);
            b[0] ^= 0x10;
            poke(&cfg, d, at, &b);
        }
    }
    check_all(&store, "e", &objs).await;
    let report = store.scrub(None, 1000, |_| {}).await.unwrap();
    let units = 4 * stripes;
    assert_eq!(
        (report.corrupt, report.repaired, report.unrecoverable),
        (units, units, 0),
        "{report:?}"
    );
    assert_eq!(
        (report.rows_corrupt, report.rows_repaired),
        (units, units),
        "{report:?}"
    );
    let again = store.scrub(None, 1000, |_| {}).await.unwrap();
    assert_eq!((again.corrupt, again.rows_corrupt), (0, 0), "{again:?}");
    drop(store);
    let store = Store::open(&cfg).unwrap();
    check_all(&store, "e", &objs).await;

    // Two bad units in one row of stripe 0: inside "a/4095" (data bytes
    // 4096..8191, unit 0) and the same row of unit 1.
    let a = store
        .lookup(
            &DatasetName::new("e").unwrap(),
            &ObjectPath::new("a/4095").unwrap(),
        )
        .unwrap();
    assert_eq!(a.record.logical_offset, 4096);
    for p in [0u32, 1] {
        let (d, off) = ec.map.unit_location(0, p);
        let mut b = peek(&cfg, d, off + 4196, 1);
        b[0] ^= 0x20;
        poke(&cfg, d, off + 4196, &b);
    }
    drop(a);
    drop(store);
    let store = Store::open(&cfg).unwrap();
    let err = read_all(&store, "e", "a/4095", 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    let report = store.scrub(None, 1000, |_| {}).await.unwrap();
    assert!(report.unrecoverable >= 1, "{report:?}");
}
