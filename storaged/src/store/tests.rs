//! Store-level tests: ingest and read in-process, with faults injected
//! through the engine trait.

use std::os::fd::AsRawFd;

use super::*;
use crate::config::StoreConfig;
use crate::engine::EngineKind;
use crate::engine::fault::{Fault, FaultPlan, FaultRule, FaultyBackend};
use crate::error::{IngestError, ReadError};
use crate::service::GrpcCode;

pub(super) fn config(dir: &std::path::Path, device_mib: u64, unit: u64) -> StoreConfig {
    let mut c = StoreConfig::with_defaults(dir.to_path_buf());
    c.device_size_bytes = device_mib << 20;
    c.stripe_unit_bytes = unit;
    c.buffer_pool_bytes = 16 << 20;
    c.engine = EngineKind::Uring;
    c.limits.message_bytes = 256 << 10;
    c.limits.read_ahead_bytes = 1 << 20;
    c
}

pub(super) use crate::testkit::pattern;

/// A store whose engine injects the faults of the returned plan.
fn faulty_store(dir: &std::path::Path) -> (Arc<Store>, Arc<FaultPlan>) {
    let plan = Arc::new(FaultPlan::default());
    let p2 = Arc::clone(&plan);
    let store = Store::open_with(&config(dir, 16, 64 << 10), move |e| {
        Arc::new(FaultyBackend::new(e, p2))
    })
    .unwrap();
    (store, plan)
}

async fn ingest(
    store: &Arc<Store>,
    name: &str,
    objects: &[(&str, Vec<u8>)],
) -> Result<Arc<DatasetHandle>, IngestError> {
    ingest_class(store, name, StorageClass::Stripe, objects).await
}

pub(super) async fn ingest_class(
    store: &Arc<Store>,
    name: &str,
    class: StorageClass,
    objects: &[(&str, Vec<u8>)],
) -> Result<Arc<DatasetHandle>, IngestError> {
    let mut s = store.begin_ingest(DatasetName::new(name).unwrap(), class, Default::default())?;
    let mut total = 0u64;
    for (path, data) in objects {
        s.begin_object(
            ObjectPath::new(*path).unwrap(),
            data.len() as u64,
            Some(crc32fast::hash(data)),
        )
        .await?;
        for chunk in data.chunks(100_003) {
            s.data(chunk).await?;
        }
        total += data.len() as u64;
    }
    s.commit(objects.len() as u64, total).await
}

/// Bytes the committed datasets own (their extents and manifest rows):
/// what `used_bytes` must be once freed space is discarded.
pub(super) fn owned_bytes(store: &Store) -> u64 {
    store
        .list_datasets()
        .iter()
        .flat_map(|d| d.record.owned_extents())
        .map(|e| e.len)
        .sum()
}

/// Waits until `used_bytes` is `expected` (space of an aborted ingest goes
/// back once its writes land and its discard ran), failing after 30 s.
pub(super) async fn used_settles_to(store: &Store, expected: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let used = store.status().used_bytes;
        if used == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "used_bytes stays {used}, expected {expected}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Waits until the start-up discard pass is done and every freed extent
/// has been discarded and is back in the allocator.
pub(super) async fn discards_settled(store: &Store) {
    let c = store.discard_counters();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.pending_bytes.load(Ordering::Relaxed) > 0
        || (c.enabled.load(Ordering::Relaxed) && !c.startup_pass_done.load(Ordering::Relaxed))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "discards do not settle"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

pub(super) async fn read_all(
    store: &Arc<Store>,
    ds: &str,
    path: &str,
    off: u64,
    len: Option<u64>,
) -> Result<Vec<u8>, ReadError> {
    let obj = Arc::new(store.lookup(
        &DatasetName::new(ds).unwrap(),
        &ObjectPath::new(path).unwrap(),
    )?);
    let (start, len) = Store::resolve_range(&obj, off, len)?;
    let mut out = Vec::new();
    let mut s = std::pin::pin!(store.read_stream(obj, start, len));
    while let Some(c) = s.next().await {
        let (o, b) = c?;
        assert_eq!(o, start + out.len() as u64, "chunks arrive in order");
        out.extend_from_slice(&b);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_read_ranges_across_stripes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 16, 64 << 10)).unwrap();
    let big = pattern(1, 3 * 1024 * 1024 + 12345);
    let objs: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("one", pattern(2, 1)),
        ("a/4095", pattern(3, 4095)),
        ("a/4096", pattern(4, 4096)),
        ("a/4097", pattern(5, 4097)),
        ("big/shard-0", big.clone()),
        ("ünïcødé/файл", pattern(6, 70_000)),
    ];
    ingest(&store, "ds", &objs).await.unwrap();
    for (p, d) in &objs {
        assert_eq!(&read_all(&store, "ds", p, 0, None).await.unwrap(), d, "{p}");
    }
    // Ranges that cross checksum blocks and stripe units.
    for (off, len) in [
        (0u64, 1u64),
        (65535, 2),
        (32767, 40000),
        (1 << 20, 3 << 19),
        (big.len() as u64 - 1, 1),
        (big.len() as u64, 0),
    ] {
        let got = read_all(&store, "ds", "big/shard-0", off, Some(len))
            .await
            .unwrap();
        assert_eq!(got, &big[off as usize..(off + len) as usize], "{off}+{len}");
    }
    assert!(matches!(
        read_all(&store, "ds", "big/shard-0", big.len() as u64 + 1, None).await,
        Err(ReadError::OutOfRange { .. })
    ));
    assert!(matches!(
        read_all(&store, "ds", "one", 0, Some(2)).await,
        Err(ReadError::OutOfRange { .. })
    ));
    // Guards against the error naming the end of the range where the user
    // gave an offset (`cat --offset 209715190 --length 100` said "offset
    // 209715290"): the offset and length asked for are named.
    let size = big.len() as u64;
    let e = read_all(&store, "ds", "big/shard-0", size - 10, Some(100))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("offset {} with length 100", size - 10)),
        "{e}"
    );
    assert!(matches!(
        read_all(&store, "ds", "nope", 0, None).await,
        Err(ReadError::ObjectNotFound { .. })
    ));
    assert!(matches!(
        read_all(&store, "nods", "one", 0, None).await,
        Err(ReadError::DatasetNotFound(_))
    ));
    let st = store.status();
    assert_eq!(st.datasets.len(), 1);
    assert!(st.used_bytes >= big.len() as u64);
    assert_eq!(
        st.devices.iter().map(|d| d.used_bytes).sum::<u64>(),
        st.used_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_in_order_with_inband_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 16, 64 << 10)).unwrap();
    let a = pattern(7, 600_000);
    let b = pattern(8, 5000);
    ingest(&store, "ds", &[("a", a.clone()), ("b", b.clone())])
        .await
        .unwrap();
    let items = vec![
        Ok(RangeSpec {
            path: ObjectPath::new("b").unwrap(),
            offset: 0,
            length: None,
        }),
        Ok(RangeSpec {
            path: ObjectPath::new("missing").unwrap(),
            offset: 0,
            length: None,
        }),
        Ok(RangeSpec {
            path: ObjectPath::new("a").unwrap(),
            offset: 100,
            length: Some(500_000),
        }),
        Err(ReadError::InvalidName(
            storaged_proto::ObjectPath::new("").unwrap_err(),
        )),
        Ok(RangeSpec {
            path: ObjectPath::new("b").unwrap(),
            offset: 4999,
            length: Some(5),
        }),
        Ok(RangeSpec {
            path: ObjectPath::new("b").unwrap(),
            offset: 5000,
            length: None,
        }),
    ];
    let events: Vec<BatchEvent> = store
        .read_batch(&DatasetName::new("ds").unwrap(), None, items, 3)
        .unwrap()
        .collect()
        .await;
    let mut per_item: BTreeMap<u32, (Vec<u8>, Option<tonic::Code>, bool)> = BTreeMap::new();
    let mut last_index = 0;
    for e in events {
        assert!(e.index() >= last_index, "items in request order");
        last_index = e.index();
        let entry = per_item.entry(e.index()).or_default();
        assert!(!entry.2, "nothing after an item's last message");
        match e {
            BatchEvent::Data { data, last, .. } => {
                entry.0.extend_from_slice(&data);
                entry.2 = last;
            }
            BatchEvent::Error { error, .. } => {
                entry.1 = Some(error.code());
                entry.2 = true;
            }
        }
    }
    assert_eq!(per_item[&0].0, b);
    assert_eq!(per_item[&1].1, Some(tonic::Code::NotFound));
    assert_eq!(per_item[&2].0, &a[100..500_100]);
    assert_eq!(per_item[&3].1, Some(tonic::Code::InvalidArgument));
    assert_eq!(per_item[&4].1, Some(tonic::Code::OutOfRange));
    assert!(per_item[&5].0.is_empty() && per_item[&5].2);
}

