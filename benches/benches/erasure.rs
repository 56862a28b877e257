//! Reed-Solomon candidates for erasure-coded datasets (issue 5), at the
//! pool's geometry: K data and M parity stripe units of 1 MiB (the default
//! stripe unit) per stripe. Encode = computing the M parity units of one
//! stripe; decode = rebuilding one lost data unit from the survivors.
//! Throughput is of the stripe's data bytes (K MiB), one core.
//!
//!   cargo bench -p storaged-bench --bench erasure
//!   cargo bench -p storaged-bench --bench erasure -- --quick

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const UNIT_BYTES: usize = 1 << 20;
const GEOMETRIES: [(usize, usize); 3] = [(3, 1), (4, 1), (4, 2)];

/// K units of bytes that differ per unit and per position.
fn units(k: usize) -> Vec<Vec<u8>> {
    (0..k)
        .map(|i| {
            (0..UNIT_BYTES)
                .map(|j| ((j as u64).wrapping_mul(0x9e37_79b9) >> 7 ^ i as u64) as u8)
                .collect()
        })
        .collect()
}

fn erasure(c: &mut Criterion) {
    let mut g = c.benchmark_group("erasure");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(3));
    for (k, m) in GEOMETRIES {
        let data = units(k);
        let geometry = format!("{k}+{m}");
        g.throughput(Throughput::Bytes((k * UNIT_BYTES) as u64));

        // reed-solomon-erasure (GF(2^8), C SIMD via simd-accel).
        let rse = reed_solomon_erasure::galois_8::ReedSolomon::new(k, m).unwrap();
        let mut shards: Vec<Vec<u8>> = data
            .iter()
            .cloned()
            .chain((0..m).map(|_| vec![0u8; UNIT_BYTES]))
            .collect();
        g.bench_function(BenchmarkId::new("rse_encode", &geometry), |b| {
            b.iter(|| rse.encode(&mut shards).unwrap())
        });
        rse.encode(&mut shards).unwrap();
        g.bench_function(BenchmarkId::new("rse_decode_1", &geometry), |b| {
            b.iter_batched(
                || {
                    let mut lost: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                    lost[0] = None;
                    lost
                },
                |mut lost| {
                    rse.reconstruct_data(&mut lost).unwrap();
                    lost
                },
                BatchSize::LargeInput,
            )
        });

        // reed-solomon-simd (GF(2^16), Leopard-style O(n log n), Rust SIMD).
        g.bench_function(BenchmarkId::new("rss_encode", &geometry), |b| {
            b.iter(|| reed_solomon_simd::encode(k, m, &data).unwrap())
        });
        let recovery = reed_solomon_simd::encode(k, m, &data).unwrap();
        g.bench_function(BenchmarkId::new("rss_decode_1", &geometry), |b| {
            b.iter(|| {
                let restored = reed_solomon_simd::decode(
                    k,
                    m,
                    data.iter().enumerate().skip(1),
                    recovery.iter().enumerate().take(1),
                )
                .unwrap();
                assert_eq!(restored[&0], data[0]);
                restored
            })
        });
        // Both must agree that the rebuilt unit is the lost one.
        let mut lost: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
        lost[0] = None;
        rse.reconstruct_data(&mut lost).unwrap();
        assert_eq!(lost[0].as_deref(), Some(&data[0][..]));
    }
    g.finish();
}

criterion_group!(benches, erasure);
criterion_main!(benches);
