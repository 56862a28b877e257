//! The power-loss matrix: every operation that changes the pool, cut by a
//! power failure at seeded points, then reopened in process.
//!
//! Each scenario starts from a copy of a prepared pool, opens a store on a
//! [`CrashDisk`] (engine, metadata files and catalog all on it), runs one
//! operation (ingest of a `stripe` or `ec` dataset, `rm`, a scrub that
//! repairs rot, a device replacement, the start-up that rebuilds a lost
//! catalog, or the one that upgrades a version 1 pool in place) and cuts
//! the power at mutating operation `point`; the disk then keeps, drops or
//! tears every write no completed sync covered. A plain
//! store opened on the result must show:
//! - every dataset committed before the operation, byte for byte;
//! - the operation's own dataset present and whole if the operation was
//!   acknowledged (absent if it was an acknowledged `rm`), and otherwise
//!   either absent or whole, never partial;
//! - no other dataset; the catalog agreeing with the root on the devices;
//! - space accounted exactly: used bytes are the committed datasets'
//!   extents, and a new ingest into the free space leaves every committed
//!   byte where it was;
//! - a scrub with nothing unrecoverable.
//!
//! Points are spread over each operation's whole run (measured first by a
//! run without a crash), with the acknowledgement itself as the last one.
//! Every case prints its scenario, seed and point before it runs, so a
//! failure names what to rerun. `STORAGED_CRASH_SEED` changes the base seed
//! and `STORAGED_CRASH_POINTS` the points per scenario (default 24: 168
//! points over the seven scenarios).

use std::path::Path;

use super::tests::{
    config, discards_settled, ingest_class, owned_bytes, pattern, read_all, set_superblock_version,
    superblock_version,
};
use super::*;
use crate::crash::CrashDisk;

const EC31: StorageClass = StorageClass::Ec {
    data_units: 3,
    parity_units: 1,
};

type Objects = Vec<(String, Vec<u8>)>;

/// One dataset and what it must hold.
#[derive(Clone)]
struct Expected {
    name: &'static str,
    class: StorageClass,
    objects: Objects,
}

fn expected(name: &'static str, class: StorageClass, seed: u64, sizes: &[usize]) -> Expected {
    Expected {
        name,
        class,
        objects: sizes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("o{i}"), pattern(seed * 100 + i as u64, *n)))
            .collect(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    IngestStripe,
    IngestEc,
    Rm,
    ScrubRepair,
    Replace,
    CatalogRecovery,
    /// A start that upgrades a version 1 pool in place.
    Upgrade,
}

impl Scenario {
    /// The start-up itself is the operation.
    fn is_start(self) -> bool {
        matches!(self, Scenario::CatalogRecovery | Scenario::Upgrade)
    }
}

/// 4 devices of 16 MiB, 64 KiB units; a replacement records its progress
/// every few units, so the power can go between checkpoints.
fn pool_config(dir: &Path) -> crate::config::StoreConfig {
    let mut cfg = config(dir, 16, 64 << 10);
    cfg.limits.replace_checkpoint_bytes = 3 * (64 << 10);
    cfg
}

/// A prepared pool: its directory (devices and catalog) and its datasets.
struct Golden {
    dir: tempfile::TempDir,
    datasets: Vec<Expected>,
    /// (device, offset) of bytes to rot for the scrub scenario: one unit
    /// of each of several stripes of the first `ec` dataset.
    rot: Vec<(u32, u64)>,
    pool_id: [u8; 16],
}

async fn golden(datasets: Vec<Expected>) -> Golden {
    let dir = tempfile::tempdir().unwrap();
    let cfg = pool_config(dir.path());
    let store = Store::open(&cfg).unwrap();
    for d in &datasets {
        let refs: Vec<(&str, Vec<u8>)> = d
            .objects
            .iter()
            .map(|(p, b)| (p.as_str(), b.clone()))
            .collect();
        ingest_class(&store, d.name, d.class, &refs).await.unwrap();
    }
    let mut rot = Vec::new();
    if let Some(e) = datasets.iter().find(|d| d.class == EC31) {
        let ds = store.dataset(&DatasetName::new(e.name).unwrap()).unwrap();
        let ec = ds.layout.ec().unwrap();
        for stripe in 0..ec.map.stripes().min(4) {
            let position = (stripe % 4) as u32;
            let (device, offset) = ec.map.unit_location(stripe, position);
            rot.push((device, offset + 1000 + stripe * 4096));
        }
    }
    discards_settled(&store).await;
    let pool_id = store.pool_id;
    drop(store);
    Golden {
        dir,
        datasets,
        rot,
        pool_id,
    }
}

