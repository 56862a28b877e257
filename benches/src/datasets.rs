//! The benchmark datasets, generated as plain files (what nginx and a local
//! data loader read) and ingested into storaged (the same bytes).
//!
//! - `shards`: large sequential shards (256 MiB each, 4 GiB in all; quick:
//!   4 × 32 MiB).
//! - `imagenet`: many small objects with an ImageNet-like size distribution:
//!   log-normal, mean about 110 KiB, clipped to 4 KiB..1 MiB.
//! - `fixed4k`, `fixed128k`: fixed-size variants.
//! - the listing dataset has empty objects only (listing and stat cost does
//!   not depend on object size, and 1M non-empty objects would cost 4 GiB of
//!   4 KiB-aligned space); it exists in storaged only.

use std::path::{Path, PathBuf};

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shards: usize,
    pub shard_bytes: u64,
    pub imagenet_objects: usize,
    pub fixed4k_objects: usize,
    pub fixed128k_objects: usize,
    pub list_objects: usize,
    /// Items read per random-read run (fewer than the dataset at high
    /// sizes, to bound run time).
    pub random_items: usize,
    pub repetitions: usize,
    pub concurrency: Vec<u32>,
    pub stream_concurrency: Vec<u32>,
    pub stat_samples: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                shards: 4,
                shard_bytes: 32 << 20,
                imagenet_objects: 512,
                fixed4k_objects: 1024,
                fixed128k_objects: 256,
                list_objects: 20_000,
                random_items: 256,
                repetitions: 1,
                concurrency: vec![1, 16, 64],
                stream_concurrency: vec![1, 4],
                stat_samples: 200,
            }
        } else {
            Plan {
                shards: 16,
                shard_bytes: 256 << 20,
                imagenet_objects: 8192,
                fixed4k_objects: 16_384,
                fixed128k_objects: 4096,
                list_objects: 1_000_000,
                random_items: 2048,
                repetitions: 3,
                concurrency: vec![1, 4, 16, 64, 256],
                stream_concurrency: vec![1, 4],
                stat_samples: 2000,
            }
        }
    }
}

/// xorshift64*: deterministic, so every run reads the same bytes in the same
/// order.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// ImageNet-like sizes: log-normal with mean about 110 KiB, clipped.
pub fn imagenet_sizes(n: usize, seed: u64) -> Vec<u64> {
    let sigma: f64 = 0.7;
    let mean: f64 = 110.0 * 1024.0;
    let mu = mean.ln() - sigma * sigma / 2.0;
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| ((mu + sigma * rng.normal()).exp() as u64).clamp(4096, 1 << 20))
        .collect()
}

/// A dataset as files on disk: relative paths and sizes.
#[derive(Debug, Clone)]
pub struct FileSet {
    pub name: String,
    pub root: PathBuf,
    pub files: Vec<(String, u64)>,
}

impl FileSet {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }
}

/// Writes `files` under `root/name` with pseudo-random contents.
pub fn generate(
    root: &Path,
    name: &str,
    files: Vec<(String, u64)>,
    seed: u64,
) -> std::io::Result<FileSet> {
    use std::io::Write;
    let dir = root.join(name);
    let mut rng = Rng::new(seed);
    let block: Vec<u8> = (0..(1usize << 20) + 4096)
        .map(|_| rng.next_u64() as u8)
        .collect();
    for (i, (rel, size)) in files.iter().enumerate() {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&p)?);
        let mut left = *size as usize;
        // A different phase per file, so no two files are identical.
        let mut at = (i * 4099) % 4096;
        while left > 0 {
            let n = left.min(block.len() - at);
            f.write_all(&block[at..at + n])?;
            left -= n;
            at = 0;
        }
        f.flush()?;
    }
    Ok(FileSet {
        name: name.into(),
        root: dir,
        files,
    })
}

/// File lists of the datasets in `plan`.
pub fn layouts(plan: &Plan) -> Vec<(&'static str, Vec<(String, u64)>)> {
    let shards = (0..plan.shards)
        .map(|i| (format!("shard-{i:04}.tar"), plan.shard_bytes))
        .collect();
    let imagenet = imagenet_sizes(plan.imagenet_objects, 7)
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("train/n{:08}/img_{i:07}.JPEG", i % 100), s))
        .collect();
    let fixed = |n: usize, size: u64| {
        (0..n)
            .map(|i| (format!("s/{:03}/{i:07}.bin", i % 128), size))
            .collect::<Vec<_>>()
    };
    vec![
        ("shards", shards),
        ("imagenet", imagenet),
        ("fixed4k", fixed(plan.fixed4k_objects, 4096)),
        ("fixed128k", fixed(plan.fixed128k_objects, 128 << 10)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_distribution_is_plausible() {
        let s = imagenet_sizes(20_000, 1);
        let mean = s.iter().sum::<u64>() as f64 / s.len() as f64;
        assert!(
            (90.0 * 1024.0..130.0 * 1024.0).contains(&mean),
            "mean {mean}"
        );
        assert!(s.iter().all(|&x| (4096..=1 << 20).contains(&x)));
        assert_eq!(imagenet_sizes(10, 1), imagenet_sizes(10, 1));
    }

    #[test]
    fn generated_files_have_their_sizes() {
        let d = tempfile::tempdir().unwrap();
        let fs = generate(
            d.path(),
            "x",
            vec![("a/b".into(), 5000), ("c".into(), 0), ("d".into(), 3 << 20)],
            1,
        )
        .unwrap();
        assert_eq!(std::fs::metadata(fs.root.join("a/b")).unwrap().len(), 5000);
        assert_eq!(std::fs::metadata(fs.root.join("d")).unwrap().len(), 3 << 20);
        assert_ne!(
            std::fs::read(fs.root.join("a/b")).unwrap()[..64],
            std::fs::read(fs.root.join("d")).unwrap()[..64]
        );
        assert_eq!(fs.total_bytes(), 5000 + (3 << 20));
    }
}
