//! Criterion benchmarks of the read path, below gRPC:
//! - `engine/*`: 4 KiB random and 1 MiB sequential device reads through the
//!   io_uring and psync engines at queue depth 32;
//! - `store/read_stream`: a verified, pipelined read of a 64 MiB object
//!   striped over 4 device files (CRC check included).
//!
//! Run: `cargo bench -p storaged-bench --bench engine_read`. Device files
//! live in a temporary directory on the current file system, written first
//! so reads hit allocated blocks rather than holes.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use storaged::buf::{BufferPool, ClassSpec};
use storaged::config::StoreConfig;
use storaged::engine::{self, EngineKind, EngineLimits, IoBackend};
use storaged::store::Store;
use storaged_proto::model::StorageClass;
use storaged_proto::{DatasetName, ObjectPath};

const DEVICE_BYTES: u64 = 64 << 20;

fn device_files(dir: &std::path::Path) -> Vec<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    (0..4)
        .map(|i| {
            let p = dir.join(format!("dev{i}"));
            std::fs::write(&p, vec![i as u8 + 1; DEVICE_BYTES as usize]).unwrap();
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)
                .unwrap()
        })
        .collect()
}

/// One worker thread: the engine thread does the I/O, and a second worker
/// would only compete with it on 2 cores.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn bench_engines(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("engine");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for kind in [EngineKind::Uring, EngineKind::Psync] {
        let pool = BufferPool::new(vec![
            ClassSpec {
                buf_bytes: 4096,
                count: 64,
            },
            ClassSpec {
                buf_bytes: 1 << 20,
                count: 64,
            },
        ])
        .unwrap();
        let engine: Arc<dyn IoBackend> = engine::build(
            kind,
            device_files(dir.path()),
            Arc::clone(&pool),
            EngineLimits {
                queue_depth_per_device_max: 32,
                psync_threads: 8,
            },
        )
        .unwrap();
        let name = engine.kind();
        for (label, len, count) in [
            ("4k_random_qd32", 4096usize, 256u64),
            ("1m_seq_qd32", 1 << 20, 32),
        ] {
            group.throughput(Throughput::Bytes(len as u64 * count));
            group.bench_function(format!("{name}/{label}"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut reads = futures::stream::iter(0..count)
                            .map(|k| {
                                let engine = Arc::clone(&engine);
                                let pool = Arc::clone(&pool);
                                async move {
                                    let buf = pool.acquire(len).await.unwrap();
                                    let blocks = DEVICE_BYTES / len as u64;
                                    // A fixed scramble keeps runs comparable.
                                    let at = (k.wrapping_mul(2_654_435_761) % blocks) * len as u64;
                                    let off = if len == 4096 {
                                        at
                                    } else {
                                        (k / 4 % blocks) * len as u64
                                    };
                                    engine::read_exact(&*engine, (k % 4) as u32, off, len, buf)
                                        .await
                                        .unwrap()
                                }
                            })
                            .buffer_unordered(32);
                        while reads.next().await.is_some() {}
                    })
                })
            });
        }
    }
    group.finish();
}

fn bench_store(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::with_defaults(dir.path().to_path_buf());
    cfg.device_size_bytes = 80 << 20;
    let store = Store::open(&cfg).unwrap();
    let object_bytes: usize = 64 << 20;
    rt.block_on(async {
        let mut s = store
            .begin_ingest(
                DatasetName::new("bench").unwrap(),
                StorageClass::Stripe,
                Default::default(),
            )
            .unwrap();
        s.begin_object(ObjectPath::new("shard").unwrap(), object_bytes as u64, None)
            .await
            .unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..object_bytes >> 20 {
            s.data(&chunk).await.unwrap();
        }
        s.commit(1, object_bytes as u64).await.unwrap();
    });
    let mut group = c.benchmark_group("store");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(object_bytes as u64));
    group.bench_function("read_stream_64MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let obj = Arc::new(
                    store
                        .lookup(
                            &DatasetName::new("bench").unwrap(),
                            &ObjectPath::new("shard").unwrap(),
                        )
                        .unwrap(),
                );
                let mut s = std::pin::pin!(store.read_stream(obj, 0, object_bytes as u64));
                let mut n = 0;
                while let Some(c) = s.next().await {
                    n += c.unwrap().1.len();
                }
                assert_eq!(n, object_bytes);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_engines, bench_store);
criterion_main!(benches);