fn mixed() -> Vec<Expected> {
    vec![
        expected("s", StorageClass::Stripe, 1, &[300_000, 5000, 0]),
        expected("e", EC31, 2, &[700_000, 200_000]),
    ]
}

fn ec_only() -> Vec<Expected> {
    vec![
        expected("e", EC31, 2, &[700_000, 200_000]),
        expected("f", EC31, 3, &[400_000]),
    ]
}

/// Copies the regular files of `from` into `to`, leaving zero blocks as
/// holes (the devices are sparse).
fn copy_pool(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        let out = std::fs::File::create(to.join(entry.file_name())).unwrap();
        out.set_len(bytes.len() as u64).unwrap();
        for (i, chunk) in bytes.chunks(64 << 10).enumerate() {
            if chunk.iter().any(|b| *b != 0) {
                out.write_all_at(chunk, (i as u64) << 16).unwrap();
            }
        }
    }
}

/// Turns the pool into what version 1 wrote: no roots, no manifests, every
/// superblock at version 1.
fn make_version_1(cfg: &crate::config::StoreConfig, pool_id: [u8; 16]) {
    use std::os::unix::fs::FileExt;
    for dev in &cfg.devices {
        let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
        f.write_all_at(&vec![0u8; (1 << 20) - 8192], 8192).unwrap();
        set_superblock_version(dev, 1);
    }
    let catalog = Catalog::open(&cfg.data_dir.join("catalog.redb"), pool_id, false).unwrap();
    for (name, mut rec) in catalog.datasets().unwrap() {
        rec.manifest = None;
        catalog.put_dataset_record(&name, &rec).unwrap();
    }
    catalog.set_meta(&[("root_generation", None)]).unwrap();
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[!b[0]], offset).unwrap();
}

/// What the operation under test did before the power went.
struct Outcome {
    /// Mutating operations it made (a crash point past them cuts the
    /// power after the acknowledgement).
    ops: u64,
    acknowledged: bool,
}