// Guards against serving wrong bytes: a flipped bit under an object must
// give DATA_LOSS naming the device, while other objects stay readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_detected_per_block() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan) = faulty_store(dir.path());
    let a = pattern(9, 200_000);
    let b = pattern(10, 200_000);
    ingest(&store, "ds", &[("a", a.clone()), ("b", b.clone())])
        .await
        .unwrap();
    let obj = store
        .lookup(
            &DatasetName::new("ds").unwrap(),
            &ObjectPath::new("a").unwrap(),
        )
        .unwrap();
    let (dev, off) = store.layout().map(obj.record.logical_offset + 70_000);
    plan.add(FaultRule {
        device: Some(dev),
        kind: None,
        device_range: Some((off, off + 1)),
        fault: Fault::FlipByte(0),
        remaining: None,
    });
    let err = read_all(&store, "ds", "a", 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss);
    let msg = err.to_string();
    assert!(
        msg.contains("\"a\"") && msg.contains(&format!("device {dev}")),
        "{msg}"
    );
    // Bytes of the same object outside the bad block still read.
    assert_eq!(
        read_all(&store, "ds", "a", 0, Some(32768)).await.unwrap(),
        &a[..32768]
    );
    assert_eq!(read_all(&store, "ds", "b", 0, None).await.unwrap(), b);
    // EIO is reported as unavailable, not as wrong bytes.
    plan.clear();
    plan.add(FaultRule {
        device: None,
        kind: Some(crate::engine::OpKind::Read),
        device_range: None,
        fault: Fault::Errno(libc::EIO),
        remaining: Some(1),
    });
    assert_eq!(
        read_all(&store, "ds", "b", 0, None)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unavailable
    );
    assert_eq!(read_all(&store, "ds", "b", 0, None).await.unwrap(), b);
}

