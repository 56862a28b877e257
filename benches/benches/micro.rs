//! Criterion micro-benchmarks of the pieces every byte goes through:
//! - `layout/*`: logical → device mapping;
//! - `checksum/*`: CRC-32 per MiB (crc32fast), which prices checksum s/GiB;
//! - `proto/*`: encoding and decoding a 1 MiB `ReadResponse` (decode is
//!   zero-copy into `Bytes`);
//! - `client/read_batch_*`: the client's batch pipeline against an
//!   in-process server on loopback.
//!
//! Run: `cargo bench -p storaged-bench --bench micro`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use prost::Message;
use storaged::config::{ServerLimits, StoreConfig};
use storaged::layout::StripeLayout;
use storaged::store::Store;
use storaged_client::{BatchItem, Client};
use storaged_proto::pb;

fn layout(c: &mut Criterion) {
    let l = StripeLayout {
        device_count: 4,
        stripe_unit_bytes: 1 << 20,
        data_offset_bytes: 1 << 20,
        device_data_bytes: 4 << 30,
    };
    let mut g = c.benchmark_group("layout");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("map_1024", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for i in 0..1024u64 {
                let (d, o) = l.map(std::hint::black_box(i * 12_345_677 % l.capacity_bytes()));
                acc = acc.wrapping_add(u64::from(d) ^ o);
            }
            acc
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("segments_1MiB_unaligned", |b| {
        b.iter(|| l.segments(std::hint::black_box(12_288), 1 << 20).count())
    });
    g.finish();
}

fn checksum(c: &mut Criterion) {
    let data = vec![0xa5u8; 1 << 20];
    let mut g = c.benchmark_group("checksum");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("crc32fast_1MiB", |b| {
        b.iter(|| crc32fast::hash(std::hint::black_box(&data)))
    });
    g.bench_function("crc32fast_32KiB_blocks_1MiB", |b| {
        b.iter(|| {
            data.chunks(32 << 10)
                .map(crc32fast::hash)
                .fold(0u32, |a, c| a ^ c)
        })
    });
    g.finish();
}

fn proto(c: &mut Criterion) {
    let msg = pb::ReadResponse {
        offset: 123,
        data: Bytes::from(vec![7u8; 1 << 20]),
        object_size: 4 << 30,
        range_length: 4 << 30,
    };
    let encoded = Bytes::from(msg.encode_to_vec());
    let mut g = c.benchmark_group("proto");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("encode_read_response_1MiB", |b| {
        let mut buf = Vec::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            msg.encode(&mut buf).unwrap();
            buf.len()
        })
    });
    g.bench_function("decode_read_response_1MiB", |b| {
        b.iter(|| {
            pb::ReadResponse::decode(encoded.clone())
                .unwrap()
                .data
                .len()
        })
    });
    g.finish();
}

fn client_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::with_defaults(dir.path().to_path_buf());
    cfg.device_size_bytes = 64 << 20;
    let store = Store::open(&cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let server_store = Arc::clone(&store);
    let endpoints = storaged::server::Endpoints {
        tcp: "127.0.0.1:0".parse().unwrap(),
        bulk_tcp: None,
        unix: dir.path().join("storaged.sock"),
        unix_access: storaged::server::UnixAccess::default(),
    };
    rt.spawn(async move {
        let limits = ServerLimits::default();
        let listeners = storaged::server::Listeners::bind(&endpoints).await.unwrap();
        storaged::server::serve(
            server_store,
            listeners,
            storaged::region::RegionLimits::default(),
            storaged::service::Access::open(),
            &limits,
            std::future::pending(),
            move |a| tx.send(a).unwrap(),
        )
        .await
        .unwrap();
    });
    let addr = rx.recv().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..256 {
        std::fs::write(src.join(format!("{i:03}")), vec![i as u8; 4096]).unwrap();
    }
    let client = rt.block_on(async {
        let client = Client::connect(&format!("http://{addr}")).await.unwrap();
        client.ingest_dir("b", &src, |_| {}).await.unwrap();
        client
    });
    let ds = client.dataset("b").unwrap();
    let items: Vec<BatchItem> = (0..256)
        .map(|i| BatchItem {
            path: format!("{i:03}"),
            offset: 0,
            length: None,
        })
        .collect();
    let mut g = c.benchmark_group("client");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(256));
    for depth in [16u32, 64] {
        g.bench_function(format!("read_batch_256x4KiB_depth{depth}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut s = std::pin::pin!(ds.read_batch(items.clone(), depth));
                    let mut n = 0;
                    while let Some(r) = s.next().await {
                        n += r.unwrap().data.unwrap().len();
                    }
                    assert_eq!(n, 256 * 4096);
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, layout, checksum, proto, client_batch);
criterion_main!(benches);