/// Waits until `store`'s freed space is discarded, or the power is off
/// (a discard then fails and its space stays pending).
async fn settled_or_crashed(store: &Store, disk: &CrashDisk) {
    let c = store.discard_counters();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !disk.crashed()
        && (c.pending_bytes.load(Ordering::Relaxed) > 0
            || (c.enabled.load(Ordering::Relaxed) && !c.startup_pass_done.load(Ordering::Relaxed)))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "discards do not settle"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// The operation's own dataset (None: the operation has none).
fn subject(scenario: Scenario) -> Option<Expected> {
    match scenario {
        Scenario::IngestStripe => Some(expected(
            "n",
            StorageClass::Stripe,
            7,
            &[200_000, 4096, 150_001],
        )),
        Scenario::IngestEc => Some(expected("n", EC31, 8, &[500_000, 70_000])),
        _ => None,
    }
}

/// Runs `scenario` on a copy of `golden`, the power cut at mutating
/// operation `point` (counted from the operation's start; `None`: not
/// before the end), then reopens and checks. Returns what the operation
/// did.
async fn run_case(golden: &Golden, scenario: Scenario, seed: u64, point: Option<u64>) -> Outcome {
    let work = tempfile::tempdir().unwrap();
    copy_pool(golden.dir.path(), work.path());
    let cfg = pool_config(work.path());
    let new_device = work.path().join("new2.img");
    match scenario {
        Scenario::ScrubRepair => {
            for (device, offset) in &golden.rot {
                flip(&cfg.devices[*device as usize], *offset);
            }
        }
        Scenario::Replace => {
            std::fs::remove_file(&cfg.devices[2]).unwrap();
            std::fs::File::create(&new_device)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
        }
        Scenario::CatalogRecovery => {
            std::fs::remove_file(work.path().join("catalog.redb")).unwrap()
        }
        Scenario::Upgrade => make_version_1(&cfg, golden.pool_id),
        _ => {}
    }

    let disk = CrashDisk::new();
    let mut outcome = Outcome {
        ops: 0,
        acknowledged: false,
    };
    if scenario.is_start() {
        disk.crash_at(point.unwrap_or(u64::MAX));
        let store = Store::open_hooked(&cfg, disk.hooks());
        outcome.acknowledged = store.is_ok() && !disk.crashed();
        outcome.ops = disk.ops();
        if let Ok(store) = store {
            settled_or_crashed(&store, &disk).await;
        }
    } else {
        let store = Store::open_hooked(&cfg, disk.hooks()).unwrap();
        settled_or_crashed(&store, &disk).await;
        let base = disk.ops();
        if let Some(p) = point {
            disk.crash_at(base + p);
        }
        let ok = match scenario {
            Scenario::IngestStripe | Scenario::IngestEc => {
                let d = subject(scenario).unwrap();
                let refs: Vec<(&str, Vec<u8>)> = d
                    .objects
                    .iter()
                    .map(|(p, b)| (p.as_str(), b.clone()))
                    .collect();
                ingest_class(&store, d.name, d.class, &refs).await.is_ok()
            }
            Scenario::Rm => store.delete(&DatasetName::new("s").unwrap()).await.is_ok(),
            Scenario::ScrubRepair => match store.scrub(None, 1000, |_| {}).await {
                Ok(r) => r.unrecoverable == 0,
                Err(_) => false,
            },
            Scenario::Replace => store
                .replace_device("2", &new_device, Default::default(), |_, _| {})
                .await
                .is_ok(),
            Scenario::CatalogRecovery | Scenario::Upgrade => unreachable!(),
        };
        // What the operation started (freed space's discards) belongs to it.
        settled_or_crashed(&store, &disk).await;
        outcome.acknowledged = ok && !disk.crashed();
        outcome.ops = disk.ops() - base;
    }
    let report = disk.power_off(seed).unwrap();
    println!("  acknowledged {}, {report:?}", outcome.acknowledged);

    // A pool with a root keeps one (a version 1 pool has none until its
    // upgrade writes it).
    let root = crate::poolmeta::peek_root(&cfg.devices);
    assert!(
        root.is_some() || scenario == Scenario::Upgrade,
        "the devices' root is lost"
    );
    let store = Store::open(&cfg).unwrap_or_else(|e| panic!("reopen: {e}"));
    let root = crate::poolmeta::peek_root(&cfg.devices).expect("a root after the start");
    let mut names: Vec<String> = store
        .list_datasets()
        .iter()
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    let mut root_names: Vec<String> = root.entries.iter().map(|e| e.name.clone()).collect();
    root_names.sort();
    assert_eq!(names, root_names, "the catalog is the devices' root");

    if scenario == Scenario::Upgrade {
        for dev in &cfg.devices {
            assert_eq!(superblock_version(dev), 2, "{} upgraded", dev.display());
        }
    }
    // An unfinished replacement resumes (or starts again, if the power
    // went before it was recorded) and completes.
    if scenario == Scenario::Replace && store.missing_devices()[2] {
        let r = store
            .replace_device("2", &new_device, Default::default(), |_, _| {})
            .await
            .unwrap();
        assert_eq!(r.units_lost, 0, "{r:?}");
    }
    // Every committed byte is where it was written, parity included: a
    // write the power cut may only have hit what nothing refers to yet.
    // (The rot the scrub scenario planted may still be there.)
    let report = store.scrub(None, 10_000, |_| {}).await.unwrap();
    let clean = report.unrecoverable == 0
        && (scenario == Scenario::ScrubRepair || report.corrupt + report.rows_corrupt == 0);
    assert!(clean, "{report:?}");

    // Which datasets must be there, and which may be.
    let mut must: Vec<Expected> = golden.datasets.clone();
    let mut may: Vec<Expected> = Vec::new();
    match scenario {
        Scenario::Rm => {
            let s = must.remove(must.iter().position(|d| d.name == "s").unwrap());
            if !outcome.acknowledged {
                may.push(s);
            }
        }
        Scenario::IngestStripe | Scenario::IngestEc => {
            let n = subject(scenario).unwrap();
            if outcome.acknowledged {
                must.push(n);
            } else {
                may.push(n);
            }
        }
        _ => {}
    }
    for d in must.iter().chain(&may) {
        let present = store.dataset(&DatasetName::new(d.name).unwrap()).is_ok();
        assert!(
            present || may.iter().any(|m| m.name == d.name),
            "committed dataset {} is lost",
            d.name
        );
        if present {
            for (path, bytes) in &d.objects {
                let got = read_all(&store, d.name, path, 0, None)
                    .await
                    .unwrap_or_else(|e| panic!("{}/{path}: {e}", d.name));
                assert!(got == *bytes, "{}/{path} differs", d.name);
            }
        }
    }
    for name in &names {
        assert!(
            must.iter().chain(&may).any(|d| d.name == name),
            "dataset {name} appeared from nowhere"
        );
    }

    // Space: exactly the committed datasets' extents are used ...
    discards_settled(&store).await;
    let owned = owned_bytes(&store);
    assert_eq!(store.status().used_bytes, owned, "space accounted exactly");
    // ... and the rest is free: filling some of it overwrites nothing.
    let filler = pattern(seed, 3 << 20);
    ingest_class(
        &store,
        "filler",
        StorageClass::Stripe,
        &[("f", filler.clone())],
    )
    .await
    .unwrap();
    let report = store.scrub(None, 10_000, |_| {}).await.unwrap();
    assert!(
        report.unrecoverable + report.corrupt + report.rows_corrupt == 0,
        "after the filler: {report:?}"
    );
    for d in store.list_datasets() {
        let Some(e) = must.iter().chain(&may).find(|e| e.name == d.name) else {
            continue;
        };
        for (path, bytes) in &e.objects {
            assert!(read_all(&store, e.name, path, 0, None).await.unwrap() == *bytes);
        }
    }
    assert!(read_all(&store, "filler", "f", 0, None).await.unwrap() == filler);
    outcome
}

/// Runs the matrix for one scenario: a run without a crash to measure it,
/// then the seeded points.
async fn matrix(scenario: Scenario, datasets: Vec<Expected>) {
    let base_seed: u64 = std::env::var("STORAGED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0015);
    let points: u64 = std::env::var("STORAGED_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let golden = golden(datasets).await;
    println!("power-loss {scenario:?}: measuring (seed {base_seed})");
    let full = run_case(&golden, scenario, base_seed, None).await;
    assert!(full.acknowledged, "{scenario:?} works without a crash");
    let mut acknowledged = 0;
    for i in 0..points {
        let seed = base_seed.wrapping_add(i.wrapping_mul(0x9e37_79b9));
        // Stratified: point i falls in the i-th slice of the run, where in
        // it the seed says; the last is after the acknowledgement.
        let lo = i * (full.ops + 1) / points;
        let hi = ((i + 1) * (full.ops + 1) / points).max(lo + 1);
        let point = if i + 1 == points {
            full.ops // just after the acknowledgement
        } else {
            lo + seed % (hi - lo)
        };
        println!(
            "power-loss {scenario:?} seed {seed} point {point} of {}",
            full.ops
        );
        let o = run_case(&golden, scenario, seed, Some(point)).await;
        acknowledged += u64::from(o.acknowledged);
    }
    println!(
        "power-loss {scenario:?}: {points} points over {} operations, {acknowledged} after the acknowledgement, datasets lost 0",
        full.ops
    );
}

// Guards against an ingest that a power cut leaves half visible, or that
// loses or overwrites committed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_stripe_ingest() {
    matrix(Scenario::IngestStripe, mixed()).await;
}

// Guards against the same for `ec` stripes, parity and row CRCs included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_ec_ingest() {
    matrix(Scenario::IngestEc, mixed()).await;
}

// Guards against an `rm` that a power cut undoes after its acknowledgement,
// leaves half done, or whose freed space is handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_rm() {
    matrix(Scenario::Rm, mixed()).await;
}

// Guards against a repair that a power cut turns into damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_scrub_repair() {
    matrix(Scenario::ScrubRepair, mixed()).await;
}

// Guards against a replacement whose checkpoint runs ahead of what is
// durable on the new device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_device_replacement() {
    matrix(Scenario::Replace, ec_only()).await;
}

// Guards against a catalog rebuild that a power cut leaves half done and
// the next start trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_catalog_recovery() {
    matrix(Scenario::CatalogRecovery, mixed()).await;
}

// Guards against an in-place upgrade that a power cut leaves unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_version_1_upgrade() {
    matrix(Scenario::Upgrade, mixed()).await;
}