// Guards against a failed fsync or device write being reported as a
// successful ingest, and against leaking the space of a failed ingest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_and_sync_fail_the_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan) = faulty_store(dir.path());
    plan.set_fail_sync(true);
    let err = ingest(&store, "x", &[("a", pattern(1, 100_000))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, IngestError::Store(StoreError::Sync { .. })),
        "{err}"
    );
    plan.clear();
    plan.add(FaultRule {
        device: None,
        kind: Some(crate::engine::OpKind::Write),
        device_range: None,
        fault: Fault::Errno(libc::ENOSPC),
        remaining: None,
    });
    let err = ingest(&store, "x", &[("a", pattern(1, 300_000))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    plan.clear();
    used_settles_to(&store, 0).await;
    assert!(store.list_datasets().is_empty());
    ingest(&store, "x", &[("a", pattern(1, 300_000))])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_aborted_ingest_delete_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4, 64 << 10);
    let store = Store::open(&cfg).unwrap();
    let cap = store.status().capacity_bytes;
    assert_eq!(cap, 4 * (3 << 20));
    // Too big: RESOURCE_EXHAUSTED, nothing left behind.
    let err = ingest(&store, "big", &[("x", pattern(1, cap as usize + 1))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    used_settles_to(&store, 0).await;
    // A hostile size is refused before any arithmetic on it.
    let mut s = store
        .begin_ingest(
            DatasetName::new("huge").unwrap(),
            StorageClass::Stripe,
            Default::default(),
        )
        .unwrap();
    let err = s
        .begin_object(ObjectPath::new("x").unwrap(), u64::MAX, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    drop(s);
    // An aborted (dropped) session frees its space.
    {
        let mut s = store
            .begin_ingest(
                DatasetName::new("half").unwrap(),
                StorageClass::Stripe,
                Default::default(),
            )
            .unwrap();
        s.begin_object(ObjectPath::new("x").unwrap(), 1 << 20, None)
            .await
            .unwrap();
        s.data(&pattern(2, 500_000)).await.unwrap();
        assert!(
            store
                .begin_ingest(
                    DatasetName::new("half").unwrap(),
                    StorageClass::Stripe,
                    Default::default()
                )
                .is_err()
        );
    }
    used_settles_to(&store, 0).await;
    // Protocol errors.
    let mut s = store
        .begin_ingest(
            DatasetName::new("p").unwrap(),
            StorageClass::Stripe,
            Default::default(),
        )
        .unwrap();
    s.begin_object(ObjectPath::new("x").unwrap(), 10, None)
        .await
        .unwrap();
    assert!(matches!(
        s.data(&[0; 11]).await,
        Err(IngestError::TooMuchData { size: 10, .. })
    ));
    drop(s);
    let mut s = store
        .begin_ingest(
            DatasetName::new("p").unwrap(),
            StorageClass::Stripe,
            Default::default(),
        )
        .unwrap();
    s.begin_object(ObjectPath::new("x").unwrap(), 0, None)
        .await
        .unwrap();
    assert!(matches!(
        s.begin_object(ObjectPath::new("x").unwrap(), 0, None).await,
        Err(IngestError::DuplicateObject { .. })
    ));
    drop(s);
    // Guards against a dataset no file tree can hold (`a` and `a/b`:
    // export failed half-way), in either order.
    for (first, second) in [("a", "a/b/c"), ("a/b/c", "a/b"), ("a/b/c", "a")] {
        let mut s = store
            .begin_ingest(
                DatasetName::new("tree").unwrap(),
                StorageClass::Stripe,
                Default::default(),
            )
            .unwrap();
        s.begin_object(ObjectPath::new(first).unwrap(), 0, None)
            .await
            .unwrap();
        let err = s
            .begin_object(ObjectPath::new(second).unwrap(), 0, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("both an object and a directory"),
            "{first} then {second}: {err}"
        );
        assert!(
            matches!(&err, IngestError::TreeConflict { path, .. } if path == second),
            "{err:?}"
        );
    }
    let mut s = store
        .begin_ingest(
            DatasetName::new("p").unwrap(),
            StorageClass::Stripe,
            Default::default(),
        )
        .unwrap();
    s.begin_object(ObjectPath::new("x").unwrap(), 3, Some(1234))
        .await
        .unwrap();
    assert!(matches!(
        s.data(b"abc").await,
        Err(IngestError::CrcMismatch { client: 1234, .. })
    ));
    drop(s);

    let keep = pattern(3, 1_000_000);
    ingest(&store, "keep", &[("k", keep.clone())])
        .await
        .unwrap();
    ingest(&store, "gone", &[("g", pattern(4, 2_000_000))])
        .await
        .unwrap();
    assert!(matches!(
        ingest(&store, "keep", &[]).await,
        Err(IngestError::DatasetExists(_))
    ));
    let used = store.status().used_bytes;
    let freed = store
        .delete(&DatasetName::new("gone").unwrap())
        .await
        .unwrap();
    discards_settled(&store).await;
    assert_eq!(store.status().used_bytes, used - freed);
    assert!(
        store
            .delete(&DatasetName::new("gone").unwrap())
            .await
            .is_err()
    );
    drop(store);

    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.list_datasets().len(), 1);
    assert_eq!(read_all(&store, "keep", "k", 0, None).await.unwrap(), keep);
    assert_eq!(store.status().used_bytes, used - freed);
}

/// Counts device reads and bytes read, to check read amplification and
/// merging.
struct CountingBackend {
    inner: Arc<dyn IoBackend>,
    read_bytes: std::sync::atomic::AtomicU64,
    reads: std::sync::atomic::AtomicU64,
}

/// A store whose device reads are counted.
fn counting_store(cfg: &StoreConfig) -> (Arc<Store>, Arc<CountingBackend>) {
    let counter: Arc<std::sync::Mutex<Option<Arc<CountingBackend>>>> = Arc::default();
    let c2 = Arc::clone(&counter);
    let store = Store::open_with(cfg, move |e| {
        let c = Arc::new(CountingBackend {
            inner: e,
            read_bytes: Default::default(),
            reads: Default::default(),
        });
        *c2.lock().unwrap() = Some(Arc::clone(&c));
        c
    })
    .unwrap();
    let counter = counter.lock().unwrap().clone().unwrap();
    (store, counter)
}

impl IoBackend for CountingBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn submit(&self, op: crate::engine::IoOp, buf: BufLease) -> crate::buf::IoFuture {
        if op.kind == crate::engine::OpKind::Read {
            self.read_bytes
                .fetch_add(u64::from(op.len), Ordering::SeqCst);
            self.reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.submit(op, buf)
    }
    fn read_foreign(&self, read: crate::engine::ForeignRead) -> crate::engine::ForeignReadFuture {
        self.read_bytes
            .fetch_add(u64::from(read.len), Ordering::SeqCst);
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_foreign(read)
    }
    fn discard(&self, device: u32, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(device, offset, len)
    }
    fn sync(&self, device: u32) -> std::io::Result<()> {
        self.inner.sync(device)
    }
    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }
    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<crate::engine::FixedForeign> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.fix_foreign(base, len) }
    }
}

// Guards the integrity granularity promise: any 4 KiB read, wherever it
// falls, costs at most 64 KiB of device reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_reads_read_at_most_64_kib() {
    let dir = tempfile::tempdir().unwrap();
    let (store, counter) = counting_store(&config(dir.path(), 16, 64 << 10));
    let data = pattern(11, 1 << 20);
    ingest(
        &store,
        "ds",
        &[("pad", pattern(12, 5000)), ("x", data.clone())],
    )
    .await
    .unwrap();
    for off in [
        0u64,
        4096,
        32768 - 2048,
        65536 - 100,
        500_000,
        (1 << 20) - 4096,
    ] {
        let before = counter.read_bytes.load(Ordering::SeqCst);
        let got = read_all(&store, "ds", "x", off, Some(4096)).await.unwrap();
        let cost = counter.read_bytes.load(Ordering::SeqCst) - before;
        assert_eq!(got, &data[off as usize..off as usize + 4096]);
        assert!(cost <= 64 << 10, "4 KiB at {off} read {cost} device bytes");
    }
}

// Any-order batches: every item exactly once with its own bytes, each item's
// messages together, errors in-band, multi-window items reassembled, and the
// size cap enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_order_batch_delivers_each_item_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 16, 64 << 10);
    cfg.limits.batch_any_order_item_bytes_max = 1 << 20;
    let store = Store::open(&cfg).unwrap();
    let objs: Vec<(String, Vec<u8>)> = (0..40u64)
        .map(|i| {
            (
                format!("o{i:02}"),
                pattern(i, 1000 + (i as usize * 7919) % 200_000),
            )
        })
        .chain([
            ("big".to_owned(), pattern(99, 900_000)),
            ("huge".to_owned(), pattern(98, 1_100_000)),
        ])
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = objs.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    ingest(&store, "ds", &refs).await.unwrap();
    let mut items: Vec<Result<RangeSpec, ReadError>> = objs
        .iter()
        .map(|(p, _)| {
            Ok(RangeSpec {
                path: ObjectPath::new(p.as_str()).unwrap(),
                offset: 0,
                length: None,
            })
        })
        .collect();
    items.push(Ok(RangeSpec {
        path: ObjectPath::new("missing").unwrap(),
        offset: 0,
        length: None,
    }));
    let n = items.len();
    // Consume as we go, as tonic does: holding every event would hold every
    // pool buffer and starve the reads still to come.
    let mut events = std::pin::pin!(
        store
            .read_batch_any_order(&DatasetName::new("ds").unwrap(), None, items, 8)
            .unwrap()
    );
    let mut got: BTreeMap<u32, Result<Vec<u8>, tonic::Code>> = BTreeMap::new();
    let mut open: Option<u32> = None;
    while let Some(e) = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
        .await
        .expect("any-order batch stalled")
    {
        let idx = e.index();
        if let Some(o) = open {
            assert_eq!(o, idx, "an item's messages arrive together");
        } else {
            assert!(!got.contains_key(&idx), "item {idx} delivered twice");
        }
        match e {
            BatchEvent::Data { data, last, .. } => {
                got.entry(idx)
                    .or_insert_with(|| Ok(Vec::new()))
                    .as_mut()
                    .unwrap()
                    .extend_from_slice(&data);
                open = if last { None } else { Some(idx) };
            }
            BatchEvent::Error { error, .. } => {
                if error.code() == tonic::Code::ResourceExhausted {
                    assert!(
                        matches!(
                            error,
                            ReadError::Store(StoreError::Limit {
                                limit: crate::error::Limit::AnyOrderItemBytes,
                                ..
                            })
                        ),
                        "{error:?}"
                    );
                }
                got.insert(idx, Err(error.code()));
                open = None;
            }
        }
    }
    assert_eq!(got.len(), n);
    for (i, (_, data)) in objs.iter().enumerate() {
        if i == objs.len() - 1 {
            assert_eq!(
                got[&(i as u32)],
                Err(tonic::Code::ResourceExhausted),
                "huge is over the cap"
            );
        } else {
            assert_eq!(got[&(i as u32)].as_ref().unwrap(), data, "item {i}");
        }
    }
    assert_eq!(got[&(n as u32 - 1)], Err(tonic::Code::NotFound));
}

/// Small objects `s00`, `s01`, ... of `size` bytes each, ingested in order
/// so they are neighbours on the devices.
async fn ingest_samples(store: &Arc<Store>, count: u64, size: usize) -> Vec<(String, Vec<u8>)> {
    let objs: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| (format!("s{i:02}"), pattern(1000 + i, size)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = objs.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    ingest(store, "ds", &refs).await.unwrap();
    objs
}

/// Reads `paths` with an any-order batch; returns each item's bytes or
/// error code, by index.
async fn batch_bytes(store: &Arc<Store>, paths: &[&str]) -> Vec<Result<Vec<u8>, tonic::Code>> {
    let items = paths
        .iter()
        .map(|p| {
            Ok(RangeSpec {
                path: ObjectPath::new(*p).unwrap(),
                offset: 0,
                length: None,
            })
        })
        .collect();
    let mut out: Vec<Result<Vec<u8>, tonic::Code>> = vec![Ok(Vec::new()); paths.len()];
    let mut events = std::pin::pin!(
        store
            .read_batch_any_order(&DatasetName::new("ds").unwrap(), None, items, 16)
            .unwrap()
    );
    while let Some(e) = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
        .await
        .expect("batch stalled")
    {
        match e {
            BatchEvent::Data { index, data, .. } => {
                if let Ok(v) = &mut out[index as usize] {
                    v.extend_from_slice(&data);
                }
            }
            BatchEvent::Error { index, error } => out[index as usize] = Err(error.code()),
        }
    }
    out
}

async fn wait_prefetched(store: &Store, n: u64) {
    let c = &store.read_ahead.counters;
    for _ in 0..3000 {
        let settled = c.prefetched.load(Ordering::SeqCst)
            + c.skipped.load(Ordering::SeqCst)
            + c.failed.load(Ordering::SeqCst);
        if settled >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("read-ahead did not finish");
}

fn paths_of(objs: &[(String, Vec<u8>)]) -> Vec<ObjectPath> {
    objs.iter()
        .map(|(p, _)| ObjectPath::new(p.as_str()).unwrap())
        .collect()
}

// Guards the read-ahead contract: hinted neighbours are read with few,
// merged device reads, then served to the batch from memory, byte for
// byte; each entry serves once, and later reads go to the devices again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hinted_objects_are_read_merged_and_served_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, counter) = counting_store(&config(dir.path(), 16, 64 << 10));
    let objs = ingest_samples(&store, 48, 10_000).await;
    let before = counter.reads.load(Ordering::SeqCst);
    // Hinted in a shuffled order: scheduling puts them back in disk order.
    let mut hinted = paths_of(&objs);
    hinted.reverse();
    hinted.swap(3, 40);
    let outcome = store
        .hint(&DatasetName::new("ds").unwrap(), &hinted)
        .unwrap();
    assert_eq!(outcome.accepted, 48);
    assert_eq!(outcome.accepted_bytes, 48 * 10_000);
    wait_prefetched(&store, 48).await;
    let reads = counter.reads.load(Ordering::SeqCst) - before;
    assert_eq!(u64::from(outcome.device_reads), reads);
    // 48 objects of 12 KiB on disk, 64 KiB stripe units: 9 units, 10 reads
    // at most (one object may straddle two units of the same device).
    assert!(reads <= 10, "{reads} device reads for 48 neighbours");
    assert!(
        store
            .read_counters
            .device_reads_merged
            .load(Ordering::SeqCst)
            >= 38
    );

    let names: Vec<&str> = objs.iter().map(|(p, _)| p.as_str()).collect();
    let got = batch_bytes(&store, &names).await;
    for (i, (_, data)) in objs.iter().enumerate() {
        assert_eq!(got[i].as_ref().unwrap(), data, "object {i}");
    }
    assert_eq!(
        counter.reads.load(Ordering::SeqCst) - before,
        reads,
        "all hits"
    );
    let c = &store.read_ahead.counters;
    assert_eq!(c.hits.load(Ordering::SeqCst), 48);
    assert_eq!(c.hit_bytes.load(Ordering::SeqCst), 48 * 10_000);
    assert_eq!(store.read_ahead.used_bytes(), 0, "entries were consumed");

    // Consumed: the same reads now go to the devices, and still match.
    let got = batch_bytes(&store, &names).await;
    for (i, (_, data)) in objs.iter().enumerate() {
        assert_eq!(got[i].as_ref().unwrap(), data, "object {i} again");
    }
    assert!(counter.reads.load(Ordering::SeqCst) - before >= reads + 48);
    assert_eq!(c.hits.load(Ordering::SeqCst), 48);
}

// Guards against read-ahead serving bad bytes or hiding an error: a corrupt
// object is not cached, and the foreground read reports DATA_LOSS itself;
// its neighbours are still served from read-ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_read_ahead_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan) = faulty_store(dir.path());
    let objs = ingest_samples(&store, 8, 10_000).await;
    let bad = store
        .lookup(
            &DatasetName::new("ds").unwrap(),
            &ObjectPath::new("s03").unwrap(),
        )
        .unwrap();
    let (dev, off) = store.layout().map(bad.record.logical_offset + 5000);
    plan.add(FaultRule {
        device: Some(dev),
        kind: None,
        device_range: Some((off, off + 1)),
        fault: Fault::FlipAt(off),
        remaining: None,
    });
    store
        .hint(&DatasetName::new("ds").unwrap(), &paths_of(&objs))
        .unwrap();
    wait_prefetched(&store, 8).await;
    assert_eq!(
        store.read_ahead.counters.prefetched.load(Ordering::SeqCst),
        7
    );
    assert_eq!(store.read_ahead.counters.failed.load(Ordering::SeqCst), 1);
    let names: Vec<&str> = objs.iter().map(|(p, _)| p.as_str()).collect();
    let got = batch_bytes(&store, &names).await;
    for (i, (_, data)) in objs.iter().enumerate() {
        if i == 3 {
            assert_eq!(got[i], Err(tonic::Code::DataLoss));
        } else {
            assert_eq!(got[i].as_ref().unwrap(), data, "object {i}");
        }
    }
    assert_eq!(store.read_ahead.counters.hits.load(Ordering::SeqCst), 7);
}

// Guards against read-ahead starving foreground reads: hints took every
// free buffer of a size class (try_acquire never waits, but it took all),
// entries nobody read yet held them until a later hint swept them, and a
// read of another object of that size waited for a buffer forever (a
// Python loader over gRPC stalled for minutes). Read-ahead now leaves half
// of every class free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_leaves_buffers_for_foreground_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 16, 64 << 10);
    cfg.limits.hint_cache_bytes_max = 16 << 20;
    cfg.limits.hint_items_max = 1000;
    let store = Store::open(&cfg).unwrap();
    let objs = ingest_samples(&store, 700, 10_000).await;
    let name = DatasetName::new("ds").unwrap();
    // Every object but the last, in 64 KiB runs: more runs than the
    // 64 KiB class has buffers.
    let outcome = store.hint(&name, &paths_of(&objs[..699])).unwrap();
    assert!(outcome.accepted > 0, "{outcome:?}");
    let last = [objs[699].0.as_str()];
    let read = batch_bytes(&store, &last);
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .expect("a read of an object nobody hinted waits for no read-ahead entry");
    assert_eq!(got[0].as_ref().unwrap(), &objs[699].1);
}

// Guards the read-ahead bounds: a hint larger than the cache budget reads
// only what fits (the rest is counted as skipped and read normally), a
// hint over the item limit is refused, and entries nobody reads expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 16, 64 << 10);
    cfg.limits.hint_cache_bytes_max = 128 << 10;
    cfg.limits.hint_items_max = 100;
    cfg.limits.hint_ttl_ms = 300;
    let store = Store::open(&cfg).unwrap();
    let objs = ingest_samples(&store, 64, 10_000).await;
    let name = DatasetName::new("ds").unwrap();
    let outcome = store.hint(&name, &paths_of(&objs)).unwrap();
    assert!(outcome.accepted > 0 && outcome.accepted < 64, "{outcome:?}");
    wait_prefetched(&store, 64).await;
    assert!(store.read_ahead.used_bytes() <= 128 << 10);
    let c = &store.read_ahead.counters;
    assert_eq!(
        c.skipped.load(Ordering::SeqCst),
        64 - u64::from(outcome.accepted)
    );
    let names: Vec<&str> = objs.iter().map(|(p, _)| p.as_str()).collect();
    let got = batch_bytes(&store, &names).await;
    for (i, (_, data)) in objs.iter().enumerate() {
        assert_eq!(got[i].as_ref().unwrap(), data, "object {i}");
    }

    let too_many: Vec<ObjectPath> = (0..101)
        .map(|i| ObjectPath::new(format!("s{i}")).unwrap())
        .collect();
    let err = store.hint(&name, &too_many).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        matches!(
            err,
            ReadError::Store(StoreError::Limit {
                limit: crate::error::Limit::HintItems,
                asked: 101,
                max: 100
            })
        ),
        "{err:?}"
    );

    // Hinted, never read: gone after the TTL, budget given back.
    let outcome = store.hint(&name, &paths_of(&objs[..4])).unwrap();
    assert_eq!(outcome.accepted, 4);
    // Each hint call sweeps expired entries; wait for the TTL to pass
    // rather than sleeping a guess.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.expired.load(Ordering::SeqCst) < 4 {
        assert!(std::time::Instant::now() < deadline, "entries never expire");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        store.hint(&name, &[]).unwrap();
    }
    assert_eq!(c.expired.load(Ordering::SeqCst), 4);
    assert_eq!(store.read_ahead.used_bytes(), 0);
}

// Guards ReadInto scheduling: neighbours laid out contiguously in the
// region are read with merged device reads, items laid out otherwise are
// not merged, and every item's bytes land where its completion says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_into_merges_neighbours() {
    use crate::region::{RegionLimits, Regions};
    let dir = tempfile::tempdir().unwrap();
    let (store, counter) = counting_store(&config(dir.path(), 16, 64 << 10));
    let objs = ingest_samples(&store, 32, 10_000).await;
    let regions = Regions::new(RegionLimits::default());
    let size = 32 * 12288 * 2;
    let shm = std::fs::File::from(crate::region::tests::memfd(size, true));
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let reg = regions
        .register(crate::region::tests::pid(), shm.as_raw_fd(), size, uid, "")
        .unwrap();
    let region = Arc::clone(&reg.region);
    // SAFETY: the memfd is ours and sealed against shrinking; it is only
    // read after each ReadInto has completed.
    let file_map = unsafe { memmap2::MmapOptions::new().map(&shm) }.unwrap();

    for (contiguous, max_reads) in [(true, 9u64), (false, 40)] {
        let before = counter.reads.load(Ordering::SeqCst);
        let merged_before = store
            .read_counters
            .device_reads_merged
            .load(Ordering::SeqCst);
        let items = objs
            .iter()
            .enumerate()
            .map(|(i, (p, _))| {
                // Contiguous: object i at i * span. Otherwise every other
                // span is left empty, so no two neighbours touch.
                let slot = if contiguous { i } else { 2 * i } as u64;
                Ok(read_into::ReadIntoItem {
                    range: RangeSpec {
                        path: ObjectPath::new(p.as_str()).unwrap(),
                        offset: 0,
                        length: None,
                    },
                    region_offset: slot * 12288,
                })
            })
            .collect();
        let done: Vec<(u32, Result<read_into::ReadIntoDone, ReadError>)> = store
            .read_into(
                Arc::clone(&region),
                &DatasetName::new("ds").unwrap(),
                None,
                items,
                read_into::ReadIntoOptions::same_host(64),
            )
            .unwrap()
            .collect()
            .await;
        assert_eq!(done.len(), 32);
        for (i, r) in done {
            let r = r.unwrap();
            let at = r.data_offset as usize;
            assert_eq!(
                &file_map[at..at + r.length as usize],
                &objs[i as usize].1[..],
                "item {i}"
            );
        }
        let reads = counter.reads.load(Ordering::SeqCst) - before;
        let merged = store
            .read_counters
            .device_reads_merged
            .load(Ordering::SeqCst)
            - merged_before;
        assert!(reads <= max_reads, "contiguous={contiguous}: {reads} reads");
        if contiguous {
            assert!(merged >= 32 - reads, "{merged} merged");
        } else {
            assert_eq!(merged, 0, "nothing to merge");
        }
    }
}

// Guards fixed-buffer regions: a region registered with the ring is read
// with READ_FIXED and gets exactly its bytes; dropping it frees its table
// entry, so registering far more regions than entries, one after another,
// keeps working. Registration needs the kernel's permission to pin (root
// here); without it the region must still read correctly, unfixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_regions_read_exactly_and_give_their_entry_back() {
    use crate::region::{RegionLimits, Regions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 16, 64 << 10)).unwrap();
    let objs = ingest_samples(&store, 8, 10_000).await;
    let regions = Regions::new(RegionLimits::default());
    // SAFETY: geteuid and getuid have no preconditions.
    let (root, uid) = unsafe { (libc::geteuid() == 0, libc::getuid()) };
    for round in 0..300 {
        let size = 8 * 12288;
        let shm = crate::region::tests::memfd(size, true);
        let reg = regions
            .register(crate::region::tests::pid(), shm.as_raw_fd(), size, uid, "")
            .unwrap();
        let fixed = store.fix_region(&reg.region);
        assert!(
            fixed || !root,
            "round {round}: root may pin, the region must be fixed"
        );
        if round % 100 != 0 {
            continue;
        }
        let items = objs
            .iter()
            .enumerate()
            .map(|(i, (p, _))| {
                Ok(read_into::ReadIntoItem {
                    range: RangeSpec {
                        path: ObjectPath::new(p.as_str()).unwrap(),
                        offset: 0,
                        length: None,
                    },
                    region_offset: i as u64 * 12288,
                })
            })
            .collect();
        let done: Vec<_> = store
            .read_into(
                Arc::clone(&reg.region),
                &DatasetName::new("ds").unwrap(),
                None,
                items,
                read_into::ReadIntoOptions::same_host(8),
            )
            .unwrap()
            .collect()
            .await;
        // SAFETY: the file is ours; every read into it has completed.
        let map = unsafe { memmap2::MmapOptions::new().map(&shm) }.unwrap();
        for (i, r) in done {
            let r = r.unwrap();
            let at = r.data_offset as usize;
            assert_eq!(&map[at..at + r.length as usize], &objs[i as usize].1[..]);
        }
    }
}

// Guards against ingests failing with NoSpace on a pool that has room
// while free space is out of the allocator for its discard: the start-up
// pass holds a piece (here all of a small pool: an ingest right after open
// failed about one run in twenty) and a delete queues its space. The
// ingest must wait for the space and then succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingests_wait_for_space_held_by_a_discard() {
    let dir = tempfile::tempdir().unwrap();
    let (store, gate) = gated_store(dir.path(), true);
    let capacity = store.layout().capacity_bytes();
    assert!(capacity <= 64 << 20, "the start-up pass holds all of it");
    let open_gate = || {
        *gate.closed.lock().unwrap() = false;
        gate.opened.notify_all();
    };
    let counters = store.discard_counters();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut waits_before = counters.allocations_waited.load(Ordering::Relaxed);
    for round in 0..2 {
        // The discard thread is inside a discard holding the space.
        while gate.calls.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no discard started");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let s2 = Arc::clone(&store);
        let data = pattern(round, (capacity * 2 / 3) as usize);
        let expected = data.clone();
        let name = format!("d{round}");
        let mut ingest_task =
            tokio::spawn(async move { ingest(&s2, &name, &[("x", data)]).await.map(drop) });
        // Until the ingest waits (or, without the wait, fails).
        loop {
            tokio::select! {
                r = &mut ingest_task => panic!("round {round}: ingest ended while its space was held: {r:?}"),
                () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
            }
            if counters.allocations_waited.load(Ordering::Relaxed) > waits_before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ingest neither waits nor ends"
            );
        }
        waits_before = counters.allocations_waited.load(Ordering::Relaxed);
        open_gate();
        ingest_task.await.unwrap().unwrap();
        let name = format!("d{round}");
        assert_eq!(
            read_all(&store, &name, "x", 0, None).await.unwrap(),
            expected
        );
        discards_settled(&store).await;
        // Next round: the delete's space is held by its discard.
        *gate.closed.lock().unwrap() = true;
        gate.calls.lock().unwrap().clear();
        store
            .delete(&DatasetName::new(&name).unwrap())
            .await
            .unwrap();
    }
    open_gate();
}

/// Holds every discard until opened, and records what was discarded.
#[derive(Default)]
struct DiscardGate {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    calls: std::sync::Mutex<Vec<(u32, u64, u64)>>,
}

struct GatedBackend {
    inner: Arc<dyn IoBackend>,
    gate: Arc<DiscardGate>,
}

impl IoBackend for GatedBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn submit(&self, op: crate::engine::IoOp, buf: BufLease) -> crate::buf::IoFuture {
        self.inner.submit(op, buf)
    }
    fn read_foreign(&self, read: crate::engine::ForeignRead) -> crate::engine::ForeignReadFuture {
        self.inner.read_foreign(read)
    }
    fn sync(&self, device: u32) -> std::io::Result<()> {
        self.inner.sync(device)
    }
    fn discard(&self, device: u32, offset: u64, len: u64) -> std::io::Result<()> {
        self.gate.calls.lock().unwrap().push((device, offset, len));
        let mut closed = self.gate.closed.lock().unwrap();
        while *closed {
            closed = self.gate.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.inner.discard(device, offset, len)
    }
    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }
}

/// A store on 16 MiB devices whose discards pass `gate` (closed from the
/// start when `closed`, so the start-up pass is held too).
fn gated_store(dir: &std::path::Path, closed: bool) -> (Arc<Store>, Arc<DiscardGate>) {
    let gate = Arc::new(DiscardGate::default());
    *gate.closed.lock().unwrap() = closed;
    let g2 = Arc::clone(&gate);
    let store = Store::open_with(&config(dir, 16, 64 << 10), move |e| {
        Arc::new(GatedBackend { inner: e, gate: g2 })
    })
    .unwrap();
    (store, gate)
}

fn overlaps(a: &[Extent], b: &[Extent]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.offset < y.end() && y.offset < x.end()))
}

// Guards the discard's crash-safety rule: freed space stays out of the
// allocator until its discard has run, so a discard can never hit bytes a
// later ingest owns. With the discard held, a new ingest must be given
// other space, and its bytes must read back intact once discards go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_never_touches_space_a_later_ingest_owns() {
    let dir = tempfile::tempdir().unwrap();
    let (store, gate) = gated_store(dir.path(), false);
    let counters = store.discard_counters();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !counters.startup_pass_done.load(Ordering::Relaxed) {
        assert!(std::time::Instant::now() < deadline, "start-up pass hangs");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let a_data = pattern(1, 6 << 20);
    let a = ingest(&store, "a", &[("x", a_data)]).await.unwrap();
    let a_extents = a.record.owned_extents();
    drop(a);
    *gate.closed.lock().unwrap() = true;
    gate.calls.lock().unwrap().clear();
    store.delete(&DatasetName::new("a").unwrap()).await.unwrap();
    // The discard thread is now held inside A's first discard.
    while gate.calls.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no discard started");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        counters.pending_bytes.load(Ordering::Relaxed),
        a_extents.iter().map(|e| e.len).sum::<u64>()
    );
    let b_data = pattern(2, 6 << 20);
    let b = ingest(&store, "b", &[("y", b_data.clone())]).await.unwrap();
    assert!(
        !overlaps(&a_extents, &b.record.owned_extents()),
        "B was given space whose discard is pending: {a_extents:?} vs {:?}",
        b.record.extents
    );
    *gate.closed.lock().unwrap() = false;
    gate.opened.notify_all();
    while counters.pending_bytes.load(Ordering::Relaxed) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "discards do not finish"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(read_all(&store, "b", "y", 0, None).await.unwrap(), b_data);
    // A's space is free again, and every discard stayed inside it.
    let layout = store.layout();
    for &(device, offset, len) in gate.calls.lock().unwrap().iter() {
        let inside = a_extents.iter().any(|e| {
            super::discard::device_ranges(layout, *e)
                .iter()
                .any(|&(d, o, l)| d == device && o <= offset && offset + len <= o + l)
        });
        assert!(inside, "discard of {device}:{offset}+{len} outside A");
    }
    // Only B's space is in use: A's went back after its discard.
    assert_eq!(
        store.status().used_bytes,
        b.record.owned_extents().iter().map(|e| e.len).sum::<u64>()
    );
}

// Guards against losing every dataset with `catalog.redb`: the devices
// hold each dataset's manifest and a root naming them, so a store opened
// without its catalog (or with an older copy of it) serves exactly what
// was committed and never hands out space a dataset owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_restored_catalog_is_rebuilt_from_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let catalog = dir.path().join("catalog.redb");
    let stripe = pattern(1, 300_000);
    let ec_data = pattern(2, 1 << 20);
    {
        let store = Store::open(&cfg).unwrap();
        ingest(
            &store,
            "s",
            &[("a", stripe.clone()), ("b/c", pattern(3, 5000))],
        )
        .await
        .unwrap();
        ingest_class(
            &store,
            "e",
            StorageClass::Ec {
                data_units: 3,
                parity_units: 1,
            },
            &[("x", ec_data.clone())],
        )
        .await
        .unwrap();
        assert!(!store.recovery.catalog_behind);
        discards_settled(&store).await;
    }
    // Lost.
    std::fs::remove_file(&catalog).unwrap();
    let used_before;
    {
        let store = Store::open(&cfg).unwrap();
        assert!(store.recovery.catalog_behind, "{:?}", store.recovery);
        assert_eq!(store.recovery.datasets_imported, 2);
        assert_eq!(read_all(&store, "s", "a", 0, None).await.unwrap(), stripe);
        assert_eq!(read_all(&store, "e", "x", 0, None).await.unwrap(), ec_data);
        used_before = store.status().used_bytes;
        // New data goes elsewhere.
        ingest(&store, "n", &[("z", pattern(4, 2 << 20))])
            .await
            .unwrap();
        assert_eq!(read_all(&store, "s", "a", 0, None).await.unwrap(), stripe);
        assert_eq!(read_all(&store, "e", "x", 0, None).await.unwrap(), ec_data);
        discards_settled(&store).await;
    }
    // Restored from an older copy: saved now, then "s" is deleted.
    let saved = dir.path().join("catalog.saved");
    std::fs::copy(&catalog, &saved).unwrap();
    {
        let store = Store::open(&cfg).unwrap();
        assert!(!store.recovery.catalog_behind);
        store.delete(&DatasetName::new("s").unwrap()).await.unwrap();
        discards_settled(&store).await;
    }
    std::fs::copy(&saved, &catalog).unwrap();
    {
        let store = Store::open(&cfg).unwrap();
        assert!(store.recovery.catalog_behind);
        assert_eq!(store.recovery.datasets_dropped, 1);
        assert!(
            store.dataset(&DatasetName::new("s").unwrap()).is_err(),
            "deleted stays deleted"
        );
        assert_eq!(read_all(&store, "e", "x", 0, None).await.unwrap(), ec_data);
        assert!(store.status().used_bytes < used_before + (3 << 20));
        discards_settled(&store).await;
    }
    // Damaged: set aside, rebuilt.
    std::fs::write(&catalog, pattern(9, 100_000)).unwrap();
    let store = Store::open(&cfg).unwrap();
    assert!(store.recovery.catalog_behind);
    assert_eq!(read_all(&store, "e", "x", 0, None).await.unwrap(), ec_data);
    let aside = std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("catalog.redb.damaged-")
    });
    assert!(aside, "the damaged catalog is kept");
}

/// Sets the format version in both superblock copies of `dev`.
pub(super) fn set_superblock_version(dev: &std::path::Path, version: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .unwrap();
    for at in [0u64, 4096] {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, at).unwrap();
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&b, at).unwrap();
    }
    f.sync_all().unwrap();
}

pub(super) fn superblock_version(dev: &std::path::Path) -> u32 {
    let b = std::fs::read(dev).unwrap();
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

// Guards the in-place upgrade of version 1 pools (no roots, no manifests)
// and its crash safety: whatever point an upgrade was interrupted at (no
// root yet, some superblocks already at 2, records without manifests),
// the next start finishes it, and the upgraded pool then survives the loss
// of its catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_pools_are_upgraded_in_place_from_any_interrupted_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let devs: Vec<std::path::PathBuf> = (0..4)
        .map(|i| dir.path().join(format!("dev{i}.img")))
        .collect();
    let stripe = pattern(11, 200_000);
    let ec_data = pattern(12, 700_000);
    let pool_id;
    {
        let store = Store::open(&cfg).unwrap();
        ingest(&store, "s", &[("a", stripe.clone())]).await.unwrap();
        ingest_class(
            &store,
            "e",
            StorageClass::Ec {
                data_units: 3,
                parity_units: 1,
            },
            &[("x", ec_data.clone())],
        )
        .await
        .unwrap();
        discards_settled(&store).await;
        pool_id = store.pool_id;
    }
    for round in 0..3 {
        // An old pool, or one whose upgrade was interrupted: no roots, and
        // the records lose their manifests; some superblocks still say 1.
        for (i, dev) in devs.iter().enumerate() {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
            f.write_all_at(&vec![0u8; (1 << 20) - 8192], 8192).unwrap();
            if i >= round {
                set_superblock_version(dev, 1);
            }
        }
        {
            let catalog = Catalog::open(&dir.path().join("catalog.redb"), pool_id, false).unwrap();
            for (name, mut rec) in catalog.datasets().unwrap() {
                rec.manifest = None;
                catalog.put_dataset_record(&name, &rec).unwrap();
            }
            catalog.set_meta(&[("root_generation", None)]).unwrap();
        }
        {
            let store = Store::open(&cfg).unwrap();
            assert_eq!(store.recovery.manifests_written, 2, "round {round}");
            for dev in &devs {
                assert_eq!(
                    superblock_version(dev),
                    2,
                    "round {round}: {}",
                    dev.display()
                );
            }
            assert_eq!(read_all(&store, "s", "a", 0, None).await.unwrap(), stripe);
            assert_eq!(read_all(&store, "e", "x", 0, None).await.unwrap(), ec_data);
            discards_settled(&store).await;
        }
    }
    std::fs::remove_file(dir.path().join("catalog.redb")).unwrap();
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.recovery.datasets_imported, 2);
    assert_eq!(read_all(&store, "s", "a", 0, None).await.unwrap(), stripe);
    assert_eq!(read_all(&store, "e", "x", 0, None).await.unwrap(), ec_data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_caller_goes_away_still_ends_cleanly() {
    // Guards against a commit dropped mid-way (its client disconnected
    // while the manifest and catalog were being written) leaving the
    // dataset committed on the devices but never visible, its space held
    // by nobody until a restart. Found by the cluster tests' coordinator
    // kills.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 64, 64 << 10)).unwrap();
    let data: Vec<(String, Vec<u8>)> = (0..16)
        .map(|i| (format!("o{i}"), pattern(i as u64, 300_000 + i * 1000)))
        .collect();
    for (n, wait_us) in [0u64, 20, 50, 100, 200, 400, 800, 1500, 3000, 6000, 12_000]
        .into_iter()
        .enumerate()
    {
        let name = format!("ds{n}");
        let mut s = store
            .begin_ingest(
                DatasetName::new(name.clone()).unwrap(),
                StorageClass::Stripe,
                Default::default(),
            )
            .unwrap();
        let mut total = 0;
        for (path, bytes) in &data {
            s.begin_object(
                ObjectPath::new(path.clone()).unwrap(),
                bytes.len() as u64,
                None,
            )
            .await
            .unwrap();
            s.data(bytes).await.unwrap();
            total += bytes.len() as u64;
        }
        let commit = s.commit(data.len() as u64, total);
        // The caller goes away after `wait_us`, wherever the commit is.
        let _ = tokio::time::timeout(std::time::Duration::from_micros(wait_us), commit).await;
        // Committed and visible, or gone: either way its space is owned.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let status = store.status();
            if status.ingests_in_progress == 0 && status.used_bytes == owned_bytes(&store) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "after a commit dropped at {wait_us} us: used {} bytes, datasets own {}",
                status.used_bytes,
                owned_bytes(&store)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
